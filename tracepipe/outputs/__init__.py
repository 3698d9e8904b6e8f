"""Output formats and the shard writer.

A format is a function registered by name that turns the final rows (a polars LazyFrame) into the
rows of the output table; the writer (:mod:`tracepipe.outputs.writer`) handles splits, sharding,
compression and atomic replacement, so a new format is a small addition.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import polars as pl

FormatFn = Callable[[pl.LazyFrame, dict[str, Any]], pl.LazyFrame]

_FORMATS: dict[str, FormatFn] = {}
_LOADED = False


def register_format(name: str) -> Callable[[FormatFn], FormatFn]:
    def deco(fn: FormatFn) -> FormatFn:
        _FORMATS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def known_formats() -> list[str]:
    _load_all()
    return sorted(_FORMATS)


def get_format(name: str) -> FormatFn:
    _load_all()
    if name not in _FORMATS:
        raise KeyError(f"unknown output format {name!r}; known formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]
