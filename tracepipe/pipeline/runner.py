"""The runner: walks the recipe, asks the store what is missing, runs only that.

Rows in flight are *frames*: ordered lists of immutable Parquet parts, content-addressed in
``<workdir>/frames/`` (see :mod:`tracepipe.pipeline.frames`). Stage by stage:

- a **row stage** maps every input part to an output part. A part whose output is already in the
  frame cache costs nothing. For the others it hashes the columns the stage reads into
  ``_in_key``, anti-joins those keys with the stage's store, hands only the missing rows (in
  batches) to the executor, which commits a store part per batch, then joins each input part with
  the store results to make its output part;
- a **set stage** reads only its columns over all parts (or their ``prepare()``-d form, cached per
  part: exact dedup reads two 64-bit hashes, not the text), decides (or reuses what it made for
  exactly this input last run), and rewrites only the parts whose share of the decision changed.

So a rerun does work in proportion to what changed: an appended JSONL chunk becomes one new part
that flows through every stage; everything else is found in the cache. Memory is bounded by a
part (and, for set stages, by the columns they read). Dropped rows go to
``<workdir>/rejects/`` and failed rows to ``<workdir>/quarantine/`` with the stage and reason;
nothing is silently lost. ``plan`` does the same walk without processing or caching anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracepipe.contract import DROP_COL, ERROR_COL, IDX_COL, IN_KEY_COL, KEY_COL, ORDER_COL, PARENT_COL
from tracepipe.errors import BudgetExceeded, EngineFatalError, RunFailed
from tracepipe.pipeline.estimate import estimate_stage, missing_rows, spend_stats
from tracepipe.pipeline.executors import Executor, get_executor
from tracepipe.pipeline.executors.base import BatchResult, Committer, RowSource, safe_process
from tracepipe.pipeline.executors.local import default_workers
from tracepipe.pipeline.follow import Follower, follower_chain
from tracepipe.pipeline.frames import (
    FrameCache,
    Part,
    digest_of,
    frame_digest,
    frame_schema,
    read_parts,
    scan_parts,
)
from tracepipe.pipeline.keys import fingerprint, row_keys
from tracepipe.pipeline.stats import RunStats, StageStats
from tracepipe.pipeline.store import StageStore, is_local, local_path
from tracepipe.publish import publish
from tracepipe.recipe import Recipe
from tracepipe.sources import load_sources
from tracepipe.spend import SpendBook, stop_message
from tracepipe.stages import get_stage
from tracepipe.stages.base import RowStage, SetStage, Stage, StageContext

RUNTIME_COLS = (KEY_COL, PARENT_COL)
#: input rows handled together when joining parts with store results: the store is read once
#: per group, and a group's results (estimated at 4x their stored size) stay under the bytes cap
JOIN_GROUP_ROWS = 50_000
JOIN_GROUP_BYTES = 256 << 20
#: a row stage's missing rows stay in memory up to this size, then spill to a scratch file
TODO_MEMORY_BYTES = 64 << 20
RUNNER_VERSION = "2"
#: a streamed stage commits what finished at least this often (seconds), however few rows
COMMIT_SECONDS = 30.0


@dataclass
class RunResult:
    stats: RunStats
    final_parts: list[Part] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def final_frame(self) -> pl.LazyFrame:
        return scan_parts(self.final_parts)


class Progress:
    """Thin wrapper over rich progress so the runner works with and without a terminal."""

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self._p = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False,
            )

    def __enter__(self) -> Progress:
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *a: Any) -> None:
        if self._p:
            self._p.stop()

    @property
    def enabled(self) -> bool:
        return self._p is not None

    def task(self, description: str, total: int) -> Any:
        return self._p.add_task(description, total=total, rate="") if self._p else None

    def advance(self, task: Any, n: int, rate: str) -> None:
        if self._p and task is not None:
            self._p.update(task, advance=n, rate=rate)


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    workdir.mkdir(parents=True, exist_ok=True)
    fh = open(workdir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RunFailed(f"another tracepipe run holds {workdir}/.lock; wait for it or stop it") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _data_then_runtime(schema: pl.Schema) -> list[str]:
    """Column order of every frame part: data columns, then ``_key`` / ``_parent``."""
    cols = [c for c in schema if c not in RUNTIME_COLS and c != ORDER_COL]
    return cols + [c for c in RUNTIME_COLS if c in schema]


def _reasons(parts_meta: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in parts_meta:
        for r, n in (m.get("dropped") or {}).items():
            out[r] = out.get(r, 0) + int(n)
    return out


def _collect(lf: pl.LazyFrame | None) -> pl.DataFrame | None:
    return lf.collect() if lf is not None else None


def _rate_text(st: StageStats, seconds: float, usage: dict[str, float]) -> str:
    """The progress bar's rate: rows/s and tokens/s, plus what the engine achieves."""
    dt = max(1e-9, seconds)
    rate = f"{st.computed / dt:,.1f} rows/s" + (f" {st.tokens / dt:,.0f} tok/s" if st.tokens else "")
    if "jobs_running" in usage:  # batch APIs: jobs and requests by state
        rate += (f" jobs {usage['jobs_running']:.0f} running {usage['jobs_done']:.0f} done; requests"
                 f" {usage['requests_queued']:.0f} queued {usage['requests_running']:.0f} running"
                 f" {usage['requests_done']:.0f} done {usage['requests_failed']:.0f} failed")
    elif usage.get("requests_per_s"):  # what the engine achieves (API engines)
        rate += f" {usage['requests_per_s']:,.1f} req/s" + (f" window {usage['window']:.0f}" if "window" in usage else "")
    elif usage.get("mean_running"):  # vLLM: sequences per decode step
        rate += f" {usage['mean_running']:,.0f} seqs/step"
    return rate


def _groups(todo: list[int], rows: list[int], cap: int) -> Iterator[list[int]]:
    """The positions in ``todo``, in order, cut into groups of about ``cap`` rows."""
    group: list[int] = []
    n = 0
    for j in todo:
        group.append(j)
        n += rows[j]
        if n >= cap:
            yield group
            group, n = [], 0
    if group:
        yield group


class _Found:
    """A row stage's committed results for a few keys, read once before computing; joined later
    with what this run commits (only the store parts it added are read again)."""

    def __init__(self, store: StageStore, keys: pl.DataFrame) -> None:
        self.store = store
        self.before = set(store.parts())
        self.found = _collect(store.scan(keys=keys.lazy()))
        self.missing = keys if self.found is None else keys.join(
            self.found.select(IN_KEY_COL).unique(), on=IN_KEY_COL, how="anti", maintain_order="left")

    def results(self, missing: pl.DataFrame) -> pl.DataFrame | None:
        """The results found up front plus this run's commits of the missing keys."""
        new_parts = [p for p in self.store.parts() if p not in self.before]
        lf = self.store.scan(keys=missing.lazy(), only=new_parts) if new_parts and missing.height else None
        got = [f for f in (self.found, _collect(lf)) if f is not None]
        if not got:
            return None
        if len(got) == 1:
            return got[0]
        return pl.concat(got, how="diagonal_relaxed").unique(subset=[IN_KEY_COL, IDX_COL], keep="first", maintain_order=True)


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        *,
        executor: Executor | None = None,
        progress: bool = False,
        console: Any = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.recipe = recipe
        self.workdir = recipe.workdir_path()
        self.local_workdir = local_path(self.workdir) if is_local(self.workdir) else None
        spec = recipe.executor
        self.executor = executor or get_executor(
            spec.kind, **({"workers": spec.workers} if spec.kind == "local" else {"address": spec.address, **spec.options})
        )
        self.progress = progress
        self.console = console
        self._chain: list[tuple[RowStage, StageStore]] = []  # CPU row stages after the current one
        self._pass = False  # plan: the current stage's uncomputed rows go on as they are (estimates)
        self.ctx = StageContext(
            recipe_name=recipe.name,
            recipe_dir=recipe.base_dir,
            workdir=Path(self.workdir) if self.local_workdir else Path(".tracepipe"),
            engines=dict(recipe.engine_configs),
            options=dict(options or {}),
        )

    # -- public ------------------------------------------------------------------------------
    def plan(self) -> RunStats:
        return self._execute(plan=True).stats

    def run(self) -> RunResult:
        return self._execute(plan=False)

    def build_stages(self) -> list[tuple[Stage, StageStore, str]]:
        out = []
        for spec in self.recipe.stage_specs:
            stage = get_stage(spec.name)(spec.params, self.ctx)
            try:
                fp_inputs = stage.fingerprint_inputs()
            except Exception as e:  # an engine that cannot be reached / read to fingerprint it
                raise RunFailed(f"stages[{spec.index}].{spec.name}: cannot fingerprint the stage: {type(e).__name__}: {e}") from None
            fp = fingerprint(fp_inputs)
            out.append((stage, StageStore(self.workdir, spec.name, fp, meta=fp_inputs), fp))
        return out

    # -- the walk ----------------------------------------------------------------------------
    def _execute(self, plan: bool) -> RunResult:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        stats = RunStats(recipe=self.recipe.name, run_id=run_id, mode="plan" if plan else "run")
        t_run = time.perf_counter()
        base = self.local_workdir or Path(tempfile.gettempdir()) / f"tracepipe-run-{self.recipe.name}"
        with workdir_lock(base):
            tmp_root = base / "tmp"
            if tmp_root.exists():  # stale scratch of killed runs (we hold the lock)
                shutil.rmtree(tmp_root, ignore_errors=True)
            run_dir = tmp_root / run_id
            run_dir.mkdir(parents=True)
            self.cache = FrameCache(base / "frames", scratch=run_dir / "frames" if plan else None)
            result = RunResult(stats=stats)
            try:
                # spend (tracepipe.spend): what engines charge, against the budgets, across runs
                self.ctx.spend = SpendBook(self.local_workdir, self.recipe.budget, write=not plan)
                stages = self.build_stages()  # fingerprints (and guards) before any data is read
                t0 = time.perf_counter()
                src = load_sources(self.recipe.source, self.recipe.base_dir, self.cache)
                parts = src.parts
                stats.source_rows = sum(p.rows for p in parts)
                stats.source_seconds = time.perf_counter() - t0
                rejects: list[tuple[str, list[Part]]] = []
                quarantine: list[tuple[str, Path]] = []
                if src.bad.height:
                    quarantine.append(("000-source", self._bad_lines(src.bad, src.rows_read, run_dir, stats, plan)))
                parts = self._walk(stages, parts, run_dir, stats, rejects, quarantine, plan)
                result.final_parts = parts
                if not plan:
                    self._publish_rejects(rejects)
                    self._publish_files(quarantine, "quarantine")
                    stats.seconds = time.perf_counter() - t_run
                    stats.spend = spend_stats(self.ctx, stats, plan)  # for the card (engines are released by now)
                    # writing and pushing the outputs is the next step, not the runner's (tracepipe.publish)
                    publish(parts, self.recipe, stats)
                    result.outputs = stats.outputs
                    keep = {p.digest for p in parts} | self.cache.used
                    self.cache.gc(keep)
            except BaseException as e:
                stats.ok = False
                stats.error = f"{type(e).__name__}: {e}"
                raise
            finally:
                self.ctx.close()
                stats.spend = spend_stats(self.ctx, stats, plan)  # this run's and the workdir's spend
                stats.engines = [{"t": round(t, 3), "engine": name, "event": ev} for t, name, ev in self.ctx.engine_events]
                stats.seconds = time.perf_counter() - t_run
                if not plan:
                    self._save_stats(stats)
                self.executor.close()
                shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _walk(
        self, stages: list[tuple[Stage, StageStore, str]], parts: list[Part], run_dir: Path, stats: RunStats,
        rejects: list[tuple[str, list[Part]]], quarantine: list[tuple[str, Path]], plan: bool,
    ) -> list[Part]:
        """Every stage in order over the parts; returns the final parts. Rejects and quarantined
        rows are collected for publishing; engines are released after their last stage."""
        pending = False
        last_use = {name: i for i, (stage, _, _) in enumerate(stages) for name in stage.engine_names()}
        with Progress(self.progress and not plan, self.console) as prog:
            for i, (stage, store, fp) in enumerate(stages):
                st = StageStats(index=i, name=stage.name, kind=stage.kind, fingerprint=fp, upstream_pending=pending)
                stats.stages.append(st)
                t_stage = time.perf_counter()
                tag = f"{i + 1:03d}-{stage.name}"
                quar: Path | None = None
                if isinstance(stage, RowStage):
                    follow = not plan and self.ctx.options.get("follow", True)
                    self._chain = follower_chain([(s, st_) for s, st_, _ in stages[i + 1:]]) if follow else []  # type: ignore[arg-type]
                    # plan: a CPU stage's uncomputed rows pass through (an upper bound, '+'), so the
                    # model stages after it are estimated over every row that may reach them
                    self._pass = plan and not stage.fanout and not self._drives_model(stage) and any(
                        self._drives_model(s) for s, _, _ in stages[i + 1:])
                    try:
                        parts, rej, quar = self._row_stage(stage, store, fp, parts, run_dir, tag, st, plan, prog)
                    except BudgetExceeded as e:
                        raise RunFailed(stop_message(self.ctx.spend, e, f"stages[{i}].{stage.name}")) from None
                    except EngineFatalError as e:
                        raise RunFailed(f"stages[{i}].{stage.name}: {e} (stopped at once; "
                                        f"{st.computed} rows done and committed are kept)") from None
                    quarantine += [(tag, quar)] if quar is not None else []
                elif isinstance(stage, SetStage):
                    parts, rej = self._set_stage(stage, store, fp, parts, st, plan)
                else:  # pragma: no cover
                    raise RunFailed(f"stage {stage.name!r} is neither a row nor a set stage")
                rejects.append((tag, rej))
                st.rows_out = sum(p.rows for p in parts)
                st.dropped = _reasons([p.meta for p in rej])
                if parts and type(stage).summarize is not Stage.summarize:
                    st.extra.update(stage.summarize(scan_parts(parts)))
                st.seconds = time.perf_counter() - t_stage
                pending = pending or st.to_compute > 0
                self._release_engines(stage, i, last_use, st)
                if not plan:
                    self._check_errors(stage, st, quar)
        return parts

    def _drives_model(self, stage: Stage) -> bool:
        """Whether the stage sends work to a model engine (not a ``bulk`` one); nothing starts."""
        return any(n in self.ctx.engines and not self.ctx.engine(n).bulk for n in stage.engine_names())

    def _bad_lines(self, bad: pl.DataFrame, rows_read: int, run_dir: Path, stats: RunStats, plan: bool) -> Path:
        """Quarantine the source lines that could not be read (file, line, reason); stop the run
        if they are more than ``max_error_rate`` of the lines read."""
        stats.source_bad_lines = bad.height
        path = run_dir / "000-source.quarantine.parquet"
        bad.with_columns(pl.lit("source").alias("_stage")).write_parquet(path)
        share = bad.height / max(1, rows_read)
        if not plan and share > self.recipe.max_error_rate:
            first = bad.row(0, named=True)
            self._publish_files([("000-source", path)], "quarantine")
            raise RunFailed(
                f"{bad.height} of {rows_read} source lines could not be read ({share:.1%} > max_error_rate "
                f"{self.recipe.max_error_rate:.1%}); first: {first['file']}:{first['line']}: {first['_error']}. "
                f"See {self.workdir}/quarantine/000-source.parquet."
            )
        return path

    def _release_engines(self, stage: Stage, i: int, last_use: dict[str, int], st: StageStats) -> None:
        """Record the stage's engine counters; close the engines no later stage names, so the
        next model fits in the memory this one held (unless ``keep_engines`` is set)."""
        for name in stage.engine_names():
            if last_use.get(name) == i and not self.ctx.options.get("keep_engines"):
                usage = self.ctx.release(name)
            else:
                live = self.ctx.live(name)
                usage = live.usage() if live is not None else {}
            if usage:
                st.engines[name] = usage

    def _check_errors(self, stage: Stage, st: StageStats, quar: Path | None) -> None:
        denom = max(1, st.computed)
        if st.error_keys and st.error_keys / denom > self.recipe.max_error_rate:
            first = ""
            if quar is not None and quar.exists():
                names = pq.read_schema(quar).names
                q = pl.read_parquet(quar, columns=[c for c in ("id", "_error") if c in names]).head(1)
                first = f"; first: {q.row(0, named=True)}"
                self._publish_files([(f"{st.index + 1:03d}-{stage.name}", quar)], "quarantine")
            raise RunFailed(
                f"stage {stage.name!r} (stages[{st.index}]) quarantined {st.errors} rows: {st.error_keys} of "
                f"{st.computed} distinct inputs ({st.error_keys / denom:.1%} > max_error_rate "
                f"{self.recipe.max_error_rate:.1%}){first}. Committed results are kept; see {self.workdir}/quarantine/."
            )

    # -- row stages ----------------------------------------------------------------------------
    def _keys(self, stage: Stage, part: Part) -> pl.DataFrame:
        """``_in_key`` for every row of a part, in row order."""
        df = self.cache.read(part, stage.input_columns())
        return row_keys(df if df.width else pl.DataFrame({"_": [None] * part.rows}), stage.input_columns()).to_frame()

    def _row_stage(
        self, stage: RowStage, store: StageStore, fp: str, parts: list[Part], run_dir: Path, tag: str,
        st: StageStats, plan: bool, prog: Progress,
    ) -> tuple[list[Part], list[Part], Path | None]:
        """Every input part mapped to its output part: from the frame cache, else computed (the
        rows the store lacks) and joined with the store's results."""
        digests = [digest_of(RUNNER_VERSION, "row", p.digest, fp) for p in parts]
        out, rej, todo = self._cached_parts(parts, digests, st)
        if not todo:
            return [p for p in out if p is not None and p.rows > 0], rej, None
        if not stage.stores_rows():
            return self._recompute(stage, parts, todo, digests, out, rej, run_dir, tag, st, plan)
        keys = {j: self._keys(stage, parts[j]) for j in todo}
        all_keys = pl.concat(list(keys.values())).unique(maintain_order=True)
        todo_rows = sum(parts[j].rows for j in todo)
        # up to one batch of rows joins at once without an estimate: the executor already held
        # a batch's results in memory
        group_cap = todo_rows if todo_rows <= stage.rows_per_batch() else \
            max(1, min(JOIN_GROUP_ROWS, int(JOIN_GROUP_BYTES / max(1.0, 4 * store.bytes_per_row()))))
        # few rows to join (a rerun after an append): the committed results of all of them are
        # read once, up front; what is missing from them is what to compute
        found = _Found(store, all_keys) if todo_rows <= group_cap else None
        missing = found.missing if found is not None else store.missing(all_keys[IN_KEY_COL]).to_frame()
        st.keys = all_keys.height
        st.to_compute = missing.height
        # rows whose key has a committed result (one join over all the parts' keys)
        st.cached += todo_rows - pl.concat(list(keys.values())).join(missing.select(IN_KEY_COL), on=IN_KEY_COL, how="semi").height
        errors = pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
        if missing.height and not plan:
            try:
                errors = self._compute(stage, store, [parts[j] for j in todo], keys, missing, run_dir, tag, st, prog)
            except BudgetExceeded as e:  # what was in flight is committed: count what remains
                e.to_compute, e.remaining = missing.height, len(store.missing(missing[IN_KEY_COL]))
                raise
        elif missing.height and plan:
            rows = missing_rows(self.cache.read, stage, dict(enumerate(parts)), keys, missing)
            st.estimate = estimate_stage(stage, store, rows, missing.height, self.local_workdir, st.upstream_pending)
        st.error_keys = errors.height
        quar: list[pl.LazyFrame] = []
        # join the parts with the results, a group of parts at a time (bounded memory)
        for group in _groups(todo, [p.rows for p in parts], group_cap):
            mine = found.results(missing) if found is not None else _collect(
                store.scan(keys=pl.concat([keys[j] for j in group]).unique().lazy()))
            for j in group:
                kept, dropped, q = self._join_part(stage, parts[j], keys[j], mine, errors, digests[j], plan)
                out[j] = kept
                rej += [dropped] if dropped is not None else []
                quar += [q] if q is not None else []
                if self._pass and missing.height and keys[j].join(missing.select(IN_KEY_COL), on=IN_KEY_COL, how="semi").height:
                    out[j] = parts[j]  # plan: rows not computed yet go on as they are (an upper bound)
        return [p for p in out if p is not None and p.rows > 0], rej, self._quarantine(stage, quar, run_dir, tag, st)

    def _cached_parts(
        self, parts: list[Part], digests: list[str], st: StageStats,
    ) -> tuple[list[Part | None], list[Part], list[int]]:
        """Output parts the frame cache holds (None where it does not), their rejects, and the
        positions of the parts still to work on."""
        out: list[Part | None] = []
        rej: list[Part] = []
        todo: list[int] = []
        st.parts = len(parts)
        for j, (p, d) in enumerate(zip(parts, digests)):
            st.rows_in += p.rows
            cached = self.cache.get(d)
            out.append(cached)
            if cached is None:
                todo.append(j)
                continue
            st.cached += p.rows
            st.parts_reused += 1
            r = self.cache.get(d + "-rej")
            if r is not None:
                rej.append(r)
        return out, rej, todo

    @staticmethod
    def _quarantine(stage: RowStage, frames: list[pl.LazyFrame], run_dir: Path, tag: str, st: StageStats) -> Path | None:
        """This run's failed rows of a stage, in one scratch file (published at the end)."""
        if not frames:
            return None
        path = run_dir / f"{tag}.quarantine.parquet"
        pl.concat(frames, how="diagonal_relaxed").with_columns(pl.lit(stage.name).alias("_stage")).sink_parquet(path)
        st.errors = pq.ParquetFile(path).metadata.num_rows
        return path

    def _recompute(
        self, stage: RowStage, parts: list[Part], todo: list[int], digests: list[str], out: list[Part | None],
        rej: list[Part], run_dir: Path, tag: str, st: StageStats, plan: bool,
    ) -> tuple[list[Part], list[Part], Path | None]:
        """A stage cheaper than its caching (``stores_rows()`` False: SQL ``filter`` / ``map``) runs over
        each input part the frame cache does not already hold, in this process, with row numbers
        for keys: no row keys to hash, no store to read or write."""
        quar_frames: list[pl.LazyFrame] = []
        t0 = time.perf_counter()
        stage.setup()
        try:
            for j in todo:
                part = parts[j]
                st.to_compute += part.rows
                keys = pl.int_range(part.rows, eager=True).cast(pl.String).alias(IN_KEY_COL).to_frame()
                if plan:
                    out[j] = part if self._pass else None  # plan: passed on as it is (an upper bound)
                    continue
                cols = [c for c in stage.input_columns() if c in frame_schema([part])]
                batch = pl.concat([keys, self.cache.read(part, cols)], how="horizontal") if cols else keys
                res = safe_process(stage, batch)
                st.computed += part.rows
                kept, dropped, quar = self._join_part(stage, part, keys, res.ok if res.ok.height else None,
                                                      res.errors, digests[j], plan)
                out[j] = kept
                if dropped is not None:
                    rej.append(dropped)
                if quar is not None:
                    quar_frames.append(quar)
                st.error_keys += res.errors.height
        finally:
            stage.teardown()
            st.compute_seconds = time.perf_counter() - t0
        return [p for p in out if p is not None and p.rows > 0], rej, self._quarantine(stage, quar_frames, run_dir, tag, st)

    def _compute(
        self, stage: RowStage, store: StageStore, parts: list[Part], keys: dict[int, pl.DataFrame],
        missing: pl.DataFrame, run_dir: Path, tag: str, st: StageStats, prog: Progress,
    ) -> pl.DataFrame:
        """Gather the missing rows (columns the stage reads, one row per key) and process them.

        The rows are kept in memory while they are small (``TODO_MEMORY_BYTES``), else spilled
        to a scratch Parquet file that is read back batch by batch."""
        todo_path = run_dir / f"{tag}.todo.parquet"
        writer = None
        held: list[pa.Table] = []
        held_bytes = 0
        schema: pa.Schema | None = None
        # each missing key's first row, found in one pass over all the parts' keys
        where = pl.concat([k.select(IN_KEY_COL, pl.lit(n).alias("_p"), pl.int_range(pl.len()).alias("_r"))
                           for n, k in enumerate(keys.values())])
        first = where.join(missing.select(IN_KEY_COL), on=IN_KEY_COL, how="semi").unique(IN_KEY_COL, keep="first")
        rows_of = first.partition_by("_p", as_dict=True, include_key=False)
        side_cols = self._side_columns(stage, parts)
        sides: list[pl.DataFrame] = []
        for n, p in enumerate(parts):
            sel = rows_of.get((n,))
            if sel is None:
                continue
            idx = sel["_r"].sort()
            key = list(keys.values())[n][IN_KEY_COL][idx]
            df = self.cache.read(p, list(dict.fromkeys([*stage.input_columns(), *side_cols])))
            df = df[idx].with_columns(key) if df.width else key.to_frame()  # a stage may read no column
            if side_cols:
                sides.append(df.select(IN_KEY_COL, *[c for c in side_cols if c in df.columns]))
            cols = [c for c in stage.input_columns() if c in df.columns]
            table = df.select(IN_KEY_COL, *cols).to_arrow()
            if schema is None:
                schema = table.schema
            elif table.schema != schema:
                table = table.cast(schema) if set(table.schema.names) == set(schema.names) else table
            held.append(table.select(schema.names))
            held_bytes += table.nbytes
            if held_bytes > TODO_MEMORY_BYTES or writer is not None:
                if writer is None:
                    writer = pq.ParquetWriter(todo_path, schema, compression="lz4")
                for t in held:
                    writer.write_table(t)
                held = []
        if schema is None:
            return pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
        follower = self._follower(sides)
        if writer is None:
            return self._process(stage, store, pa.concat_tables(held), st, prog, follower)
        writer.close()
        errors = self._process(stage, store, todo_path, st, prog, follower)
        todo_path.unlink()
        return errors

    def _side_columns(self, stage: RowStage, parts: list[Part]) -> list[str]:
        """Columns the follower chain reads from the rows a model stage gets (none when nothing
        follows it, or it is not a model stage). Decided from the engine's kind: nothing starts."""
        names = [n for n in stage.engine_names() if n in self.ctx.engines]
        if not self._chain or not parts or not names or self.ctx.engine(names[0]).bulk:
            return []
        have = frame_schema(parts)
        adds = set(stage.output_columns())
        want = {c for s, _ in self._chain for c in s.input_columns()}
        return [c for c in have if c in want and c not in adds]

    def _follower(self, sides: list[pl.DataFrame]) -> Follower | None:
        """A :class:`Follower` for a model stage's missing rows (``sides``: their columns the
        chain reads), when CPU row stages follow it."""
        if not sides or not self._chain:
            return None
        side = pl.concat(sides, how="diagonal_relaxed").unique(IN_KEY_COL, keep="first")
        return Follower(self._chain, side, getattr(self.executor, "workers", None) or default_workers())

    def _process(
        self, stage: RowStage, store: StageStore, todo: Path | pa.Table, st: StageStats, prog: Progress,
        follower: Follower | None = None,
    ) -> pl.DataFrame:
        """Run the executor over the rows to compute; commit results in completion order."""
        if isinstance(todo, pa.Table):
            table = self._by_length(stage, todo)
            total = table.num_rows

            def arrow_batches(size: int) -> Iterator[pa.RecordBatch]:
                return iter(table.to_batches(max_chunksize=size))
        else:
            total = pq.ParquetFile(todo).metadata.num_rows

            def arrow_batches(size: int) -> Iterator[pa.RecordBatch]:
                # row group by row group: pyarrow's iter_batches keeps what it decoded until the
                # iterator ends (280 MB of Arrow memory over 900k replayed rows)
                pf = pq.ParquetFile(todo)
                for i in range(pf.num_row_groups):
                    yield from pf.read_row_group(i).to_batches(max_chunksize=size)

        def batches(size: int) -> Iterator[pl.DataFrame]:
            for b in arrow_batches(size):
                df = pl.from_arrow(b)
                assert isinstance(df, pl.DataFrame)
                yield df

        task = prog.task(f"{stage.name}", total)
        t0 = time.perf_counter()

        names = stage.engine_names()

        def on_progress(res: BatchResult) -> None:
            st.computed += res.n_in
            if "completion_tokens" in res.ok.columns:
                st.tokens += int(res.ok["completion_tokens"].fill_null(0).sum())
            engine = self.ctx.live(names[0]) if names and prog.enabled else None
            prog.advance(task, res.n_in, _rate_text(st, time.perf_counter() - t0, engine.usage() if engine is not None else {}))

        def commit(df: pl.DataFrame) -> None:  # on the driver, in completion order
            store.commit(df)
            if follower is not None:
                follower.feed(df)

        committer = Committer(commit, stage.rows_per_batch(), float(self.ctx.options.get("commit_seconds", COMMIT_SECONDS)))
        try:
            return self.executor.run_row_stage(stage, RowSource(total, batches), committer, on_progress)
        finally:
            committer.flush()  # what finished is kept, even when the stage stops on an error
            st.compute_seconds = time.perf_counter() - t0
            st.parts_committed = committer.parts
            if follower is not None:
                t1 = time.perf_counter()
                follower.close()
                st.followed = {"stages": [s.name for s, _ in follower.chain], "rows": follower.rows,
                                        "tail_seconds": round(time.perf_counter() - t1, 3)}

    @staticmethod
    def _by_length(stage: RowStage, table: pa.Table) -> pa.Table:
        """Rows of like work together (longest first), when the stage says what a row's work is."""
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        length = stage.length_of(df)
        if length is None:
            return table
        return df.with_columns(length.alias("__len")).sort("__len", descending=True, maintain_order=True).drop("__len").to_arrow()

    def _join_part(
        self, stage: RowStage, part: Part, keys: pl.DataFrame, res: pl.DataFrame | None, errors: pl.DataFrame,
        digest: str, plan: bool,
    ) -> tuple[Part, Part | None, pl.LazyFrame | None]:
        """One input part joined with the stage's results: kept rows, rejects, quarantined rows."""
        df = self.cache.read(part).with_columns(keys[IN_KEY_COL])
        quar = None
        failed = df.filter(pl.col(IN_KEY_COL).is_in(errors[IN_KEY_COL].implode())) if errors.height else df.head(0)
        if failed.height:
            quar = failed.join(errors, on=IN_KEY_COL, how="left").drop(IN_KEY_COL).lazy()
        if res is None:
            joined = df.head(0).with_columns(pl.lit(None, dtype=pl.Int32).alias(IDX_COL), pl.lit(None, dtype=pl.String).alias(DROP_COL))
        elif res.height == df.height and res[IN_KEY_COL].equals(df[IN_KEY_COL]):
            # one result per row, in the part's order (a recomputed filter / map): no join needed
            res_cols = [c for c in res.columns if c not in (IN_KEY_COL, IDX_COL, DROP_COL)]
            joined = pl.concat([df.drop([c for c in res_cols if c in df.columns]), res.drop(IN_KEY_COL)], how="horizontal")
        else:
            mine = res.join(df.select(IN_KEY_COL).unique(), on=IN_KEY_COL, how="semi", maintain_order="left")
            res_cols = [c for c in mine.columns if c not in (IN_KEY_COL, IDX_COL, DROP_COL)]
            joined = df.drop([c for c in res_cols if c in df.columns]).join(
                mine, on=IN_KEY_COL, how="inner", maintain_order="left_right"
            )
        if stage.fanout:
            joined = joined.with_columns(
                pl.col(KEY_COL).alias(PARENT_COL),
                pl.concat_str([pl.col(KEY_COL), pl.lit(f"/{stage.name}:"), pl.col(IDX_COL).cast(pl.String)]).alias(KEY_COL),
            )
        kept = joined.filter(pl.col(DROP_COL).is_null()).drop(IN_KEY_COL, IDX_COL, DROP_COL)
        kept = kept.select(_data_then_runtime(kept.schema))
        dropped = joined.filter(pl.col(DROP_COL).is_not_null()).drop(IN_KEY_COL, IDX_COL).rename({DROP_COL: "_reason"}).with_columns(
            pl.lit(stage.name).alias("_stage")
        )
        have = joined[IN_KEY_COL].n_unique() if joined.height else 0
        complete = not plan and not failed.height and have == df[IN_KEY_COL].n_unique()
        drops = dict(dropped.group_by("_reason").len().iter_rows()) if dropped.height else {}
        # a part is cached only when every row has a committed result (errors are retried)
        d = digest if complete else digest_of(digest, "partial", uuid.uuid4().hex)
        rej_part = self.cache.put(d + "-rej", dropped, {"dropped": drops}) if dropped.height else None
        out = self.cache.put(d, kept, {"dropped": drops})
        return out, rej_part, quar

    # -- set stages ----------------------------------------------------------------------------
    @staticmethod
    def _prep_digest(fp: str, part: Part) -> str:
        return digest_of(RUNNER_VERSION, "prep", part.digest, fp, pl.__version__)

    def _prepared(self, stage: SetStage, fp: str, part: Part, present: list[str], st: StageStats) -> Part:
        """``_key`` + the stage's prepared columns for one part, cached per part, so a rerun
        prepares only parts it has not seen."""
        d = self._prep_digest(fp, part)
        cached = self.cache.get(d)
        if cached is not None:
            return cached
        st.parts_prepared += 1
        raw = self.cache.read(part, [KEY_COL, *present])
        prepared = stage.prepare(raw.drop(KEY_COL))
        if prepared.height != raw.height:
            raise RunFailed(f"stage {stage.name!r}: prepare() returned {prepared.height} rows for {raw.height}")
        return self.cache.put(d, pl.concat([raw.select(KEY_COL), prepared], how="horizontal"))

    def _set_stage(
        self, stage: SetStage, store: StageStore, fp: str, parts: list[Part], st: StageStats, plan: bool,
    ) -> tuple[list[Part], list[Part]]:
        """Decide over all input rows (or reuse last run's output for the same input), then write
        each part's kept rows and rejects; parts whose decisions did not change are reused."""
        if not parts:
            return [], []
        st.parts = len(parts)
        present = [c for c in stage.input_columns() if c in frame_schema(parts)]
        st.rows_in = st.keys = sum(p.rows for p in parts)
        # the input is fixed by the parts it is read from (content-addressed) and the columns read
        digest = digest_of(RUNNER_VERSION, "set-input", [p.digest for p in parts], present, stage.prepares(), fp)
        # the same input as the last run, whose output parts are all still cached: nothing to do
        last_name = f"set-last-{stage.name}-{fp}"
        last = self.cache.get_meta(last_name) or {}
        if last.get("input") == digest and len(last.get("out") or []) == len(parts):
            reused = self._reuse_set_parts(last)
            if reused is not None:
                st.cached = st.rows_in
                st.parts_reused = len(parts)
                if stage.prepares():  # keep the prepared parts for the next run (gc drops what is unused)
                    self.cache.used.update(self._prep_digest(fp, p) for p in parts)
                return reused
        full, adds = self._decide(stage, store, fp, parts, present, digest, st, plan)
        out, rej, made = self._set_parts(stage, fp, parts, full, adds, st)
        if not plan:
            self.cache.put_meta(last_name, {"input": digest, "out": made})
        return out, rej

    def _decide(
        self, stage: SetStage, store: StageStore, fp: str, parts: list[Part], present: list[str], digest: str,
        st: StageStats, plan: bool,
    ) -> tuple[pl.DataFrame, list[str]]:
        """One decision row per input row, in input order (``_key``, ``_drop``, added columns),
        and the names of the added columns; decisions worth storing are kept by input digest."""
        df = self._set_read(stage, fp, parts, present, st)
        if st.rows_in != df.height:
            raise RunFailed(f"stage {stage.name!r}: read {df.height} rows from parts that hold {st.rows_in}")
        keys = df.select(KEY_COL)
        decision = store.load_decision(digest) if stage.caches_decision() else None
        if decision is not None and KEY_COL not in decision.columns:  # saved aligned with the input rows
            decision = pl.concat([keys, decision], how="horizontal") if decision.height == keys.height else None
        decided_now = decision is None
        if decision is None:
            st.to_compute = keys.height
            t0 = time.perf_counter()
            decision = stage.decide(df)
            if DROP_COL not in decision.columns:
                decision = decision.with_columns(pl.lit(None, dtype=pl.String).alias(DROP_COL))
            decision = decision.with_columns(pl.col(DROP_COL).cast(pl.String))
            st.compute_seconds = time.perf_counter() - t0
            st.computed = 0 if plan else keys.height
        st.cached = 0 if decided_now else keys.height  # rows whose decision was not made now
        del df
        # a row per input row, in order: used as it is (and saved without its keys: the input,
        # which the digest covers, has them)
        aligned = decision.height == keys.height and decision[KEY_COL].equals(keys[KEY_COL])
        if decided_now and not plan and stage.caches_decision():
            store.save_decision(digest, decision.drop(KEY_COL) if aligned else decision)
        adds = [c for c in decision.columns if c not in (KEY_COL, DROP_COL)]
        if aligned:
            return decision, adds
        full = keys.join(decision, on=KEY_COL, how="left", maintain_order="left")
        if full.height != keys.height:
            raise RunFailed(f"stage {stage.name!r}: decide() returned a key more than once")
        if keys.join(decision.select(KEY_COL), on=KEY_COL, how="semi").height < keys.height:
            has = pl.col(KEY_COL).is_in(decision[KEY_COL].implode())
            note = pl.lit(f"{stage.name}: not selected")
            full = full.with_columns(pl.when(has).then(pl.col(DROP_COL)).otherwise(note).alias(DROP_COL))
        return full, adds

    def _set_parts(
        self, stage: SetStage, fp: str, parts: list[Part], full: pl.DataFrame, adds: list[str], st: StageStats,
    ) -> tuple[list[Part], list[Part], list[str]]:
        """Each part's kept rows and rejects under ``full`` (its rows' decisions, in order):
        output parts, reject parts, and the digests of the output parts (for the next run)."""
        out: list[Part] = []
        rej: list[Part] = []
        made: list[str] = []
        start = 0
        for p in parts:
            sub = full.slice(start, p.rows)
            start += p.rows
            d = digest_of(RUNNER_VERSION, "set", p.digest, fp, frame_digest(sub))
            made.append(d)
            cached = self.cache.get(d)
            if cached is not None:
                st.parts_reused += 1
                out += [cached] if cached.rows else []
                r = self.cache.get(d + "-rej")
                rej += [r] if r is not None else []
                continue
            pdf = self.cache.read(p)
            if not sub[KEY_COL].equals(pdf[KEY_COL]):  # pragma: no cover - a broken invariant
                raise RunFailed(f"stage {stage.name!r}: its decisions do not follow the rows of part {p.digest}")
            joined = pl.concat([pdf.drop([c for c in adds if c in pdf.columns]), sub.drop(KEY_COL)], how="horizontal")
            kept = joined.filter(pl.col(DROP_COL).is_null()).drop(DROP_COL)
            dropped = joined.filter(pl.col(DROP_COL).is_not_null()).rename({DROP_COL: "_reason"}).with_columns(pl.lit(stage.name).alias("_stage"))
            drops = dict(dropped.group_by("_reason").len().iter_rows()) if dropped.height else {}
            if dropped.height:
                rej.append(self.cache.put(d + "-rej", dropped, {"dropped": drops}))
            part = self.cache.put(d, kept.select(_data_then_runtime(kept.schema)), {"dropped": drops})
            out += [part] if part.rows else []
        return out, rej, made

    def _set_read(self, stage: SetStage, fp: str, parts: list[Part], present: list[str], st: StageStats) -> pl.DataFrame:
        """``_key`` + the columns ``decide`` reads (prepared, if the stage prepares) of these parts,
        with ``_ord`` (the row's position among them)."""
        if stage.prepares():
            prepared = [self._prepared(stage, fp, p, present, st) for p in parts]
            return read_parts(prepared, list(pl.read_parquet_schema(prepared[0].path)), None, ORDER_COL)
        frames = [pl.read_parquet(p.path, columns=[KEY_COL, *present]) for p in parts]
        df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        return df.with_row_index(ORDER_COL).with_columns(pl.col(ORDER_COL).cast(pl.Int64))

    def _reuse_set_parts(self, last: dict[str, Any]) -> tuple[list[Part], list[Part]] | None:
        """The output (and reject) parts a set stage made last time, or None if one is gone."""
        out: list[Part] = []
        rej: list[Part] = []
        for d in last["out"]:
            part = self.cache.get(d)
            if part is None:
                return None
            if part.rows:
                out.append(part)
            if part.meta.get("dropped"):
                r = self.cache.get(d + "-rej")
                if r is None:
                    return None
                rej.append(r)
        return out, rej

    # -- bookkeeping ---------------------------------------------------------------------------
    def _publish_rejects(self, items: list[tuple[str, list[Part]]]) -> None:
        """``<workdir>/rejects/<NNN>-<stage>-<k>.parquet``: every row a stage dropped, with
        ``_reason``, one file per frame part (hard links to the immutable parts: no copy, so a
        rerun publishes in proportion to the number of parts, not rows)."""
        if self.local_workdir is None:
            return
        files: list[tuple[str, Path]] = []
        for tag, parts in items:
            files += [(f"{tag}-{k:05d}", p.path) for k, p in enumerate(parts)]
        self._publish_files(files, "rejects")

    def _publish_files(self, items: list[tuple[str, Path]], kind: str) -> None:
        """Replace ``<workdir>/<kind>/`` with this run's files (the current state, queryable)."""
        if self.local_workdir is None:
            return
        dest = self.local_workdir / kind
        new = self.local_workdir / f".{kind}-{uuid.uuid4().hex[:6]}"
        new.mkdir(parents=True)
        for tag, path in items:
            if path.exists():
                try:
                    os.link(path, new / f"{tag}.parquet")
                except OSError:
                    shutil.copyfile(path, new / f"{tag}.parquet")
        old = self.local_workdir / f".{kind}-old-{uuid.uuid4().hex[:6]}"
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)

    def _save_stats(self, stats: RunStats) -> None:
        if self.local_workdir is None:
            return
        data = json.dumps(stats.to_dict(), indent=2, default=str)
        (self.local_workdir / "stats.json").write_text(data)
        runs = self.local_workdir / "runs"
        runs.mkdir(exist_ok=True)
        (runs / f"{stats.run_id}.json").write_text(data)
