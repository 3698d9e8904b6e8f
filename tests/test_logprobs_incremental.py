"""The ``logprobs`` stage through the real runner: incremental runs and resume after ``kill -9``.

New rollouts get scored, old ones come from the store unchanged; execution-only parameters
(batch size, the guard) keep the cache; a killed run finishes without rescoring committed rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from tests.fixtures.logprobs_data import logprobs_recipe, rollout_rows, write_jsonl
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

LP = {"engine": "teacher", "max_length": 160}


def _run(recipe: Path) -> Any:
    return Runner(load_recipe(recipe)).run().stats


def _by_name(stats: Any, name: str) -> Any:
    return next(s for s in stats.stages if s.name == name)


def _out(tmp: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(tmp / f"out-{name}" / "data").sort("id")


def test_new_rollouts_only_get_new_scoring(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    src = tmp_path / "rollouts.jsonl"
    write_jsonl(src, rollout_rows(6))
    recipe = logprobs_recipe(tmp_path, "inc", src, hf_engines, [{"logprobs": {**LP, "top_k": 3, "batch_size": 4}}])
    st = _by_name(_run(recipe), "logprobs")
    assert (st.computed, st.cached) == (6, 0)
    first = _out(tmp_path, "inc")

    write_jsonl(src, rollout_rows(10))  # 4 new rollouts appended
    st = _by_name(_run(recipe), "logprobs")
    assert (st.computed, st.cached) == (4, 6)
    second = _out(tmp_path, "inc")
    assert second.height == 10
    old = second.filter(pl.col("id").is_in(first["id"].implode()))
    for col in ("token_ids", "loss_mask", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
        assert old[col].to_list() == first[col].to_list(), col

    assert _by_name(_run(recipe), "logprobs").computed == 0
    # execution-only parameters (batch size, the guard) keep the cache
    same = logprobs_recipe(tmp_path, "inc", src, hf_engines, [{"logprobs": {
        **LP, "top_k": 3, "batch_size": 2, "max_batch_tokens": 100, "sft_teacher": "teacher",
    }}])
    st = _by_name(_run(same), "logprobs")
    assert (st.computed, st.cached) == (0, 10) and st.extra["teacher_consistency"] == "verified"
    # parameters that change the output rescore
    more = logprobs_recipe(tmp_path, "inc", src, hf_engines, [{"logprobs": {**LP, "top_k": 5}}])
    assert _by_name(_run(more), "logprobs").computed == 10
    # another scoring teacher is another cache (and the rows say which teacher scored them)
    other = logprobs_recipe(tmp_path, "inc", src, hf_engines, [{"logprobs": {**LP, "engine": "other"}}])
    assert _by_name(_run(other), "logprobs").computed == 10
    assert _out(tmp_path, "inc")["teacher"].n_unique() == 1 and _out(tmp_path, "inc")["teacher"][0] != second["teacher"][0]


def test_generated_rollouts_incremental(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    """Student rollouts from ``generate``: new problems -> new rollouts -> only those are scored."""
    src = tmp_path / "problems.jsonl"
    probs = [{"problem": r["problem"]} for r in rollout_rows(5, start=300)]
    write_jsonl(src, probs[:3])
    stages = [
        {"generate": {"engine": "other", "n": 2, "temperature": 1.0, "max_tokens": 6}},
        {"logprobs": {**LP, "student_engine": "other", "sft_teacher": "teacher"}},
    ]
    recipe = logprobs_recipe(tmp_path, "gen", src, hf_engines, stages)
    stats = _run(recipe)
    assert [s.computed for s in stats.stages] == [3, 6]
    write_jsonl(src, probs)
    stats = _run(recipe)
    assert [(s.computed, s.cached) for s in stats.stages] == [(2, 3), (4, 6)]
    out = pl.read_parquet(tmp_path / "out-gen" / "data")
    assert out.height == 10 and out["generator"].n_unique() == 1


def _parts(work: Path) -> int:
    return sum(1 for _ in work.glob("stages/logprobs-*/part-*.parquet"))


def _committed(work: Path) -> set[str]:
    keys: set[str] = set()
    for p in work.glob("stages/logprobs-*/part-*.parquet"):
        keys.update(pq.read_table(p, columns=["_in_key"]).column(0).to_pylist())
    return keys


def test_resume_after_kill_rescoring_nothing_committed(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    n = 60
    src = write_jsonl(tmp_path / "rollouts.jsonl", rollout_rows(n, start=500))
    stage = {"logprobs": {**LP, "top_k": 2, "batch_size": 1}}
    killed = logprobs_recipe(tmp_path, "killed", src, hf_engines, [stage])
    work = tmp_path / "work-killed"
    proc = subprocess.Popen([sys.executable, "-m", "tracepipe.cli", "run", str(killed), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and _parts(work) < 3:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    done = _committed(work)
    assert 3 <= len(done) < n
    st = _by_name(_run(killed), "logprobs")
    assert (st.computed, st.cached) == (n - len(done), len(done))  # nothing committed is scored again
    resumed = _out(tmp_path, "killed")

    clean = logprobs_recipe(tmp_path, "clean", src, hf_engines, [stage])
    _run(clean)
    ref = _out(tmp_path, "clean")
    assert resumed.height == ref.height == n
    assert resumed["token_ids"].to_list() == ref["token_ids"].to_list()
    assert resumed["loss_mask"].to_list() == ref["loss_mask"].to_list()
    assert resumed["teacher_topk_ids"].to_list() == ref["teacher_topk_ids"].to_list()
    for a, b in zip(resumed["teacher_logprobs"].to_list(), ref["teacher_logprobs"].to_list()):
        np.testing.assert_allclose(np.asarray(a[1:]), np.asarray(b[1:]), atol=1e-5)
