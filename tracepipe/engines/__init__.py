"""Engine registry: ``kind`` -> (config model, engine class), discovered lazily.

Importing an engine module must not import its heavy library (vllm, torch, openai): those are
imported in ``Engine.start``.
"""

from __future__ import annotations

from typing import Any

from tracepipe._plugins import load_submodules
from tracepipe.engines.base import (
    Completion,
    Engine,
    EngineConfig,
    EngineFatalError,
    GenerationRequest,
    SamplingParams,
    ScoreResult,
)

__all__ = [
    "Completion", "Engine", "EngineConfig", "EngineFatalError", "GenerationRequest", "SamplingParams", "ScoreResult",
    "build_engine", "engine_config_model", "engine_fingerprint", "known_engine_kinds", "register_engine",
]

_KINDS: dict[str, tuple[type[EngineConfig], type[Engine]]] = {}
_FP_CACHE: dict[str, str] = {}


def register_engine(kind: str, config_cls: type[EngineConfig]):
    def deco(cls: type[Engine]) -> type[Engine]:
        cls.kind = kind
        _KINDS[kind] = (config_cls, cls)
        return cls

    return deco


def _load_all() -> None:
    load_submodules(__name__)


def known_engine_kinds() -> list[str]:
    _load_all()
    return sorted(_KINDS)


def engine_config_model(kind: str) -> type[EngineConfig]:
    _load_all()
    if kind not in _KINDS:
        raise KeyError(f"unknown engine kind {kind!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind][0]


def build_engine(config: EngineConfig | dict[str, Any], ctx: Any = None) -> Engine:
    _load_all()
    if isinstance(config, dict):
        config = engine_config_model(config["kind"]).model_validate(config)
    return _KINDS[config.kind][1](config, ctx)


def engine_fingerprint(config: EngineConfig, ctx: Any = None) -> str:
    """Fingerprint of an engine without starting it (cached per process)."""
    key = config.model_dump_json()
    if key not in _FP_CACHE:
        _FP_CACHE[key] = build_engine(config, ctx).fingerprint()
    return _FP_CACHE[key]
