"""``opd``: token-level rows for offline on-policy distillation (Lightning OPD).

One row per scored trace (the ``logprobs`` stage must have run):

- ``prompt``: the prompt turns that were rendered (list of ``{role, content}``);
- ``token_ids`` (list<int32>), ``loss_mask`` (list<int8>, 1 on the completion tokens the student
  is trained on), ``teacher_logprobs`` (list<float32>, ``[i] = log p_teacher(token_ids[i] |
  token_ids[:i])``, ``[0]`` null), and, when the stage stored them, ``teacher_topk_ids`` /
  ``teacher_topk_logprobs`` (list<list<...>>, best first, ``[0]`` null);
- ``n_tokens``, ``truncated`` (the sequence was cut at the stage's ``max_length``);
- ``teacher``: fingerprint of the teacher whose log-probs these are; ``generator``: fingerprint
  of the model that wrote the completion (the student, for rollouts; the rows' ``teacher`` column);
- with ``tip`` / ``tip_mask`` stages, the TIP annotations, lists aligned with ``token_ids``:
  ``student_logprobs``, ``student_entropy``, ``tip_log_ratio``, ``tip_kl``, ``tip_class``,
  ``tip_mask``, and ``tip_top_k``, ``tip_student``, ``tip_entropy_threshold``,
  ``tip_divergence_threshold`` (see :mod:`tracepipe.stages.tip`, :mod:`tracepipe.stages.tip_mask`);
- metadata columns (id, source, domain, answer, verdict, sample, ...; option ``meta``).

Options: ``top_k`` (default true: keep the top-k columns when present), ``tip`` (default true:
keep the TIP columns when present), ``meta``, ``keep_columns``.
Read the shards with :class:`tracepipe.formats.opd.OPDReader` (padded tensor batches), or with
``datasets`` / polars directly.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracepipe.outputs import register_format
from tracepipe.outputs._common import meta_columns, option_bool, prompt_messages_expr

TOKEN_COLUMNS = ("token_ids", "loss_mask", "teacher_logprobs")
TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
TIP_COLUMNS = (
    "student_logprobs", "student_entropy", "tip_log_ratio", "tip_kl", "tip_class", "tip_mask",
    "tip_top_k", "tip_student", "tip_entropy_threshold", "tip_divergence_threshold",
)


@register_format("opd", row_local=True)
def opd(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    missing = [c for c in TOKEN_COLUMNS if c not in schema]
    if missing:
        raise ValueError(
            f"output format `opd` needs the columns {', '.join(missing)}: add a `logprobs` stage "
            "(`- logprobs: {engine: <teacher>}`) before the outputs"
        )
    # the prompt exactly as the stage rendered it: the system turn is always part of it
    prompt = prompt_messages_expr(schema, {**options, "keep_system": True, "reasoning": "think"})
    cols: list[pl.Expr] = [prompt.alias("prompt"), *(pl.col(c) for c in TOKEN_COLUMNS)]
    if option_bool(options, "top_k", True):
        cols += [pl.col(c) for c in TOPK_COLUMNS if c in schema]
    if option_bool(options, "tip", True):
        cols += [pl.col(c) for c in TIP_COLUMNS if c in schema]
    if "n_tokens" in schema:
        cols.append(pl.col("n_tokens"))
    if "logprobs_truncated" in schema:
        cols.append(pl.col("logprobs_truncated").alias("truncated"))
    cols.append((pl.col("logprobs_teacher") if "logprobs_teacher" in schema else pl.lit(None, dtype=pl.String)).alias("teacher"))
    cols.append((pl.col("teacher") if "teacher" in schema else pl.lit(None, dtype=pl.String)).cast(pl.String).alias("generator"))
    taken = {"prompt", "teacher", "generator", "truncated", "n_tokens", *TOKEN_COLUMNS, *TOPK_COLUMNS, *TIP_COLUMNS}
    meta = meta_columns(schema, options, exclude=tuple(taken))
    return lf.filter(pl.col("token_ids").is_not_null()).select(*cols, *meta)
