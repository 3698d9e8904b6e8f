"""Stage registry: recipe name -> stage class.

Every module in this package registers its stage with :func:`register`; third-party packages
add stages through the ``tracepipe.stages`` entry-point group. The runner knows stages only
through :func:`get_stage` / :func:`known_stages`.

A recipe name may cover several implementations, picked by a parameter: ``compress`` rewrites
traces with a model (a row stage) but with ``method: shortest-correct`` keeps the shortest correct
sample of each problem (a set stage). The second is a *variant*, registered with
``register("compress", when={"method": "shortest-correct"})``: same name, same ``Params``, its own
class. The registered class takes the :class:`HasVariants` metaclass, so that building the stage
the one way every caller does, ``get_stage(name)(params, ctx)``, gives the variant the params
select (:func:`resolve_stage`).
"""

from __future__ import annotations

from abc import ABCMeta
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from tracepipe._plugins import load_submodules
from tracepipe.stages.base import RowStage, SetStage, Stage, StageContext, StageParams

__all__ = [
    "HasVariants", "RowStage", "SetStage", "Stage", "StageContext", "StageParams",
    "get_stage", "known_stages", "register", "resolve_stage",
]

_REGISTRY: dict[str, type[Stage]] = {}
#: recipe name -> [(parameter values that select the variant, variant class)]
_VARIANTS: dict[str, list[tuple[dict[str, Any], type[Stage]]]] = {}
S = TypeVar("S", bound=type[Stage])


class HasVariants(ABCMeta):
    """Metaclass of a registered stage that has variants: calling the class with params builds
    the class :func:`resolve_stage` picks for them (itself when no variant matches)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        params = args[0] if args else kwargs.get("params")
        if params is not None and _REGISTRY.get(cls.name) is cls:
            target = resolve_stage(cls.name, params)
            if target is not cls:
                return target(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def register(name: str, *, when: Mapping[str, Any] | None = None) -> Callable[[S], S]:
    """Class decorator: register a stage under the name recipes use.

    With ``when`` (parameter name -> value), the class is a variant of the stage ``name``: recipes
    still write ``name:`` with the same parameters, and params holding these values build this
    class instead of the registered one. A variant declares the registered class's ``Params``.
    """

    def deco(cls: S) -> S:
        if when is None:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"stage name {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
            _REGISTRY[name] = cls
        else:
            variants = _VARIANTS.setdefault(name, [])
            for sel, other in variants:
                if sel == dict(when) and other is not cls:
                    raise ValueError(f"stage {name!r} variant {dict(when)} registered twice ({other.__module__}, {cls.__module__})")
            if all(other is not cls for _, other in variants):
                variants.append((dict(when), cls))
        cls.name = name
        _check_variants(name)
        return cls

    return deco


def _check_variants(name: str) -> None:
    """Once a name has both its class and variants: the class dispatches, the params agree."""
    base = _REGISTRY.get(name)
    if base is None or name not in _VARIANTS:
        return
    if not isinstance(base, HasVariants):
        raise TypeError(f"stage {name!r} has variants: {base.__qualname__} needs `metaclass=HasVariants`")
    for sel, cls in _VARIANTS[name]:
        if cls.Params is not base.Params:
            raise TypeError(f"stage {name!r} variant {sel}: {cls.__qualname__}.Params must be {base.Params.__qualname__}")


def _load_all() -> None:
    load_submodules(__name__, "tracepipe.stages")


def known_stages() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_stage(name: str) -> type[Stage]:
    """The class registered under ``name`` (its ``Params`` validate the recipe's parameters)."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(_REGISTRY))}") from None


def resolve_stage(name: str, params: StageParams | Mapping[str, Any]) -> type[Stage]:
    """The class that runs stage ``name`` with these params: the first variant whose ``when``
    values the params hold, else the registered class. ``params`` may be the recipe's mapping."""
    base = get_stage(name)
    if name not in _VARIANTS:
        return base
    if isinstance(params, Mapping):
        params = base.Params.model_validate(params)
    for sel, cls in _VARIANTS[name]:
        if all(getattr(params, k, None) == v for k, v in sel.items()):
            return cls
    return base
