"""``sharegpt``: LLaMA-Factory's ShareGPT format.

``conversations`` = ``[{from: human, value: ...}, ..., {from: gpt, value: ...}]`` (``roles: openai``
gives ``user`` / ``assistant`` instead; the prompt turns
of the chat sent to the teacher, else the problem, then the assistant turn with the reasoning in
``<think>`` tags by default) and ``system`` = the system prompt (null when there was none).
Metadata columns follow. The writer also drops a ``dataset_info.json`` next to the shards with the
LLaMA-Factory entry (``formatting: sharegpt``, ``columns: {messages: conversations, system:
system}``), so ``dataset_dir`` can point at the output directory.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracepipe.outputs import register_format
from tracepipe.outputs._common import (
    assistant_expr,
    has_response,
    meta_columns,
    prompt_messages_expr,
    system_expr,
)

ROLE_TAGS = {
    "sharegpt": {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"},
    "openai": {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool"},
}


def role_tags(options: dict[str, Any]) -> dict[str, str]:
    """``roles: sharegpt`` (default: human / gpt) or ``roles: openai`` (user / assistant)."""
    roles = str(options.get("roles", "sharegpt"))
    if roles not in ROLE_TAGS:
        raise ValueError(f"outputs[].options.roles must be one of {', '.join(ROLE_TAGS)} (got {roles!r})")
    return ROLE_TAGS[roles]


def llamafactory_info(name: str, files: list[str], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``dataset_info.json`` entry LLaMA-Factory needs for these shards."""
    tags = role_tags(options or {})
    return {
        name: {
            "file_name": files[0] if len(files) == 1 else "data",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": tags["user"],
                     "assistant_tag": tags["assistant"], "observation_tag": tags["tool"], "system_tag": tags["system"]},
        }
    }


@register_format("sharegpt", row_local=True)
def sharegpt(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    opts = {**options, "reasoning": "none" if options.get("reasoning") == "none" else "think"}
    meta = meta_columns(schema, opts, exclude=("conversations", "system"))
    el = pl.element()
    role = el.struct.field("role")
    tags = role_tags(options)
    tag = role.replace_strict(tags, default=role, return_dtype=pl.String)
    # system turns go to the `system` column (LLaMA-Factory's convention), the rest are renamed
    prompt_turns = prompt_messages_expr(schema, {**opts, "reasoning": "think"}).list.eval(
        pl.struct(tag.alias("from"), el.struct.field("content").alias("value")).filter(role != "system")
    )
    gpt = pl.concat_list(pl.struct(pl.lit(tags["assistant"]).alias("from"), assistant_expr(schema, opts).alias("value")))
    return lf.filter(has_response(schema)).select(
        pl.concat_list(prompt_turns, gpt).alias("conversations"),
        system_expr(schema, opts).alias("system"),
        *meta,
    )
