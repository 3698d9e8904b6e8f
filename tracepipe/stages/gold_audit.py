"""``gold_audit``: flag problems whose samples agree on one answer that is not the gold (a set stage).

Input columns: ``id`` (``group_by``), ``answer`` (gold), ``pred_answer`` and ``verdict`` (from
``verify``, or ``judge``). Output columns (every row of a problem gets its problem's values):
``gold_suspect`` (bool), ``gold_alt`` (the answer the samples agree on) and ``gold_agreement``
(the share of the problem's judged samples that give it).

Why: public sets carry flawed references, and a wrong gold answer marks every right trace
``incorrect`` (and a wrong one, matching it, ``correct``). When independent samples agree with
each other and all disagree with the gold, the gold is the likelier error: the report lists these
problems with both answers side by side, and ``select: {gold_suspect: false}`` drops them (``true``
keeps only them, for review).

Rules, per problem (rows grouped by ``group_by``): a sample *agrees with the gold* when its
verdict is ``correct`` or its answer equals the gold; *judged* samples are those whose verdict is
not in ``exclude`` (default ``[error, unverifiable]``: a verifier failure or a gold no rule reads
says nothing; a sample with no answer counts, as a sample that does not give the alternative).
When no sample agrees with the gold, the judged samples' answers are grouped by mathematical
equivalence and the largest group (if it is the only largest) gives ``gold_alt`` and
``gold_agreement`` = its size / judged samples; ``gold_suspect`` is set when there are at least
``min_samples`` judged samples and ``gold_agreement >= min_agreement``, and ``gold_alt`` is not
equal to the gold either. Elsewhere ``gold_alt`` and ``gold_agreement`` are null.

Equivalence: numbers (integers, decimals, fractions, ``\\frac{a}{b}``, thousands separators, a
dollar sign) are compared exactly as rationals; any other pair of answers of a problem in question
is compared with :mod:`tracepipe.verifiers.math` (the same comparison ``verify`` uses) in its
supervised worker processes, so only the few problems in question cost a comparison and a
stuck one times out instead of hanging the run.

Example::

    - verify: {}
    - gold_audit: {min_samples: 3, min_agreement: 0.5}
    - select: {gold_suspect: false}
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, ClassVar

import polars as pl
from pydantic import Field

from tracepipe.contract import KEY_COL, ORDER_COL
from tracepipe.stages import register
from tracepipe.stages.base import ExecField, SetStage, StageParams

_DROP = re.compile(r"\\left|\\right|\\[!,;: ]|\{,\}|\\\$|\$|\s+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_RATIO = re.compile(r"([-+]?\d+)/(\d+)")
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def canonical(ans: str | None) -> str | None:
    """A key that two answers share only if they are equal: ``n:p/q`` for a number (exact
    rational), else ``s:`` and the text without spacing and math delimiters. Unequal keys may
    still be equal answers (``\\sqrt{2}/2`` and ``1/\\sqrt{2}``): those are compared by math-verify."""
    if ans is None:
        return None
    s = _DROP.sub("", ans).rstrip(".")
    if not s:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        if _DECIMAL.fullmatch(s):
            return f"n:{Fraction(s)}"
        m = _RATIO.fullmatch(s)
        if m:
            return f"n:{Fraction(int(m.group(1)), int(m.group(2)))}"
        m = _FRAC.fullmatch(s)
        if m:
            return f"n:{Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) == '-' else 1)}"
    except (ZeroDivisionError, ValueError):
        pass
    return "s:" + s


def _numeric(key: str) -> bool:
    return key.startswith("n:")


class GoldAuditParams(StageParams):
    group_by: str = Field("id", description="column grouping the samples of one problem")
    min_samples: int = Field(3, ge=1, description="judged samples a problem needs before its gold can be suspected")
    min_agreement: float = Field(0.5, gt=0, le=1, description="share of judged samples that must give the same other answer")
    exclude: list[str] = Field(
        default_factory=lambda: ["error", "unverifiable"], description="verdicts that are not evidence (left out of the count)"
    )
    timeout_s: int = Field(5, ge=1, description="math-verify's own timeout per comparison")
    hard_timeout_s: float = ExecField(30.0, gt=0, description="wall time per comparison in its worker process")
    report_rows: int = ExecField(200, ge=0, description="suspect problems listed in the run stats and the report")


class _Union:
    def __init__(self, items: list[str]) -> None:
        self.up = {k: k for k in items}

    def find(self, k: str) -> str:
        while self.up[k] != k:
            self.up[k] = self.up[self.up[k]]
            k = self.up[k]
        return k

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.up[max(ra, rb)] = min(ra, rb)


@register("gold_audit")
class GoldAudit(SetStage):
    """Problems whose samples agree on another answer than the gold: ``gold_suspect``, ``gold_alt``."""

    version: ClassVar[str] = "1"
    Params = GoldAuditParams
    adds: ClassVar[tuple[str, ...]] = ("gold_suspect", "gold_alt", "gold_agreement")
    params: GoldAuditParams

    def input_columns(self) -> list[str]:
        return [self.params.group_by, "answer", "pred_answer", "verdict"]

    def _checker(self) -> Any:
        from tracepipe.verifiers.math import MathChecker

        return MathChecker(timeout_s=self.params.timeout_s, hard_timeout_s=self.params.hard_timeout_s)

    def _equal(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether each (answer, gold) pair is equal for the math verifier (worker processes)."""
        if not pairs:
            return []
        with self._checker() as checker:
            results = checker.check([("\\boxed{" + a + "}", g) for a, g in pairs])
        return [r.verdict == "correct" for r in results]

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        for col in (p.group_by, "answer", "pred_answer"):
            if col not in df.columns:
                why = "group_by" if col == p.group_by else "a verify stage before gold_audit"
                raise ValueError(f"gold_audit: column {col!r} is missing ({why}); have: {', '.join(c for c in df.columns if not c.startswith('_'))}")
        verdict = pl.col("verdict").cast(pl.String) if "verdict" in df.columns else pl.lit(None, dtype=pl.String)
        work = df.select(
            KEY_COL, ORDER_COL,
            pl.coalesce(pl.col(p.group_by).cast(pl.String), pl.col(KEY_COL)).alias("_g"),
            pl.col("answer").cast(pl.String).alias("_gold"),
            pl.col("pred_answer").cast(pl.String).alias("_pred"),
            verdict.alias("_v"),
        ).with_columns(
            pl.col("_pred").map_elements(canonical, return_dtype=pl.String).alias("_ak"),
            pl.col("_gold").map_elements(canonical, return_dtype=pl.String).alias("_gk"),
        ).with_columns(
            (~pl.col("_v").is_in(list(p.exclude)).fill_null(False)).alias("_judged"),
            ((pl.col("_v") == "correct").fill_null(False) | (pl.col("_ak") == pl.col("_gk")).fill_null(False)).alias("_agrees"),
        )
        per = work.group_by("_g").agg(
            pl.col("_judged").sum().alias("_n"), pl.col("_agrees").any().alias("_any"),
            pl.col("_gold").drop_nulls().first().alias("_gold"), pl.col("_gk").drop_nulls().first().alias("_gk"),
        )
        open_groups = per.filter(~pl.col("_any") & (pl.col("_n") > 0))
        answers = work.join(open_groups.select("_g"), on="_g", how="semi").filter(pl.col("_judged") & pl.col("_ak").is_not_null())
        alt = self._alternatives(answers, open_groups)
        out = work.select(KEY_COL, "_g").join(alt, on="_g", how="left", maintain_order="left")
        return out.select(
            KEY_COL,
            pl.col("gold_suspect").fill_null(False).cast(pl.Boolean),
            pl.col("gold_alt").cast(pl.String),
            pl.col("gold_agreement").cast(pl.Float64),
        )

    def _alternatives(self, answers: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
        """``_g``, ``gold_alt``, ``gold_agreement``, ``gold_suspect`` for the problems no sample
        agrees with: their answers grouped by equivalence, the largest group if it is alone."""
        p = self.params
        schema = {"_g": pl.String, "gold_alt": pl.String, "gold_agreement": pl.Float64, "gold_suspect": pl.Boolean}
        if answers.is_empty():
            return pl.DataFrame(schema=schema)
        # distinct answer keys per problem, with their count and most frequent (then first) spelling
        keys = answers.group_by("_g", "_ak").agg(
            pl.len().alias("_c"), pl.col("_pred").mode().sort().first().alias("_raw"), pl.col(ORDER_COL).min().alias("_o"),
        ).sort("_g", "_o")
        by_group: dict[str, list[tuple[str, int, str]]] = {}
        for g, k, c, raw, _o in keys.iter_rows():
            by_group.setdefault(g, []).append((k, c, raw))
        info = {g: (n, gold, gk) for g, n, _any, gold, gk in groups.iter_rows()}
        # pairs of unequal keys math-verify must compare (two numbers are never equal here)
        pairs = [(g, a, b) for g, ks in by_group.items() for i, (a, _, ra) in enumerate(ks) for (b, _, rb) in ks[i + 1:]
                 if not (_numeric(a) and _numeric(b))]
        raw_of = {(g, k): raw for g, ks in by_group.items() for k, _, raw in ks}
        same = self._equal([(raw_of[(g, a)], raw_of[(g, b)]) for g, a, b in pairs])
        unions = {g: _Union([k for k, _, _ in ks]) for g, ks in by_group.items()}
        for (g, a, b), eq in zip(pairs, same):
            if eq:
                unions[g].join(a, b)
        rows: list[tuple[str, str, float, bool]] = []
        for g, ks in by_group.items():
            sizes: dict[str, int] = {}
            for k, c, _ in ks:
                root = unions[g].find(k)
                sizes[root] = sizes.get(root, 0) + c
            ranked = sorted(sizes.values(), reverse=True)
            if len(ranked) > 1 and ranked[0] == ranked[1]:
                continue  # no single answer the samples agree on
            top = max(sizes, key=lambda r: sizes[r])
            members = [(c, -j, raw) for j, (k, c, raw) in enumerate(ks) if unions[g].find(k) == top]
            alt = max(members)[2]
            n, _gold, _gk = info[g]
            share = sizes[top] / n
            rows.append((g, alt, share, n >= p.min_samples and share >= p.min_agreement))
        # the alternative itself compared with the gold (a number was already compared exactly)
        check = [i for i, (g, alt, _s, sus) in enumerate(rows) if sus and info[g][1] is not None
                 and not (_numeric(canonical(alt) or "s:") and _numeric(info[g][2] or "s:"))]
        equal = self._equal([(rows[i][1], str(info[rows[i][0]][1])) for i in check])
        for i, eq in zip(check, equal):
            if eq:
                rows[i] = (rows[i][0], rows[i][1], rows[i][2], False)
        return pl.DataFrame(rows, schema=schema, orient="row")

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        p = self.params
        schema = out.collect_schema()
        if "gold_suspect" not in schema or p.group_by not in schema:
            return {}
        per = out.group_by(p.group_by).agg(
            pl.col("gold_suspect").any().alias("gold_suspect"),
            *[pl.col(c).first() for c in ("problem", "answer", "gold_alt", "gold_agreement") if c in schema],
            pl.len().alias("samples"),
        ).collect()
        sus = per.filter(pl.col("gold_suspect")).sort(p.group_by)
        res: dict[str, Any] = {"problems": per.height, "gold_suspects": sus.height}
        if sus.height and p.report_rows:
            rows = sus.drop("gold_suspect").head(p.report_rows).rename({p.group_by: "id"})
            res["suspect_rows"] = [
                {k: (v[:300] if isinstance(v, str) and k == "problem" else round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                for r in rows.iter_rows(named=True)
            ]
        return res
