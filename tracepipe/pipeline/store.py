"""Content-addressed per-stage Parquet store: the cache behind incremental runs and resume.

Layout (``root`` is a local path or any fsspec URL: ``file://``, ``s3://``, ``gs://``, ``memory://``)::

    <root>/stages/<stage>-<fingerprint>/meta.json            what the fingerprint hashes
    <root>/stages/<stage>-<fingerprint>/part-<ns>-<id>.parquet  row-stage results, one per batch
    <root>/stages/<stage>-<fingerprint>/set-<digest>.parquet     set-stage decisions

Every row of a part carries the ``_in_key`` (row key of the input row) it was computed from,
its output index ``_idx`` and ``_drop`` (reason, or null when kept). Parts appear atomically, so
a crash (even ``kill -9``) loses at most the batch in flight and never leaves a half-written part
behind: local files are written to a temporary name, fsynced and renamed; on object stores
(S3, GCS, Azure) a part is one PUT, which is atomic; other fsspec filesystems get temp + move.
Readers drop duplicate (``_in_key``, ``_idx``) pairs, keeping the oldest, so two executors (or two
machines sharing the store) racing on the same key cannot corrupt the result.

Remote stores are read and written through fsspec (credentials as fsspec finds them: env vars,
``~/.aws``, ``gcloud`` ...); polars only sees them through pyarrow datasets, so any fsspec
filesystem works, including ``memory://`` in tests.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracepipe.contract import IDX_COL, IN_KEY_COL  # IDX_COL: re-exported (defined in tracepipe.contract)

#: set-stage decisions kept per stage store (newest first)
KEEP_DECISIONS = 4

#: protocols whose single PUT is atomic (a reader sees the whole object or nothing)
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
#: parallel reads of part footers / key columns on remote stores
REMOTE_READ_THREADS = 16


def _fs(root: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    text = str(root)
    if "://" not in text:  # a plain local path (the common case): no URL to parse
        return fsspec.filesystem("file"), os.path.abspath(text).rstrip("/") or "/"
    fs, path = fsspec.core.url_to_fs(text)
    return fs, path.rstrip("/")


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto if isinstance(proto, str) else proto[0]


def is_local(root: str | Path) -> bool:
    """A plain path or a ``file://`` URL (the local filesystem, or a shared mount such as NFS)."""
    return "://" not in str(root) or str(root).startswith("file://")


def local_path(url: str | Path) -> Path:
    """The filesystem path of a local root (``file://`` prefix removed)."""
    return Path(str(url).removeprefix("file://"))


def _parquet_bytes(table: pa.Table, compression: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, **kw)
    return buf.getvalue()


def _put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, local: bool, durable: bool = True) -> None:
    """Write ``data`` so that ``path`` appears whole or not at all (``durable``: fsync before the
    rename, so it also survives a power loss; caches that can be recomputed skip that)."""
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    if local:
        os.makedirs(parent or ".", exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    if _protocol(fs) in ATOMIC_PUT_PROTOCOLS:  # one PUT: the object appears whole or not at all
        fs.pipe_file(path, data)
        return
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm_file(tmp)
        except Exception:  # pragma: no cover - best effort; readers ignore .tmp- names anyway
            pass
        raise


def write_parquet_atomic(df: pl.DataFrame | pa.Table, url: str, compression: str = "zstd", durable: bool = True, **kw: Any) -> None:
    """Write a Parquet file so that it appears at ``url`` whole or not at all."""
    table = df.to_arrow() if isinstance(df, pl.DataFrame) else df
    fs, path = _fs(url)
    _put_atomic(fs, path, _parquet_bytes(table, compression, **kw), is_local(url), durable)


class StageStore:
    """The cached results of one stage at one fingerprint."""

    def __init__(self, root: str | Path, stage: str, fp: str, meta: dict[str, Any] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.stage = stage
        self.fp = fp
        self.url = f"{self.root}/stages/{stage}-{fp}"
        self.fs, self.path = _fs(self.url)
        self.local = is_local(self.root)
        self._meta = meta
        self._ensured = False
        self._footers: dict[str, tuple[pa.Schema, int, int]] = {}  # parts are immutable: read once

    def __getstate__(self) -> dict[str, Any]:  # fsspec filesystems re-created where unpickled
        state = dict(self.__dict__)
        state.pop("fs", None)
        state["_footers"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fs, self.path = _fs(self.url)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Forget cached directory listings (object-store filesystems cache ``ls``)."""
        if not self.local:
            try:
                self.fs.invalidate_cache(self.path)
            except Exception:  # pragma: no cover - best effort
                pass

    def ensure(self) -> None:
        if self._ensured:
            return
        if self.local or _protocol(self.fs) not in ATOMIC_PUT_PROTOCOLS:  # object stores have no dirs
            self.fs.makedirs(self.path, exist_ok=True)
        meta_path = f"{self.path}/meta.json"
        if self._meta is not None and not self.fs.exists(meta_path):
            text = json.dumps(self._meta, indent=2, sort_keys=True, default=str)
            _put_atomic(self.fs, meta_path, text.encode("utf-8"), self.local)
        self._ensured = True

    def parts(self) -> list[str]:
        """Paths (as the filesystem names them) of the committed parts, oldest first."""
        self._refresh()
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p for p in names if (b := p.rsplit("/", 1)[-1]).startswith("part-") and b.endswith(".parquet"))

    def _urls(self, paths: list[str]) -> list[str]:
        if self.local:
            return paths
        proto = _protocol(self.fs)
        return [f"{proto}://{p}" for p in paths]

    def _map(self, fn: Any, items: list[str]) -> list[Any]:
        if self.local or len(items) < 2:
            return [fn(p) for p in items]
        with ThreadPoolExecutor(min(REMOTE_READ_THREADS, len(items))) as pool:
            return list(pool.map(fn, items))

    # -- row-stage results ---------------------------------------------------------------------
    def _read_keys(self, path: str) -> list[str]:
        if self.local:
            return pq.read_table(path, columns=[IN_KEY_COL]).column(0).to_pylist()
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=[IN_KEY_COL]).column(0).to_pylist()

    def key_column(self, paths: list[str]) -> pl.Series:
        """``_in_key`` of every row of these committed parts (paths as :meth:`parts` names them)."""
        if not paths:
            return pl.Series(IN_KEY_COL, [], dtype=pl.String)
        if self.local:
            return pl.scan_parquet(paths, hive_partitioning=False, extra_columns="ignore").select(IN_KEY_COL).collect().to_series()
        return pl.Series(IN_KEY_COL, [k for chunk in self._map(self._read_keys, paths) for k in chunk], dtype=pl.String)

    def keys(self) -> set[str]:
        """Input keys whose results are committed."""
        keys: set[str] = set()
        for chunk in self._map(self._read_keys, self.parts()):
            keys.update(chunk)
        return keys

    def missing(self, keys: pl.Series) -> pl.Series:
        """The ``keys`` without committed results (an anti-join in polars: no Python set of
        every committed key, which costs more than the rest of a small rerun)."""
        parts = self.parts()
        if not parts:
            return keys
        committed = self.key_column(parts).to_frame().lazy()
        want = keys.to_frame(IN_KEY_COL).lazy()
        return want.join(committed, on=IN_KEY_COL, how="anti", maintain_order="left").collect().to_series()

    def commit(self, df: pl.DataFrame) -> str:
        """Atomically add one part; returns its URL."""
        self.ensure()
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        url = f"{self.url}/{name}"
        _put_atomic(self.fs, f"{self.path}/{name}", _parquet_bytes(df.to_arrow(), "zstd"), self.local)
        return url

    def _footer(self, path: str) -> tuple[pa.Schema, int, int]:
        """(Arrow schema, rows, bytes) of a committed part, from its footer (cached: parts never change)."""
        if path not in self._footers:
            if self.local:
                md = pq.read_metadata(path)
                size = os.path.getsize(path)
            else:
                with self.fs.open(path, "rb") as fh:
                    md = pq.read_metadata(fh)
                size = int(self.fs.size(path))
            self._footers[path] = (md.schema.to_arrow_schema(), md.num_rows, size)
        return self._footers[path]

    def _read_schema(self, path: str) -> pa.Schema:
        return self._footer(path)[0]

    def _scan_group(self, paths: list[str]) -> pl.LazyFrame:
        if self.local:
            return pl.scan_parquet(paths)
        import pyarrow.dataset as pads
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        ds = pads.dataset(paths, format="parquet", filesystem=PyFileSystem(FSSpecHandler(self.fs)))
        return pl.scan_pyarrow_dataset(ds)

    def bytes_per_row(self, sample: int = 4) -> float:
        """Stored (compressed) bytes per committed row, from the sizes and footers of the newest
        ``sample`` parts (an estimate for sizing work; reading every footer costs more)."""
        parts = self.parts()[-sample:]
        if not parts:
            return 0.0
        footers = self._map(self._footer, parts)
        return sum(f[2] for f in footers) / max(1, sum(f[1] for f in footers))

    def scan(
        self, schema_hint: dict[str, pl.DataType] | None = None, keys: pl.LazyFrame | None = None, only: list[str] | None = None,
    ) -> pl.LazyFrame | None:
        """All committed rows, lazily; duplicates of (``_in_key``, ``_idx``) dropped (oldest kept).

        Parts whose schema differs (a column all null in one batch, say) are combined with
        relaxed types. ``keys`` (a frame with ``_in_key``) keeps only those keys' rows, before
        the duplicate check, so a lookup of a few keys does not deduplicate the whole store.
        ``only`` restricts the scan to those parts (paths as :meth:`parts` names them).
        """
        parts = self.parts() if only is None else [p for p in self.parts() if p in set(only)]
        if not parts:
            return None
        # consecutive parts with one schema are scanned together (the common case: one scan for
        # all); order stays oldest first, so `keep="first"` keeps the oldest duplicate
        groups: list[tuple[pa.Schema, list[str]]] = []
        for path, schema in zip(parts, self._map(self._read_schema, parts)):
            schema = schema.remove_metadata()
            if groups and groups[-1][0].equals(schema):
                groups[-1][1].append(path)
            else:
                groups.append((schema, [path]))
        frames = [self._scan_group(paths) for _, paths in groups]
        lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
        if keys is not None:
            lf = lf.join(keys.select(IN_KEY_COL), on=IN_KEY_COL, how="semi", maintain_order="left")
        return lf.unique(subset=[IN_KEY_COL, IDX_COL], keep="first", maintain_order=True)

    # -- set-stage decisions -------------------------------------------------------------------
    def decision_url(self, digest: str) -> str:
        return f"{self.url}/set-{digest}.parquet"

    def load_decision(self, digest: str) -> pl.DataFrame | None:
        url = self.decision_url(digest)
        fs, path = _fs(url)
        self._refresh()
        try:
            with fs.open(path, "rb") as fh:
                return pl.read_parquet(fh)
        except FileNotFoundError:
            return None

    def save_decision(self, digest: str, df: pl.DataFrame) -> None:
        """Save a decision; on a local store only the newest ``KEEP_DECISIONS`` are kept (every
        append makes a new input, hence a new decision, and old ones would pile up)."""
        self.ensure()
        # a cache (recomputable): no fsync; plain encoding (dictionaries cost more than they save here)
        write_parquet_atomic(df, self.decision_url(digest), durable=False, use_dictionary=False)
        if self.local:
            old = sorted(Path(self.path).glob("set-*.parquet"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for p in old[KEEP_DECISIONS:]:
                p.unlink(missing_ok=True)


def list_stage_dirs(root: str | Path) -> list[str]:
    fs, path = _fs(f"{str(root).rstrip('/')}/stages")
    try:
        fs.invalidate_cache(path)
    except Exception:  # pragma: no cover
        pass
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
