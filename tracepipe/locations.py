"""Where a recipe's outputs live: one answer for the writer, the push and the report.

No imports from the rest of tracepipe: :mod:`tracepipe.hub` and :mod:`tracepipe.report` find an
output's directory here without importing the shard writer (``tracepipe.outputs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def output_location(recipe: Any, spec: Any) -> str:
    """The output's directory (absolute local path) or its fsspec URL."""
    if "://" in spec.path and not spec.path.startswith("file://"):
        return spec.path
    p = Path(spec.path.removeprefix("file://")).expanduser()
    return str(p if p.is_absolute() else (Path(recipe.base_dir) / p).resolve())


def rejects_paths(recipe: Any) -> list[str]:
    """The workdir's ``rejects/*.parquet`` of the last run (negatives for DPO, dropped verdicts)."""
    wd = recipe.workdir_path()
    if "://" in wd:
        return []
    d = Path(wd) / "rejects"
    return [str(p) for p in sorted(d.glob("*.parquet"))] if d.is_dir() else []
