"""``tip_mask``: the TIP class of every rollout position and a training mask for a chosen rule
(a set stage over the values a ``tip`` stage stored).

Input columns: ``loss_mask`` (the rollout positions: only they are classified and masked),
``student_entropy`` and the divergence (``tip_log_ratio``, or ``tip_kl`` with
``divergence: kl``), from ``tip``.
Output columns: ``tip_class`` (list<int8>, aligned with ``token_ids``), ``tip_mask``
(list<int8>, 1 on the kept positions, always within ``loss_mask``), ``tip_entropy_threshold``
and ``tip_divergence_threshold`` (float32: the thresholds the row was classified with).

Classes (TIP: Token Importance in on-Policy distillation, two axes over the student's rollout):

====  =====================================================================
0     not classified (prompt tokens; position 0)
1     high entropy, high divergence
2     high entropy, low divergence
3     low entropy, high divergence: the student is confident and the teacher disagrees ("overconfident")
4     low entropy, low divergence
====  =====================================================================

"High" means above the ``entropy_quantile`` (``divergence_quantile``) quantile of the rollout
positions' values (numpy's linear interpolation): per sequence (``thresholds: per_sequence``,
each row's own quantiles) or over every rollout position of every row (``global``). The
divergence is the sampled token's log-ratio ``log p_S - log p_T`` (``log_ratio``; high = the
student surer of its token than the teacher), its absolute value (``abs_log_ratio``), or the KL
over the shared top-k (``kl``); a position without a value (no shared top-k) counts as low.

The mask (``mask:``) keeps the union of what its keys select among the rollout positions:
``entropy_top: f`` the fraction ``f`` with the highest entropy (exactly ``round(f * n)`` of the
``n`` positions, per sequence or globally as ``thresholds`` says; ties go to the earlier
position), ``divergence_top: f`` the same by divergence, ``overconfident: true`` class 3,
``classes: [...]`` those classes. The default, ``{entropy_top: 0.5, overconfident: true}``, is the
TIP rule: the uncertain half plus the confident-and-wrong tokens that entropy alone misses.

Why a set stage apart from ``tip``: global quantiles need every row, and the thresholds and rule
are what users tune: this stage only reads stored values, so changing them recomputes numpy
passes and never a model call. Its decision is not stored (deciding again costs what reading it
back would); a rerun over unchanged rows reuses its output parts.

Example::

    - tip: {engine: student, top_k: 20}
    - tip_mask: {thresholds: global, entropy_quantile: 0.8, mask: {entropy_top: 0.2, overconfident: true}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tracepipe.contract import KEY_COL
from tracepipe.errors import RunFailed
from tracepipe.stages import register
from tracepipe.stages.base import SetStage, StageParams

CLASS_NAMES = {1: "high_entropy_high_divergence", 2: "high_entropy_low_divergence",
               3: "overconfident", 4: "low_entropy_low_divergence"}
DIVERGENCE_COLUMN = {"log_ratio": "tip_log_ratio", "abs_log_ratio": "tip_log_ratio", "kl": "tip_kl"}


class TipRule(BaseModel):
    """Which rollout positions ``tip_mask`` keeps (the union of the keys given)."""

    model_config = ConfigDict(extra="forbid")
    entropy_top: float | None = Field(None, gt=0, le=1, description="keep this fraction of positions with the highest entropy")
    divergence_top: float | None = Field(None, gt=0, le=1, description="keep this fraction of positions with the highest divergence")
    overconfident: bool = Field(False, description="keep class 3: low entropy, high divergence")
    classes: list[Literal[1, 2, 3, 4]] = Field(default_factory=list, description="keep the positions of these classes")

    @model_validator(mode="after")
    def _some(self) -> TipRule:
        if self.entropy_top is None and self.divergence_top is None and not self.overconfident and not self.classes:
            raise ValueError("the mask rule keeps nothing: give entropy_top, divergence_top, overconfident or classes")
        return self


class TipMaskParams(StageParams):
    divergence: Literal["log_ratio", "abs_log_ratio", "kl"] = Field("log_ratio", description="the divergence axis")
    thresholds: Literal["per_sequence", "global"] = Field("per_sequence", description="quantiles (and top fractions) per row or over all rows")
    entropy_quantile: float = Field(0.5, gt=0, lt=1, description="entropy above this quantile is high")
    divergence_quantile: float = Field(0.5, gt=0, lt=1, description="divergence above this quantile is high")
    mask: TipRule = Field(default_factory=lambda: TipRule(entropy_top=0.5, overconfident=True), description="what tip_mask keeps")


def _flat(col: pl.Series, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, values with NaN for nulls, null rows) of a list column."""
    arr = col.to_arrow()
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], type=arr.type))
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    vals = values.to_numpy(zero_copy_only=False).astype(dtype)
    if values.null_count:
        vals[values.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return offsets - offsets[0], vals, nulls


def segment_quantile(seg: np.ndarray, values: np.ndarray, q: float, n_seg: int) -> np.ndarray:
    """The ``q`` quantile of each segment's non-NaN values (numpy's linear interpolation, in
    float64); NaN for a segment without values."""
    ok = ~np.isnan(values)
    s, v = seg[ok], values[ok].astype(np.float64)
    order = np.lexsort((v, s))
    v = v[order]
    counts = np.bincount(s, minlength=n_seg)
    starts = np.cumsum(counts) - counts
    out = np.full(n_seg, np.nan)
    has = counts > 0
    h = (counts[has] - 1) * q
    lo = np.floor(h).astype(np.int64)
    a, b = v[starts[has] + lo], v[starts[has] + np.minimum(lo + 1, counts[has] - 1)]
    t = h - lo
    out[has] = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return out


def segment_top(seg: np.ndarray, values: np.ndarray, fraction: float, n_seg: int) -> np.ndarray:
    """In each segment, exactly ``round(fraction * n)`` of its ``n`` values: the highest (NaN
    lowest), ties to the earlier index (values come in position order)."""
    v = np.where(np.isnan(values), -np.inf, values)
    order = np.lexsort((np.arange(v.size), -v, seg))  # segment, then value descending, then position
    counts = np.bincount(seg, minlength=n_seg)
    starts = np.cumsum(counts) - counts
    rank = np.empty(v.size, dtype=np.int64)
    rank[order] = np.arange(v.size) - starts[seg[order]]
    return rank < np.floor(fraction * counts + 0.5).astype(np.int64)[seg]


@register("tip_mask")
class TipMask(SetStage):
    """TIP class per rollout position (entropy x divergence quantiles) and the mask of a rule."""

    version: ClassVar[str] = "1"
    Params = TipMaskParams
    adds: ClassVar[tuple[str, ...]] = ("tip_class", "tip_mask", "tip_entropy_threshold", "tip_divergence_threshold")
    params: TipMaskParams

    def input_columns(self) -> list[str]:
        return ["loss_mask", "student_entropy", DIVERGENCE_COLUMN[self.params.divergence]]

    def caches_decision(self) -> bool:
        return False

    def decide(self, df: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        missing = [c for c in self.input_columns() if c not in df.columns]
        if missing:
            raise RunFailed(f"stage `tip_mask`: the rows have no {', '.join(missing)}: put a `tip` stage (after `logprobs`) before it")
        dcol = DIVERGENCE_COLUMN[p.divergence]
        cols = ["loss_mask", "student_entropy", dcol]
        present = pl.all_horizontal([pl.col(c).is_not_null() for c in cols])
        aligned = pl.all_horizontal([pl.col(c).list.len() == pl.col("loss_mask").list.len() for c in cols[1:]])
        bad = df.filter(present & ~aligned)
        if bad.height:
            raise RunFailed(f"stage `tip_mask`: row {bad[KEY_COL][0]}: loss_mask, student_entropy and {dcol} are not aligned")
        # a row without annotations (or without a loss mask) gets null outputs
        df = df.with_columns([pl.when(present).then(pl.col(c)).alias(c) for c in cols])
        off, loss, null_rows = _flat(df["loss_mask"], np.int8)
        _, ent, _ = _flat(df["student_entropy"], np.float32)
        _, div, _ = _flat(df[dcol], np.float32)
        ok = ~null_rows
        if p.divergence == "abs_log_ratio":
            div = np.abs(div)
        rows = np.repeat(np.arange(df.height), np.diff(off))
        sel = (loss == 1) & ~np.isnan(ent) & ok[rows]
        t_e, t_d, keep = self._thresholds(off, ent, div, sel)
        hi_e = ent > t_e[rows]  # NaN thresholds compare False: low
        hi_d = div > t_d[rows]
        cls = np.where(sel, 1 + 2 * (~hi_e) + (~hi_d), 0).astype(np.int8)
        keep |= np.isin(cls, list(p.mask.classes) + ([3] if p.mask.overconfident else []))
        mask = (keep & sel).astype(np.int8)
        nulls = pa.array(null_rows, type=pa.bool_())
        offsets = pa.array(off.astype(np.int64))
        return pl.DataFrame({
            KEY_COL: df[KEY_COL],
            "tip_class": pl.Series(pa.LargeListArray.from_arrays(offsets, pa.array(cls), mask=nulls)),
            "tip_mask": pl.Series(pa.LargeListArray.from_arrays(offsets, pa.array(mask), mask=nulls)),
            "tip_entropy_threshold": pl.Series(np.where(ok, t_e, np.nan).astype(np.float32), nan_to_null=True),
            "tip_divergence_threshold": pl.Series(np.where(ok, t_d, np.nan).astype(np.float32), nan_to_null=True),
        })

    def _thresholds(self, off: np.ndarray, ent: np.ndarray, div: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row entropy and divergence thresholds, and the positions the top fractions keep:
        each row is a segment (``per_sequence``), or all rows are one (``global``)."""
        p = self.params
        n_rows = len(off) - 1
        idx = np.flatnonzero(sel)  # the rollout positions, in order
        rows = np.repeat(np.arange(n_rows), np.diff(off))[idx]
        seg, n_seg = (rows, n_rows) if p.thresholds == "per_sequence" else (np.zeros(idx.size, dtype=np.int64), 1)
        t_e = segment_quantile(seg, ent[idx], p.entropy_quantile, n_seg)
        t_d = segment_quantile(seg, div[idx], p.divergence_quantile, n_seg)
        if n_seg == 1:
            t_e, t_d = np.full(n_rows, t_e[0]), np.full(n_rows, t_d[0])
        keep = np.zeros(ent.size, dtype=bool)
        for frac, vals in ((p.mask.entropy_top, ent), (p.mask.divergence_top, div)):
            if frac is not None:
                keep[idx[segment_top(seg, vals[idx], frac, n_seg)]] = True
        return t_e, t_d, keep

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        """Rollout positions, how many the mask keeps, and the count of each class."""
        if "tip_class" not in out.collect_schema():
            return {}
        s = out.select(
            pl.col("loss_mask").list.sum().sum().alias("positions"),
            pl.col("tip_mask").list.sum().sum().alias("kept"),
            *[pl.col("tip_class").list.eval((pl.element() == c).cast(pl.Int64)).list.sum().sum().alias(name)
              for c, name in CLASS_NAMES.items()],
        ).collect().row(0, named=True)
        positions = int(s["positions"] or 0)
        return {
            "positions": positions, "kept": int(s["kept"] or 0),
            "kept_fraction": round(int(s["kept"] or 0) / positions, 4) if positions else None,
            "classes": {name: int(s[name] or 0) for name in CLASS_NAMES.values()},
            "thresholds": self.params.thresholds, "divergence": self.params.divergence,
        }
