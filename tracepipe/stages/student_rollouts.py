"""``student_rollouts``: k samples of the *student* per problem, verified (a row stage).

Input columns: ``problem``, ``domain``, ``answer``, ``tests`` (and, for a ``replay`` engine, the
column it replays). Output columns: ``student_correct`` (correct samples), ``student_judged``
(samples whose verdict is ``correct`` or ``incorrect``; ``error`` / ``unverifiable`` say nothing
about the student), ``student_verdicts`` (the k verdicts, in sample order) and ``student`` (the
student engine's fingerprint).

Why: what is hard for the teacher is not what is worth teaching. Light-R1 and Phi-4-reasoning
keep the problems the model *to be trained* solves sometimes but not reliably ("teachable"):
``difficulty: {method: student}`` bands ``student_correct / student_judged``, and
``select: {difficulty: [medium, hard]}`` keeps the teachable ones. The stage keeps the teacher's
rows intact (one output row per input row, no fan-out) and its row key is the problem, so the
student runs once per problem, whatever the number of teacher samples, and never again on a rerun.

Samples are generated like ``generate`` does (sample ``i`` is its own request with seed
``seed_for(row key, i, seed)``; the same default prompts: math asks for ``\\boxed{}``, code for one
Python block), the thinking block is cut at the last closing tag, a truncated sample has no
answer (``incorrect``), and the answer is checked with :mod:`tracepipe.verifiers` routed by
``domain`` exactly as ``verify`` routes it.

Example::

    engines:
      student: {kind: vllm, model: Qwen/Qwen2.5-7B-Instruct}
    stages:
      - student_rollouts: {engine: student, k: 8, temperature: 0.7}
      - difficulty: {method: student, bands: {easy: 0.75, hard: 0.25}}
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
from pydantic import Field

from tracepipe.contract import IN_KEY_COL
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.hashing import seed_for
from tracepipe.stages import register
from tracepipe.stages._reverify import EngineReverifierLifecycle, Item
from tracepipe.stages.base import ExecField, RowStage, StageParams

DEFAULT_USER_TEMPLATES: dict[str, str] = {  # the generate stage's defaults (the same prompts)
    "math": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "code": (
        "{problem}\n\nWrite a correct and efficient Python 3 solution. Reason step by step, then give "
        "the complete solution in a single fenced code block:\n```python\n# your code\n```"
    ),
    "default": "{problem}",
}
JUDGED = ("correct", "incorrect")


class StudentRolloutsParams(StageParams):
    engine: str = Field(..., description="the student, an engine under `engines`")
    k: int = Field(4, ge=1, description="samples per problem")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(4096, ge=1, description="completion budget; a sample cut here counts as incorrect")
    seed: int = Field(0, description="base seed; sample i uses seed_for(row key, i, seed)")
    system_prompt: str | None = Field(None)
    user_template: str | dict[str, str] | None = Field(None, description="user message with {problem}, or {domain: template} over the defaults")
    think_tags: tuple[str, str] = Field(("<think>", "</think>"))
    math_timeout_s: int = Field(5, ge=1)
    batch_size: int = ExecField(32, ge=1, description="problems per engine call")
    verify_workers: int = ExecField(1, ge=1, description="math-verify worker processes")


def answer_part(text: str | None, reasoning: str | None, finish_reason: str, close_tag: str) -> str | None:
    """The part of a completion that holds the answer (None when it was cut off)."""
    if finish_reason == "length" or text is None:
        return None
    if reasoning is not None:
        return text
    return text.rsplit(close_tag, 1)[1] if close_tag in text else text


@register("student_rollouts")
class StudentRollouts(EngineReverifierLifecycle, RowStage):
    """k verified samples of the student per problem: its pass rate, for teachable-problem selection."""

    version: ClassVar[str] = "1"
    Params = StudentRolloutsParams
    reads: ClassVar[tuple[str, ...]] = ("problem", "domain", "answer", "tests")
    adds: ClassVar[tuple[str, ...]] = ("student_correct", "student_judged", "student_verdicts", "student")
    params: StudentRolloutsParams

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rv"] = None
        return state

    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        cols += [c for c in self.ctx.engine_row_columns(self.params.engine) if c not in cols]
        return cols

    def requests_per_row(self) -> int:
        return self.params.k

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"student": self.ctx.engine_fingerprint(self.params.engine)}

    def messages(self, problem: str, domain: str | None) -> list[dict[str, str]]:
        p = self.params
        table = dict(DEFAULT_USER_TEMPLATES)
        if isinstance(p.user_template, str):
            user = p.user_template
        else:
            table.update(p.user_template or {})
            user = table.get(domain or "", table["default"])
        msgs = [{"role": "system", "content": p.system_prompt}] if p.system_prompt else []
        return msgs + [{"role": "user", "content": user.replace("{problem}", problem)}]

    def _requests(self, rows: list[dict[str, Any]]) -> list[GenerationRequest]:
        """``k`` requests a row (rollout ``i`` seeded with ``seed_for(row key, i, seed)``)."""
        p = self.params
        reqs: list[GenerationRequest] = []
        for r in rows:
            msgs = self.messages(str(r["problem"] or ""), r.get("domain"))
            row = {k: v for k, v in r.items() if k != IN_KEY_COL}
            for i in range(p.k):
                sampling = SamplingParams(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                                          seed=seed_for(r[IN_KEY_COL], i, p.seed))
                reqs.append(GenerationRequest(messages=msgs, n=1, sampling=sampling, key=r[IN_KEY_COL], row=row))
        return reqs

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest]:
        return self._requests(batch.to_dicts())

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        engine = self.ctx.engine(p.engine)
        student = self.ctx.engine_fingerprint(p.engine)
        rows = batch.to_dicts()
        reqs = self._requests(rows)
        results = engine.generate(reqs)
        if len(results) != len(reqs):
            raise RuntimeError(f"student engine returned {len(results)} results for {len(reqs)} requests")
        items: list[Item] = []
        for j, res in enumerate(results):
            r = rows[j // p.k]
            c = res[0] if res else None
            text = None if c is None else answer_part(c.text, c.reasoning, c.finish_reason, p.think_tags[1])
            items.append(Item(text, r.get("domain"), r.get("answer"), r.get("tests")))
        verdicts = [o.verdict for o in self.reverifier().check(items)]
        per = [verdicts[i * p.k:(i + 1) * p.k] for i in range(len(rows))]
        return pl.DataFrame(
            {
                IN_KEY_COL: [r[IN_KEY_COL] for r in rows],
                "student_correct": [sum(v == "correct" for v in vs) for vs in per],
                "student_judged": [sum(v in JUDGED for v in vs) for vs in per],
                "student_verdicts": per,
                "student": [student] * len(rows),
            },
            schema={IN_KEY_COL: pl.String, "student_correct": pl.Int64, "student_judged": pl.Int64,
                    "student_verdicts": pl.List(pl.String), "student": pl.String},
        )

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        schema = out.collect_schema()
        if "student_correct" not in schema:
            return {}
        s = out.select(pl.col("student_correct").sum().alias("c"), pl.col("student_judged").sum().alias("n")).collect().row(0)
        return {"student_samples_judged": int(s[1] or 0), "student_pass_rate": (s[0] / s[1]) if s[1] else None}
