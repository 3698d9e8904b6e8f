"""``judge_difficulty``: the teacher rates each problem's difficulty (a row stage).

Input columns: ``problem``, ``domain``. Output columns: ``difficulty_judged`` (a band label:
``easy`` | ``medium`` | ``hard``, or null when the reply could not be parsed),
``difficulty_judge_text`` (the judge's answer, after its thinking block, at most 2,000
characters) and ``difficulty_judge`` (the judge engine's fingerprint).

Why: difficulty-aware prompting (LiteCoT / DAP) lets the teacher itself say how hard a problem is,
which needs no verifier and no extra samples; ``difficulty: {method: judge}`` turns the label into
the ``difficulty`` column that ``compress`` budgets and ``select`` quotas read. The row key is the
problem (and domain), so the n samples of a problem share one judgement: the engine is asked once
per problem, and never again on a rerun.

Parsing: the text after the last closing think tag (or the whole text); the last
``Difficulty: <word>`` wins, else the last label word anywhere; words map to bands through
``labels`` (default ``easy``/``simple`` -> easy, ``medium``/``moderate`` -> medium,
``hard``/``difficult`` -> hard; case-insensitive).

Example::

    - judge_difficulty: {engine: teacher}
    - difficulty: {method: judge}
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import polars as pl
from pydantic import Field, field_validator

from tracepipe.contract import IN_KEY_COL
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.hashing import seed_for
from tracepipe.stages import register
from tracepipe.stages._bands import EASY, HARD, MEDIUM
from tracepipe.stages.base import ExecField, RowStage, StageParams

DEFAULT_TEMPLATE = (
    "How difficult is the following {domain} problem for a strong student? Do not solve it. "
    "Judge the depth of reasoning it needs, then answer with exactly one line: "
    "`Difficulty: easy`, `Difficulty: medium` or `Difficulty: hard`.\n\nProblem:\n{problem}"
)
DEFAULT_LABELS: dict[str, str] = {
    "easy": EASY, "simple": EASY, "medium": MEDIUM, "moderate": MEDIUM, "hard": HARD, "difficult": HARD,
}
TEXT_CHARS = 2000


class JudgeDifficultyParams(StageParams):
    engine: str = Field(..., description="the judge, an engine under `engines` (usually the teacher)")
    prompt_template: str = Field(DEFAULT_TEMPLATE, description="user message with {problem} (and optionally {domain})")
    system_prompt: str | None = Field(None, description="system message")
    labels: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LABELS), description="{word in the reply: band}")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1, description="room for a reasoning judge to think before its label")
    seed: int = Field(0)
    think_tags: tuple[str, str] = Field(("<think>", "</think>"))
    batch_size: int = ExecField(64, ge=1, description="problems per engine call")

    @field_validator("prompt_template")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if "{problem}" not in v:
            raise ValueError("prompt_template must contain {problem}")
        return v

    @field_validator("labels")
    @classmethod
    def _bands(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: b for k, b in v.items() if b not in (EASY, MEDIUM, HARD)}
        if bad:
            raise ValueError(f"labels map words to easy | medium | hard (got {bad})")
        return {k.lower(): b for k, b in v.items()}


def parse_label(text: str | None, labels: dict[str, str], close_tag: str = "</think>") -> str | None:
    """The band a judge's reply names (see the module docstring), or None."""
    if not text:
        return None
    if close_tag in text:
        text = text.rsplit(close_tag, 1)[1]
    words = "|".join(sorted((re.escape(w) for w in labels), key=len, reverse=True))
    tagged = re.findall(rf"difficulty\W{{0,3}}\s*[:=\-]?\s*\W{{0,2}}({words})\b", text, flags=re.IGNORECASE)
    if tagged:
        return labels[tagged[-1].lower()]
    loose = re.findall(rf"\b({words})\b", text, flags=re.IGNORECASE)
    return labels[loose[-1].lower()] if loose else None


@register("judge_difficulty")
class JudgeDifficulty(RowStage):
    """The judge engine rates each problem easy / medium / hard (one request per problem)."""

    version: ClassVar[str] = "1"
    Params = JudgeDifficultyParams
    reads: ClassVar[tuple[str, ...]] = ("problem", "domain")
    adds: ClassVar[tuple[str, ...]] = ("difficulty_judged", "difficulty_judge_text", "difficulty_judge")
    params: JudgeDifficultyParams

    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        cols += [c for c in self.ctx.engine_row_columns(self.params.engine) if c not in cols]
        return cols

    def engine_names(self) -> list[str]:
        return [self.params.engine]

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"judge": self.ctx.engine_fingerprint(self.params.engine)}

    def messages(self, problem: str, domain: str | None) -> list[dict[str, str]]:
        p = self.params
        user = p.prompt_template.replace("{domain}", domain or "given").replace("{problem}", problem)
        return ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [{"role": "user", "content": user}]

    def setup(self) -> None:
        self.ctx.engine(self.params.engine).ensure_started()

    def _requests(self, rows: list[dict[str, Any]]) -> list[GenerationRequest]:
        p = self.params
        return [
            GenerationRequest(
                messages=self.messages(str(r["problem"] or ""), r.get("domain")), n=1,
                sampling=SamplingParams(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                                        seed=seed_for(r[IN_KEY_COL], 0, p.seed)),
                key=r[IN_KEY_COL], row={k: v for k, v in r.items() if k != IN_KEY_COL},
            )
            for r in rows
        ]

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest]:
        return self._requests(batch.to_dicts())

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        engine = self.ctx.engine(p.engine)
        judge = self.ctx.engine_fingerprint(p.engine)
        rows = batch.to_dicts()
        results = engine.generate(self._requests(rows))
        labels, texts = [], []
        for res in results:
            c = res[0] if res else None
            text = None if c is None else c.text
            labels.append(parse_label(text, p.labels, p.think_tags[1]))
            answer = text.rsplit(p.think_tags[1], 1)[1] if text and p.think_tags[1] in text else text
            texts.append(answer.strip()[:TEXT_CHARS] if answer else None)
        return pl.DataFrame(
            {IN_KEY_COL: [r[IN_KEY_COL] for r in rows], "difficulty_judged": labels, "difficulty_judge_text": texts,
             "difficulty_judge": [judge] * len(rows)},
            schema={IN_KEY_COL: pl.String, "difficulty_judged": pl.String, "difficulty_judge_text": pl.String, "difficulty_judge": pl.String},
        )

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        if "difficulty_judged" not in out.collect_schema():
            return {}
        counts = out.group_by("difficulty_judged").len().collect()
        return {"judged": {str(k) if k is not None else "unparsed": int(n) for k, n in counts.iter_rows()}}
