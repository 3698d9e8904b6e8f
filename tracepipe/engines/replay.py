"""``replay`` engine: traces that already exist in a column of the source rows.

Recipe::

    engines:
      existing:
        kind: replay
        column: solution              # the completion text
        reasoning_column: null        # a separate reasoning column, if the data has one
        finish_reason: stop
        tokenizer: null               # a local tokenizer dir / Hub id to count tokens (else null counts)

Use it to re-verify, dedupe, compress or score traces that were generated elsewhere: the
``generate`` stage passes each row's values (``GenerationRequest.row``) and this engine returns
the ``column`` text as the completion. The stage splits ``<think>…</think>`` out of it as it
does for a model's output (its ``think_tags``); with ``reasoning_column`` the reasoning comes
from that column instead and the text is the response. A row whose column is null or missing raises (the
row is quarantined with that error). ``n`` must be 1: a row holds one trace.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tracepipe.engines import register_engine
from tracepipe.engines._hf import load_tokenizer
from tracepipe.engines.base import Completion, Engine, EngineConfig, GenerationRequest
from tracepipe.hashing import fingerprint as _fp


class ReplayConfig(EngineConfig):
    kind: str = "replay"
    column: str = Field(..., description="column holding the completion text")
    reasoning_column: str | None = Field(None, description="column holding the reasoning, if separate")
    finish_reason: str = Field("stop", description="finish_reason reported for every row")
    tokenizer: str | None = Field(None, description="tokenizer (dir or Hub id) to count tokens; without one the counts are null")
    name: str | None = Field(None, description="label of the teacher that wrote the traces (goes into the fingerprint)")


@register_engine("replay", ReplayConfig)
class ReplayEngine(Engine):
    config: ReplayConfig
    bulk = True  # no model: rows are curated in big batches

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self._tok: Any = None

    def row_columns(self) -> list[str]:
        """Source columns the engine reads from each request's ``row``."""
        cols = [self.config.column]
        if self.config.reasoning_column:
            cols.append(self.config.reasoning_column)
        return cols

    def fingerprint_info(self) -> dict[str, Any]:
        c = self.config
        info: dict[str, Any] = {"kind": "replay", "column": c.column, "reasoning_column": c.reasoning_column,
                                "finish_reason": c.finish_reason}
        if c.name:
            info["name"] = c.name
        if c.tokenizer:
            info["tokenizer"] = c.tokenizer
        label = c.name or "replay"
        info["fingerprint"] = f"{label}:{c.column}" + (f"+{c.reasoning_column}" if c.reasoning_column else "") + f"|{_fp(info, 12)}"
        return info

    def fingerprint(self) -> str:
        return str(self.fingerprint_info()["fingerprint"])

    def tokenizer(self) -> Any:
        if not self.config.tokenizer:
            raise NotImplementedError("this replay engine has no `tokenizer:` configured")
        if self._tok is None:
            self._tok = load_tokenizer(self.config.tokenizer, base_dir=getattr(self.ctx, "recipe_dir", None))
        return self._tok

    def _count(self, text: str | None) -> int | None:
        if not self.config.tokenizer or text is None:
            return None
        return len(self.tokenizer()(text, add_special_tokens=False)["input_ids"])

    def _prompt_count(self, messages: list[dict[str, str]]) -> int | None:
        if not self.config.tokenizer:
            return None
        tok = self.tokenizer()
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return len(tok(text, add_special_tokens=False)["input_ids"])
        return sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        c = self.config
        out: list[list[Completion]] = []
        for req in requests:
            if req.n != 1:
                raise ValueError(f"the replay engine holds one trace per row; got n={req.n} (use n: 1)")
            row = req.row or {}
            if c.column not in row:
                raise KeyError(f"replay column {c.column!r} is not among the row's columns ({sorted(row)})")
            text = row[c.column]
            if text is None:
                raise ValueError(f"replay column {c.column!r} is null in this row")
            if not isinstance(text, str):
                raise TypeError(f"replay column {c.column!r} holds {type(text).__name__}, not text")
            reasoning = row.get(c.reasoning_column) if c.reasoning_column else None
            n_completion = self._count(text)
            if n_completion is not None and reasoning:
                n_completion += self._count(reasoning) or 0
            # counts are None without a tokenizer: unknown, not zero
            out.append([Completion(text, c.finish_reason, self._prompt_count(req.messages), n_completion, reasoning)])  # type: ignore[arg-type]
        return out
