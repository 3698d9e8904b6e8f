"""``filter``: keep rows for which a SQL boolean expression holds.

Input columns: whatever the expression names. Output columns: none.
Dropped rows are kept in the rejects with reason ``filter: <expression>`` (or ``reason:``).

Example: ``- filter: {where: "verdict = 'correct' AND completion_tokens < 8000"}``
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl
from pydantic import Field, field_validator

from tracepipe.contract import DROP_COL
from tracepipe.stages import register
from tracepipe.stages._sql import expr_columns, parse_sql_expr
from tracepipe.stages.base import ExecField, FilterStage, StageParams


class FilterParams(StageParams):
    where: str = Field(..., description="SQL boolean expression over columns (polars sql_expr); rows where it is true are kept")
    reason: str | None = Field(None, description="reason recorded for dropped rows (default: the expression)")
    batch_size: int = ExecField(8192, description="rows per batch")
    store: bool = ExecField(False, description="keep results per row in the store (default: recomputed over each part, which costs less than storing a SQL expression)")

    @field_validator("where")
    @classmethod
    def _parses(cls, v: str) -> str:
        parse_sql_expr(v)
        return v


@register("filter")
class Filter(FilterStage):
    version: ClassVar[str] = "1"
    Params = FilterParams

    def stores_rows(self) -> bool:
        return self.params.store

    def input_columns(self) -> list[str]:
        return expr_columns(self.params.where)

    def reasons(self, batch: pl.DataFrame) -> pl.Series:
        keep = batch.select(parse_sql_expr(self.params.where).fill_null(False).alias("k")).get_column("k")
        reason = self.params.reason or f"filter: {self.params.where}"
        return pl.Series(DROP_COL, [None if k else reason for k in keep.to_list()], dtype=pl.String)
