"""Text normalization for matching: case, whitespace, LaTeX spacing, punctuation, numbers.

``match_tokens`` is what decontamination n-grams are built from: lower-cased, LaTeX spacing
commands and ``$ { }`` dropped, ``\\dfrac``/``\\tfrac`` folded to ``\\frac``, typographic quotes
folded, sentence punctuation dropped, then split into words, numbers, LaTeX commands and single
math symbols. Re-spacing a formula (``$s+2$`` vs ``$ s + 2 $`` vs ``s + {2}``) therefore gives the
same tokens, while numbers and operators are kept.
"""

from __future__ import annotations

import re

_TRANSLATE = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
    "\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
# LaTeX commands that only change spacing / sizing / fonts: removed (their arguments stay)
_LATEX_NOISE = re.compile(
    r"\\(?:[,;:!> ]|(?:q?quad|left|right|displaystyle|textstyle|[bB]igg?[lr]?|text(?:rm|bf|it)?|"
    r"math(?:rm|bf|it)|mbox|operatorname)(?![a-z])|hspace\*?\{[^}]*\})"
)
_FRAC = re.compile(r"\\[dt]?frac(?![a-z])\s*(?:(\d)\s*(\d))?")
_DROP_CHARS = re.compile(r"[${}~.,;:!?'\"`]")
_TOKEN = re.compile(r"\\[a-z]+|\w+|[^\w\s]")
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def fold_latex(text: str) -> str:
    """Lower-case and remove LaTeX spacing so formulas compare regardless of how they are spaced."""
    t = text.translate(_TRANSLATE).lower()
    t = _FRAC.sub(lambda m: r"\frac" + (f"{{{m.group(1)}}}{{{m.group(2)}}}" if m.group(1) else ""), t)
    t = _LATEX_NOISE.sub(" ", t)
    return t


def match_tokens(text: str | None) -> list[str]:
    """Tokens for n-gram matching (see the module docstring)."""
    if not text:
        return []
    t = fold_latex(text)
    # keep decimal points / thousands separators inside numbers as part of the number
    t = _NUMBER.sub(lambda m: " " + m.group(0).replace(",", "").replace(".", "_") + " ", t)
    t = _DROP_CHARS.sub(" ", t)
    return _TOKEN.findall(t)


def normalize_text(text: str | None, punctuation: bool = False) -> str:
    """Lower-case, whitespace folded; with ``punctuation`` also drops punctuation (dedup key)."""
    if not text:
        return ""
    t = text.translate(_TRANSLATE).lower()
    if punctuation:
        t = re.sub(r"[^\w\s]", " ", t)
    return _WS.sub(" ", t).strip()


def numbers_in(text: str | None) -> tuple[str, ...]:
    """The numbers of a text, sorted, thousands separators removed (``1,200`` == ``1200``)."""
    if not text:
        return ()
    out = []
    for m in _NUMBER.findall(text.translate(_TRANSLATE)):
        v = m.replace(",", "")
        if "." in v:
            v = v.rstrip("0").rstrip(".") or "0"
        out.append(v.lstrip("0") or "0")
    return tuple(sorted(out))


def word_shingles(text: str | None, n: int) -> list[str]:
    """Word n-grams of the punctuation-free normalized text (the whole text if it is shorter)."""
    words = normalize_text(text, punctuation=True).split()
    if not words:
        return []
    if len(words) <= n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
