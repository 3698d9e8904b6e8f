"""Stage registry: recipe name -> stage class.

Every module in this package registers its stage with :func:`register`; third-party packages
add stages through the ``tracepipe.stages`` entry-point group. The runner knows stages only
through :func:`get_stage` / :func:`known_stages`.
"""

from __future__ import annotations

from typing import TypeVar

from tracepipe._plugins import load_submodules
from tracepipe.stages.base import RowStage, SetStage, Stage, StageContext, StageParams

__all__ = ["RowStage", "SetStage", "Stage", "StageContext", "StageParams", "get_stage", "known_stages", "register"]

_REGISTRY: dict[str, type[Stage]] = {}
S = TypeVar("S", bound=type[Stage])


def register(name: str):
    """Class decorator: register a stage under the name recipes use."""

    def deco(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"stage name {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    load_submodules(__name__, "tracepipe.stages")


def known_stages() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_stage(name: str) -> type[Stage]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(_REGISTRY))}") from None
