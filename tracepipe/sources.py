"""Load problems from JSONL, Parquet (files or globs) and Hugging Face datasets.

Output: one Parquet "frame" with the canonical columns (``id``, ``problem``, ``answer``,
``tests``, ``domain``, ``source``) plus every unmapped source column, and the runtime columns
``_key`` (stable row identity) and ``_ord`` (stable order). Presets map well-known datasets.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import xxhash

from tracepipe.pipeline.keys import KEY_COL, ORDER_COL

CANONICAL = ("id", "problem", "answer", "tests", "domain", "source")

_WS = re.compile(r"\s+")


class SourceError(ValueError):
    """A source that cannot be read; the message names the source entry and the file."""


def normalize_text(text: str | None) -> str:
    """Lower-case, fold whitespace: the text hashed for ids and exact dedup."""
    if text is None:
        return ""
    return _WS.sub(" ", text.lower()).strip()


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces."""
    if not text:
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


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
    for io in df["input_output"].to_list():
        try:
            d = json.loads(io) if io else {}
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


def _read_files(paths: list[str]) -> pl.DataFrame:
    frames = []
    for p in paths:
        if p.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
            frames.append(pl.read_ndjson(p, infer_schema_length=None))
        elif p.endswith(".parquet"):
            frames.append(pl.read_parquet(p))
        else:
            raise SourceError(f"{p}: unsupported file type (use .jsonl or .parquet, or `hf:`)")
    return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def _read_hf(spec: Any, base: Path) -> pl.DataFrame:
    import datasets

    local = (base / spec.hf) if not Path(spec.hf).is_absolute() else Path(spec.hf)
    if local.is_dir() and (local / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(local))
    elif local.is_dir() and (local / "state.json").exists():
        ds = datasets.load_from_disk(str(local))
    else:
        ds = datasets.load_dataset(str(local) if local.exists() else spec.hf, name=spec.config, split=spec.split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[spec.split or "train"]
    return pl.from_arrow(ds.data.table)  # type: ignore[return-value]


def load_source(spec: Any, base: Path, index: int) -> pl.DataFrame:
    """Read one ``source[i]`` entry into canonical columns."""
    where = f"source[{index}]"
    if spec.hf:
        label = spec.name or spec.hf.rstrip("/").rsplit("/", 1)[-1]
        try:
            df = _read_hf(spec, base)
        except Exception as e:
            raise SourceError(f"{where}: cannot load Hugging Face dataset {spec.hf!r}: {e}") from None
    else:
        pattern = spec.path if Path(spec.path).is_absolute() else str(base / spec.path)
        paths = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        missing = [p for p in paths if not Path(p).exists()]
        if not paths or missing:
            raise SourceError(f"{where}.path: no such file: {spec.path} (looked for {missing[0] if missing else pattern})")
        label = spec.name or Path(paths[0]).name.split(".")[0]
        try:
            df = _read_files(paths)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{where}: cannot read {spec.path}: {e}") from None

    preset = PRESETS.get(spec.preset) if spec.preset else {}
    if spec.preset and preset is None:
        raise SourceError(f"{where}.preset: unknown preset {spec.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if spec.limit is not None:
        df = df.head(spec.limit)
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
        values = [_num_to_str(v) if not isinstance(v, str) else v for v in df["answer"].to_list()]
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
    df = df.with_columns(pl.lit(domain).alias("domain"), pl.lit(label).alias("source"))
    df = df.with_columns(pl.col("problem").cast(pl.String))
    if "id" in df.columns:
        df = df.with_columns(pl.col("id").cast(pl.String))
        null_ids = df["id"].is_null()
    else:
        null_ids = None
    hashed = pl.Series("h", [xxhash.xxh3_64_hexdigest(normalize_text(p).encode()) for p in df["problem"].to_list()])
    if null_ids is None:
        df = df.with_columns(hashed.alias("id"))
    else:
        df = df.with_columns(pl.when(null_ids).then(hashed).otherwise(pl.col("id")).alias("id"))
    return df


def load_sources(specs: list[Any], base: Path) -> pl.DataFrame:
    """All source entries, concatenated in recipe order, with ``_key`` and ``_ord``."""
    frames = [load_source(s, base, i) for i, s in enumerate(specs)]
    df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    ordered = [c for c in CANONICAL if c in df.columns] + [c for c in df.columns if c not in CANONICAL]
    df = df.select(ordered)
    occ = df.select(pl.int_range(pl.len()).over("source", "id").alias("occ"))["occ"]
    key = pl.concat_str([pl.col("source"), pl.lit(":"), pl.col("id")])
    df = df.with_columns(
        pl.when(occ > 0).then(key + pl.lit("~") + occ.cast(pl.String)).otherwise(key).alias(KEY_COL),
    ).with_row_index(ORDER_COL)
    return df.with_columns(pl.col(ORDER_COL).cast(pl.Int64))
