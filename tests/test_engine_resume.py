"""``kill -9`` a running ``tracepipe run`` at several points, run again: same rows, no repeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from tests.fixtures.recipes import GSM8K_TRAIN, write_recipe

STAGES = [
    {"map": {"store": True, "set": {"plen": "length(problem)"}, "batch_size": 25}},
    {"dedup": {"method": "exact"}},
    {"map": {"store": True, "set": {"response": "solution", "reasoning": "CONCAT('Let me think. ', problem)"}, "batch_size": 25}},
    {"filter": {"store": True, "where": "plen < 600"}},
]


def _recipe(tmp_path: Path, name: str) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name,
        "workdir": str(tmp_path / f"work-{name}"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k"}],
        "stages": STAGES,
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / f"out-{name}"), "shard_size_mb": 1}],
    })


def _committed_keys(work: Path) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for d in sorted((work / "stages").glob("*")):
        parts = sorted(d.glob("part-*.parquet"))
        keys[d.name] = set()
        for p in parts:
            keys[d.name].update(pq.read_table(p, columns=["_in_key"]).column(0).to_pylist())
    return keys


def _parts(work: Path) -> int:
    return sum(1 for _ in (work / "stages").glob("*/part-*.parquet")) if (work / "stages").exists() else 0


def _cli(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tracepipe.cli", "run", str(recipe), "--no-progress", *args]


def _run_and_kill(recipe: Path, work: Path, after_parts: int) -> None:
    proc = subprocess.Popen(_cli(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if _parts(work) >= after_parts:
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _output(out: Path) -> pl.DataFrame:
    files = sorted((out / "data").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files])


def test_kill_nine_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    ref = _recipe(tmp_path, "ref")
    subprocess.run(_cli(ref), check=True, capture_output=True)
    expected = _output(tmp_path / "out-ref")

    recipe = _recipe(tmp_path, "killed")
    work = tmp_path / "work-killed"
    # kill in the first stage, later in the first stage, then inside the third stage
    for after in (3, 120, 330):
        before = _parts(work)
        _run_and_kill(recipe, work, after)
        assert _parts(work) >= before  # nothing committed is ever lost
    committed = _committed_keys(work)
    assert sum(len(v) for v in committed.values()) > 0
    stats_run = subprocess.run(_cli(recipe, "--json"), check=True, capture_output=True, text=True)
    import json

    stats = json.loads(stats_run.stdout)
    after = _committed_keys(work)
    for s in stats["stages"]:
        if s["kind"] != "row":
            continue
        d = next(k for k in after if k.startswith(f"{s['name']}-{s['fingerprint']}"))
        # rows committed before the kills were not processed again
        assert s["computed"] == len(after[d]) - len(committed.get(d, set())), (s, d)
        assert s["cached"] > 0 or not committed.get(d)
    row_stages = [s for s in stats["stages"] if s["kind"] == "row"]
    assert sum(s["cached"] for s in row_stages) > 0  # the kills happened after commits...
    assert sum(s["computed"] for s in row_stages) > 0  # ...and before the end
    got = _output(tmp_path / "out-killed")
    assert got.height == expected.height > 0
    assert got.equals(expected)
    # and the shard layout is the same
    assert sorted(p.name for p in (tmp_path / "out-killed" / "data").glob("*")) == sorted(
        p.name for p in (tmp_path / "out-ref" / "data").glob("*")
    )
