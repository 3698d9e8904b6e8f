"""Content-addressed per-stage Parquet store: the cache behind incremental runs and resume.

Layout (``root`` is a local path or any fsspec URL)::

    <root>/stages/<stage>-<fingerprint>/meta.json            what the fingerprint hashes
    <root>/stages/<stage>-<fingerprint>/part-<ns>-<id>.parquet  row-stage results, one per batch
    <root>/stages/<stage>-<fingerprint>/set-<digest>.parquet     set-stage decisions

Every row of a part carries the ``_in_key`` (row key of the input row) it was computed from,
its output index ``_idx`` and ``_drop`` (reason, or null when kept). Parts are written to a
temporary name and renamed, so a crash (even ``kill -9``) loses at most the batch in flight and
never leaves a half-written part behind. Readers drop duplicate (``_in_key``, ``_idx``) pairs,
keeping the oldest, so two executors racing on the same key cannot corrupt the result.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracepipe.pipeline.keys import IN_KEY_COL

IDX_COL = "_idx"


def _fs(root: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(root))
    return fs, path.rstrip("/")


def is_local(root: str | Path) -> bool:
    return "://" not in str(root) or str(root).startswith("file://")


def write_parquet_atomic(df: pl.DataFrame | pa.Table, url: str, compression: str = "zstd", **kw: Any) -> None:
    """Write a Parquet file to a temporary name next to ``url`` and rename it into place."""
    table = df.to_arrow() if isinstance(df, pl.DataFrame) else df
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    if is_local(url):
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression=compression, **kw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:  # object stores: a single PUT is atomic; write then move for other filesystems
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression, **kw)
        with fs.open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        fs.mv(tmp, path)


class StageStore:
    """The cached results of one stage at one fingerprint."""

    def __init__(self, root: str | Path, stage: str, fp: str, meta: dict[str, Any] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.stage = stage
        self.fp = fp
        self.url = f"{self.root}/stages/{stage}-{fp}"
        self.fs, self.path = _fs(self.url)
        self._meta = meta

    # -- bookkeeping ---------------------------------------------------------------------------
    def ensure(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        meta_path = f"{self.path}/meta.json"
        if self._meta is not None and not self.fs.exists(meta_path):
            with self.fs.open(meta_path, "w") as fh:
                fh.write(json.dumps(self._meta, indent=2, sort_keys=True, default=str))

    def parts(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        names = [p for p in self.fs.ls(self.path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")]
        return sorted(names)

    def _urls(self, paths: list[str]) -> list[str]:
        if is_local(self.root):
            return paths
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return [f"{proto}://{p}" for p in paths]

    # -- row-stage results ---------------------------------------------------------------------
    def keys(self) -> set[str]:
        """Input keys whose results are committed."""
        parts = self.parts()
        if not parts:
            return set()
        keys: set[str] = set()
        for p in parts:
            with self.fs.open(p, "rb") as fh:
                col = pq.read_table(fh, columns=[IN_KEY_COL]).column(0)
            keys.update(col.to_pylist())
        return keys

    def commit(self, df: pl.DataFrame) -> str:
        """Atomically add one part; returns its path."""
        self.ensure()
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        url = f"{self.url}/{name}"
        write_parquet_atomic(df, url, compression="zstd")
        return url

    def scan(self, schema_hint: dict[str, pl.DataType] | None = None) -> pl.LazyFrame | None:
        parts = self.parts()
        if not parts:
            return None
        lf = pl.concat([pl.scan_parquet(u) for u in self._urls(parts)], how="diagonal_relaxed")
        return lf.unique(subset=[IN_KEY_COL, IDX_COL], keep="first", maintain_order=True)

    # -- set-stage decisions -------------------------------------------------------------------
    def decision_url(self, digest: str) -> str:
        return f"{self.url}/set-{digest}.parquet"

    def load_decision(self, digest: str) -> pl.DataFrame | None:
        url = self.decision_url(digest)
        fs, path = _fs(url)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            return pl.read_parquet(fh)

    def save_decision(self, digest: str, df: pl.DataFrame) -> None:
        self.ensure()
        write_parquet_atomic(df, self.decision_url(digest))


def list_stage_dirs(root: str | Path) -> list[str]:
    fs, path = _fs(f"{str(root).rstrip('/')}/stages")
    if not fs.exists(path):
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def local_path(url: str | Path) -> Path:
    return Path(str(url).removeprefix("file://"))
