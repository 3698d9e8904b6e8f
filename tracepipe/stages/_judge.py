"""The answer judge's parameters, shared by the ``judge`` stage and ``verify``'s ``judge:`` option.

``verify: {judge: {engine: grader, when: unverifiable}}`` is shorthand for a ``judge`` stage
right after ``verify`` (the recipe loader adds it); both read this one model, so a misspelt key
is reported at its own YAML path and line either way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tracepipe.stages.base import ExecField, StageParams


class JudgeParams(StageParams):
    engine: str = Field(..., description="the judge, an engine under `engines`")
    when: Literal["unverifiable", "always"] = Field(
        "unverifiable",
        description="unverifiable: judge only the rows the rules could not decide; always: judge every row with a gold "
        "answer and record where the judge and the rules disagree (the rules' verdict stays)",
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=1, description="room for a reasoning judge to think before its one word")
    seed: int = Field(0)
    think_tags: tuple[str, str] = Field(("<think>", "</think>"), description="the judge's thinking block, skipped when reading its word")
    answer_chars: int = Field(500, ge=1, description="longest final answer shown to the judge (characters)")
    format_strict: bool = Field(
        True, description="a row with format issues is never `correct`, as verify's format.strict (follows it under `verify: {judge: ...}`)"
    )
    report_rows: int = ExecField(200, ge=0, description="disagreements listed in the run stats and the report")
    batch_size: int = ExecField(64, ge=1, description="rows per committed part")
