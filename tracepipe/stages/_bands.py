"""Difficulty band labels and thresholds shared by ``difficulty``, ``judge_difficulty``, ``compress``.

Bands are fixed labels so that every stage that keys something on a band (compression budgets,
selection quotas, curricula) agrees on the names:

- ``easy``: pass rate >= ``easy`` threshold;
- ``hard``: pass rate <= ``hard`` threshold (and at least one correct sample, if ``unsolved`` is used);
- ``medium``: in between;
- ``unsolved``: no correct sample at all (a problem nobody solved: maybe too hard, maybe a bad
  gold answer; kept apart so it can be dropped or inspected);
- ``unknown``: no sample could be judged (every verdict ``error`` / ``unverifiable``, or no judge
  label could be parsed).
"""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

EASY, MEDIUM, HARD, UNSOLVED, UNKNOWN = "easy", "medium", "hard", "unsolved", "unknown"
BANDS: tuple[str, ...] = (EASY, MEDIUM, HARD, UNSOLVED, UNKNOWN)
#: easy to hard: the default curriculum order
BAND_ORDER: tuple[str, ...] = (EASY, MEDIUM, HARD, UNSOLVED, UNKNOWN)


class BandThresholds(BaseModel):
    """``{easy: 0.75, hard: 0.25}``: pass rate >= easy is easy, <= hard is hard, else medium."""

    model_config = ConfigDict(extra="forbid")
    easy: float = Field(0.75, ge=0, le=1, description="pass rate at or above which a problem is easy")
    hard: float = Field(0.25, ge=0, le=1, description="pass rate at or below which a problem is hard")

    @model_validator(mode="after")
    def _ordered(self) -> BandThresholds:
        if self.hard >= self.easy:
            raise ValueError(f"bands: hard ({self.hard}) must be below easy ({self.easy})")
        return self


def band_expr(rate: pl.Expr, correct: pl.Expr | None, th: BandThresholds, unsolved: bool = True) -> pl.Expr:
    """Band label of a pass rate (null rate -> ``unknown``; 0 correct -> ``unsolved`` if enabled)."""
    e = pl.when(rate.is_null()).then(pl.lit(UNKNOWN))
    if unsolved:
        zero = (correct == 0) if correct is not None else (rate == 0)
        e = e.when(zero).then(pl.lit(UNSOLVED))
    return (
        e.when(rate >= th.easy).then(pl.lit(EASY))
        .when(rate <= th.hard).then(pl.lit(HARD))
        .otherwise(pl.lit(MEDIUM))
        .cast(pl.String)
    )
