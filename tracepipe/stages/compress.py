"""``compress``: shorter traces that still reach the same answer (a row stage; one set-stage method).

Input columns: ``problem``, ``reasoning``, ``response``, ``domain``, ``answer``, ``tests``,
``verdict``, ``difficulty`` (and, for a ``replay`` rewriter, the column it replays).
Output columns (``method: rewrite``): ``reasoning_compressed`` (the rewritten trace, only where
it was accepted; null otherwise, so writers fall back to ``reasoning``), ``response_compressed``
(the rewrite's final answer text, accepted only), ``compress_status`` (``accepted`` |
``rejected:<reason>`` | ``skipped:<reason>``), ``compress_band``, ``compress_budget`` (tokens),
``reasoning_tokens`` (before), ``reasoning_compressed_tokens`` (after, accepted only),
``compress_candidate_tokens`` (the rewrite's trace, accepted or not), ``compress_ratio``
(candidate / before), ``compress_verdict`` (re-verification verdict), ``compressor`` (the
rewriter's fingerprint), ``compress_prompt_hash``, ``compress_prompt_tokens`` (prompt tokens the
engine reported), and ``compress_messages`` (the exact chat sent) with ``record_prompt: true``.

Why: long-CoT traces are mostly verification loops and restarts; training on concise traces of
the same correctness gives shorter, often better students (LiteCoT / difficulty-aware prompting:
short traces for easy problems, longer ones for hard problems).

``method: rewrite`` (the default; LiteCoT / DAP): the rewriter engine (``engine:``) gets the
problem, the long trace, the original final answer and a length budget chosen by the row's
difficulty band (``budgets``, in tokens or as a ratio of the original trace's tokens; bands
from a ``difficulty`` stage, ``default`` for rows without one), and writes a concise complete
trace as ``<think>…</think>`` followed by the final answer. The rewrite is accepted only if

1. it finished (``finish_reason`` not ``length``; else ``rejected:truncated``) and the prompt
   fitted the rewriter (else ``rejected:prompt-too-long``);
2. it is complete: a closed thinking block and an answer after it (a ``\\boxed{}`` / final-answer
   phrase for math, a code block for code): else ``rejected:incomplete``; and it passes the
   format checks of :mod:`tracepipe.verifiers.format` (no repetition loop, no repeated lines):
   else ``rejected:format:<issue>``;
3. its trace is shorter than the original by ``margin`` (``<= (1 - margin) * before``): else
   ``rejected:not-shorter``;
4. it passes the same verifiers as ``verify`` (:mod:`tracepipe.verifiers`): math answers are
   compared with the gold answer by math-verify, code runs the tests in the sandbox; without a
   gold answer the rewrite's answer must equal the original's. Else
   ``rejected:answer-changed`` (math) / ``rejected:tests-failed`` (code) /
   ``rejected:verify-error`` (the verifier failed).

Otherwise the original is kept and the reason recorded. Only rows whose ``verdict`` is in
``verdicts`` (default ``[correct]``) are rewritten (``skipped:<verdict>``); rows without a
reasoning trace are ``skipped:no-reasoning``. When the rewriter is itself a reasoning model, the
*last* ``<think>…</think>`` block of its output is the rewritten trace (its own thinking comes
first; give it room with ``max_tokens``, since the default cap is the original's length + 256);
a server that splits reasoning out returns the tagged block as reasoning, which is used when the
text has no tags left. The prompt holds the whole original trace: the rewriter's context must fit
it (else ``rejected:prompt-too-long``). Token counts use ``tokenizer`` (a local dir / Hub id), else the
rewriter's tokenizer, else an estimate (words and punctuation; ``token_unit`` in the stats).

``method: shortest-correct``: no model. Of the correct samples of a problem (``group_by``),
keep the shortest (``length_column``, default ``completion_tokens``; else the trace's length)
and drop the other correct ones (``compress: longer than the shortest correct sample``);
incorrect samples pass through untouched (``skipped:<verdict>``) for preference pairs. This
needs the whole group, so with this method ``compress`` is a *set* stage: a variant registered
under the same name for these params (:mod:`tracepipe.stages.compress_shortest`), which
``get_stage("compress")(params, ctx)`` builds. The columns are the same as above where they
apply, plus ``compress_group_tokens`` (mean length of the problem's correct samples, the "before").

``summarize()`` puts mean tokens before / after, the acceptance rate, the rejection reasons and
the same per band into the run stats (``extra``), which the dataset card shows.

Example::

    - compress:
        engine: teacher
        budget_unit: ratio
        budgets: {easy: 0.3, medium: 0.5, hard: 0.7, default: 0.5}
        margin: 0.1
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from tracepipe.contract import IN_KEY_COL
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.hashing import fingerprint, seed_for
from tracepipe.stages import HasVariants, register
from tracepipe.stages._columns import frame_from_columns
from tracepipe.stages._compress_stats import compression_stats
from tracepipe.stages._reverify import EngineReverifierLifecycle, Item, is_code
from tracepipe.stages.base import ExecField, RowStage, StageParams
from tracepipe.verifiers.format import FormatConfig, check_format

DEFAULT_TEMPLATE = """You are given a problem and a long, correct chain of thought that solves it. Rewrite the chain of thought so that it is concise but complete: keep every step needed to reach the answer, drop repetition, hesitation, re-checking and dead ends, and reach the same final answer.

This problem is {difficulty}. Use at most {budget} tokens for the rewritten reasoning.

Problem:
{problem}

Original chain of thought:
{reasoning}

Original final answer:
{response}

Reply in exactly this format and nothing else:
<think>
the concise reasoning (at most {budget} tokens)
</think>
the final solution, ending with the same final answer{answer_hint}"""
ANSWER_HINTS = {"math": " in \\boxed{}", "code": " as one complete ```python code block"}
DEFAULT_BUDGETS: dict[str, float] = {"easy": 0.3, "medium": 0.5, "hard": 0.7, "unsolved": 0.7, "unknown": 0.5, "default": 0.5}
PLACEHOLDERS = ("{problem}", "{reasoning}", "{response}", "{budget}", "{difficulty}", "{answer_hint}")
#: format issues that mean "not a complete trace" (the rest are named: rejected:format:<issue>)
INCOMPLETE = ("empty", "think_unclosed", "no_answer", "truncated")
_APPROX = re.compile(r"\w+|[^\w\s]")
MESSAGES_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))

OUT_SCHEMA: dict[str, Any] = {
    IN_KEY_COL: pl.String,
    "reasoning_compressed": pl.String,
    "response_compressed": pl.String,
    "compress_status": pl.String,
    "compress_band": pl.String,
    "compress_budget": pl.Int64,
    "reasoning_tokens": pl.Int64,
    "reasoning_compressed_tokens": pl.Int64,
    "compress_candidate_tokens": pl.Int64,
    "compress_ratio": pl.Float64,
    "compress_verdict": pl.String,
    "compressor": pl.String,
    "compress_prompt_hash": pl.String,
    "compress_prompt_tokens": pl.Int64,
}


class CompressParams(StageParams):
    method: Literal["rewrite", "shortest-correct"] = Field("rewrite", description="rewrite (an engine) | shortest-correct (no model)")
    engine: str | None = Field(None, description="rewrite: the rewriter, an engine under `engines`")
    budget_unit: Literal["ratio", "tokens"] = Field("ratio", description="budgets as a share of the original trace's tokens, or in tokens")
    budgets: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_BUDGETS),
        description="{band: budget}; `default` for bands not listed / rows without a band",
    )
    min_budget: int = Field(32, ge=1, description="smallest budget in tokens")
    margin: float = Field(0.1, ge=0, lt=1, description="accept only if the trace shrinks to <= (1 - margin) of its tokens")
    verdicts: list[str] | None = Field(["correct"], description="rewrite only rows with these verdicts (null: every row)")
    prompt_template: str = Field(DEFAULT_TEMPLATE, description="user message; {problem} {reasoning} {response} {budget} {difficulty} {answer_hint}")
    system_prompt: str | None = Field(None, description="system message for the rewriter")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int | None = Field(
        None, ge=1, description="rewriter completion cap (default: the original trace + response tokens + 256, at least 256)"
    )
    seed: int = Field(0, description="base seed (per row: seed_for(row key, 0, seed))")
    think_tags: tuple[str, str] = Field(("<think>", "</think>"), description="tags around the rewritten trace in the rewriter's output")
    tokenizer: str | None = Field(None, description="tokenizer (dir or Hub id) that counts tokens; default: the rewriter's")
    record_prompt: bool = Field(False, description="add `compress_messages`, the exact chat sent to the rewriter")
    math_timeout_s: int = Field(5, ge=1, description="math-verify timeout per answer")
    # shortest-correct
    group_by: str = Field("id", description="shortest-correct: column grouping the samples of one problem")
    length_column: str = Field("completion_tokens", description="shortest-correct: length of a sample (else the trace's characters)")
    batch_size: int = ExecField(64, ge=1, description="rows per rewriter call (and per committed store part)")
    verify_workers: int = ExecField(1, ge=1, description="math-verify worker processes")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        for ph in ("{reasoning}", "{budget}"):
            if ph not in v:
                raise ValueError(f"prompt_template must contain {ph}")
        return v

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        if self.method == "rewrite" and not self.engine:
            raise ValueError("method rewrite needs `engine` (the rewriter)")
        for band, b in self.budgets.items():
            if b <= 0 or (self.budget_unit == "ratio" and b > 1):
                raise ValueError(f"budgets.{band}: a ratio budget is in (0, 1], a token budget > 0 (got {b})")
        return self


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace the known ``{placeholders}`` only (other braces, e.g. LaTeX, stay as written)."""
    out = template
    for ph in PLACEHOLDERS:
        out = out.replace(ph, values.get(ph[1:-1], ""))
    return out


def split_rewrite(text: str, reasoning: str | None, tags: tuple[str, str]) -> tuple[str | None, str | None]:
    """(trace, final answer text) of a rewriter output: the *last* closed tag block and what follows."""
    open_tag, close_tag = tags
    if close_tag in text:
        before, after = text.rsplit(close_tag, 1)
        if open_tag in before:
            before = before.rsplit(open_tag, 1)[1]
        elif reasoning is None:
            return None, None  # a closing tag with no opening one: not a well-formed trace
        else:
            before = reasoning
        return before.strip() or None, after.strip() or None
    if reasoning is not None and open_tag not in text:  # the server split the block out
        return reasoning.strip() or None, text.strip() or None
    return None, None


def has_answer(response: str | None, domain: str | None, tests: Any) -> bool:
    if not response:
        return False
    if is_code(domain, tests):
        from tracepipe.verifiers.code import extract_code

        return extract_code(response) is not None
    from tracepipe.verifiers.math import extract_answer

    return extract_answer(response)[0] is not None


@register("compress")
class Compress(EngineReverifierLifecycle, RowStage, metaclass=HasVariants):
    """Difficulty-aware rewriting of traces (re-verified). ``method: shortest-correct`` builds the
    registered variant :class:`~tracepipe.stages.compress_shortest.ShortestCorrect` instead."""

    version: ClassVar[str] = "1"
    Params = CompressParams
    reads: ClassVar[tuple[str, ...]] = ("problem", "reasoning", "response", "domain", "answer", "tests", "verdict", "difficulty")
    adds: ClassVar[tuple[str, ...]] = tuple(c for c in OUT_SCHEMA if c != IN_KEY_COL)
    params: CompressParams

    def __init__(self, params: CompressParams, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._tok: Any = None
        self._tok_loaded = False
        self._fmt = FormatConfig(think_open=params.think_tags[0], think_close=params.think_tags[1])

    def __getstate__(self) -> dict[str, Any]:  # live verifier workers never cross process boundaries
        state = dict(self.__dict__)
        state.update(_rv=None, _tok=None, _tok_loaded=False)
        return state

    # -- declarations -----------------------------------------------------------------------
    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        cols += [c for c in self.ctx.engine_row_columns(self.params.engine) if c not in cols]
        return cols

    def output_columns(self) -> list[str]:
        return [*self.adds, *(["compress_messages"] if self.params.record_prompt else [])]

    def prompt_hash(self) -> str:
        return fingerprint({"template": self.params.prompt_template, "system": self.params.system_prompt, "hints": ANSWER_HINTS})

    def fingerprint_extra(self) -> dict[str, Any]:
        assert self.params.engine
        return {"rewriter": self.ctx.engine_fingerprint(self.params.engine), "prompt_hash": self.prompt_hash()}

    # -- tokens -----------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if not self._tok_loaded:
            self._tok_loaded = True
            if self.params.tokenizer:
                from tracepipe.engines._hf import load_tokenizer

                self._tok = load_tokenizer(self.params.tokenizer, base_dir=self.ctx.recipe_dir)
            else:
                try:
                    self._tok = self.ctx.engine(self.params.engine).tokenizer()  # type: ignore[arg-type]
                except NotImplementedError:
                    self._tok = None
        return self._tok

    def count(self, text: str | None) -> int | None:
        """Tokens of ``text`` (the tokenizer's, else an estimate: words and punctuation marks)."""
        if text is None:
            return None
        tok = self._tokenizer()
        if tok is None:
            return len(_APPROX.findall(text))
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def token_unit(self) -> str:
        return "tokens" if self._tokenizer() is not None else "approx (words + punctuation)"

    # -- prompts ----------------------------------------------------------------------------
    def budget(self, band: str | None, before: int) -> int:
        p = self.params
        b = p.budgets.get(band or "default", p.budgets.get("default"))
        if b is None:
            b = DEFAULT_BUDGETS["default"] if p.budget_unit == "ratio" else float(before)
        tokens = b * before if p.budget_unit == "ratio" else b
        return max(p.min_budget, int(round(tokens)))

    def messages(self, row: dict[str, Any], budget: int, band: str | None) -> list[dict[str, str]]:
        p = self.params
        domain = row.get("domain")
        values = {
            "problem": str(row.get("problem") or ""),
            "reasoning": str(row.get("reasoning") or ""),
            "response": str(row.get("response") or ""),
            "budget": str(budget),
            "difficulty": band if band and band not in ("default", "unknown") else "of unknown difficulty",
            "answer_hint": ANSWER_HINTS["code" if is_code(domain, row.get("tests")) else "math"],
        }
        msgs: list[dict[str, str]] = []
        if p.system_prompt:
            msgs.append({"role": "system", "content": p.system_prompt})
        msgs.append({"role": "user", "content": fill_template(p.prompt_template, values)})
        return msgs

    def _requests(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[GenerationRequest], list[int]]:
        """Per row, its output record so far (band, tokens before, budget; the status of a row
        not sent), the rewriter requests, and the rows they belong to: what :meth:`process`
        sends and ``tracepipe plan`` counts. Tokenizes, never calls the engine."""
        p = self.params
        recs: list[dict[str, Any]] = []
        requests: list[GenerationRequest] = []
        todo: list[int] = []
        for r in rows:
            band = r.get("difficulty") or "default"
            before = self.count(r.get("reasoning"))
            rec: dict[str, Any] = {c: None for c in OUT_SCHEMA}
            rec.update({IN_KEY_COL: r[IN_KEY_COL], "compress_band": band, "reasoning_tokens": before, "compress_messages": None})
            recs.append(rec)
            if not r.get("reasoning"):
                rec["compress_status"] = "skipped:no-reasoning"
                continue
            if p.verdicts is not None and "verdict" in r and r["verdict"] not in p.verdicts:
                rec["compress_status"] = f"skipped:{r['verdict']}"
                continue
            budget = self.budget(band, int(before or 0))
            msgs = self.messages(r, budget, band)
            rec["compress_budget"] = budget
            if p.record_prompt:
                rec["compress_messages"] = msgs
            resp_tokens = self.count(r.get("response")) or 0
            cap = p.max_tokens or max(256, int(before or 0) + resp_tokens + 256)
            sampling = SamplingParams(temperature=p.temperature, top_p=p.top_p, max_tokens=cap, seed=seed_for(r[IN_KEY_COL], 0, p.seed))
            row = {k: v for k, v in r.items() if k != IN_KEY_COL}
            requests.append(GenerationRequest(messages=msgs, n=1, sampling=sampling, key=r[IN_KEY_COL], row=row))
            todo.append(len(recs) - 1)
        return recs, requests, todo

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest]:
        return self._requests(batch.to_dicts())[1]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        engine = self.ctx.engine(p.engine)  # type: ignore[arg-type]
        rows = batch.to_dicts()
        recs, requests, todo = self._requests(rows)
        marks = {"compressor": self.ctx.engine_fingerprint(p.engine), "compress_prompt_hash": self.prompt_hash()}  # type: ignore[arg-type]
        for rec in recs:
            rec.update(marks)
        results = engine.generate(requests) if requests else []
        if len(results) != len(requests):
            raise RuntimeError(f"rewriter returned {len(results)} results for {len(requests)} requests")
        checks: list[tuple[int, Item, Any]] = []
        for j, res in zip(todo, results):
            rec, r = recs[j], rows[j]
            if not res:
                raise RuntimeError("rewriter returned no completion")
            c = res[0]
            rec["compress_prompt_tokens"] = c.prompt_tokens
            if c.finish_reason == "prompt_too_long":
                rec["compress_status"] = "rejected:prompt-too-long"
                continue
            trace, final = split_rewrite(c.text, c.reasoning, p.think_tags)
            cand = self.count(trace) if trace is not None else None
            rec["compress_candidate_tokens"] = cand
            before = rec["reasoning_tokens"] or 0
            if cand is not None and before:
                rec["compress_ratio"] = cand / before
            if c.finish_reason == "length":
                rec["compress_status"] = "rejected:truncated"
                continue
            if trace is None or final is None:
                rec["compress_status"] = "rejected:incomplete"
                continue
            issues = check_format(final, reasoning=trace, finish_reason=c.finish_reason,
                                  has_answer=has_answer(final, r.get("domain"), r.get("tests")), cfg=self._fmt)
            if issues:
                hard = [i for i in issues if i not in INCOMPLETE]
                rec["compress_status"] = f"rejected:format:{hard[0]}" if hard else "rejected:incomplete"
                continue
            if cand is None or cand > math.floor((1 - p.margin) * before):
                rec["compress_status"] = "rejected:not-shorter"
                continue
            checks.append((j, Item(final, r.get("domain"), r.get("answer"), r.get("tests")), (trace, final)))
        self._verify(checks, recs, rows)
        for rec in recs:
            if rec["compress_status"] is None:  # pragma: no cover - every path sets one
                rec["compress_status"] = "rejected:unknown"
        cols = list(OUT_SCHEMA) + (["compress_messages"] if p.record_prompt else [])
        schema = dict(OUT_SCHEMA, **({"compress_messages": MESSAGES_DTYPE} if p.record_prompt else {}))
        return frame_from_columns({c: [rec[c] for rec in recs] for c in cols}, schema)

    def _verify(self, checks: list[tuple[int, Item, Any]], recs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        if not checks:
            return
        outcomes = self.reverifier().check([it for _, it, _ in checks])
        # no gold answer: the rewrite must give the original's answer (math-verify equality)
        again: list[tuple[int, Item, Any]] = []
        for (j, it, texts), o in zip(checks, outcomes):
            code = is_code(it.domain, it.tests)
            if o.verdict == "unverifiable" and not code:
                from tracepipe.verifiers.math import extract_answer

                orig = extract_answer(rows[j].get("response"))[0]
                if orig is not None:
                    again.append((j, Item(it.response, it.domain, orig, None), texts))
                    continue
            self._settle(recs[j], o.verdict, code, texts)
        if again:
            for (j, _it, texts), o in zip(again, self.reverifier().check([x for _, x, _ in again])):
                self._settle(recs[j], o.verdict, False, texts)

    def _settle(self, rec: dict[str, Any], verdict: str, code: bool, texts: tuple[str, str]) -> None:
        rec["compress_verdict"] = verdict
        if verdict == "correct":
            rec["compress_status"] = "accepted"
            rec["reasoning_compressed"], rec["response_compressed"] = texts
            rec["reasoning_compressed_tokens"] = rec["compress_candidate_tokens"]
        elif verdict == "incorrect":
            rec["compress_status"] = "rejected:tests-failed" if code else "rejected:answer-changed"
        elif verdict == "unverifiable":
            rec["compress_status"] = "rejected:unverifiable"
        else:
            rec["compress_status"] = "rejected:verify-error"

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        stats = compression_stats(out, "reasoning_tokens")
        if stats:
            stats["method"] = "rewrite"
            try:
                stats["token_unit"] = self.token_unit()
            except Exception:  # noqa: BLE001 - a tokenizer that cannot load here: the counts say tokens
                stats["token_unit"] = "tokens"
        return stats
