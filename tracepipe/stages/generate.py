"""``generate``: the teacher writes ``n`` reasoning traces per problem (a fan-out row stage).

Input columns: ``problem``, ``domain`` (and, for a ``replay`` engine, the columns it replays).
Output columns (one row per sample): ``sample``, ``messages`` (the exact chat sent),
``reasoning``, ``response``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``,
``teacher`` (the engine fingerprint), ``truncated``.

Why: every later stage (verify, difficulty, compress, select, logprobs) works on these columns,
and the cache is keyed on exactly what the teacher saw: problem, domain, prompt templates,
sampling parameters, seed and the teacher fingerprint. Changing any of them regenerates;
changing ``batch_size`` does not.

- **Prompts.** ``system_prompt`` (none by default, as DeepSeek-R1 recommends) and
  ``user_template`` are one string or a ``{domain: text}`` map (``default`` for other domains);
  ``{problem}`` is replaced by the problem. Defaults: math asks for the final answer in
  ``\\boxed{}``, code for one fenced Python block.
- **Seeds.** Sample ``i`` of a row is its own request (``n=1``) with seed
  ``seed_for(_in_key, i, seed)``: a rerun, or a run that resumes after a crash, reproduces every
  sample exactly on engines that honour seeds (vLLM, transformers, vLLM servers).
- **Reasoning / response.** Reasoning the engine returns separately (reasoning servers, a replay
  ``reasoning_column``) is used as is; otherwise the text is split at ``think_tags`` (the text
  before the closing tag, without the opening tag, is the reasoning, the text after it the
  response). A completion with no tags that stopped normally has ``reasoning`` null and all of
  it as ``response``.
- **Truncation.** ``finish_reason == "length"`` (cut by ``max_tokens``) sets ``truncated`` and
  leaves ``response`` null (what was written is kept as ``reasoning``), so a cut-off answer is
  never passed off as complete. Filter them with ``filter: {where: "NOT truncated"}``.
- A prompt longer than the engine's context is dropped with reason ``generate: prompt too long``.

Example::

    - generate: {engine: teacher, n: 4, temperature: 0.6, top_p: 0.95, max_tokens: 16384}
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
from pydantic import Field, field_validator

from tracepipe.contract import DROP_COL, IN_KEY_COL
from tracepipe.engines.base import PROMPT_TOO_LONG, Completion, GenerationRequest, SamplingParams
from tracepipe.hashing import seed_for
from tracepipe.stages import register
from tracepipe.stages._columns import frame_from_columns
from tracepipe.stages.base import ExecField, RowStage, StageParams

DEFAULT_USER_TEMPLATES: dict[str, str] = {
    "math": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "code": (
        "{problem}\n\nWrite a correct and efficient Python 3 solution. Reason step by step, then give "
        "the complete solution in a single fenced code block:\n```python\n# your code\n```"
    ),
    "default": "{problem}",
}

MESSAGES_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
OUT_SCHEMA: dict[str, Any] = {
    IN_KEY_COL: pl.String,
    "sample": pl.Int64,
    "messages": MESSAGES_DTYPE,
    "reasoning": pl.String,
    "response": pl.String,
    "finish_reason": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "teacher": pl.String,
    "truncated": pl.Boolean,
    DROP_COL: pl.String,
}


class GenerateParams(StageParams):
    engine: str = Field(..., description="name of an engine under `engines`")
    n: int = Field(1, ge=1, description="samples per problem")
    temperature: float = Field(0.6, ge=0, description="0 = greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(8192, ge=1, description="completion budget; a completion cut here is `truncated`")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the text)")
    seed: int = Field(0, description="base seed; sample i of a row uses seed_for(row key, i, seed)")
    system_prompt: str | dict[str, str] | None = Field(None, description="system message, or {domain: message}; none by default")
    user_template: str | dict[str, str] | None = Field(
        None, description="user message with {problem}, or {domain: template} merged over the defaults (math: \\boxed{}, code: one python block)"
    )
    think_tags: tuple[str, str] | None = Field(("<think>", "</think>"), description="[open, close] tags around the reasoning; null = no split")
    batch_size: int = ExecField(256, ge=1, description="problems per engine call (and per committed store part)")

    @field_validator("user_template")
    @classmethod
    def _has_problem(cls, v: str | dict[str, str] | None) -> str | dict[str, str] | None:
        for t in ([v] if isinstance(v, str) else list((v or {}).values())):
            if "{problem}" not in t:
                raise ValueError("a user template must contain {problem}")
        return v


def split_completion(
    text: str, reasoning: str | None, finish_reason: str, tags: tuple[str, str] | None
) -> tuple[str | None, str | None, bool]:
    """(reasoning, response, truncated) of one completion; see the module docstring."""
    truncated = finish_reason == "length"
    if reasoning is not None:
        return reasoning.strip(), (None if truncated else text.strip()), truncated
    if tags:
        open_tag, close_tag = tags
        if close_tag in text:
            before, after = text.split(close_tag, 1)
            if open_tag in before:
                before = before.split(open_tag, 1)[1]
            return before.strip(), (None if truncated else after.strip()), truncated
        if open_tag in text:  # opened, never closed: all reasoning, no answer
            return text.split(open_tag, 1)[1].strip(), None, truncated
    if truncated:
        return text.strip(), None, True
    return None, text.strip(), False


@register("generate")
class Generate(RowStage):
    """Teacher generation: ``n`` samples per problem with reasoning split from the response."""

    version: ClassVar[str] = "1"
    Params = GenerateParams
    fanout: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("problem", "domain")
    adds: ClassVar[tuple[str, ...]] = (
        "sample", "messages", "reasoning", "response", "finish_reason",
        "prompt_tokens", "completion_tokens", "teacher", "truncated",
    )
    params: GenerateParams

    # -- declarations -----------------------------------------------------------------------
    def _engine_config(self) -> Any:
        return self.ctx.engines.get(self.params.engine)

    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        cols += [c for c in self.ctx.engine_row_columns(self.params.engine) if c not in cols]
        return cols

    def engine_names(self) -> list[str]:
        return [self.params.engine]

    def requests_per_row(self) -> int:
        return self.params.n

    def fingerprint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"engine": self.ctx.engine_fingerprint(self.params.engine)}
        sampling_args = getattr(self._engine_config(), "sampling_args", None)
        if sampling_args:  # engine-level sampling options change outputs, not the teacher
            extra["engine_sampling_args"] = sampling_args
        return extra

    # -- prompts ----------------------------------------------------------------------------
    @staticmethod
    def _pick(value: str | dict[str, str] | None, domain: str | None, defaults: dict[str, str] | None = None) -> str | None:
        table = dict(defaults or {})
        if isinstance(value, str):
            return value
        table.update(value or {})
        if domain is not None and domain in table:
            return table[domain]
        return table.get("default")

    def messages(self, problem: str, domain: str | None) -> list[dict[str, str]]:
        """The chat sent to the teacher for one problem."""
        if problem is None:
            raise ValueError("problem is null")
        p = self.params
        msgs: list[dict[str, str]] = []
        system = self._pick(p.system_prompt, domain)
        if system:
            msgs.append({"role": "system", "content": system})
        user = self._pick(p.user_template, domain, DEFAULT_USER_TEMPLATES) or "{problem}"
        msgs.append({"role": "user", "content": user.replace("{problem}", problem)})
        return msgs

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self) -> None:
        engine = self.ctx.engine(self.params.engine)
        if engine.kind == "replay" and self.params.n != 1:
            raise ValueError(f"generate: engine {self.params.engine!r} replays one trace per row; use n: 1 (got n: {self.params.n})")
        engine.ensure_started()

    def _requests(self, rows: list[dict[str, Any]]) -> list[GenerationRequest]:
        """``n`` requests a row (sample ``i`` seeded with ``seed_for(row key, i, seed)``)."""
        p = self.params
        requests: list[GenerationRequest] = []
        for r in rows:
            msgs = self.messages(r["problem"], r.get("domain"))
            row = {k: v for k, v in r.items() if k != IN_KEY_COL}
            for i in range(p.n):
                sampling = SamplingParams(
                    temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                    max_tokens=p.max_tokens, stop=list(p.stop), seed=seed_for(r[IN_KEY_COL], i, p.seed),
                )
                requests.append(GenerationRequest(messages=msgs, n=1, sampling=sampling, key=r[IN_KEY_COL], row=row))
        return requests

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest]:
        return self._requests(batch.to_dicts())

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        engine = self.ctx.engine(p.engine)
        teacher = self.ctx.engine_fingerprint(p.engine)
        rows = batch.to_dicts()
        requests = self._requests(rows)
        chats = [requests[j * p.n].messages for j in range(len(rows))]
        results = engine.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
        out: dict[str, list[Any]] = {c: [] for c in OUT_SCHEMA}
        for j, r in enumerate(rows):
            comps: list[Completion] = [c for res in results[j * p.n:(j + 1) * p.n] for c in res[:1]]
            if len(comps) != p.n:
                raise RuntimeError(f"engine returned {len(comps)} completions for {p.n} samples")
            if any(c.finish_reason == PROMPT_TOO_LONG for c in comps):
                self._append(out, r[IN_KEY_COL], None, chats[j], None, teacher,
                             drop=f"generate: prompt too long ({comps[0].prompt_tokens} tokens)")
                continue
            for i, c in enumerate(comps):
                self._append(out, r[IN_KEY_COL], i, chats[j], c, teacher)
        return frame_from_columns(out, OUT_SCHEMA)

    def _append(self, out: dict[str, list[Any]], key: str, sample: int | None, msgs: list[dict[str, str]],
                c: Completion | None, teacher: str, drop: str | None = None) -> None:
        reasoning = response = None
        truncated = None
        if c is not None:
            reasoning, response, truncated = split_completion(c.text, c.reasoning, c.finish_reason, self.params.think_tags)
        out[IN_KEY_COL].append(key)
        out["sample"].append(sample)
        out["messages"].append(msgs)
        out["reasoning"].append(reasoning)
        out["response"].append(response)
        out["finish_reason"].append(c.finish_reason if c else None)
        out["prompt_tokens"].append(c.prompt_tokens if c else None)
        out["completion_tokens"].append(c.completion_tokens if c else None)
        out["teacher"].append(teacher)
        out["truncated"].append(truncated)
        out[DROP_COL].append(drop)

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        cols = out.collect_schema().names()
        if "truncated" not in cols:
            return {}
        s = out.select(
            pl.col("truncated").fill_null(False).sum().alias("truncated"),
            pl.col("completion_tokens").mean().alias("mean_completion_tokens"),
            pl.col("prompt_tokens").sum().alias("prompt_tokens"),
        ).collect().row(0, named=True)
        return {k: (float(v) if isinstance(v, float) else v) for k, v in s.items()}
