"""``kill -9`` in the middle of generation, rerun: no committed (or finished) request is paid twice.

``tracepipe run recipe.yaml`` runs as a subprocess against a :class:`CountingServer` (a
deterministic OpenAI-compatible server in this process, 0.25 s per request) through the
``openai`` engine; it is killed with SIGKILL once some batches are committed, run again to the
end, and compared with an uninterrupted run in a fresh workdir. Requests are counted at the server.
"""

from __future__ import annotations

import json
import os
import shutil
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

from tests.fixtures.openai_servers import CountingServer
from tracepipe import DATA_DIR

pytestmark = pytest.mark.slow

ROWS, N, BATCH = 24, 2, 3
KEY_ENV, KEY = "TP_RESUME_TEST_KEY", "sk-resume-7d1e0c9b5a4f4e2d8c6b"


def tracepipe_cmd() -> list[str]:
    exe = shutil.which("tracepipe")
    return [exe] if exe else [sys.executable, "-m", "tracepipe.cli"]


def write_recipe(tmp: Path, name: str, base_url: str) -> Path:
    recipe = {
        "name": name,
        "workdir": str(tmp / name / "work"),
        "source": [{"path": str(DATA_DIR / "sources" / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": ROWS}],
        "engines": {"api": {
            "kind": "openai", "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
            "concurrency": 2, "fingerprint": "fake-teacher-v1", "backoff": {"base": 0.05, "max": 0.5},
        }},
        "stages": [{"generate": {"engine": "api", "n": N, "temperature": 0.7, "max_tokens": 64, "batch_size": BATCH}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp / name / "out")}],
    }
    path = tmp / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e[KEY_ENV] = KEY
    return e


def parts(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("stages/generate-*/part-*.parquet"))


def committed_keys(workdir: Path) -> set[str]:
    keys: set[str] = set()
    for p in parts(workdir):
        keys.update(pl.read_parquet(p, columns=["_in_key"])["_in_key"].to_list())
    return keys


def committed_chats(workdir: Path) -> set[str]:
    """The chats (``messages`` as sent) of the rows committed to the generate store."""
    chats: set[str] = set()
    for p in parts(workdir):
        chats.update(json.dumps(m, sort_keys=True) for m in pl.read_parquet(p, columns=["messages"])["messages"].to_list())
    return chats


def request_id(body: dict[str, Any]) -> tuple[str, int]:
    """(problem text, seed): one sample of one problem."""
    return json.dumps(body["messages"], sort_keys=True), int(body["seed"])


def output(out_dir: Path) -> pl.DataFrame:
    files = sorted((out_dir / "data").glob("*.parquet"))
    assert files, f"no output shards in {out_dir}"
    return pl.concat([pl.read_parquet(f) for f in files])


def test_kill9_mid_generation_then_rerun_pays_no_finished_request_twice(tmp_path: Path) -> None:
    with CountingServer(delay=0.25, model_id="fake-teacher", require_key=KEY) as srv:
        recipe = write_recipe(tmp_path, "resumed", srv.base_url)
        workdir = tmp_path / "resumed" / "work"

        # run 1: killed with SIGKILL once two batches are committed (mid third batch)
        log1 = open(tmp_path / "run1.log", "wb")
        proc = subprocess.Popen([*tracepipe_cmd(), "run", str(recipe), "--no-progress"], env=env(), stdout=log1, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(parts(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # into the next batch: some of its requests finish, none is committed
        assert proc.poll() is None, f"run 1 ended before it could be killed:\n{(tmp_path / 'run1.log').read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait()
        log1.close()
        assert proc.returncode == -signal.SIGKILL
        done_keys = committed_keys(workdir)
        done_chats = committed_chats(workdir)
        assert 2 * BATCH <= len(done_keys) == len(done_chats) < ROWS
        run1 = [s for s in srv.chat_requests()]
        run1_ok = {request_id(s.body) for s in run1 if s.status == 200 and s.t_done is not None}
        # answered well before the kill: certainly received (and journaled) by the engine
        run1_safe = {request_id(s.body) for s in run1 if s.t_done is not None and s.t_done < t_kill - 0.2}
        committed_requests = len(done_keys) * N
        assert len(run1_ok) > committed_requests, "the kill should land after some uncommitted requests finished"
        journals = list(workdir.glob("engines/openai-*/journal-*.jsonl"))
        assert journals and sum(len(p.read_text().splitlines()) for p in journals) >= committed_requests

        # run 2: to the end
        n1 = len(srv.chat_requests())
        r2 = subprocess.run([*tracepipe_cmd(), "run", str(recipe), "--no-progress"], env=env(), capture_output=True, text=True, timeout=300)
        assert r2.returncode == 0, r2.stderr[-3000:]
        run2 = srv.chat_requests()[n1:]
        assert committed_keys(workdir) >= done_keys

        # run 3: uninterrupted, fresh workdir, same server
        fresh = write_recipe(tmp_path, "fresh", srv.base_url)
        n2 = len(srv.chat_requests())
        r3 = subprocess.run([*tracepipe_cmd(), "run", str(fresh), "--no-progress"], env=env(), capture_output=True, text=True, timeout=300)
        assert r3.returncode == 0, r3.stderr[-3000:]
        run3 = srv.chat_requests()[n2:]

    # every request of runs 1+2 is one sample of one problem; count them at the server
    both = Counter(request_id(s.body) for s in run1 + run2)
    assert len(both) == ROWS * N == len({request_id(s.body) for s in run3}) == len(run3)
    twice = {rid for rid, c in both.items() if c > 1}
    # only requests in flight when the process died may be sent again (at most `concurrency`)
    assert len(twice) <= 2
    assert not twice & run1_safe, "a request that had finished in run 1 was sent again"
    assert len(run2) == ROWS * N - len(set(map(request_id, (s.body for s in run1)))) + len(twice)
    # committed rows: each problem's samples were asked exactly once, all in run 1
    per_chat = Counter(request_id(s.body)[0] for s in run1 + run2)
    assert all(per_chat[c] == N for c in done_chats)
    assert not done_chats & {request_id(s.body)[0] for s in run2}
    print(json.dumps({
        "rows": ROWS, "n": N, "batch_size": BATCH, "committed_rows_at_kill": len(done_keys),
        "requests_run1": len(run1), "answered_run1": len(run1_ok), "requests_run2": len(run2),
        "sent_twice": len(twice), "requests_uninterrupted": len(run3),
    }))
    assert all(s.status == 200 for s in run2 + run3)

    # the resumed dataset equals the uninterrupted one
    a, b = output(tmp_path / "resumed" / "out"), output(tmp_path / "fresh" / "out")
    assert a.height == ROWS * N
    assert a.equals(b)

    # the key went to the server only
    assert {s.auth for s in run1 + run2 + run3} == {f"Bearer {KEY}"}
    texts = [r2.stdout, r2.stderr, r3.stdout, r3.stderr, (tmp_path / "run1.log").read_text()]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(KEY in t for t in texts)
