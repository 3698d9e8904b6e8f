"""``compress`` with ``method: rewrite`` through real recipe runs.

The long traces are real MATH-500 solutions (replayed by the ``replay`` engine and verified by the
real ``verify`` stage); the rewriter is a second ``replay`` engine that returns, per row, a rewrite
the test constructs for one case (shorter and correct, answer changed, longer, incomplete, ...),
so each acceptance rule is exercised against the real re-verification (math-verify).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import MATH500, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages.compress import _APPROX, CompressParams, fill_template, split_rewrite

WRONG = "-98765"


def approx(text: str) -> int:
    return len(_APPROX.findall(text))


def short_of(solution: str) -> str:
    """The first third of a solution, cut at a space: a 'concise' trace for the replayed rewrite."""
    cut = solution[: len(solution) // 3]
    return cut.rsplit(" ", 1)[0]


def boxed(ans: str) -> str:
    return f"The final answer is $\\boxed{{{ans}}}$."


# case -> how the rewrite is built from (solution, gold); expected compress_status
CASES: dict[str, tuple[Any, str]] = {
    "shorter_correct": (lambda s, g: f"<think>\n{short_of(s)}\n</think>\n\n{boxed(g)}", "accepted"),
    "answer_changed": (lambda s, g: f"<think>\n{short_of(s)}\n</think>\n\n{boxed(WRONG)}", "rejected:answer-changed"),
    "longer": (lambda s, g: f"<think>\n{s}\n\nLet me double-check everything once more.\n\n{s}\n</think>\n\n{boxed(g)}", "rejected:not-shorter"),
    "unclosed": (lambda s, g: f"<think>\n{short_of(s)}\n\n{boxed(g)}", "rejected:incomplete"),
    "no_answer": (lambda s, g: f"<think>\n{short_of(s)}\n</think>\n\nThat is all.", "rejected:incomplete"),
    # a reasoning rewriter thinks first: the last think block is the rewritten trace
    "rewriter_thinks": (lambda s, g: f"<think>I should keep the key steps.</think>\n<think>\n{short_of(s)}\n</think>\n\n{boxed(g)}", "accepted"),
}
PROBLEMS = [1, 3, 5, 6, 7, 9]  # MATH-500 rows with long solutions


def rows_for(cases: list[str], *, wrong_original: bool = False) -> list[dict[str, Any]]:
    probs = read_jsonl(MATH500, limit=max(PROBLEMS) + 1)
    out = []
    for case, i in zip(cases, PROBLEMS):
        p = probs[i]
        make, _ = CASES[case]
        out.append({
            "pid": p["unique_id"], "case": case, "problem": p["problem"], "answer": p["answer"],
            "trace": f"<think>\n{p['solution']}\n</think>\n\n{boxed(WRONG if wrong_original else p['answer'])}",
            "rewrite": make(p["solution"], p["answer"]),
        })
    return out


def recipe(tmp_path: Path, rows: list[dict[str, Any]], compress: dict[str, Any], name: str = "c",
           pre: list[dict[str, Any]] | None = None) -> Path:
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name,
        "workdir": str(tmp_path / f"work-{name}"),
        "source": [{"path": str(src), "columns": {"problem": "problem", "answer": "answer", "id": "pid"}, "domain": "math"}],
        "engines": {"existing": {"kind": "replay", "column": "trace"}, "rewriter": {"kind": "replay", "column": "rewrite", "name": "rewriter"}},
        "stages": [{"generate": {"engine": "existing"}}, {"verify": {}}, *(pre or []), {"compress": {"engine": "rewriter", **compress}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / f"out-{name}"), "options": {"keep_columns": ["case", "reasoning", "compress_status"]}}],
    })


def run(path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    res = Runner(load_recipe(path)).run()
    return res.final_frame().collect(), res.stats.to_dict()


def test_split_rewrite_and_template() -> None:
    tags = ("<think>", "</think>")
    assert split_rewrite("<think>a</think>b", None, tags) == ("a", "b")
    assert split_rewrite("<think>meta</think><think>a</think> b ", None, tags) == ("a", "b")
    assert split_rewrite("<think>a b", None, tags) == (None, None)
    assert split_rewrite("answer only", "short trace", tags) == ("short trace", "answer only")  # server split it out
    assert split_rewrite("a</think>b", None, tags) == (None, None)
    # LaTeX braces in problems / traces survive the template
    msg = fill_template("{problem} | {reasoning} | {budget}", {"problem": "f(x) = {x}", "reasoning": "\\frac{1}{2}", "budget": "7"})
    assert msg == "f(x) = {x} | \\frac{1}{2} | 7"
    with pytest.raises(ValueError, match="budget"):
        CompressParams(engine="r", prompt_template="{reasoning} only")
    with pytest.raises(ValueError, match="ratio"):
        CompressParams(engine="r", budgets={"easy": 1.5})
    with pytest.raises(ValueError, match="engine"):
        CompressParams()


def test_rewrite_acceptance_rules(tmp_path: Path) -> None:
    cases = list(CASES)
    path = recipe(tmp_path, rows_for(cases), {"margin": 0.1, "record_prompt": True})
    df, stats = run(path)
    assert df.height == len(cases)
    assert set(df["verdict"]) == {"correct"}  # the originals verified correct
    by_case = {r["case"]: r for r in df.iter_rows(named=True)}
    for case, (_, status) in CASES.items():
        r = by_case[case]
        assert r["compress_status"] == status, (case, r["compress_status"], r["compress_verdict"])
        assert r["reasoning_tokens"] == approx(r["reasoning"])
        if status == "accepted":
            assert r["reasoning_compressed"] and r["reasoning_compressed"] != r["reasoning"]
            assert r["reasoning_compressed_tokens"] == approx(r["reasoning_compressed"]) <= 0.9 * r["reasoning_tokens"]
            assert r["compress_verdict"] == "correct" and "\\boxed" in r["response_compressed"]
            assert r["compress_ratio"] == pytest.approx(r["reasoning_compressed_tokens"] / r["reasoning_tokens"])
        else:  # the original is kept: no compressed trace
            assert r["reasoning_compressed"] is None and r["reasoning_compressed_tokens"] is None
    assert by_case["rewriter_thinks"]["reasoning_compressed"].startswith(short_of(read_jsonl(MATH500, limit=10)[9]["solution"])[:20])
    assert "I should keep" not in by_case["rewriter_thinks"]["reasoning_compressed"]
    assert by_case["answer_changed"]["compress_verdict"] == "incorrect"
    assert by_case["longer"]["compress_ratio"] > 1
    # the prompt carried the problem, the long trace and the ratio budget of the default band
    for r in by_case.values():
        content = r["compress_messages"][-1]["content"]
        assert r["problem"] in content and r["reasoning"] in content
        assert r["compress_band"] == "default" and r["compress_budget"] == max(32, round(0.5 * r["reasoning_tokens"]))
        assert f"at most {r['compress_budget']} tokens" in content
        assert r["compressor"].startswith("rewriter:rewrite") and len(r["compress_prompt_hash"]) == 16

    # the dataset trains on the compressed trace where accepted, on the original elsewhere
    out = pl.read_parquet(tmp_path / "out-c" / "data" / "*.parquet")
    for r in out.iter_rows(named=True):
        text = r["messages"][-1]["content"]
        src = by_case[r["case"]]
        kept = src["reasoning_compressed"] if src["compress_status"] == "accepted" else src["reasoning"]
        assert text.startswith(f"<think>\n{kept}\n</think>")

    # a rerun asks the rewriter nothing; a new template is a new fingerprint (recomputed)
    again = run(path)[1]["stages"][2]
    assert (again["computed"], again["cached"]) == (0, len(cases))
    fp = again["fingerprint"]
    path2 = recipe(tmp_path, rows_for(cases), {"margin": 0.1, "prompt_template": "Shorten ({budget} tokens):\n{reasoning}"})
    st2 = run(path2)[1]["stages"][2]
    assert st2["fingerprint"] != fp and st2["computed"] == len(cases)


def test_margin_and_verdict_gate(tmp_path: Path) -> None:
    # a 10% shorter rewrite passes margin 0.1 but not margin 0.9; incorrect originals are skipped
    rows = rows_for(["shorter_correct", "shorter_correct"])
    rows[1]["trace"] = rows[1]["trace"].replace(rows[1]["answer"] + "}$", WRONG + "}$")
    df, _ = run(recipe(tmp_path, rows, {"margin": 0.9}, name="m"))
    st = {r["pid"] if "pid" in r else r["id"]: r["compress_status"] for r in df.iter_rows(named=True)}
    assert sorted(st.values()) == ["rejected:not-shorter", "skipped:incorrect"]


def test_no_gold_answer_must_match_the_original(tmp_path: Path) -> None:
    # without a gold answer the rewrite must give the original's answer (math-verify equality)
    rows = rows_for(["shorter_correct", "answer_changed"])
    for r in rows:
        r["answer"] = None
    df, _ = run(recipe(tmp_path, rows, {"verdicts": None}, name="ng"))
    assert set(df["verdict"]) == {"unverifiable"}
    got = {r["case"]: (r["compress_status"], r["compress_verdict"]) for r in df.iter_rows(named=True)}
    assert got == {"shorter_correct": ("accepted", "correct"), "answer_changed": ("rejected:answer-changed", "incorrect")}


def test_stats_reach_run_stats_and_card(tmp_path: Path) -> None:
    cases = list(CASES)
    rows = rows_for(cases)
    # one more problem with two samples, one correct and one wrong: pass rate 0.5 -> band medium
    p = read_jsonl(MATH500, limit=11)[10]
    for final in (p["answer"], WRONG):
        rows.append({"pid": p["unique_id"], "case": f"medium-{final}", "problem": p["problem"], "answer": p["answer"],
                     "trace": f"<think>\n{p['solution']}\n</think>\n\n{boxed(final)}",
                     "rewrite": CASES["shorter_correct"][0](p["solution"], p["answer"])})
    pre = [{"difficulty": {"bands": {"easy": 0.75, "hard": 0.25}}}]
    path = recipe(tmp_path, rows, {"budgets": {"easy": 0.3, "medium": 0.5, "hard": 0.7, "unsolved": 0.7, "default": 0.5}}, name="s", pre=pre)
    df, stats = run(path)
    st = next(s for s in stats["stages"] if s["name"] == "compress")
    ex = st["extra"]
    tried = df.filter(pl.col("compress_status").str.starts_with("accepted") | pl.col("compress_status").str.starts_with("rejected"))
    acc = tried.filter(pl.col("compress_status") == "accepted")
    assert ex["method"] == "rewrite" and ex["token_unit"].startswith("approx")
    assert ex["rows"] == len(cases) + 2 and ex["skipped"] == {"skipped:incorrect": 1}
    assert ex["attempted"] == len(cases) + 1 and ex["accepted"] == 3 == acc.height
    assert ex["acceptance_rate"] == pytest.approx(3 / (len(cases) + 1))
    assert ex["mean_tokens_before"] == pytest.approx(tried["reasoning_tokens"].mean())
    after = [r["reasoning_compressed_tokens"] if r["compress_status"] == "accepted" else r["reasoning_tokens"] for r in tried.iter_rows(named=True)]
    assert ex["mean_tokens_after"] == pytest.approx(sum(after) / len(after)) and ex["mean_tokens_after"] < ex["mean_tokens_before"]
    assert ex["mean_tokens_after_accepted"] == pytest.approx(acc["reasoning_compressed_tokens"].mean())
    assert ex["rejected"] == {"rejected:answer-changed": 1, "rejected:incomplete": 2, "rejected:not-shorter": 1}
    # per band: the one-sample problems are easy (pass rate 1), the two-sample one medium (0.5)
    assert set(ex["by_band"]) == {"easy", "medium"}
    assert (ex["by_band"]["easy"]["rows"], ex["by_band"]["easy"]["accepted"]) == (len(cases), 2)
    assert (ex["by_band"]["medium"]["rows"], ex["by_band"]["medium"]["accepted"], ex["by_band"]["medium"]["acceptance_rate"]) == (1, 1, 1.0)
    med = tried.filter(pl.col("compress_band") == "medium")
    assert ex["by_band"]["medium"]["mean_tokens_before"] == med["reasoning_tokens"][0]
    assert ex["by_band"]["medium"]["mean_tokens_after"] == med["reasoning_compressed_tokens"][0]
    ratio = {"easy": 0.3, "medium": 0.5}
    for r in tried.iter_rows(named=True):
        assert r["compress_budget"] == max(32, round(ratio[r["compress_band"]] * r["reasoning_tokens"]))
    # run stats on disk and the dataset card's inputs carry the same numbers
    on_disk = json.loads((tmp_path / "work-s" / "stats.json").read_text())
    assert next(s for s in on_disk["stages"] if s["name"] == "compress")["extra"] == ex
    summary = json.loads((tmp_path / "out-s" / "summary.json").read_text())
    assert summary["compression"][0]["extra"]["acceptance_rate"] == pytest.approx(ex["acceptance_rate"])
    card = (tmp_path / "out-s" / "README.md").read_text()
    assert "acceptance_rate" in card and "mean_tokens_before" in card


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\[2\]\.compress"):
        load_recipe(recipe(tmp_path, rows_for(["longer"]), {"budget_unit": "ratio", "budgets": {"easy": 3}}, name="e"))


def test_code_rewrite_runs_the_tests(tmp_path: Path) -> None:
    # HumanEval: the original trace ends in the canonical solution; rewrites are re-run in the sandbox
    from tracepipe import DATA_DIR

    he = read_jsonl(DATA_DIR / "benchmarks" / "humaneval.jsonl", limit=2)
    rows = []
    for p, broken in zip(he, (False, True)):
        code = p["prompt"] + p["canonical_solution"]
        long = "\n".join(f"Step {i}: consider the input carefully and check the edge cases again." for i in range(30))
        wrong = p["prompt"] + "    return None\n"
        rows.append({**p, "trace": f"<think>\n{long}\n</think>\n\n```python\n{code}\n```",
                     "rewrite": f"<think>\nLoop over the input once.\n</think>\n\n```python\n{wrong if broken else code}\n```"})
    src = write_jsonl(tmp_path / "he.jsonl", rows)
    path = write_recipe(tmp_path / "he.yaml", {
        "name": "he", "workdir": str(tmp_path / "work-he"),
        "source": [{"path": str(src), "preset": "humaneval"}],
        "engines": {"existing": {"kind": "replay", "column": "trace"}, "rewriter": {"kind": "replay", "column": "rewrite"}},
        "stages": [{"generate": {"engine": "existing"}}, {"verify": {}}, {"compress": {"engine": "rewriter"}}],
        "outputs": [],
    })
    df, _ = run(path)
    assert set(df["verdict"]) == {"correct"} and set(df["domain"]) == {"code"}
    got = {r["id"]: (r["compress_status"], r["compress_verdict"]) for r in df.iter_rows(named=True)}
    assert got == {he[0]["task_id"]: ("accepted", "correct"), he[1]["task_id"]: ("rejected:tests-failed", "incorrect")}
