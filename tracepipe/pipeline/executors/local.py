"""Local executor: in-process for model stages, a process pool for CPU-bound row stages.

CPU-bound stages (``cpu_bound = True``) run in ``workers`` spawned processes (all cores by
default), each with its own ``setup()``; results are committed in the parent as each batch
completes, so a crash loses at most the batches in flight.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import polars as pl

from tracepipe.pipeline.executors.base import BatchResult, Executor, safe_process
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.stages.base import ERROR_COL, RowStage

_WORKER_STAGE: RowStage | None = None


def _init_worker(stage: RowStage) -> None:
    global _WORKER_STAGE
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    _WORKER_STAGE = stage
    stage.setup()


def _work(batch: pl.DataFrame) -> BatchResult:
    assert _WORKER_STAGE is not None
    return safe_process(_WORKER_STAGE, batch)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()

    def run_row_stage(
        self,
        stage: RowStage,
        batches: Iterator[pl.DataFrame],
        commit: Callable[[pl.DataFrame], None],
        on_progress: Callable[[BatchResult], None],
    ) -> pl.DataFrame:
        errors: list[pl.DataFrame] = []

        def handle(res: BatchResult) -> None:
            if res.ok.height:
                commit(res.ok)
            if res.errors.height:
                errors.append(res.errors)
            on_progress(res)

        if stage.cpu_bound and self.workers > 1:
            self._pool(stage, batches, handle)
        else:
            stage.setup()
            try:
                for batch in batches:
                    handle(safe_process(stage, batch))
            finally:
                stage.teardown()
        if errors:
            return pl.concat(errors)
        return pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})

    def _pool(self, stage: RowStage, batches: Iterator[pl.DataFrame], handle: Callable[[BatchResult], None]) -> None:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(stage,)) as pool:
            pending: set[Future[BatchResult]] = set()
            for batch in batches:
                pending.add(pool.submit(_work, batch))
                if len(pending) >= 2 * self.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        handle(f.result())
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    handle(f.result())
