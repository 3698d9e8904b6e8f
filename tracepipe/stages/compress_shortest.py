"""``compress`` with ``method: shortest-correct`` (a set stage), and the compression stats.

The registered ``compress`` stage (:mod:`tracepipe.stages.compress`) builds :class:`ShortestCorrect`
when the recipe asks for this method: keeping the shortest correct sample of each problem needs
all of the problem's samples at once, which only a set stage sees. See ``compress``'s docstring
for the contract.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl

from tracepipe.pipeline.keys import KEY_COL, ORDER_COL
from tracepipe.stages.base import DROP_COL, SetStage

DROP_REASON = "compress: longer than the shortest correct sample"


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


class ShortestCorrect(SetStage):
    """Keep the shortest correct sample of each problem (``compress`` with ``method: shortest-correct``)."""

    name: ClassVar[str] = "compress"
    version: ClassVar[str] = "1"
    adds: ClassVar[tuple[str, ...]] = (
        "reasoning_compressed", "compress_status", "compress_band", "reasoning_tokens",
        "reasoning_compressed_tokens", "compress_group_tokens", "compress_ratio",
    )

    def input_columns(self) -> list[str]:
        p = self.params
        return [p.group_by, "verdict", p.length_column, "reasoning", "difficulty"]  # type: ignore[attr-defined]

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        for c in (p.group_by, "verdict", "reasoning"):  # type: ignore[attr-defined]
            if c not in df.columns:
                raise ValueError(f"compress (shortest-correct): column {c!r} is missing; have: {', '.join(df.columns)}")
        length = (
            pl.coalesce(pl.col(p.length_column).cast(pl.Float64), pl.col("reasoning").str.len_chars().cast(pl.Float64))  # type: ignore[attr-defined]
            if p.length_column in df.columns  # type: ignore[attr-defined]
            else pl.col("reasoning").str.len_chars().cast(pl.Float64)
        )
        band = pl.col("difficulty").cast(pl.String) if "difficulty" in df.columns else pl.lit("default")
        d = df.with_columns(
            pl.coalesce(pl.col(p.group_by).cast(pl.String), pl.col(KEY_COL)).alias("_g"),  # type: ignore[attr-defined]
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
            stats["token_unit"] = self.params.length_column  # type: ignore[attr-defined]
        return stats
