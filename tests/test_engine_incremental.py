"""Incremental runs on real data: reruns compute nothing, new rows compute only themselves,
a changed stage recomputes itself and what depends on it."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe


def _run(path: Path) -> dict:
    return Runner(load_recipe(path)).run().stats.to_dict()


def _plan(path: Path) -> dict:
    return Runner(load_recipe(path)).plan().to_dict()


def _recipe(tmp_path: Path, src: Path, stages: list[dict]) -> Path:
    return write_recipe(tmp_path / "r.yaml", {
        "name": "inc",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "preset": "gsm8k"}],
        "stages": stages,
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out")}],
    })


STAGES = [
    {"map": {"store": True, "set": {"plen": "length(problem)"}}},
    {"dedup": {"method": "exact"}},
    {"filter": {"store": True, "where": "length(problem) < 400"}},
    {"map": {"store": True, "set": {"response": "solution", "alen": "length(answer)"}}},
]


def test_second_run_computes_nothing(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", read_jsonl(GSM8K_TRAIN, limit=1000))
    recipe = _recipe(tmp_path, src, STAGES)
    first = _run(recipe)
    assert [s["computed"] for s in first["stages"]][0] == 1000
    assert first["stages"][-1]["rows_out"] > 0
    plan = _plan(recipe)
    assert all(s["to_compute"] == 0 for s in plan["stages"]), plan["stages"]
    second = _run(recipe)
    assert all(s["computed"] == 0 for s in second["stages"]), second["stages"]
    assert [s["rows_out"] for s in second["stages"]] == [s["rows_out"] for s in first["stages"]]
    out1 = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet")
    assert out1.height == first["stages"][-1]["rows_out"]


def test_added_rows_are_the_only_ones_computed(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=1100)
    assert len({r["question"] for r in rows}) == 1100  # precondition: distinct problems
    src = write_jsonl(tmp_path / "src.jsonl", rows[:1000])
    recipe = _recipe(tmp_path, src, STAGES)
    _run(recipe)
    write_jsonl(src, rows)
    plan = _plan(recipe)
    assert plan["stages"][0]["to_compute"] == 100
    stats = _run(recipe)
    by_name = [(s["name"], s["kind"], s["computed"]) for s in stats["stages"]]
    assert by_name[0] == ("map", "row", 100)
    # the filter computes exactly the 100 new rows, the last map the new rows the filter kept
    new_plen = [len(r["question"]) for r in rows[1000:]]
    assert stats["stages"][2]["computed"] == 100
    assert stats["stages"][3]["computed"] == sum(1 for n in new_plen if n < 400)


def test_row_keys_are_content_addressed(tmp_path: Path) -> None:
    """A row stage's key hashes only the columns it reads: equal inputs are computed once."""
    rows = read_jsonl(GSM8K_TRAIN, limit=1100)
    src = write_jsonl(tmp_path / "src.jsonl", rows[:1000])
    stages = [{"map": {"store": True, "set": {"plen": "length(problem)"}}}, {"filter": {"store": True, "where": "plen < 400"}}]
    recipe = _recipe(tmp_path, src, stages)
    first = _run(recipe)
    old = {len(r["question"]) for r in rows[:1000]}
    assert first["stages"][1]["computed"] == len(old)
    write_jsonl(src, rows)
    stats = _run(recipe)
    assert stats["stages"][0]["computed"] == 100
    assert stats["stages"][1]["computed"] == len({len(r["question"]) for r in rows[1000:]} - old)


def test_changed_parameter_recomputes_that_stage_and_dependents(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", read_jsonl(GSM8K_TRAIN, limit=800))
    stages = [
        {"map": {"store": True, "set": {"plen": "length(problem)"}}},
        {"map": {"store": True, "set": {"bucket": "length(problem) / 100"}}},
        {"map": {"store": True, "set": {"tag": "CONCAT('b', CAST(bucket AS VARCHAR))"}}},
    ]
    recipe = _recipe(tmp_path, src, stages)
    _run(recipe)
    stages[1] = {"map": {"store": True, "set": {"bucket": "length(problem) / 50"}}}
    recipe = _recipe(tmp_path, src, stages)
    plan = _plan(recipe)
    assert plan["stages"][0]["to_compute"] == 0
    assert plan["stages"][1]["to_compute"] == 800
    stats = _run(recipe)
    assert [s["computed"] for s in stats["stages"][:2]] == [0, 800]
    # the third stage reads `bucket`, whose values changed: recomputed for every new value
    problems = pl.DataFrame({"problem": [r["question"] for r in read_jsonl(src)]})
    new_buckets = set(problems.select(pl.sql_expr("length(problem) / 50"))[:, 0].to_list())
    old_buckets = set(problems.select(pl.sql_expr("length(problem) / 100"))[:, 0].to_list())
    assert stats["stages"][2]["computed"] == len(new_buckets - old_buckets)
    assert stats["stages"][2]["computed"] > 0
    # changing it back reuses every cached result: content-addressed, nothing recomputed
    stages[1] = {"map": {"store": True, "set": {"bucket": "length(problem) / 100"}}}
    stats = _run(_recipe(tmp_path, src, stages))
    assert [s["computed"] for s in stats["stages"]] == [0, 0, 0]


def test_execution_only_params_keep_the_cache(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", read_jsonl(GSM8K_TRAIN, limit=300))
    _run(_recipe(tmp_path, src, [{"map": {"store": True, "set": {"plen": "length(problem)"}, "batch_size": 64}}]))
    stats = _run(_recipe(tmp_path, src, [{"map": {"store": True, "set": {"plen": "length(problem)"}, "batch_size": 7}}]))
    assert stats["stages"][0]["computed"] == 0
