"""Downstream row stages overlap a streaming model stage.

While a model stage streams, every part it commits is handed to a :class:`Follower`, which runs
the CPU row stages right after it (``verify``, ``filter``, ``map``, ...: the chain up to the next
set stage or model stage) on those rows in a background thread, and commits their results to
those stages' own stores. When the runner reaches them, their rows are already in the store and
nothing is left to compute: verification costs no extra wall time on a machine where the model
runs on an accelerator (or on another server) and the CPUs are free.

The follower is an optimisation only: it computes exactly what the stage would (same row keys,
same ``process``), commits only rows that succeeded, and leaves failures to the stage's own
pass, which retries and quarantines them. If it stops early, the stage computes the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Executor as FuturesExecutor

import polars as pl

from tracepipe.pipeline.executors.base import BatchResult, safe_process
from tracepipe.pipeline.executors.local import cpu_pool, work
from tracepipe.pipeline.keys import IN_KEY_COL, row_keys
from tracepipe.pipeline.store import IDX_COL, StageStore
from tracepipe.stages.base import DROP_COL, RowStage

log = logging.getLogger(__name__)


def follower_chain(stages: list[tuple[RowStage, StageStore]]) -> list[tuple[RowStage, StageStore]]:
    """The CPU row stages that directly follow a model stage (up to a set or model stage)."""
    chain = []
    for stage, store in stages:
        if not isinstance(stage, RowStage) or stage.engine_names():
            break
        chain.append((stage, store))
    return chain


def _attach(rows: pl.DataFrame, res: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (with ``_in_key``) joined with a stage's kept results for them (``_in_key``,
    ``_idx``, its columns, ``_drop``): the rows the next stage sees, without runtime columns."""
    if DROP_COL in res.columns:
        res = res.filter(pl.col(DROP_COL).is_null()).drop(DROP_COL)
    res_cols = [c for c in res.columns if c not in (IN_KEY_COL, IDX_COL)]
    out = rows.drop([c for c in res_cols if c in rows.columns]).join(res, on=IN_KEY_COL, how="inner", maintain_order="left")
    return out.drop([c for c in (IN_KEY_COL, IDX_COL) if c in out.columns])


class Follower:
    """Runs ``chain`` on the rows a model stage commits, in a background thread."""

    def __init__(self, chain: list[tuple[RowStage, StageStore]], side: pl.DataFrame, workers: int) -> None:
        self.chain = chain
        self.side = side  # the model stage's input rows: `_in_key` + the columns the chain reads
        self.rows = 0  # rows the chain's first stage got
        self._q: queue.Queue[pl.DataFrame | None] = queue.Queue()
        self._pools: dict[int, FuturesExecutor] = {}
        self._workers = workers
        self._failed: BaseException | None = None
        for stage, _ in chain:
            if not stage.cpu_bound or workers <= 1:
                stage.setup()
        self._thread = threading.Thread(target=self._loop, name="tracepipe-follower", daemon=True)
        self._thread.start()

    def feed(self, committed: pl.DataFrame) -> None:
        """Rows the model stage just committed (``_in_key``, ``_idx``, its columns, ``_drop``)."""
        if self._failed is None:
            self._q.put(committed)

    def close(self) -> None:
        """Finish what was fed, then release the pools and stages."""
        self._q.put(None)
        self._thread.join()
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        for stage, _ in self.chain:
            if not stage.cpu_bound or self._workers <= 1:
                stage.teardown()

    def _loop(self) -> None:
        while (df := self._q.get()) is not None:
            if self._failed is not None:
                continue
            try:
                self._follow(df)
            except BaseException as e:  # noqa: BLE001 - the stages' own pass does the work instead
                log.warning("follower stopped (%s: %s); the next stages compute their rows themselves", type(e).__name__, e)
                self._failed = e

    def _follow(self, committed: pl.DataFrame) -> None:
        rows = _attach(self.side, committed)
        for n, (stage, store) in enumerate(self.chain):
            if not rows.height:
                return
            if n == 0:
                self.rows += rows.height
            rows = self._step(n, stage, store, rows)

    def _step(self, n: int, stage: RowStage, store: StageStore, rows: pl.DataFrame) -> pl.DataFrame:
        """Compute and commit ``stage`` on the rows its store lacks; return its kept output rows.
        A stage that keeps no store (a SQL ``filter`` / ``map``) is only applied."""
        cols = [c for c in stage.input_columns() if c in rows.columns]
        if not stage.stores_rows():
            rows = rows.with_columns(pl.int_range(pl.len()).cast(pl.String).alias(IN_KEY_COL))
            return _attach(rows, safe_process(stage, rows.select(IN_KEY_COL, *cols)).ok)
        rows = rows.with_columns(row_keys(rows.select(cols) if cols else pl.DataFrame({"_": [None] * rows.height}),
                                          stage.input_columns()))
        todo = rows.select(IN_KEY_COL, *cols).unique(IN_KEY_COL, keep="first", maintain_order=True)
        todo = todo.join(store.missing(todo[IN_KEY_COL]).to_frame(), on=IN_KEY_COL, how="semi", maintain_order="left")
        results = [r.ok for r in self._run(n, stage, todo) if r.ok.height]
        if results:
            store.commit(pl.concat(results, how="diagonal_relaxed"))
        if n == len(self.chain) - 1:
            return rows
        found = store.scan(keys=rows.select(IN_KEY_COL).unique().lazy())
        return _attach(rows, found.collect() if found is not None else pl.DataFrame(schema={IN_KEY_COL: pl.String}))

    def _run(self, n: int, stage: RowStage, todo: pl.DataFrame) -> list[BatchResult]:
        size = stage.rows_per_batch()
        batches = [todo.slice(k, size) for k in range(0, todo.height, size)]
        if not batches:
            return []
        if stage.cpu_bound and self._workers > 1:
            if n not in self._pools:
                self._pools[n] = cpu_pool(stage, self._workers)
            return list(self._pools[n].map(work, batches))
        return [safe_process(stage, b) for b in batches]
