"""LLM engine interface: chat generation with n samples, scoring, and a fingerprint.

Engines are built from their recipe config (``engines: {name: {kind: ..., ...}}``) through the
registry in :mod:`tracepipe.engines`. Construction must be cheap; heavy loading happens in
:meth:`Engine.start` (called on first use). :meth:`Engine.fingerprint` must work without loading
the model, since plans and cache lookups need it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tracepipe.errors import BudgetExceeded, EngineFatalError  # noqa: F401 - re-exported
from tracepipe.spend import Budget, Meter, Price, Reservation, SpendBook


class EngineConfig(BaseModel):
    """Base of every engine kind's recipe config; unknown keys are errors.

    ``price`` and ``budget`` (see :mod:`tracepipe.spend`) are common to every kind: they change
    what a run may spend, never what it outputs, so no fingerprint hashes them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    kind: str
    price: Price | None = Field(None, description="USD per 1M tokens: {input_per_mtok, output_per_mtok, batch_discount}")
    budget: Budget | None = Field(None, description="hard limits over the workdir: {max_usd, max_output_tokens, max_requests}")


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


#: ``finish_reason`` of a request whose prompt does not fit the model's context (no text)
PROMPT_TOO_LONG = "prompt_too_long"
#: prompts too long in a row, with none that fitted, before a stage stops (see ``check_context``)
TOO_LONG_STOP = 32
_CONTEXT_LOCK = threading.Lock()


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
    #: requests go through a provider's batch API: ``price.batch_discount`` applies to them
    batch_priced: ClassVar[bool] = False

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        self.config = config
        self.ctx = ctx
        self._started = False
        #: the engine's name under the recipe's ``engines`` (set by the StageContext that builds it)
        self.name: str = config.kind
        self._meter: Meter | None = None
        #: called once the engine has started (the run records when each engine lived)
        self.on_start: Callable[[], None] | None = None
        #: answered requests whose prompt fitted / did not fit the context (``check_context``)
        self._context_seen = [0, 0]

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

    # -- prompts the model cannot hold ---------------------------------------------------------
    def check_context(self, results: list[list[Completion]], context: str = "the model's context") -> None:
        """Count the answered requests whose prompt did not fit (``prompt_too_long``). One such
        row is dropped with its reason; but when the first :data:`TOO_LONG_STOP` prompts are all
        too long and none fitted, no row will (a context set too small, a template that bloats
        every prompt): raise :class:`EngineFatalError` so the stage stops at once, instead of
        sending a million requests that each come back refused. Engines call this at the end of
        ``generate``; thread-safe."""
        too_long = sum(1 for r in results if r and r[0].finish_reason == PROMPT_TOO_LONG)
        with _CONTEXT_LOCK:
            seen = self._context_seen
            seen[0] += len(results) - too_long
            seen[1] += too_long
            fitted, refused = seen
        if fitted == 0 and refused >= TOO_LONG_STOP:
            longest = max((r[0].prompt_tokens for r in results if r and r[0].finish_reason == PROMPT_TOO_LONG), default=0)
            raise EngineFatalError(
                f"engine {self.name!r}: the first {refused} prompts are all longer than {context} "
                f"(e.g. {longest} tokens) and none fitted, so no row can be generated; raise the context "
                "(vllm: max_model_len; openai: the server's) or shorten the prompts (system_prompt, user_template)"
            )

    # -- spend: prices, budgets, usage (tracepipe.spend) ---------------------------------------
    def meter(self) -> Meter:
        """This engine's account in the run's :class:`~tracepipe.spend.SpendBook` (the
        StageContext's ``spend``; an engine built without a run gets a book of its own)."""
        if self._meter is None:
            book = getattr(self.ctx, "spend", None)
            if not isinstance(book, SpendBook):
                book = SpendBook(None)
            self._meter = book.meter(self.name, self.config.price, self.config.budget, self.batch_priced)
        return self._meter

    def reserve(self, requests: list[GenerationRequest]) -> Reservation:
        """Reserve the worst case of ``requests`` (prompt tokens, ``max_tokens * n`` completion
        tokens, one request each) before dispatching them, all or nothing. Raises
        :class:`~tracepipe.errors.BudgetExceeded` when they could cross a budget: dispatch
        nothing then. Release the reservation when they are answered (or failed) and
        :meth:`Meter.charge` what the provider reported."""
        meter = self.meter()
        if not meter.limited():  # no budget applies: nothing to count
            return meter.reserve(len(requests), 0, 0)
        prompt = sum(self.prompt_tokens_bound([r.messages for r in requests]))
        completion = sum(r.sampling.max_tokens * r.n for r in requests)
        return meter.reserve(len(requests), prompt, completion)

    def count_prompt_tokens(self, chats: list[list[dict[str, str]]]) -> list[int] | None:
        """Prompt tokens of each chat as the model sees it (the chat template applied, as the
        engine or its server renders it), from the tokenizer alone: never starts the engine.
        None when the engine cannot count (no tokenizer, or one without a chat template)."""
        try:
            tok = self.tokenizer()
        except NotImplementedError:
            return None
        from tracepipe.engines._hf import count_chat_tokens

        try:
            return count_chat_tokens(tok, chats, getattr(self.config, "chat_template_kwargs", None) or None)
        except ValueError:  # no chat template
            return None

    def prompt_tokens_bound(self, chats: list[list[dict[str, str]]]) -> list[int]:
        """At least the prompt tokens of each chat: the count when the engine can count, else
        the UTF-8 bytes of the contents plus 16 a message (no byte-level tokenizer makes more
        tokens than bytes; a chat template adds a few a turn)."""
        counted = self.count_prompt_tokens(chats) if chats else []
        if counted is not None:
            return counted
        return [sum(len(str(m.get("content") or "").encode()) + 16 for m in msgs) + 16 for msgs in chats]

    def gpus(self) -> int:
        """GPUs the engine occupies while it runs (vLLM: its parallel size); 0 for API engines."""
        return 0

    def close(self) -> None:
        """Free the model / close clients."""
