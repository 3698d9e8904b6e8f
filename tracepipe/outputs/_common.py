"""Expressions shared by the output formats: prompt turns, the assistant text, metadata columns.

Every format builds its rows from the same pieces so that the reasoning template, the system
prompt handling and the metadata kept are identical across ``sft-messages``, ``prompt-completion``,
``sharegpt`` and ``dpo-pairs``. Common options (all formats):

- ``reasoning``: ``think`` (default: reasoning inside the assistant turn through
  ``assistant_template``), ``field`` (TRL / transformers ``reasoning_content`` field of the
  assistant message, for chat templates that render it), or ``none`` (drop the reasoning);
- ``assistant_template``: default ``<think>\\n{reasoning}\\n</think>\\n\\n{response}``;
- ``use_compressed`` (default true): train on ``reasoning_compressed`` where a compress stage kept one;
- ``keep_system`` (default true): keep the system turn of the chat sent to the teacher;
- ``meta`` (default true): keep metadata columns (id, source, verdict, ...); ``keep_columns``: more.
"""

from __future__ import annotations

from typing import Any

import polars as pl

DEFAULT_ASSISTANT_TEMPLATE = "<think>\n{reasoning}\n</think>\n\n{response}"
META_COLUMNS = ("id", "source", "domain", "answer", "verdict", "pass_rate", "difficulty", "teacher", "sample")
MSG = pl.Struct({"role": pl.String, "content": pl.String})
REASONING_MODES = ("think", "field", "none")


def option_bool(options: dict[str, Any], name: str, default: bool) -> bool:
    v = options.get(name, default)
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def reasoning_mode(options: dict[str, Any]) -> str:
    mode = str(options.get("reasoning", "think"))
    if mode not in REASONING_MODES:
        raise ValueError(f"outputs[].options.reasoning must be one of {', '.join(REASONING_MODES)} (got {mode!r})")
    return mode


def reasoning_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The trace to train on: the compressed one where the option asks for it and it exists."""
    base = pl.col("reasoning").cast(pl.String) if "reasoning" in schema else pl.lit(None, dtype=pl.String)
    if option_bool(options, "use_compressed", True) and "reasoning_compressed" in schema:
        comp = pl.col("reasoning_compressed").cast(pl.String)
        return pl.when(comp.is_not_null() & (comp != "")).then(comp).otherwise(base)
    return base


def response_expr(schema: pl.Schema) -> pl.Expr:
    return pl.col("response").cast(pl.String) if "response" in schema else pl.lit(None, dtype=pl.String)


def assistant_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The assistant text: reasoning and response through the template (or the response alone)."""
    response = response_expr(schema)
    if reasoning_mode(options) != "think":
        return response
    template = str(options.get("assistant_template", DEFAULT_ASSISTANT_TEMPLATE))
    if "{response}" not in template:
        raise ValueError("outputs[].options.assistant_template must contain {response}")
    reasoning = reasoning_expr(schema, options)
    if "{reasoning}" not in template:
        head, _, tail = template.partition("{response}")
        return pl.concat_str([pl.lit(head), response, pl.lit(tail)])
    head, _, rest = template.partition("{reasoning}")
    if "{response}" not in rest:
        raise ValueError("outputs[].options.assistant_template must put {reasoning} before {response}")
    mid, _, tail = rest.partition("{response}")
    with_reasoning = pl.concat_str([pl.lit(head), reasoning, pl.lit(mid), response, pl.lit(tail)])
    return pl.when(reasoning.is_null() | (reasoning == "")).then(response).otherwise(with_reasoning)


def assistant_message_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """One assistant message struct (with ``reasoning_content`` when ``reasoning: field``)."""
    fields = [pl.lit("assistant").alias("role"), assistant_expr(schema, options).alias("content")]
    if reasoning_mode(options) == "field":
        fields.append(reasoning_expr(schema, options).alias("reasoning_content"))
    return pl.struct(fields)


def prompt_messages_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The prompt turns: the exact chat sent to the teacher, else one user turn with the problem.

    The ``messages`` column is normalised to ``{role, content}`` (plus a null ``reasoning_content``
    in ``field`` mode) so it concatenates with the assistant turn whatever extra fields it carried.
    """
    field_mode = reasoning_mode(options) == "field"
    extra = [pl.lit(None, dtype=pl.String).alias("reasoning_content")] if field_mode else []
    problem = pl.col("problem").cast(pl.String) if "problem" in schema else pl.lit(None, dtype=pl.String)
    user_only = pl.concat_list(pl.struct(pl.lit("user").alias("role"), problem.alias("content"), *extra))
    if "messages" not in schema or not isinstance(schema["messages"], pl.List):
        return user_only
    el = pl.element()
    norm = pl.col("messages").list.eval(
        pl.struct(el.struct.field("role").cast(pl.String).alias("role"), el.struct.field("content").cast(pl.String).alias("content"), *extra)
    )
    if not option_bool(options, "keep_system", True):
        norm = norm.list.eval(pl.element().filter(pl.element().struct.field("role") != "system"))
    return pl.when(pl.col("messages").is_not_null() & (pl.col("messages").list.len() > 0)).then(norm).otherwise(user_only)


def system_expr(schema: pl.Schema, options: dict[str, Any]) -> pl.Expr:
    """The system prompt of the chat sent to the teacher (null when there was none)."""
    if "messages" not in schema or not isinstance(schema["messages"], pl.List) or not option_bool(options, "keep_system", True):
        return pl.lit(None, dtype=pl.String)
    el = pl.element()
    return (
        pl.col("messages")
        .list.eval(el.filter(el.struct.field("role") == "system").struct.field("content").cast(pl.String))
        .list.first()
    )


def meta_columns(schema: pl.Schema, options: dict[str, Any], exclude: tuple[str, ...] = ()) -> list[str]:
    """Metadata columns kept next to the training columns (option ``meta``, ``keep_columns``)."""
    cols: list[str] = []
    if option_bool(options, "meta", True):
        cols = [c for c in META_COLUMNS if c in schema]
    elif "id" in schema:
        cols = ["id"]  # the split by stable hash needs it; the writer drops it again when meta is off
    for c in options.get("keep_columns") or []:
        if c not in schema:
            raise ValueError(f"outputs[].options.keep_columns: no column {c!r} in the final rows (have: {', '.join(schema)})")
        if c not in cols:
            cols.append(c)
    return [c for c in cols if c not in exclude]


def has_response(schema: pl.Schema) -> pl.Expr:
    return response_expr(schema).is_not_null() if "response" in schema else pl.lit(False)
