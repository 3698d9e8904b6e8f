"""``dpo-pairs``: preference pairs for TRL's DPO (``prompt`` / ``chosen`` / ``rejected``).

A pair is a correct and an incorrect sample of the same problem (``verdict`` column of a verify
stage; ``id`` groups the samples). Chosen samples come from the final rows; rejected ones from the
final rows and, with ``include_rejects`` (default true), from incorrect samples that later stages
dropped (the workdir's ``rejects/``, e.g. a ``filter: {where: "verdict = 'correct'"}`` before the
outputs), so one recipe can emit both SFT data and DPO pairs.

Options (plus the shared ones of :mod:`tracepipe.outputs._common`):

- ``chosen``: ``shortest`` (default) | ``longest`` | ``random`` | ``first`` correct sample;
- ``rejected``: ``longest`` (default) | ``shortest`` | ``random`` | ``first`` incorrect sample;
- ``pairs``: ``one`` (default: one pair per problem) | ``all`` (every correct x incorrect pair,
  ordered by the policies, at most ``max_pairs_per_problem`` if set);
- ``seed``: for ``random`` (a stable hash of seed and row key, so reruns give the same pairs);
- ``conversational`` (default true): ``prompt`` = prompt turns, ``chosen`` / ``rejected`` =
  one assistant message each (TRL's conversational preference format); false: plain strings.

Length is ``completion_tokens`` where the rows have it, else the length of the assistant text.
Output columns: ``prompt``, ``chosen``, ``rejected``, metadata of the problem (id, source,
domain, answer, difficulty, pass_rate, teacher), ``chosen_sample`` / ``rejected_sample``.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import xxhash

from tracepipe.outputs import register_format
from tracepipe.outputs._common import (
    assistant_expr,
    assistant_message_expr,
    meta_columns,
    option_bool,
    prompt_messages_expr,
)

POLICIES = ("shortest", "longest", "random", "first")
ROW_COLUMNS = (
    "id", "problem", "messages", "reasoning", "reasoning_compressed", "response", "verdict",
    "completion_tokens", "sample", "_key",
)


def stable_hash(expr: pl.Expr, seed: int = 0) -> pl.Expr:
    """xxh64 of a string column with a seed: the same on every machine and polars version."""

    def _h(s: pl.Series) -> pl.Series:
        return pl.Series([xxhash.xxh64_intdigest(v.encode(), seed=seed) if v is not None else 0 for v in s.to_list()], dtype=pl.UInt64)

    return expr.cast(pl.String).map_batches(_h, return_dtype=pl.UInt64)


def _policy(options: dict[str, Any], name: str, default: str) -> str:
    v = str(options.get(name, default))
    if v not in POLICIES:
        raise ValueError(f"outputs[].options.{name} must be one of {', '.join(POLICIES)} (got {v!r})")
    return v


def _sort_keys(policy: str) -> tuple[list[str], list[bool]]:
    return {
        "shortest": (["_len", "_i"], [False, False]),
        "longest": (["_len", "_i"], [True, False]),
        "random": (["_rnd", "_i"], [False, False]),
        "first": (["_i"], [False]),
    }[policy]


def _rejected_from_rejects(paths: list[str], schema: pl.Schema) -> list[pl.LazyFrame]:
    """Incorrect samples dropped by later stages, aligned to the final rows' columns."""
    out = []
    for p in paths:
        rs = pl.read_parquet_schema(p)
        if "verdict" not in rs or "response" not in rs or "id" not in rs:
            continue
        cols = [
            (pl.col(c).cast(schema[c]) if c in rs else pl.lit(None, dtype=schema[c])).alias(c)
            for c in schema if c in ROW_COLUMNS
        ]
        out.append(pl.scan_parquet(p).filter(pl.col("verdict") == "incorrect").select(cols))
    return out


@register_format("dpo-pairs")
def dpo_pairs(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    for c in ("id", "verdict", "response"):
        if c not in schema:
            raise ValueError(f"dpo-pairs needs a `{c}` column in the final rows (generate + verify stages); have: {', '.join(schema)}")
    chosen_policy = _policy(options, "chosen", "shortest")
    rejected_policy = _policy(options, "rejected", "longest")
    pairs = str(options.get("pairs", "one"))
    if pairs not in ("one", "all"):
        raise ValueError(f"outputs[].options.pairs must be `one` or `all` (got {pairs!r})")
    max_pairs = options.get("max_pairs_per_problem")
    seed = int(options.get("seed", 0))
    conversational = option_bool(options, "conversational", True)

    meta = [c for c in meta_columns(schema, options) if c not in ("verdict", "sample")]
    rows = lf.select([c for c in schema if c in ROW_COLUMNS]).with_columns(pl.lit(True).alias("_final"))
    parts = [rows]
    if option_bool(options, "include_rejects", True):
        parts += [p.with_columns(pl.lit(False).alias("_final")) for p in _rejected_from_rejects(list(options.get("_rejects") or []), schema)]
    allrows = pl.concat(parts, how="vertical_relaxed") if len(parts) > 1 else rows
    if "_key" in schema:
        rkey = pl.col("_key")
    elif "sample" in schema:
        rkey = pl.concat_str([pl.col("id"), pl.lit(":"), pl.col("sample").cast(pl.String)])
    else:
        rkey = pl.concat_str([pl.col("id"), pl.lit(":"), pl.col("response")])
    text = assistant_expr(schema, options)
    length = pl.col("completion_tokens").cast(pl.Int64) if "completion_tokens" in schema else text.str.len_chars().cast(pl.Int64)
    if conversational:
        prompt = prompt_messages_expr(schema, options)
        answer = pl.concat_list(assistant_message_expr(schema, options))
    else:
        prompt = pl.col("problem").cast(pl.String) if "problem" in schema else pl.lit(None, dtype=pl.String)
        answer = text
    sample = pl.col("sample") if "sample" in schema else pl.lit(None, dtype=pl.Int64)
    base = (
        allrows.filter(pl.col("response").is_not_null() & pl.col("verdict").is_in(["correct", "incorrect"]))
        .with_row_index("_i")
        .with_columns(
            prompt.alias("_prompt"), answer.alias("_answer"), length.alias("_len"),
            stable_hash(rkey, seed).alias("_rnd"), sample.alias("_sample"),
        )
    )

    def ranked(frame: pl.LazyFrame, policy: str, tag: str) -> pl.LazyFrame:
        by, desc = _sort_keys(policy)
        return (
            frame.sort(by, descending=desc, nulls_last=True, maintain_order=True)
            .with_columns(pl.int_range(pl.len()).over("id").alias(f"_rank_{tag}"))
        )

    pos = ranked(base.filter(pl.col("_final") & (pl.col("verdict") == "correct")), chosen_policy, "c").select(
        "id", "_prompt", pl.col("_answer").alias("chosen"), pl.col("_sample").alias("chosen_sample"), "_rank_c",
    )
    neg = ranked(base.filter(pl.col("verdict") == "incorrect"), rejected_policy, "r").select(
        "id", pl.col("_answer").alias("rejected"), pl.col("_sample").alias("rejected_sample"), "_rank_r",
    )
    if pairs == "one":
        pos, neg = pos.filter(pl.col("_rank_c") == 0), neg.filter(pl.col("_rank_r") == 0)
    joined = pos.join(neg, on="id", how="inner")
    # problem order = first appearance in the final rows; pairs of a problem by policy rank
    first = base.filter(pl.col("_final")).group_by("id").agg(pl.col("_i").min().alias("_first"))
    problem_meta = lf.select(meta).unique("id", keep="first", maintain_order=True) if meta else lf.select("id").unique(maintain_order=True)
    out = (
        joined.join(first, on="id", how="left")
        .with_columns((pl.col("_rank_c") + pl.col("_rank_r")).alias("_diag"))
        .sort(["_first", "_diag", "_rank_c"], maintain_order=True)
    )
    if pairs == "all" and max_pairs:
        out = out.filter(pl.int_range(pl.len()).over("id") < int(max_pairs))
    out = out.join(problem_meta, on="id", how="left", maintain_order="left")
    keep_id = ["id"] if "id" not in meta else []
    return out.select(
        pl.col("_prompt").alias("prompt"), "chosen", "rejected", *keep_id, *meta, "chosen_sample", "rejected_sample",
    )
