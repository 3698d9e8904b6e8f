"""``map``: add or rewrite columns with SQL expressions.

Input columns: whatever the expressions name. Output columns: the keys of ``set``.

Example: ``- map: {set: {answer_len: "length(answer)"}}``
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl
from pydantic import Field, field_validator

from tracepipe.contract import IN_KEY_COL
from tracepipe.stages import register
from tracepipe.stages._sql import expr_columns, parse_sql_expr
from tracepipe.stages.base import ExecField, RowStage, StageParams


class MapParams(StageParams):
    set: dict[str, str] = Field(..., description="column name -> SQL expression (polars sql_expr)")
    batch_size: int = ExecField(8192, description="rows per batch")
    store: bool = ExecField(False, description="keep results per row in the store (default: recomputed over each part, which costs less than storing a SQL expression)")

    @field_validator("set")
    @classmethod
    def _parses(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("`set` needs at least one column")
        for sql in v.values():
            parse_sql_expr(sql)
        return v


@register("map")
class Map(RowStage):
    version: ClassVar[str] = "1"
    Params = MapParams

    def stores_rows(self) -> bool:
        return self.params.store

    def input_columns(self) -> list[str]:
        cols: set[str] = set()
        for sql in self.params.set.values():
            cols.update(expr_columns(sql))
        return sorted(cols)

    def output_columns(self) -> list[str]:
        return list(self.params.set)

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        exprs = [parse_sql_expr(sql).alias(name) for name, sql in self.params.set.items()]
        return batch.select(pl.col(IN_KEY_COL), *exprs)
