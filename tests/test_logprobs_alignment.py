"""The ``logprobs`` stage's tokens: ``loss_mask`` covers exactly the assistant completion.

Decoding the masked tokens (special tokens skipped) gives back the completion text exactly, with
and without a system prompt, with and without a thinking block, for completions cut by
``max_tokens``, for generation prompts that open the think block themselves (DeepSeek-R1), and
the unmasked prefix is exactly the prompt the engines send (``render_chat``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.logprobs_data import SYSTEM, rollout_rows
from tracepipe.engines._hf import load_tokenizer, render_chat
from tracepipe.stages.logprobs import DEFAULT_ASSISTANT_TEMPLATE, Encoded, encode_row, end_of_turn_ids

R1_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _masked_text(tok, e: Encoded) -> str:
    return tok.decode([t for t, m in zip(e.token_ids, e.loss_mask) if m], skip_special_tokens=True)


def _chat(row: dict) -> list[dict[str, str]]:
    return row.get("messages") or [{"role": "user", "content": row["problem"]}]


CASES = {
    "plain": {"problem": "What is 17 * 3?", "reasoning": None, "response": "17 * 3 = 51. The answer is \\boxed{51}."},
    "system": {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 17 * 3?"}],
        "reasoning": None, "response": "The answer is 51.",
    },
    "thinking": {
        "problem": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "reasoning": "April: 48.\nMay: 48 / 2 = 24.\n\nTotal: 48 + 24 = 72.",
        "response": "She sold \\boxed{72} clips.",
    },
    "system+thinking": {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2 + 2?"}],
        "reasoning": "Two plus two is four.", "response": "4",
    },
    "unicode+spaces": {"problem": "Write café twice.", "reasoning": "  naïve  ", "response": "café café  \n"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_tokens_decode_to_the_completion(tok, name: str) -> None:
    row = CASES[name]
    eot = end_of_turn_ids(tok)
    assert tok.convert_ids_to_tokens(eot) == ["<|im_end|>"]
    e = encode_row(tok, row, eot_ids=eot)
    assert isinstance(e, Encoded)
    expected = (
        DEFAULT_ASSISTANT_TEMPLATE.format(reasoning=row["reasoning"], response=row["response"]) if row["reasoning"] else row["response"]
    )
    assert e.completion == expected
    assert _masked_text(tok, e) == expected
    # the unmasked prefix is exactly the prompt the engines send for this chat
    _, prompt_ids = render_chat(tok, _chat(row))
    assert e.token_ids[: e.n_prompt] == prompt_ids
    assert e.loss_mask == [0] * len(prompt_ids) + [1] * (len(e.token_ids) - len(prompt_ids))
    # the completion ends with the end-of-turn token, which the student emits to stop
    assert e.token_ids[-1] == eot[-1]
    # and prompt + completion is what the chat template renders for the whole conversation
    full = tok.apply_chat_template([*_chat(row), {"role": "assistant", "content": expected}], tokenize=False)
    assert full.startswith(tok.decode(e.token_ids))
    if "system" in name:
        assert SYSTEM in tok.decode(e.token_ids[: e.n_prompt])


def test_thinking_block_is_inside_the_mask(tok) -> None:
    e = encode_row(tok, CASES["thinking"], eot_ids=end_of_turn_ids(tok))
    masked = [t for t, m in zip(e.token_ids, e.loss_mask) if m]
    think_open, think_close = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert masked[0] == think_open and think_close in masked
    assert think_open not in e.token_ids[: e.n_prompt]


def test_incomplete_completion_is_scored_as_written(tok) -> None:
    row = {"problem": "What is 17 * 3?", "reasoning": "17 * 3 is 51, and then", "response": None}
    e = encode_row(tok, row, eot_ids=end_of_turn_ids(tok))
    assert isinstance(e, Encoded)
    assert _masked_text(tok, e) == "<think>\n17 * 3 is 51, and then"
    assert e.token_ids[-1] not in end_of_turn_ids(tok)  # the student never stopped
    assert encode_row(tok, {"problem": "x", "reasoning": None, "response": None}) == "logprobs: no completion"


def test_max_length_cuts_the_completion_and_records_it(tok) -> None:
    row = CASES["thinking"]
    full = encode_row(tok, row, eot_ids=end_of_turn_ids(tok))
    assert isinstance(full, Encoded)
    cut = encode_row(tok, row, eot_ids=end_of_turn_ids(tok), max_length=full.n_prompt + 5)
    assert isinstance(cut, Encoded) and cut.truncated and not full.truncated
    assert cut.token_ids == full.token_ids[: full.n_prompt + 5] and sum(cut.loss_mask) == 5
    assert encode_row(tok, row, max_length=full.n_prompt) == "logprobs: prompt fills max_length"


def test_generation_prompt_that_opens_the_think_block(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir), chat_template=R1_TEMPLATE)
    row = CASES["thinking"]
    e = encode_row(tok, row, eot_ids=end_of_turn_ids(tok))
    assert isinstance(e, Encoded)
    prompt_text = tok.decode(e.token_ids[: e.n_prompt])
    assert prompt_text.endswith("<think>\n")
    # the think tag is not repeated: the student continued right after the generation prompt
    assert _masked_text(tok, e) == f"{row['reasoning']}\n</think>\n\n{row['response']}"
    assert tok.decode(e.token_ids, skip_special_tokens=True).count("<think>") == 1


def test_response_only_and_custom_template(tok) -> None:
    row = CASES["thinking"]
    e = encode_row(tok, row, reasoning_mode="none", eot_ids=end_of_turn_ids(tok))
    assert _masked_text(tok, e) == row["response"]
    e2 = encode_row(tok, row, template="<reason>{reasoning}</reason>{response}", eot_ids=end_of_turn_ids(tok))
    assert _masked_text(tok, e2) == f"<reason>{row['reasoning']}</reason>{row['response']}"


def test_real_rows_roundtrip(tok) -> None:
    eot = end_of_turn_ids(tok)
    rows = rollout_rows(24)
    assert any(r.get("messages") for r in rows) and any(r["reasoning"] is None for r in rows)
    for row in rows:
        e = encode_row(tok, row, eot_ids=eot)
        assert isinstance(e, Encoded)
        assert _masked_text(tok, e) == e.completion
        assert row["response"] in e.completion
