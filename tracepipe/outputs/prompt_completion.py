"""``prompt-completion``: TRL's prompt / completion format (loss on the completion only).

Conversational by default: ``prompt`` is the list of prompt turns (the chat sent to the teacher,
else one user turn with the problem) and ``completion`` is a one-message list with the assistant
turn (reasoning in ``<think>`` tags by default, see :mod:`tracepipe.outputs._common`). With
``conversational: false`` both are plain strings: ``prompt`` = the problem text (or
``prompt_template`` with ``{problem}``), ``completion`` = the assistant text. Rows without a
``response`` are skipped; metadata columns follow.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracepipe.outputs import register_format
from tracepipe.outputs._common import (
    assistant_expr,
    assistant_message_expr,
    has_response,
    meta_columns,
    option_bool,
    prompt_messages_expr,
)


@register_format("prompt-completion", row_local=True)
def prompt_completion(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    meta = meta_columns(schema, options, exclude=("prompt", "completion"))
    if option_bool(options, "conversational", True):
        prompt = prompt_messages_expr(schema, options)
        completion = pl.concat_list(assistant_message_expr(schema, options))
    else:
        template = str(options.get("prompt_template", "{problem}"))
        head, _, tail = template.partition("{problem}")
        problem = pl.col("problem").cast(pl.String) if "problem" in schema else pl.lit(None, dtype=pl.String)
        prompt = pl.concat_str([pl.lit(head), problem, pl.lit(tail)])
        completion = assistant_expr(schema, options)
    return lf.filter(has_response(schema)).select(prompt.alias("prompt"), completion.alias("completion"), *meta)
