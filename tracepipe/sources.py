"""Load problems from JSONL, Parquet (files or globs) and Hugging Face datasets.

Output: one Parquet "frame" with the canonical columns (``id``, ``problem``, ``answer``,
``tests``, ``domain``, ``source``) plus every unmapped source column, and the runtime columns
``_key`` (stable row identity) and ``_ord`` (stable order). Presets map well-known datasets.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import xxhash

from tracepipe.pipeline.frames import digest_of
from tracepipe.pipeline.keys import KEY_COL, ORDER_COL
from tracepipe.verifiers.math import last_boxed  # one extractor for gold and predicted answers

CANONICAL = ("id", "problem", "answer", "tests", "domain", "source")

_WS = re.compile(r"\s+")


class SourceError(ValueError):
    """A source that cannot be read; the message names the source entry and the file."""


def normalize_text(text: str | None) -> str:
    """Lower-case, fold whitespace: the text hashed for ids and exact dedup."""
    if text is None:
        return ""
    return _WS.sub(" ", text.lower()).strip()


def gsm8k_answer(text: str | None) -> str | None:
    """Text after the last ``####`` of a GSM8K solution, thousands separators removed."""
    if not text or "####" not in text:
        return None
    ans = text.rsplit("####", 1)[1].strip()
    return ans.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", ans) else ans


def _num_to_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


ANSWER_FORMATS: dict[str, Callable[[str | None], str | None]] = {
    "gsm8k": gsm8k_answer,
    "boxed": last_boxed,
    "raw": lambda s: s.strip() if isinstance(s, str) else s,
}


# -- presets: (column mapping, answer_format, domain, post-processing) -------------------------
def _humaneval(df: pl.DataFrame) -> pl.DataFrame:
    tests = [
        json.dumps({"style": "functional", "code": t, "entry_point": e})
        for t, e in zip(df["test"].to_list(), df["entry_point"].to_list())
    ]
    return df.with_columns(
        pl.col("task_id").alias("id"),
        pl.col("prompt").alias("problem"),
        pl.Series("tests", tests, dtype=pl.String),
        (pl.col("prompt") + pl.col("canonical_solution")).alias("solution"),
    )


def _mbpp(df: pl.DataFrame) -> pl.DataFrame:
    test_lists = df["test_list"].to_list()
    setups = df["test_setup_code"].to_list() if "test_setup_code" in df.columns else [""] * df.height
    tests = [json.dumps({"style": "functional", "code": (s or "") + "\n" + "\n".join(t)}) for s, t in zip(setups, test_lists)]
    problem = [f"{txt}\nYour code should pass these tests:\n" + "\n".join(t) for txt, t in zip(df["text"].to_list(), test_lists)]
    return df.with_columns(
        pl.col("task_id").cast(pl.String).alias("id"),
        pl.Series("problem", problem, dtype=pl.String),
        pl.Series("tests", tests, dtype=pl.String),
        pl.col("code").alias("solution"),
    )


def _stdio_tests(inputs: list[str], outputs: list[str]) -> str:
    return json.dumps({"style": "stdio", "cases": [{"input": i, "output": o} for i, o in zip(inputs, outputs)]})


def _apps(df: pl.DataFrame) -> pl.DataFrame:
    tests = []
    for raw in df["input_output"].to_list():
        try:
            d = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            d = {}
        tests.append(_stdio_tests(d.get("inputs", []), d.get("outputs", [])) if d.get("inputs") else None)
    return df.with_columns(
        pl.col("problem_id").cast(pl.String).alias("id") if "problem_id" in df.columns else pl.lit(None).alias("id"),
        pl.col("question").alias("problem"),
        pl.Series("tests", tests, dtype=pl.String),
    )


def _codecontests(df: pl.DataFrame) -> pl.DataFrame:
    tests = []
    for pub, priv in zip(df["public_tests"].to_list(), (df["private_tests"].to_list() if "private_tests" in df.columns else [None] * df.height)):
        ins = list((pub or {}).get("input", [])) + list((priv or {}).get("input", []))
        outs = list((pub or {}).get("output", [])) + list((priv or {}).get("output", []))
        tests.append(_stdio_tests(ins, outs))
    return df.with_columns(
        pl.col("name").alias("id"),
        pl.col("description").alias("problem"),
        pl.Series("tests", tests, dtype=pl.String),
    )


def _openthoughts(df: pl.DataFrame) -> pl.DataFrame:
    problems, traces = [], []
    for conv in df["conversations"].to_list():
        user = next((t.get("value") for t in conv or [] if t.get("from") in ("user", "human")), None)
        asst = next((t.get("value") for t in conv or [] if t.get("from") in ("assistant", "gpt")), None)
        problems.append(user)
        traces.append(asst)
    return df.with_columns(pl.Series("problem", problems, dtype=pl.String), pl.Series("solution", traces, dtype=pl.String))


PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {"columns": {"problem": "question", "answer": "answer", "solution": "answer"}, "answer_format": "gsm8k", "domain": "math"},
    "math": {"columns": {"problem": "problem", "answer": "answer", "solution": "solution"}, "answer_format": "raw", "domain": "math", "id": "unique_id"},
    "competition": {"columns": {"problem": "problem", "answer": "answer"}, "answer_format": "raw", "domain": "math", "id": "id"},
    "humaneval": {"fn": _humaneval, "domain": "code"},
    "mbpp": {"fn": _mbpp, "domain": "code"},
    "apps": {"fn": _apps, "domain": "code"},
    "codecontests": {"fn": _codecontests, "domain": "code"},
    "openthoughts": {"fn": _openthoughts, "domain": "math"},
}


CHUNK_ROWS = 20_000


def _iter_files(paths: list[str]) -> Iterator[pl.DataFrame]:
    for p in paths:
        if p.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
            yield from pl.scan_ndjson(p, infer_schema_length=None).collect_batches(chunk_size=CHUNK_ROWS)
        elif p.endswith(".parquet"):
            for batch in pq.ParquetFile(p).iter_batches(batch_size=CHUNK_ROWS):
                yield pl.from_arrow(batch)  # type: ignore[misc]
        else:
            raise SourceError(f"{p}: unsupported file type (use .jsonl or .parquet, or `hf:`)")


def _hf_dataset(spec: Any, base: Path) -> Any:
    """The ``hf:`` source as one ``datasets.Dataset``: a ``save_to_disk`` folder, a local dataset
    folder or file, or a hub id; a ``DatasetDict`` gives its ``split`` (default ``train``)."""
    import datasets

    local = (base / spec.hf) if not Path(spec.hf).is_absolute() else Path(spec.hf)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()):
        ds = datasets.load_from_disk(str(local))
    else:
        ds = datasets.load_dataset(str(local) if local.exists() else spec.hf, name=spec.config, split=spec.split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[spec.split or "train"]
    return ds


def _iter_hf(spec: Any, base: Path) -> Iterator[pl.DataFrame]:
    ds = _hf_dataset(spec, base)
    for batch in ds.data.table.to_batches(max_chunksize=CHUNK_ROWS):
        yield pl.from_arrow(batch)  # type: ignore[misc]


def _transform(df: pl.DataFrame, spec: Any, where: str, label: str) -> pl.DataFrame:
    """Preset, column mapping, answer format, domain, source label and id for one chunk."""
    preset = PRESETS.get(spec.preset) if spec.preset else {}
    if spec.preset and preset is None:
        raise SourceError(f"{where}.preset: unknown preset {spec.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if preset and "fn" in preset:
        try:
            df = preset["fn"](df)
        except Exception as e:
            raise SourceError(f"{where}: preset {spec.preset!r} does not fit this data: {e}") from None
    mapping = {**(preset.get("columns", {}) if preset else {}), **(spec.columns or {})}
    if preset and preset.get("id") and preset["id"] in df.columns and "id" not in mapping:
        mapping["id"] = preset["id"]
    absent = sorted({src for src in mapping.values() if src not in df.columns})
    if absent:
        raise SourceError(f"{where}.columns: source has no column(s) {absent}; it has {df.columns}")
    if mapping:
        df = df.with_columns([pl.col(src).alias(dst) for dst, src in mapping.items()])
    if "problem" not in df.columns:
        raise SourceError(f"{where}: no `problem` column; map one with `columns: {{problem: <source column>}}` (have {df.columns})")

    fmt = spec.answer_format or (preset.get("answer_format") if preset else None)
    if "answer" in df.columns:
        ans = df.get_column("answer")
        if ans.dtype == pl.String and fmt == "gsm8k":
            final = ans.str.extract(r"####\s*(.+?)\s*$", 1)
            numeric = final.str.contains(r"^-?[\d,]+(\.\d+)?$")
            df = df.with_columns(pl.when(numeric).then(final.str.replace_all(",", "")).otherwise(final).alias("answer"))
        elif ans.dtype == pl.String and fmt in (None, "raw"):
            df = df.with_columns(ans.str.strip_chars().alias("answer"))
        else:
            values = [_num_to_str(v) if not isinstance(v, str) else v for v in ans.to_list()]
            if fmt:
                values = [ANSWER_FORMATS[fmt](v) for v in values]
            df = df.with_columns(pl.Series("answer", values, dtype=pl.String))
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("answer"))
    if "tests" in df.columns and df.schema["tests"] != pl.String:
        df = df.with_columns(pl.Series("tests", [None if t is None else json.dumps(t) for t in df["tests"].to_list()], dtype=pl.String))
    elif "tests" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("tests"))
    domain = spec.domain or (preset.get("domain") if preset else None) or "math"
    df = df.with_columns(pl.lit(domain).alias("domain"), pl.lit(label).alias("source"), pl.col("problem").cast(pl.String))
    if "id" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("id"))
    df = df.with_columns(pl.col("id").cast(pl.String))
    if df["id"].null_count():
        norm = df.select(normalized_expr("problem")).to_series()
        hashed = pl.Series("h", [xxhash.xxh3_64_hexdigest(t.encode()) for t in norm.to_list()], dtype=pl.String)
        df = df.with_columns(pl.col("id").fill_null(hashed))
    return df


def normalized_expr(col: str) -> pl.Expr:
    """Vectorized :func:`normalize_text`."""
    return pl.col(col).cast(pl.String).fill_null("").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def iter_source(spec: Any, base: Path, index: int) -> Iterator[pl.DataFrame]:
    """Chunks of one ``source[i]`` entry in canonical columns (bounded memory)."""
    where = f"source[{index}]"
    if spec.hf:
        label = spec.name or spec.hf.rstrip("/").rsplit("/", 1)[-1]
        try:
            chunks = _iter_hf(spec, base)
        except Exception as e:
            raise SourceError(f"{where}: cannot load Hugging Face dataset {spec.hf!r}: {e}") from None
    else:
        pattern = spec.path if Path(spec.path).is_absolute() else str(base / spec.path)
        paths = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        missing = [p for p in paths if not Path(p).exists()]
        if not paths or missing:
            raise SourceError(f"{where}.path: no such file: {spec.path} (looked for {missing[0] if missing else pattern})")
        label = spec.name or Path(paths[0]).name.split(".")[0]
        chunks = _iter_files(paths)
    remaining = spec.limit
    try:
        for chunk in chunks:
            if remaining is not None:
                if remaining <= 0:
                    break
                chunk = chunk.head(remaining)
                remaining -= chunk.height
            yield _transform(chunk, spec, where, label)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{where}: cannot read {spec.path or spec.hf}: {type(e).__name__}: {e}") from None


def load_source(spec: Any, base: Path, index: int) -> pl.DataFrame:
    """One ``source[i]`` entry, all in memory (small sources, tests)."""
    frames = list(iter_source(spec, base, index))
    return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def _order_columns(df: pl.DataFrame) -> pl.DataFrame:
    ordered = [c for c in CANONICAL if c in df.columns] + [c for c in df.columns if c not in CANONICAL]
    return df.select(ordered)


def _with_keys(df: pl.DataFrame, seen: dict[str, int], start: int) -> pl.DataFrame:
    """``_key`` = ``source:id`` (``~n`` for the n-th repeat of an id) and ``_ord``, across chunks."""
    keys = []
    for src, id_ in zip(df["source"].to_list(), df["id"].to_list()):
        k = f"{src}:{id_}"
        n = seen.get(k, 0)
        seen[k] = n + 1
        keys.append(f"{k}~{n}" if n else k)
    return df.with_columns(
        pl.Series(KEY_COL, keys, dtype=pl.String),
        pl.int_range(start, start + df.height, dtype=pl.Int64).alias(ORDER_COL),
    )


SOURCE_VERSION = "1"
CHUNK_BYTES = 4 << 20  # JSONL is cut into ~4 MiB chunks at line ends: appends touch only the tail


def _jsonl_ranges(
    path: str, known: list[list[Any]] | None, ahead: Callable[[int, int, str], None] | None = None,
) -> Iterator[tuple[int, int, str]]:
    """``(start, end, xxh3)`` byte ranges of a JSONL file, each ending at a line end.

    Ranges the previous run recorded (``known``) are kept while their bytes still match, so
    appending lines to a file leaves every earlier chunk, the old last one included, as it was:
    the new lines become new chunks and only they are parsed. The rest is cut into
    ~``CHUNK_BYTES`` pieces at the last newline inside each window.

    The recorded chunks are checked in threads (xxhash releases the GIL), and meanwhile the
    bytes after them are cut and handed to ``ahead`` (to be parsed while the check runs: if the
    check fails they are cut again from the first changed chunk, and what ``ahead`` made of the
    first cut is left unused).
    """
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)

        def cut(pos: int) -> Iterator[tuple[int, int, str]]:
            while pos < size:
                if size - pos <= CHUNK_BYTES:
                    end = size
                else:
                    at = mm.rfind(b"\n", pos, pos + CHUNK_BYTES)
                    if at < 0:  # a line longer than a chunk: cut after it
                        at = mm.find(b"\n", pos + CHUNK_BYTES)
                    end = size if at < 0 else at + 1
                yield pos, end, xxhash.xxh3_128_hexdigest(view[pos:end])
                pos = end

        try:
            pos = 0
            sound = []  # the recorded chunks that still tile the file's start, ending at line ends
            for start, end, digest in known or []:
                if start != pos or end > size or mm[end - 1] != 0x0A:
                    break
                sound.append((start, end, digest))
                pos = end
            # their bytes are checked in parallel: a big file's check is bound by memory
            # bandwidth, not one core
            with ThreadPoolExecutor(max(1, min(len(sound), os.cpu_count() or 1))) as pool:
                digests = pool.map(lambda c: xxhash.xxh3_128_hexdigest(view[c[0]:c[1]]), sound)
                # the common case: the recorded chunks are unchanged, and the rest is cut now
                rest = list(cut(pos)) if sound else []
                if ahead is not None:
                    for r in rest:
                        ahead(*r)
                pos = 0
                for (start, end, digest), now in zip(sound, digests):
                    if now != digest:
                        break
                    yield start, end, digest
                    pos = end
            if sound and pos == sound[-1][1]:
                yield from rest
            else:
                yield from cut(pos)
        finally:
            view.release()


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


def _spec_chunks(
    spec: Any, base: Path, index: int, cache: Any = None, ahead: Callable[[str, Any], None] | None = None,
) -> Iterator[tuple[str, Any]]:
    """(content digest, loader) per chunk of one source entry; loaders run only on cache misses.

    With a frame ``cache``, each JSONL file's chunk boundaries are recorded in it and reused by
    the next run (see :func:`_jsonl_ranges`); ``ahead`` gets the chunks after the recorded ones
    early, while those are being checked."""
    spec_fp = digest_of(SOURCE_VERSION, spec.model_dump(mode="json"))
    where = f"source[{index}]"
    if spec.hf:
        try:
            ds = _hf_dataset(spec, base)
        except Exception as e:
            raise SourceError(f"{where}: cannot load Hugging Face dataset {spec.hf!r}: {e}") from None
        for i, batch in enumerate(ds.data.table.to_batches(max_chunksize=CHUNK_ROWS)):
            yield digest_of(spec_fp, "hf", getattr(ds, "_fingerprint", spec.hf), i), (lambda b=batch: pl.from_arrow(b))
        return
    pattern = spec.path if Path(spec.path).is_absolute() else str(base / spec.path)
    paths = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    missing = [p for p in paths if not Path(p).exists()]
    if not paths or missing:
        raise SourceError(f"{where}.path: no such file: {spec.path} (looked for {missing[0] if missing else pattern})")
    for path in paths:
        if path.endswith((".jsonl", ".json", ".ndjson")):
            index_name = f"jsonl-index-{digest_of(spec_fp, os.path.abspath(path))}"
            known = (cache.get_meta(index_name) or {}).get("chunks") if cache is not None else None
            ranges = []

            def chunk(start: int, end: int, xxh: str, path: str = path) -> tuple[str, Any]:
                return (
                    digest_of(spec_fp, "jsonl", xxh),
                    (lambda: pl.read_ndjson(io.BytesIO(_read_range(path, start, end)), infer_schema_length=None)),
                )

            early = (lambda a, b, x: ahead(*chunk(a, b, x))) if ahead is not None else None
            for start, end, xxh in _jsonl_ranges(path, known, early):
                ranges.append([start, end, xxh])
                yield chunk(start, end, xxh)
            if cache is not None:
                cache.put_meta(index_name, {"path": os.path.abspath(path), "chunks": ranges})
        elif path.endswith(".parquet"):
            st = os.stat(path)
            pf = pq.ParquetFile(path)
            for i, batch in enumerate(pf.iter_batches(batch_size=CHUNK_ROWS)):
                yield digest_of(spec_fp, "parquet", os.path.abspath(path), st.st_size, st.st_mtime_ns, i), (lambda b=batch: pl.from_arrow(b))
        else:
            raise SourceError(f"{where}.path: {path}: unsupported file type (use .jsonl or .parquet, or `hf:`)")


def _spec_label(spec: Any, base: Path) -> str:
    """The ``source`` column value: ``name``, else the dataset / first file's stem."""
    if spec.name:
        return str(spec.name)
    if spec.hf:
        return spec.hf.rstrip("/").rsplit("/", 1)[-1]
    pattern = spec.path if Path(spec.path).is_absolute() else str(base / spec.path)
    paths = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    return Path(paths[0] if paths else pattern).name.split(".")[0]


def source_parts(specs: list[Any], base: Path, cache: Any) -> list[Any]:
    """Every source entry as content-addressed frame parts (parsed only when new), in order.

    ``_key`` is ``<source>:<id>``; the n-th repeat of a key (in source order) gets ``~n``.
    """
    from tracepipe.pipeline.frames import read_parts

    parts = []
    for i, spec in enumerate(specs):
        where = f"source[{i}]"
        label = _spec_label(spec, base)
        remaining = spec.limit

        def make(digest: str, load: Any, head: int | None = None, where: str = where, label: str = label, spec: Any = spec) -> Any:
            """The chunk's part (its first ``head`` rows): from the cache, else loaded, transformed
            and cached."""
            part = cache.get(digest)
            if part is None:
                try:
                    df = load()
                except Exception as e:
                    raise SourceError(f"{where}: cannot read {spec.path or spec.hf}: {type(e).__name__}: {e}") from None
                if head is not None:
                    df = df.head(head)
                df = _transform(df, spec, where, label)
                df = _order_columns(df).with_columns(
                    pl.concat_str([pl.col("source"), pl.lit(":"), pl.col("id")]).alias(KEY_COL)
                )
                part = cache.put(digest, df, {"kind": "source"})
            return part

        # without a limit a chunk's part depends on its bytes alone: new chunks are made while
        # the recorded ones are checked
        for digest, load in _spec_chunks(spec, base, i, cache, ahead=make if remaining is None else None):
            if remaining is not None and remaining <= 0:
                break
            if remaining is not None:
                digest = digest_of(digest, "limit", remaining)
            part = make(digest, load, remaining)
            if remaining is not None:
                remaining -= part.rows
            parts.append(part)
    if not parts:
        raise SourceError("source: no rows")
    if _keys_repeat(parts, cache):
        keys = read_parts(parts, [KEY_COL])
        occ = keys.select(pl.int_range(pl.len()).over(KEY_COL).alias("occ"))["occ"]
        bounds = [0]
        for p in parts:
            bounds.append(bounds[-1] + p.rows)
        fixed = []
        for j, p in enumerate(parts):
            o = occ.slice(bounds[j], p.rows)
            if o.max() in (None, 0):
                fixed.append(p)
                continue
            digest = digest_of(p.digest, "repeat-keys", o.to_list())
            part = cache.get(digest)
            if part is None:
                df = pl.read_parquet(p.path)
                df = df.with_columns(
                    pl.when(o > 0).then(pl.col(KEY_COL) + pl.lit("~") + o.cast(pl.String)).otherwise(pl.col(KEY_COL)).alias(KEY_COL)
                )
                part = cache.put(digest, df, {"kind": "source"})
            fixed.append(part)
        parts = fixed
    return parts


def _keys_repeat(parts: list[Any], cache: Any) -> bool:
    """Whether a ``_key`` occurs twice among the parts.

    Repeats are rare, so this looks for repeated 64-bit key hashes (a repeat of a hash sends the
    caller to compare the strings). The hashes of the last check are kept in the cache (as
    sorted runs, :class:`~tracepipe.pipeline.hashruns.HashRuns`): when this run's parts extend
    that run's (an append), only the new parts' keys are read, looked up and added.
    """
    import numpy as np

    from tracepipe.pipeline.frames import read_parts
    from tracepipe.pipeline.hashruns import HashRuns

    def hashes(ps: list[Any]) -> np.ndarray:
        keys = read_parts(ps, [KEY_COL]) if len(ps) > 1 else cache.read(ps[0], [KEY_COL])  # one new part: just written
        return np.sort(keys[KEY_COL].hash(seed=0x51).to_numpy())

    def repeats(sorted_h: np.ndarray) -> bool:
        return bool(len(sorted_h) > 1 and (sorted_h[1:] == sorted_h[:-1]).any())

    name = f"source-key-hashes-{SOURCE_VERSION}"
    last = cache.get_meta(name) or {}
    cur = [p.digest for p in parts]
    old_parts = list(last.get("parts") or [])
    prev = HashRuns.from_meta(cache, name, last)
    if prev is not None and old_parts and cur[: len(old_parts)] == old_parts:
        if len(parts) == len(old_parts):
            return False  # checked last run
        new = hashes(parts[len(old_parts):])
        if repeats(new) or bool(prev.contains(new).any()):
            return True
    else:
        prev = HashRuns(cache, name)
        new = hashes(parts)
        if repeats(new):
            return True
    prev.add(new)
    cache.put_meta(name, {"parts": cur, **prev.meta()})
    return False


def load_sources(specs: list[Any], base: Path) -> pl.DataFrame:
    """All source entries in memory, with ``_key`` and ``_ord`` (small sources, tests)."""
    seen: dict[str, int] = {}
    frames = []
    n = 0
    for i, spec in enumerate(specs):
        for chunk in iter_source(spec, base, i):
            chunk = _with_keys(_order_columns(chunk), seen, n)
            n += chunk.height
            frames.append(chunk)
    df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    return _order_columns(df)
