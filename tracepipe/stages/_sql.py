"""Helpers for stages that take SQL expressions (``filter``, ``map``): parse and list columns."""

from __future__ import annotations

import polars as pl


def parse_sql_expr(sql: str) -> pl.Expr:
    """Parse a SQL expression with polars; raise ValueError with polars' message if it is bad."""
    try:
        return pl.sql_expr(sql)
    except Exception as e:  # polars raises several error types here
        raise ValueError(f"not a valid SQL expression: {sql!r} ({e})") from None


def expr_columns(sql: str) -> list[str]:
    """Columns a SQL expression reads (its row key is built from exactly these)."""
    return sorted(set(parse_sql_expr(sql).meta.root_names()))
