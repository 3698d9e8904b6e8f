"""The runner: walks the recipe, asks the store what is missing, runs only that.

Stage by stage, the current rows live in a Parquet "frame" under ``<workdir>/tmp/<run>``:

- a **row stage** hashes the columns it reads into ``_in_key`` for every row, anti-joins those
  keys with its store, hands only the missing rows (in batches) to the executor, which commits a
  part per batch, then joins the frame with the store to make the next frame;
- a **set stage** reads only its columns, decides (or reuses the decision cached for exactly
  this input), and joins the decision back.

Dropped rows go to ``<workdir>/rejects/`` and failed rows to ``<workdir>/quarantine/`` with the
stage and reason, so nothing is silently lost. ``plan`` does the same walk without processing.
"""

from __future__ import annotations

import fcntl
import io
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from tracepipe.pipeline.executors import Executor, get_executor
from tracepipe.pipeline.executors.base import BatchResult
from tracepipe.pipeline.keys import (
    IN_KEY_COL,
    KEY_COL,
    ORDER_COL,
    PARENT_COL,
    fingerprint,
    hash_text,
    row_keys,
)
from tracepipe.pipeline.stats import RunStats, StageStats
from tracepipe.pipeline.store import IDX_COL, StageStore, is_local
from tracepipe.recipe import Recipe
from tracepipe.sources import write_source_frame
from tracepipe.stages import get_stage
from tracepipe.stages.base import DROP_COL, ERROR_COL, RowStage, SetStage, Stage, StageContext

RUNTIME_COLS = (KEY_COL, PARENT_COL, ORDER_COL)
KEY_BATCH = 65536


class RunFailed(RuntimeError):
    """The run stopped (error rate exceeded, a stage could not start, ...); the message says why."""


@dataclass
class RunResult:
    stats: RunStats
    final_frame: Path | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)


class Progress:
    """Thin wrapper over rich progress so the runner works with and without a terminal."""

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self._p = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._p = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *a: Any) -> None:
        if self._p:
            self._p.stop()

    def task(self, description: str, total: int) -> Any:
        if not self._p:
            return None
        return self._p.add_task(description, total=total, rate="")

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


def frame_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


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
        self.local_workdir = Path(self.workdir) if is_local(self.workdir) else None
        spec = recipe.executor
        self.executor = executor or get_executor(spec.kind, **({"workers": spec.workers} if spec.kind == "local" else {"address": spec.address, **spec.options}))
        self.progress = progress
        self.console = console
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
            cls = get_stage(spec.name)
            stage = cls(spec.params, self.ctx)
            fp_inputs = stage.fingerprint_inputs()
            fp = fingerprint(fp_inputs)
            out.append((stage, StageStore(self.workdir, spec.name, fp, meta=fp_inputs), fp))
        return out

    # -- the walk ----------------------------------------------------------------------------
    def _execute(self, plan: bool) -> RunResult:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        stats = RunStats(recipe=self.recipe.name, run_id=run_id, mode="plan" if plan else "run")
        t_run = time.perf_counter()
        base = self.local_workdir or Path("/tmp") / "tracepipe" / self.recipe.name
        with workdir_lock(base):
            tmp_root = base / "tmp"
            if tmp_root.exists():  # stale frames of killed runs (we hold the lock)
                shutil.rmtree(tmp_root, ignore_errors=True)
            run_dir = tmp_root / run_id
            run_dir.mkdir(parents=True)
            result = RunResult(stats=stats)
            try:
                t0 = time.perf_counter()
                frame = run_dir / "000-source.parquet"
                stats.source_rows = write_source_frame(self.recipe.source, self.recipe.base_dir, frame)
                stats.source_seconds = time.perf_counter() - t0
                rejects: list[tuple[str, Path]] = []
                quarantine: list[tuple[str, Path]] = []
                pending = False
                with Progress(self.progress and not plan, self.console) as prog:
                    for i, (stage, store, fp) in enumerate(self.build_stages()):
                        st = StageStats(index=i, name=stage.name, kind=stage.kind, fingerprint=fp, upstream_pending=pending)
                        stats.stages.append(st)
                        t_stage = time.perf_counter()
                        tag = f"{i + 1:03d}-{stage.name}"
                        if isinstance(stage, RowStage):
                            frame, rej, quar = self._row_stage(stage, store, frame, run_dir, tag, st, plan, prog)
                            if quar is not None:
                                quarantine.append((tag, quar))
                        elif isinstance(stage, SetStage):
                            frame, rej = self._set_stage(stage, store, frame, run_dir, tag, st, plan)
                        else:  # pragma: no cover
                            raise RunFailed(f"stage {stage.name!r} is neither a row nor a set stage")
                        if rej is not None:
                            rejects.append((tag, rej))
                        st.seconds = time.perf_counter() - t_stage
                        pending = pending or st.to_compute > 0
                        if not plan:
                            self._check_errors(stage, st, quar if isinstance(stage, RowStage) else None)
                result.final_frame = frame
                if not plan:
                    self._publish(rejects, "rejects")
                    self._publish(quarantine, "quarantine")
                    stats.seconds = time.perf_counter() - t_run
                    from tracepipe.outputs._writer import write_output

                    for out_spec in self.recipe.outputs:
                        info = write_output(pl.scan_parquet(frame), out_spec, self.recipe, stats.to_dict())
                        stats.outputs.append(info)
                    result.outputs = stats.outputs
            except BaseException as e:
                stats.ok = False
                stats.error = f"{type(e).__name__}: {e}"
                raise
            finally:
                stats.seconds = time.perf_counter() - t_run
                if not plan:
                    self._save_stats(stats)
                self.ctx.close()
                shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _check_errors(self, stage: Stage, st: StageStats, quar: Path | None) -> None:
        denom = max(1, st.computed)
        if st.error_keys and st.error_keys / denom > self.recipe.max_error_rate:
            first = ""
            if quar is not None and quar.exists():
                q = pl.read_parquet(quar, columns=["id", "_error"] if "id" in pl.read_parquet_schema(quar) else ["_error"]).head(1)
                first = f"; first: {q.row(0, named=True)}"
            # keep the quarantine of the failing stage queryable
            if quar is not None and quar.exists():
                self._publish([(f"{st.index + 1:03d}-{stage.name}", quar)], "quarantine")
            raise RunFailed(
                f"stage {stage.name!r} (stages[{st.index}]) quarantined {st.errors} of {st.computed} rows "
                f"({st.error_keys / denom:.1%} of distinct inputs > max_error_rate {self.recipe.max_error_rate:.1%}){first}. "
                f"Committed results are kept; see {self.workdir}/quarantine/."
            )

    # -- row stages ----------------------------------------------------------------------------
    def _keys_frame(self, stage: Stage, frame: Path, out: Path) -> None:
        cols = [c for c in stage.input_columns() if c in pq.read_schema(frame).names]
        pf = pq.ParquetFile(frame)
        writer = None
        for batch in pf.iter_batches(batch_size=KEY_BATCH, columns=[KEY_COL, *cols]):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            keys = df.select(KEY_COL).with_columns(row_keys(df, stage.input_columns()))
            table = keys.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="lz4")
            writer.write_table(table)
        if writer is None:
            pl.DataFrame(schema={KEY_COL: pl.String, IN_KEY_COL: pl.String}).write_parquet(out)
        else:
            writer.close()

    def _row_stage(
        self, stage: RowStage, store: StageStore, frame: Path, run_dir: Path, tag: str,
        st: StageStats, plan: bool, prog: Progress,
    ) -> tuple[Path, Path | None, Path | None]:
        keys_path = run_dir / f"{tag}.keys.parquet"
        self._keys_frame(stage, frame, keys_path)
        keys = pl.read_parquet(keys_path)
        st.rows_in = keys.height
        uniq = keys.select(IN_KEY_COL).unique(maintain_order=True)
        stored = store.keys()
        missing = uniq.filter(~pl.col(IN_KEY_COL).is_in(pl.Series(list(stored), dtype=pl.String).implode()))
        del stored
        st.keys = uniq.height
        st.to_compute = missing.height
        st.cached = uniq.height - missing.height
        errors = pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
        lf = pl.scan_parquet(frame)
        present = [c for c in stage.input_columns() if c in lf.collect_schema()]
        if missing.height and not plan:
            todo = run_dir / f"{tag}.todo.parquet"
            (
                lf.select(KEY_COL, *present)
                .join(pl.scan_parquet(keys_path), on=KEY_COL, how="inner", maintain_order="left")
                .join(missing.lazy(), on=IN_KEY_COL, how="semi", maintain_order="left")
                .unique(IN_KEY_COL, keep="first", maintain_order=True)
                .select(IN_KEY_COL, *present)
                .sink_parquet(todo, compression="lz4")
            )
            errors = self._process(stage, store, todo, st, prog)
            todo.unlink()
        st.error_keys = errors.height
        return self._join_results(stage, store, frame, keys_path, errors, run_dir, tag, st)

    def _process(self, stage: RowStage, store: StageStore, todo: Path, st: StageStats, prog: Progress) -> pl.DataFrame:
        pf = pq.ParquetFile(todo)
        bs = stage.rows_per_batch()
        task = prog.task(f"{stage.name}", pf.metadata.num_rows)
        t0 = time.perf_counter()

        def batches() -> Iterator[pl.DataFrame]:
            for b in pf.iter_batches(batch_size=bs):
                df = pl.from_arrow(b)
                assert isinstance(df, pl.DataFrame)
                yield df

        def commit(df: pl.DataFrame) -> None:
            store.commit(df)

        def on_progress(res: BatchResult) -> None:
            st.computed += res.n_in
            if "completion_tokens" in res.ok.columns:
                st.tokens += int(res.ok["completion_tokens"].fill_null(0).sum())
            dt = max(1e-9, time.perf_counter() - t0)
            rate = f"{st.computed / dt:,.1f} rows/s" + (f" {st.tokens / dt:,.0f} tok/s" if st.tokens else "")
            prog.advance(task, res.n_in, rate)

        try:
            return self.executor.run_row_stage(stage, batches(), commit, on_progress)
        finally:
            st.compute_seconds = time.perf_counter() - t0

    def _join_results(
        self, stage: RowStage, store: StageStore, frame: Path, keys_path: Path, errors: pl.DataFrame,
        run_dir: Path, tag: str, st: StageStats,
    ) -> tuple[Path, Path | None, Path | None]:
        lf = pl.scan_parquet(frame)
        schema = lf.collect_schema()
        res = store.scan()
        next_frame = run_dir / f"{tag}.parquet"
        rej_path = run_dir / f"{tag}.rejects.parquet"
        quar_path = run_dir / f"{tag}.quarantine.parquet"
        base = lf.join(pl.scan_parquet(keys_path), on=KEY_COL, how="inner", maintain_order="left")
        if errors.height:
            base.join(errors.lazy(), on=IN_KEY_COL, how="inner", maintain_order="left").with_columns(
                pl.lit(stage.name).alias("_stage")
            ).drop(IN_KEY_COL).sink_parquet(quar_path)
            st.errors = frame_rows(quar_path)
        if res is None:
            lf.head(0).sink_parquet(next_frame)
            return next_frame, None, quar_path if errors.height else None
        res_cols = [c for c in res.collect_schema() if c not in (IN_KEY_COL, IDX_COL, DROP_COL)]
        keep_cols = [c for c in schema if c not in res_cols]
        joined = base.select(*keep_cols, IN_KEY_COL).join(res, on=IN_KEY_COL, how="inner", maintain_order="left_right")
        fanout = bool(getattr(stage, "fanout", False))
        if fanout:
            joined = joined.with_columns(
                pl.col(KEY_COL).alias(PARENT_COL),
                pl.concat_str([pl.col(KEY_COL), pl.lit(f"/{stage.name}:"), pl.col(IDX_COL).cast(pl.String)]).alias(KEY_COL),
            )
        kept = (
            joined.filter(pl.col(DROP_COL).is_null())
            .drop(IN_KEY_COL, IDX_COL, DROP_COL, ORDER_COL)
            .with_row_index(ORDER_COL)
            .with_columns(pl.col(ORDER_COL).cast(pl.Int64))
        )
        cols = kept.collect_schema().names()
        order = [c for c in cols if c not in RUNTIME_COLS] + [c for c in RUNTIME_COLS if c in cols]
        kept.select(order).sink_parquet(next_frame, compression="lz4", maintain_order=True)
        dropped = joined.filter(pl.col(DROP_COL).is_not_null()).drop(IN_KEY_COL, IDX_COL).rename({DROP_COL: "_reason"}).with_columns(
            pl.lit(stage.name).alias("_stage")
        )
        dropped.sink_parquet(rej_path, compression="zstd", maintain_order=True)
        st.rows_out = frame_rows(next_frame)
        reasons = pl.scan_parquet(rej_path).group_by("_reason").len().collect()
        st.dropped = {r: int(n) for r, n in reasons.iter_rows()}
        st.extra.update(stage.summarize(pl.scan_parquet(next_frame)))
        return next_frame, rej_path if sum(st.dropped.values()) else None, quar_path if errors.height else None

    # -- set stages ----------------------------------------------------------------------------
    def _set_stage(
        self, stage: SetStage, store: StageStore, frame: Path, run_dir: Path, tag: str, st: StageStats, plan: bool,
    ) -> tuple[Path, Path | None]:
        lf = pl.scan_parquet(frame)
        schema = lf.collect_schema()
        present = [c for c in stage.input_columns() if c in schema]
        df = lf.select(KEY_COL, ORDER_COL, *present).collect()
        st.rows_in = st.keys = df.height
        buf = io.BytesIO()
        df.write_ipc(buf, compression="uncompressed")
        digest = hash_text(buf.getvalue())
        del buf
        decision = store.load_decision(digest)
        if decision is None:
            st.to_compute = df.height
            t0 = time.perf_counter()
            decision = stage.decide(df)
            if DROP_COL not in decision.columns:
                decision = decision.with_columns(pl.lit(None, dtype=pl.String).alias(DROP_COL))
            decision = decision.with_columns(pl.col(DROP_COL).cast(pl.String))
            st.compute_seconds = time.perf_counter() - t0
            st.computed = 0 if plan else df.height
            if not plan:
                store.save_decision(digest, decision)
        else:
            st.cached = df.height
        del df
        adds = [c for c in decision.columns if c not in (KEY_COL, DROP_COL)]
        joined = (
            lf.drop([c for c in adds if c in schema])
            .join(decision.lazy(), on=KEY_COL, how="left", maintain_order="left")
        )
        decided = set(decision[KEY_COL].to_list())
        missing_note = f"{stage.name}: not selected"
        joined = joined.with_columns(
            pl.when(pl.col(KEY_COL).is_in(pl.Series(list(decided), dtype=pl.String).implode()))
            .then(pl.col(DROP_COL))
            .otherwise(pl.lit(missing_note))
            .alias(DROP_COL)
        )
        next_frame = run_dir / f"{tag}.parquet"
        rej_path = run_dir / f"{tag}.rejects.parquet"
        kept = joined.filter(pl.col(DROP_COL).is_null()).drop(DROP_COL, ORDER_COL).with_row_index(ORDER_COL).with_columns(
            pl.col(ORDER_COL).cast(pl.Int64)
        )
        kept.sink_parquet(next_frame, compression="lz4", maintain_order=True)
        joined.filter(pl.col(DROP_COL).is_not_null()).rename({DROP_COL: "_reason"}).with_columns(
            pl.lit(stage.name).alias("_stage")
        ).sink_parquet(rej_path, compression="zstd", maintain_order=True)
        st.rows_out = frame_rows(next_frame)
        reasons = pl.scan_parquet(rej_path).group_by("_reason").len().collect()
        st.dropped = {r: int(n) for r, n in reasons.iter_rows()}
        st.extra.update(stage.summarize(pl.scan_parquet(next_frame)))
        return next_frame, rej_path if sum(st.dropped.values()) else None

    # -- bookkeeping ---------------------------------------------------------------------------
    def _publish(self, items: list[tuple[str, Path]], kind: str) -> None:
        """Replace ``<workdir>/<kind>/`` with this run's files (the current state, queryable)."""
        if self.local_workdir is None:
            return
        dest = self.local_workdir / kind
        new = self.local_workdir / f".{kind}-{uuid.uuid4().hex[:6]}"
        new.mkdir(parents=True)
        for tag, path in items:
            if path.exists():
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
