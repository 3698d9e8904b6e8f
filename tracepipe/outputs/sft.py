"""``sft-messages``: TRL conversational format (``messages`` = prompt turns + assistant turn).

Rows without a ``response`` are skipped. The reasoning goes into the assistant turn through a
template, ``<think>\\n{reasoning}\\n</think>\\n\\n{response}`` by default (option
``assistant_template``); option ``use_compressed: true`` prefers ``reasoning_compressed``.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracepipe.outputs import register_format

DEFAULT_ASSISTANT_TEMPLATE = "<think>\n{reasoning}\n</think>\n\n{response}"
META_COLUMNS = ("id", "source", "domain", "answer", "verdict", "pass_rate", "difficulty", "teacher", "sample")
_MSG = pl.Struct({"role": pl.String, "content": pl.String})


def reasoning_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The trace to train on: the compressed one where the option asks for it and it exists."""
    base = pl.col("reasoning") if "reasoning" in schema else pl.lit(None, dtype=pl.String)
    if options.get("use_compressed", True) and "reasoning_compressed" in schema:
        return pl.coalesce(pl.col("reasoning_compressed"), base)
    return base


def assistant_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    template = options.get("assistant_template", DEFAULT_ASSISTANT_TEMPLATE)
    head, _, rest = template.partition("{reasoning}")
    mid, _, tail = rest.partition("{response}")
    reasoning = reasoning_expr(schema, options)
    with_reasoning = pl.concat_str([pl.lit(head), reasoning, pl.lit(mid), pl.col("response"), pl.lit(tail)])
    return pl.when(reasoning.is_null() | (reasoning == "")).then(pl.col("response")).otherwise(with_reasoning)


def prompt_messages_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The prompt turns: the exact chat sent to the teacher, else one user turn with the problem."""
    user_only = pl.concat_list(pl.struct(pl.lit("user").alias("role"), pl.col("problem").alias("content")))
    if "messages" in schema and options.get("keep_system", True):
        return pl.when(pl.col("messages").is_not_null()).then(pl.col("messages")).otherwise(user_only)
    if "messages" in schema:
        return pl.col("messages").list.eval(pl.element().filter(pl.element().struct.field("role") != "system"))
    return user_only


def meta_columns(schema: pl.Schema) -> list[str]:
    return [c for c in META_COLUMNS if c in schema]


@register_format("sft-messages")
def sft_messages(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    if "response" not in schema:
        return lf.head(0).select(pl.lit(None, dtype=pl.List(_MSG)).alias("messages"), *meta_columns(schema))
    assistant = pl.concat_list(pl.struct(pl.lit("assistant").alias("role"), assistant_expr(schema, options).alias("content")))
    return lf.filter(pl.col("response").is_not_null()).select(
        pl.concat_list(prompt_messages_expr(schema, options), assistant).alias("messages"),
        *meta_columns(schema),
    )
