"""Output shards follow the curriculum order that ``select`` assigns (easy -> hard)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.fixtures.recipes import GSM8K_TRAIN, write_recipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

BAND = "CASE WHEN length(problem) < 180 THEN 'easy' WHEN length(problem) < 260 THEN 'medium' ELSE 'hard' END"


def _run(tmp_path: Path, options: dict) -> pl.DataFrame:
    recipe = write_recipe(tmp_path / "c.yaml", {
        "name": "curriculum",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k", "limit": 300}],
        "stages": [
            {"map": {"set": {"response": "solution", "difficulty": BAND}}},
            {"select": {"prefer": "first", "curriculum": {"by": "difficulty", "order": ["easy", "medium", "hard"]}}},
        ],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out"), "options": {"keep_columns": ["difficulty"], **options}}],
    })
    Runner(load_recipe(recipe)).run()
    return pl.read_parquet(tmp_path / "out" / "data" / "*.parquet")


def test_shards_are_in_curriculum_order(tmp_path: Path) -> None:
    out = _run(tmp_path, {})
    bands = out["difficulty"].to_list()
    assert set(bands) == {"easy", "medium", "hard"}
    rank = {"easy": 0, "medium": 1, "hard": 2}
    assert [rank[b] for b in bands] == sorted(rank[b] for b in bands)
    # the sort is stable: inside a band, rows keep the source order
    easy_ids = out.filter(pl.col("difficulty") == "easy")["id"].to_list()
    src = pl.read_ndjson(GSM8K_TRAIN).head(300)
    assert len(easy_ids) == int((src["question"].str.len_chars() < 180).sum())


def test_curriculum_order_can_be_turned_off(tmp_path: Path) -> None:
    out = _run(tmp_path, {"curriculum_order": False})
    bands = out["difficulty"].to_list()
    rank = {"easy": 0, "medium": 1, "hard": 2}
    assert [rank[b] for b in bands] != sorted(rank[b] for b in bands)
