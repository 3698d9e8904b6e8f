"""Local executor: model stages stream on threads, CPU-bound stages run in a process pool.

- **Model stages** (an engine that runs many requests at once) keep
  :func:`~tracepipe.pipeline.executors.base.stream_plan`'s calls in flight on a thread pool; a
  finished call is replaced before its rows are committed, so the engine never waits on the
  runtime's bookkeeping.
- **CPU-bound stages** (``cpu_bound = True``) run in ``workers`` spawned processes (all cores by
  default), each with its own ``setup()``, two batches per worker queued.
- Anything else runs batch after batch in this thread.

Results are committed here, in the calling thread, as they complete (see
:class:`~tracepipe.pipeline.executors.base.Committer`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures import Executor as FuturesExecutor

import polars as pl

from tracepipe.errors import BudgetExceeded
from tracepipe.pipeline.executors.base import (
    BatchResult,
    Committer,
    Executor,
    RowSource,
    safe_process,
    stream_plan,
)
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.stages.base import ERROR_COL, RowStage

_WORKER_STAGE: RowStage | None = None


def _init_worker(stage: RowStage) -> None:
    global _WORKER_STAGE
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    _WORKER_STAGE = stage
    stage.setup()


def work(batch: pl.DataFrame) -> BatchResult:
    """One batch through the stage this worker process set up (:func:`cpu_pool`)."""
    assert _WORKER_STAGE is not None
    return safe_process(_WORKER_STAGE, batch)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def cpu_pool(stage: RowStage, workers: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each with its own ``stage.setup()``; submit :func:`work`."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(stage,))


def keep_full(
    pool: FuturesExecutor, submit: Callable[[pl.DataFrame], Future[BatchResult]], batches: Iterator[pl.DataFrame],
    in_flight: int, handle: Callable[[BatchResult], None], tick: Callable[[], None], tick_s: float = 1.0,
) -> None:
    """Keep ``in_flight`` calls running until ``batches`` runs out: each finished call is
    replaced first, then its result handled. On an error the calls not started are cancelled.
    A :class:`BudgetExceeded` (the engine dispatches nothing more) starts no new call but waits
    for the running ones and handles (commits) their results, then is raised."""
    pending: set[Future[BatchResult]] = set()
    stop: BudgetExceeded | None = None

    def fill() -> None:
        while len(pending) < in_flight:
            batch = next(batches, None)
            if batch is None:
                return
            pending.add(submit(batch))

    try:
        fill()
        while pending:
            done, pending = wait(pending, timeout=tick_s, return_when=FIRST_COMPLETED)
            if stop is None:
                fill()
            for f in done:
                try:
                    handle(f.result())
                except BudgetExceeded as e:  # drain: what is in flight finishes and is committed
                    stop = stop or e
            tick()
        if stop is not None:
            raise stop
    except BaseException:
        for f in pending:
            f.cancel()
        raise


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()

    def run_row_stage(
        self,
        stage: RowStage,
        rows: RowSource,
        commit: Committer,
        on_progress: Callable[[BatchResult], None],
    ) -> pl.DataFrame:
        errors: list[pl.DataFrame] = []

        def handle(res: BatchResult) -> None:
            commit(res)
            if res.errors.height:
                errors.append(res.errors)
            on_progress(res)

        if stage.cpu_bound and self.workers > 1:
            batches = rows.batches(stage.rows_per_batch())
            with cpu_pool(stage, self.workers) as pool:
                keep_full(pool, lambda b: pool.submit(work, b), batches, 2 * self.workers, handle, commit.tick)
        else:
            stage.setup()
            try:
                plan = stream_plan(stage)
                batches = rows.batches(plan.rows_per_call)
                if plan.calls_in_flight > 1:
                    pool = ThreadPoolExecutor(plan.calls_in_flight, thread_name_prefix=f"tracepipe-{stage.name}")
                    try:
                        keep_full(pool, lambda b: pool.submit(safe_process, stage, b), batches,
                                  plan.calls_in_flight, handle, commit.tick)
                    finally:
                        pool.shutdown(wait=False, cancel_futures=True)
                else:
                    for batch in batches:
                        handle(safe_process(stage, batch))
                        commit.tick()
            finally:
                stage.teardown()
        if errors:
            return pl.concat(errors)
        return pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
