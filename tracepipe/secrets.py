"""Keep secrets out of everything tracepipe writes or prints (cards, recipe copies, reports, logs).

:func:`scrub` replaces the values of secret-looking environment variables (``HF_TOKEN``,
``*_API_KEY``, ``*_TOKEN``, ``*SECRET*``, ``*PASSWORD*``, plus any names passed in, such as a
recipe's ``push.token_env`` / ``api_key_env``) and token-shaped strings (``hf_...``, ``sk-...``)
with ``***``.

Where it is applied: a :class:`Scrubber` is made once per boundary where text leaves the process
and is applied there, to everything that crosses it. :func:`tracepipe.publish.publish` (after a
run) makes one for the recipe and hands it to the shard writer, which scrubs every text file it
writes (``recipe.yaml``, ``README.md``, ``summary.json``, ``stats.json``), and to the push, whose
errors it scrubs; ``tracepipe push`` (:mod:`tracepipe.hub`) and ``tracepipe report`` make their
own. The dataset card's code (``outputs/_card.py``) only formats: it never sees this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SECRET_NAME = re.compile(r"(TOKEN|API_KEY|APIKEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY)", re.I)
TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|api_[A-Za-z0-9]{24,})\b")
MASK = "***"
MIN_SECRET_LEN = 6


def recipe_secret_env_names(recipe: Any) -> set[str]:
    """Names of environment variables a recipe says hold secrets (push.token_env, engines' *_env)."""
    names: set[str] = set()
    for out in getattr(recipe, "outputs", None) or []:
        push = getattr(out, "push", None)
        if push is not None and getattr(push, "token_env", None):
            names.add(str(push.token_env))
    for cfg in (getattr(recipe, "engines", None) or {}).values():
        if isinstance(cfg, dict):
            for k, v in cfg.items():
                if k.endswith("_env") and isinstance(v, str):
                    names.add(v)
    return names


def secret_values(extra_names: Iterable[str] = ()) -> list[str]:
    """Current values of secret-looking environment variables, longest first."""
    names = set(extra_names)
    names.update(k for k in os.environ if SECRET_NAME.search(k))
    vals = {os.environ[n] for n in names if os.environ.get(n) and len(os.environ[n]) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def scrub(text: str, extra_names: Iterable[str] = (), values: Iterable[str] | None = None) -> str:
    """``text`` with every known secret value and token-shaped string replaced by ``***``."""
    vals = list(values) if values is not None else secret_values(extra_names)
    for v in vals:
        if v and len(v) >= MIN_SECRET_LEN and v in text:
            text = text.replace(v, MASK)
    return TOKEN_SHAPES.sub(MASK, text)


def scrub_obj(obj: Any, extra_names: Iterable[str] = (), _values: list[str] | None = None) -> Any:
    """:func:`scrub` applied to every string inside a JSON-like object."""
    vals = secret_values(extra_names) if _values is None else _values
    if isinstance(obj, str):
        return scrub(obj, values=vals)
    if isinstance(obj, dict):
        return {k: scrub_obj(v, _values=vals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(v, _values=vals) for v in obj]
    return obj


@dataclass(frozen=True)
class Scrubber:
    """The secrets of one recipe, looked up once: ``text(s)`` / ``obj(o)`` mask them.

    ``names``: the recipe's secret environment variable names (see
    :func:`recipe_secret_env_names`); the values are read from the environment (those names and
    every secret-looking one) each time, so a variable set after the scrubber was made is still
    masked. ``extra``: more values to mask (a token read from elsewhere)."""

    names: frozenset[str] = frozenset()
    extra: tuple[str, ...] = ()

    @classmethod
    def for_recipe(cls, recipe: Any, extra: Iterable[str] = ()) -> Scrubber:
        return cls(frozenset(recipe_secret_env_names(recipe)), tuple(v for v in extra if v))

    def with_values(self, *values: str | None) -> Scrubber:
        """This scrubber, also masking ``values`` (None and empty ones are ignored)."""
        return Scrubber(self.names, self.extra + tuple(v for v in values if v))

    def values(self) -> list[str]:
        return sorted({*secret_values(self.names), *self.extra}, key=len, reverse=True)

    def text(self, text: str) -> str:
        return scrub(text, values=self.values())

    def obj(self, obj: Any) -> Any:
        return scrub_obj(obj, _values=self.values())

    __call__ = text
