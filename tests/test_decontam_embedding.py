"""decontaminate with embedding similarity (after n-gram), reading `embed`'s vectors or embedding itself."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tests.fixtures.dedup_data import run_recipe
from tracepipe.benchmarks_data import load_benchmarks
from tracepipe.text.perturb import plant_benchmark_items

pytestmark = pytest.mark.slow
BENCH = "[aime24, amc23]"


@pytest.fixture(scope="module")
def planted(train_texts: list[str]) -> pl.DataFrame:
    bench = load_benchmarks(["aime24", "amc23"])
    df = plant_benchmark_items(train_texts[:120], bench, 20, kinds=("verbatim", "reword"), seed=2)
    return df.with_row_index("rid").with_columns(pl.col("rid").cast(pl.String))


def _found(planted: pl.DataFrame, rej: pl.DataFrame) -> pl.DataFrame:
    r = rej.filter(pl.col("_stage") == "decontaminate") if rej.height else pl.DataFrame(
        schema={"id": pl.String, "contam_id": pl.String, "contam_method": pl.String, "contam_score": pl.Float64, "contam_benchmark": pl.String})
    return planted.join(r.select(pl.col("id").alias("rid"), "contam_id", "contam_method", "contam_score", "contam_benchmark"), on="rid", how="left")


def test_embedding_catches_rewordings_ngrams_miss(tmp_path: Path, planted: pl.DataFrame, embed_workdir: Path) -> None:
    _, rej0 = run_recipe(tmp_path, planted, f"  - decontaminate: {{benchmarks: {BENCH}}}\n", workdir=tmp_path / "ng")
    ngram = _found(planted, rej0)
    res, rej = run_recipe(tmp_path, planted, f"  - embed: {{}}\n  - decontaminate: {{benchmarks: {BENCH}, embedding_threshold: 0.85}}\n",
                          workdir=embed_workdir)
    both = _found(planted, rej)
    rec = {k: both.filter(pl.col("kind") == k)["contam_id"].is_not_null().mean() for k in ("verbatim", "reword")}
    rec0 = ngram.filter(pl.col("kind") == "reword")["contam_id"].is_not_null().mean()
    fp = both.filter(pl.col("kind") == "clean")["contam_id"].is_not_null().mean()
    emb = both.filter(pl.col("contam_method") == "embedding")
    print(f"reword recall: n-gram {rec0:.2f}, n-gram + embedding {rec['reword']:.2f}; clean FP {fp:.4f}; embedding-only hits {emb.height}")
    assert rec["verbatim"] == 1.0 and rec["reword"] >= rec0 and rec["reword"] >= 0.95
    assert fp <= 0.005
    assert emb.height >= 1 and (emb["contam_score"] >= 0.85).all()
    hits = both.filter(pl.col("contam_id").is_not_null() & (pl.col("kind") != "clean"))
    assert (hits["contam_id"] == hits["plant_id"]).all()
    assert set(rej.filter(pl.col("_stage") == "decontaminate")["_reason"].to_list()) <= {"decontaminate:ngram", "decontaminate:embedding"}

    # without an embed stage the stage embeds the rows itself with the same model: same decisions
    _, rej2 = run_recipe(tmp_path, planted, f"  - decontaminate: {{benchmarks: {BENCH}, embedding_threshold: 0.85}}\n",
                         workdir=tmp_path / "self")
    self_emb = _found(planted, rej2)
    assert self_emb["contam_id"].to_list() == both["contam_id"].to_list()
    assert (tmp_path / "self" / "cache").exists()  # benchmark vectors cached on disk
