"""``select``: choose the rows that become the dataset (a set stage).

Input columns: ``id`` (``group_by``) and, as the parameters need them, ``verdict``,
``difficulty``, ``gold_suspect``, the ``length_column`` (default ``completion_tokens``), the
quota columns and the curriculum column. Output columns: ``curriculum_stage`` / ``curriculum_rank`` (with
``curriculum``). Rows not selected are dropped with a reason (``select: verdict``,
``select: difficulty``, ``select: gold_suspect``, ``select: length``, ``select: per_problem``, ``select: quota``,
``select: size``, ``select: not in quotas``, ``select: baseline``), so the rejects show why.

Why: which traces a model is trained on matters as much as how they were made (LIMO, s1, Light-R1,
Phi-4-reasoning): correct traces only, the teachable difficulty bands, one or a few samples per
problem, a domain / difficulty mixture of a fixed size, a curriculum, and a random subset of the
same size to measure whether the curation helped.

Steps, in order:

1. **Row filters**: ``verdict`` (one value or a list), ``difficulty`` (bands to keep),
   ``gold_suspect`` (``false`` drops the problems a ``gold_audit`` stage suspects, ``true`` keeps
   only them), ``min_tokens`` / ``max_tokens`` on ``length_column`` (a row without a length fails a length
   filter).
2. **k per problem**: ``per_problem: k`` keeps the first ``k`` samples of each problem by
   ``prefer``: ``shortest`` / ``longest`` (``length_column``, ties by row order), ``random``
   (a stable hash of the row key and ``seed``: the same rows on every run and machine,
   whatever the input order), ``first`` (row order).
3. **Mixture**: ``quotas`` over one or two columns (``{domain: {math: 0.7, code: 0.3},
   difficulty: {easy: 0.2, medium: 0.5, hard: 0.3}}``), fractions of ``size`` or integer counts.
   Both marginals hold exactly when the rows allow it (see :mod:`tracepipe.stages._mixture`);
   inside a cell rows are taken in ``prefer`` order. Rows whose label is not in a quota are
   dropped (``select: not in quotas``). When the rows cannot fill a quota, ``shortfall`` decides:
   ``warn`` (default: a warning that names every short label, and the largest selection that
   keeps within every quota), ``fill`` (warn, then fill up to ``size`` with other rows in
   ``prefer`` order; the mixture is then off) or ``error``. Without ``quotas``, ``size`` caps the
   selection (rows in ``prefer`` order). The stats (``extra``) show each quota's target and
   the rows selected.
4. **Curriculum**: ``curriculum: {by: difficulty, order: [easy, medium, hard]}`` (the default
   with ``curriculum: {}``) sets ``curriculum_stage`` (the value) and ``curriculum_rank`` (its
   position); named stages as in two-stage curriculum SFT: ``curriculum: {by: difficulty,
   stages: {stage1: [easy, medium], stage2: [hard]}}`` set ``curriculum_stage`` to the stage
   name. Values not listed go last. The runner keeps set-stage output in input order; the output
   writer sorts on ``curriculum_rank`` (a stable sort; ``options: {curriculum_order: false}``
   turns it off), so shards are in curriculum order. Or write one output per named stage with the writer's ``where`` option
   (``options: {where: "curriculum_stage = 'stage1'"}``) and train on them one after the other.
5. **Random baseline** (``baseline: random``): for ablations, the same number of rows as the
   curated selection (steps 1-3 above, computed the same way), drawn uniformly with ``seed``
   from the rows passing the ``verdict`` and length filters, at most ``per_problem`` per
   problem: the difficulty filter, ``prefer`` and the quotas are what the baseline leaves out.
   Run it as a second recipe on the same ``workdir``: every row stage comes from the cache.

Example::

    - select: {verdict: correct, per_problem: 1, prefer: shortest}
    - select:
        verdict: correct
        difficulty: [medium, hard]
        per_problem: 1
        size: 1000
        quotas: {domain: {math: 0.7, code: 0.3}}
        curriculum: {by: difficulty, stages: {stage1: [medium], stage2: [hard]}}
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar, Literal

import polars as pl
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tracepipe.contract import DROP_COL, KEY_COL, ORDER_COL
from tracepipe.stages import register
from tracepipe.stages._bands import BAND_ORDER
from tracepipe.stages._mixture import allocate, targets
from tracepipe.stages.base import SetStage, StageParams

log = logging.getLogger(__name__)
Prefer = Literal["shortest", "longest", "random", "first"]


class QuotaShortfall(UserWarning):
    """A mixture quota could not be filled from the rows available."""


class CurriculumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str = Field("difficulty", description="column whose values define the curriculum")
    order: list[str] | None = Field(None, description="values in training order (default for difficulty: easy, medium, hard, unsolved, unknown)")
    stages: dict[str, list[str]] | None = Field(None, description="named stages in order: {stage name: [values]}")

    @model_validator(mode="after")
    def _one(self) -> CurriculumParams:
        if self.order is not None and self.stages is not None:
            raise ValueError("give `order` or `stages`, not both")
        return self


class SelectParams(StageParams):
    verdict: str | list[str] | None = Field(None, description="keep rows with this verdict (or one of these)")
    difficulty: str | list[str] | None = Field(None, description="keep rows in this band (or these bands)")
    gold_suspect: bool | None = Field(None, description="false: drop the problems gold_audit suspects; true: keep only them")
    length_column: str = Field("completion_tokens", description="length used by min/max_tokens and prefer")
    min_tokens: int | None = Field(None, ge=0, description="keep rows with length >= this")
    max_tokens: int | None = Field(None, ge=0, description="keep rows with length <= this")
    group_by: str = Field("id", description="column grouping the samples of one problem")
    per_problem: int | None = Field(None, ge=1, description="keep at most k samples per problem")
    prefer: Prefer = Field("shortest", description="which samples / rows win: shortest | longest | random | first")
    seed: int = Field(0, description="seed of `prefer: random` and of the baseline")
    size: int | None = Field(None, ge=0, description="target rows (with fraction quotas) or a cap on the selection")
    quotas: dict[str, dict[str, int | float]] | None = Field(
        None, description="{column: {value: fraction or count}}, one or two columns"
    )
    shortfall: Literal["warn", "fill", "error"] = Field("warn", description="when quotas cannot be met: warn | fill | error")
    curriculum: CurriculumParams | None = Field(None, description="{by, order | stages}: adds curriculum_stage / curriculum_rank")
    baseline: Literal["random"] | None = Field(None, description="random: a seeded random subset of the curated selection's size")

    @model_validator(mode="after")
    def _check(self) -> SelectParams:
        if self.quotas is not None:
            if not 1 <= len(self.quotas) <= 2:
                raise ValueError("quotas: give one or two columns")
            targets(self.quotas, self.size)  # raises on inconsistent quotas
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens > max_tokens")
        return self


def _as_list(v: str | list[str] | None) -> list[str] | None:
    return [v] if isinstance(v, str) else v


def _stable_rank(keys: list[str], seed: int) -> list[int]:
    return [xxhash.xxh64_intdigest(k.encode(), seed=seed) for k in keys]


@register("select")
class Select(SetStage):
    """Verdict / band / length filters, k per problem, mixture quotas, curriculum, random baseline."""

    version: ClassVar[str] = "1"
    Params = SelectParams
    params: SelectParams

    def input_columns(self) -> list[str]:
        p = self.params
        cols = [p.group_by]
        if p.verdict is not None:
            cols.append("verdict")
        if p.difficulty is not None:
            cols.append("difficulty")
        if p.gold_suspect is not None:
            cols.append("gold_suspect")
        if p.min_tokens is not None or p.max_tokens is not None or p.prefer in ("shortest", "longest"):
            cols.append(p.length_column)
        cols += list(p.quotas or {})
        if p.curriculum is not None:
            cols.append(p.curriculum.by)
        return list(dict.fromkeys(cols))

    def output_columns(self) -> list[str]:
        return ["curriculum_stage", "curriculum_rank"] if self.params.curriculum is not None else []

    # -- helpers -------------------------------------------------------------------------------
    def _need(self, df: pl.DataFrame, col: str, why: str) -> None:
        if col not in df.columns:
            raise ValueError(f"select: column {col!r} is missing ({why}); have: {', '.join(c for c in df.columns if not c.startswith('_'))}")

    def _order(self, df: pl.DataFrame, prefer: Prefer) -> pl.DataFrame:
        """``df`` sorted by preference (best first), ties by row order."""
        if prefer == "random":
            return df.sort(["_rnd", ORDER_COL])
        if prefer == "first":
            return df.sort(ORDER_COL)
        return df.sort(["_len", ORDER_COL], descending=[prefer == "longest", False], nulls_last=True)

    def _per_problem(self, pool: pl.DataFrame, prefer: Prefer) -> tuple[pl.DataFrame, pl.DataFrame]:
        k = self.params.per_problem
        if k is None:
            return pool, pool.head(0)
        ranked = self._order(pool, prefer).with_columns(pl.int_range(pl.len()).over("_group").alias("_k"))
        return ranked.filter(pl.col("_k") < k).drop("_k"), ranked.filter(pl.col("_k") >= k).drop("_k")

    # -- decide --------------------------------------------------------------------------------
    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        self._need(df, p.group_by, "group_by")
        n_len = pl.col(p.length_column).cast(pl.Float64) if p.length_column in df.columns else pl.lit(None, dtype=pl.Float64)
        df = df.with_columns(
            pl.coalesce(pl.col(p.group_by).cast(pl.String), pl.col(KEY_COL)).alias("_group"),
            n_len.alias("_len"),
            (pl.Series("_rnd", _stable_rank(df[KEY_COL].to_list(), p.seed), dtype=pl.UInt64)
             if p.prefer == "random" or p.baseline == "random" else pl.lit(0, dtype=pl.UInt64).alias("_rnd")),
            pl.lit(None, dtype=pl.String).alias("_why"),
        )
        if p.prefer in ("shortest", "longest") and p.length_column not in df.columns:
            raise ValueError(f"select: prefer {p.prefer} needs the {p.length_column!r} column (length_column)")

        def mark(frame: pl.DataFrame, cond: pl.Expr, why: str) -> pl.DataFrame:
            return frame.with_columns(pl.when(pl.col("_why").is_null() & ~cond.fill_null(False)).then(pl.lit(why)).otherwise(pl.col("_why")).alias("_why"))

        verdicts = _as_list(p.verdict)
        if verdicts is not None:
            self._need(df, "verdict", "verdict filter")
            df = mark(df, pl.col("verdict").cast(pl.String).is_in(verdicts), "select: verdict")
        if p.min_tokens is not None or p.max_tokens is not None:
            self._need(df, p.length_column, "min_tokens / max_tokens")
            ok = pl.col("_len").is_not_null()
            if p.min_tokens is not None:
                ok = ok & (pl.col("_len") >= p.min_tokens)
            if p.max_tokens is not None:
                ok = ok & (pl.col("_len") <= p.max_tokens)
            df = mark(df, ok, "select: length")
        if p.gold_suspect is not None:
            self._need(df, "gold_suspect", "gold_suspect filter (a gold_audit stage before select)")
            df = mark(df, pl.col("gold_suspect").fill_null(False) == p.gold_suspect, "select: gold_suspect")
        df = df.with_columns(pl.col("_why").alias("_why_h"))  # the baseline's filters end here
        bands = _as_list(p.difficulty)
        if bands is not None:
            self._need(df, "difficulty", "difficulty filter (a difficulty stage before select)")
            df = mark(df, pl.col("difficulty").cast(pl.String).is_in(bands), "select: difficulty")

        pool = df.filter(pl.col("_why").is_null())
        kept, extra = self._per_problem(pool, p.prefer)
        reasons: dict[str, str] = dict.fromkeys(extra[KEY_COL].to_list(), "select: per_problem")
        kept, more = self._mixture(kept)
        reasons.update(more)

        if p.baseline == "random":
            n = kept.height
            base_pool, base_extra = self._per_problem(df.filter(pl.col("_why_h").is_null()), "random")
            chosen = self._order(base_pool, "random").head(n)
            if chosen.height < n:
                self._warn(f"select baseline: only {chosen.height} rows are eligible for a random baseline of {n}")
            reasons = dict.fromkeys(base_extra[KEY_COL].to_list(), "select: per_problem")
            chosen_keys = set(chosen[KEY_COL].to_list())
            reasons.update({k: "select: baseline" for k in base_pool[KEY_COL].to_list() if k not in chosen_keys})
            kept = chosen
            df = df.with_columns(pl.col("_why_h").alias("_why"))

        # curriculum and final order
        kept_keys = set(kept[KEY_COL].to_list())
        out = df.with_columns(
            pl.when(pl.col(KEY_COL).is_in(list(kept_keys))).then(pl.lit(None, dtype=pl.String))
            .otherwise(pl.coalesce(pl.col("_why"), pl.col(KEY_COL).replace_strict(reasons, default=None, return_dtype=pl.String)))
            .alias(DROP_COL)
        )
        cols = [KEY_COL, DROP_COL]
        if p.curriculum is not None:
            out = self._curriculum(out)
            cols += ["curriculum_stage", "curriculum_rank"]
        return out.select(cols)

    def _mixture(self, kept: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, str]]:
        p = self.params
        reasons: dict[str, str] = {}
        if p.quotas is None:
            if p.size is None or kept.height <= p.size:
                return kept, reasons
            ordered = self._order(kept, p.prefer)
            reasons.update(dict.fromkeys(ordered[KEY_COL][p.size:].to_list(), "select: size"))
            return ordered.head(p.size), reasons
        cols = list(p.quotas)
        for c in cols:
            self._need(kept, c, "quotas")
        total, per = targets(p.quotas, p.size)
        lab = [pl.col(c).cast(pl.String).alias(f"_q{i}") for i, c in enumerate(cols)]
        kept = kept.with_columns(lab)
        qcols = [f"_q{i}" for i in range(len(cols))]
        inside = pl.lit(True)
        for i, c in enumerate(cols):
            inside = inside & pl.col(qcols[i]).is_in(list(per[c])).fill_null(False)
        outside = kept.filter(~inside)
        reasons.update(dict.fromkeys(outside[KEY_COL].to_list(), "select: not in quotas"))
        cand = self._order(kept.filter(inside), p.prefer).with_columns(pl.int_range(pl.len()).over(qcols).alias("_r"))
        available = {tuple(r[:-1]): int(r[-1]) for r in cand.group_by(qcols).len().iter_rows()}
        take = allocate(per, available)
        cells = pl.DataFrame(
            [list(cell) + [n] for cell, n in take.items()], schema=[*qcols, "_take"], orient="row"
        ).with_columns(pl.col(q).cast(pl.String) for q in qcols)
        cand = cand.join(cells, on=qcols, how="left").with_columns(pl.col("_take").fill_null(0))
        chosen = cand.filter(pl.col("_r") < pl.col("_take"))
        rest = cand.filter(pl.col("_r") >= pl.col("_take"))
        got = chosen.height
        if got < total:
            short = []
            for i, c in enumerate(cols):
                have = dict(chosen.group_by(qcols[i]).len().iter_rows())
                for label, want in per[c].items():
                    if have.get(label, 0) < want:
                        avail = int(cand.filter(pl.col(qcols[i]) == label).height)
                        short.append(f"{c}={label}: {have.get(label, 0)} of {want} ({avail} eligible)")
            msg = f"select: mixture short by {total - got} rows of {total}; " + "; ".join(short)
            if p.shortfall == "error":
                raise ValueError(msg)
            if p.shortfall == "fill":
                extra = self._order(rest, p.prefer).head(total - got)
                chosen = pl.concat([chosen, extra], how="diagonal_relaxed")
                rest = rest.join(extra.select(KEY_COL), on=KEY_COL, how="anti")
                msg += f"; filled {extra.height} rows outside the quotas (shortfall: fill)"
            self._warn(msg)
        reasons.update(dict.fromkeys(rest[KEY_COL].to_list(), "select: quota"))
        drop = [c for c in chosen.columns if c in (*qcols, "_r", "_take")]
        return chosen.drop(drop), reasons

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        warnings.warn(msg, QuotaShortfall, stacklevel=2)

    def _curriculum(self, out: pl.DataFrame) -> pl.DataFrame:
        cur = self.params.curriculum
        assert cur is not None
        self._need(out, cur.by, "curriculum.by")
        value = pl.col(cur.by).cast(pl.String)
        if cur.stages is not None:
            names = list(cur.stages)
            stage_of = {v: name for name, vals in cur.stages.items() for v in vals}
            rank_of = {v: names.index(name) for v, name in stage_of.items()}
            stage = value.replace_strict(stage_of, default=None, return_dtype=pl.String)
            rank = value.replace_strict(rank_of, default=len(names), return_dtype=pl.Int64)
        else:
            order = cur.order or (list(BAND_ORDER) if cur.by == "difficulty" else None)
            if order is None:
                raise ValueError(f"select: curriculum by {cur.by!r} needs `order` or `stages`")
            stage = value
            rank = value.replace_strict({v: i for i, v in enumerate(order)}, default=len(order), return_dtype=pl.Int64)
        return out.with_columns(stage.alias("curriculum_stage"), rank.fill_null(len(cur.stages or cur.order or BAND_ORDER)).alias("curriculum_rank"))

    # -- stats -----------------------------------------------------------------------------------
    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        p = self.params
        schema = out.collect_schema()
        res: dict[str, Any] = {"selected": int(out.select(pl.len()).collect().item())}
        if p.baseline:
            res["baseline"] = p.baseline
        if p.quotas is not None and all(c in schema for c in p.quotas):
            total, per = targets(p.quotas, p.size)
            mix: dict[str, Any] = {}
            short: dict[str, Any] = {}
            for c, want in per.items():
                have = {str(k): int(n) for k, n in out.group_by(pl.col(c).cast(pl.String)).len().collect().iter_rows()}
                mix[c] = {lab: {"target": w, "selected": have.get(lab, 0)} for lab, w in want.items()}
                for lab, w in want.items():
                    if have.get(lab, 0) < w:
                        short[f"{c}={lab}"] = w - have.get(lab, 0)
            res["mixture_target"] = total
            res["mixture"] = mix
            if short:
                res["mixture_shortfall"] = short
        if p.curriculum is not None and "curriculum_stage" in schema:
            res["curriculum"] = {
                str(k): int(n)
                for k, _r, n in out.group_by("curriculum_stage", "curriculum_rank").len().sort("curriculum_rank").collect().iter_rows()
            }
        return res
