"""Row keys and stage fingerprints: xxhash over canonical bytes.

Keys must be stable across processes, machines and library versions, so they never use
Python's ``hash`` or polars' ``hash`` (whose values may change between releases).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
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
    if _numeric_lists(dtype):
        return _list_digests(series)
    # nested types: canonical JSON per value
    return pl.Series(series.name, [canonical_json(v) for v in series.to_list()], dtype=pl.String)


def _numeric_lists(dtype: pl.DataType) -> bool:
    """Lists (of lists...) of numbers or booleans: token ids, log-probs, top-k matrices."""
    if not isinstance(dtype, pl.List):
        return False
    while isinstance(dtype, pl.List):
        dtype = dtype.inner
    return dtype.is_numeric() or dtype == pl.Boolean


def _list_digests(series: pl.Series) -> pl.Series:
    """One digest per row of a numeric list column, over its Arrow buffers: every level's lengths
    and validity, then the leaf values' bytes (their dtype named). JSON per value, as for other
    nested columns, costs ~100 ms for a 4000-token row of top-20 log-probs; this costs microseconds."""
    arr = series.to_arrow()
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    levels: list[tuple[np.ndarray, np.ndarray]] = []  # (absolute offsets into the child, valid)
    cur: pa.Array = arr
    while pa.types.is_list(cur.type) or pa.types.is_large_list(cur.type):
        levels.append((np.asarray(cur.offsets, dtype=np.int64), cur.is_valid().to_numpy(zero_copy_only=False)))
        cur = cur.values
    leaf_valid = cur.is_valid().to_numpy(zero_copy_only=False)
    leaf = (cur.fill_null(False if pa.types.is_boolean(cur.type) else 0) if cur.null_count else cur).to_numpy(zero_copy_only=False)
    head = f"\x00lists:{series.dtype}:".encode()
    out: list[str] = []
    top_valid = levels[0][1]
    for r in range(len(arr)):
        if not top_valid[r]:
            out.append("\x00null")
            continue
        h = xxhash.xxh3_128(head)
        s, e = r, r + 1
        for offsets, valid in levels:
            h.update(valid[s:e].tobytes())
            h.update(np.diff(offsets[s:e + 1]).tobytes())
            s, e = int(offsets[s]), int(offsets[e])
        h.update(leaf_valid[s:e].tobytes())
        h.update(leaf[s:e].tobytes())
        out.append(h.hexdigest())
    return pl.Series(series.name, out, dtype=pl.String)


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
