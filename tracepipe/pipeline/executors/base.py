"""What every executor shares: error isolation per row and output normalization."""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl

from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.store import IDX_COL
from tracepipe.stages.base import DROP_COL, ERROR_COL, RowStage


@dataclass
class BatchResult:
    """Rows to commit, rows that failed (``_in_key``, ``_error``), and input rows handled."""

    ok: pl.DataFrame
    errors: pl.DataFrame
    n_in: int


def _error_frame(keys: list[str], errors: list[str]) -> pl.DataFrame:
    return pl.DataFrame({IN_KEY_COL: keys, ERROR_COL: errors}, schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


def normalize_output(stage: RowStage, batch: pl.DataFrame, out: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a stage's output into rows to commit and error rows; number outputs per key.

    Input keys with no output row get one dropped row (``<stage>: no output``), so every
    processed key is committed and never recomputed.
    """
    if IN_KEY_COL not in out.columns:
        raise ValueError(f"stage {stage.name!r} returned no `{IN_KEY_COL}` column")
    if DROP_COL not in out.columns:
        out = out.with_columns(pl.lit(None, dtype=pl.String).alias(DROP_COL))
    if ERROR_COL in out.columns:
        failed = out.filter(pl.col(ERROR_COL).is_not_null())
        errors = failed.select(IN_KEY_COL, ERROR_COL).unique(IN_KEY_COL, keep="first", maintain_order=True)
        out = out.filter(pl.col(ERROR_COL).is_null() & ~pl.col(IN_KEY_COL).is_in(errors[IN_KEY_COL].implode())).drop(ERROR_COL)
    else:
        errors = _error_frame([], [])
    seen = set(out[IN_KEY_COL].to_list()) | set(errors[IN_KEY_COL].to_list())
    empty = [k for k in batch[IN_KEY_COL].to_list() if k not in seen]
    if empty:
        filler = pl.DataFrame({IN_KEY_COL: empty, DROP_COL: [f"{stage.name}: no output"] * len(empty)})
        out = pl.concat([out, filler], how="diagonal_relaxed")
    out = out.with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over(IN_KEY_COL).alias(IDX_COL))
    out = out.with_columns(pl.col(DROP_COL).cast(pl.String))
    return out, errors


def safe_process(stage: RowStage, batch: pl.DataFrame) -> BatchResult:
    """Process a batch; if it raises, bisect to quarantine exactly the rows that raise."""
    try:
        out = stage.process(batch)
        ok, errors = normalize_output(stage, batch, out)
        return BatchResult(ok, errors, batch.height)
    except Exception as e:  # noqa: BLE001 - any error of user data / model code is quarantined
        if batch.height == 1:
            return BatchResult(pl.DataFrame(), _error_frame(batch[IN_KEY_COL].to_list(), [_describe(e)]), 1)
        mid = batch.height // 2
        a, b = safe_process(stage, batch.slice(0, mid)), safe_process(stage, batch.slice(mid))
        oks = [r.ok for r in (a, b) if r.ok.height]
        ok = pl.concat(oks, how="diagonal_relaxed") if oks else pl.DataFrame()
        return BatchResult(ok, pl.concat([a.errors, b.errors]), batch.height)


class Executor(ABC):
    """Runs a row stage over batches of missing rows, committing each result as it completes."""

    kind: str = ""

    @abstractmethod
    def run_row_stage(
        self,
        stage: RowStage,
        batches: Iterator[pl.DataFrame],
        commit: Callable[[pl.DataFrame], None],
        on_progress: Callable[[BatchResult], None],
    ) -> pl.DataFrame:
        """Process every batch; returns the error rows (``_in_key``, ``_error``)."""

    def close(self) -> None:
        pass
