"""Shard writer: splits, size-bounded zstd Parquet shards in deterministic order, atomic swap.

Files: ``<path>/data/<split>-00000-of-000NN.parquet`` plus the recipe and the run stats. The
rows are first streamed to one temporary file, then cut into shards of about
``shard_size_mb`` each, so memory stays bounded by one row group.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import xxhash

from tracepipe.outputs import get_format


def split_expr(test_fraction: float) -> pl.Expr:
    """``train`` / ``test`` by a stable hash of the problem id (all samples of a problem together)."""
    if test_fraction <= 0:
        return pl.lit("train")
    cut = int(test_fraction * 2**32)
    bucket = pl.col("id").cast(pl.String).map_elements(
        lambda s: xxhash.xxh32_intdigest(s.encode()), return_dtype=pl.UInt32
    )
    return pl.when(bucket < cut).then(pl.lit("test")).otherwise(pl.lit("train"))


def write_shards(src: Path, out_dir: Path, split: str, shard_bytes: int, row_group_rows: int) -> list[dict[str, Any]]:
    pf = pq.ParquetFile(src)
    rows = pf.metadata.num_rows
    size = src.stat().st_size
    n_shards = max(1, math.ceil(size / max(1, shard_bytes))) if rows else 1
    per_shard = max(1, math.ceil(rows / n_shards)) if rows else 0
    files: list[dict[str, Any]] = []
    schema = pf.schema_arrow
    writer = None
    shard = -1
    in_shard = 0

    def open_next() -> pq.ParquetWriter:
        nonlocal shard, in_shard
        shard += 1
        in_shard = 0
        name = f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"
        files.append({"split": split, "file": f"data/{name}", "rows": 0})
        return pq.ParquetWriter(out_dir / name, schema, compression="zstd")

    if rows == 0:
        writer = open_next()
        writer.close()
        return files
    for batch in pf.iter_batches(batch_size=row_group_rows):
        start = 0
        while start < batch.num_rows:
            if writer is None or in_shard >= per_shard:
                if writer is not None:
                    writer.close()
                writer = open_next()
            take = min(per_shard - in_shard, batch.num_rows - start)
            writer.write_batch(batch.slice(start, take), row_group_size=row_group_rows)
            in_shard += take
            files[-1]["rows"] += take
            start += take
    assert writer is not None
    writer.close()
    return files


def write_output(final: pl.LazyFrame, spec: Any, recipe: Any, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one ``outputs[i]`` entry; returns what was written (files, rows per split)."""
    fmt = get_format(spec.format)
    rows = fmt(final, dict(spec.options))
    schema = final.collect_schema()
    if spec.test_fraction > 0 and "id" in schema:
        rows = rows.with_columns(split_expr(spec.test_fraction).alias("__split")) if "id" in rows.collect_schema() else rows
    out = Path(recipe.base_dir / spec.path) if "://" not in spec.path else Path(spec.path)
    out = out if out.is_absolute() else out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "data").mkdir(parents=True)
    files: list[dict[str, Any]] = []
    try:
        splits = ["train", "test"] if "__split" in rows.collect_schema() else ["train"]
        for split in splits:
            part = rows.filter(pl.col("__split") == split).drop("__split") if len(splits) > 1 else rows
            staged = tmp / f"all-{split}.parquet"
            part.sink_parquet(staged, compression="zstd", maintain_order=True)
            files += write_shards(staged, tmp / "data", split, int(spec.shard_size_mb * 2**20), spec.row_group_rows)
            staged.unlink()
        if recipe.path is not None:
            shutil.copyfile(recipe.path, tmp / "recipe.yaml")
        if stats is not None:
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2, default=str))
        info = {"format": spec.format, "path": str(out), "files": files,
                "rows": {s: sum(f["rows"] for f in files if f["split"] == s) for s in {f["split"] for f in files}}}
        (tmp / "output.json").write_text(json.dumps(info, indent=2))
        # swap in: old data out, new data in (readers see either the old or the new set)
        old = out / f".old-{uuid.uuid4().hex[:8]}"
        old.mkdir()
        for name in ("data", "recipe.yaml", "stats.json", "output.json"):
            if (out / name).exists():
                (out / name).rename(old / name)
            if (tmp / name).exists():
                (tmp / name).rename(out / name)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
