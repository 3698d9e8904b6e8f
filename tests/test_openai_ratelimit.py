"""The ``openai`` engine under a streaming runtime: many threads, rate limits, fatal errors.

Real HTTP on 127.0.0.1 against :class:`CountingServer` (tests/fixtures/openai_servers.py), which
counts every chat request it gets and how many are in flight. Covers: ``generate`` from 64
threads at once (the server never sees more than ``concurrency`` in flight, every request is
sent once), the journal keeping what one thread got while others call (``kill -9`` safe), 429
storms (AIMD window, ``Retry-After`` holding the engine, nothing lost, ``max_retries`` not spent
on 429s), ``rpm`` / ``tpm`` token buckets (lower bounds on elapsed time that follow from the
limits), and fatal errors (401 / 403 / 404: stop at once, name the key's variable or the model,
never show the key). Timing bounds are lower bounds from the limits or generous upper bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.openai_servers import CountingServer, Fault
from tracepipe.engines import build_engine
from tracepipe.engines.base import Completion, EngineFatalError, GenerationRequest, SamplingParams
from tracepipe.engines.openai import OpenAIEngine, OpenAIFatalError, _TokenBucket, _Window
from tracepipe.stages.base import StageContext

FAST = {"base": 0.05, "max": 0.2}
KEY_ENV = "TP_RATELIMIT_TEST_KEY"
WRONG_KEY = "sk-wrong-7b3e9f1c2d4a6b8c0e1f3a5b7c9d"


def engine(srv: CountingServer, workdir: Path | None = None, **kw: Any) -> OpenAIEngine:
    kw.setdefault("backoff", FAST)
    kw.setdefault("fingerprint", "fake-teacher-v1")
    cfg = {"kind": "openai", "base_url": srv.base_url, "model": srv.model_id, **kw}
    eng = build_engine(cfg, StageContext(workdir=workdir) if workdir else None)
    assert isinstance(eng, OpenAIEngine)
    return eng


def req(i: int, n: int = 1, max_tokens: int = 32) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "system", "content": "Think step by step."}, {"role": "user", "content": f"What is {i} + {i}?"}],
        n=n,
        sampling=SamplingParams(temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=100 + i),
        key=f"k{i}",
    )


def expected(eng: OpenAIEngine, r: GenerationRequest) -> list[tuple[str, str | None]]:
    """(text, reasoning) of each choice the server gives ``r`` (its answers are deterministic)."""
    code, data = CountingServer().answer(eng._body(r, r.n, r.sampling.seed, r.n > 1))
    assert code == 200
    return [(c["message"]["content"], c["message"]["reasoning"]) for c in data["choices"]]


def got(comps: list[Completion]) -> list[tuple[str, str | None]]:
    return [(c.text, c.reasoning) for c in comps]


def request_id(body: dict[str, Any]) -> tuple[str, int]:
    return json.dumps(body["messages"], sort_keys=True), int(body["seed"])


def jittered(body: dict[str, Any]) -> float:
    """A latency of 10-60 ms, fixed per request (so runs are reproducible)."""
    h = hashlib.sha256(json.dumps(body.get("messages")).encode()).digest()
    return 0.01 + h[0] % 51 / 1000


def run_threads(n: int, target: Any) -> list[Any]:
    """Run ``target(i)`` on ``n`` threads started together; returns results (or exceptions)."""
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generate() call hung"
    return out


# -- many threads --------------------------------------------------------------------------
def test_64_threads_share_8_slots_and_each_request_is_sent_once(tmp_path: Path) -> None:
    with CountingServer(delay=jittered) as srv:
        eng = engine(srv, tmp_path, concurrency=8)
        try:
            assert eng.capacity() == 8

            def calls(t: int) -> list[list[Completion]]:
                return [eng.generate([req(4 * t + j)])[0] for j in range(4)]

            results = run_threads(64, calls)
            usage = eng.usage()
        finally:
            eng.close()
        seen = srv.chat_requests()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for t, res in enumerate(results):
        for j, comps in enumerate(res):
            assert got(comps) == expected(eng, req(4 * t + j))
    ids = [request_id(s.body) for s in seen]
    assert len(ids) == len(set(ids)) == 256 and all(s.status == 200 for s in seen)
    assert 2 <= srv.max_chat_inflight <= 8
    assert usage["requests"] == usage["ok_requests"] == 256
    assert usage["retries"] == usage["rate_limited"] == usage["in_flight"] == 0
    assert usage["completion_tokens"] == sum(s.response["usage"]["completion_tokens"] for s in seen)
    assert usage["prompt_tokens"] == sum(s.response["usage"]["prompt_tokens"] for s in seen)
    assert usage["window"] == 8 and usage["seconds_active"] > 0
    assert usage["requests_per_s"] == pytest.approx(256 / usage["seconds_active"])
    assert usage["tokens_per_s"] == pytest.approx(usage["completion_tokens"] / usage["seconds_active"])
    assert not list(tmp_path.glob("engines/*/journal-*.jsonl"))  # all handed back, all settled at close


def test_concurrent_first_calls_start_one_client(counting_server: CountingServer) -> None:
    eng = engine(counting_server, concurrency=4)
    before = sum(t.name == "tracepipe-openai" for t in threading.enumerate())
    try:
        results = run_threads(16, lambda i: eng.generate([req(i)]))
        assert not [r for r in results if isinstance(r, BaseException)]
        assert sum(t.name == "tracepipe-openai" for t in threading.enumerate()) == before + 1
    finally:
        eng.close()


# -- the journal with concurrent callers ---------------------------------------------------
def test_what_one_thread_got_survives_another_threads_call_and_a_kill(counting_server: CountingServer, tmp_path: Path) -> None:
    srv = counting_server
    first, second = [req(i) for i in range(3)], [req(i) for i in range(3, 6)]
    a = engine(srv, tmp_path)
    run_threads(2, lambda i: a.generate([first, second][i]))
    a.generate([req(9)])  # a later call must not drop what the threads got (not committed yet)
    assert a._journal is not None
    a._journal._fh.close()  # killed here (kill -9): the journal stays as written, its lock released
    assert len(srv.chat_requests()) == 7

    b = engine(srv, tmp_path)
    try:
        out = b.generate(first + second)
        assert b.http_requests == 0 and b.journal_hits == 6
        assert [got(o) for o in out] == [expected(b, r) for r in first + second]
    finally:
        b.close()
    assert len(srv.chat_requests()) == 7
    # b handed back 6; req(9) finished in run a but nobody got it from b: kept for the next run
    (left,) = tmp_path.glob("engines/*/journal-*.jsonl")
    assert [json.loads(line)["k"] for line in left.read_text().splitlines()] == [b.request_key(req(9))]


def test_settle_forgets_committed_rows_and_compacts(counting_server: CountingServer, tmp_path: Path) -> None:
    srv = counting_server
    a = engine(srv, tmp_path)
    a.ensure_started()
    assert a._journal is not None
    a._journal.max_bytes = 2000
    batches = [[req(10 * i + j) for j in range(3)] for i in range(8)]
    for batch in batches[:-1]:
        a.generate(batch)
        assert a.settle(batch) == 3  # the runtime committed these rows
    a.generate(batches[-1])  # not committed when the process dies
    files = list(tmp_path.glob("engines/*/journal-*.jsonl"))
    assert len(files) == 1 and files[0].stat().st_size < 2000 + 3000  # compacted as it went
    a._journal._fh.close()  # kill -9

    b = engine(srv, tmp_path)
    try:
        b.ensure_started()
        assert b._journal is not None and set(b._journal.live) == {b.request_key(r) for r in batches[-1]}
        n = len(srv.chat_requests())
        b.generate(batches[-1] + batches[0])  # the last batch is free, the settled one is asked again
        assert b.journal_hits == 3 and len(srv.chat_requests()) == n + 3
    finally:
        b.close()


def test_unsettled_results_stay_until_close_and_unhanded_ones_outlive_it(tmp_path: Path) -> None:
    with CountingServer(reject_if_contains="What is 2 + 2") as srv:
        a = engine(srv, tmp_path)
        with pytest.raises(Exception, match="HTTP 400"):
            a.generate([req(i) for i in range(4)])  # 0, 1, 3 succeeded but were not handed back
        for i in range(20):
            a.generate([req(100 + i)])
        assert a._journal is not None and len(a._journal.live) == 23
        a.close()
        files = list(tmp_path.glob("engines/*/journal-*.jsonl"))
        assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3
        b = engine(srv, tmp_path)
        try:
            b.generate([req(i) for i in (0, 1, 3)])
            assert b.http_requests == 0 and b.journal_hits == 3
        finally:
            b.close()


# -- 429 storms ----------------------------------------------------------------------------
def test_429_storm_when_crowded_loses_nothing_and_shrinks_the_window() -> None:
    opts = {"delay": 0.05, "storm_inflight": 3, "storm_headers": {"retry-after-ms": "30"}}
    with CountingServer(**opts) as srv:  # type: ignore[arg-type]
        eng = engine(srv, concurrency=8, max_retries=0)  # 429s spend no retry budget
        reqs = [req(i) for i in range(40)]
        try:
            results = run_threads(8, lambda t: eng.generate(reqs[5 * t: 5 * t + 5]))
            usage = eng.usage()
        finally:
            eng.close()
        seen = srv.chat_requests()
    assert not [r for r in results if isinstance(r, BaseException)]
    for t, res in enumerate(results):
        assert [got(c) for c in res] == [expected(eng, r) for r in reqs[5 * t: 5 * t + 5]]
    ok = [request_id(s.body) for s in seen if s.status == 200]
    assert len(ok) == len(set(ok)) == 40  # every row answered, each exactly once
    assert srv.storm_answers > 0 and usage["rate_limited"] == srv.storm_answers
    assert usage["requests"] == len(seen) and usage["ok_requests"] == 40
    assert usage["window_min"] < 8  # the window went down
    assert srv.max_chat_inflight <= 8


def test_429s_for_the_first_second_are_retried_without_a_count_limit() -> None:
    with CountingServer(storm_seconds=1.0) as srv:
        eng = engine(srv, concurrency=4, max_retries=0)
        try:
            t0 = time.monotonic()
            out = eng.generate([req(i) for i in range(10)])
            dt = time.monotonic() - t0
            usage = eng.usage()
        finally:
            eng.close()
    assert [got(o) for o in out] == [expected(eng, req(i)) for i in range(10)]
    assert dt >= 0.9 and usage["rate_limited"] >= 4 and usage["ok_requests"] == 10
    assert usage["window_min"] <= 2


def test_retry_after_holds_every_new_request_of_the_engine(counting_server: CountingServer) -> None:
    srv = counting_server
    srv.delay = 0.2
    srv.script = [Fault(status=429, headers={"retry-after-ms": "600"})]
    eng = engine(srv, concurrency=4)
    try:
        eng.generate([req(i) for i in range(8)])
    finally:
        eng.close()
    seen = sorted(srv.chat_requests(), key=lambda s: s.t)
    limited = next(s for s in seen if s.status == 429)
    assert limited in seen[:4]
    later = seen[4:]
    assert len(later) == 5 and all(s.t >= limited.t + 0.55 for s in later)


def test_rate_limited_without_any_progress_gives_up_fatally() -> None:
    with CountingServer(storm_seconds=1000) as srv:
        eng = engine(srv, concurrency=2, max_retries=0, rate_limit_timeout_s=0.5)
        try:
            t0 = time.monotonic()
            with pytest.raises(EngineFatalError, match="rate_limit_timeout_s"):
                eng.generate([req(i) for i in range(4)])
            assert time.monotonic() - t0 < 10
        finally:
            eng.close()
        assert len(srv.chat_requests()) > 2  # retried past max_retries=0 first


def test_exhausted_quota_is_fatal_at_once(counting_server: CountingServer) -> None:
    srv = counting_server
    body = '{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}'
    srv.script = [Fault(status=429, body=body)]
    eng = engine(srv, concurrency=1)
    try:
        with pytest.raises(EngineFatalError, match="quota"):
            eng.generate([req(i) for i in range(5)])
    finally:
        eng.close()
    assert len(srv.chat_requests()) == 1


# -- rpm / tpm -----------------------------------------------------------------------------
def test_rpm_bounds_the_request_rate(counting_server: CountingServer) -> None:
    rpm, n = 600, 30  # 10 a second, at most one second's worth (10) at once
    rate, burst = rpm / 60, rpm / 60
    eng = engine(counting_server, concurrency=8, rpm=rpm)
    try:
        t0 = time.monotonic()
        eng.generate([req(i) for i in range(n)])
        dt = time.monotonic() - t0
    finally:
        eng.close()
    assert dt >= 0.95 * (n - burst) / rate  # 2 s
    assert dt < 30
    # no interval saw more arrivals than the bucket allows (0.25 s of slack for arrival jitter;
    # unlimited, all 30 arrive within about 0.1 s)
    ts = sorted(s.t for s in counting_server.chat_requests())
    for i in range(len(ts)):
        for j in range(i + 1, len(ts)):
            assert j - i + 1 <= burst + rate * (ts[j] - ts[i] + 0.25) + 1


def test_tpm_bounds_the_token_rate() -> None:
    tpm = 60_000  # 1000 tokens a second, one second's worth at once
    with CountingServer(bill_max_tokens=True) as srv:  # every answer bills max_tokens
        eng = engine(srv, concurrency=8, tpm=tpm)
        try:
            t0 = time.monotonic()
            eng.ensure_started()
            eng.generate([req(i, max_tokens=200) for i in range(20)])
            dt = time.monotonic() - t0
            usage = eng.usage()
        finally:
            eng.close()
        seen = srv.chat_requests()
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 200 * 20
    assert used == sum(s.response["usage"]["total_tokens"] for s in seen)
    # when the last request took its tokens, all the others had used theirs (or more: their
    # reservation, before the answer gave the difference back)
    last = max(s.response["usage"]["total_tokens"] for s in seen)
    rate, capacity = tpm / 60, tpm / 60
    assert dt >= 0.98 * (used - last - capacity) / rate  # about 3.1 s
    assert dt < 60


def test_token_bucket_waits_refills_and_takes_big_costs() -> None:
    async def main() -> tuple[float, float, float]:
        async def sleep(d: float) -> None:
            await asyncio.sleep(d)

        b = _TokenBucket(600)  # 10/s, capacity 10
        t0 = time.monotonic()
        for _ in range(10):
            await b.acquire(1, sleep)
        quick = time.monotonic() - t0
        await b.acquire(5, sleep)  # empty: 0.5 s
        half = time.monotonic() - t0
        await b.acquire(25, sleep)  # above capacity: waits for a full bucket, leaves a debt
        await b.acquire(1, sleep)  # pays the debt first
        return quick, half, time.monotonic() - t0

    quick, half, total = asyncio.run(main())
    assert quick < 0.5 and half >= 0.45 and total >= 0.45 + 1.0 + 1.5


def test_window_is_aimd() -> None:
    async def main() -> None:
        w = _Window(8)
        seqs = [await w.acquire() for _ in range(8)]
        assert w.in_flight == 8
        waiter = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        assert w.on_rate_limited(seqs[0]) and w.slots == 4
        assert not w.on_rate_limited(seqs[1])  # sent before the cut: no second cut
        for _ in range(8):
            w.release()
        await asyncio.sleep(0)
        assert waiter.done() and w.in_flight == 1
        s9 = waiter.result()
        assert w.on_rate_limited(s9) and w.slots == 2 and w.min_size == 2
        for _ in range(2):
            w.on_success()
        assert w.slots == 3
        for _ in range(100):
            w.on_success()
        assert w.slots == 8
        w.release()
        w.fail(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            await w.acquire()

    asyncio.run(main())


# -- fatal errors --------------------------------------------------------------------------
@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_stops_at_once_names_the_variable_never_the_key(
    status: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    opts: dict[str, Any] = {"require_key": "sk-right-key-0000000000000000"} if status == 401 else {"fail_status": 403}
    with CountingServer(echo_key_in_errors=True, delay=0.05, **opts) as srv:
        eng = engine(srv, concurrency=8, api_key_env=KEY_ENV, max_retries=5)
        try:
            t0 = time.monotonic()
            with pytest.raises(EngineFatalError) as ei:
                eng.generate([req(i) for i in range(20)])
            assert time.monotonic() - t0 < 10
            n = len(srv.chat_requests())
            assert 1 <= n <= 8  # not 20 rows x retries
            # every later call fails the same way without sending anything
            with pytest.raises(EngineFatalError) as again:
                eng.generate([req(99)])
            with pytest.raises(EngineFatalError):
                list(eng.generate_iter([req(98)], return_exceptions=True))
            assert str(again.value) == str(ei.value) and len(srv.chat_requests()) == n
        finally:
            eng.close()
    err = ei.value
    assert isinstance(err, OpenAIFatalError) and err.status == status
    msg = str(err)
    assert KEY_ENV in msg and f"HTTP {status}" in msg and "127.0.0.1" in msg
    for text in (msg, repr(err), err.detail, caplog.text):
        assert WRONG_KEY not in text and WRONG_KEY[: len(WRONG_KEY) // 2] not in text


def test_refused_key_from_many_threads_sends_at_most_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    with CountingServer(require_key="sk-right-key-0000000000000000", delay=0.05) as srv:
        eng = engine(srv, concurrency=8, api_key_env=KEY_ENV)
        try:
            results = run_threads(20, lambda i: eng.generate([req(i)]))
        finally:
            eng.close()
        assert len(srv.chat_requests()) <= 8
    assert all(isinstance(r, EngineFatalError) for r in results)


def test_fatal_error_ends_requests_in_flight(counting_server: CountingServer) -> None:
    srv = counting_server
    srv.delay = lambda body: 5.0 if "slow" in json.dumps(body["messages"]) else 0.0
    eng = engine(srv, concurrency=4)
    slow = GenerationRequest(messages=[{"role": "user", "content": "slow"}], sampling=SamplingParams(seed=1))
    out: dict[str, Any] = {}

    def wait_slow() -> None:
        t = time.monotonic()
        try:
            eng.generate([slow])
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
        out["dt"] = time.monotonic() - t

    th = threading.Thread(target=wait_slow)
    try:
        th.start()
        deadline = time.monotonic() + 10
        while srv.chat_inflight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.fail_status = 404
        with pytest.raises(EngineFatalError):
            eng.generate([req(1)])
        th.join(timeout=10)
    finally:
        eng.close()
    assert isinstance(out.get("error"), EngineFatalError) and out["dt"] < 3.0


def test_unknown_model_names_the_model_and_the_url() -> None:
    with CountingServer(fail_status=404, fail_message="The model `no-such-model` does not exist.") as srv:
        eng = engine(srv, concurrency=4, model="no-such-model", max_retries=5)
        try:
            with pytest.raises(EngineFatalError) as ei:
                eng.generate([req(i) for i in range(20)])
        finally:
            eng.close()
        assert len(srv.chat_requests()) <= 4
    msg = str(ei.value)
    assert "'no-such-model'" in msg and "HTTP 404" in msg and f"127.0.0.1:{srv.port}/v1" in msg


def test_missing_key_variable_is_fatal_in_generate(monkeypatch: pytest.MonkeyPatch, counting_server: CountingServer) -> None:
    monkeypatch.delenv("TP_ABSENT_KEY", raising=False)
    eng = engine(counting_server, api_key_env="TP_ABSENT_KEY")
    with pytest.raises(EngineFatalError, match="TP_ABSENT_KEY"):
        eng.generate([req(1)])
    assert not counting_server.chat_requests()


def test_close_wakes_every_caller_still_waiting() -> None:
    """A stage that stops (a fatal error elsewhere, a budget) releases its engine while other
    threads still wait on their requests: closing must wake them, or the process never exits."""
    with CountingServer(delay=30.0) as srv:
        eng = engine(srv, concurrency=4)
        out: dict[str, Any] = {}

        def wait() -> None:
            try:
                eng.generate([req(i) for i in range(4)])
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                out["error"] = e

        th = threading.Thread(target=wait, daemon=True)
        th.start()
        deadline = time.monotonic() + 10
        while srv.chat_inflight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        eng.close()
        th.join(timeout=20)
        assert not th.is_alive() and time.monotonic() - t0 < 20
    assert "error" in out  # the request did not finish: the caller is told, not left waiting
