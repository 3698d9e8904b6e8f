"""Evaluation benchmarks shipped with tracepipe, addressable by name, plus user-supplied files.

Shipped (``tracepipe/data/benchmarks/``, licences alongside): ``math500``, ``aime24``, ``amc23``,
``gsm8k_test``, ``humaneval``. A user benchmark is ``{path: file.jsonl|.parquet, field: column}``
with optional ``id:`` (column holding item ids; default: row number) and ``name:``.

:func:`load_benchmarks` returns one frame (``benchmark``, ``id``, ``text``) and
:func:`benchmarks_digest` a content hash of it, which decontamination puts in its fingerprint so
that editing a benchmark file invalidates cached decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tracepipe.hashing import hash_text

DATA_DIR = Path(__file__).resolve().parent / "data" / "benchmarks"


@dataclass(frozen=True)
class Builtin:
    file: str
    field: str
    id: str | None  # column with the item id; None: row number


BUILTIN: dict[str, Builtin] = {
    "math500": Builtin("math500.jsonl", "problem", "unique_id"),
    "aime24": Builtin("aime24.jsonl", "problem", "id"),
    "amc23": Builtin("amc23.jsonl", "problem", "id"),
    "gsm8k_test": Builtin("gsm8k_test.jsonl", "question", None),
    "humaneval": Builtin("humaneval.jsonl", "prompt", "task_id"),
}


class BenchmarkFile(BaseModel):
    """A user benchmark: a JSONL / Parquet file and the column holding the item text."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description=".jsonl / .parquet file, relative to the recipe")
    field: str = Field(..., description="column with the benchmark item text")
    id: str | None = Field(None, description="column with item ids (default: row number)")
    name: str | None = Field(None, description="label reported in `contam_benchmark` (default: file stem)")


BenchmarkSpec = str | BenchmarkFile


def known_benchmarks() -> list[str]:
    return sorted(BUILTIN)


def check_name(name: str) -> str:
    if name not in BUILTIN:
        raise ValueError(f"unknown benchmark {name!r}; shipped benchmarks: {', '.join(known_benchmarks())} "
                         "(or give a file: {path: ..., field: ...})")
    return name


def _read(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    return pl.read_ndjson(path, infer_schema_length=None)


def load_benchmark(spec: BenchmarkSpec, base_dir: Path | None = None) -> pl.DataFrame:
    """One benchmark as (``benchmark``, ``id``, ``text``); ids are strings."""
    if isinstance(spec, str):
        b = BUILTIN[check_name(spec)]
        path, field, id_col, name = DATA_DIR / b.file, b.field, b.id, spec
    else:
        path = Path(spec.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        field, id_col, name = spec.field, spec.id, spec.name or path.name.split(".")[0]
        if not path.exists():
            raise FileNotFoundError(f"benchmark file not found: {path}")
    df = _read(path)
    for col in (field, id_col):
        if col is not None and col not in df.columns:
            raise ValueError(f"benchmark {name!r} ({path}) has no column {col!r}; it has {df.columns}")
    ids = df.get_column(id_col).cast(pl.String) if id_col else pl.Series([str(i) for i in range(df.height)])
    return pl.DataFrame({
        "benchmark": [name] * df.height,
        "id": ids,
        "text": df.get_column(field).cast(pl.String),
    }, schema={"benchmark": pl.String, "id": pl.String, "text": pl.String}).filter(pl.col("text").is_not_null())


def load_benchmarks(specs: list[BenchmarkSpec], base_dir: Path | None = None) -> pl.DataFrame:
    frames = [load_benchmark(s, base_dir) for s in specs]
    if not frames:
        return pl.DataFrame(schema={"benchmark": pl.String, "id": pl.String, "text": pl.String})
    return pl.concat(frames)


def benchmarks_digest(df: pl.DataFrame) -> str:
    """Content hash of loaded benchmark items (names, ids, texts)."""
    parts: list[Any] = []
    for b, i, t in df.iter_rows():
        parts.append(f"{b}\x1f{i}\x1f{t}")
    return hash_text("\x1e".join(parts))
