"""LLM engine interface: chat generation with n samples, scoring, and a fingerprint.

Engines are built from their recipe config (``engines: {name: {kind: ..., ...}}``) through the
registry in :mod:`tracepipe.engines`. Construction must be cheap; heavy loading happens in
:meth:`Engine.start` (called on first use). :meth:`Engine.fingerprint` must work without loading
the model, since plans and cache lookups need it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tracepipe.errors import EngineFatalError  # noqa: F401 - re-exported


class EngineConfig(BaseModel):
    """Base of every engine kind's recipe config; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    kind: str


class SamplingParams(BaseModel):
    """Sampling parameters shared by every engine (``seed`` is set per request by the stage)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 1024
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One prompt; the engine returns ``n`` completions for it."""

    messages: list[dict[str, str]]
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    key: str = ""  # row key, for logs and per-request bookkeeping
    # the source row's columns the stage read (a replay engine takes its text from here)
    row: dict[str, Any] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop", "length", ...
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None  # set when the server returns reasoning separately


@dataclass
class ScoreResult:
    """Log-probs of given token ids: ``logprobs[i] = log p(ids[i] | ids[:i])``; ``[0]`` is None."""

    logprobs: list[float | None]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


class Engine(ABC):
    kind: ClassVar[str] = ""
    #: work that needs no model (a replay engine): a stage drives it in big batches, not streamed
    bulk: ClassVar[bool] = False

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        self.config = config
        self.ctx = ctx
        self._started = False
        #: called once the engine has started (the run records when each engine lived)
        self.on_start: Callable[[], None] | None = None

    def start(self) -> None:
        """Load the model / open clients. Idempotent."""
        self._started = True

    def ensure_started(self) -> None:
        if not self._started:
            self.start()
            self._started = True
            if self.on_start is not None:
                self.on_start()

    @abstractmethod
    def fingerprint(self) -> str:
        """Model id, revision or weights hash, tokenizer hash, chat-template hash, as one string."""

    def fingerprint_info(self) -> dict[str, Any]:
        """The parts of the fingerprint, human-readable (for cards and refusals)."""
        return {"fingerprint": self.fingerprint()}

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Completions for every request, in request order (``len(out[i]) == requests[i].n``)."""

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoreResult]:
        raise NotImplementedError(f"engine kind {self.kind!r} cannot score token ids")

    def capacity(self) -> int:
        """Requests the engine runs at once (API slots, vLLM's ``max_num_seqs``).

        The runtime keeps at least this many requests submitted while rows remain, so the
        engine never idles between batches. ``generate`` and ``score`` must then be safe to call
        from several threads at once; an engine that is not keeps the default of 1."""
        return 1

    def usage(self) -> dict[str, float]:
        """Cumulative counters since start (requests, tokens, retries, rates) for the stats."""
        return {}

    def row_columns(self) -> list[str]:
        """Columns of the source row this engine reads (a replay engine's trace column); they
        become part of the row key of the stages that use it. Model engines read none."""
        return []

    def tokenizer(self) -> Any:
        raise NotImplementedError(f"engine kind {self.kind!r} exposes no tokenizer")

    def close(self) -> None:
        """Free the model / close clients."""
