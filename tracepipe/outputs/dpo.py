"""``dpo-pairs``: preference pairs for TRL's DPO (``prompt`` / ``chosen`` / ``rejected``).

Samples of one problem are grouped by ``id``. Option ``kind`` picks how pairs are made:

``correctness`` (default): a correct vs an incorrect sample (``verdict`` of a verify stage).
    *Chosen*: correct samples among the final rows. *Rejected*: incorrect samples among the final
    rows and, with ``include_rejects`` (default true), the incorrect samples later stages dropped
    (the workdir's ``rejects/``, e.g. a ``filter: {where: "verdict = 'correct'"}`` or a
    ``select`` before the outputs), so one recipe emits both SFT data and DPO pairs. Rows with
    another verdict (``unverifiable``, ``error``) or no ``response`` (truncated) are not used.
    A problem without a correct final row or without an incorrect sample gives no pair.
``length``: a short vs a long *correct* sample of the same problem (concise reasoning).
    *Chosen*: the shortest correct sample among the final rows. *Rejected*: the longest correct
    sample among the final rows and, with ``include_rejects``, the correct samples later stages
    dropped (a ``select: {per_problem: 1, prefer: shortest}`` or a ``compress`` with
    ``method: shortest-correct`` drops exactly the long ones). A pair needs two different rows,
    the rejected one strictly longer and ``rejected_length >= min_ratio * chosen_length``
    (``min_ratio``, default 1.5; ``null``: strictly longer is enough); a problem
    whose longest correct sample is not that much longer gives no pair. Incorrect samples are
    not used by this kind (pair them with ``kind: correctness`` in a second output).
``compressed``: a compressed trace vs the original trace of the *same row*.
    Rows: the final rows with ``compress_status == 'accepted'`` (a compress stage re-verified the
    rewrite). *Chosen*: ``reasoning_compressed`` + ``response``; *rejected*: ``reasoning`` +
    ``response``, both through the assistant template ``sft-messages`` uses. Rows where the two
    render the same (``method: shortest-correct`` keeps the original trace as the "compressed"
    one) give no pair, nor do rows whose compression was rejected or skipped; rows a later stage
    dropped are not used (only final rows: write this output from a recipe without the dropping
    stage, on the same workdir, to pair every accepted rewrite; all earlier stages are cached).
    ``response_compressed`` is not used (the response stays the verified original, as in SFT).

Options (plus the shared ones of :mod:`tracepipe.outputs._common`):

- ``kind``: ``correctness`` (default) | ``length`` | ``compressed``;
- ``chosen``: ``shortest`` (default) | ``longest`` | ``random`` | ``first`` correct sample
  (``correctness``; with ``compressed`` and ``pairs: one``: which accepted row of the problem;
  ``length`` always takes the shortest);
- ``rejected``: ``longest`` (default) | ``shortest`` | ``random`` | ``first`` incorrect sample
  (``correctness`` only; ``length`` always takes the longest);
- ``pairs``: ``one`` (one pair per problem; the default for ``correctness`` and ``length``) |
  ``all`` (``correctness``: every correct x incorrect pair; ``length``: every pair of different
  correct samples passing ``min_ratio``; ``compressed``: one pair per accepted row, its default),
  ordered by the policies, at most ``max_pairs_per_problem`` if set;
- ``min_ratio``: ``length`` (default 1.5) and ``compressed`` (default none): keep a pair only if
  ``rejected_length >= min_ratio * chosen_length``;
- ``length_column``: how long a sample is, for ``shortest`` / ``longest`` and ``min_ratio``:
  ``auto`` (default), ``chars`` (characters of the assistant text as trained on, with the
  reasoning), ``reasoning_compressed_tokens`` (the trace trained on: ``reasoning_compressed_tokens``
  where a compressed trace is used, else ``reasoning_tokens``, both from a compress stage), or any
  numeric column (``completion_tokens``, ...). ``auto`` is ``reasoning_compressed_tokens`` when
  the rows have a compress stage's token columns and ``use_compressed`` is on (the shortest
  sample is then the one that is shortest *as trained on*), else ``completion_tokens`` when
  present, else ``chars``. Units are never mixed: where a measure is null for one of the rows
  compared (a reject from before the compress stage, a replay engine without tokenizer), those
  rows (the problem's candidates; with ``correctness`` each side separately) use the next
  measure of ``auto`` (``completion_tokens``, then ``chars``), an explicit column falls back to
  ``chars``. ``compressed`` compares ``reasoning_compressed_tokens`` with ``reasoning_tokens``
  of the row (else the characters of the two texts); ``length_column`` does not apply to it;
- ``seed``: for ``random`` (a stable hash of seed and row key, so reruns give the same pairs);
- ``include_rejects`` (default true): see the kinds above;
- ``conversational`` (default true): ``prompt`` = prompt turns, ``chosen`` / ``rejected`` =
  one assistant message each (TRL's conversational preference format); false: plain strings.

Output columns: ``prompt``, ``chosen``, ``rejected``, metadata of the problem (id, source,
domain, answer, difficulty, pass_rate, teacher), ``chosen_sample`` / ``rejected_sample``,
``pair_kind``, ``chosen_length`` / ``rejected_length`` and ``length_unit`` (the measure used;
``<chosen unit> / <rejected unit>`` when ``correctness`` had to measure the two sides differently).

Example::

    outputs:
      - {format: dpo-pairs, path: out/dpo-correct}
      - {format: dpo-pairs, path: out/dpo-concise, options: {kind: length, min_ratio: 2.0}}
      - {format: dpo-pairs, path: out/dpo-compressed, options: {kind: compressed}}
"""

from __future__ import annotations

from typing import Any

import polars as pl
import xxhash

from tracepipe.contract import KEY_COL
from tracepipe.outputs import register_format
from tracepipe.outputs._common import (
    assistant_expr,
    assistant_message_expr,
    meta_columns,
    option_bool,
    prompt_messages_expr,
    reasoning_expr,
    reasoning_mode,
)

KINDS = ("correctness", "length", "compressed")
POLICIES = ("shortest", "longest", "random", "first")
ROW_COLUMNS = (
    "id", "problem", "messages", "reasoning", "reasoning_compressed", "response", "verdict",
    "completion_tokens", "sample", KEY_COL, "reasoning_tokens", "reasoning_compressed_tokens", "compress_status",
)
TRACE_TOKENS = "reasoning_compressed_tokens"
CHARS = "chars"
AUTO = "auto"


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


def _rows_from_rejects(paths: list[str], schema: pl.Schema, columns: tuple[str, ...], verdict: str) -> list[pl.LazyFrame]:
    """Samples with ``verdict`` that later stages dropped, aligned to the final rows' columns."""
    out = []
    for p in paths:
        rs = pl.read_parquet_schema(p)
        if "verdict" not in rs or "response" not in rs or "id" not in rs:
            continue
        cols = [
            (pl.col(c).cast(schema[c]) if c in rs else pl.lit(None, dtype=schema[c])).alias(c)
            for c in schema if c in columns
        ]
        out.append(pl.scan_parquet(p).filter(pl.col("verdict") == verdict).select(cols))
    return out


def _trained_text(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The assistant text, plus the reasoning field in ``reasoning: field`` mode (for comparisons)."""
    text = assistant_expr(schema, options)
    if reasoning_mode(options) == "field":
        text = pl.concat_str([text, pl.lit("\x00"), reasoning_expr(schema, options).fill_null("")])
    return text


def _chars_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """Characters of the assistant turn as trained on (content, plus the reasoning field)."""
    n = assistant_expr(schema, options).str.len_chars().cast(pl.Float64)
    if reasoning_mode(options) == "field":
        n = n + reasoning_expr(schema, options).str.len_chars().fill_null(0).cast(pl.Float64)
    return n


def _trace_tokens_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """Tokens of the trace trained on: the compressed trace's where one is used, else the original's."""
    rt = pl.col("reasoning_tokens").cast(pl.Float64) if "reasoning_tokens" in schema else pl.lit(None, dtype=pl.Float64)
    if not option_bool(options, "use_compressed", True) or TRACE_TOKENS not in schema:
        return rt
    comp = pl.col("reasoning_compressed").cast(pl.String) if "reasoning_compressed" in schema else pl.lit(None, dtype=pl.String)
    used = comp.is_not_null() & (comp != "")
    return pl.when(used).then(pl.col(TRACE_TOKENS).cast(pl.Float64)).otherwise(rt)


def length_measures(schema: pl.Schema, options: dict[str, Any]) -> list[tuple[str, pl.Expr]]:
    """``(unit, expression)`` in order of preference; the last one (``chars``) is never null."""
    choice = str(options.get("length_column", AUTO))
    chars = (CHARS, _chars_expr(schema, options))
    if choice == CHARS:
        return [chars]
    if choice == TRACE_TOKENS:
        if TRACE_TOKENS not in schema:
            raise ValueError(f"outputs[].options.length_column: no {TRACE_TOKENS!r} column (add a compress stage); have: {', '.join(schema)}")
        return [(TRACE_TOKENS, _trace_tokens_expr(schema, options)), chars]
    if choice == AUTO:
        out = []
        if (
            TRACE_TOKENS in schema and "reasoning_tokens" in schema and option_bool(options, "use_compressed", True)
            and reasoning_mode(options) != "none"
        ):
            out.append((TRACE_TOKENS, _trace_tokens_expr(schema, options)))
        if "completion_tokens" in schema:
            out.append(("completion_tokens", pl.col("completion_tokens").cast(pl.Float64)))
        return [*out, chars]
    if choice not in schema:
        raise ValueError(f"outputs[].options.length_column: no column {choice!r} in the final rows (have: {', '.join(schema)}; or auto, chars)")
    if not schema[choice].is_numeric():
        raise ValueError(f"outputs[].options.length_column: column {choice!r} is {schema[choice]}, not a number")
    return [(choice, pl.col(choice).cast(pl.Float64)), chars]


def with_length(frame: pl.LazyFrame, measures: list[tuple[str, pl.Expr]], group: list[str]) -> pl.LazyFrame:
    """Adds ``_len`` / ``_unit``: per ``group``, the first measure that no row of the group lacks."""
    names = [f"_m{j}" for j in range(len(measures))]
    frame = frame.with_columns([e.alias(n) for (_, e), n in zip(measures, names)])
    length, unit = pl.col(names[-1]), pl.lit(measures[-1][0])
    for n, (u, _) in reversed(list(zip(names[:-1], measures[:-1]))):
        ok = pl.col(n).is_not_null().all().over(group)
        length, unit = pl.when(ok).then(pl.col(n)).otherwise(length), pl.when(ok).then(pl.lit(u)).otherwise(unit)
    return frame.with_columns(length.alias("_len"), unit.alias("_unit")).drop(names)


def _kind_options(options: dict[str, Any]) -> tuple[str, str, str, str]:
    kind = str(options.get("kind", "correctness"))
    if kind not in KINDS:
        raise ValueError(f"outputs[].options.kind must be one of {', '.join(KINDS)} (got {kind!r})")
    chosen = _policy(options, "chosen", "shortest")
    rejected = _policy(options, "rejected", "longest")
    if kind == "length" and (chosen, rejected) != ("shortest", "longest"):
        raise ValueError("dpo-pairs kind `length` pairs the shortest correct sample (chosen) with the longest (rejected): "
                         "leave outputs[].options.chosen / rejected unset")
    if kind == "compressed" and "rejected" in options:
        raise ValueError("dpo-pairs kind `compressed`: the rejected side is the same row's original trace; drop outputs[].options.rejected")
    if kind == "compressed" and str(options.get("length_column", AUTO)) != AUTO:
        raise ValueError("dpo-pairs kind `compressed` compares the row's compressed and original traces; outputs[].options.length_column does not apply")
    if kind == "correctness" and options.get("min_ratio") is not None:
        raise ValueError("outputs[].options.min_ratio applies to dpo-pairs kinds `length` and `compressed`")
    pairs = str(options.get("pairs", "all" if kind == "compressed" else "one"))
    if pairs not in ("one", "all"):
        raise ValueError(f"outputs[].options.pairs must be `one` or `all` (got {pairs!r})")
    return kind, chosen, rejected, pairs


def _min_ratio(options: dict[str, Any], default: float | None) -> float | None:
    v = options.get("min_ratio", default)
    if v is None:
        return None
    r = float(v)
    if not r > 0:
        raise ValueError(f"outputs[].options.min_ratio must be > 0 (got {v!r})")
    return r


def _require(schema: pl.Schema, cols: tuple[str, ...], kind: str) -> None:
    missing = [c for c in cols if c not in schema]
    if missing:
        why = "a compress stage" if any(c.startswith(("compress", "reasoning")) for c in missing) else "generate + verify stages"
        names = ", ".join(f"`{c}`" for c in missing)
        raise ValueError(f"dpo-pairs (kind {kind}) needs {names} in the final rows ({why}); have: {', '.join(schema)}")


@register_format("dpo-pairs")
def dpo_pairs(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    kind, chosen_policy, rejected_policy, pairs = _kind_options(options)
    max_pairs = options.get("max_pairs_per_problem")
    seed = int(options.get("seed", 0))
    conversational = option_bool(options, "conversational", True)
    if kind == "compressed":
        _require(schema, ("id", "response", "reasoning", "reasoning_compressed", "compress_status"), kind)
        if reasoning_mode(options) == "none":
            raise ValueError("dpo-pairs kind `compressed` needs the reasoning in the text (outputs[].options.reasoning: think or field)")
    else:
        _require(schema, ("id", "verdict", "response"), kind)
    explicit = str(options.get("length_column", AUTO))
    extra_cols = (explicit,) if explicit not in (AUTO, CHARS, TRACE_TOKENS) else ()
    row_columns = ROW_COLUMNS + extra_cols

    meta = [c for c in meta_columns(schema, options) if c not in ("verdict", "sample")]
    rows = lf.select([c for c in schema if c in row_columns]).with_columns(pl.lit(True).alias("_final"))
    parts = [rows]
    if kind != "compressed" and option_bool(options, "include_rejects", True):
        wanted = "correct" if kind == "length" else "incorrect"
        parts += [
            p.with_columns(pl.lit(False).alias("_final"))
            for p in _rows_from_rejects(list(options.get("_rejects") or []), schema, row_columns, wanted)
        ]
    allrows = pl.concat(parts, how="vertical_relaxed") if len(parts) > 1 else rows
    if KEY_COL in schema:
        rkey = pl.col(KEY_COL)
    elif "sample" in schema:
        rkey = pl.concat_str([pl.col("id"), pl.lit(":"), pl.col("sample").cast(pl.String)])
    else:
        rkey = pl.concat_str([pl.col("id"), pl.lit(":"), pl.col("response")])
    prompt = prompt_messages_expr(schema, options) if conversational else (
        pl.col("problem").cast(pl.String) if "problem" in schema else pl.lit(None, dtype=pl.String)
    )
    sample = pl.col("sample") if "sample" in schema else pl.lit(None, dtype=pl.Int64)

    def answer(opts: dict[str, Any]) -> pl.Expr:
        return pl.concat_list(assistant_message_expr(schema, opts)) if conversational else assistant_expr(schema, opts)

    if kind == "compressed":
        out = _compressed(allrows, schema, options, prompt, answer, sample, rkey, seed, chosen_policy, pairs)
    else:
        wanted_verdicts = ["correct"] if kind == "length" else ["correct", "incorrect"]
        base = (
            allrows.filter(pl.col("response").is_not_null() & pl.col("verdict").is_in(wanted_verdicts))
            .with_row_index("_i")
            .with_columns(
                prompt.alias("_prompt"), answer(options).alias("_answer"),
                stable_hash(rkey, seed).alias("_rnd"), sample.alias("_sample"),
            )
        )
        if kind == "length":
            base = with_length(base, length_measures(schema, options), ["id"])
            pos = base.filter(pl.col("_final"))
            neg = base
            ok = (pl.col("_i") != pl.col("_i_r")) & (pl.col("_len_r") > pl.col("_len"))
            ratio = _min_ratio(options, 1.5)
            if ratio is not None:
                ok = ok & (pl.col("_len_r") >= ratio * pl.col("_len"))
            rejected_policy = "longest"
        else:
            base = with_length(base, length_measures(schema, options), ["id", "verdict"])
            pos = base.filter(pl.col("_final") & (pl.col("verdict") == "correct"))
            neg = base.filter(pl.col("verdict") == "incorrect")
            ok = pl.lit(True)
        out = _pair(base, pos, neg, ok, chosen_policy, rejected_policy, pairs)
    if pairs == "all" and max_pairs:
        out = out.filter(pl.int_range(pl.len()).over("id") < int(max_pairs))
    problem_meta = lf.select(meta).unique("id", keep="first", maintain_order=True) if meta else lf.select("id").unique(maintain_order=True)
    out = out.join(problem_meta, on="id", how="left", maintain_order="left")
    keep_id = ["id"] if "id" not in meta else []
    ldt = pl.Float64 if extra_cols and not schema[explicit].is_integer() else pl.Int64
    return out.select(
        pl.col("_prompt").alias("prompt"), "chosen", "rejected", *keep_id, *meta, "chosen_sample", "rejected_sample",
        pl.lit(kind).alias("pair_kind"),
        pl.col("_len").cast(ldt).alias("chosen_length"), pl.col("_len_r").cast(ldt).alias("rejected_length"),
        pl.when(pl.col("_unit") == pl.col("_unit_r")).then(pl.col("_unit"))
        .otherwise(pl.concat_str([pl.col("_unit"), pl.lit(" / "), pl.col("_unit_r")])).alias("length_unit"),
    )


def _pair(
    base: pl.LazyFrame, pos: pl.LazyFrame, neg: pl.LazyFrame, ok: pl.Expr, chosen_policy: str, rejected_policy: str, pairs: str,
) -> pl.LazyFrame:
    """Candidate pairs per problem (chosen from ``pos``, rejected from ``neg``) passing ``ok``, ranked."""

    def ranked(frame: pl.LazyFrame, policy: str, tag: str) -> pl.LazyFrame:
        by, desc = _sort_keys(policy)
        return (
            frame.sort(by, descending=desc, nulls_last=True, maintain_order=True)
            .with_columns(pl.int_range(pl.len()).over("id").alias(f"_rank_{tag}"))
        )

    c = ranked(pos, chosen_policy, "c").select("id", "_i", "_len", "_unit", "_rank_c")
    r = ranked(neg, rejected_policy, "r").select(
        "id", pl.col("_i").alias("_i_r"), pl.col("_len").alias("_len_r"), pl.col("_unit").alias("_unit_r"), "_rank_r",
    )
    if pairs == "one":
        # the best pair is the two first-ranked rows: when they fail `ok` (too close in length),
        # every other pair of the problem does too
        c, r = c.filter(pl.col("_rank_c") == 0), r.filter(pl.col("_rank_r") == 0)
    joined = c.join(r, on="id", how="inner").filter(ok)
    # problem order = first appearance in the final rows; pairs of a problem by policy rank
    first = base.filter(pl.col("_final")).group_by("id").agg(pl.col("_i").min().alias("_first"))
    joined = (
        joined.join(first, on="id", how="left")
        .with_columns((pl.col("_rank_c") + pl.col("_rank_r")).alias("_diag"))
        .sort(["_first", "_diag", "_rank_c"], maintain_order=True)
    )
    texts = base.select("_i", "_prompt", "_answer", "_sample")
    return (
        joined.join(texts.select("_i", "_prompt", pl.col("_answer").alias("chosen"), pl.col("_sample").alias("chosen_sample")),
                    on="_i", how="left", maintain_order="left")
        .join(texts.select(pl.col("_i").alias("_i_r"), pl.col("_answer").alias("rejected"), pl.col("_sample").alias("rejected_sample")),
              on="_i_r", how="left", maintain_order="left")
    )


def _compressed(
    allrows: pl.LazyFrame, schema: pl.Schema, options: dict[str, Any], prompt: pl.Expr, answer: Any, sample: pl.Expr,
    rkey: pl.Expr, seed: int, chosen_policy: str, pairs: str,
) -> pl.LazyFrame:
    """One pair per accepted row: its compressed trace (chosen) vs its original trace (rejected)."""
    comp_opts = {**options, "use_compressed": True}
    orig_opts = {**options, "use_compressed": False}
    comp = pl.col("reasoning_compressed").cast(pl.String)
    if TRACE_TOKENS in schema and "reasoning_tokens" in schema:
        ct, ot = pl.col(TRACE_TOKENS).cast(pl.Float64), pl.col("reasoning_tokens").cast(pl.Float64)
        tokens_ok = ct.is_not_null() & ot.is_not_null()
    else:
        ct = ot = pl.lit(None, dtype=pl.Float64)
        tokens_ok = pl.lit(False)
    base = (
        allrows.filter(
            pl.col("response").is_not_null() & (pl.col("compress_status") == "accepted") & comp.is_not_null() & (comp != "")
        )
        .with_columns(_trained_text(schema, comp_opts).alias("_ctext"), _trained_text(schema, orig_opts).alias("_otext"))
        .filter(pl.col("_ctext") != pl.col("_otext"))
        .with_row_index("_i")
        .with_columns(
            prompt.alias("_prompt"), answer(comp_opts).alias("chosen"), answer(orig_opts).alias("rejected"),
            sample.alias("chosen_sample"), sample.alias("rejected_sample"), stable_hash(rkey, seed).alias("_rnd"),
            pl.when(tokens_ok).then(ct).otherwise(_chars_expr(schema, comp_opts)).alias("_len"),
            pl.when(tokens_ok).then(ot).otherwise(_chars_expr(schema, orig_opts)).alias("_len_r"),
            pl.when(tokens_ok).then(pl.lit(TRACE_TOKENS)).otherwise(pl.lit(CHARS)).alias("_unit"),
        )
        .with_columns(pl.col("_unit").alias("_unit_r"))
    )
    ratio = _min_ratio(options, None)
    if ratio is not None:
        base = base.filter(pl.col("_len_r") >= ratio * pl.col("_len"))
    if pairs == "one":
        by, desc = _sort_keys(chosen_policy)
        base = base.sort(by, descending=desc, nulls_last=True, maintain_order=True).unique("id", keep="first", maintain_order=True).sort("_i")
    return base
