"""``difficulty`` (and ``judge_difficulty`` / ``student_rollouts``) through real recipe runs.

Hand-checkable sets: real MATH-500 problems and solutions; each sample's final answer is written
by the test (the gold answer, or a wrong one), replayed by the ``replay`` engine and checked by the
real ``verify`` stage, so every pass rate below can be counted by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import MATH500, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages._bands import BandThresholds
from tracepipe.stages.judge_difficulty import DEFAULT_LABELS, parse_label

WRONG = "-98765"
# per problem: the final answers of its four samples ("G" = gold, "W" = wrong, "-" = no answer)
PATTERNS = ["GGGG", "GGGW", "GGW-", "GWWW", "WWW-"]
EXPECTED = [  # (pass_rate, n_correct, n_judged, band), counted by hand from PATTERNS
    (1.0, 4, 4, "easy"),
    (0.75, 3, 4, "easy"),    # boundary: >= 0.75 is easy
    (0.5, 2, 4, "medium"),   # the sample with no answer is incorrect and counts
    (0.25, 1, 4, "hard"),    # boundary: <= 0.25 is hard
    (0.0, 0, 4, "unsolved"),
]


def trace(solution: str, final: str | None) -> str:
    tail = "I could not finish." if final is None else f"The final answer is $\\boxed{{{final}}}$."
    return f"<think>\n{solution}\n</think>\n\n{tail}"


def math_rows(patterns: list[str], extra: dict[str, list[Any]] | None = None, no_gold: int = 0) -> list[dict[str, Any]]:
    """Samples of the first MATH-500 problems; the last ``no_gold`` problems lose their gold answer."""
    probs = read_jsonl(MATH500, limit=len(patterns) + no_gold)
    rows = []
    for i, p in enumerate(probs):
        pat = patterns[i] if i < len(patterns) else "GGGG"
        for s, ch in enumerate(pat):
            final = {"G": p["answer"], "W": WRONG, "-": None}[ch]
            row = {"pid": p["unique_id"], "problem": p["problem"], "answer": None if i >= len(patterns) else p["answer"],
                   "trace": trace(p["solution"], final), "s": s}
            for k, vals in (extra or {}).items():
                row[k] = vals[i]
            rows.append(row)
    return rows


def make(tmp_path: Path, rows: list[dict[str, Any]], stages: list[dict[str, Any]], engines: dict[str, Any] | None = None,
         name: str = "d") -> Path:
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name,
        "workdir": str(tmp_path / f"work-{name}"),
        "source": [{"path": str(src), "columns": {"problem": "problem", "answer": "answer", "id": "pid"}, "domain": "math"}],
        "engines": {"existing": {"kind": "replay", "column": "trace"}, **(engines or {})},
        "stages": stages,
        "outputs": [],
    })


def run(path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    res = Runner(load_recipe(path)).run()
    return res.final_frame().collect(), res.stats.to_dict()


def per_problem(df: pl.DataFrame, cols: list[str]) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for r in df.iter_rows(named=True):
        vals = tuple(r[c] for c in cols)
        assert out.setdefault(r["id"], vals) == vals, "every sample of a problem carries the problem's values"
    return out


GEN_VERIFY = [{"generate": {"engine": "existing"}}, {"verify": {}}]


def test_pass_rates_and_bands_exact(tmp_path: Path) -> None:
    path = make(tmp_path, math_rows(PATTERNS, no_gold=1), [*GEN_VERIFY, {"difficulty": {"bands": {"easy": 0.75, "hard": 0.25}}}])
    df, stats = run(path)
    assert df.height == 4 * 6
    ids = [p["unique_id"] for p in read_jsonl(MATH500, limit=6)]
    got = per_problem(df, ["pass_rate", "n_correct", "n_judged", "difficulty"])
    for pid, exp in zip(ids, EXPECTED):
        assert got[pid] == exp, pid
    # the problem without a gold answer: every verdict unverifiable, nothing judged -> unknown
    assert set(df.filter(pl.col("id") == ids[5])["verdict"]) == {"unverifiable"}
    assert got[ids[5]] == (None, 0, 0, "unknown")
    extra = stats["stages"][2]["extra"]
    assert extra["problems_per_band"] == {"easy": 2, "hard": 1, "medium": 1, "unknown": 1, "unsolved": 1}
    assert extra["mean_pass_rate"] == pytest.approx((1 + 0.75 + 0.5 + 0.25 + 0) / 5)

    # other thresholds and no `unsolved` band: the same verdicts, rebanded (the set stage reruns alone)
    path2 = make(tmp_path, math_rows(PATTERNS, no_gold=1), [*GEN_VERIFY, {"difficulty": {"bands": {"easy": 0.8, "hard": 0.5}, "unsolved": False}}])
    df2, stats2 = run(path2)
    bands = {k: v[3] for k, v in per_problem(df2, ["pass_rate", "n_correct", "n_judged", "difficulty"]).items()}
    assert [bands[i] for i in ids] == ["easy", "medium", "hard", "hard", "hard", "unknown"]


def test_error_and_unverifiable_leave_the_denominator(tmp_path: Path) -> None:
    # known verdicts given in the source (no verify stage): error / unverifiable are not evidence
    verdicts = {"a": ["correct", "correct", "error", "incorrect"], "b": ["correct", "unverifiable", "unverifiable", "error"],
                "c": ["error", "error"], "d": ["incorrect", "incorrect", "incorrect", "correct", "correct"]}
    rows = [{"pid": p, "problem": f"problem {p}", "answer": "1", "verdict": v, "trace": "x"} for p, vs in verdicts.items() for v in vs]
    got = per_problem(run(make(tmp_path, rows, [{"difficulty": {}}], name="ex"))[0], ["pass_rate", "n_correct", "n_judged", "difficulty"])
    assert got == {"a": (2 / 3, 2, 3, "medium"), "b": (1.0, 1, 1, "easy"), "c": (None, 0, 0, "unknown"), "d": (0.4, 2, 5, "medium")}
    # exclude nothing: every sample is in the denominator
    got = per_problem(run(make(tmp_path, rows, [{"difficulty": {"exclude": []}}], name="all"))[0], ["pass_rate", "difficulty"])
    assert got == {"a": (0.5, "medium"), "b": (0.25, "hard"), "c": (0.0, "unsolved"), "d": (0.4, "medium")}


def test_band_thresholds_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below easy"):
        BandThresholds(easy=0.3, hard=0.5)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.difficulty\.bands"):
        load_recipe(make(tmp_path, [{"pid": "a", "problem": "p", "answer": "1", "trace": "x"}], [{"difficulty": {"bands": {"easy": 0.2, "hard": 0.6}}}], name="bad"))


def test_parse_label() -> None:
    L = DEFAULT_LABELS
    assert parse_label("Difficulty: hard", L) == "hard"
    assert parse_label("<think>it looks easy at first, but</think>\n**Difficulty:** Medium", L) == "medium"
    assert parse_label("<think>hard? no</think>This is a simple exercise.", L) == "easy"
    assert parse_label("An easy start... Difficulty = difficult", L) == "hard"  # the tagged label wins
    assert parse_label("no idea", L) is None and parse_label(None, L) is None


def test_judge_method(tmp_path: Path) -> None:
    replies = ["<think>one step</think>\nDifficulty: easy", "Difficulty: Medium", "<think>long</think>Difficulty: HARD", "I cannot tell."]
    rows = math_rows(["GGGG", "GGGG", "GWWW", "GGW-"], extra={"judge_reply": replies})
    engines = {"judge": {"kind": "replay", "column": "judge_reply", "name": "judge"}}
    stages = [*GEN_VERIFY, {"judge_difficulty": {"engine": "judge"}}, {"difficulty": {"method": "judge"}}]
    df, stats = run(make(tmp_path, rows, stages, engines, name="judge"))
    ids = [p["unique_id"] for p in read_jsonl(MATH500, limit=4)]
    got = per_problem(df, ["difficulty_judged", "difficulty", "pass_rate"])
    assert [got[i] for i in ids] == [("easy", "easy", 1.0), ("medium", "medium", 1.0), ("hard", "hard", 0.25), (None, "unknown", 0.5)]
    judge = stats["stages"][2]
    assert judge["keys"] == 4 and judge["computed"] == 4  # asked once per problem, not per sample
    assert df["difficulty_judge"].unique().to_list() == [df["difficulty_judge"][0]] and df["difficulty_judge"][0].startswith("judge:")


def test_student_method(tmp_path: Path) -> None:
    # the student's reply per problem: right, wrong, no answer; k=2 replayed samples each
    probs = read_jsonl(MATH500, limit=3)
    student = [f"<think>short</think> So the answer is $\\boxed{{{probs[0]['answer']}}}$.", "<think>x</think> $\\boxed{" + WRONG + "}$", "<think>never finished"]
    rows = math_rows(["GGWW", "GGGG", "GGGW"], extra={"student_reply": student})
    engines = {"student": {"kind": "replay", "column": "student_reply", "name": "student"}}
    stages = [*GEN_VERIFY, {"student_rollouts": {"engine": "student", "k": 2}}, {"difficulty": {"method": "student"}}]
    df, stats = run(make(tmp_path, rows, stages, engines, name="student"))
    got = per_problem(df, ["student_correct", "student_judged", "student_verdicts", "student_pass_rate", "difficulty", "pass_rate"])
    ids = [p["unique_id"] for p in probs]
    assert got[ids[0]] == (2, 2, ["correct", "correct"], 1.0, "easy", 0.5)       # the teacher's pass rate stays
    assert got[ids[1]] == (0, 2, ["incorrect", "incorrect"], 0.0, "unsolved", 1.0)  # teachable? not by imitation alone
    assert got[ids[2]] == (0, 2, ["incorrect", "incorrect"], 0.0, "unsolved", 0.75)
    st = stats["stages"][2]
    assert st["keys"] == 3 and st["computed"] == 3
    assert stats["stages"][2]["extra"]["student_pass_rate"] == pytest.approx(1 / 3)
