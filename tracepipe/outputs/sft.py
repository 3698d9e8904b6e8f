"""``sft-messages``: TRL conversational format (``messages`` = prompt turns + assistant turn).

Rows without a ``response`` are skipped. The reasoning goes into the assistant turn through a
template, ``<think>\\n{reasoning}\\n</think>\\n\\n{response}`` by default (option
``assistant_template``), or into the message's ``reasoning_content`` field (``reasoning: field``),
or is left out (``reasoning: none``); ``use_compressed`` (default true) prefers
``reasoning_compressed``. Metadata columns (id, source, verdict, difficulty, teacher, ...) follow.
See :mod:`tracepipe.outputs._common` for the options every format shares.

TRL reads the shards directly: ``SFTTrainer(model, train_dataset=load_dataset("parquet",
data_files="out/data/train-*.parquet")["train"])``.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracepipe.outputs import register_format
from tracepipe.outputs._common import (  # noqa: F401 - re-exported for other formats
    DEFAULT_ASSISTANT_TEMPLATE,
    META_COLUMNS,
    MSG,
    assistant_expr,
    assistant_message_expr,
    has_response,
    meta_columns,
    prompt_messages_expr,
    reasoning_expr,
)


@register_format("sft-messages", row_local=True)
def sft_messages(lf: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    schema = lf.collect_schema()
    meta = meta_columns(schema, options, exclude=("messages",))
    messages = pl.concat_list(prompt_messages_expr(schema, options), pl.concat_list(assistant_message_expr(schema, options)))
    return lf.filter(has_response(schema)).select(messages.alias("messages"), *meta)
