"""The card's ``dataset_info.features`` (computed from Arrow types) equals what ``datasets`` writes."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datasets import Features

from tracepipe.outputs._card import hf_features

MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

SCHEMAS = {
    "sft-messages": pa.schema([("messages", MSG), ("id", pa.string()), ("pass_rate", pa.float64()), ("sample", pa.int64()), ("ok", pa.bool_())]),
    "opd": pa.schema([("token_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                      ("teacher_logprobs", pa.list_(pa.float32())), ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
                      ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float16())))]),
    "sharegpt": pa.schema([("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))]),
    "dpo-pairs": pa.schema([("prompt", MSG), ("chosen", MSG), ("rejected", MSG), ("meta", pa.struct([("a", pa.int32()), ("b", pa.list_(pa.string()))]))]),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_features_match_datasets(name: str) -> None:
    schema = SCHEMAS[name]
    assert hf_features(schema) == Features.from_arrow_schema(schema)._to_yaml_list()


def test_unsupported_types_give_no_features() -> None:
    assert hf_features(pa.schema([("t", pa.timestamp("ms"))])) is None
