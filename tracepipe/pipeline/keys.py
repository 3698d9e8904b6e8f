"""Row keys and stage fingerprints: xxhash over canonical bytes.

Keys must be stable across processes, machines and library versions, so they never use
Python's ``hash`` or polars' ``hash`` (whose values may change between releases).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import xxhash

# the column names live in tracepipe.contract, the hashes in tracepipe.hashing; re-exported here
from tracepipe.contract import IN_KEY_COL, KEY_COL, ORDER_COL, PARENT_COL
from tracepipe.hashing import canonical_json, fingerprint, hash_text, seed_for

__all__ = [
    "IN_KEY_COL", "KEY_COL", "ORDER_COL", "PARENT_COL", "canonical_json", "fingerprint", "hash_text", "row_keys", "seed_for",
]


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
