"""The ``generate`` stage keeps an OpenAI-compatible server's slots full, through the Runner.

A real local HTTP server in its own process (``benchmarks/latency_server.py``) answers after a
long-tailed latency (lognormal, sigma 0.8) drawn from a hash of each request and integrates the
requests in flight over time. Checked at the server: never more than ``concurrency`` in flight,
a time-weighted mean close to it, every row asked once. Then a 429 storm (:class:`CountingServer`
refuses whatever is above 3 in flight): the engine narrows its window, loses no row, and the
output equals the calm run's.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from tests.fixtures.openai_servers import CountingServer
from tracepipe import DATA_DIR
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

pytestmark = pytest.mark.slow

ROWS, CONC = 160, 8


def latency(body: dict[str, Any]) -> float:
    """Long-tailed (lognormal, sigma 0.8) and deterministic per request."""
    h = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
    u = (int.from_bytes(h[:8], "big") + 0.5) / 2**64
    z = math.sqrt(2) * _erfinv(2 * u - 1)
    return min(0.6, max(0.02, 0.12 * math.exp(0.8 * z)))


def _erfinv(y: float) -> float:
    a = 0.147
    ln = math.log(1 - y * y)
    t = 2 / (math.pi * a) + ln / 2
    return math.copysign(math.sqrt(math.sqrt(t * t - ln / a) - t), y)


def _run(tmp: Path, name: str, base_url: str) -> tuple[dict[str, Any], pl.DataFrame]:
    recipe = {
        "name": name, "workdir": str(tmp / name),
        "source": [{"path": str(DATA_DIR / "sources" / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": ROWS}],
        "engines": {"api": {"kind": "openai", "base_url": base_url, "model": "fake", "concurrency": CONC,
                            "fingerprint": "fake-v1", "journal": False, "backoff": {"base": 0.05, "max": 0.4}}},
        "stages": [{"generate": {"engine": "api", "n": 1, "max_tokens": 32, "batch_size": 16}}],
        "outputs": [],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = Runner(load_recipe(path)).run()
    return res.stats.to_dict(), res.final_frame().collect()


def test_slots_stay_full_from_first_to_last_request(tmp_path: Path) -> None:
    # the latency server runs in its own process, so it never waits on the client's GIL
    from benchmarks.latency_server import running_server

    with running_server("lognormal", latency=0.2, sigma=0.8) as srv:
        stats, rows = _run(tmp_path, "calm", srv.base_url)
        seen = srv.stats()
    assert rows.height == ROWS and seen["requests"] == seen["answered"] == ROWS  # every row asked once
    assert seen["max_in_flight"] == CONC  # never more than `concurrency`
    # time-weighted over first arrival to last answer (the unavoidable tail included): the slots
    # stay full while rows remain; a batch-synchronous client keeps about 0.6 of them busy here
    assert seen["mean_in_flight"] >= 0.85 * CONC, seen
    gen = stats["stages"][0]
    assert gen["parts_committed"] >= ROWS // 16  # committed as it went, in bounded parts
    usage = gen["engines"]["api"]
    assert usage["ok_requests"] == ROWS and usage["requests_per_s"] > 0


def test_a_429_storm_slows_down_and_loses_nothing(tmp_path: Path) -> None:
    with CountingServer(delay=latency) as calm_server:
        _, calm = _run(tmp_path, "calm", calm_server.base_url)
    with CountingServer(delay=latency, storm_inflight=3, storm_headers={"Retry-After": "0.05"}) as server:
        stats, stormy = _run(tmp_path, "storm", server.base_url)
        refused = sum(1 for c in server.chat_requests() if c.status == 429)
    usage = stats["stages"][0]["engines"]["api"]
    assert refused > 0 and usage["rate_limited"] == refused
    assert usage["window_min"] < CONC  # the window went down
    cols = [c for c in calm.columns if c not in ("_key", "_parent")]
    assert stormy.height == calm.height == ROWS
    assert stormy.select(cols).sort("id").equals(calm.select(cols).sort("id"))


TOO_LONG = ("This model's maximum context length is 64 tokens. However, your prompt contains at least 900 input "
            "tokens, which exceeds this limit even without any output tokens.")


def test_every_prompt_too_long_stops_the_stage_at_once(tmp_path: Path) -> None:
    """A context no prompt fits (a server started with a small max_model_len) is not a row error
    repeated a million times: after the first TOO_LONG_STOP refusals with none that fitted, the
    stage stops with one message naming the engine; the refused rows are not asked again."""
    from tracepipe.engines.base import TOO_LONG_STOP
    from tracepipe.pipeline.runner import RunFailed

    with CountingServer(fail_status=400, fail_message=TOO_LONG) as srv:
        with pytest.raises(RunFailed) as ei:
            _run(tmp_path, "too-long", srv.base_url)
        sent = len(srv.chat_requests())
    msg = str(ei.value)
    assert "'api'" in msg and "longer than the server's context" in msg and "900 tokens" in msg, msg
    assert TOO_LONG_STOP <= sent <= TOO_LONG_STOP + 2 * CONC + 16, sent  # not ROWS requests


def test_some_prompts_too_long_drop_only_those_rows(tmp_path: Path) -> None:
    """Prompts that fit go through; the ones that do not are dropped with their reason."""
    with CountingServer() as srv:  # the first GSM8K problem (Natalia) does not fit
        srv.refusal = lambda body: (  # type: ignore[method-assign]
            {"error": {"message": TOO_LONG}} if "Natalia" in json.dumps(body.get("messages")) else None)
        stats, rows = _run(tmp_path, "some-too-long", srv.base_url)
    gen = stats["stages"][0]
    assert rows.height == ROWS - 1
    assert any(k.startswith("generate: prompt too long") for k in gen["dropped"]), gen["dropped"]
