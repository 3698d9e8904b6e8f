"""Output formats and the shard writer.

A format is a function registered by name that turns the final rows (a polars LazyFrame) into the
rows of the output table; the writer (:mod:`tracepipe.outputs._writer`) handles splits, sharding,
compression and atomic replacement, so a new format is a small addition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from tracepipe._plugins import load_submodules

FormatFn = Callable[[pl.LazyFrame, dict[str, Any]], pl.LazyFrame]

_FORMATS: dict[str, FormatFn] = {}
_ROW_LOCAL: set[str] = set()


def register_format(name: str, row_local: bool = False) -> Callable[[FormatFn], FormatFn]:
    """Register a format. ``row_local``: each output row depends only on its own input row
    (and the input schema), so the rows of appended input can be formatted on their own and
    written as new shards after the old ones."""

    def deco(fn: FormatFn) -> FormatFn:
        _FORMATS[name] = fn
        if row_local:
            _ROW_LOCAL.add(name)
        return fn

    return deco


def is_row_local(name: str) -> bool:
    _load_all()
    return name in _ROW_LOCAL


def _load_all() -> None:
    load_submodules(__name__)


def known_formats() -> list[str]:
    _load_all()
    return sorted(_FORMATS)


def get_format(name: str) -> FormatFn:
    _load_all()
    if name not in _FORMATS:
        raise KeyError(f"unknown output format {name!r}; known formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]
