"""Every exception tracepipe raises on purpose, in one module (no imports of its own).

The modules that raise them re-export them under their old names, so
``from tracepipe.pipeline.runner import RunFailed``, ``from tracepipe.recipe import RecipeError``,
``from tracepipe.sources import SourceError``, ``from tracepipe.engines.base import EngineFatalError``
and the like keep working.

What the CLI makes of them: :class:`RecipeError` (and a bad source) exits 2, :class:`RunFailed` 1.
The ``openai`` engine's own errors (``OpenAIEngineError``, ``OpenAIFatalError``, a subclass of
:class:`EngineFatalError`) stay in :mod:`tracepipe.engines.openai`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BadSourceLine", "BudgetExceeded", "EngineFatalError", "FingerprintError", "IsolationUnavailable", "Problem", "PushError",
    "RecipeError", "RunFailed", "SourceError", "TeacherMismatchError",
]


# -- recipe and sources ----------------------------------------------------------------------------
@dataclass
class Problem:
    """One problem of a recipe: its YAML path, line (1-based, when known) and message."""

    path: str
    line: int | None
    message: str


class RecipeError(Exception):
    """All problems found in a recipe, each with its YAML path and line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in {self.file}:"]
        for p in self.problems:
            loc = f"{self.file}:{p.line}" if p.line else self.file
            lines.append(f"  {loc}: {p.path or '<top>'}: {p.message}")
        return "\n".join(lines)


class SourceError(ValueError):
    """A source that cannot be read; the message names the source entry and the file."""


class BadSourceLine(ValueError):
    """A bad source line (or Parquet row) under ``on_bad_line: error``.

    The message is one line, ``path/to/file.jsonl:LINE: reason`` (``file: row N: reason`` for
    Parquet and Hugging Face rows); ``file``, ``line`` and ``reason`` are kept as attributes."""

    def __init__(self, file: str, line: int, reason: str, row_index: bool = False) -> None:
        self.file, self.line, self.reason = file, line, reason
        super().__init__(f"{file}: row {line}: {reason}" if row_index else f"{file}:{line}: {reason}")


# -- the run -----------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    """The run stopped (error rate exceeded, a stage could not start, ...); the message says why."""


class TeacherMismatchError(ValueError):
    """The scoring teacher is not the SFT teacher (or the tokenizers differ)."""


class IsolationUnavailable(RuntimeError):
    """``require_isolation`` is set but bubblewrap cannot run here."""


# -- engines -----------------------------------------------------------------------------------------
class EngineFatalError(RuntimeError):
    """An error no retry can fix (key refused, no such model): the stage stops at once.

    Row errors are quarantined one by one; this one would fail every row the same way, so the
    runtime stops the stage with this message instead of sending the rest."""


class BudgetExceeded(EngineFatalError):
    """The next request could cross a ``budget`` (:mod:`tracepipe.spend`): the engine dispatches
    nothing more. Unlike other fatal errors, the requests already in flight finish and are
    committed before the stage stops (the executor drains); the run then fails with this message,
    the spend so far and the rows that remain (``remaining`` / ``to_compute``, set by the runner)."""

    def __init__(self, message: str, engine: str = "") -> None:
        super().__init__(message)
        self.engine = engine
        self.remaining: int | None = None
        self.to_compute: int | None = None


class FingerprintError(RuntimeError):
    """The model's files cannot be found to fingerprint it (offline and not cached)."""


# -- outputs -----------------------------------------------------------------------------------------
class PushError(RuntimeError):
    """A push failed; the message names what and why, never the token."""
