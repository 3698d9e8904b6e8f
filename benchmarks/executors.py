"""Local vs Ray executor on the demo recipe at 100k rows; prints JSON.

Data: the bundled GSM8K train set (7,473 problems) replicated to 100,000 rows. Copies get a
distinct ``id`` **and** a ``(copy k)`` suffix on the problem text, otherwise ``dedup: exact``
would fold them back to 7,473 rows and the row stages would see only those.

Recipe: source (gsm8k preset) -> dedup exact -> filter ``length(problem) < 1000`` -> map (two
SQL columns), i.e. the demo plus a ``map`` stage; run with the map's default batch (8,192 rows)
and with 1,024-row batches (more, smaller parts: shows the per-batch cost of each executor).

Measured per configuration (fresh workdir each, so every stage computes):

- ``local_s`` / ``ray_s``: whole ``Runner.run()`` wall time (the Ray instance is already up;
  starting it is ``ray_init_s``, paid once per driver);
- ``*_row_stages_s``: filter + map stage time (what the executor changes);
- ``ray_over_local``: overhead ratio of the row stages (Ray / local);
- ``ray_warm_on_local_cache_s``: Ray run on the local run's workdir (0 rows computed).

Baselines ("raw library"): ``raw_polars_s`` (the same dedup/filter/map in one polars query, no
cache) and ``raw_ray_data_map_s`` (the map alone as a bare Ray Data ``map_batches`` over the same
batches, no store), so tracepipe's own cost on each executor can be read off.

Usage: ``python benchmarks/executors.py [--rows 100000] [--cpus 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

import tracepipe
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

GSM8K = Path(tracepipe.__file__).parent / "data" / "sources" / "gsm8k_train.jsonl"
MAP = {"problem_chars": "length(problem)", "answer_len": "length(answer)"}


def make_source(path: Path, rows: int) -> int:
    base = pl.read_ndjson(GSM8K)
    reps = -(-rows // base.height)
    frames = []
    for k in range(reps):
        suffix = "" if k == 0 else f" (copy {k})"
        frames.append(base.with_columns(
            (pl.col("question") + pl.lit(suffix)).alias("question"),
            pl.format("gsm8k-train-{}-r{}", pl.int_range(pl.len()), pl.lit(k)).alias("id"),
        ))
    df = pl.concat(frames).head(rows)
    df.write_ndjson(path)
    return df.height


def write_recipe(d: Path, src: Path, workdir: Path, batch: int) -> Path:
    sets = ", ".join(f'{k}: "{v}"' for k, v in MAP.items())
    text = f"""
name: bench-executors
workdir: {workdir}
source:
  - path: {src}
    preset: gsm8k
    columns: {{id: id}}
    name: gsm8k_train_x
stages:
  - dedup: {{method: exact}}
  - filter: {{where: "length(problem) < 1000"}}
  - map: {{set: {{{sets}}}, batch_size: {batch}}}
"""
    p = d / f"recipe-{workdir.name}.yaml"
    p.write_text(text)
    return p


def run(recipe: Path, kind: str) -> dict[str, Any]:
    r = load_recipe(recipe)
    r.executor.kind = kind  # type: ignore[assignment]
    t0 = time.perf_counter()
    stats = Runner(r).run().stats.to_dict()
    wall = time.perf_counter() - t0
    st = {s["name"]: s for s in stats["stages"]}
    return {
        "wall_s": round(wall, 3),
        "row_stages_s": round(st["filter"]["seconds"] + st["map"]["seconds"], 3),
        "map_s": round(st["map"]["seconds"], 3),
        "computed": {k: v["computed"] for k, v in st.items()},
        "rows_out": st["map"]["rows_out"],
    }


def raw_polars(src: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    df = pl.read_ndjson(src).rename({"question": "problem"})
    norm = pl.col("problem").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    out = (
        df.with_columns(norm.alias("_n")).unique("_n", keep="first", maintain_order=True)
        .filter(pl.col("problem").str.len_chars() < 1000)
        .with_columns(pl.col("problem").str.len_chars().alias("problem_chars"), pl.col("answer").str.len_chars().alias("answer_len"))
    )
    return time.perf_counter() - t0, out.height


def raw_ray_data_map(src: Path, batch: int) -> float:
    import pyarrow as pa
    import ray
    import ray.data

    df = pl.read_ndjson(src).rename({"question": "problem"}).select("problem", "answer")
    refs = [ray.put(b.to_arrow()) for b in df.iter_slices(batch)]

    def fn(t: pa.Table) -> pa.Table:
        d = pl.from_arrow(t)
        assert isinstance(d, pl.DataFrame)
        return d.select(pl.col("problem").str.len_chars().alias("problem_chars"),
                        pl.col("answer").str.len_chars().alias("answer_len")).to_arrow()

    t0 = time.perf_counter()
    n = 0
    ds = ray.data.from_arrow_refs(refs).map_batches(fn, batch_size=None, batch_format="pyarrow")
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        n += t.num_rows
    assert n == df.height
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[8192, 1024])
    args = ap.parse_args()

    import ray
    import ray.data

    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-exec-"))
    result: dict[str, Any] = {
        "benchmark": "executors: local vs ray (Ray Data), demo recipe + map",
        "data": f"GSM8K train ({GSM8K.name}, 7473 rows) replicated to {args.rows} rows with distinct ids and a "
                "'(copy k)' problem suffix on copies so dedup keeps them",
        "machine": {"cpus_ray": args.cpus, "cores": os.cpu_count(), "python": platform.python_version(),
                    "ray": ray.__version__, "polars": pl.__version__, "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
    }
    try:
        src = tmp / "gsm8k_x.jsonl"
        result["rows"] = make_source(src, args.rows)
        t_raw, n_raw = raw_polars(src)
        result["raw_polars_s"] = round(t_raw, 3)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, object_store_memory=200 * 2**20,
                 include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["ray_init_s"] = round(time.perf_counter() - t0, 3)

        configs = []
        for batch in args.batches:
            local = run(write_recipe(tmp, src, tmp / f"wd-local-{batch}", batch), "local")
            ray_run = run(write_recipe(tmp, src, tmp / f"wd-ray-{batch}", batch), "ray")
            warm = run(write_recipe(tmp, src, tmp / f"wd-local-{batch}", batch), "ray")
            assert local["rows_out"] == ray_run["rows_out"] == n_raw, (local, ray_run, n_raw)
            assert sum(warm["computed"][s] for s in ("filter", "map")) == 0, warm
            configs.append({
                "map_batch_size": batch,
                "map_batches": -(-local["rows_out"] // batch),
                "rows_out": local["rows_out"],
                "local_s": local["wall_s"],
                "ray_s": ray_run["wall_s"],
                "local_row_stages_s": local["row_stages_s"],
                "ray_row_stages_s": ray_run["row_stages_s"],
                "ray_over_local": round(ray_run["row_stages_s"] / max(1e-9, local["row_stages_s"]), 2),
                "ray_over_local_whole_run": round(ray_run["wall_s"] / max(1e-9, local["wall_s"]), 2),
                "local_map_s": local["map_s"],
                "ray_map_s": ray_run["map_s"],
                "raw_ray_data_map_s": round(raw_ray_data_map(src, batch), 3),
                "ray_warm_on_local_cache_s": warm["wall_s"],
            })
        result["configs"] = configs
        result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
