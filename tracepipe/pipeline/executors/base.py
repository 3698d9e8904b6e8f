"""What every executor shares: the stream plan, the committer, error isolation, normalization.

A row stage's missing rows reach an executor as one :class:`RowSource`. Model stages *stream*:
the executor keeps ``calls_in_flight`` calls of ``rows_per_call`` rows running (see
:func:`stream_plan`), so the engine always has more requests than it can run and never drains
between batches. Finished rows go to a :class:`Committer` in completion order, which commits
them as store parts bounded by rows and seconds: a crash (even ``kill -9``) loses only what was
in flight or finished in the last ``part_seconds``, and a rerun asks only for rows not committed.
"""

from __future__ import annotations

import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl

from tracepipe.engines.base import EngineFatalError
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.store import IDX_COL
from tracepipe.stages.base import DROP_COL, ERROR_COL, RowStage

#: most calls a streamed stage keeps in flight (threads blocked on the engine: cheap, not free)
MAX_CALLS_IN_FLIGHT = 1024
BULK_ROWS = 8192  # rows per call on a bulk engine (replay) unless the recipe sets batch_size


@dataclass
class BatchResult:
    """Rows to commit, rows that failed (``_in_key``, ``_error``), and input rows handled."""

    ok: pl.DataFrame
    errors: pl.DataFrame
    n_in: int


class RowSource:
    """A row stage's missing rows: ``total`` rows, handed out in batches of any size."""

    def __init__(self, total: int, batches: Callable[[int], Iterator[pl.DataFrame]]) -> None:
        self.total = total
        self._batches = batches

    def batches(self, size: int) -> Iterator[pl.DataFrame]:
        return self._batches(max(1, size))


@dataclass
class StreamPlan:
    """How an executor feeds a stage: rows per ``process`` call and calls kept in flight."""

    rows_per_call: int
    calls_in_flight: int


def stream_plan(stage: RowStage) -> StreamPlan:
    """Model stages on an engine that runs many requests at once stream a row (a few for wide
    engines) per call, with more calls in flight than the engine's capacity: every unfinished
    call holds at least one unfinished request, so the engine always has work queued behind
    what it runs. Everything else runs in batches of ``rows_per_batch``, one at a time (or in
    the CPU pool)."""
    names = [n for n in stage.engine_names() if n in stage.ctx.engines]
    if names:
        engine = stage.ctx.engine(names[0])
        if engine.bulk:
            return StreamPlan(_bulk_rows(stage), 1)
        cap = engine.capacity()
        if cap > 1:
            # a few rows per call once the engine is wide (less per-call Python for the same
            # work; a call's rows are committed when its slowest one finishes); one row a call
            # under a budget, since an engine reserves a call's worst case all or nothing and a
            # wide call could be refused while one row still fits
            rows = max(1, min(stage.rows_per_batch(), cap // (32 * stage.requests_per_row())))
            if engine.meter().limited():
                rows = 1
            return StreamPlan(rows, min(MAX_CALLS_IN_FLIGHT, cap + max(4, cap // 4)))
    return StreamPlan(stage.rows_per_batch(), 1)


def _bulk_rows(stage: RowStage) -> int:
    """Rows per call on a bulk engine (no model: ``replay``): the stage's ``batch_size`` when the
    recipe sets it, else at least ``BULK_ROWS``. A batch size sized for a model (256 problems)
    would cut a million replayed rows into 4,000 store parts, each paying a commit."""
    params = stage.params
    if "batch_size" in getattr(params, "model_fields_set", ()):
        return stage.rows_per_batch()
    return max(stage.rows_per_batch(), BULK_ROWS)


class Committer:
    """Collects finished rows (completion order) and commits them in parts bounded by rows and
    seconds; thread-safe. ``commit`` is called on the thread that fills or ticks the part."""

    def __init__(self, commit: Callable[[pl.DataFrame], None], part_rows: int, part_seconds: float) -> None:
        self._commit = commit
        self.part_rows = max(1, part_rows)
        self.part_seconds = part_seconds
        self._buf: list[pl.DataFrame] = []
        self._rows = 0  # input rows held
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self.parts = 0

    def __call__(self, res: BatchResult) -> None:
        with self._lock:
            if res.ok.height:
                self._buf.append(res.ok)
            self._rows += res.n_in
            if self._rows >= self.part_rows:
                self._flush()

    def tick(self) -> None:
        """Commit what is held if the oldest of it waited ``part_seconds``."""
        with self._lock:
            if self._buf and time.monotonic() - self._since >= self.part_seconds:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            df = pl.concat(self._buf, how="diagonal_relaxed") if len(self._buf) > 1 else self._buf[0]
            self._commit(df)
            self.parts += 1
        self._buf, self._rows, self._since = [], 0, time.monotonic()


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
    except EngineFatalError:  # the engine refuses everything: no row is to blame
        raise
    except Exception as e:  # noqa: BLE001 - any error of user data / model code is quarantined
        if batch.height == 1:
            return BatchResult(pl.DataFrame(), _error_frame(batch[IN_KEY_COL].to_list(), [_describe(e)]), 1)
        mid = batch.height // 2
        a, b = safe_process(stage, batch.slice(0, mid)), safe_process(stage, batch.slice(mid))
        oks = [r.ok for r in (a, b) if r.ok.height]
        ok = pl.concat(oks, how="diagonal_relaxed") if oks else pl.DataFrame()
        return BatchResult(ok, pl.concat([a.errors, b.errors]), batch.height)


class Executor(ABC):
    """Runs a row stage over its missing rows, handing each result to ``commit`` as it completes."""

    kind: str = ""

    @abstractmethod
    def run_row_stage(
        self,
        stage: RowStage,
        rows: RowSource,
        commit: Committer,
        on_progress: Callable[[BatchResult], None],
    ) -> pl.DataFrame:
        """Process every row; returns the error rows (``_in_key``, ``_error``). Results go to
        ``commit`` (which the caller flushes at the end); call ``commit.tick()`` now and then."""

    def close(self) -> None:
        pass
