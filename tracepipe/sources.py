"""Load problems from JSONL, Parquet (files or globs) and Hugging Face datasets.

Output: one Parquet "frame" with the canonical columns (``id``, ``problem``, ``answer``,
``tests``, ``domain``, ``source``) plus every unmapped source column, and the runtime columns
``_key`` (stable row identity) and ``_ord`` (stable order). Presets map well-known datasets.

A bad line (malformed JSON, not UTF-8, a problem that is null or not text, a line over
``max_row_bytes``) does not stop the read: it is kept aside with its file, line and reason
(:class:`Sources` ``.bad``), or raised as :class:`BadSourceLine` under ``on_bad_line: error``.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import xxhash

from tracepipe.contract import ERROR_COL, KEY_COL, ORDER_COL
from tracepipe.errors import BadSourceLine, SourceError
from tracepipe.pipeline.frames import FrameCache, Part, digest_of
from tracepipe.verifiers.math import last_boxed  # one extractor for gold and predicted answers

CANONICAL = ("id", "problem", "answer", "tests", "domain", "source")

_WS = re.compile(r"\s+")


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
    # problem_field: the column a preset's `fn` makes the problem of (checked for null / non-text)
    "humaneval": {"fn": _humaneval, "domain": "code", "problem_field": "prompt"},
    "mbpp": {"fn": _mbpp, "domain": "code", "problem_field": "text"},
    "apps": {"fn": _apps, "domain": "code", "problem_field": "question"},
    "codecontests": {"fn": _codecontests, "domain": "code", "problem_field": "description"},
    "openthoughts": {"fn": _openthoughts, "domain": "math"},
}


CHUNK_ROWS = 20_000


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
        raise SourceError(f"{where}.columns: source has no column(s) {absent}; it has {_source_columns(df)}")
    if mapping:
        df = df.with_columns([pl.col(src).alias(dst) for dst, src in mapping.items()])
    if "problem" not in df.columns:
        raise SourceError(f"{where}: no `problem` column; map one with `columns: {{problem: <source column>}}` (have {_source_columns(df)})")

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


def _source_columns(df: pl.DataFrame) -> list[str]:
    """The columns a source has (for messages): without the reader's own ``POS_COL``."""
    return [c for c in df.columns if c != POS_COL]


def normalized_expr(col: str) -> pl.Expr:
    """Vectorized :func:`normalize_text`."""
    return pl.col(col).cast(pl.String).fill_null("").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _order_columns(df: pl.DataFrame) -> pl.DataFrame:
    ordered = [c for c in CANONICAL if c in df.columns] + [c for c in df.columns if c not in CANONICAL]
    return df.select(ordered)


SOURCE_VERSION = "2"  # 2: bad lines left out of the parts, counted in their sidecars
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

        def digest_of_range(a: int, b: int) -> str:
            """The bytes' hash; then their pages leave this process (the file stays in the page
            cache), so a big file never sits in the run's resident memory."""
            d = xxhash.xxh3_128_hexdigest(view[a:b])
            lo = a - a % mmap.PAGESIZE
            if hasattr(mm, "madvise") and b > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, b - lo)
            return d

        def cut(pos: int) -> Iterator[tuple[int, int, str]]:
            while pos < size:
                if size - pos <= CHUNK_BYTES:
                    end = size
                else:
                    at = mm.rfind(b"\n", pos, pos + CHUNK_BYTES)
                    if at < 0:  # a line longer than a chunk: cut after it
                        at = mm.find(b"\n", pos + CHUNK_BYTES)
                    end = size if at < 0 else at + 1
                yield pos, end, digest_of_range(pos, end)
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
                digests = pool.map(lambda c: digest_of_range(c[0], c[1]), sound)
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


# -- bad lines: found per chunk, kept with the chunk's part, reported with file and line -------
RAW_CHARS = 200  # `raw` keeps this many characters of a bad line
POS_COL = "_source_pos"  # a row's position in its chunk (line, or row for Parquet), while it is read
BAD_SCHEMA = {"file": pl.String, "line": pl.Int64, ERROR_COL: pl.String, "raw": pl.String}
_CHUNK_BAD_SCHEMA = {POS_COL: pl.Int64, ERROR_COL: pl.String, "raw": pl.String}
# what polars makes of a number, boolean, list or object in a column it otherwise reads as text
_COERCED = r"(?s)^(?:-?\d[\d.eE+-]*|true|false|\[.*\]|\{.*\})$"
_BLANK = np.array([9, 10, 13, 32], dtype=np.uint8)


@dataclass
class Sources:
    """What :func:`load_sources` read.

    ``parts``: the good rows as frame parts, in source order (what :func:`source_parts` returns);
    ``bad``: one row per bad line, columns ``file``, ``line`` (1-based line, or the 0-based row
    index for Parquet / Hugging Face), ``_error`` (the reason) and ``raw`` (the line's first
    200 characters); ``rows_read``: good rows plus bad lines."""

    parts: list[Part]
    bad: pl.DataFrame
    rows_read: int


@dataclass
class _Raw:
    """One chunk as read: ``df`` its rows (``POS_COL`` = position in the chunk), ``bad`` the lines
    that are not rows (position, reason, raw text), ``lines`` how many lines / rows it spans (the
    next chunk's first line number), ``snippet`` the raw text at positions (for rows found bad
    later)."""

    df: pl.DataFrame
    bad: list[tuple[int, str, str]]
    lines: int
    snippet: Callable[[list[int]], list[str]]


def _size(n: int) -> str:
    """``8 MiB``, ``64 KiB`` or ``1000 bytes``: how a ``max_row_bytes`` limit is written."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _snippet(line: bytes) -> str:
    """The first ``RAW_CHARS`` characters of a line, undecodable bytes replaced."""
    return line[: RAW_CHARS * 4].decode("utf-8", errors="replace").rstrip("\r")[:RAW_CHARS]


def _line_count(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, newline left out) byte offsets of every line of ``data``."""
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(data)]))
    return (starts[:-1], ends[:-1]) if data.endswith(b"\n") else (starts, ends)


def _row_positions(data: bytes, height: int) -> np.ndarray | None:
    """The line of each row polars read from ``data`` (it skips blank lines), or None when the
    rows and the non-blank lines do not pair up."""
    if _line_count(data) == height:
        return np.arange(height)
    starts, ends = _line_bounds(data)
    ink = np.concatenate(([0], np.cumsum(~np.isin(np.frombuffer(data, dtype=np.uint8), _BLANK))))
    pos = np.flatnonzero(ink[ends] - ink[starts] > 0)
    return pos if len(pos) == height else None


def _fits(data: bytes, max_row_bytes: int) -> bool:
    """Whether no line of ``data`` is longer than ``max_row_bytes`` (checked only when the chunk
    itself is)."""
    if len(data) <= max_row_bytes:
        return True
    starts, ends = _line_bounds(data)
    return int((ends - starts).max()) <= max_row_bytes


def _maybe_coerced(df: pl.DataFrame, field: str | None) -> bool:
    """Whether polars may have changed the JSON type of a ``field`` value: it reads a column of
    mixed types as strings (``42`` as ``"42"``) and mixed numbers as floats. Such a chunk (a
    text value that looks like a number, list or object, or a column that is not text) goes to
    the line-by-line check, which sees and names the JSON types."""
    if field is None or field not in df.columns or df.schema[field] == pl.Null:
        return False
    if df.schema[field] != pl.String:
        return True
    return bool(df.get_column(field).str.contains(_COERCED).any())


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _line_problem(line: bytes, field: str | None, max_row_bytes: int) -> str | None:
    """Why one JSONL line cannot be a row (None when it can). A null or missing problem is left to
    the column check, which sees it the same way in every source type."""
    if len(line) > max_row_bytes:
        return f"row of {len(line) / 1e6:.1f} MB is over max_row_bytes {_size(max_row_bytes)}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        return f"malformed JSON: {e}"
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    value = obj.get(field) if field else None
    if value is not None and not isinstance(value, str):
        return f"problem is not text ({type(value).__name__})"
    return None


def _read_good_lines(good: list[bytes], pos: list[int], bad: list[tuple[int, str, str]]) -> pl.DataFrame:
    """The lines that passed ``json.loads`` as one frame. Should polars still refuse them (a string
    it cannot take), the lines it refuses one by one move to ``bad``; a conflict between rows'
    types, which no single line causes, is raised."""
    if not good:
        return pl.DataFrame({POS_COL: pl.Series([], dtype=pl.Int64)})
    try:
        df = pl.read_ndjson(io.BytesIO(b"\n".join(good)), infer_schema_length=None)
    except Exception as e:
        refused = []
        for i, line in enumerate(good):
            try:
                pl.read_ndjson(io.BytesIO(line))
            except Exception as one:
                refused.append(i)
                bad.append((pos[i], f"unreadable row: {type(one).__name__}: {one}", _snippet(line)))
        if not refused:
            raise e
        keep = sorted(set(range(len(good))) - set(refused))
        return _read_good_lines([good[i] for i in keep], [pos[i] for i in keep], bad)
    return df.with_columns(pl.Series(POS_COL, pos, dtype=pl.Int64))


def _jsonl_raw(data: bytes, field: str | None, max_row_bytes: int) -> _Raw:
    """One JSONL chunk: polars reads it whole (the fast path); only when that fails, a line may be
    over ``max_row_bytes``, or polars may have read a non-text ``field`` as text, is the chunk
    parsed line by line with ``json.loads`` to find exactly the bad lines."""

    def snippet(positions: list[int]) -> list[str]:
        starts, ends = _line_bounds(data)
        return [_snippet(data[starts[p] : ends[p]]) for p in positions]

    lines = _line_count(data)
    if _fits(data, max_row_bytes):
        try:
            df: pl.DataFrame | None = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        except Exception:
            df = None
        if df is not None and not _maybe_coerced(df, field):
            pos = _row_positions(data, df.height)
            if pos is not None:
                return _Raw(df.with_columns(pl.Series(POS_COL, pos, dtype=pl.Int64)), [], lines, snippet)
    good: list[bytes] = []
    at: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        reason = _line_problem(line, field, max_row_bytes)
        if reason is None:
            good.append(line)
            at.append(i)
        else:
            bad.append((i, reason, _snippet(line)))
    df = _read_good_lines(good, at, bad)  # may move more lines to `bad`
    return _Raw(df, sorted(bad), lines, snippet)


def _table_raw(df: pl.DataFrame) -> _Raw:
    """One Parquet / Hugging Face batch: a row's position is its index in the batch."""

    def snippet(positions: list[int]) -> list[str]:
        return [json.dumps(df.row(p, named=True), default=str, ensure_ascii=False)[:RAW_CHARS] for p in positions]

    return _Raw(df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias(POS_COL)), [], df.height, snippet)


def _problem_field(spec: Any) -> str | None:
    """The source column that becomes ``problem`` (checked for null and non-text values before
    the mapping), or None when a preset builds it from several columns."""
    preset = PRESETS.get(spec.preset or "") or {}
    mapping = {**preset.get("columns", {}), **(spec.columns or {})}
    if "problem" in mapping:
        return str(mapping["problem"])
    return preset.get("problem_field", None if "fn" in preset else "problem")


def _problem_rows(df: pl.DataFrame, field: str | None) -> tuple[pl.DataFrame, list[int], list[str]]:
    """``df`` without the rows whose ``field`` is null or not text, and those rows' positions and
    reasons (``problem is null``, ``problem is not text (int)``)."""
    if field is None or field not in df.columns or df.height == 0:
        return df, [], []
    col = df.get_column(field)
    text = col.dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(col.dtype, pl.Enum)
    mask = col.is_null() if text else pl.Series(np.ones(df.height, dtype=bool))
    if not mask.any():
        return df, [], []
    sel = df.filter(mask)
    reasons = ["problem is null" if v is None else f"problem is not text ({type(v).__name__})" for v in sel[field].to_list()]
    return df.filter(~mask), sel[POS_COL].to_list(), reasons


def _clean(raw: _Raw, spec: Any, where: str, label: str, head: int | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A chunk's good rows in canonical columns with ``_key`` (at most ``head``), and its bad rows
    (position, reason, raw): lines that are not rows, and rows whose problem is null or not text
    (checked before the mapping, where the source's own types are seen, and after it, for
    presets that build the problem)."""
    df, pos, reasons = _problem_rows(raw.df, _problem_field(spec))
    if df.height:
        df = _transform(df, spec, where, label)
        nulls = df.get_column("problem").is_null()
        if nulls.any():
            after = df.filter(nulls)[POS_COL].to_list()
            pos, reasons = pos + after, reasons + ["problem is null"] * len(after)
            df = df.filter(~nulls)
    else:
        df = pl.DataFrame(schema={**{c: pl.String for c in CANONICAL}, POS_COL: pl.Int64})
    rows = [*raw.bad, *zip(pos, reasons, raw.snippet(pos))]
    bad = pl.DataFrame(rows, schema=_CHUNK_BAD_SCHEMA, orient="row").sort(POS_COL)
    if head is not None and df.height > head:
        cut = df.get_column(POS_COL)[head]
        df, bad = df.head(head), bad.filter(pl.col(POS_COL) < cut)
    df = _order_columns(df.drop(POS_COL))
    return df.with_columns(pl.concat_str([pl.col("source"), pl.lit(":"), pl.col("id")]).alias(KEY_COL)), bad


class _ChunkRef(NamedTuple):
    """One chunk of a source entry: content digest, loader (run only on a cache miss), the file it
    is in, and whether positions in it are lines (JSONL, reported 1-based) or row indices."""

    digest: str
    load: Callable[[], _Raw]
    file: str
    lines: bool


def _spec_chunks(
    spec: Any, base: Path, index: int, cache: Any = None, ahead: Callable[[_ChunkRef], Any] | None = None,
) -> Iterator[_ChunkRef]:
    """The chunks of one source entry, in order.

    With a frame ``cache``, each JSONL file's chunk boundaries are recorded in it and reused by
    the next run (see :func:`_jsonl_ranges`); ``ahead`` gets the chunks after the recorded ones
    early, while those are being checked."""
    # on_bad_line changes what is reported, never a chunk's rows
    spec_fp = digest_of(SOURCE_VERSION, spec.model_dump(mode="json", exclude={"on_bad_line"}))
    where = f"source[{index}]"
    field = _problem_field(spec)
    if spec.hf:
        try:
            ds = _hf_dataset(spec, base)
        except Exception as e:
            raise SourceError(f"{where}: cannot load Hugging Face dataset {spec.hf!r}: {e}") from None
        for i, batch in enumerate(ds.data.table.to_batches(max_chunksize=CHUNK_ROWS)):
            digest = digest_of(spec_fp, "hf", getattr(ds, "_fingerprint", spec.hf), i)
            yield _ChunkRef(digest, lambda b=batch: _table_raw(pl.from_arrow(b)), spec.hf, False)  # type: ignore[misc, arg-type]
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

            def chunk(start: int, end: int, xxh: str, path: str = path) -> _ChunkRef:
                load = lambda: _jsonl_raw(_read_range(path, start, end), field, spec.max_row_bytes)  # noqa: E731
                return _ChunkRef(digest_of(spec_fp, "jsonl", xxh), load, path, True)

            early = (lambda a, b, x: ahead(chunk(a, b, x))) if ahead is not None else None
            for start, end, xxh in _jsonl_ranges(path, known, early):
                ranges.append([start, end, xxh])
                yield chunk(start, end, xxh)
            if cache is not None:
                cache.put_meta(index_name, {"path": os.path.abspath(path), "chunks": ranges})
        elif path.endswith(".parquet"):
            st = os.stat(path)
            pf = pq.ParquetFile(path)
            for i, batch in enumerate(pf.iter_batches(batch_size=CHUNK_ROWS)):
                digest = digest_of(spec_fp, "parquet", os.path.abspath(path), st.st_size, st.st_mtime_ns, i)
                yield _ChunkRef(digest, lambda b=batch: _table_raw(pl.from_arrow(b)), path, False)  # type: ignore[misc, arg-type]
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


_NO_BAD = pl.DataFrame(schema=_CHUNK_BAD_SCHEMA)


def _chunk_part(ref: _ChunkRef, head: int | None, *, cache: Any, spec: Any, where: str, label: str) -> tuple[Part, pl.DataFrame]:
    """A chunk's part (its first ``head`` good rows) and its bad rows (chunk position, reason,
    raw): from the cache, else read, checked, transformed and cached. The bad rows are cached as
    a frame of their own, before the part whose sidecar counts them (``bad``) beside the lines the
    chunk spans (``lines``), so a rerun that finds the part reports the same bad lines."""
    part = cache.get(ref.digest)
    if part is not None and "lines" in part.meta:
        if not part.meta.get("bad"):
            return part, _NO_BAD
        kept = cache.get(digest_of(ref.digest, "bad"))
        if kept is not None:
            return part, cache.read(kept)
    try:
        raw = ref.load()
        df, bad = _clean(raw, spec, where, label, head)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{where}: cannot read {ref.file}: {type(e).__name__}: {e}") from None
    if bad.height:
        cache.put(digest_of(ref.digest, "bad"), bad, {"kind": "source-bad"})
    return cache.put(ref.digest, df, {"kind": "source", "lines": raw.lines, "bad": bad.height}), bad


def _locate(bad: pl.DataFrame, ref: _ChunkRef, offset: int, on_bad_line: str) -> pl.DataFrame:
    """A chunk's bad rows with their file and line (chunk position + the lines before the chunk,
    1-based for JSONL; the row index for tables); under ``on_bad_line: error``, the first raises
    :class:`BadSourceLine`."""
    first = offset + (1 if ref.lines else 0)
    out = bad.select(pl.lit(ref.file, dtype=pl.String).alias("file"), (pl.col(POS_COL) + first).alias("line"), ERROR_COL, "raw")
    if on_bad_line == "error":
        row = out.row(0, named=True)
        raise BadSourceLine(row["file"], row["line"], row[ERROR_COL], row_index=not ref.lines)
    return out


def _load_spec(spec: Any, base: Path, index: int, cache: Any) -> tuple[list[Part], list[pl.DataFrame]]:
    """One source entry: its parts with rows, in order, and its bad rows located in their files."""
    where = f"source[{index}]"
    make = partial(_chunk_part, cache=cache, spec=spec, where=where, label=_spec_label(spec, base))
    remaining = spec.limit
    parts: list[Part] = []
    bads: list[pl.DataFrame] = []
    file, offset = "", 0
    # without a limit a chunk's part depends on its bytes alone: new chunks are made while the
    # recorded ones are checked
    for ref in _spec_chunks(spec, base, index, cache, ahead=(lambda r: make(r, None)) if remaining is None else None):
        if remaining is not None:
            if remaining <= 0:
                break
            ref = ref._replace(digest=digest_of(ref.digest, "limit", remaining))
        part, bad = make(ref, remaining)
        if ref.file != file:
            file, offset = ref.file, 0
        if bad.height:
            bads.append(_locate(bad, ref, offset, spec.on_bad_line))
        offset += int(part.meta["lines"])
        if remaining is not None:
            remaining -= part.rows
        if part.rows:
            parts.append(part)
    return parts, bads


@overload
def load_sources(specs: list[Any], base_dir: Path) -> pl.DataFrame: ...


@overload
def load_sources(specs: list[Any], base_dir: Path, cache: FrameCache) -> Sources: ...


def load_sources(specs: list[Any], base_dir: Path, cache: FrameCache | None = None) -> Sources | pl.DataFrame:
    """Every source entry, in order, with its bad lines kept aside (or raised, per entry, under
    ``on_bad_line: error`` as :class:`BadSourceLine`).

    With a frame ``cache``: a :class:`Sources` (content-addressed parts, parsed only when new;
    ``_key`` is ``<source>:<id>``, ``~n`` for the n-th repeat of a key in source order). Without
    one: the good rows as one in-memory frame with ``_key`` and ``_ord`` (small sources, tests)."""
    if cache is None:
        return _load_frame(specs, base_dir)
    parts: list[Part] = []
    bads: list[pl.DataFrame] = []
    for i, spec in enumerate(specs):
        p, b = _load_spec(spec, base_dir, i, cache)
        parts += p
        bads += b
    bad = pl.concat(bads) if bads else pl.DataFrame(schema=BAD_SCHEMA)
    if not parts:
        first = f"; first: {bad['file'][0]}:{bad['line'][0]}: {bad[ERROR_COL][0]}" if bad.height else ""
        raise SourceError(f"source: no rows ({bad.height} bad line(s){first})" if bad.height else "source: no rows")
    return Sources(_distinct_keys(parts, cache), bad, sum(p.rows for p in parts) + bad.height)


def source_parts(specs: list[Any], base: Path, cache: Any) -> list[Part]:
    """The good rows of :func:`load_sources` as frame parts (bad lines left out)."""
    return load_sources(specs, base, cache).parts


def _load_frame(specs: list[Any], base: Path) -> pl.DataFrame:
    """:func:`load_sources` through a throwaway frame cache, read into one frame with ``_ord``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tracepipe-sources-") as tmp:
        parts = load_sources(specs, base, FrameCache(Path(tmp))).parts
        df = pl.concat([pl.read_parquet(p.path) for p in parts], how="diagonal_relaxed")
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias(ORDER_COL))


def _distinct_keys(parts: list[Part], cache: Any) -> list[Part]:
    """``parts`` with ``~n`` added to the n-th repeat of a ``_key`` (parts that have one rewritten
    and cached; the rest as they are)."""

    if not _keys_repeat(parts, cache):
        return parts
    # a key's occurrence number, counted over its 128-bit hash (two seeded 64-bit halves), part by
    # part: 16 bytes a row in memory instead of every key string at once
    halves = [cache.read(p, [KEY_COL]).select(pl.col(KEY_COL).hash(seed=0x7A1).alias("h1"),
                                               pl.col(KEY_COL).hash(seed=0x3C5).alias("h2")) for p in parts]
    occ = pl.concat(halves).select(pl.int_range(pl.len()).over("h1", "h2").alias("occ"))["occ"]
    del halves
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
    return fixed


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
