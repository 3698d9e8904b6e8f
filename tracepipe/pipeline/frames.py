"""Frames: the rows in flight, as ordered lists of immutable, content-addressed Parquet parts.

A part's ``digest`` is derived from what produced it (source bytes, or the input part's digest +
the stage fingerprint + the stage's results for its rows), never from a clock, so a rerun that
meets the same inputs finds the same part in ``<workdir>/frames/`` and does no work for it.
That makes reruns proportional to what changed (an appended JSONL chunk flows through every
stage as one new part) and keeps memory bounded by a part, not by the dataset.

Each cached part has a sidecar ``<digest>.json`` (rows, drop counts, ...) written after the
Parquet file, so a part whose sidecar exists is complete (a ``kill -9`` leaves at most an
orphan temp file, removed by the next run's garbage collection).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tracepipe.pipeline.keys import fingerprint


@dataclass(frozen=True)
class Part:
    path: Path
    digest: str
    rows: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def digest_of(*items: Any) -> str:
    return fingerprint(list(items), length=32)


def frame_digest(df: pl.DataFrame) -> str:
    """Digest of a frame's content (schema, values, row order), independent of its chunking.

    Uses polars' seeded row hash (vectorized; stable within a polars release, so the version is
    part of the digest), then xxh3 over the per-row hashes.
    """
    import xxhash

    rows = df.hash_rows(seed=0).to_numpy().tobytes() if df.height else b""
    return digest_of(pl.__version__, [(n, str(t)) for n, t in df.schema.items()], df.height, xxhash.xxh3_128_hexdigest(rows))


def schema_digest(schema: pl.Schema) -> str:
    """Names and types of a part's columns, in order (kept in its sidecar: parts whose digests
    match are scanned as one multi-file scan, without opening each footer first)."""
    return digest_of([(n, str(t)) for n, t in schema.items()])


class FrameCache:
    """``<workdir>/frames/<digest>.parquet`` + ``.json`` sidecars; ``dry`` writes to a temp dir."""

    def __init__(self, root: Path, scratch: Path | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch  # plan mode: new parts go here and are thrown away
        self.used: set[str] = set()

    def read(self, part: Part, columns: list[str] | None = None) -> pl.DataFrame:
        """A part's rows: all columns, or those of ``columns`` it has (in that order)."""
        if columns is None:
            return pl.read_parquet(part.path)
        names = pl.read_parquet_schema(part.path)
        return pl.read_parquet(part.path, columns=[c for c in columns if c in names])

    def get(self, digest: str) -> Part | None:
        for d in (self.root, self.scratch):
            if d is None:
                continue
            try:
                with open(d / f"{digest}.json", "rb") as fh:
                    meta = json.loads(fh.read())
            except FileNotFoundError:
                continue
            path = d / f"{digest}.parquet"
            if os.path.exists(path):
                self.used.add(digest)
                return Part(path, digest, int(meta["rows"]), meta)
        return None

    def put(self, digest: str, data: pl.DataFrame | pl.LazyFrame, meta: dict[str, Any] | None = None) -> Part:
        d = self.scratch if self.scratch is not None else self.root
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{digest}.parquet"
        tmp = d / f".tmp-{uuid.uuid4().hex}.parquet"
        if isinstance(data, pl.LazyFrame):
            data.sink_parquet(tmp, compression="lz4", statistics=False, maintain_order=True)
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(tmp).metadata.num_rows
        else:
            data.write_parquet(tmp, compression="lz4", statistics=False)  # scratch: no filter reads stats
            rows = data.height
        os.replace(tmp, path)
        m = {**(meta or {}), "rows": rows, "schema": schema_digest(data.collect_schema())}
        side_tmp = d / f".tmp-{uuid.uuid4().hex}.json"
        side_tmp.write_text(json.dumps(m, default=str))
        os.replace(side_tmp, d / f"{digest}.json")
        self.used.add(digest)
        return Part(path, digest, rows, m)

    def _find(self, name: str, suffix: str) -> Path | None:
        """``<name><suffix>`` kept with the cache (this run's scratch first), marked as used."""
        for d in (self.scratch, self.root):
            if d is not None and (d / f"{name}{suffix}").exists():
                self.used.add(name)
                return d / f"{name}{suffix}"
        return None

    def _write(self, name: str, suffix: str, write: Callable[[Path], None]) -> None:
        """Write ``<name><suffix>`` atomically (to a temp name, then renamed), marked as used."""
        d = self.scratch if self.scratch is not None else self.root
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tmp-{uuid.uuid4().hex}{suffix}"
        write(tmp)
        os.replace(tmp, d / f"{name}{suffix}")
        self.used.add(name)

    def get_meta(self, name: str) -> dict[str, Any] | None:
        """A small JSON record kept with the cache (``<name>.json``, no Parquet file)."""
        path = self._find(name, ".json")
        try:
            return dict(json.loads(path.read_text())) if path is not None else None
        except (OSError, ValueError):
            return None

    def put_meta(self, name: str, data: dict[str, Any]) -> None:
        self._write(name, ".json", lambda tmp: tmp.write_text(json.dumps(data, default=str)))

    def get_array(self, name: str) -> np.ndarray | None:
        """A numpy array kept with the cache (``<name>.npy``), or None."""
        path = self._find(name, ".npy")
        try:
            return np.load(path, allow_pickle=False) if path is not None else None
        except (OSError, ValueError):
            return None

    def put_array(self, name: str, arr: np.ndarray) -> None:
        self._write(name, ".npy", lambda tmp: np.save(tmp, arr, allow_pickle=False))

    def gc(self, keep: set[str]) -> int:
        """Delete parts not in ``keep`` (and orphan temp files); returns files removed."""
        n = 0
        for p in self.root.iterdir():
            stem = p.name.split(".")[0]
            if p.name.startswith(".tmp-") or (stem not in keep and p.suffix in (".parquet", ".json", ".npy")):
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    pass
        return n


def scan_parts(parts: list[Part], columns: list[str] | None = None, file_column: str | None = None) -> pl.LazyFrame:
    """All parts as one LazyFrame, in order (schemas relaxed to a common supertype).

    ``file_column`` adds a column holding each row's part path."""
    if not parts:
        raise ValueError("no parts")
    if len(parts) > 1 and _one_schema(parts):
        # one schema: one multi-file scan
        lf = pl.scan_parquet([str(p.path) for p in parts], hive_partitioning=False, include_file_paths=file_column)
        return lf if columns is None else lf.select([c for c in columns if c in lf.collect_schema()] + ([file_column] if file_column else []))
    scans = [pl.scan_parquet(p.path, include_file_paths=file_column) for p in parts]
    if columns is not None:
        scans = [s.select([c for c in columns if c in s.collect_schema()] + ([file_column] if file_column else [])) for s in scans]
    if len(scans) == 1:
        return scans[0]
    schemas = [s.collect_schema() for s in scans]
    if all(s == schemas[0] for s in schemas):
        return pl.concat(scans, how="vertical")
    return pl.concat(scans, how="diagonal_relaxed")


def read_parts(parts: list[Part], columns: list[str], where: pl.Expr | None = None, row_index: str | None = None) -> pl.DataFrame:
    """``columns`` of all parts, in order, in one multi-file read (polars reads the files in
    parallel; per-file reads cost more than the data when parts are many and columns small).
    The columns must have one type across the parts. ``row_index`` adds each row's position
    among all the parts' rows (Int64), ``where`` keeps only the rows it holds for."""
    if not parts:
        raise ValueError("no parts")
    paths = [str(p.path) for p in parts]
    lf = pl.scan_parquet(paths, extra_columns="ignore", missing_columns="insert", hive_partitioning=False).select(columns)
    if row_index is not None:
        lf = lf.with_row_index(row_index).with_columns(pl.col(row_index).cast(pl.Int64))
    return (lf.filter(where) if where is not None else lf).collect()


def _one_schema(parts: list[Part]) -> bool:
    """Whether the parts' sidecars say they all have the same columns and types."""
    first = parts[0].meta.get("schema")
    return bool(first) and all(p.meta.get("schema") == first for p in parts)


def frame_schema(parts: list[Part]) -> pl.Schema:
    """The columns of all parts together (one footer read when their sidecars agree)."""
    if not parts:
        return pl.Schema()
    if _one_schema(parts):
        return pl.scan_parquet(parts[0].path).collect_schema()
    return scan_parts(parts).collect_schema()
