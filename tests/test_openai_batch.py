"""The ``openai-batch`` engine against a local Batch API stand-in (:class:`BatchServer`).

Counted at the server: every request is sent once (a failed or expired one again, alone, within
``max_resubmits``); a run killed with ``kill -9`` while jobs are pending (or while a batch is
being created) re-attaches to its jobs and submits no request twice, and its output equals an
uninterrupted run's; switching a stage between ``openai`` and ``openai-batch`` reuses every
committed row; the key reaches the server in the ``Authorization`` header only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from tests.fixtures.openai_servers_batch import BatchServer, RequestFault
from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl
from tracepipe.cli import app
from tracepipe.engines import build_engine
from tracepipe.errors import RunFailed
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

KEY_ENV, KEY = "TP_BATCH_TEST_KEY", "sk-batch-3f9a1c7e5b2d4a6c8e0f1a2b"


def engine(kind: str, base_url: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": kind, "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                           "backoff": {"base": 0.05, "max": 0.2}}
    if kind == "openai-batch":
        cfg.update(poll_s=0.05, gather_s=0.1)
    cfg.update(kw)
    return cfg


def write_recipe(tmp: Path, name: str, eng: dict[str, Any], rows: int, n: int, workdir: str | None = None, **top: Any) -> Path:
    recipe = {
        "name": name,
        "workdir": str(tmp / (workdir or name) / "work"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k", "limit": rows}],
        "engines": {"api": eng},
        "stages": [{"generate": {"engine": "api", "n": n, "temperature": 0.7, "max_tokens": 64, "batch_size": 3}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp / name / "out")}],
        **top,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(path: Path) -> tuple[dict[str, Any], pl.DataFrame]:
    res = Runner(load_recipe(path)).run()
    return res.stats.to_dict(), res.final_frame().collect()


def request_id(body: dict[str, Any]) -> tuple[str, int]:
    """(chat, seed): one sample of one problem."""
    return json.dumps(body["messages"], sort_keys=True), int(body["seed"])


def sent(srv: BatchServer) -> list[tuple[str, int]]:
    return [request_id(line["body"]) for line in srv.lines_sent()]


def no_key_anywhere(root: Path, *texts: str) -> None:
    files = [p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()]
    assert not any(KEY in t for t in [*files, *texts])


# -- fingerprint and recipes (no server) -----------------------------------------------------
def test_batch_and_online_engines_share_the_fingerprint(tmp_path: Path) -> None:
    pinned = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "fingerprint": "teacher-v1", "extra_body": {"top_k": 5}}
    a = build_engine({"kind": "openai", **pinned})
    b = build_engine({"kind": "openai-batch", **pinned, "max_requests_per_batch": 10, "poll_s": 1})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint().startswith("teacher-v1+opts:")
    assert build_engine({"kind": "openai-batch", **pinned, "extra_body": {}}).fingerprint() == "teacher-v1"
    assert b.capacity() == 10 * 16 and b.batch_priced and not a.batch_priced


def test_recipe_validation_plan_and_schema(tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9/v1"
    ok = write_recipe(tmp_path, "ok", engine("openai-batch", dead, fingerprint="teacher-v1"), 5, 2)
    assert CliRunner().invoke(app, ["validate", str(ok)]).exit_code == 0
    res = CliRunner().invoke(app, ["plan", str(ok), "--json"])  # offline: the pinned fingerprint
    assert res.exit_code == 0, res.output
    assert '"to_compute": 5' in res.output
    bad = write_recipe(tmp_path, "bad", engine("openai-batch", dead, max_requests_per_batch=0, poll_seconds=3), 5, 2)
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "max_requests_per_batch" in res.output and "poll_seconds" in res.output
    key = "sk-abcdefabcdefabcdef123456"
    res = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, "key", engine("openai-batch", dead, api_key=key), 5, 2))])
    assert res.exit_code == 2 and "api_key_env" in res.output and key not in res.output
    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0 and "engine_openai-batch" in res.output and "max_batch_bytes" in res.output


# -- a run, and switching kinds ----------------------------------------------------------------
def test_switching_between_openai_and_openai_batch_reuses_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    rows, n, per_job = 10, 2, 6
    with BatchServer(batch_delay=0.1, require_key=KEY) as srv:
        # batch first; the fingerprint comes from the server's /v1/models (nothing pinned)
        batch = engine("openai-batch", srv.base_url, max_requests_per_batch=per_job, max_jobs_in_flight=2)
        stats, out_batch = run(write_recipe(tmp_path, "a", batch, rows, n))
        assert not srv.chat_requests()
        assert sorted(sent(srv)) == sorted(set(sent(srv))) and len(sent(srv)) == rows * n  # each sample once
        jobs = srv.batch_list()
        assert len(jobs) == math.ceil(rows * n / per_job) and all(len(b.lines) <= per_job for b in jobs)
        assert all(b.status == "completed" for b in jobs)
        gen = stats["stages"][0]
        usage = gen["engines"]["api"]
        assert usage["jobs_submitted"] == usage["jobs_completed"] == len(jobs)
        assert usage["requests_done"] == rows * n and usage["requests_failed"] == usage["requests_resubmitted"] == 0
        # the tokens of the rows are the server's `usage`
        billed = [line["response"]["body"]["usage"] for b in jobs for line in srv_output(srv, b)]
        assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in billed) == gen["extra"]["prompt_tokens"]
        assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in billed) == gen["tokens"]
        assert out_batch.height == rows * n and out_batch["reasoning"].null_count() == 0

        # the same stage online, same workdir: every row is committed, nothing is sent
        n_seen, n_jobs = len(srv.seen), len(jobs)
        online = engine("openai", srv.base_url, concurrency=4)
        stats, out = run(write_recipe(tmp_path, "b", online, rows, n, workdir="a"))
        assert stats["stages"][0]["computed"] == 0 and stats["stages"][0]["cached"] == rows
        assert not srv.chat_requests() and len(srv.batch_list()) == n_jobs
        assert out.equals(out_batch)

        # online first in a fresh workdir: the same rows (the requests are built alike), then batch: nothing sent
        stats, out = run(write_recipe(tmp_path, "c", online, rows, n))
        assert len(srv.chat_requests()) == rows * n and out.equals(out_batch)
        assert sorted(request_id(s.body) for s in srv.chat_requests()) == sorted(sent(srv))
        n_chat = len(srv.chat_requests())
        stats, out = run(write_recipe(tmp_path, "d", batch, rows, n, workdir="c"))
        assert stats["stages"][0]["computed"] == 0 and out.equals(out_batch)
        assert len(srv.batch_list()) == n_jobs and len(srv.chat_requests()) == n_chat
        assert not [s for s in srv.seen[n_seen:] if s.method == "POST" and "/batches" in s.path]
    assert {s.auth for s in srv.seen if "/models" not in s.path} == {f"Bearer {KEY}"}
    no_key_anywhere(tmp_path)


def srv_output(srv: BatchServer, batch: Any) -> list[dict[str, Any]]:
    raw = srv.files[batch.output_file_id]["bytes"] if batch.output_file_id else b""
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_failed_and_expired_requests_are_resubmitted_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    rows = 8
    problems = [r["question"][:40] for r in read_jsonl(GSM8K_TRAIN, rows)]
    with BatchServer(batch_delay=0.1, require_key=KEY) as srv:
        srv.faults += [
            RequestFault(problems[1], "failed", status=500),          # once: sent again
            RequestFault(problems[2], "expired"),                     # once: sent again
            RequestFault(problems[3], "failed", status=503, times=99),  # always: given up after 1 + max_resubmits
            RequestFault(problems[4], "failed", status=400, times=99),  # a 4xx: never sent again
        ]
        eng = engine("openai-batch", srv.base_url, max_resubmits=2)
        stats, out = run(write_recipe(tmp_path, "f", eng, rows, 1, max_error_rate=0.5))
        jobs = srv.batch_list()
    per_problem = Counter(next(i for i, p in enumerate(problems) if p in chat) for chat, _ in sent(srv))
    assert per_problem == {0: 1, 1: 2, 2: 2, 3: 3, 4: 1, 5: 1, 6: 1, 7: 1}
    assert [b.status for b in jobs] == ["expired", "completed", "completed"]
    # later jobs hold only what failed or expired before: never a request that was answered
    first = {request_id(line["body"]) for line in jobs[0].lines}
    retried = [{request_id(line["body"]) for line in b.lines} for b in jobs[1:]]
    assert len(retried[0]) == 3 and retried[1] < retried[0] < first
    assert all(problems[3] in chat for chat, _ in retried[1])
    usage = stats["stages"][0]["engines"]["api"]
    assert usage["jobs_expired"] == 1 and usage["requests_resubmitted"] == 4 and usage["requests_failed"] == 2
    assert out.height == rows - 2 and stats["stages"][0]["errors"] == 2
    errors = pl.read_parquet(tmp_path / "f" / "work" / "quarantine" / "*.parquet")["_error"].to_list()
    assert len(errors) == 2
    assert sum("failed after 3 job(s): HTTP 503: scripted failure" in e for e in errors) == 1
    assert sum("failed: HTTP 400: scripted failure" in e for e in errors) == 1
    no_key_anywhere(tmp_path)


# -- kill -9 -------------------------------------------------------------------------------------
ROWS, N, PER_JOB = 16, 2, 6  # 32 requests: 6 jobs, 2 in flight at once


def cli() -> list[str]:
    return [sys.executable, "-m", "tracepipe.cli"]


def env() -> dict[str, str]:
    return {**os.environ, KEY_ENV: KEY}


def kill_recipe(tmp: Path, name: str, base_url: str) -> Path:
    eng = engine("openai-batch", base_url, max_requests_per_batch=PER_JOB, max_jobs_in_flight=2)
    return write_recipe(tmp, name, eng, ROWS, N)


def parts(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("stages/generate-*/part-*.parquet"))


def output(out_dir: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((out_dir / "data").glob("*.parquet"))])


def kill_when(proc: subprocess.Popen[bytes], ready: Any, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    assert ready(), "the kill point never came"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun_and_compare(tmp: Path, srv: BatchServer, log1: Path) -> dict[str, Any]:
    """Run the killed recipe to the end, then an uninterrupted one in a fresh workdir; compare."""
    n1 = len(srv.batch_list())
    r2 = subprocess.run([*cli(), "run", str(tmp / "resumed.yaml"), "--no-progress"], env=env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    both = Counter(sent(srv))
    n2 = len(srv.batch_list())
    r3 = subprocess.run([*cli(), "run", str(kill_recipe(tmp, "fresh", srv.base_url)), "--no-progress"],
                        env=env(), capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0, r3.stderr[-3000:]
    fresh = srv.batch_list()[n2:]
    # no request went out twice: every sample of every problem in exactly one job, as uninterrupted
    assert len(both) == ROWS * N and set(both.values()) == {1}
    assert n1 < n2 == len(fresh) == math.ceil(ROWS * N / PER_JOB)
    assert output(tmp / "resumed" / "out").equals(output(tmp / "fresh" / "out"))
    assert output(tmp / "fresh" / "out").height == ROWS * N
    stats = json.loads((tmp / "resumed" / "work" / "stats.json").read_text())
    assert {s.auth for s in srv.seen if "/models" not in s.path} == {f"Bearer {KEY}"}
    no_key_anywhere(tmp, r2.stdout, r2.stderr, r3.stdout, r3.stderr, log1.read_text())
    return stats["stages"][0]["engines"]["api"]


@pytest.mark.slow
def test_kill9_while_jobs_are_pending_then_rerun_submits_no_job_twice(tmp_path: Path) -> None:
    with BatchServer(batch_delay=1.5, require_key=KEY) as srv:
        recipe = kill_recipe(tmp_path, "resumed", srv.base_url)
        log1 = tmp_path / "run1.log"
        with open(log1, "wb") as fh:
            proc = subprocess.Popen([*cli(), "run", str(recipe), "--no-progress"], env=env(), stdout=fh, stderr=subprocess.STDOUT)
        workdir = tmp_path / "resumed" / "work"
        # killed once the first two jobs are committed and the next two are submitted, not finished
        kill_when(proc, lambda: len(parts(workdir)) >= 2 and len(srv.batch_list()) == 4 and srv.pending() == 2, log1)
        assert list(workdir.glob("engines/openai-batch-*/jobs-*.jsonl"))
        at_kill = len(srv.batch_list())
        usage = rerun_and_compare(tmp_path, srv, log1)
    assert usage["jobs_attached"] == 2 and usage["jobs_submitted"] == math.ceil(ROWS * N / PER_JOB) - at_kill


@pytest.mark.slow
def test_kill9_while_a_batch_is_being_created_then_rerun_finds_it(tmp_path: Path) -> None:
    with BatchServer(batch_delay=0.5, create_delay=30.0, require_key=KEY) as srv:
        recipe = kill_recipe(tmp_path, "resumed", srv.base_url)
        log1 = tmp_path / "run1.log"
        with open(log1, "wb") as fh:
            proc = subprocess.Popen([*cli(), "run", str(recipe), "--no-progress"], env=env(), stdout=fh, stderr=subprocess.STDOUT)
        # the batch exists at the provider, its id never reached the client
        kill_when(proc, lambda: len(srv.batch_list()) == 1, log1)
        srv.create_delay = 0.0
        usage = rerun_and_compare(tmp_path, srv, log1)
    assert usage["jobs_attached"] == 1


def test_a_budget_stops_dispatching_and_a_rerun_with_more_repeats_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``budget: {max_requests}`` on an ``openai-batch`` engine (tracepipe.spend): the engine queues
    no request past it, what was queued is collected and committed, and a rerun with a raised
    budget sends only the rest; the spend is priced at the batch discount."""
    monkeypatch.setenv(KEY_ENV, KEY)
    rows, limit = 12, 5
    price = {"input_per_mtok": 1.0, "output_per_mtok": 4.0, "batch_discount": 0.5}
    with BatchServer(batch_delay=0.1, require_key=KEY) as srv:
        eng = engine("openai-batch", srv.base_url, price=price, budget={"max_requests": limit})
        with pytest.raises(RunFailed, match="budget"):
            run(write_recipe(tmp_path, "b", eng, rows, 1))
        first = sent(srv)
        assert 0 < len(first) <= limit and len(set(first)) == len(first)
        committed = pl.concat([pl.read_parquet(p) for p in parts(tmp_path / "b" / "work")])
        assert committed.height == len(first)  # every answer that came back is committed
        eng["budget"] = {"max_requests": 100}
        stats, out = run(write_recipe(tmp_path, "b", eng, rows, 1))
        assert out.height == rows and sorted(sent(srv)) == sorted(set(sent(srv))) and len(sent(srv)) == rows
        billed = [line["response"]["body"]["usage"] for b in srv.batch_list() for line in srv_output(srv, b)]
    spend = stats["spend"]["engines"]["api"]
    assert spend["batch_priced"] and spend["workdir"]["requests"] == rows
    tokens = (sum(u["prompt_tokens"] for u in billed), sum(u["completion_tokens"] for u in billed))
    assert (spend["workdir"]["prompt_tokens"], spend["workdir"]["completion_tokens"]) == tokens
    assert spend["workdir"]["usd"] == pytest.approx((tokens[0] * 1.0 + tokens[1] * 4.0) / 1e6 * 0.5, abs=1e-6)
