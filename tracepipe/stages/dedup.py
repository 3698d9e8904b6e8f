"""``dedup``: remove duplicate problems (a set stage).

Input columns: ``field`` (default ``problem``). Output columns: none; dropped rows carry
``_dup_of`` (the ``_key`` of the row kept in their place) and reason ``dedup:<method>``.

Methods:
- ``exact``: normalized text (lower-case, whitespace folded, optionally punctuation removed) is
  equal; the first row in the stable order is kept.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import polars as pl
from pydantic import Field

from tracepipe.pipeline.keys import KEY_COL, ORDER_COL
from tracepipe.stages import register
from tracepipe.stages.base import DROP_COL, SetStage, StageParams

DUP_OF = "_dup_of"


class DedupParams(StageParams):
    method: Literal["exact"] = Field("exact", description="exact")
    field: str = Field("problem", description="column compared")
    ignore_punctuation: bool = Field(False, description="exact: also drop punctuation before comparing")


def normalized(col: str, ignore_punctuation: bool = False) -> pl.Expr:
    e = pl.col(col).cast(pl.String).fill_null("").str.to_lowercase()
    if ignore_punctuation:
        e = e.str.replace_all(r"[^\w\s]", "")
    return e.str.replace_all(r"\s+", " ").str.strip_chars()


@register("dedup")
class Dedup(SetStage):
    version: ClassVar[str] = "1"
    Params = DedupParams

    def input_columns(self) -> list[str]:
        return [self.params.field]

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        return self._exact(df)

    def _exact(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        norm = df.select(KEY_COL, ORDER_COL, normalized(p.field, p.ignore_punctuation).alias("_norm")).sort(ORDER_COL)
        first = norm.group_by("_norm", maintain_order=True).agg(pl.col(KEY_COL).first().alias(DUP_OF))
        out = norm.join(first, on="_norm", how="left", maintain_order="left")
        return out.select(
            KEY_COL,
            pl.when(pl.col(DUP_OF) == pl.col(KEY_COL)).then(pl.lit(None, dtype=pl.String)).otherwise(pl.lit(f"dedup:{p.method}")).alias(DROP_COL),
            pl.when(pl.col(DUP_OF) == pl.col(KEY_COL)).then(pl.lit(None, dtype=pl.String)).otherwise(pl.col(DUP_OF)).alias(DUP_OF),
        )
