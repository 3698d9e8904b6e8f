"""``sharegpt``: LLaMA-Factory's ShareGPT format.

``conversations`` = ``[{from: human, value: ...}, ..., {from: gpt, value: ...}]`` (the prompt turns
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

ROLE_TAGS = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
TURN = pl.Struct({"from": pl.String, "value": pl.String})


def llamafactory_info(name: str, files: list[str]) -> dict[str, Any]:
    """The ``dataset_info.json`` entry LLaMA-Factory needs for these shards."""
    return {
        name: {
            "file_name": files[0] if len(files) == 1 else "data",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"},
        }
    }


@register_format("sharegpt")
def sharegpt(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    opts = {**options, "reasoning": "none" if options.get("reasoning") == "none" else "think"}
    meta = meta_columns(schema, opts, exclude=("conversations", "system"))
    el = pl.element()
    role = el.struct.field("role")
    tag = role.replace_strict(ROLE_TAGS, default=role, return_dtype=pl.String)
    # system turns go to the `system` column (LLaMA-Factory's convention), the rest are renamed
    prompt_turns = prompt_messages_expr(schema, {**opts, "reasoning": "think"}).list.eval(
        pl.struct(tag.alias("from"), el.struct.field("content").alias("value")).filter(role != "system")
    )
    gpt = pl.concat_list(pl.struct(pl.lit("gpt").alias("from"), assistant_expr(schema, opts).alias("value")))
    return lf.filter(has_response(schema)).select(
        pl.concat_list(prompt_turns, gpt).alias("conversations"),
        system_expr(schema, opts).alias("system"),
        *meta,
    )
