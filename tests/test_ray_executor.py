"""Ray executor: same rows as the local executor, a shared cache, and resume after ``kill -9``.

Everything runs on a real local Ray instance (``ray.init(num_cpus=2)``, small object store; the
``ray_local`` session fixture shuts it down at the end).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from pydantic import Field

import tracepipe
from tracepipe.pipeline.executors import get_executor
from tracepipe.pipeline.executors.base import Committer, RowSource
from tracepipe.pipeline.executors.local import LocalExecutor
from tracepipe.pipeline.executors.ray import RayExecutor, parse_bytes, stage_engine
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.runner import Runner
from tracepipe.pipeline.store import IDX_COL, StageStore, list_stage_dirs
from tracepipe.recipe import load_recipe
from tracepipe.stages.base import ERROR_COL, ExecField, RowStage, StageParams

pytest.importorskip("ray")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test stages travel to Ray workers by value

# Ray Data warns about its own deprecated settings when it reads its context; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
GSM8K = Path(tracepipe.__file__).parent / "data" / "sources" / "gsm8k_train.jsonl"
DEFAULT_MAP = {"problem_chars": "length(problem)", "answer_len": "length(answer)"}


def write_recipe(
    d: Path, workdir: Path, *, executor: str = "local", map_set: dict[str, str] | None = None,
    map_batch: int = 500, max_len: int = 400,
) -> Path:
    """The demo recipe (gsm8k preset, dedup exact, filter) plus a ``map`` stage, absolute paths."""
    sets = ", ".join(f'{k}: "{v}"' for k, v in (map_set or DEFAULT_MAP).items())
    text = f"""
name: ray-demo
workdir: {workdir}
source:
  - path: {GSM8K}
    preset: gsm8k
    name: gsm8k_train
stages:
  - dedup: {{method: exact}}
  - filter: {{store: true, where: "length(problem) < {max_len}"}}
  - map: {{store: true, set: {{{sets}}}, batch_size: {map_batch}}}
outputs:
  - format: sft-messages
    path: {d / "out"}
executor: {{kind: {executor}, options: {{num_cpus: 2, object_store_memory: 200MB}}}}
"""
    path = d / f"recipe-{executor}-{abs(hash((str(workdir), sets, map_batch, max_len)))}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, pl.DataFrame]:
    """Final rows of each run, taken where the publish step (after the runner) hands them to the output writer."""
    import tracepipe.publish as publish

    seen: dict[str, pl.DataFrame] = {}

    def fake_write(final: pl.LazyFrame, spec: Any, recipe: Any, stats: Any = None, parts: Any = None, held: Any = None,
                   scrubber: Any = None) -> dict[str, Any]:
        seen["rows"] = final.collect()
        return {"format": spec.format, "path": spec.path, "files": [], "rows": {}}

    monkeypatch.setattr(publish, "write_output", fake_write)
    return seen


def run(recipe: Path, capture: dict[str, pl.DataFrame], executor: str | None = None) -> tuple[dict[str, Any], pl.DataFrame]:
    r = load_recipe(recipe)
    if executor:
        r.executor.kind = executor  # what `tracepipe run --executor` does
    stats = Runner(r).run().stats.to_dict()
    return {s["name"]: s for s in stats["stages"]}, capture.pop("rows")


def store_of(workdir: Path, stage: str) -> StageStore:
    (name,) = [n for n in list_stage_dirs(workdir) if n.startswith(f"{stage}-")]
    return StageStore(workdir, stage, name.split("-", 1)[1])


def sorted_store(workdir: Path, stage: str) -> pl.DataFrame:
    lf = store_of(workdir, stage).scan()
    assert lf is not None
    return lf.collect().sort(IN_KEY_COL, IDX_COL)


def forget_frames(workdir: Path) -> None:
    """Drop the runner's cache of whole intermediate frames (if it keeps one), so that reuse has
    to come from the per-stage store that the executors share."""
    shutil.rmtree(workdir / "frames", ignore_errors=True)


# -- 1. same rows as local; the two executors reuse each other's cache -----------------------------
def test_ray_gives_the_same_rows_as_local(tmp_path: Path, ray_local: Any, capture: dict[str, pl.DataFrame]) -> None:
    local_stats, local_rows = run(write_recipe(tmp_path, tmp_path / "wd-local"), capture)
    ray_stats, ray_rows = run(write_recipe(tmp_path, tmp_path / "wd-ray", executor="ray"), capture)

    assert local_rows.height > 1000 and "problem_chars" in local_rows.columns
    assert_frame_equal(ray_rows, local_rows)  # same rows, same order, same types
    for name in ("dedup", "filter", "map"):
        assert ray_stats[name]["computed"] == local_stats[name]["computed"] > 0
        assert ray_stats[name]["rows_out"] == local_stats[name]["rows_out"]
        assert ray_stats[name]["dropped"] == local_stats[name]["dropped"]
    assert local_stats["filter"]["dropped"], "the filter should drop some long problems"
    for stage in ("filter", "map"):  # the stores hold the same results, computed independently
        assert_frame_equal(sorted_store(tmp_path / "wd-ray", stage), sorted_store(tmp_path / "wd-local", stage))
    for kind in ("rejects",):
        lf = sorted((tmp_path / "wd-local" / kind).glob("*.parquet"))
        rf = sorted((tmp_path / "wd-ray" / kind).glob("*.parquet"))
        assert [p.name for p in lf] == [p.name for p in rf] and lf
        for a, b in zip(lf, rf):
            assert_frame_equal(pl.read_parquet(b), pl.read_parquet(a))


def test_executors_reuse_each_others_cache(tmp_path: Path, ray_local: Any, capture: dict[str, pl.DataFrame]) -> None:
    wd = tmp_path / "wd"
    recipe = write_recipe(tmp_path, wd)
    first, rows = run(recipe, capture, executor="local")
    assert first["map"]["computed"] > 0

    # local -> ray: nothing to compute, same rows
    forget_frames(wd)
    again, rows_ray = run(recipe, capture, executor="ray")
    for name in ("filter", "map"):
        assert again[name]["computed"] == 0 and again[name]["cached"] == first[name]["rows_in"] > 0
    assert_frame_equal(rows_ray, rows)

    # ray -> local, with a changed map param: ray computes the map only, local then reuses it
    changed = write_recipe(tmp_path, wd, map_set={"problem_chars": "length(problem) + 1"})
    ray_run, ray_rows = run(changed, capture, executor="ray")
    assert ray_run["filter"]["computed"] == 0
    assert ray_run["map"]["computed"] == ray_run["map"]["keys"] > 0
    forget_frames(wd)
    local_run, local_rows = run(changed, capture, executor="local")
    assert local_run["map"]["computed"] == 0 and local_run["map"]["cached"] == ray_run["map"]["rows_in"]
    assert_frame_equal(local_rows, ray_rows)
    assert (ray_rows["problem_chars"] == rows["problem_chars"] + 1).all()
    assert "answer_len" not in ray_rows.columns


# -- model stages on actors, CPU stages on tasks: error isolation as in the local executor ---------
class ProbeParams(StageParams):
    engine: str | None = Field(None, description="set: the executor treats the stage as a model stage")
    fail_mod: int = 7
    batch_size: int = ExecField(25)


class Probe(RowStage):
    """Doubles ``x``; fans out 2 rows for x % 5 == 0, drops x % 11 == 0, raises on x % fail_mod == 3."""

    name: ClassVar[str] = "probe"
    Params = ProbeParams
    reads = ("x",)
    adds = ("y", "pid", "setup_id")

    def engine_names(self) -> list[str]:
        return [self.params.engine] if self.params.engine else []

    def setup(self) -> None:
        self.setup_id = f"{os.getpid()}-{time.perf_counter_ns()}"

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        xs = batch["x"].to_list()
        if any(x % self.params.fail_mod == 3 for x in xs):
            raise ValueError(f"bad x in {xs}")
        keys, ys, drops = [], [], []
        for k, x in zip(batch[IN_KEY_COL].to_list(), xs):
            for j in range(2 if x % 5 == 0 else 1):
                keys.append(k)
                ys.append(2 * x + j)
                drops.append("probe: x % 11 == 0" if x % 11 == 0 else None)
        return pl.DataFrame({IN_KEY_COL: keys, "y": ys, "_drop": drops}).with_columns(
            pl.lit(os.getpid()).alias("pid"), pl.lit(self.setup_id).alias("setup_id"),
        )


def run_probe(executor: Any, params: ProbeParams, n: int = 300) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    df = pl.DataFrame({IN_KEY_COL: [f"k{i:04d}" for i in range(n)], "x": list(range(n))})
    stage = Probe(params)
    committed: list[pl.DataFrame] = []
    seen = {"n_in": 0}

    def on_progress(res: Any) -> None:
        seen["n_in"] += res.n_in

    rows = RowSource(df.height, lambda size: iter(df.iter_slices(size)))
    sink = Committer(committed.append, stage.rows_per_batch(), 3600.0)
    errors = executor.run_row_stage(stage, rows, sink, on_progress)
    sink.flush()
    return pl.concat(committed, how="diagonal_relaxed"), errors, seen["n_in"]


@pytest.mark.parametrize("engine", [None, "teacher"], ids=["cpu-tasks", "model-actors"])
def test_ray_isolates_errors_like_local(ray_local: Any, engine: str | None) -> None:
    params = ProbeParams(engine=engine)
    assert (stage_engine(Probe(params)) is not None) == (engine is not None)
    ray_ok, ray_err, ray_n = run_probe(RayExecutor(actors=1), params)
    loc_ok, loc_err, loc_n = run_probe(LocalExecutor(workers=1), params)

    assert ray_n == loc_n == 300
    cols = [IN_KEY_COL, "y", "_drop", IDX_COL]
    assert_frame_equal(ray_ok.select(cols).sort(IN_KEY_COL, IDX_COL), loc_ok.select(cols).sort(IN_KEY_COL, IDX_COL))
    assert_frame_equal(ray_err.sort(IN_KEY_COL), loc_err.sort(IN_KEY_COL))
    bad = {f"k{i:04d}" for i in range(300) if i % 7 == 3}
    assert set(ray_err[IN_KEY_COL].to_list()) == bad  # exactly the rows that raise, found by bisection
    assert ray_err[ERROR_COL].str.starts_with("ValueError: bad x").all()

    # work ran in Ray workers, each set up once and reused across batches
    pids = set(ray_ok["pid"].to_list())
    assert os.getpid() not in pids
    per_pid = ray_ok.group_by("pid").agg(pl.col("setup_id").n_unique().alias("setups"))
    assert per_pid["setups"].max() == 1
    if engine is not None:
        assert len(pids) == 1  # actors=1: one actor (one engine) for every batch


def test_ray_options_are_checked() -> None:
    assert parse_bytes("200MB") == 200_000_000 and parse_bytes("1GiB") == 2**30 and parse_bytes(5) == 5
    ex = get_executor("ray", address=None, object_store_memory="200MiB", num_cpus=2)
    assert isinstance(ex, RayExecutor) and ex.options.object_store_memory == 200 * 2**20
    with pytest.raises(ValueError, match="num_cpu"):
        get_executor("ray", address=None, num_cpu=2)


# -- 2. kill -9 of the driver mid-run, then resume without redoing committed parts ----------------
def test_kill_driver_mid_run_then_resume(tmp_path: Path, ray_local: Any, capture: dict[str, pl.DataFrame]) -> None:
    wd = tmp_path / "wd"
    recipe = write_recipe(tmp_path, wd, map_batch=10, max_len=200)  # ~310 parts of 10 rows
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    exe = shutil.which("tracepipe")
    cmd = [*([exe] if exe else [sys.executable, "-m", "tracepipe.cli"]), "run", str(recipe), "--executor", "ray", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    map_dir = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = list((wd / "stages").glob("map-*")) if (wd / "stages").exists() else []
            if dirs and len(list(dirs[0].glob("part-*.parquet"))) >= 30:
                map_dir = dirs[0]
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        assert map_dir is not None, "no parts committed in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:  # anything the killed driver started in its session (Ray's own processes)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL

    store = store_of(wd, "map")
    parts_before = {p: Path(p).read_bytes() for p in store.parts()}
    keys_before = store.keys()
    assert len(parts_before) >= 30 and len(keys_before) >= 300

    resumed, rows = run(recipe, capture, executor="ray")
    total = resumed["map"]["keys"]
    assert len(keys_before) < total, "the driver was killed after the map stage had finished"
    print(f"killed after {len(parts_before)} parts ({len(keys_before)} of {total} keys); resumed {resumed['map']['computed']}")
    assert resumed["map"]["cached"] == len(keys_before)
    assert resumed["map"]["computed"] == total - len(keys_before)  # nothing committed is redone

    parts_after = store.parts()
    assert set(parts_before) <= set(parts_after)
    for p, data in parts_before.items():  # committed parts untouched
        assert Path(p).read_bytes() == data
    new_keys: list[str] = []
    for p in set(parts_after) - set(parts_before):
        new_keys += pl.read_parquet(p, columns=[IN_KEY_COL])[IN_KEY_COL].to_list()
    assert len(new_keys) == len(set(new_keys)) == total - len(keys_before)
    assert not set(new_keys) & keys_before

    # and the result is the same as an uninterrupted run
    _, clean = run(write_recipe(tmp_path, tmp_path / "wd-clean", map_batch=500, max_len=200), capture, executor="local")
    assert_frame_equal(rows, clean)


def test_model_stage_resources(ray_local: Any) -> None:
    from tracepipe.engines import engine_config_model
    from tracepipe.pipeline.executors.ray import engine_gpus
    from tracepipe.stages.base import StageContext

    vllm_cfg = engine_config_model("vllm").model_validate(
        {"kind": "vllm", "model": "some/model", "tensor_parallel_size": 2, "engine_args": {"pipeline_parallel_size": 2}}
    )
    assert engine_gpus(vllm_cfg) == 4
    stage = Probe(ProbeParams(engine="teacher"), StageContext(engines={"teacher": vllm_cfg}))
    # this cluster has no GPU: model actors get none, one actor by default
    assert RayExecutor()._actor_plan(stage, "teacher") == (0.0, 1)
    assert RayExecutor(gpus_per_actor=1, actors=[1, 3])._actor_plan(stage, "teacher") == (1, (1, 3))


# -- real model-style stages: generate (replay engine, on actors) + verify (math-verify, tasks) ----
def test_generate_and_verify_on_ray_match_local(tmp_path: Path, ray_local: Any, capture: dict[str, pl.DataFrame]) -> None:
    def recipe(workdir: Path, executor: str) -> Path:
        p = tmp_path / f"gv-{executor}.yaml"
        p.write_text(f"""
name: ray-gv
workdir: {workdir}
source:
  - path: {GSM8K}
    preset: gsm8k
    limit: 120
engines:
  existing: {{kind: replay, column: solution}}
stages:
  - generate: {{engine: existing, batch_size: 30}}
  - verify: {{}}
outputs:
  - format: sft-messages
    path: {tmp_path / "out"}
executor: {{kind: {executor}, options: {{actors: 1}}}}
""")
        return p

    local_stats, local_rows = run(recipe(tmp_path / "wd-l", "local"), capture)
    ray_stats, ray_rows = run(recipe(tmp_path / "wd-r", "ray"), capture)
    assert ray_stats["generate"]["computed"] == local_stats["generate"]["computed"] == 120
    assert ray_stats["verify"]["computed"] == local_stats["verify"]["computed"] == 120
    assert_frame_equal(ray_rows, local_rows)
    assert (ray_rows["verdict"] == "correct").sum() > 100  # GSM8K's own solutions verify
    assert len(store_of(tmp_path / "wd-r", "generate").parts()) == 4  # one part per batch
