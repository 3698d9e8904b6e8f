"""Trace-format checks: each failure is a named reason.

=================  ===========================================================================
reason             when
=================  ===========================================================================
``truncated``      ``finish_reason`` is ``length`` (the completion hit the token limit)
``empty``          the response is empty (or only whitespace) and not truncated
``think_unclosed`` a ``<think>`` block is opened and never closed (in response or reasoning)
``no_answer``      the verifier found no answer (math) / no code block (code) in a response
                   that is neither truncated, empty nor has an unclosed thinking block
``repetition_loop`` the text ends in a loop: its tail repeats one unit of 1..``loop_max_period``
                   characters at least ``loop_min_repeats`` times over ``loop_min_chars`` or more
``repeated_lines`` the same non-empty line ``max_line_repeats`` or more times in a row
``too_short``      fewer than ``min_chars`` characters of response
``too_long``       more than ``max_chars`` characters (response + reasoning) or more than
                   ``max_completion_tokens`` completion tokens
=================  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

REASONS = ("truncated", "empty", "think_unclosed", "no_answer", "repetition_loop", "repeated_lines", "too_short", "too_long")


@dataclass
class FormatConfig:
    think_open: str = "<think>"
    think_close: str = "</think>"
    require_answer: bool = True
    loop_min_repeats: int = 4
    loop_min_chars: int = 200
    loop_max_period: int = 500
    max_line_repeats: int = 10
    min_chars: int = 1
    max_chars: int | None = None
    max_completion_tokens: int | None = None


def tail_loop(text: str, min_repeats: int = 4, min_chars: int = 200, max_period: int = 500) -> int | None:
    """Period of a loop the text ends in (its last ``max(min_chars, min_repeats * p)`` characters
    repeat with period ``p``), or None. Units made only of whitespace do not count."""
    t = text.rstrip()
    n = len(t)
    if n < min_chars:
        return None
    for p in range(1, max_period + 1):
        length = max(min_chars, p * min_repeats)
        if length > n:
            break
        seg = t[n - length:]
        if seg[p:] == seg[:-p] and seg[-p:].strip():
            return p
    return None


def max_line_run(text: str) -> int:
    """Longest run of identical consecutive non-empty lines (2+ visible characters)."""
    best = run = 0
    prev = None
    for line in text.splitlines():
        s = line.strip()
        if len(s) < 2:
            prev, run = None, 0
            continue
        run = run + 1 if s == prev else 1
        prev = s
        best = max(best, run)
    return best


def think_unclosed(text: str | None, open_tag: str = "<think>", close_tag: str = "</think>") -> bool:
    if not text:
        return False
    i = text.rfind(open_tag)
    return i >= 0 and text.find(close_tag, i) < 0


def check_format(
    response: str | None,
    *,
    reasoning: str | None = None,
    finish_reason: str | None = None,
    completion_tokens: int | None = None,
    has_answer: bool | None = None,
    cfg: FormatConfig | None = None,
) -> list[str]:
    """Named format failures of one trace (empty list when it is fine)."""
    cfg = cfg or FormatConfig()
    out: list[str] = []
    resp = response or ""
    truncated = (finish_reason or "").lower() == "length"
    if truncated:
        out.append("truncated")
    elif not resp.strip():
        out.append("empty")
    if think_unclosed(resp, cfg.think_open, cfg.think_close) or think_unclosed(reasoning, cfg.think_open, cfg.think_close):
        out.append("think_unclosed")
    if cfg.require_answer and has_answer is False and not out:
        out.append("no_answer")
    for text in (reasoning, resp):
        if text and tail_loop(text, cfg.loop_min_repeats, cfg.loop_min_chars, cfg.loop_max_period):
            out.append("repetition_loop")
            break
    for text in (reasoning, resp):
        if text and cfg.max_line_repeats and max_line_run(text) >= cfg.max_line_repeats:
            out.append("repeated_lines")
            break
    if resp.strip() and len(resp.strip()) < cfg.min_chars:
        out.append("too_short")
    total = len(resp) + len(reasoning or "")
    if (cfg.max_chars is not None and total > cfg.max_chars) or (
        cfg.max_completion_tokens is not None and completion_tokens is not None and completion_tokens > cfg.max_completion_tokens
    ):
        out.append("too_long")
    return out


__all__ = ["REASONS", "FormatConfig", "check_format", "max_line_run", "tail_loop", "think_unclosed"]
