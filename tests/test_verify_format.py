"""Trace-format checks: each failure is a named reason; real reference solutions raise none."""

from __future__ import annotations

import pytest

from tests.fixtures.verify_data import BENCH, gsm8k_items, humaneval_rows, math500_items, read_jsonl
from tracepipe import DATA_DIR
from tracepipe.verifiers.format import FormatConfig, check_format, max_line_run, tail_loop, think_unclosed


def test_reference_solutions_raise_no_format_issue():
    texts = [it["response"] for it in math500_items()] + [it["response"] for it in gsm8k_items()]
    texts += [r["answer"] for r in read_jsonl(DATA_DIR / "sources" / "gsm8k_train.jsonl")]
    texts += [r["prompt"] + r["canonical_solution"] for r in humaneval_rows()]
    texts += [r["solution"] for r in read_jsonl(BENCH / "aime24.jsonl") if r.get("solution")]
    flagged = [(t[:80], check_format(t, finish_reason="stop", has_answer=True)) for t in texts]
    flagged = [f for f in flagged if f[1]]
    assert len(texts) > 9000
    assert not flagged, flagged[:5]


def test_named_reasons():
    ok = "Let me add 2 and 2.\nSo the answer is \\boxed{4}."
    assert check_format(ok, finish_reason="stop", has_answer=True) == []
    assert check_format(ok, finish_reason="length", has_answer=True) == ["truncated"]
    assert check_format(None, finish_reason="length", has_answer=False) == ["truncated"]
    assert check_format("  ", finish_reason="stop", has_answer=False) == ["empty"]
    assert check_format("<think>still thinking about it", has_answer=False) == ["think_unclosed"]
    assert check_format(ok, reasoning="<think>I wonder", has_answer=True) == ["think_unclosed"]
    assert check_format("<think>done</think>\nIt is \\boxed{4}", has_answer=True) == []
    assert check_format("I think it is four.", has_answer=False) == ["no_answer"]
    assert check_format("I think it is four.", has_answer=False, cfg=FormatConfig(require_answer=False)) == []
    assert check_format("4", has_answer=True, cfg=FormatConfig(min_chars=5)) == ["too_short"]
    assert check_format(ok, reasoning="x" * 100, has_answer=True, cfg=FormatConfig(max_chars=100)) == ["too_long"]
    assert check_format(ok, completion_tokens=900, has_answer=True, cfg=FormatConfig(max_completion_tokens=800)) == ["too_long"]
    assert check_format(ok, completion_tokens=700, has_answer=True, cfg=FormatConfig(max_completion_tokens=800)) == []


def test_repetition_loops_on_real_traces():
    sol = gsm8k_items()[0]["response"]
    stuck = sol.rsplit("####", 1)[0] + "Wait, let me recompute the eggs. " * 40
    assert tail_loop(stuck) == len("Wait, let me recompute the eggs. ")
    assert check_format(sol, reasoning=stuck, finish_reason="stop", has_answer=True) == ["repetition_loop"]
    # cut in the middle of the repeated unit (as max_tokens does) still counts
    assert tail_loop(stuck[:-7]) is not None
    # three repetitions of a long sentence are not a loop (min_repeats=4); a short text never is
    assert tail_loop(sol + (" The farmer sells the rest." * 3)) is None
    assert tail_loop("ha" * 20) is None
    lines = sol + "\n" + "\n".join(["She makes 9 * 2 = $18 every day."] * 12) + "\n#### 18"
    assert max_line_run(lines) == 12
    assert check_format(lines, has_answer=True) == ["repeated_lines"]
    assert check_format(lines, has_answer=True, cfg=FormatConfig(max_line_repeats=0)) == []


@pytest.mark.parametrize(
    ("text", "unclosed"),
    [("<think>a</think>b", False), ("<think>a", True), ("no tags", False), ("<think>a</think><think>b", True), (None, False)],
)
def test_think_unclosed(text, unclosed):
    assert think_unclosed(text) is unclosed
