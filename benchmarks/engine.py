"""Engine benchmark: source -> exact dedup -> filter -> sft output, at 10k and 100k rows.

Data: GSM8K train (7,473 rows, bundled) replicated to N rows with distinct ids; replicas get a
"(variant k)" suffix so they are distinct problems, and every 10th row repeats an earlier row
verbatim, so exact dedup has real work. Each measurement runs in a fresh subprocess that reports
its own wall time and peak RSS. ``wall_s`` times loading the recipe and running it; the process
set-up before it (interpreter, imports, the stage registry) is the same for every run and is
reported apart as ``import_s``. Printed as JSON:

- tracepipe full run at 10k and 100k rows (rows/s, peak RSS, RSS ratio 100k/10k);
- the same work in plain polars (the raw library, no store / resume) for comparison;
- a rerun with nothing new, and an incremental rerun after adding 1% new rows (wall time as a
  share of the full run);
- with ``--replay``, the same with a ``generate`` stage on a ``replay`` engine after the filter
  (existing traces curated as model output).

Each measurement is taken ``--repeats`` times (default 5; every full run starts from an empty
workdir, every incremental run from a copy of the state a full run left, and the two alternate so
that drift in machine speed meets both alike) and the median run is reported, with all wall
times and the highest peak RSS.

    python benchmarks/engine.py [--rows 100000] [--small 10000] [--repeats 5] [--replay]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl"
WHERE = "length(problem) < 600"


def make_rows(n: int, start: int = 0) -> list[dict]:
    base = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    rows = []
    for i in range(start, start + n):
        if i % 10 == 9:  # an exact duplicate of an earlier row
            j = i - 5
            src = base[j % len(base)]
            rep = j // len(base)
            rows.append({"id": f"r{i}", "question": src["question"] + (f" (variant {rep})" if rep else ""), "answer": src["answer"]})
            continue
        src = base[i % len(base)]
        rep = i // len(base)
        rows.append({"id": f"r{i}", "question": src["question"] + (f" (variant {rep})" if rep else ""), "answer": src["answer"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def write_recipe(d: Path, src: Path, replay: bool = False) -> Path:
    """The benchmark recipe; ``replay`` adds a ``generate`` stage on a ``replay`` engine (traces
    that already exist, curated like model output: a per-row store, like any model stage)."""
    recipe = d / "recipe.yaml"
    engines = "engines:\n  existing: {kind: replay, column: solution}\n" if replay else ""
    generate = "  - generate: {engine: existing}\n" if replay else ""
    recipe.write_text(
        f"""name: bench
workdir: {d / 'work'}
source:
  - path: {src}
    columns: {{problem: question, answer: answer, {'solution' if replay else 'response'}: answer}}
    answer_format: gsm8k
{engines}stages:
  - dedup: {{method: exact}}
  - filter: {{where: "{WHERE}"}}
{generate}outputs:
  - format: sft-messages
    path: {d / 'out'}
"""
    )
    return recipe


# -- children: each measures itself --------------------------------------------------------
def child_tracepipe(recipe: str) -> dict:
    t_imp = time.perf_counter()
    from tracepipe.outputs import known_formats
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe
    from tracepipe.stages import known_stages

    known_stages()  # the registries import every stage and output-format module (process set-up, like the imports)
    known_formats()
    import_s = time.perf_counter() - t_imp

    t0 = time.perf_counter()
    stats = Runner(load_recipe(recipe)).run().stats.to_dict()
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 3),
        "import_s": round(import_s, 3),
        "peak_rss_mb": peak_rss_mb(),
        "rows_in": stats["source"]["rows"],
        "rows_out": stats["outputs"][0]["rows"].get("train", 0),
        "computed": {s["name"]: s["computed"] for s in stats["stages"]},
    }


def child_polars(src: str, out: str) -> dict:
    import polars as pl

    t0 = time.perf_counter()
    df = pl.read_ndjson(src)
    df = df.with_columns(
        pl.col("question").alias("problem"),
        pl.col("answer").str.extract(r"####\s*(.+)$").alias("final"),
        pl.col("question").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars().alias("_norm"),
    )
    df = df.unique("_norm", keep="first", maintain_order=True).filter(pl.sql_expr(WHERE))
    df = df.select(
        pl.concat_list(
            pl.struct(pl.lit("user").alias("role"), pl.col("problem").alias("content")),
            pl.struct(pl.lit("assistant").alias("role"), pl.col("answer").alias("content")),
        ).alias("messages"),
        "id",
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    df.write_parquet(Path(out) / "train-00000-of-00001.parquet", compression="zstd")
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "peak_rss_mb": peak_rss_mb(), "rows_out": df.height}


def spawn(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, plus every run's wall time and the highest peak RSS."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    mid = dict(ordered[len(ordered) // 2])
    mid["walls_s"] = [r["wall_s"] for r in runs]
    mid["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return mid


def fresh(d: Path) -> None:
    for name in ("work", "out", "raw-out"):
        shutil.rmtree(d / name, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported")
    ap.add_argument("--replay", action="store_true", help="add a generate stage on a replay engine (existing traces)")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        res = child_tracepipe(rest[0]) if kind == "tracepipe" else child_polars(rest[0], rest[1])
        print(json.dumps(res))
        return
    result: dict = {
        "data": f"GSM8K train replicated to N rows with distinct ids (replicas suffixed '(variant k)'; every 10th row an exact duplicate); stages: exact dedup -> filter[{WHERE}]"
                + (" -> generate[replay]" if a.replay else "") + " -> sft-messages",
        "repeats": a.repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in (a.small, a.rows):
            d = Path(tmp) / f"n{n}"
            d.mkdir()
            src = d / "src.jsonl"
            write_jsonl(src, make_rows(n))
            recipe = write_recipe(d, src, a.replay)
            inc_dir: Path | None = None
            if n == a.rows:
                # the incremental rerun's own workdir: the state a full run over n rows left, then
                # 1% new rows appended to its source; restored before each incremental run
                inc_dir = Path(tmp) / "inc"
                inc_dir.mkdir()
                inc_src = inc_dir / "src.jsonl"
                write_jsonl(inc_src, make_rows(n))
                inc_recipe = write_recipe(inc_dir, inc_src, a.replay)
                spawn("tracepipe", str(inc_recipe))
                for name in ("work", "out"):
                    shutil.copytree(inc_dir / name, inc_dir / "state" / name, symlinks=True)
                write_jsonl(inc_src, make_rows(n) + make_rows(n // 100, start=10_000_000))
            fulls, raws, incs, sames = [], [], [], []
            # full and incremental runs alternate, so both meet the same drift in machine speed
            for _ in range(a.repeats):
                fresh(d)  # each full run a first run: empty workdir, no output yet
                fulls.append(spawn("tracepipe", str(recipe)))
                sames.append(spawn("tracepipe", str(recipe)))  # a rerun with nothing new
                raws.append(spawn("polars", str(src), str(d / "raw-out")))
                if inc_dir is not None:
                    fresh(inc_dir)
                    for name in ("work", "out"):
                        shutil.copytree(inc_dir / "state" / name, inc_dir / name, symlinks=True)
                    incs.append(spawn("tracepipe", str(inc_recipe)))
            full, raw = median_run(fulls), median_run(raws)
            full["rows_per_s"] = round(n / full["wall_s"], 1)
            raw["rows_per_s"] = round(n / raw["wall_s"], 1)
            same = median_run(sames)
            entry = {"tracepipe_full": full, "polars_raw": raw, "tracepipe_vs_polars_wall": round(full["wall_s"] / raw["wall_s"], 2),
                     "tracepipe_no_change": same, "no_change_wall_share_of_full": round(same["wall_s"] / full["wall_s"], 3)}
            if incs:
                inc = median_run(incs)
                entry["tracepipe_incremental_1pct"] = inc
                entry["incremental_wall_share_of_full"] = round(inc["wall_s"] / full["wall_s"], 3)
            result[f"n={n}"] = entry
        result["peak_rss_ratio_big_vs_small"] = round(
            result[f"n={a.rows}"]["tracepipe_full"]["peak_rss_mb"] / result[f"n={a.small}"]["tracepipe_full"]["peak_rss_mb"], 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
