"""The context a scoring engine holds, for the stages that score token ids (``logprobs``, ``tip``)."""

from __future__ import annotations

from typing import Any


def scoring_limit(engine: Any) -> int | None:
    """Longest sequence ``engine`` can score (its context less the one token scoring decodes),
    None when unknown. A started engine reports its own context; before it starts
    (``tracepipe plan`` never starts one) only the config's ``max_model_len`` is known, since
    asking a vLLM engine for its context would start it."""
    if getattr(engine, "_started", False):
        mml = getattr(engine, "max_model_len", None)
    else:
        mml = getattr(engine.config, "max_model_len", None)
    return mml - 1 if isinstance(mml, int) and mml > 1 else None
