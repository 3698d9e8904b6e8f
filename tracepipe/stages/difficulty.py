"""``difficulty``: per-problem pass rate and a difficulty band for every row (a set stage).

Input columns: ``id`` (``group_by``) and ``verdict``; with ``method: judge`` also
``difficulty_judged`` (from a ``judge_difficulty`` stage); with ``method: student`` also
``student_correct`` / ``student_judged`` (from a ``student_rollouts`` stage).
Output columns (every row of a problem gets its problem's values): ``pass_rate``,
``n_correct``, ``n_judged``, ``difficulty``; with ``method: student`` also ``student_pass_rate``.

Why: a problem's difficulty decides how long its trace should be (``compress`` budgets), whether
it is worth training on (``select``: drop the easy, keep the teachable), and the order of a
curriculum. Three sources, chosen with ``method``:

- ``pass_rate`` (default): the teacher's own samples. ``pass_rate = n_correct / n_judged`` over
  the rows of a problem (rows grouped by ``id``), where ``n_judged`` counts the samples whose
  verdict is not in ``exclude`` (default ``[error, unverifiable]``: a verifier failure or a
  problem with nothing to check against says nothing about the problem's difficulty, so it
  neither helps nor hurts the rate; an unanswered or truncated sample is ``incorrect`` and
  counts). With ``exclude: []`` the denominator is every sample.
- ``judge``: the teacher's judgement of the problem (``judge_difficulty`` stage, difficulty-aware
  prompting as in LiteCoT / DAP): ``difficulty`` is the parsed label; ``pass_rate`` is still
  computed from verdicts where the rows have them.
- ``student``: the pass rate of the model to be trained (``student_rollouts`` stage: k student
  samples per problem, verified): difficulty *relative to the student*, as in Light-R1 and
  Phi-4-reasoning's "teachable" problems (keep ``medium`` / ``hard``: problems the student
  sometimes, but not reliably, solves). ``student_pass_rate = student_correct /
  student_judged``; ``pass_rate`` stays the teacher's (null without a verify stage).

Bands (``bands: {easy: 0.75, hard: 0.25}``): rate >= easy is ``easy``, <= hard is ``hard``, else
``medium``; no correct sample at all is ``unsolved`` (``unsolved: false`` folds it into ``hard``);
no judged sample (rate undefined) is ``unknown``. The set stage only aggregates columns that row
stages cached, so it is recomputed in milliseconds whenever the rows change.

Example::

    - difficulty: {bands: {easy: 0.75, hard: 0.25}}
    - difficulty: {method: student, bands: {easy: 0.8, hard: 0.2}}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import polars as pl
from pydantic import Field

from tracepipe.contract import KEY_COL
from tracepipe.stages import register
from tracepipe.stages._bands import BANDS, UNKNOWN, BandThresholds, band_expr
from tracepipe.stages.base import SetStage, StageParams


class DifficultyParams(StageParams):
    method: Literal["pass_rate", "judge", "student"] = Field(
        "pass_rate", description="pass_rate (teacher verdicts) | judge (judge_difficulty labels) | student (student_rollouts)"
    )
    bands: BandThresholds = Field(default_factory=BandThresholds, description="{easy: >= threshold, hard: <= threshold}")
    unsolved: bool = Field(True, description="label problems with no correct sample `unsolved` (else they are `hard`)")
    group_by: str = Field("id", description="column that groups the samples of one problem")
    verdict_column: str = Field("verdict", description="column with the verifier verdicts")
    exclude: list[str] = Field(
        default_factory=lambda: ["error", "unverifiable"],
        description="verdicts left out of the denominator (not evidence about the problem)",
    )
    judge_column: str = Field("difficulty_judged", description="method judge: column with the parsed label")
    student_correct_column: str = Field("student_correct", description="method student: correct student samples")
    student_judged_column: str = Field("student_judged", description="method student: judged student samples")


@register("difficulty")
class Difficulty(SetStage):
    """Pass rate per problem and a difficulty band (teacher verdicts, a judge, or a student)."""

    version: ClassVar[str] = "1"
    Params = DifficultyParams
    adds: ClassVar[tuple[str, ...]] = ("pass_rate", "n_correct", "n_judged", "difficulty")
    params: DifficultyParams

    def input_columns(self) -> list[str]:
        p = self.params
        cols = [p.group_by, p.verdict_column]
        if p.method == "judge":
            cols.append(p.judge_column)
        if p.method == "student":
            cols += [p.student_correct_column, p.student_judged_column]
        return cols

    def output_columns(self) -> list[str]:
        return [*self.adds, *(["student_pass_rate"] if self.params.method == "student" else [])]

    def _need(self, df: pl.DataFrame, col: str, why: str) -> None:
        if col not in df.columns:
            raise ValueError(f"difficulty: column {col!r} is missing ({why}); have: {', '.join(df.columns)}")

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        self._need(df, p.group_by, "group_by")
        group = pl.coalesce(pl.col(p.group_by).cast(pl.String), pl.col(KEY_COL)).alias("_group")
        df = df.with_columns(group)
        if p.verdict_column in df.columns:
            v = pl.col(p.verdict_column).cast(pl.String)
            judged = v.is_not_null() & ~v.is_in(list(p.exclude))
            per = df.group_by("_group").agg(
                (judged & (v == "correct")).sum().cast(pl.Int64).alias("n_correct"),
                judged.sum().cast(pl.Int64).alias("n_judged"),
            ).with_columns(
                pl.when(pl.col("n_judged") > 0).then(pl.col("n_correct") / pl.col("n_judged")).otherwise(None)
                .cast(pl.Float64).alias("pass_rate")
            )
        elif p.method == "pass_rate":
            raise ValueError(f"difficulty: method pass_rate needs the {p.verdict_column!r} column (a verify stage before it)")
        else:
            per = df.select("_group").unique().with_columns(
                pl.lit(None, dtype=pl.Int64).alias("n_correct"), pl.lit(None, dtype=pl.Int64).alias("n_judged"),
                pl.lit(None, dtype=pl.Float64).alias("pass_rate"),
            )
        extra: list[str] = []
        if p.method == "pass_rate":
            per = per.with_columns(band_expr(pl.col("pass_rate"), pl.col("n_correct"), p.bands, p.unsolved).alias("difficulty"))
        elif p.method == "judge":
            self._need(df, p.judge_column, "method judge reads the label a judge_difficulty stage wrote")
            lab = df.group_by("_group").agg(pl.col(p.judge_column).cast(pl.String).drop_nulls().first().alias("_lab"))
            per = per.join(lab, on="_group", how="left").with_columns(
                pl.when(pl.col("_lab").is_in(list(BANDS))).then(pl.col("_lab")).otherwise(pl.lit(UNKNOWN)).alias("difficulty")
            ).drop("_lab")
        else:  # student
            self._need(df, p.student_correct_column, "method student reads a student_rollouts stage's counts")
            self._need(df, p.student_judged_column, "method student reads a student_rollouts stage's counts")
            st = df.group_by("_group").agg(
                pl.col(p.student_correct_column).cast(pl.Int64).drop_nulls().first().alias("_sc"),
                pl.col(p.student_judged_column).cast(pl.Int64).drop_nulls().first().alias("_sn"),
            ).with_columns(
                pl.when(pl.col("_sn") > 0).then(pl.col("_sc") / pl.col("_sn")).otherwise(None).cast(pl.Float64).alias("student_pass_rate")
            )
            per = per.join(st, on="_group", how="left").with_columns(
                band_expr(pl.col("student_pass_rate"), pl.col("_sc"), p.bands, p.unsolved).alias("difficulty")
            ).drop("_sc", "_sn")
            extra = ["student_pass_rate"]
        out = df.select(KEY_COL, "_group").join(per, on="_group", how="left", maintain_order="left")
        return out.select(KEY_COL, "pass_rate", "n_correct", "n_judged", "difficulty", *extra)

    def summarize(self, out: pl.LazyFrame) -> dict[str, object]:
        schema = out.collect_schema()
        if "difficulty" not in schema or self.params.group_by not in schema:
            return {}
        per = out.select(self.params.group_by, "difficulty", "pass_rate").unique(self.params.group_by, keep="first").collect()
        bands = {str(k): int(n) for k, n in per.group_by("difficulty").len().sort("difficulty").iter_rows()}
        rate = per["pass_rate"].drop_nulls()
        return {
            "method": self.params.method,
            "problems": per.height,
            "problems_per_band": bands,
            "mean_pass_rate": float(rate.mean()) if rate.len() else None,  # type: ignore[arg-type]
        }
