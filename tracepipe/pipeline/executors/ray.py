"""Ray executor: the same row stages on Ray Data, sharing the store with the local executor.

Selected with ``executor: {kind: ray, address: auto}`` in the recipe or ``tracepipe run --executor
ray``. Set stages stay on the driver (the runner runs them); row stages become one Ray Data
``map_batches`` each:

- **model stages** (stages that use an engine: ``params.engine`` is set, or the class says
  ``uses_engine = True``) run in an actor pool, one stage + one engine per actor, ``num_gpus``
  per actor (by default the engine's ``tensor_parallel_size * pipeline_parallel_size`` when the
  cluster has GPUs), so a model is loaded once per actor, not once per batch;
- **CPU stages** run as Ray tasks; each worker process sets the stage up once and reuses it.

Each runner batch is one Ray Data block and one UDF call, so a committed part is exactly one
batch, as with the local executor. Errors are isolated per row by the same
:func:`~tracepipe.pipeline.executors.base.safe_process` (bisecting a batch that raises).

**Commits happen on the driver** (the ``commit`` callback, as each result streams back):

- the executor interface hands the executor a ``commit`` callback, not the store, and the runner
  owns the store's identity (root, fingerprint, meta); driver commits keep exactly one commit per
  batch and the same progress / token accounting as the local executor;
- workers need no access to (or credentials for) the store: a local workdir on the head node
  works with a multi-node cluster, and an ``s3://`` / ``gs://`` workdir is only written by the
  driver, so nothing on the workers has to be trusted with write access;
- the cost is that result bytes travel worker -> driver -> store. Trace rows are text (KBs per
  row) and model work dominates, so this is not the bottleneck; results cross as compressed Arrow
  IPC. A crash of the driver loses at most the batches in flight (never a committed part).

Results cross Ray as Arrow IPC bytes (one row per batch: ``ok``, ``errors``, ``n_in``), so Ray
Data never has to unify schemas across batches (a column all null in one batch, fan-out lists)
and dtypes round-trip exactly.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tracepipe.pipeline.executors.base import BatchResult, Committer, Executor, RowSource, safe_process
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.stages.base import ERROR_COL, RowStage

log = logging.getLogger(__name__)


class _QuietRayData(logging.Filter):
    """Drop Ray Data's notice that its progress bars are off (the runner draws its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()

_IPC = "ipc"
_OK, _ERRORS, _N_IN = "ok", "errors", "n_in"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
#: engine kinds that are clients of a server elsewhere: their actors need no GPU
_CLIENT_ENGINES = frozenset({"openai", "openai-batch", "replay"})


def parse_bytes(v: int | float | str | None) -> int | None:
    """``200MB``, ``1.5GiB``, ``209715200`` -> bytes."""
    if v is None or isinstance(v, (int, float)):
        return None if v is None else int(v)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", v)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {v!r} as a size (e.g. 200MB, 1GiB, 209715200)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class RayOptions(BaseModel):
    """``executor.options`` for ``kind: ray`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: int | None = Field(None, ge=1, description="local instance only: CPUs Ray may use (default: all)")
    num_gpus: int | None = Field(None, ge=0, description="local instance only: GPUs Ray may use (default: all)")
    object_store_memory: int | None = Field(None, description="local instance only: object store size (bytes or '200MB')")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env for the job (working_dir, pip, env_vars, py_modules)")
    ship_code: bool = Field(False, description="add the installed tracepipe package to runtime_env.py_modules")
    actors: int | tuple[int, int] | None = Field(None, description="actor pool size for model stages: n or [min, max]")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per model actor (default: engine TP*PP if the cluster has GPUs, else 0)")
    cpus_per_actor: float = Field(1, ge=0, description="CPUs reserved per model actor")
    cpus_per_task: float = Field(1, gt=0, description="CPUs per task of a CPU stage")
    tasks: int | None = Field(None, ge=1, description="most concurrent tasks of a CPU stage (default: Ray decides)")
    init: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for ray.init")

    @field_validator("object_store_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_bytes(v)


# -- encoding batches and results as Arrow IPC bytes -------------------------------------------
def _to_ipc(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_ipc(buf, compression="lz4")
    return buf.getvalue()


def _from_ipc(data: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(data))


def _encode_input(df: pl.DataFrame) -> pa.Table:
    return pa.table({_IPC: pa.array([_to_ipc(df)], pa.large_binary()), _N_IN: pa.array([df.height], pa.int64())})


def _encode_result(res: BatchResult) -> dict[str, Any]:
    ok = _to_ipc(res.ok) if res.ok.height else b""
    errors = _to_ipc(res.errors) if res.errors.height else b""
    return {_OK: ok, _ERRORS: errors, _N_IN: res.n_in}


def _decode_results(table: pa.Table) -> Iterator[BatchResult]:
    oks, errs, ns = (table.column(c).to_pylist() for c in (_OK, _ERRORS, _N_IN))
    for ok, err, n in zip(oks, errs, ns):
        ok_df = _from_ipc(ok) if ok else pl.DataFrame()
        err_df = _from_ipc(err) if err else pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
        yield BatchResult(ok_df, err_df, int(n))


def _process_table(stage: RowStage, table: pa.Table) -> pa.Table:
    rows = [_encode_result(safe_process(stage, _from_ipc(blob))) for blob in table.column(_IPC).to_pylist()]
    return pa.table({
        _OK: pa.array([r[_OK] for r in rows], pa.large_binary()),
        _ERRORS: pa.array([r[_ERRORS] for r in rows], pa.large_binary()),
        _N_IN: pa.array([r[_N_IN] for r in rows], pa.int64()),
    })


# -- workers -----------------------------------------------------------------------------------
_TASK_STAGES: dict[str, RowStage] = {}


def _run_task(table: pa.Table, *, stage: RowStage, token: str) -> pa.Table:
    """CPU stages: a Ray task; the stage is set up once per worker process and reused."""
    live = _TASK_STAGES.get(token)
    if live is None:
        for old in list(_TASK_STAGES):  # one stage per worker at a time: release earlier ones
            _release(_TASK_STAGES.pop(old))
        stage.setup()
        live = _TASK_STAGES[token] = stage
    return _process_table(live, table)


def _release(stage: RowStage) -> None:
    try:
        stage.teardown()
    finally:
        stage.ctx.close()


class StageActor:
    """Model stages: one actor = one stage set up once = one engine (started on first use)."""

    def __init__(self, stage: RowStage) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return _process_table(self.stage, table)

    def __del__(self) -> None:  # Ray Data drops the actor at the end of the stage
        stage = self.__dict__.get("stage")
        if stage is not None:
            try:
                _release(stage)
            except Exception:  # pragma: no cover - best effort at shutdown
                pass


def stage_engine(stage: RowStage) -> str | None:
    """The engine a row stage drives (the first of :meth:`~RowStage.engine_names`), or None."""
    names = stage.engine_names()
    return names[0] if names else None


def engine_gpus(cfg: Any) -> int:
    """GPUs one engine instance spans: tensor x pipeline parallel size (vLLM-style config)."""
    extra = getattr(cfg, "engine_args", None) or {}
    tp = getattr(cfg, "tensor_parallel_size", None) or extra.get("tensor_parallel_size") or 1
    pp = getattr(cfg, "pipeline_parallel_size", None) or extra.get("pipeline_parallel_size") or 1
    return max(1, int(tp) * int(pp))


class RayExecutor(Executor):
    """Runs row stages on Ray Data; see the module docstring for the design."""

    kind = "ray"

    def __init__(self, address: str | None = None, **options: Any) -> None:
        try:
            self.options = RayOptions.model_validate(options)
        except ValidationError as e:
            raise ValueError(f"executor.options for kind ray: {e}") from None
        self.address = address
        self._started_ray = False

    # -- Ray lifecycle -------------------------------------------------------------------------
    def _runtime_env(self) -> dict[str, Any] | None:
        env = dict(self.options.runtime_env or {})
        if self.options.ship_code:
            import tracepipe

            env["py_modules"] = [*env.get("py_modules", []), os.path.dirname(tracepipe.__file__)]
        return env or None

    def ensure_ray(self) -> None:
        """Connect to ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a local
        instance; an instance already initialized in this process is reused as is."""
        import ray

        if ray.is_initialized():
            return
        o = self.options
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, **o.init}
        env = self._runtime_env()
        if env:
            kw["runtime_env"] = env
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kw)
        else:
            for name in ("num_cpus", "num_gpus", "object_store_memory"):
                if getattr(o, name) is not None:
                    kw[name] = getattr(o, name)
            ray.init(address="local", **kw)
        self._started_ray = True

    def close(self) -> None:
        """Shut down the Ray instance this executor started (a reused one is left running)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    # -- resources -----------------------------------------------------------------------------
    def _actor_plan(self, stage: RowStage, engine: str) -> tuple[float, int | tuple[int, int]]:
        import ray

        o = self.options
        cfg = stage.ctx.engines.get(engine) if engine != "?" else None
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        if o.gpus_per_actor is not None:
            gpus = o.gpus_per_actor
        elif cluster_gpus and getattr(cfg, "kind", None) not in _CLIENT_ENGINES:
            gpus = float(engine_gpus(cfg))
        else:
            gpus = 0.0
        if o.actors is not None:
            return gpus, o.actors
        return gpus, max(1, int(cluster_gpus // gpus)) if gpus else 1

    # -- the stage -----------------------------------------------------------------------------
    def run_row_stage(
        self,
        stage: RowStage,
        rows: RowSource,
        commit: Committer,
        on_progress: Callable[[BatchResult], None],
    ) -> pl.DataFrame:
        import ray
        import ray.data

        self.ensure_ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the runner draws its own progress
        ctx.execution_options.preserve_order = False
        ray_data_log = logging.getLogger("ray.data")
        ray_data_log.setLevel(logging.WARNING)
        for h in [*ray_data_log.handlers, *logging.getLogger("ray").handlers]:
            if not any(isinstance(f, _QuietRayData) for f in h.filters):
                h.addFilter(_QuietRayData())

        refs = [ray.put(_encode_input(b)) for b in rows.batches(stage.rows_per_batch()) if b.height]
        errors: list[pl.DataFrame] = []
        if refs:
            ds = ray.data.from_arrow_refs(refs)
            o = self.options
            engine = stage_engine(stage)
            common: dict[str, Any] = {"batch_size": None, "batch_format": "pyarrow", "zero_copy_batch": True}
            if engine is not None:
                gpus, size = self._actor_plan(stage, engine)
                pool = (ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1]) if isinstance(size, tuple)
                        else ray.data.ActorPoolStrategy(size=size))
                log.info("ray: stage %s on %s actor(s), %s GPU(s) each", stage.name, size, gpus)
                ds = ds.map_batches(
                    StageActor, fn_constructor_args=(stage,), compute=pool, num_gpus=gpus or None,
                    num_cpus=o.cpus_per_actor, **common,
                )
            else:
                fn = partial(_run_task, stage=stage, token=uuid.uuid4().hex)
                ds = ds.map_batches(fn, compute=ray.data.TaskPoolStrategy(size=o.tasks), num_cpus=o.cpus_per_task, **common)
            t0 = time.perf_counter()
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for res in _decode_results(table):
                    commit(res)
                    commit.tick()
                    if res.errors.height:
                        errors.append(res.errors)
                    on_progress(res)
            log.info("ray: stage %s: %d batches in %.2fs", stage.name, len(refs), time.perf_counter() - t0)
            del refs
        if errors:
            return pl.concat(errors)
        return pl.DataFrame(schema={IN_KEY_COL: pl.String, ERROR_COL: pl.String})
