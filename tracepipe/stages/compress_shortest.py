"""``compress`` with ``method: shortest-correct``: a set stage, registered as a variant of ``compress``.

Recipes write ``compress: {method: shortest-correct, ...}`` with ``compress``'s parameters
(:class:`~tracepipe.stages.compress.CompressParams`); the registry builds :class:`ShortestCorrect`
for them (``register("compress", when={"method": "shortest-correct"})``). Keeping the shortest
correct sample of each problem needs all of the problem's samples at once, which only a set stage
sees. See :mod:`tracepipe.stages.compress` for the contract.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl

from tracepipe.contract import DROP_COL, KEY_COL, ORDER_COL
from tracepipe.stages import register
from tracepipe.stages._compress_stats import compression_stats
from tracepipe.stages.base import SetStage
from tracepipe.stages.compress import CompressParams

DROP_REASON = "compress: longer than the shortest correct sample"


@register("compress", when={"method": "shortest-correct"})
class ShortestCorrect(SetStage):
    """Keep the shortest correct sample of each problem (``compress`` with ``method: shortest-correct``)."""

    version: ClassVar[str] = "1"
    Params = CompressParams
    adds: ClassVar[tuple[str, ...]] = (
        "reasoning_compressed", "compress_status", "compress_band", "reasoning_tokens",
        "reasoning_compressed_tokens", "compress_group_tokens", "compress_ratio",
    )
    params: CompressParams

    def input_columns(self) -> list[str]:
        p = self.params
        return [p.group_by, "verdict", p.length_column, "reasoning", "difficulty"]

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        for c in (p.group_by, "verdict", "reasoning"):
            if c not in df.columns:
                raise ValueError(f"compress (shortest-correct): column {c!r} is missing; have: {', '.join(df.columns)}")
        length = (
            pl.coalesce(pl.col(p.length_column).cast(pl.Float64), pl.col("reasoning").str.len_chars().cast(pl.Float64))
            if p.length_column in df.columns
            else pl.col("reasoning").str.len_chars().cast(pl.Float64)
        )
        band = pl.col("difficulty").cast(pl.String) if "difficulty" in df.columns else pl.lit("default")
        d = df.with_columns(
            pl.coalesce(pl.col(p.group_by).cast(pl.String), pl.col(KEY_COL)).alias("_g"),
            length.alias("_len"),
            band.fill_null("default").alias("compress_band"),
            (pl.col("verdict") == "correct").fill_null(False).alias("_ok"),
        )
        ok = d.filter(pl.col("_ok") & pl.col("reasoning").is_not_null())
        best = (
            ok.sort(["_len", ORDER_COL], nulls_last=True)
            .group_by("_g", maintain_order=True)
            .agg(pl.col(KEY_COL).first().alias("_best"), pl.col("_len").mean().alias("compress_group_tokens"))
        )
        d = d.join(best, on="_g", how="left", maintain_order="left")
        is_best = pl.col(KEY_COL) == pl.col("_best")
        tried = pl.col("_ok") & pl.col("reasoning").is_not_null()
        status = (
            pl.when(~pl.col("_ok")).then(pl.concat_str([pl.lit("skipped:"), pl.col("verdict").cast(pl.String).fill_null("no-verdict")]))
            .when(pl.col("reasoning").is_null()).then(pl.lit("skipped:no-reasoning"))
            .when(is_best).then(pl.lit("accepted"))
            .otherwise(pl.lit("rejected:not-shortest"))
        )
        return d.select(
            KEY_COL,
            pl.when(tried & ~is_best).then(pl.lit(DROP_REASON)).otherwise(pl.lit(None, dtype=pl.String)).alias(DROP_COL),
            pl.when(tried & is_best).then(pl.col("reasoning")).otherwise(pl.lit(None, dtype=pl.String)).alias("reasoning_compressed"),
            status.alias("compress_status"),
            "compress_band",
            pl.col("_len").round(0).cast(pl.Int64).alias("reasoning_tokens"),
            pl.when(tried & is_best).then(pl.col("_len").round(0).cast(pl.Int64)).otherwise(None).alias("reasoning_compressed_tokens"),
            pl.when(tried).then(pl.col("compress_group_tokens")).otherwise(None).alias("compress_group_tokens"),
            pl.when(tried & is_best).then(pl.col("_len") / pl.col("compress_group_tokens")).otherwise(None).alias("compress_ratio"),
        )

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        # kept rows only: "before" is the mean length of each problem's correct samples
        stats = compression_stats(out, "compress_group_tokens")
        if stats:
            stats["method"] = "shortest-correct"
            stats["token_unit"] = self.params.length_column
        return stats
