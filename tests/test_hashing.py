"""One hashing module: every engine digests a tokenizer the same way, and the ``openai`` engine's
fingerprints and request keys (hence its journals in existing workdirs) did not change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracepipe.engines import build_engine
from tracepipe.engines._hf import FingerprintError, model_fingerprint
from tracepipe.engines._hf import tokenizer_digest as hf_tokenizer_digest
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.engines.openai import OpenAIEngine
from tracepipe.hashing import canonical_json, obj_hash, short_hash, tokenizer_digest

DEAD = "http://127.0.0.1:9/v1"  # nothing listens: any network use would fail


def test_canonical_json_and_hashes_are_stable() -> None:
    a = {"b": [1, 2.5, None], "a": "héllo", "p": Path("/x")}
    assert canonical_json(a) == '{"a":"héllo","b":[1,2.5,null],"p":"/x"}'
    assert canonical_json(a) == canonical_json(dict(reversed(list(a.items()))))
    assert obj_hash(a) == short_hash(canonical_json(a)) and len(obj_hash(a)) == 16
    assert obj_hash(b"raw", 8) == short_hash(b"raw", 8) and len(short_hash("x", 32)) == 32
    assert short_hash("") == "99aa06d3014798d8"  # xxh3-128 of nothing: the algorithm did not change


def test_openai_fingerprints_and_request_keys_are_unchanged() -> None:
    rev = build_engine({"kind": "openai", "base_url": DEAD, "model": "m", "revision": "abc123"})
    assert rev.fingerprint() == "openai:m:4ae48c650f326eab"
    pinned = build_engine({
        "kind": "openai", "base_url": DEAD, "model": "m", "fingerprint": "teacher-v1",
        "extra_body": {"x": 1}, "chat_template_kwargs": {"enable_thinking": True},
    })
    assert isinstance(pinned, OpenAIEngine)
    assert pinned.fingerprint() == "teacher-v1+opts:c19350e1"
    r = GenerationRequest(messages=[{"role": "user", "content": "héllo"}], n=3, sampling=SamplingParams(seed=5, stop=["x"]))
    assert pinned.request_key(r) == "7e07b1516e2051b30480f110e5f1ea6b"


def test_one_tokenizer_digest_for_every_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = tokenizer_digest(tiny_model_dir)
    assert hf_tokenizer_digest(tiny_model_dir) == d
    assert model_fingerprint(str(tiny_model_dir))["tokenizer_hash"] == d
    api = build_engine({"kind": "openai", "base_url": DEAD, "model": "m", "revision": "r1", "tokenizer": str(tiny_model_dir)})
    assert api.fingerprint_info()["tokenizer_hash"] == d
    # a single tokenizer file is hashed as itself; an empty directory has no digest
    assert tokenizer_digest(tiny_model_dir / "tokenizer.json") != d
    with pytest.raises(FileNotFoundError):
        tokenizer_digest(tmp_path)
    with pytest.raises(FingerprintError):
        hf_tokenizer_digest(tmp_path)
