"""``select`` through real recipe runs: filters, k per problem, exact mixture quotas, shortfall,
random baseline, curriculum.

Problems are real (GSM8K train for math, HumanEval for code); each has four samples whose
verdicts the test sets (so the ``difficulty`` stage bands them: GGGG easy, GGWW medium, GWWW
hard) and whose lengths are known, so every selection below can be checked by hand.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tracepipe import DATA_DIR
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages._mixture import allocate, quota_counts
from tracepipe.stages.select import QuotaShortfall

HUMANEVAL = DATA_DIR / "benchmarks" / "humaneval.jsonl"
PATTERNS = {"easy": "GGGG", "medium": "GGWW", "hard": "GWWW"}
N_MATH, N_CODE = 30, 12  # 10 / 4 problems per band


def problem_rows(domain: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    src = read_jsonl(GSM8K_TRAIN, limit=n) if domain == "math" else read_jsonl(HUMANEVAL, limit=n)
    rows = []
    for i, p in enumerate(src):
        band = list(PATTERNS)[i % 3]
        pid = f"{domain}-{i}"
        for s, ch in enumerate(PATTERNS[band]):
            rows.append({
                "pid": pid, "problem": p["question"] if domain == "math" else p["prompt"], "band_truth": band,
                "sample": s, "verdict": "correct" if ch == "G" else "incorrect", "response": f"sample {s}",
                # lengths: distinct per problem and sample, the shortest correct sample varies by problem
                "completion_tokens": 100 + 10 * ((s + i) % 4) + i,
            })
    return rows


def make(tmp_path: Path, select: dict[str, Any] | None, name: str = "s", reverse: bool = False,
         outputs: list[dict[str, Any]] | None = None, workdir: str | None = None) -> Path:
    files = []
    for domain, n in (("math", N_MATH), ("code", N_CODE)):
        rows = problem_rows(domain, n)
        if reverse:  # same problems, other order (each problem's samples keep their order)
            blocks = [rows[i:i + 4] for i in range(0, len(rows), 4)][::-1]
            rows = [r for b in blocks for r in b]
        files.append(write_jsonl(tmp_path / f"{name}-{domain}.jsonl", rows))
    stages: list[dict[str, Any]] = [{"difficulty": {"bands": {"easy": 0.75, "hard": 0.25}}}]
    if select is not None:
        stages.append({"select": select})
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name, "workdir": str(tmp_path / (workdir or f"work-{name}")),
        "source": [{"path": str(files[0]), "columns": {"id": "pid"}, "domain": "math", "name": "math"},
                   {"path": str(files[1]), "columns": {"id": "pid"}, "domain": "code", "name": "code"}],
        "stages": stages, "outputs": outputs or [],
    })


def run(path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    res = Runner(load_recipe(path)).run()
    return res.final_frame().collect(), res.stats.to_dict()


def counts(df: pl.DataFrame, col: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in df.group_by(col).len().iter_rows()}


def shortest_correct(rows: list[dict[str, Any]]) -> dict[str, int]:
    best: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r["verdict"] == "correct":
            cur = best.get(r["pid"])
            if cur is None or r["completion_tokens"] < cur[0]:
                best[r["pid"]] = (r["completion_tokens"], r["sample"])
    return {k: v[1] for k, v in best.items()}


MIX = {"domain": {"math": 0.6, "code": 0.4}, "difficulty": {"easy": 0.3, "medium": 0.4, "hard": 0.3}}


# -- pure parts ------------------------------------------------------------------------------------
def test_quota_counts_and_allocation() -> None:
    assert quota_counts({"a": 0.6, "b": 0.4}, 20, "x") == {"a": 12, "b": 8}
    assert quota_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10, "x") == {"a": 4, "b": 3, "c": 3}  # largest remainder, adds up
    assert quota_counts({"a": 5, "b": 2}, None, "x") == {"a": 5, "b": 2}
    with pytest.raises(ValueError, match="sum to 1"):
        quota_counts({"a": 0.5, "b": 0.2}, 10, "x")
    with pytest.raises(ValueError, match="need `size`"):
        quota_counts({"a": 0.5, "b": 0.5}, None, "x")
    # two marginals, a lopsided supply: max-flow still meets both exactly
    per = {"d": {"m": 7, "c": 3}, "f": {"e": 2, "m": 5, "h": 3}}
    avail = {("m", "e"): 10, ("m", "m"): 10, ("m", "h"): 0, ("c", "e"): 0, ("c", "m"): 1, ("c", "h"): 10}
    take = allocate(per, avail)
    assert all(take[c] <= avail[c] for c in take)
    assert {lab: sum(n for c, n in take.items() if c[0] == lab) for lab in ("m", "c")} == {"m": 7, "c": 3}
    assert {lab: sum(n for c, n in take.items() if c[1] == lab) for lab in ("e", "m", "h")} == {"e": 2, "m": 5, "h": 3}


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\[1\]\.select"):
        load_recipe(make(tmp_path, {"quotas": {"domain": {"math": 0.7, "code": 0.2}}, "size": 10}))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.select"):
        load_recipe(make(tmp_path, {"prefer": "best"}))


# -- filters and k per problem ------------------------------------------------------------------------
def test_filters_and_per_problem(tmp_path: Path) -> None:
    df, stats = run(make(tmp_path, {"verdict": "correct", "difficulty": ["medium", "hard"], "per_problem": 1, "prefer": "shortest"}))
    rows = problem_rows("math", N_MATH) + problem_rows("code", N_CODE)
    want = shortest_correct([r for r in rows if r["band_truth"] in ("medium", "hard")])
    assert {r["id"]: r["sample"] for r in df.iter_rows(named=True)} == want
    assert set(df["verdict"]) == {"correct"} and set(df["difficulty"]) == {"medium", "hard"}
    assert set(df["difficulty"].to_list()) == {r["band_truth"] for r in rows if r["pid"] in want}
    dropped = stats["stages"][1]["dropped"]
    n_easy = 10 + 4
    assert dropped == {
        "select: verdict": sum(r["verdict"] != "correct" for r in rows),
        "select: difficulty": 4 * n_easy,
        "select: per_problem": sum(r["verdict"] == "correct" and r["band_truth"] != "easy" for r in rows) - len(want),
    }
    # longest, and a length window
    df2, _ = run(make(tmp_path, {"verdict": ["correct"], "per_problem": 2, "prefer": "longest", "max_tokens": 140}, name="l"))
    for pid, grp in df2.group_by("id"):
        cand = sorted((r for r in rows if r["pid"] == pid[0] and r["verdict"] == "correct" and r["completion_tokens"] <= 140),
                      key=lambda r: -r["completion_tokens"])[:2]
        assert sorted(grp["sample"].to_list()) == sorted(r["sample"] for r in cand)


# -- mixtures ------------------------------------------------------------------------------------------
def test_mixture_quotas_exact(tmp_path: Path) -> None:
    df, stats = run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "prefer": "shortest", "size": 20, "quotas": MIX}))
    assert df.height == 20
    assert counts(df, "domain") == {"math": 12, "code": 8}
    assert counts(df, "difficulty") == {"easy": 6, "medium": 8, "hard": 6}
    assert df["id"].n_unique() == 20 and set(df["verdict"]) == {"correct"}
    best = shortest_correct(problem_rows("math", N_MATH) + problem_rows("code", N_CODE))
    assert all(best[r["id"]] == r["sample"] for r in df.iter_rows(named=True))  # inside a cell: prefer shortest
    ex = stats["stages"][1]["extra"]
    assert ex["mixture_target"] == 20 and "mixture_shortfall" not in ex
    assert ex["mixture"]["domain"]["code"] == {"target": 8, "selected": 8}


def test_mixture_shortfall_warns_and_degrades(tmp_path: Path) -> None:
    quotas = {"domain": {"math": 0.5, "code": 0.5}}
    with pytest.warns(QuotaShortfall, match=r"short by 3 rows of 30.*domain=code: 12 of 15 \(12 eligible\)"):
        df, stats = run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "size": 30, "quotas": quotas}))
    assert counts(df, "domain") == {"math": 15, "code": 12}  # every quota kept as a ceiling
    ex = stats["stages"][1]["extra"]
    assert ex["mixture_shortfall"] == {"domain=code": 3} and ex["selected"] == 27
    with pytest.warns(QuotaShortfall, match="filled 3 rows outside the quotas"):
        df, _ = run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "size": 30, "quotas": quotas, "shortfall": "fill"}, name="f"))
    assert counts(df, "domain") == {"math": 18, "code": 12}
    with pytest.raises(ValueError, match="domain=code: 12 of 15"), warnings.catch_warnings():
        warnings.simplefilter("error")
        run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "size": 30, "quotas": quotas, "shortfall": "error"}, name="e"))


# -- random baseline -------------------------------------------------------------------------------------
def test_random_baseline_same_size_and_reproducible(tmp_path: Path) -> None:
    curated = {"verdict": "correct", "difficulty": ["medium", "hard"], "per_problem": 1, "size": 15,
               "quotas": {"domain": {"math": 0.6, "code": 0.4}}}
    cur, _ = run(make(tmp_path, curated, name="cur"))
    assert cur.height == 15

    def baseline(seed: int, name: str, reverse: bool = False) -> pl.DataFrame:
        df, stats = run(make(tmp_path, {**curated, "baseline": "random", "seed": seed}, name=name, reverse=reverse))
        assert stats["stages"][1]["extra"]["baseline"] == "random"
        return df

    a, b = baseline(1, "a"), baseline(1, "b", reverse=True)  # same seed, other workdir and input order
    c = baseline(2, "c")
    sel = [sorted(zip(x["id"], x["sample"])) for x in (a, b, c)]
    assert len(sel[0]) == 15 and sel[0] == sel[1] and sel[0] != sel[2]
    for x in (a, c):  # pool: correct rows, at most one per problem, any band and any domain share
        assert set(x["verdict"]) == {"correct"} and x["id"].n_unique() == 15
    assert any(set(x["difficulty"]) - {"medium", "hard"} for x in (a, c))  # the band filter is what it ablates


# -- curriculum -----------------------------------------------------------------------------------------
def test_curriculum_columns_and_stage_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outputs = [
        {"format": "sft-messages", "path": str(out / "stage1"), "options": {"where": "curriculum_stage = 'stage1'", "keep_columns": ["curriculum_rank"]}},
        {"format": "sft-messages", "path": str(out / "stage2"), "options": {"where": "curriculum_stage = 'stage2'", "keep_columns": ["curriculum_rank"]}},
    ]
    sel = {"verdict": "correct", "per_problem": 1, "curriculum": {"by": "difficulty", "stages": {"stage1": ["easy", "medium"], "stage2": ["hard"]}}}
    df, stats = run(make(tmp_path, sel, outputs=outputs))
    for r in df.iter_rows(named=True):
        assert (r["curriculum_stage"], r["curriculum_rank"]) == (("stage2", 1) if r["difficulty"] == "hard" else ("stage1", 0))
    assert stats["stages"][1]["extra"]["curriculum"] == {"stage1": 28, "stage2": 14}
    s1 = pl.read_parquet(out / "stage1" / "data" / "*.parquet")
    s2 = pl.read_parquet(out / "stage2" / "data" / "*.parquet")
    assert (s1.height, s2.height) == (28, 14) and set(s1["difficulty"]) == {"easy", "medium"} and set(s2["difficulty"]) == {"hard"}
    # easy -> hard order by default: a stable sort on curriculum_rank gives the training order
    df2, _ = run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "curriculum": {}}, name="o"))
    ordered = df2.sort("curriculum_rank", maintain_order=True)["difficulty"].to_list()
    assert ordered == ["easy"] * 14 + ["medium"] * 14 + ["hard"] * 14


# -- preference pairs -----------------------------------------------------------------------------------
def test_selection_feeds_dpo_pairs(tmp_path: Path) -> None:
    # select keeps one correct sample per problem; the incorrect ones it drops stay in the rejects,
    # where dpo-pairs finds its rejected side: one pair per problem that has both
    out = tmp_path / "dpo"
    outputs = [{"format": "dpo-pairs", "path": str(out), "options": {"chosen": "shortest", "rejected": "longest", "conversational": False}}]
    df, _ = run(make(tmp_path, {"verdict": "correct", "per_problem": 1, "prefer": "shortest"}, outputs=outputs))
    pairs = pl.read_parquet(out / "data" / "*.parquet")
    rows = problem_rows("math", N_MATH) + problem_rows("code", N_CODE)
    want_ids = {r["pid"] for r in rows if r["verdict"] == "incorrect"}
    assert set(pairs["id"]) == want_ids and pairs.height == len(want_ids) == 20 + 8  # medium + hard problems
    chosen = {r["id"]: r["sample"] for r in df.iter_rows(named=True)}
    for r in pairs.iter_rows(named=True):
        assert r["chosen_sample"] == chosen[r["id"]] and r["chosen"] == f"sample {chosen[r['id']]}"
        wrong = [x for x in rows if x["pid"] == r["id"] and x["verdict"] == "incorrect"]
        assert r["rejected_sample"] == max(wrong, key=lambda x: x["completion_tokens"])["sample"]
        assert r["difficulty"] in ("medium", "hard")
