"""Helpers for stages that take SQL expressions (``filter``, ``map``): parse and list columns."""

from __future__ import annotations

from functools import lru_cache

import polars as pl


@lru_cache(maxsize=256)
def parse_sql_expr(sql: str) -> pl.Expr:
    """Parse a SQL expression with polars; raise ValueError with polars' message if it is bad.

    Parsed once per text (validation, the row key's columns, every batch and the output's
    ``where`` ask for the same few expressions; an expression is immutable)."""
    try:
        return pl.sql_expr(sql)
    except Exception as e:  # polars raises several error types here
        raise ValueError(f"not a valid SQL expression: {sql!r} ({e})") from None


@lru_cache(maxsize=256)
def _columns(sql: str) -> tuple[str, ...]:
    return tuple(sorted(set(parse_sql_expr(sql).meta.root_names())))


def expr_columns(sql: str) -> list[str]:
    """Columns a SQL expression reads (its row key is built from exactly these)."""
    return list(_columns(sql))
