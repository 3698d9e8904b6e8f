"""``dpo-pairs`` pair kinds: correctness (default), length (short vs long correct), compressed.

Hand-written rows check exact pairs per policy; a real run (load_recipe + Runner) over MATH-500
with the replay engine, the verify stage and a compress stage (a replay rewriter, re-verified by
math-verify) checks the counts end to end, and the pairs load into TRL's preference format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from tracepipe import DATA_DIR
from tracepipe.outputs import get_format

MATH500 = DATA_DIR / "benchmarks" / "math500.jsonl"
THINK = "<think>\n{}\n</think>\n\n{}"


def dpo(rows: pl.LazyFrame | list[dict[str, Any]], **opts: Any) -> pl.DataFrame:
    lf = rows if isinstance(rows, pl.LazyFrame) else pl.LazyFrame(rows)
    return get_format("dpo-pairs")(lf, opts).collect()


def triples(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    return df.select("id", "chosen_sample", "rejected_sample").rows()


def row(pid: str, s: int, verdict: str = "correct", tokens: int | None = 100, **kw: Any) -> dict[str, Any]:
    r = {
        "id": pid, "problem": f"Question {pid}?", "sample": s, "_key": f"{pid}/{s}", "verdict": verdict,
        "reasoning": f"trace {pid}/{s} " + "x" * (tokens or 10), "response": f"answer {s}", "completion_tokens": tokens,
    }
    r.update(kw)
    return r


# -- kind: length ------------------------------------------------------------------------------------
def length_rows() -> list[dict[str, Any]]:
    return [
        # p1: three correct (100, 300, 150) and a longer incorrect one, which `length` never uses
        row("p1", 0, tokens=100), row("p1", 1, tokens=300), row("p1", 2, tokens=150), row("p1", 3, "incorrect", 1000),
        row("p2", 0, tokens=200), row("p2", 1, tokens=250),  # ratio 1.25
        row("p3", 0, tokens=120), row("p3", 1, "incorrect", 900),  # one correct sample only
        row("p4", 0, tokens=100),  # its long correct sample was dropped by a later stage (rejects)
    ]


@pytest.fixture
def rejects_file(tmp_path: Path) -> str:
    """A workdir rejects file: p4's long correct sample and p2's incorrect one, dropped by select."""
    rej = pl.DataFrame([row("p4", 1, tokens=400), row("p2", 2, "incorrect", 500)]).with_columns(
        pl.lit("select: per_problem").alias("_reason"), pl.lit("select").alias("_stage"),
    )
    path = tmp_path / "003-select.parquet"
    rej.write_parquet(path)
    return str(path)


def test_length_shortest_vs_longest_correct(rejects_file: str) -> None:
    df = dpo(length_rows(), kind="length", _rejects=[rejects_file])
    assert triples(df) == [("p1", 0, 1), ("p4", 0, 1)]  # p2: 250 < 1.5 * 200; p3: one correct sample
    assert df["chosen_length"].to_list() == [100, 100] and df["rejected_length"].to_list() == [300, 400]
    assert set(df["length_unit"]) == {"completion_tokens"} and set(df["pair_kind"]) == {"length"}
    assert df.row(0, named=True)["rejected"][0]["content"] == THINK.format("trace p1/1 " + "x" * 300, "answer 1")
    # min_ratio decides which problems pair up
    assert triples(dpo(length_rows(), kind="length", min_ratio=1.2, _rejects=[rejects_file])) == [("p1", 0, 1), ("p2", 0, 1), ("p4", 0, 1)]
    assert triples(dpo(length_rows(), kind="length", min_ratio=3.5, _rejects=[rejects_file])) == [("p4", 0, 1)]
    assert triples(dpo(length_rows(), kind="length", min_ratio=5, _rejects=[rejects_file])) == []
    # without the rejects, p4 has no long sample
    assert triples(dpo(length_rows(), kind="length", include_rejects=False, _rejects=[rejects_file])) == [("p1", 0, 1)]


def test_length_all_pairs_and_cap() -> None:
    # p1 chosen in order 0 (100), 2 (150), 1 (300); rejected 1, 2, 0: pairs passing 1.5x, by rank sum
    assert triples(dpo(length_rows(), kind="length", pairs="all")) == [("p1", 0, 1), ("p1", 0, 2), ("p1", 2, 1)]
    assert triples(dpo(length_rows(), kind="length", pairs="all", max_pairs_per_problem=2)) == [("p1", 0, 1), ("p1", 0, 2)]
    assert triples(dpo(length_rows(), kind="length", pairs="all", min_ratio=2.5)) == [("p1", 0, 1)]
    # no ratio: any strictly longer correct sample (p2's 250 vs 200 now pairs; equal lengths never do)
    ties = [*length_rows(), row("p2", 2, tokens=250)]
    assert triples(dpo(ties, kind="length", pairs="all", min_ratio=None)) == [
        ("p1", 0, 1), ("p1", 0, 2), ("p1", 2, 1), ("p2", 0, 1), ("p2", 0, 2),
    ]


def test_length_columns_and_fallbacks() -> None:
    rows = length_rows()
    # characters of the assistant text (reasoning = "trace pX/s " + tokens * "x", so the same order)
    by_chars = dpo(rows, kind="length", length_column="chars")
    assert triples(by_chars) == [("p1", 0, 1)] and by_chars["length_unit"].to_list() == ["chars"]
    text = THINK.format("trace p1/0 " + "x" * 100, "answer 0")
    assert by_chars["chosen_length"].to_list() == [len(text)]
    # a column of the user's: longest by it, whatever completion_tokens says
    score = [dict(r, score=10 - r["sample"]) for r in rows]
    assert triples(dpo(score, kind="length", length_column="score", min_ratio=1.0)) == [("p1", 2, 0), ("p2", 1, 0)]
    # no token counts (a replay engine without tokenizer): characters for the whole problem, no unit mix
    nulls = [dict(r, completion_tokens=None) if (r["id"], r["sample"]) == ("p1", 1) else r for r in rows]
    df = dpo(nulls, kind="length")
    assert triples(df) == [("p1", 0, 1)]
    assert df["length_unit"].to_list() == ["chars"]
    assert triples(dpo(pl.LazyFrame(rows).drop("completion_tokens"), kind="length")) == [("p1", 0, 1)]


def compressed_rows() -> list[dict[str, Any]]:
    """p5/p7: sample 1 is long (400 tokens) but its compressed trace (40) is shorter than sample 0's (90)."""
    out = []
    for pid in ("p5", "p7"):
        out += [
            row(pid, 0, tokens=100, reasoning_tokens=90, compress_status="rejected:not-shorter"),
            row(pid, 1, tokens=400, reasoning_tokens=380, compress_status="accepted", reasoning_compressed=f"short {pid}",
                reasoning_compressed_tokens=40),
            row(pid, 2, "incorrect", 700, reasoning_tokens=690, compress_status="skipped:incorrect"),
        ]
    return out


def test_length_uses_compressed_length_where_present() -> None:
    rows = compressed_rows()
    auto = dpo(rows, kind="length")
    # trained on the compressed trace, sample 1 (40) is the short one, sample 0 (90) the long one
    assert triples(auto) == [("p5", 1, 0), ("p7", 1, 0)]
    assert auto["length_unit"].to_list() == ["reasoning_compressed_tokens"] * 2
    assert (auto["chosen_length"].to_list(), auto["rejected_length"].to_list()) == ([40, 40], [90, 90])
    assert auto.row(0, named=True)["chosen"][0]["content"] == THINK.format("short p5", "answer 1")
    assert triples(dpo(rows, kind="length", length_column="reasoning_compressed_tokens")) == triples(auto)
    assert triples(dpo(rows, kind="length", length_column="completion_tokens")) == [("p5", 0, 1), ("p7", 0, 1)]
    # without use_compressed the original traces are trained on: completion_tokens again
    assert triples(dpo(rows, kind="length", use_compressed=False)) == [("p5", 0, 1), ("p7", 0, 1)]


# -- kind: correctness (the default) -----------------------------------------------------------------
def test_correctness_shortest_uses_compressed_length() -> None:
    rows = compressed_rows()
    auto = dpo(rows)
    assert triples(auto) == [("p5", 1, 2), ("p7", 1, 2)]
    assert set(auto["pair_kind"]) == {"correctness"} and auto["chosen_length"].to_list() == [40, 40]
    assert triples(dpo(rows, length_column="completion_tokens")) == [("p5", 0, 2), ("p7", 0, 2)]
    assert triples(dpo(rows, kind="correctness", chosen="longest")) == [("p5", 0, 2), ("p7", 0, 2)]
    # the incorrect side needs no compress columns of its own: it measures itself (per side)
    lf = pl.LazyFrame(rows).with_columns(
        pl.when(pl.col("verdict") == "incorrect").then(None).otherwise(pl.col("reasoning_tokens")).alias("reasoning_tokens")
    )
    df = dpo(lf)
    assert triples(df) == [("p5", 1, 2), ("p7", 1, 2)] and df["rejected_length"].to_list() == [700, 700]
    assert df["length_unit"].to_list() == ["reasoning_compressed_tokens / completion_tokens"] * 2


def test_correctness_defaults_unchanged(rejects_file: str) -> None:
    df = dpo(length_rows(), _rejects=[rejects_file])
    # p1 shortest correct vs its incorrect; p2's negative comes from the rejects; p4 has none
    assert triples(df) == [("p1", 0, 3), ("p2", 0, 2), ("p3", 0, 1)]
    assert df["length_unit"].to_list() == ["completion_tokens"] * 3
    assert triples(dpo(length_rows(), kind="correctness", include_rejects=False, _rejects=[rejects_file])) == [("p1", 0, 3), ("p3", 0, 1)]


# -- kind: compressed ---------------------------------------------------------------------------------
def test_compressed_pairs_one_per_accepted_row() -> None:
    rows = compressed_rows() + [
        # shortest-correct keeps the original trace as "compressed": nothing to prefer
        row("p8", 0, tokens=50, reasoning_tokens=50, compress_status="accepted", reasoning_compressed="trace p8/0 " + "x" * 50,
            reasoning_compressed_tokens=50),
        # accepted twice in one problem: two pairs
        row("p9", 0, tokens=200, reasoning_tokens=190, compress_status="accepted", reasoning_compressed="c9/0", reasoning_compressed_tokens=20),
        row("p9", 1, tokens=300, reasoning_tokens=290, compress_status="accepted", reasoning_compressed="c9/1", reasoning_compressed_tokens=100),
        row("p9", 2, tokens=300, reasoning_tokens=290, compress_status="rejected:answer-changed"),
        row("p9", 3, tokens=300, reasoning_tokens=290, compress_status="accepted", reasoning_compressed="c9/3",
            reasoning_compressed_tokens=30, response=None),  # truncated: no response
    ]
    df = dpo(rows, kind="compressed")
    assert triples(df) == [("p5", 1, 1), ("p7", 1, 1), ("p9", 0, 0), ("p9", 1, 1)]
    assert df["chosen_length"].to_list() == [40, 40, 20, 100] and df["rejected_length"].to_list() == [380, 380, 190, 290]
    assert set(df["length_unit"]) == {"reasoning_compressed_tokens"} and set(df["pair_kind"]) == {"compressed"}
    # the same texts sft-messages trains on (compressed) / would train on without compression
    sft = get_format("sft-messages")
    lf = pl.LazyFrame(rows).filter((pl.col("id") == "p5") & (pl.col("sample") == 1))
    assert df.row(0, named=True)["chosen"] == sft(lf, {}).collect().row(0, named=True)["messages"][-1:]
    assert df.row(0, named=True)["rejected"] == sft(lf, {"use_compressed": False}).collect().row(0, named=True)["messages"][-1:]
    assert df.row(0, named=True)["rejected"][0]["content"] == THINK.format("trace p5/1 " + "x" * 400, "answer 1")
    assert df.row(0, named=True)["prompt"] == [{"role": "user", "content": "Question p5?"}]
    # options
    assert triples(dpo(rows, kind="compressed", min_ratio=8)) == [("p5", 1, 1), ("p7", 1, 1), ("p9", 0, 0)]
    assert triples(dpo(rows, kind="compressed", pairs="one")) == [("p5", 1, 1), ("p7", 1, 1), ("p9", 0, 0)]
    assert triples(dpo(rows, kind="compressed", pairs="one", chosen="longest")) == [("p5", 1, 1), ("p7", 1, 1), ("p9", 1, 1)]
    assert triples(dpo(rows, kind="compressed", max_pairs_per_problem=1)) == [("p5", 1, 1), ("p7", 1, 1), ("p9", 0, 0)]
    field = dpo(rows, kind="compressed", reasoning="field").row(0, named=True)
    assert field["chosen"][0]["reasoning_content"] == "short p5" and field["rejected"][0]["reasoning_content"].startswith("trace p5/1")
    plain = dpo(rows, kind="compressed", conversational=False).row(0, named=True)
    assert plain["prompt"] == "Question p5?" and plain["chosen"] == THINK.format("short p5", "answer 1")
    # without token counts: characters of the two texts
    chars = dpo(pl.LazyFrame(rows).drop("reasoning_compressed_tokens"), kind="compressed")
    assert set(chars["length_unit"]) == {"chars"} and (chars["chosen_length"] < chars["rejected_length"]).all()


# -- option errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"kind": "bogus"}, "kind"),
        ({"kind": "length", "chosen": "random"}, "shortest"),
        ({"kind": "compressed", "rejected": "longest"}, "rejected"),
        ({"kind": "compressed", "length_column": "completion_tokens"}, "length_column"),
        ({"kind": "compressed", "reasoning": "none"}, "reasoning"),
        ({"min_ratio": 2}, "min_ratio"),
        ({"kind": "length", "min_ratio": 0}, "min_ratio"),
        ({"kind": "length", "length_column": "nope"}, "nope"),
        ({"kind": "length", "length_column": "response"}, "not a number"),
        ({"pairs": "some"}, "pairs"),
    ],
)
def test_option_errors(opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dpo(compressed_rows(), **opts)


def test_compressed_needs_compress_columns() -> None:
    with pytest.raises(ValueError, match="compress_status"):
        dpo(length_rows(), kind="compressed")
    with pytest.raises(ValueError, match="reasoning_compressed_tokens"):
        dpo(length_rows(), kind="length", length_column="reasoning_compressed_tokens")


# -- a real run: MATH-500 replayed, verified, compressed ----------------------------------------------
N = 12
WRONG = "The answer is $\\boxed{12345}$."
# s0: short correct trace; s1: long correct trace; s2: incorrect (wrong boxed answer)
TRACE = (
    "CASE WHEN source = 's0' THEN '<think>\nThe answer follows from the solution below; it is ' || answer || '.\n</think>\n\n' || solution "
    "WHEN source = 's1' THEN '<think>\nLet me restate the problem. ' || problem || '\nNow I solve it carefully.\n' || solution || '\n</think>\n\n' || solution "
    f"ELSE '<think>\nI guess.\n</think>\n\n{WRONG}' END"
)
# the rewriter (replayed): s1 gets a short correct trace, or a wrong answer when length(problem) % 3 = 0;
# s0 gets its own trace back (not shorter), s2 is never sent (compress skips incorrect rows)
REWRITE = (
    "CASE WHEN source = 's1' AND length(problem) % 3 <> 0 THEN '<think>\nShort: ' || answer || '.\n</think>\n\n' || solution "
    f"WHEN source = 's1' THEN '<think>\nShort.\n</think>\n\n{WRONG}' ELSE trace END"
)


def _math500() -> list[dict[str, Any]]:
    with MATH500.open() as fh:
        return [json.loads(line) for _, line in zip(range(N), fh)]


def _recipe(d: Path, tok: Path, outputs: list[dict[str, Any]], select: bool = False, name: str = "dpo") -> Path:
    stages: list[dict[str, Any]] = [
        {"map": {"set": {"trace": TRACE}}},
        {"map": {"set": {"rewrite": REWRITE}}},
        {"generate": {"engine": "existing"}},
        {"map": {"set": {"sample": "CASE WHEN source = 's0' THEN 0 WHEN source = 's1' THEN 1 ELSE 2 END"}}},
        {"verify": {}},
        {"compress": {"engine": "rewriter"}},
        {"filter": {"where": "verdict = 'correct'", "reason": "incorrect answer"}},
    ]
    if select:
        stages.append({"select": {"per_problem": 1, "prefer": "shortest"}})
    recipe = {
        "name": name,
        "workdir": str(d / "work"),
        "source": [{"path": str(MATH500), "preset": "math", "name": s, "limit": N} for s in ("s0", "s1", "s2")],
        "engines": {
            "existing": {"kind": "replay", "column": "trace", "tokenizer": str(tok)},
            "rewriter": {"kind": "replay", "column": "rewrite", "tokenizer": str(tok)},
        },
        "stages": stages,
        "outputs": outputs,
    }
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(path: Path) -> Any:
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    return Runner(load_recipe(path)).run()


def _pairs(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "data" / "*.parquet"))


OUTPUTS = {
    "correct": {},
    "correct_ct": {"length_column": "completion_tokens"},
    "length": {"kind": "length", "length_column": "completion_tokens"},
    "length_hi": {"kind": "length", "length_column": "completion_tokens", "min_ratio": 2.1},
    "length_auto": {"kind": "length"},
    "compressed": {"kind": "compressed"},
}


@pytest.fixture(scope="module")
def math_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("dpo-math")
    outputs = [{"format": "dpo-pairs", "path": f"out/{k}", "options": v} for k, v in OUTPUTS.items()]
    # the final rows, with the compress columns, to check the run did what the test designed
    outputs.append({"format": "sft-messages", "path": "out/rows", "options": {"keep_columns": ["compress_status"]}})
    _run(_recipe(d, tiny_model_dir, outputs))
    rejects = pl.concat([pl.read_parquet(p) for p in sorted((d / "work" / "rejects").glob("*.parquet"))], how="diagonal_relaxed")
    return {"dir": d, "tok": tiny_model_dir, "rejects": rejects, "rows": _pairs(d / "out" / "rows"),
            **{k: _pairs(d / "out" / k) for k in OUTPUTS}}


def test_real_run_rows_are_as_designed(math_run: dict[str, Any]) -> None:
    rej = math_run["rejects"]
    # every s2 sample is incorrect (math-verify) and filtered out; no correct sample was dropped
    assert rej.filter(pl.col("_stage") == "filter").select("source", "verdict").unique().rows() == [("s2", "incorrect")]
    assert rej.height == N
    assert (rej["compress_status"] == "skipped:incorrect").all()
    rows = math_run["rows"]
    assert rows.height == 2 * N and (rows["verdict"] == "correct").all()
    long_status = {p["unique_id"]: ("accepted" if len(p["problem"]) % 3 else "rejected:answer-changed") for p in _math500()}
    for r in rows.iter_rows(named=True):
        want = "rejected:not-shorter" if r["sample"] == 0 else long_status[r["id"]]
        assert r["compress_status"] == want, (r["id"], r["sample"])


def test_real_run_correctness_pairs(math_run: dict[str, Any]) -> None:
    problems = _math500()
    accepted = {p["unique_id"] for p in problems if len(p["problem"]) % 3 != 0}
    assert 0 < len(accepted) < N
    auto, ct = math_run["correct"], math_run["correct_ct"]
    # one pair per problem (each has an incorrect sample, in the rejects)
    assert auto.height == ct.height == N and auto["id"].to_list() == [p["unique_id"] for p in problems]
    assert set(auto["rejected_sample"]) == set(ct["rejected_sample"]) == {2}
    # shortest as trained on: the compressed long sample where the rewrite was accepted
    for r in auto.iter_rows(named=True):
        assert r["chosen_sample"] == (1 if r["id"] in accepted else 0), r["id"]
        assert r["length_unit"] == "reasoning_compressed_tokens"
        assert r["chosen"][0]["content"].startswith("<think>\nShort: " if r["id"] in accepted else "<think>\nThe answer follows")
        assert WRONG in r["rejected"][0]["content"]
    # by completion tokens (the original lengths), the short sample 0 always
    assert set(ct["chosen_sample"]) == {0} and set(ct["length_unit"]) == {"completion_tokens"}


def _ratio_table(math_run: dict[str, Any]) -> dict[str, float]:
    """completion_tokens(s1) / completion_tokens(s0) per problem, counted here with the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(math_run["tok"]))

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    out = {}
    for p in _math500():
        short = f"<think>\nThe answer follows from the solution below; it is {p['answer']}.\n</think>\n\n{p['solution']}"
        long = f"<think>\nLet me restate the problem. {p['problem']}\nNow I solve it carefully.\n{p['solution']}\n</think>\n\n{p['solution']}"
        out[p["unique_id"]] = n(long) / n(short)
    return out


def test_real_run_length_pairs(math_run: dict[str, Any]) -> None:
    ratios = _ratio_table(math_run)
    for key, r in (("length", 1.5), ("length_hi", 2.1)):
        df = math_run[key]
        want = [pid for pid, x in ratios.items() if x >= r]
        assert df["id"].to_list() == want, key
        assert set(df["chosen_sample"]) <= {0} and set(df["rejected_sample"]) <= {1}
        for x in df.iter_rows(named=True):
            assert x["rejected_length"] / x["chosen_length"] == pytest.approx(ratios[x["id"]])
            assert WRONG not in x["rejected"][0]["content"]  # incorrect samples are not used
    assert math_run["length"].height == N and 0 < math_run["length_hi"].height < N
    # auto: trained-on trace tokens; accepted s1 rewrites ("Short: X") are now the short ones
    auto = math_run["length_auto"]
    accepted = {p["unique_id"] for p in _math500() if len(p["problem"]) % 3 != 0}
    assert set(auto["length_unit"]) == {"reasoning_compressed_tokens"}
    for x in auto.iter_rows(named=True):
        assert (x["chosen_sample"], x["rejected_sample"]) == ((1, 0) if x["id"] in accepted else (0, 1))
        assert x["rejected_length"] >= 1.5 * x["chosen_length"]


def test_real_run_compressed_pairs(math_run: dict[str, Any]) -> None:
    problems = _math500()
    accepted = [p["unique_id"] for p in problems if len(p["problem"]) % 3 != 0]
    df = math_run["compressed"]
    assert df["id"].to_list() == accepted  # accepted rewrites only (answer-changed / not-shorter give none)
    assert set(df["chosen_sample"]) == set(df["rejected_sample"]) == {1}
    by_id = {p["unique_id"]: p for p in problems}
    for x in df.iter_rows(named=True):
        p = by_id[x["id"]]
        assert x["chosen"][0]["content"] == THINK.format(f"Short: {p['answer']}.", p["solution"])
        assert x["rejected"][0]["content"] == THINK.format(
            f"Let me restate the problem. {p['problem']}\nNow I solve it carefully.\n{p['solution']}", p["solution"]
        )
        assert x["chosen_length"] < x["rejected_length"]


def test_real_run_select_rejects_feed_length_pairs(math_run: dict[str, Any]) -> None:
    """select keeps the shortest correct sample; the long ones it drops are the length pairs' rejected side."""
    d = math_run["dir"]
    outputs = [{"format": "dpo-pairs", "path": "out/sel-length", "options": OUTPUTS["length"]},
               {"format": "sft-messages", "path": "out/sel-sft"}]
    res = _run(_recipe(d, math_run["tok"], outputs, select=True, name="dpo-select"))
    assert all(s.computed == 0 for s in res.stats.stages if s.name in ("generate", "verify", "compress"))  # cached
    sft = _pairs(d / "out" / "sel-sft")
    assert sft.height == N and set(sft["sample"]) == {0}  # only the short samples are final rows
    df = _pairs(d / "out" / "sel-length")
    assert df.select("id", "chosen_sample", "rejected_sample").rows() == math_run["length"].select("id", "chosen_sample", "rejected_sample").rows()
    assert df["rejected"].to_list() == math_run["length"]["rejected"].to_list()


@pytest.mark.slow
def test_pairs_load_into_trl(math_run: dict[str, Any], tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    d = math_run["dir"] / "out"
    files = [str(p) for k in ("length", "compressed") for p in sorted((d / k / "data").glob("train-*.parquet"))]
    ds = load_dataset("parquet", data_files={"train": files})["train"]
    assert ds.num_rows == math_run["length"].height + math_run["compressed"].height
    tok = AutoTokenizer.from_pretrained(math_run["tok"])
    for example in (ds[0], ds[ds.num_rows - 1]):
        assert is_conversational(example)
        applied = maybe_apply_chat_template(example, tok)
        assert applied["prompt"].endswith("<|im_start|>assistant\n")
        assert applied["chosen"] != applied["rejected"] and "<think>" in applied["chosen"]
    model = AutoModelForCausalLM.from_pretrained(math_run["tok"])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, max_length=256)
    trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
    row0 = trainer.train_dataset[0]
    assert any(k.startswith("chosen") for k in row0) and any(k.startswith("rejected") for k in row0)
    assert trainer.train().global_step == 1
