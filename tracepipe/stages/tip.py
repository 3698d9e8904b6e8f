"""``tip``: the student's own log-probs and entropy, and its divergence from the teacher, at every
position of a scored rollout (TIP annotations for on-policy distillation; a row stage).

Input columns (from ``logprobs``): ``token_ids``, ``teacher_logprobs``, ``teacher_topk_ids`` /
``teacher_topk_logprobs`` (optional: the KL needs them) and ``logprobs_teacher`` (tokenizer check).
Output columns, lists aligned with ``token_ids``, ``[i]`` about ``token_ids[i]`` given
``token_ids[:i]``, ``[0]`` null (the layout of ``teacher_logprobs``):

- ``student_logprobs`` (list<float32>): ``log p_S(token_ids[i] | token_ids[:i])``;
- ``student_entropy`` (list<float16>): entropy (nats) of the student's top-k at ``i``,
  renormalised over the top-k: ``-sum q log q`` with ``q = softmax(top-k log-probs)``, at most
  ``ln k``;
- ``tip_log_ratio`` (list<float16>): ``log p_S(x_i) - log p_T(x_i)`` for the token in the
  sequence: the per-token reverse-KL estimate of on-policy distillation (positive: the student is
  surer of its own token than the teacher);
- ``tip_kl`` (list<float16>): ``KL(student || teacher)`` over the ids in both top-k lists, each
  model's log-probs renormalised over those shared ids; null where fewer than 2 ids are shared or
  the rows have no teacher top-k (``logprobs`` without ``top_k``);
- ``tip_top_k`` (int16, the k used: recorded per row) and ``tip_student`` (the student's
  fingerprint). ``dtype: float32`` stores the three annotation lists as float32 instead.

Where the student's log-probs come from: the student engine scores the stored token ids
(:meth:`Engine.score` with ``top_k``: prompt log-probs from a vLLM prefill, or a transformers
forward pass), the mechanism ``logprobs`` uses for the teacher. The ids are scored as stored,
prompt rendered with the teacher's template included: they are the ids a trainer feeds the
student. Student and teacher must share the tokenizer: a row whose ``logprobs_teacher``
fingerprint names another tokenizer hash than the student's fails (quarantined). A sequence
longer than the student's context is dropped (``tip: longer than the student's context``).

Why a stage of its own, after ``logprobs``: it runs another model (the student) under its own
fingerprint, so adding TIP to an existing build, or changing the student checkpoint, never
rescores the teacher. Why the TIP classes and ``tip_mask`` are another stage (``tip_mask``):
they depend on thresholds and a selection rule that users tune, and global quantiles need every
row (a set stage), while model work must be a cached row stage. Kept apart, changing a threshold
or the rule recomputes a few numpy passes over the stored values and never a student forward pass.

Example::

    - logprobs: {engine: teacher, student_engine: student, sft_teacher: teacher, top_k: 20}
    - tip: {engine: student, top_k: 20}
    - tip_mask: {thresholds: per_sequence, mask: {entropy_top: 0.5, overconfident: true}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from tracepipe.contract import DROP_COL, ERROR_COL, IN_KEY_COL
from tracepipe.engines.base import Engine, EngineFatalError, ScoreResult
from tracepipe.errors import RunFailed
from tracepipe.stages import register
from tracepipe.stages._columns import arrow_frame
from tracepipe.stages._context import scoring_limit
from tracepipe.stages.base import ExecField, RowStage, StageParams

TEACHER_COLUMNS = ("token_ids", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "logprobs_teacher")
ANNOTATIONS = ("student_entropy", "tip_log_ratio", "tip_kl")


class TipParams(StageParams):
    engine: str = Field(..., description="the student (an engine that can score: vllm, transformers), same tokenizer as the teacher")
    top_k: int = Field(20, ge=2, description="k of the student's top-k: entropy renormalised over it, KL over its ids shared with the teacher's")
    dtype: Literal["float16", "float32"] = Field("float16", description="dtype of student_entropy, tip_log_ratio and tip_kl")
    batch_size: int = ExecField(64, ge=1, description="rows per batch (and per committed store part)")
    max_batch_tokens: int = ExecField(65536, ge=1, description="tokens per engine scoring call")


def _tok_hash(fingerprint: str | None) -> str | None:
    """The ``|tok:<hash>`` part of an engine fingerprint."""
    if not fingerprint or "|tok:" not in fingerprint:
        return None
    return fingerprint.split("|tok:", 1)[1].split("|", 1)[0] or None


def _pad(ids: list[Any], lps: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged top-k lists as ``[m, width]`` arrays, padded with id -1 and log-prob -inf."""
    m, width = len(ids), max((len(r) for r in ids if r), default=0)
    out_ids = np.full((m, width), -1, dtype=np.int64)
    out_lps = np.full((m, width), -np.inf, dtype=np.float64)
    for i, (r, v) in enumerate(zip(ids, lps)):
        if r:
            out_ids[i, : len(r)] = r
            out_lps[i, : len(v)] = v
    return out_ids, out_lps


def student_topk(s: ScoreResult, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The student's top-k at positions 1..n-1 as ``[n-1, k]`` (ids, log-probs)."""
    ids, lps = (s.topk_ids or [])[1:n], (s.topk_logprobs or [])[1:n]
    if len(ids) != n - 1 or len(lps) != n - 1:
        raise ValueError(f"the student engine returned top-k for {len(ids) + 1} of {n} positions")
    try:
        a, b = np.asarray(ids, dtype=np.int64), np.asarray(lps, dtype=np.float64)
    except ValueError:  # ragged (fewer than k entries somewhere)
        return _pad(ids, lps)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
        return _pad(ids, lps)
    return a, b


def _values(scalar: Any) -> pa.Array | None:
    """The values of one list cell (None for a null cell)."""
    return None if scalar is None or not scalar.is_valid else scalar.values


def teacher_topk(ids_cell: Any, lps_cell: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The teacher's stored top-k at positions 1..n-1 as ``[n-1, k]`` (ids, log-probs), read
    from the Arrow cells without Python lists; None when the row has none."""
    ids, lps = _values(ids_cell), _values(lps_cell)
    if ids is None or lps is None or len(ids) != n or len(lps) != n:
        return None
    ids, lps = ids.slice(1), lps.slice(1)
    lens = ids.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    if not lens.size or lens.max() == 0:
        return None
    if (lens == lens[0]).all() and ids.null_count == 0:
        k = int(lens[0])
        return (ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(n - 1, k),
                lps.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(n - 1, k))
    return _pad(ids.to_pylist(), lps.to_pylist())


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    return (safe + np.log(np.sum(np.exp(x - safe), axis=1, keepdims=True)))[:, 0]


def topk_entropy(lps: np.ndarray) -> np.ndarray:
    """Entropy of each row's top-k, renormalised over it (padding -inf contributes nothing)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        logq = lps - _logsumexp(lps)[:, None]
        q = np.exp(logq)
        return -np.sum(np.where(q > 0, q * logq, 0.0), axis=1)


def shared_topk_kl(s_ids: np.ndarray, s_lps: np.ndarray, t_ids: np.ndarray, t_lps: np.ndarray) -> np.ndarray:
    """``KL(student || teacher)`` per position over the ids in both top-k lists, each side
    renormalised over them; NaN where fewer than 2 ids are shared."""
    match = (s_ids[:, :, None] == t_ids[:, None, :]) & (s_ids[:, :, None] >= 0)
    shared = match.any(axis=2)
    t_at = np.take_along_axis(t_lps, match.argmax(axis=2), axis=1)  # the teacher's log-prob of each shared student id
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(shared, s_lps, -np.inf)
        b = np.where(shared, t_at, -np.inf)
        a = a - _logsumexp(a)[:, None]
        b = b - _logsumexp(b)[:, None]
        kl = np.sum(np.where(shared, np.exp(a) * (a - b), 0.0), axis=1)
    kl[shared.sum(axis=1) < 2] = np.nan
    return kl


def annotate(n: int, student: ScoreResult, teacher_lp: np.ndarray, teacher: tuple[np.ndarray, np.ndarray] | None,
             ) -> dict[str, np.ndarray]:
    """Per-position values of one row (float64, length ``n``, NaN at 0 and where undefined)."""
    try:
        s_lp = np.asarray(student.logprobs[1:n], dtype=np.float64)
    except TypeError:  # a None among them
        s_lp = np.asarray([np.nan if v is None else v for v in student.logprobs[1:n]], dtype=np.float64)
    if s_lp.shape[0] != n - 1:
        raise ValueError(f"the student engine returned {s_lp.shape[0] + 1} log-probs for {n} tokens")
    s_ids, s_lps = student_topk(student, n)
    kl = shared_topk_kl(s_ids, s_lps, *teacher) if teacher is not None else np.full(n - 1, np.nan)
    pad = np.array([np.nan])
    return {
        "student_logprobs": np.concatenate([pad, s_lp]),
        "student_entropy": np.concatenate([pad, topk_entropy(s_lps)]),
        "tip_log_ratio": np.concatenate([pad, s_lp - teacher_lp[1:]]),
        "tip_kl": np.concatenate([pad, kl]),
    }


def _arrow(batch: pl.DataFrame, col: str) -> pa.Array | None:
    """A column of the batch as one Arrow array (None when the batch has no such column)."""
    if col not in batch.columns:
        return None
    arr = batch[col].to_arrow()
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def list_column(values: list[np.ndarray | None], dtype: pa.DataType) -> pa.Array:
    """A list column from per-row float arrays (NaN -> null; None -> a null row)."""
    np_dtype = np.float16 if dtype == pa.float16() else np.float32
    lens = [0 if v is None else len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    flat = np.concatenate([v for v in values if v is not None]) if any(v is not None for v in values) else np.zeros(0)
    child = pa.array(flat.astype(np_dtype), mask=np.isnan(flat), type=dtype)
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), child, mask=mask)


@register("tip")
class Tip(RowStage):
    """The student's log-probs, top-k entropy and divergence from the teacher, per position."""

    version: ClassVar[str] = "1"
    Params = TipParams
    reads: ClassVar[tuple[str, ...]] = TEACHER_COLUMNS
    adds: ClassVar[tuple[str, ...]] = ("student_logprobs", *ANNOTATIONS, "tip_top_k", "tip_student")
    params: TipParams

    def __init__(self, params: StageParams, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._limit: int | None = None
        self._tok: str | None = None
        self._ready = False

    def engine_names(self) -> list[str]:
        return [self.params.engine]

    def fingerprint_extra(self) -> dict[str, Any]:
        p = self.params
        where = f"stage `tip` (engine {p.engine!r})"
        try:
            cfg = self.ctx.engines[p.engine]
        except KeyError:
            raise RunFailed(f"{where}: engine {p.engine!r} is not defined in the recipe's `engines`") from None
        max_logprobs = getattr(cfg, "max_logprobs", None)
        if isinstance(max_logprobs, int) and p.top_k > max_logprobs:
            raise RunFailed(f"{where}: top_k={p.top_k} is above the engine's max_logprobs={max_logprobs}; raise `max_logprobs` in its config")
        extra: dict[str, Any] = {"engine": self.ctx.engine_fingerprint(p.engine)}
        if getattr(cfg, "max_model_len", None):
            extra["engine_max_model_len"] = cfg.max_model_len
        return extra

    def setup(self) -> None:
        engine = self.ctx.engine(self.params.engine)
        self._load_checks(engine)
        engine.ensure_started()
        self._limit = scoring_limit(engine)  # the live context
        self._ready = True

    def _load_checks(self, engine: Engine) -> None:
        """What :meth:`_check` needs (the student's tokenizer hash, its context: the live one once
        started, else its config's), without starting the engine."""
        if type(engine).score is Engine.score:
            raise RunFailed(f"stage `tip`: engine kind {engine.kind!r} cannot score token ids; use a `vllm` or `transformers` student")
        info = engine.fingerprint_info()
        self._tok = info.get("tokenizer_hash") or _tok_hash(str(info.get("fingerprint")))
        self._limit = scoring_limit(engine)  # scoring decodes one token more

    def _check(self, ids: list[int] | None, n_teacher: int | None, writer: str | None) -> tuple[str | None, str | None]:
        """(drop reason, error) of a row before scoring (``n_teacher``: its ``teacher_logprobs``
        length; ``writer``: its ``logprobs_teacher``)."""
        if not ids or len(ids) < 2:
            return "tip: no scored tokens", None
        if n_teacher != len(ids):
            return None, f"tip: `teacher_logprobs` ({n_teacher} values) is not aligned with `token_ids` ({len(ids)})"
        if self._limit is not None and len(ids) > self._limit:
            return f"tip: longer than the student's context ({len(ids)} > {self._limit} tokens)", None
        t_tok = _tok_hash(writer)
        if self._tok and t_tok and t_tok != self._tok:
            return None, (f"tip: the student's tokenizer (tok:{self._tok}) is not the scoring teacher's (tok:{t_tok}, "
                          f"{writer}); the stored token ids mean other text to the student")
        return None, None

    def _checked(self, batch: pl.DataFrame) -> tuple[list[Any], list[tuple[str | None, str | None]], list[int]]:
        """The rows' token ids, each row's (drop reason, error), and the rows to score: what
        :meth:`process` scores and ``tracepipe plan`` counts."""
        ids = batch["token_ids"].to_list()
        writers = batch["logprobs_teacher"].to_list() if "logprobs_teacher" in batch.columns else [None] * batch.height
        n_teacher = batch["teacher_logprobs"].list.len().to_list()
        checks = [self._check(t, nt, w) for t, nt, w in zip(ids, n_teacher, writers)]
        return ids, checks, [i for i, (d, e) in enumerate(checks) if d is None and e is None]

    def score_tokens(self, batch: pl.DataFrame) -> list[int] | None:
        if "token_ids" not in batch.columns or "teacher_logprobs" not in batch.columns:
            return None  # the logprobs stage before it has not run
        if self._tok is None:
            self._load_checks(self.ctx.engine(self.params.engine))
        ids, _, todo = self._checked(batch)
        return [len(ids[i]) for i in todo]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        if "token_ids" not in batch.columns or "teacher_logprobs" not in batch.columns:
            raise EngineFatalError("stage `tip` needs `token_ids` and `teacher_logprobs`: put a `logprobs` stage before it")
        if not self._ready:
            self.setup()
        engine = self.ctx.engine(p.engine)
        ids, checks, todo = self._checked(batch)
        scores: dict[int, ScoreResult] = {}
        chunk: list[int] = []
        used = 0
        for i in [*todo, None]:
            size = len(ids[i]) if i is not None else 0
            if chunk and (i is None or used + size > p.max_batch_tokens):
                res = engine.score([ids[j] for j in chunk], p.top_k)
                if len(res) != len(chunk):
                    raise RuntimeError(f"engine returned {len(res)} scores for {len(chunk)} sequences")
                scores.update(zip(chunk, res))
                chunk, used = [], 0
            if i is not None:
                chunk.append(i)
                used += size
        t_lp = _arrow(batch, "teacher_logprobs")
        t_ids, t_lps = _arrow(batch, "teacher_topk_ids"), _arrow(batch, "teacher_topk_logprobs")
        ann: dict[int, dict[str, np.ndarray]] = {}
        for i, s in scores.items():
            n = len(ids[i])
            lp = _values(t_lp[i]) if t_lp is not None else None
            assert lp is not None  # _check: aligned with token_ids
            teacher = teacher_topk(t_ids[i], t_lps[i], n) if t_ids is not None and t_lps is not None else None
            try:
                ann[i] = annotate(n, s, lp.to_numpy(zero_copy_only=False).astype(np.float64), teacher)
            except ValueError as e:  # the engine's answer does not fit the row: this row fails, not the batch
                checks[i] = (None, f"tip: {e}")
        return self._frame(batch.get_column(IN_KEY_COL), ann, checks, engine_fp=self.ctx.engine_fingerprint(p.engine))

    def _frame(self, keys: pl.Series, ann: dict[int, dict[str, np.ndarray]], checks: list[tuple[str | None, str | None]],
               engine_fp: str) -> pl.DataFrame:
        n = len(checks)
        f = pa.float16() if self.params.dtype == "float16" else pa.float32()
        cols: dict[str, pa.Array] = {IN_KEY_COL: keys.to_arrow()}
        cols["student_logprobs"] = list_column([ann[i]["student_logprobs"] if i in ann else None for i in range(n)], pa.float32())
        for c in ANNOTATIONS:
            cols[c] = list_column([ann[i][c] if i in ann else None for i in range(n)], f)
        cols["tip_top_k"] = pa.array([self.params.top_k if i in ann else None for i in range(n)], type=pa.int16())
        cols["tip_student"] = pa.array([engine_fp if i in ann else None for i in range(n)], type=pa.string())
        cols[DROP_COL] = pa.array([d for d, _ in checks], type=pa.string())
        cols[ERROR_COL] = pa.array([e for _, e in checks], type=pa.string())
        return arrow_frame(cols)

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        """Rows annotated, the k, the student, and how many rows are the student's own rollouts."""
        schema = out.collect_schema()
        if "tip_student" not in schema:
            return {}
        student = self.ctx.engine_fingerprint(self.params.engine)
        own = (pl.col("teacher") == student).sum() if "teacher" in schema else pl.lit(None)
        s = out.select(pl.len().alias("rows"), own.alias("own")).collect().row(0, named=True)
        return {"tip_student": student, "top_k": self.params.top_k, "dtype": self.params.dtype, "rows": int(s["rows"]),
                "student_rollouts": None if s["own"] is None else int(s["own"])}
