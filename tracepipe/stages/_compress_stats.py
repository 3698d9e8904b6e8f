"""Compression stats of the ``compress`` stage, shared by its methods (``rewrite``,
``shortest-correct``): what ``summarize()`` puts into the run stats and the dataset card shows."""

from __future__ import annotations

from typing import Any

import polars as pl


def compression_stats(out: pl.LazyFrame, before_col: str) -> dict[str, Any]:
    """Mean tokens before / after, acceptance rate and rejection reasons, overall and per band.

    Rows counted are those the stage tried to compress (status ``accepted`` or ``rejected:*``);
    "after" is what the dataset now trains on (the compressed trace where accepted, else the
    original), and ``mean_tokens_after_accepted`` the accepted rewrites alone.
    """
    schema = out.collect_schema()
    need = ("compress_status", before_col, "reasoning_compressed_tokens")
    if any(c not in schema for c in need):
        return {}
    band = pl.col("compress_band") if "compress_band" in schema else pl.lit("default")
    df = out.select(
        pl.col("compress_status").cast(pl.String).alias("status"),
        band.cast(pl.String).fill_null("default").alias("band"),
        pl.col(before_col).cast(pl.Float64).alias("before"),
        pl.col("reasoning_compressed_tokens").cast(pl.Float64).alias("comp"),
    ).collect()
    total = df.height
    skipped = {str(k): int(n) for k, n in df.filter(pl.col("status").str.starts_with("skipped")).group_by("status").len().sort("status").iter_rows()}
    tried = df.filter(pl.col("status").str.starts_with("accepted") | pl.col("status").str.starts_with("rejected"))

    def block(d: pl.DataFrame) -> dict[str, Any]:
        acc = d.filter(pl.col("status").str.starts_with("accepted"))
        after = d.select(pl.when(pl.col("status").str.starts_with("accepted")).then(pl.col("comp")).otherwise(pl.col("before")).alias("a"))["a"]
        before = d["before"]
        mb = float(before.mean()) if before.drop_nulls().len() else None  # type: ignore[arg-type]
        ma = float(after.mean()) if after.drop_nulls().len() else None  # type: ignore[arg-type]
        res: dict[str, Any] = {
            "rows": d.height,
            "accepted": acc.height,
            "acceptance_rate": acc.height / d.height if d.height else None,
            "mean_tokens_before": mb,
            "mean_tokens_after": ma,
            "ratio": (ma / mb) if mb and ma is not None else None,
        }
        if acc.height:
            res["mean_tokens_before_accepted"] = float(acc["before"].mean())  # type: ignore[arg-type]
            res["mean_tokens_after_accepted"] = float(acc["comp"].mean())  # type: ignore[arg-type]
        rej = {str(k): int(n) for k, n in d.filter(pl.col("status").str.starts_with("rejected")).group_by("status").len().sort("status").iter_rows()}
        if rej:
            res["rejected"] = rej
        return res

    stats: dict[str, Any] = {"rows": total, "attempted": tried.height}
    if skipped:
        stats["skipped"] = skipped
    overall = block(tried) if tried.height else {"accepted": 0, "acceptance_rate": None}
    overall.pop("rows", None)
    stats.update(overall)
    stats["by_band"] = {str(b): block(tried.filter(pl.col("band") == b)) for b in sorted(tried["band"].unique().to_list())}
    return stats
