"""Row keys and stage fingerprints: xxhash over canonical bytes.

Keys must be stable across processes, machines and library versions, so they never use
Python's ``hash`` or polars' ``hash`` (whose values may change between releases).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import polars as pl
import xxhash

KEY_COL = "_key"
PARENT_COL = "_parent"
IN_KEY_COL = "_in_key"
ORDER_COL = "_ord"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the canonical text that gets hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_text(text: str | bytes, bits: int = 128) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if bits == 64:
        return xxhash.xxh3_64_hexdigest(data)
    return xxhash.xxh3_128_hexdigest(data)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Short stable fingerprint of any JSON-able object."""
    return hash_text(canonical_json(obj))[:length]


def _canon_column(series: pl.Series) -> pl.Series:
    """Render a column as canonical strings (nulls distinct from empty strings)."""
    dtype = series.dtype
    if dtype == pl.String:
        return series.fill_null("\x00null")
    if dtype.is_numeric() or dtype == pl.Boolean:
        return series.cast(pl.String).fill_null("\x00null")
    # nested types: canonical JSON per value
    return pl.Series(series.name, [canonical_json(v) for v in series.to_list()], dtype=pl.String)


def row_keys(df: pl.DataFrame, columns: Sequence[str], salt: str = "") -> pl.Series:
    """Hash the given columns of every row into a 32-hex-char key.

    Missing columns hash as null, so a stage that reads an optional column keeps stable keys.
    """
    parts: list[pl.Series] = []
    for c in sorted(columns):
        if c in df.columns:
            parts.append(_canon_column(df.get_column(c)))
        else:
            parts.append(pl.Series(c, ["\x00null"] * df.height, dtype=pl.String))
    if not parts:
        return pl.Series(IN_KEY_COL, [hash_text(salt)] * df.height, dtype=pl.String)
    names = sorted(columns)
    lists = [p.to_list() for p in parts]
    sep = "\x1f"
    prefix = salt + sep
    out = [
        xxhash.xxh3_128_hexdigest(
            (prefix + sep.join(f"{n}={v}" for n, v in zip(names, vals))).encode("utf-8")
        )
        for vals in zip(*lists)
    ]
    return pl.Series(IN_KEY_COL, out, dtype=pl.String)


def seed_for(key: str, sample: int = 0, base: int = 0) -> int:
    """Per-request seed derived from a row key, so reruns reproduce samples exactly."""
    return xxhash.xxh32_intdigest(f"{key}:{sample}".encode(), seed=base) & 0x7FFFFFFF
