"""The hashes tracepipe computes, in one place (fingerprints, request keys, tokenizer digests).

- :func:`canonical_json`: JSON with sorted keys, no spaces, UTF-8 kept (``ensure_ascii=False``)
  and ``str()`` for anything JSON does not know: the same object always gives the same text.
- :func:`short_hash`: the first ``n`` hex digits of xxh3-128 of text or bytes (fast, not a
  security hash: it identifies content, it authenticates nothing).
- :func:`obj_hash`: ``short_hash(canonical_json(obj))``.
- :func:`hash_text`, :func:`fingerprint`, :func:`seed_for`: row keys' and stage fingerprints' hashes
  (re-exported by :mod:`tracepipe.pipeline.keys`; stages import them from here) and per-request
  seeds derived from a row key.
- :func:`tokenizer_digest`: one digest of a tokenizer directory (or a single tokenizer file),
  used by every engine, so the ``openai`` engine's ``tokenizer_hash`` equals the ``vllm`` /
  ``transformers`` engines' one for the same files and the teacher/student tokenizer checks can
  compare them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

#: the files that define a tokenizer, in the order they are hashed
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON text (sorted keys, compact, non-ASCII kept, ``str`` fallback)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def short_hash(data: str | bytes, n: int = 16) -> str:
    """First ``n`` hex digits of the xxh3-128 digest of ``data`` (text is UTF-8 encoded)."""
    return xxhash.xxh3_128_hexdigest(data.encode("utf-8") if isinstance(data, str) else data)[:n]


def obj_hash(obj: Any, n: int = 16) -> str:
    """:func:`short_hash` of ``obj``'s :func:`canonical_json` (bytes are hashed as they are)."""
    return short_hash(obj if isinstance(obj, bytes) else canonical_json(obj), n)


def hash_text(text: str | bytes, bits: int = 128) -> str:
    """Full xxh3 hex digest of ``text`` (UTF-8 encoded): 128 bits, or 64 with ``bits=64``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if bits == 64:
        return xxhash.xxh3_64_hexdigest(data)
    return xxhash.xxh3_128_hexdigest(data)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Short stable fingerprint of any JSON-able object (a stage's, an engine's, a frame's)."""
    return hash_text(canonical_json(obj))[:length]


def seed_for(key: str, sample: int = 0, base: int = 0) -> int:
    """Per-request seed derived from a row key, so reruns reproduce samples exactly."""
    return xxhash.xxh32_intdigest(f"{key}:{sample}".encode(), seed=base) & 0x7FFFFFFF


def tokenizer_digest(path: str | Path) -> str:
    """Digest (16 hex) of a tokenizer directory's files (vocab, merges, config, special tokens,
    chat template), or of one tokenizer file. Raises :class:`FileNotFoundError` when there are none."""
    p = Path(path)
    files = [p] if p.is_file() else [p / name for name in TOKENIZER_FILES if (p / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files in {p}")
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.name.encode() + b"\x1f" + f.read_bytes() + b"\x1e")
    return h.hexdigest()[:16]
