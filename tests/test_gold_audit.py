"""``gold_audit`` on real GSM8K train rows, with planted wrong gold answers.

Each problem gets four samples (replayed traces: the GSM8K solution as reasoning, a boxed final
answer). The samples of a planted problem give the true answer in different spellings (``72``,
``\\frac{144}{2}``, ``30 + 42``: only mathematical equivalence groups them) plus one wrong sample;
other problems test what must not be flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.sources import gsm8k_answer
from tracepipe.stages.gold_audit import canonical

N_PROBLEMS = 24
PLANTED = {3: 7, 8: -5, 15: 11}  # problem index -> how far off the planted gold is
SCATTERED = 20  # planted too, but its samples disagree with each other: not flagged
ALL_WRONG = 21  # clean gold; every sample wrong, each differently: not flagged
MOSTLY_WRONG = 22  # clean gold; three samples share a mistake, one is right: not flagged


def answers_for(i: int, v: int) -> list[str]:
    if i in PLANTED:
        return [str(v), f"\\frac{{{2 * v}}}{{2}}", f"{v - 30} + 30", str(v + 100)]
    if i == SCATTERED:
        return [str(v), str(v + 1), str(v + 2), "NONE"]
    if i == ALL_WRONG:
        return [str(v + 1), str(v + 2), str(v + 3), str(v + 4)]
    if i == MOSTLY_WRONG:
        return [str(v + 1), str(v + 1), f"{v + 1}.0", str(v)]
    return [str(v), str(v), f"{v}.0", str(v - 1)]


def rows() -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(read_jsonl(GSM8K_TRAIN, limit=N_PROBLEMS)):
        v = int(gsm8k_answer(r["answer"]) or "")
        gold = v + PLANTED.get(i, 0) + (9 if i == SCATTERED else 0)
        steps = r["answer"].rsplit("####", 1)[0].strip()
        for s, a in enumerate(answers_for(i, v)):
            end = "I could not finish." if a == "NONE" else f"The final answer is $\\boxed{{{a}}}$."
            out.append({"pid": f"gsm8k-train-{i}", "question": r["question"], "gold": str(gold), "sample_no": s,
                        "trace": f"<think>\n{steps}\n</think>\n\n{end}"})
    return out


def recipe(tmp: Path, extra: list[dict[str, Any]] | None = None, name: str = "g") -> Path:
    src = write_jsonl(tmp / "samples.jsonl", rows())
    return write_recipe(tmp / f"{name}.yaml", {
        "name": name, "workdir": str(tmp / "work"),
        "source": [{"path": str(src), "columns": {"problem": "question", "answer": "gold", "id": "pid"},
                    "answer_format": "raw", "domain": "math"}],
        "engines": {"samples": {"kind": "replay", "column": "trace"}},
        "stages": [{"generate": {"engine": "samples"}}, {"verify": {}}, {"gold_audit": {"min_samples": 3, "min_agreement": 0.5}},
                   *(extra or [])],
        "outputs": [],
    })


def run(path: Path) -> tuple[pl.DataFrame, Any]:
    res = Runner(load_recipe(path)).run()
    return pl.concat([pl.read_parquet(p.path) for p in res.final_parts], how="diagonal_relaxed"), res.stats


def test_canonical_keys_are_equal_only_for_equal_numbers() -> None:
    same = ["72", "72.0", "72.00", "\\frac{144}{2}", "\\dfrac{144}{2}", "144/2", "\\$72", "$72$", " 72 ", "72."]
    assert {canonical(a) for a in same} == {"n:72"}
    assert canonical("1,234") == canonical("1234") == "n:1234"
    assert canonical("-\\frac{1}{2}") == canonical("-0.5") == "n:-1/2"
    assert len({canonical(a) for a in ("72", "73", "7.2", "720", "-72")}) == 5
    assert canonical("30 + 42") == "s:30+42"  # not a number: left to math-verify
    assert canonical("5/0") == "s:5/0" and canonical("") is None and canonical(None) is None


def test_planted_gold_answers_are_flagged(tmp_path: Path) -> None:
    df, stats = run(recipe(tmp_path))
    per = df.group_by("id").agg(pl.col("gold_suspect").all(), pl.col("gold_suspect").any().alias("any"),
                                pl.col("gold_alt").first(), pl.col("gold_agreement").first(), pl.col("answer").first())
    assert per["gold_suspect"].to_list() == per["any"].to_list()  # one value per problem
    flagged = {r["id"]: r for r in per.filter(pl.col("gold_suspect")).iter_rows(named=True)}
    assert set(flagged) == {f"gsm8k-train-{i}" for i in PLANTED}
    truth = {f"gsm8k-train-{i}": int(gsm8k_answer(r["answer"]) or "") for i, r in enumerate(read_jsonl(GSM8K_TRAIN, limit=N_PROBLEMS))}
    for pid, r in flagged.items():
        # three of four samples give the true answer, in three spellings (one only math-verify reads)
        assert r["gold_agreement"] == pytest.approx(0.75)
        assert canonical(r["gold_alt"]) == f"n:{truth[pid]}" and r["answer"] != r["gold_alt"]
    others = per.filter(~pl.col("gold_suspect"))
    # no sample agrees with the gold, but the samples do not agree with each other either
    assert others.filter(pl.col("id") == f"gsm8k-train-{SCATTERED}")["gold_alt"].to_list() == [None]
    all_wrong = others.filter(pl.col("id") == f"gsm8k-train-{ALL_WRONG}").row(0, named=True)
    assert all_wrong["gold_alt"] is None
    assert others.filter(pl.col("id") == f"gsm8k-train-{MOSTLY_WRONG}")["gold_alt"].to_list() == [None]
    extra = next(s for s in stats.stages if s.name == "gold_audit").extra
    assert (extra["problems"], extra["gold_suspects"]) == (N_PROBLEMS, len(PLANTED))
    assert [r["id"] for r in extra["suspect_rows"]] == sorted(flagged)

    # grouping by string equality would not have found them: each spelling appears once or twice
    for i in PLANTED:
        preds = df.filter(pl.col("id") == f"gsm8k-train-{i}")["pred_answer"].to_list()
        assert max(preds.count(p) for p in preds) == 1

    # the report lists the suspects, gold and samples' answer side by side
    from tracepipe.report import build_report

    html = build_report(load_recipe(tmp_path / "g.yaml"), tmp_path / "report").read_text()
    table = html.split('id="gold-suspects"', 1)[1].split("</table>", 1)[0]
    for pid, r in flagged.items():
        row = table.split(f">{pid}<", 1)[1].split("</tr>", 1)[0]
        assert f">{r['answer']}<" in row and f">{r['gold_alt']}<" in row and "75.0%" in row

    # a rerun decides nothing again
    _, stats2 = run(tmp_path / "g.yaml")
    assert {s.name: s.computed for s in stats2.stages} == {"generate": 0, "verify": 0, "gold_audit": 0}


@pytest.mark.parametrize("keep", [False, True])
def test_select_drops_or_keeps_the_suspects(tmp_path: Path, keep: bool) -> None:
    df, stats = run(recipe(tmp_path, [{"select": {"gold_suspect": keep}}], name=f"s{int(keep)}"))
    ids = set(df["id"].to_list())
    suspects = {f"gsm8k-train-{i}" for i in PLANTED}
    assert (ids == suspects) if keep else (ids == {f"gsm8k-train-{i}" for i in range(N_PROBLEMS)} - suspects)
    sel = next(s for s in stats.stages if s.name == "select")
    assert sel.dropped == {"select: gold_suspect": 4 * (len(PLANTED) if not keep else N_PROBLEMS - len(PLANTED))}


def test_needs_the_answers(tmp_path: Path) -> None:
    from tracepipe.errors import RunFailed

    src = write_jsonl(tmp_path / "s.jsonl", rows()[:8])
    path = write_recipe(tmp_path / "bad.yaml", {
        "name": "bad", "workdir": str(tmp_path / "w"),
        "source": [{"path": str(src), "columns": {"problem": "question", "answer": "gold", "id": "pid"}, "answer_format": "raw"}],
        "stages": [{"gold_audit": {}}], "outputs": [],
    })
    with pytest.raises((RunFailed, ValueError), match="pred_answer.*a verify stage before gold_audit"):
        Runner(load_recipe(path)).run()
