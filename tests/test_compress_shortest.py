"""``compress`` with ``method: shortest-correct``: a set-stage path of the registered stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from tests.fixtures.recipes import MATH500, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.stages import get_stage
from tracepipe.stages.base import SetStage, StageContext


def test_shortest_correct_keeps_one_per_problem(tmp_path: Path) -> None:
    probs = read_jsonl(MATH500, limit=3)
    rows: list[dict[str, Any]] = []
    # samples: (verdict, reasoning length in characters)
    plan = {0: [("correct", 900), ("correct", 300), ("incorrect", 100), ("correct", 600)],
            1: [("incorrect", 50), ("incorrect", 70)],
            2: [("correct", 400)]}
    for i, samples in plan.items():
        p = probs[i]
        for s, (verdict, n) in enumerate(samples):
            rows.append({"pid": p["unique_id"], "problem": p["problem"], "verdict": verdict, "sample": s,
                         "reasoning": (p["solution"] * 10)[:n], "response": "ok"})
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    path = write_recipe(tmp_path / "s.yaml", {
        "name": "s", "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "columns": {"id": "pid"}}],
        "stages": [{"compress": {"method": "shortest-correct"}}], "outputs": [],
    })
    recipe = load_recipe(path)
    assert isinstance(get_stage("compress")(recipe.stage_specs[0].params, StageContext()), SetStage)
    res = Runner(recipe).run()
    df = res.final_frame().collect()
    got = sorted((r["id"], r["sample"], r["compress_status"]) for r in df.iter_rows(named=True))
    ids = [p["unique_id"] for p in probs]
    assert got == sorted([
        (ids[0], 1, "accepted"), (ids[0], 2, "skipped:incorrect"),
        (ids[1], 0, "skipped:incorrect"), (ids[1], 1, "skipped:incorrect"),
        (ids[2], 0, "accepted"),
    ])
    best = df.filter((pl.col("id") == ids[0]) & (pl.col("sample") == 1)).row(0, named=True)
    assert best["reasoning_compressed"] == best["reasoning"] and best["reasoning_compressed_tokens"] == 300
    assert best["compress_group_tokens"] == (900 + 300 + 600) / 3
    rej = pl.read_parquet(tmp_path / "work" / "rejects" / "*.parquet")
    assert sorted(rej["sample"].to_list()) == [0, 3] and set(rej["_reason"]) == {"compress: longer than the shortest correct sample"}
    ex = res.stats.stages[0].extra
    assert ex["method"] == "shortest-correct" and ex["accepted"] == 2 and ex["attempted"] == 2
    assert ex["mean_tokens_before"] == ((900 + 300 + 600) / 3 + 400) / 2
    assert ex["mean_tokens_after"] == (300 + 400) / 2
