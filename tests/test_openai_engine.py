"""The ``openai`` engine against a local OpenAI-compatible server that counts its requests.

Real HTTP on 127.0.0.1 (tests/fixtures/openai_servers.py): retries on 429 / 500 / timeouts,
Retry-After, bounded concurrency, n-sample fallbacks, token counts, the request journal, the
fingerprint, and the API key never showing anywhere but the Authorization header.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fixtures.openai_servers import CountingServer, Fault
from tracepipe.engines import build_engine, engine_config_model, known_engine_kinds
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.engines.openai import OpenAIConfig, OpenAIEngine, OpenAIEngineError
from tracepipe.stages.base import StageContext

FAST = {"base": 0.05, "max": 0.2}


def engine(srv: CountingServer, workdir: Path | None = None, **kw: Any) -> OpenAIEngine:
    kw.setdefault("backoff", FAST)
    cfg = {"kind": "openai", "base_url": srv.base_url, "model": srv.model_id, **kw}
    eng = build_engine(cfg, StageContext(workdir=workdir) if workdir else None)
    assert isinstance(eng, OpenAIEngine)
    return eng


def req(i: int, n: int = 1, seed: int | None = None, max_tokens: int = 32) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "system", "content": "Think step by step."}, {"role": "user", "content": f"What is {i} + {i}?"}],
        n=n,
        sampling=SamplingParams(temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=100 + i if seed is None else seed),
        key=f"k{i}",
    )


def oracle(srv: CountingServer, eng: OpenAIEngine, r: GenerationRequest) -> dict[str, Any]:
    """What the server answers for ``r`` sent natively (n choices in one request)."""
    code, data = CountingServer(reasoning_field=srv.reasoning_field).answer(eng._body(r, r.n, r.sampling.seed, True))
    assert code == 200
    return data


def test_registered_and_config_defaults() -> None:
    assert "openai" in known_engine_kinds()
    assert engine_config_model("openai") is OpenAIConfig
    cfg = OpenAIConfig(kind="openai", base_url="http://127.0.0.1:1/v1/", model="m")
    assert cfg.base_url == "http://127.0.0.1:1/v1" and cfg.concurrency >= 1 and cfg.max_retries >= 1


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_field_and_usage(field: str) -> None:
    with CountingServer(reasoning_field=field) as srv:
        eng = engine(srv)
        try:
            reqs = [req(i) for i in range(4)]
            out = eng.generate(reqs)
        finally:
            eng.close()
        assert [len(o) for o in out] == [1] * 4
        for r, (c,) in zip(reqs, out):
            want = oracle(srv, eng, r)
            ch = want["choices"][0]
            assert c.reasoning == ch["message"][field] and c.reasoning
            assert c.text == ch["message"]["content"]
            assert c.finish_reason == ch["finish_reason"]
            assert c.prompt_tokens == want["usage"]["prompt_tokens"]
            assert c.completion_tokens == want["usage"]["completion_tokens"]
        # n == 1 needs no logprobs: usage is per choice already
        assert all("logprobs" not in s.body and "n" not in s.body for s in srv.chat_requests())
        assert all(s.body["seed"] == r.sampling.seed for s, r in zip(sorted(srv.chat_requests(), key=lambda s: s.body["seed"]), reqs))


def test_no_reasoning_field_keeps_text() -> None:
    with CountingServer(reasoning_field=None) as srv:
        eng = engine(srv)
        try:
            (c,), = eng.generate([req(1)])
        finally:
            eng.close()
        assert c.reasoning is None and c.text.startswith("<think>")


def test_n_samples_one_request_exact_per_choice_tokens(counting_server: CountingServer) -> None:
    srv = counting_server
    eng = engine(srv)
    try:
        r = req(7, n=3)
        (comps,) = eng.generate([r])
    finally:
        eng.close()
    (seen,) = srv.chat_requests()
    assert seen.body["n"] == 3 and seen.body["logprobs"] is True and seen.body["top_logprobs"] == 0
    want = oracle(srv, eng, r)
    counts = [len(ch["logprobs"]["content"]) for ch in want["choices"]]
    assert len(set(counts)) > 1, "the oracle should give choices of different lengths"
    assert [c.completion_tokens for c in comps] == counts
    assert sum(c.completion_tokens for c in comps) == want["usage"]["completion_tokens"]
    assert [c.text for c in comps] == [ch["message"]["content"] for ch in want["choices"]]


def test_server_refusing_n_falls_back_to_separate_requests_with_seed_plus_i() -> None:
    with CountingServer() as native, CountingServer(refuse_n=True) as srv:
        e_native, e_sep = engine(native), engine(srv)
        try:
            reqs = [req(i, n=3) for i in range(3)]
            want = e_native.generate(reqs[:1])
            got = e_sep.generate(reqs[:1])
            assert got == want  # same samples: choice i of an n request == request with seed + i
            first = srv.chat_requests()
            assert [s.status for s in first] == [400, 200, 200, 200]
            assert sorted(s.body["seed"] for s in first[1:]) == [100, 101, 102]
            assert all("n" not in s.body and "logprobs" not in s.body for s in first[1:])
            srv.reset()
            e_sep.generate(reqs[1:])  # the engine remembers: no more refused n requests
            assert [s.status for s in srv.chat_requests()] == [200] * 6
            assert e_sep._mode == "separate"
        finally:
            e_native.close()
            e_sep.close()


def test_server_refusing_logprobs_counts_with_tokenizer(tiny_model_dir: Path) -> None:
    with CountingServer(refuse_logprobs=True) as srv:
        eng = engine(srv, tokenizer=str(tiny_model_dir))
        try:
            (comps,) = eng.generate([req(3, n=2)])
            tok = eng.tokenizer()
        finally:
            eng.close()
        assert [s.status for s in srv.chat_requests()] == [400, 200]
        assert srv.chat_requests()[1].body["n"] == 2 and "logprobs" not in srv.chat_requests()[1].body
        for c in comps:
            n = len(tok.encode(c.text, add_special_tokens=False)) + len(tok.encode(c.reasoning, add_special_tokens=False))
            assert c.completion_tokens == n > 0


def test_server_ignoring_n_gets_the_rest_separately(counting_server: CountingServer) -> None:
    srv = counting_server
    srv.ignore_n = True
    eng = engine(srv)
    try:
        (comps,) = eng.generate([req(5, n=3)])
    finally:
        eng.close()
    assert len(comps) == 3
    seen = srv.chat_requests()
    assert len(seen) == 3 and seen[0].body["n"] == 3
    assert sorted(s.body["seed"] for s in seen[1:]) == [106, 107]
    assert len({c.text for c in comps}) == 3


def test_retries_429_500_and_timeout_then_success(counting_server: CountingServer, caplog: pytest.LogCaptureFixture) -> None:
    srv = counting_server
    srv.script = [Fault(status=429, headers={"Retry-After": "1"}), Fault(status=500), Fault(sleep=2.0), Fault(status=503)]
    eng = engine(srv, timeout_s=0.5, max_retries=5)
    caplog.set_level(logging.WARNING, logger="tracepipe.engines.openai")
    try:
        (comps,) = eng.generate([req(1)])
    finally:
        eng.close()
    seen = srv.chat_requests()
    assert len(seen) == 5 == eng.http_requests
    assert eng.retries == 4
    assert [s.status for s in seen] == [429, 500, 0, 503, 200]  # 0: the client hung up (timeout)
    assert seen[1].t - seen[0].t >= 1.0  # Retry-After honoured (backoff alone is < 0.2 s)
    assert seen[2].t - seen[1].t < 1.0
    assert comps[0].text
    msgs = [r.getMessage() for r in caplog.records]
    assert any("HTTP 429" in m for m in msgs) and any("timeout" in m for m in msgs) and any("HTTP 500" in m for m in msgs)


def test_gives_up_after_max_retries(counting_server: CountingServer) -> None:
    srv = counting_server
    srv.script = [Fault(status=502)] * 10
    eng = engine(srv, max_retries=2)
    try:
        with pytest.raises(OpenAIEngineError, match="gave up after 3 attempts; last: HTTP 502"):
            eng.generate([req(1)])
    finally:
        eng.close()
    assert len(srv.chat_requests()) == 3


def test_client_errors_are_not_retried(counting_server: CountingServer) -> None:
    srv = counting_server
    srv.script = [Fault(status=400, body='{"error": {"message": "prompt too long"}}')]
    eng = engine(srv, max_retries=5)
    try:
        with pytest.raises(OpenAIEngineError, match="HTTP 400.*prompt too long") as ei:
            eng.generate([req(1)])
    finally:
        eng.close()
    assert ei.value.status == 400
    assert len(srv.chat_requests()) == 1


def test_concurrency_is_bounded() -> None:
    with CountingServer(delay=0.3) as srv:
        eng = engine(srv, concurrency=3)
        try:
            t0 = time.monotonic()
            out = eng.generate([req(i) for i in range(9)])
            dt = time.monotonic() - t0
        finally:
            eng.close()
    assert len(out) == 9 and srv.max_inflight == 3
    assert dt >= 0.85  # 9 requests, 3 at a time, 0.3 s each


def test_generate_iter_yields_every_request_once(counting_server: CountingServer) -> None:
    eng = engine(counting_server, concurrency=4)
    try:
        reqs = [req(i, n=2) for i in range(6)]
        got = dict(eng.generate_iter(reqs))
        assert sorted(got) == list(range(6))
        assert [got[i] for i in range(6)] == eng.generate(reqs)  # seeded: the same samples again
    finally:
        eng.close()


def test_journal_answers_finished_requests_after_a_crash(counting_server: CountingServer, tmp_path: Path) -> None:
    srv = counting_server
    reqs = [req(i, n=2) for i in range(5)]
    a = engine(srv, tmp_path)
    first = a.generate(reqs)
    assert len(srv.chat_requests()) == 5
    a._journal._fh.close()  # die without close(): the journal stays as written, its lock released
    jdir = next((tmp_path / "engines").iterdir())
    assert len(list(jdir.glob("journal-*.jsonl"))) == 1

    b = engine(srv, tmp_path)
    again = b.generate(reqs)
    assert again == first and b.journal_hits == 5 and b.http_requests == 0
    assert len(srv.chat_requests()) == 5
    b.close()
    assert not list(jdir.glob("journal-*.jsonl"))  # everything was handed back: compacted away

    c = engine(srv, tmp_path)  # nothing journaled any more: asks the server
    try:
        c.generate(reqs[:1])
    finally:
        c.close()
    assert len(srv.chat_requests()) == 6


# the journal's settle semantics (concurrent callers) are tested in tests/test_openai_ratelimit.py


def test_journal_makes_bisecting_a_failed_batch_cheap(tmp_path: Path) -> None:
    with CountingServer(reject_if_contains="What is 3 + 3") as srv:
        eng = engine(srv, tmp_path)
        try:
            reqs = [req(i) for i in range(6)]
            with pytest.raises(OpenAIEngineError, match="HTTP 400"):
                eng.generate(reqs)
            assert len(srv.chat_requests()) == 6
            # the executor bisects: halves, then quarters ... only the bad request is sent again
            assert len(eng.generate(reqs[:3])) == 3
            with pytest.raises(OpenAIEngineError):
                eng.generate(reqs[3:])
            with pytest.raises(OpenAIEngineError):
                eng.generate(reqs[3:4])
            assert len(eng.generate(reqs[4:])) == 2
            sent = [json.dumps(s.body["messages"]) for s in srv.chat_requests()]
            assert len(sent) == 8 and sum("What is 3 + 3" in m for m in sent) == 3
        finally:
            eng.close()


def test_generate_iter_reports_failures_per_request(tmp_path: Path) -> None:
    with CountingServer(reject_if_contains="What is 2 + 2") as srv:
        eng = engine(srv)
        try:
            got = dict(eng.generate_iter([req(i) for i in range(4)], return_exceptions=True))
        finally:
            eng.close()
    assert isinstance(got[2], OpenAIEngineError) and got[2].status == 400
    assert all(isinstance(got[i], list) for i in (0, 1, 3))


# -- fingerprint -----------------------------------------------------------------------------
def test_fingerprint_queries_models_once(counting_server: CountingServer) -> None:
    srv = counting_server
    eng = engine(srv)
    fp = eng.fingerprint()
    assert fp == eng.fingerprint() and fp.startswith(f"openai:{srv.model_id}:")
    info = eng.fingerprint_info()
    assert info["server"] == {"id": srv.model_id, "root": f"/models/{srv.model_id}", "max_model_len": 4096, "owned_by": "tests"}
    assert len([s for s in srv.seen if s.path.endswith("/models")]) == 1
    # execution knobs and the URL do not change it; output options and the served weights do
    assert engine(srv, concurrency=99, timeout_s=5, max_retries=0).fingerprint() == fp
    assert engine(srv, chat_template_kwargs={"enable_thinking": False}).fingerprint() != fp
    assert engine(srv, extra_body={"repetition_penalty": 1.1}).fingerprint() != fp
    assert len([s for s in srv.seen if s.path.endswith("/models")]) == 1  # once per process
    with CountingServer(model_id="other") as other:
        with pytest.raises(OpenAIEngineError, match="not served"):
            engine(other, model="fake-teacher").fingerprint()


def test_fingerprint_offline_when_pinned_or_revision(tiny_model_dir: Path) -> None:
    dead = "http://127.0.0.1:9/v1"  # nothing listens: any network use would fail
    pinned = build_engine({"kind": "openai", "base_url": dead, "model": "m", "fingerprint": "teacher-v1"})
    assert pinned.fingerprint() == "teacher-v1"
    opts = build_engine({"kind": "openai", "base_url": dead, "model": "m", "fingerprint": "teacher-v1", "extra_body": {"x": 1}})
    assert opts.fingerprint().startswith("teacher-v1+opts:")
    rev = build_engine({"kind": "openai", "base_url": dead, "model": "m", "revision": "abc123", "tokenizer": str(tiny_model_dir)})
    info = rev.fingerprint_info()
    assert info["revision"] == "abc123" and len(info["tokenizer_hash"]) == 16 and "server" not in info
    assert rev.fingerprint() != build_engine({"kind": "openai", "base_url": dead, "model": "m", "revision": "abc124"}).fingerprint()
    unreachable = build_engine({"kind": "openai", "base_url": dead, "model": "m"})
    with pytest.raises(OpenAIEngineError, match="pin `fingerprint:`"):
        unreachable.fingerprint()


# -- secrets ---------------------------------------------------------------------------------
SECRET = "sk-test-4f9c2b7e1d0a4c3e9b8f7a6d5c4b3a29"


def test_key_from_env_only_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TP_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with CountingServer(require_key=SECRET, echo_key_in_errors=True) as srv:
        srv.script = [Fault(status=500), Fault(status=429, headers={"Retry-After": "0"})]
        eng = engine(srv, tmp_path, api_key_env="TP_TEST_KEY")
        try:
            out = eng.generate([req(i, n=2) for i in range(3)])
            texts += [repr(eng), str(eng.__dict__), eng.fingerprint(), repr(out), json.dumps(eng.fingerprint_info())]
            srv.script = [Fault(status=503)] * 5  # the server echoes the Authorization header in errors
            e2 = build_engine(eng.config.model_copy(update={"max_retries": 1}), StageContext(workdir=tmp_path))
            with pytest.raises(OpenAIEngineError) as ei:
                e2.generate([req(9)])
            e2.close()
            texts += [str(ei.value), repr(ei.value)]
            monkeypatch.setenv("TP_TEST_KEY", SECRET + "x")  # a wrong key: 401 whose body echoes it
            bad = engine(srv, api_key_env="TP_TEST_KEY")
            with pytest.raises(OpenAIEngineError, match="HTTP 401") as ei2:
                bad.generate([req(10)])
            texts += [str(ei2.value), repr(ei2.value), repr(bad)]
            bad.close()
        finally:
            eng.close()
        auths = {s.auth for s in srv.chat_requests()}
    assert f"Bearer {SECRET}" in auths  # it was sent, in the header
    assert "***" in texts[-3]  # the echoed key was scrubbed, not just absent
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    texts += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert caplog.records, "retries should have been logged"
    for t in texts:
        assert SECRET not in t and SECRET[: len(SECRET) // 2] not in t


def test_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch, counting_server: CountingServer) -> None:
    monkeypatch.delenv("TP_ABSENT_KEY", raising=False)
    eng = engine(counting_server, api_key_env="TP_ABSENT_KEY")
    with pytest.raises(OpenAIEngineError, match="TP_ABSENT_KEY"):
        eng.generate([req(1)])
    assert not counting_server.chat_requests()


def test_recipe_cannot_hold_a_key() -> None:
    with pytest.raises(ValidationError) as ei:
        OpenAIConfig.model_validate({"kind": "openai", "base_url": "http://h/v1", "model": "m", "api_key": SECRET})
    assert "api_key_env" in str(ei.value) and SECRET not in str(ei.value)
    with pytest.raises(ValidationError) as ei:
        OpenAIConfig.model_validate({"kind": "openai", "base_url": f"https://user:{SECRET}@h/v1", "model": "m"})
    assert SECRET not in str(ei.value)


# -- context window --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("detail", "max_tokens", "want"),
    [
        # vLLM 0.32 (recorded from the real server)
        ("This model's maximum context length is 512 tokens. However, your prompt contains at least 513 input "
         "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
         "prompt. (parameter=input_tokens, value=513)", 10, ("too_long", 513)),
        ("max_tokens=1000 cannot be greater than max_model_len=512. Please request fewer output tokens. "
         "(parameter=max_tokens, value=1000)", 1000, ("clamp", 512)),
        # older vLLM / OpenAI: prompt + completion over the window
        ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (1000 in the "
         "messages, 4000 in the completion). Please reduce the length of the messages or completion.", 4000, ("clamp", 3096)),
        ("This model's maximum context length is 4096 tokens. However, you requested 9000 tokens (5000 in the "
         "messages, 4000 in the completion).", 4000, ("too_long", 5000)),
        # SGLang
        ("The input (9000 tokens) is longer than the model's context length (8192 tokens).", 100, ("too_long", 9000)),
        ("prompt too short", 10, None),
        ("Invalid value for temperature", 10, None),
    ],
)
def test_classify_context_errors(detail: str, max_tokens: int, want: tuple[str, int] | None) -> None:
    from tracepipe.engines.openai import classify_context_error

    assert classify_context_error(detail, max_tokens) == want


def test_context_errors_clamp_or_mark_prompt_too_long(counting_server: CountingServer) -> None:
    srv = counting_server
    too_long = ('{"error": {"message": "This model\'s maximum context length is 512 tokens. However, your prompt contains '
                'at least 600 input tokens, which exceeds this limit even without any output tokens.", "code": 400}}')
    srv.script = [Fault(status=400, body=too_long)]
    eng = engine(srv, fingerprint="t")
    try:
        (comps,) = eng.generate([req(1, n=2)])
        assert [(c.finish_reason, c.prompt_tokens, c.text) for c in comps] == [("prompt_too_long", 600, "")] * 2
        assert len(srv.chat_requests()) == 1  # no n fallback, no retry for a prompt that cannot fit
        srv.reset()
        srv.script = [Fault(status=400, body='{"error": {"message": "max_tokens=1000 cannot be greater than max_model_len=512."}}')]
        (comps,) = eng.generate([req(2, max_tokens=1000)])
        assert comps[0].finish_reason in ("stop", "length")
        assert [s.body["max_tokens"] for s in srv.chat_requests()] == [1000, 512]
    finally:
        eng.close()
