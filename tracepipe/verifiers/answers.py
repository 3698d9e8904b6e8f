"""Typed answer comparison: recognise what kind of answer each side is, compare within the kind.

math-verify compares almost everything after rounding to a few digits and flattens structure on
the way, so it accepts numbers that differ below its rounding (``1/2^99`` vs ``1/2^98``), partial
answers of a set and some non-equivalent equations, and misses equivalent forms it cannot parse
(``1 1/4``, ``x < 2 or x > 3`` against a union of intervals). Here both answers are recognised as
one of these kinds (:data:`KINDS`):

``integer``, ``rational`` (a fraction), ``mixed_number``, ``decimal``, ``percent``, ``constant``
(an exact non-rational number: radicals, pi), ``expression`` (free symbols), ``equation``,
``interval`` (intervals, unions and inequalities in one variable), ``set``, ``tuple``,
``plus_minus`` (``a \\pm b``: the set {a+b, a-b}), ``sequence`` (a list with an ellipsis),
``matrix``, ``choice`` (a multiple-choice letter) and ``text``;

and compared within the kind:

- exact numbers with exact arithmetic (sympy rationals; radicals by exact algebra or a 60-digit
  evaluation with a relative bound), so ``1/2^99 != 1/2^98``; a decimal in the *answer* is taken at
  its exact value (``0.333 != 1/3``);
- only a decimal the *gold* writes gets a tolerance: the answer must round to it at the gold's
  decimal places, and the gold must carry at least 3 significant digits (fewer: exact only);
- equations as equations: equivalent when one is a non-zero constant multiple of the other, or
  when both solve uniquely for a variable to the same expression (never by moving both sides to 0
  and comparing what is left); an assignment ``x = 5`` compares its right side;
- intervals and inequalities as sets of reals, so ``x < 3`` equals ``(-\\infty, 3)``;
- sets element by element as a one-to-one matching (order free, a partial answer is wrong),
  tuples in order; mixed numbers (``2\\frac{1}{2}``, ``2 1/2``) as their value; ``\\times`` and
  ``\\cdot`` as products (``6 \\times 10^{23}``); percentages with or without the sign (``28\\%``
  accepts ``28\\%``, ``28`` and ``0.28``);
- multiple-choice letters by letter, text by its normalised words.

:func:`compare_answers` returns a :class:`Decision`: ``equal`` / ``different`` / ``unknown``, the
kind (of the gold) and ``sure``: exact arithmetic or a proof, never a tolerance, numeric sampling
or a text comparison that a paraphrase could defeat. It never raises on bad input (``unknown``).
:mod:`tracepipe.verifiers.math` combines the decision with math-verify's. The leaves (numbers,
expressions) are parsed by math-verify's own LaTeX parser (latex2sympy2_extended) with its
normalisation; the structure around them is recognised here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

KINDS = ("integer", "rational", "mixed_number", "decimal", "percent", "constant", "expression", "equation",
         "interval", "set", "tuple", "plus_minus", "sequence", "matrix", "choice", "text")

Verdict = Literal["equal", "different", "unknown"]


@dataclass(frozen=True)
class Decision:
    """The typed comparison's answer: ``verdict``, the gold's ``kind``, ``sure`` and why."""

    verdict: Verdict
    kind: str
    sure: bool = False
    why: str = ""


@dataclass(frozen=True)
class Ans:
    """One recognised answer. ``value``: a sympy object (numbers, expressions, sets of reals,
    matrices), a tuple of :class:`Ans` (set / tuple / sequence / plus_minus), a pair of sympy
    expressions (equation: lhs, rhs) or a string (choice, text)."""

    kind: str
    value: Any = None
    var: str | None = None  # the variable of an assignment (x = ...) or of an inequality / x \in ...
    places: int | None = None  # decimal places as written (decimal gold)
    sig: int | None = None  # significant digits as written (decimal gold)
    bare: Any = None  # percent: the number before the sign
    pair: bool = False  # "(a, b)": an ordered pair or an open interval
    has_decimal: bool = False  # a decimal literal somewhere inside

    @property
    def assignment(self) -> bool:
        return self.var is not None and self.kind not in ("interval",)


class _Unsupported(Exception):
    """An answer this module does not recognise (the comparison says ``unknown``)."""


# -- cleaning ----------------------------------------------------------------------------------
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\(?:q?quad|displaystyle|textstyle|limits|nolimits)\b|~")
_LEFTRIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)\s*(?=[()\[\]|.]|\\[{}|]|\\[lr]angle)")
_UNIT_TEXT = re.compile(r"\s*\\(?:text|mbox|textrm|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?[23]\}?)?\s*$")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|\\degree|°")
_PLAIN_UNIT = re.compile(r"^(?P<n>[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s+(?:[a-zA-Z]{3,}\.?)(?:\s+[a-zA-Z]+\.?)*$")
_WRAPPERS = ("\\boxed", "\\fbox")


def _strip_wrapper(s: str, names: tuple[str, ...]) -> str:
    """``\\boxed{X}`` (whole string) -> ``X``."""
    for name in names:
        if s.startswith(name + "{") and s.endswith("}") and _matching(s, len(name)) == len(s) - 1:
            return s[len(name) + 1 : -1].strip()
    return s


def _matching(s: str, i: int) -> int:
    """Index of the bracket closing the one at ``s[i]`` (-1 if unbalanced)."""
    depth = 0
    for k in range(i, len(s)):
        if s[k] in "({[⟨":
            depth += 1
        elif s[k] in ")}]⟩":
            depth -= 1
            if depth == 0:
                return k
    return -1


def clean(s: str) -> str:
    """Presentation-only LaTeX removed: math delimiters, ``\\boxed``, ``\\left``/``\\right``,
    spacing commands, ``\\dfrac``, units written as ``\\text{...}``, degree signs, ``\\$``."""
    s = str(s).strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a) : len(s) - len(b)].strip()
    s = _strip_wrapper(s, _WRAPPERS)
    s = s.replace("\\langle", "⟨").replace("\\rangle", "⟩")
    s = _LEFTRIGHT.sub("", s).replace("\\left.", "").replace("\\right.", "")
    s = re.sub(r",\s*\\!\s*", ",", s)  # 10,\!080
    s = s.replace("{,}", ",")
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("−", "-").replace("±", "\\pm ").replace("∓", "\\mp ").replace("×", "\\times ").replace("·", "\\cdot ")
    s = s.replace("≤", "\\le ").replace("≥", "\\ge ").replace("≠", "\\ne ").replace("∞", "\\infty ").replace("∪", "\\cup ")
    s = s.replace("\\leqslant", "\\le").replace("\\geqslant", "\\ge").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\neq", "\\ne").replace("\\lt", "<").replace("\\gt", ">")
    s = re.sub(r"\\(?:mathrm|operatorname)\{e\}", "e", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{\s*([-+]?[\d.,/ ]*\d[\d.,/ ]*)\s*\}", r"\1", s)  # \text{13}
    s = s.replace("\\$", "").replace("\\%", "%").replace("\\text{%}", "%")
    s = re.sub(r"\s*(?:\\(?:text|mbox|mathrm)\{\s*(?:percent|per cent)\s*\}|\b(?:percent|per cent)\b)", "%", s)
    s = _DEGREE.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    prev = None
    while prev != s:  # trailing units (5.4 \text{ cents}, 15\mbox{ cm}^2); never a whole \text{...}
        prev = s
        m = _UNIT_TEXT.search(s)
        head = s[: m.start()] if m else ""
        if m and head and re.search(r"[\d})\]]\s*$", head) and not re.search(r"\b(?:or|and)\b", m.group(0)) \
                and not re.search(r"\\(?:text\w*|mbox|mathrm|mathbf)\{[^{}]*\}\s*$", head):  # words, not a quantity
            s = head.strip()
    m = _PLAIN_UNIT.match(s)
    if m:
        s = m.group("n")
    s = s.rstrip(".;").strip()
    return s


# -- splitting at the top level ----------------------------------------------------------------
def _split_top(s: str, sep: re.Pattern[str]) -> list[str]:
    """``s`` split on ``sep`` where it occurs outside every bracket."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if ch in "({[⟨":
            depth += 1
        elif ch in ")}]⟩":
            depth -= 1
        elif depth == 0:
            m = sep.match(s, i)
            if m and m.end() > i:
                out.append(s[start:i].strip())
                start = i = m.end()
                continue
        i += 1
    out.append(s[start:].strip())
    return out


_LIST_SEP = re.compile(r",|;|\\text\{\s*(?:or|and|,)\s*\}|\s+(?:or|and)\s+|\\(?:quad|qquad)\b")
_OR_SEP = re.compile(r"\\text\{\s*or\s*\}|\s+or\s+|\\lor\b|\\vee\b")
_CUP = re.compile(r"\\cup\b|\\bigcup\b")
_EQ = re.compile(r"(?<![<>!:\\])=(?!=)")
_REL = re.compile(r"\\le\b|\\ge\b|\\ne\b|<=|>=|<|>")
_ELLIPSIS = {"\\ldots", "\\dots", "\\cdots", "...", "…", "\\dotsc", "\\dotsb"}
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _merge_thousands(parts: list[str], raw: str) -> list[str]:
    """Undo a split inside ``1,234`` (a comma with no space between groups of three digits)."""
    if "," not in raw or not re.search(r"\d,\d{3}(?!\d)", raw):
        return parts
    merged: list[str] = []
    for p in parts:
        if merged and re.fullmatch(r"\d{3}(?:\.\d+)?", p) and re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})*", merged[-1]) \
                and (merged[-1] + "," + p) in raw:
            merged[-1] = merged[-1] + "," + p
        else:
            merged.append(p)
    return merged


# -- leaves: numbers and expressions -----------------------------------------------------------
_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRAC = re.compile(r"(?P<s>[+-])?\s*\\frac\{\s*(?P<a>\d+)\s*\}\{\s*(?P<b>\d+)\s*\}")
_SLASH = re.compile(r"(?P<s>[+-])?\s*(?P<a>\d+)\s*/\s*(?P<b>\d+)")
_MIXED_TEX = re.compile(r"(?P<s>[+-])?\s*(?P<w>\d+)\s*\\frac\{\s*(?P<a>\d+)\s*\}\{\s*(?P<b>\d+)\s*\}")
_MIXED_TXT = re.compile(r"(?P<s>[+-])?\s*(?P<w>\d+)\s+(?P<a>\d+)\s*/\s*(?P<b>\d+)")
_SCI = re.compile(r"(?P<m>[+-]?(?:\d+(?:\.\d+)?|\.\d+))\s*(?:\\times|\\cdot|\*)\s*10\s*\^\s*\{?\s*(?P<e>[+-]?\d+)\s*\}?")
_SCI_E = re.compile(r"(?P<m>[+-]?(?:\d+(?:\.\d+)?|\.\d+))[eE](?P<e>[+-]?\d+)")
_REPEAT = re.compile(r"(?P<s>[+-])?(?P<i>\d*)\.(?P<f>\d*)\\overline\{(?P<r>\d+)\}")
_DEC_LIT = re.compile(r"(?<![\d.])(\d*\.\d+)(?![\d.])")
_PERCENT = re.compile(r"^(?P<n>.+?)\s*(?:%|\\text\{\s*percent\s*\}|percent)$")
_LEAF_MAX_BITS = 200_000  # exact numbers larger than this many bits are not evaluated


def _sig_places(lit: str) -> tuple[int, int]:
    """Significant digits and decimal places of a decimal literal as written."""
    lit = lit.lstrip("+-")
    ip, _, fp = lit.partition(".")
    digits = (ip + fp).lstrip("0")
    return max(len(digits), 1), len(fp)


def _sympy() -> Any:
    import sympy

    return sympy


def _number(s: str) -> Ans | None:
    """A plain number written in one of the number kinds, exact, or None."""
    sp = _sympy()
    t = re.sub(r"(?<=[+-])\s+", "", s.strip())
    if re.fullmatch(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?", t):
        t = t.replace(" ", "")  # 1 000 000
    elif not _MIXED_TXT.fullmatch(t):
        t = re.sub(r"\s*([/^{}]|\\frac|\\times|\\cdot)\s*", r"\1", t)  # 3 / 4, 2 \times 10^{3}
    if _INT.fullmatch(t):
        return Ans("integer", sp.Integer(int(t)))
    if _THOUSANDS.fullmatch(t):
        t2 = t.replace(",", "")
        if "." in t2:
            sig, places = _sig_places(t2)
            return Ans("decimal", sp.Rational(t2), places=places, sig=sig, has_decimal=True)
        return Ans("integer", sp.Integer(int(t2)))
    if _DEC.fullmatch(t):
        sig, places = _sig_places(t)
        return Ans("decimal", sp.Rational(t if not t.endswith(".") else t[:-1]), places=places, sig=sig, has_decimal=True)
    m = _REPEAT.fullmatch(t)
    if m:
        i, f, r = m.group("i") or "0", m.group("f"), m.group("r")
        v = sp.Integer(int(i)) + (sp.Rational(int(f), 10 ** len(f)) if f else 0) + sp.Rational(int(r), (10 ** len(r) - 1) * 10 ** len(f))
        return Ans("rational", -v if m.group("s") == "-" else v)
    for rx in (_MIXED_TEX, _MIXED_TXT):
        m = rx.fullmatch(s.strip())
        if m and int(m.group("b")) > 0 and int(m.group("a")) < int(m.group("b")):
            v = sp.Integer(int(m.group("w"))) + sp.Rational(int(m.group("a")), int(m.group("b")))
            return Ans("mixed_number", -v if m.group("s") == "-" else v)
    for rx in (_FRAC, _SLASH):
        m = rx.fullmatch(t)
        if m and int(m.group("b")) > 0:
            v = sp.Rational(int(m.group("a")), int(m.group("b")))
            return Ans("rational", -v if m.group("s") == "-" else v)
    for rx in (_SCI, _SCI_E):
        m = rx.fullmatch(t)
        if m and abs(int(m.group("e"))) <= 400:
            mant = m.group("m")
            v = sp.Rational(mant) * sp.Integer(10) ** int(m.group("e"))
            if "." in mant:
                sig, places = _sig_places(mant)
                return Ans("decimal", v, places=places - int(m.group("e")), sig=sig, has_decimal=True)
            return Ans("integer" if v.is_Integer else "rational", v)
    return None


def _too_big(expr: Any) -> bool:
    """An exact number too large to evaluate (a huge power or factorial: 9^{9^{9^9}})."""
    sp = _sympy()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Pow):
            b, e = node.args
            if not (e.is_number and b.is_number) or _too_big(e):
                continue
            try:
                ev = abs(float(sp.N(e, 15)))
            except (TypeError, ValueError, OverflowError):
                return True
            if ev <= 4096:
                continue
            try:
                bits = float(sp.N(sp.log(abs(b), 2), 15))
            except (TypeError, ValueError, OverflowError):
                return True
            if bits > 0 and ev * bits > _LEAF_MAX_BITS:
                return True
        elif isinstance(node, sp.factorial):
            a = node.args[0]
            try:
                if a.is_number and abs(float(sp.N(a, 15))) > 20000:
                    return True
            except (TypeError, ValueError, OverflowError):
                return True
    return False


def _leaf_norm() -> Any:
    from latex2sympy2_extended import NormalizationConfig

    return NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=False, boxed="none")


@lru_cache(maxsize=4096)
def _parse_leaf(s: str) -> Any:
    """math-verify's LaTeX parser on one leaf, decimals made exact first."""
    from latex2sympy2_extended import latex2sympy, normalize_latex
    from math_verify.grader import should_treat_as_complex

    sp = _sympy()

    def exact(m: re.Match[str]) -> str:
        lit = m.group(1)
        ip, _, fp = lit.partition(".")
        return f"(\\frac{{{int((ip or '0') + fp)}}}{{{10 ** len(fp)}}})"

    t = re.sub(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])", r"\\pi ", s)  # a plain pi
    t = re.sub(r"(?<![\\a-zA-Z])sqrt\(([^()]*)\)", r"\\sqrt{\1}", t)
    t = re.sub(r"(?<![\\a-zA-Z])exp\(", r"\\exp(", t)
    t = _DEC_LIT.sub(exact, t)
    t = normalize_latex(t, _leaf_norm())
    expr = latex2sympy(t, is_real=not should_treat_as_complex(t), normalization_config=None)
    if isinstance(expr, sp.Basic) and not isinstance(expr, (sp.Set, sp.Tuple)) and not getattr(expr, "is_Relational", False):
        if _too_big(expr):
            raise _Unsupported("number too large to evaluate exactly")
        try:
            expr = expr.doit()
        except Exception:  # noqa: BLE001 - leave it unevaluated
            pass
    return expr


def _leaf(s: str) -> Ans:
    """A number or an expression (no top-level structure left)."""
    n = _number(s)
    if n is not None:
        return n
    m = _PERCENT.match(s)
    if m:
        inner = _leaf(m.group("n").strip())
        if inner.kind in ("integer", "rational", "mixed_number", "decimal", "constant"):
            sp = _sympy()
            return Ans("percent", inner.value * sp.Rational(1, 100), bare=inner, has_decimal=inner.has_decimal)
        raise _Unsupported(f"percent of {inner.kind}")
    try:
        expr = _parse_leaf(s)
    except _Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - the parser's own errors
        raise _Unsupported(f"cannot parse {s!r}: {type(e).__name__}") from None
    return _from_sympy(expr, has_decimal=bool(_DEC_LIT.search(s)))


def _from_sympy(expr: Any, has_decimal: bool = False) -> Ans:
    sp = _sympy()
    if isinstance(expr, sp.MatrixBase):
        grid = tuple(tuple(_from_sympy(expr[i, j], has_decimal) for j in range(expr.cols)) for i in range(expr.rows))
        return Ans("matrix", grid, has_decimal=has_decimal)
    if isinstance(expr, sp.Set) and not isinstance(expr, sp.FiniteSet):
        return Ans("interval", expr)
    if isinstance(expr, (sp.FiniteSet, sp.Tuple)):
        items = tuple(_from_sympy(a, has_decimal) for a in expr.args)
        return Ans("set" if isinstance(expr, sp.FiniteSet) else "tuple", items)
    if getattr(expr, "is_Relational", False) or isinstance(expr, (sp.And, sp.Or)):
        raise _Unsupported("relation inside a leaf")
    if not isinstance(expr, sp.Expr):
        raise _Unsupported(f"unsupported object {type(expr).__name__}")
    if expr.free_symbols:
        return Ans("expression", expr, has_decimal=has_decimal)
    if expr.is_Integer:
        return Ans("integer", expr, has_decimal=has_decimal)
    if expr.is_Rational:
        return Ans("rational", expr, has_decimal=has_decimal)
    return Ans("constant", expr, has_decimal=has_decimal)


# -- structure ---------------------------------------------------------------------------------
_CHOICE_GOLD = re.compile(r"\(?\s*([A-J])\s*\)?")
_CHOICE_PRED = re.compile(r"\(\s*([A-Ja-j])\s*\)(?:\s.*)?|([A-J])[.):](?:\s.*)?|([A-Ja-j])")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|textsc|emph)\s*\{([^{}]*)\}")
_WORDS = re.compile(r"[A-Za-z][A-Za-z'\- ]*")
_SHORT_WORDS = {"yes", "no", "odd", "even", "none", "all", "both", "neither", "true", "false", "never", "always"}
_NAME = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?'*|\\(?:alpha|beta|gamma|delta|theta|lambda|mu|phi|psi|omega|sigma|tau|rho)(?:_\{?[A-Za-z0-9]+\}?)?")
_FUNC = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])*\s*\)")
_IN = re.compile(r"^(?P<v>.+?)\s*\\in\s*(?P<r>.+)$")


def _untext(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_CMD.sub(r"\1", s)
    return s.strip()


def _choice(s: str, gold: bool) -> str | None:
    t = _untext(s).strip()
    m = (_CHOICE_GOLD if gold else _CHOICE_PRED).fullmatch(t)
    if not m:
        return None
    letter = next(g for g in m.groups() if g)
    rest = t[t.find(letter) + 1 :]
    if re.search(r"\(\s*[A-Ja-j]\s*\)|\b[A-J]\b", rest):
        return None  # "(A) and (C)": more than one option
    return letter.upper()


def _text(s: str) -> str | None:
    """Normalised words when the answer is prose (``\\text{even}``, ``Monday``, ``no solution``)."""
    wrapped = bool(_TEXT_CMD.search(s)) and not re.sub(_TEXT_CMD, "", s).strip(" ,.")
    t = _untext(s)
    if not _WORDS.fullmatch(t):
        return None
    words = t.lower().replace("-", " ").replace("'", "").split()
    if not words:
        return None
    if not wrapped:
        if len(words) == 1 and not (len(words[0]) >= 4 or words[0] in _SHORT_WORDS):
            return None  # xy, abc: a product of symbols
        if any(len(w) < 2 for w in words) and len(words) > 1 and not all(len(w) >= 2 or w in ("a",) for w in words):
            return None
    elif len(t.replace(" ", "")) < 2:
        return None  # \text{e}, \mathrm{x}: a symbol
    words = [w for w in words if w not in ("the", "a", "an")] or words
    return "".join(words)


def _pm_variants(s: str) -> list[str] | None:
    """``a \\pm b`` -> [``a + b``, ``a - b``] (at most two signs), else None."""
    n = s.count("\\pm") + s.count("\\mp")
    if n == 0:
        return None
    if n > 2:
        raise _Unsupported("more than two plus-minus signs")
    out = [s]
    for _ in range(n):
        nxt = []
        for v in out:
            i = min(j for j in (v.find("\\pm"), v.find("\\mp")) if j >= 0)
            op = v[i : i + 3]
            for sign in ("+", "-"):
                real = sign if op == "\\pm" else ("-" if sign == "+" else "+")
                nxt.append(v[:i] + real + v[i + 3 :])
        out = nxt
    return out


def _interval_item(s: str) -> Any | None:
    """``(a, b]`` etc. as a sympy Interval (exact endpoints), or None when ``s`` is not one."""
    sp = _sympy()
    s = s.strip()
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]" or _matching(s, 0) != len(s) - 1:
        return None
    parts = _split_top(s[1:-1], re.compile(","))
    if len(parts) != 2 or not all(parts):
        return None
    ends = []
    for p in parts:
        p = p.replace(" ", "")
        if p in ("\\infty", "+\\infty", "\\infty+", "oo", "+oo", "inf"):
            ends.append(sp.oo)
        elif p in ("-\\infty", "-oo", "-inf"):
            ends.append(-sp.oo)
        else:
            a = _leaf(p)
            if a.kind not in ("integer", "rational", "mixed_number", "decimal", "constant"):
                return None
            ends.append(a.value)
    return sp.Interval(ends[0], ends[1], left_open=s[0] == "(", right_open=s[-1] == ")")


def _region(s: str) -> Ans | None:
    """Intervals, unions of intervals, ``x \\in ...``, inequalities in one variable: a set of reals."""
    sp = _sympy()
    m = _IN.match(s)
    if m and _NAME.fullmatch(m.group("v").strip()):
        r = m.group("r").strip()
        iv = _interval_item(r)
        inner = Ans("interval", iv) if iv is not None else (_region(r) or _structure(r))
        return Ans(inner.kind, inner.value, var=m.group("v").strip(), pair=inner.pair)
    if s in ("\\mathbb{R}", "\\mathbb R", "\\R", "\\mathbb{R}^1"):
        return Ans("interval", sp.S.Reals)
    if s in ("\\emptyset", "\\varnothing", "\\{\\}", "\\{ \\}"):
        return Ans("interval", sp.S.EmptySet)
    parts = _split_top(s, _CUP)
    if len(parts) > 1:
        sets = []
        for p in parts:
            iv = _interval_item(p)
            r = Ans("interval", iv) if iv is not None else _region(p)
            if r is None:
                braced = _braced(p)
                if braced is None:
                    return None
                r = braced
                if not all(i.kind in ("integer", "rational", "decimal", "mixed_number", "constant") for i in r.value):
                    return None
                sets.append(sp.FiniteSet(*(i.value for i in r.value)))
                continue
            sets.append(r.value)
        return Ans("interval", sp.Union(*sets))
    if s[0] == "(" and s[-1] == ")" and "infty" not in s:
        return None  # (a, b): an ordered pair, or an open interval when the other side is a set of reals
    iv = _interval_item(s)
    if iv is not None:
        return Ans("interval", iv)
    ors = _split_top(s, _OR_SEP)
    if len(ors) > 1 or _REL.search(s):
        sets, var = [], None
        for part in ors:
            if not _REL.search(part) or _EQ.search(part):
                return None
            rel = _parse_leaf_rel(part)
            syms = rel.free_symbols
            if len(syms) != 1:
                raise _Unsupported("inequality in more than one variable")
            v = str(next(iter(syms)))
            if var is not None and v != var:
                raise _Unsupported("inequalities in different variables")
            var = v
            sets.append(rel.as_set())
        return Ans("interval", sp.Union(*sets), var=var)
    return None


def _parse_leaf_rel(s: str) -> Any:
    sp = _sympy()
    try:
        rel = _parse_leaf(s)
    except Exception as e:  # noqa: BLE001
        raise _Unsupported(f"cannot parse inequality {s!r}: {type(e).__name__}") from None
    if not (getattr(rel, "is_Relational", False) or isinstance(rel, sp.And)):
        raise _Unsupported("not an inequality")
    return rel


def _braced(s: str) -> Ans | None:
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2].strip()
        items = _items(inner) if inner else []
        return Ans("set", tuple(items))
    return None


def _items(s: str) -> list[Ans]:
    """Comma / "and" / "or" separated elements, each recognised; ``\\pm`` expands to two."""
    parts = _merge_thousands(_split_top(s, _LIST_SEP), s)
    if len(parts) > _MAX_ITEMS:
        raise _Unsupported(f"more than {_MAX_ITEMS} elements")
    out: list[Ans] = []
    for p in parts:
        if not p:
            continue
        if p in _ELLIPSIS:
            out.append(Ans("text", "…"))
            continue
        pm = _pm_variants(p)
        if pm is not None:
            out.extend(_structure(v) for v in pm)
        else:
            out.append(_structure(p))
    return out


def _structure(s: str) -> Ans:
    """Recognise one cleaned answer (raises :class:`_Unsupported`)."""
    s = s.strip()
    if not s:
        raise _Unsupported("empty answer")
    while s.startswith("{") and _matching(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    # a list at the top level (1, 2, 3 / x = 1 or x = 2 / 19, 46, and 82)
    if not _THOUSANDS.fullmatch(s.replace(" ", "")):
        parts = _merge_thousands(_split_top(s, _LIST_SEP), s)
        parts = [p for p in parts if p]
        if len(parts) > 1:
            rel = _region(s) if all(_REL.search(p) and not _EQ.search(p) for p in parts) else None
            if rel is not None:
                return rel
            items = _items(s)
            return _list_answer(items, s)
    braced = _braced(s)
    if braced is not None:
        return braced
    mat = _matrix(s)
    if mat is not None:
        return mat
    # relations: equations and assignments
    eq = _split_top(s, _EQ)
    if len(eq) > 1:
        if not all(eq):
            raise _Unsupported("empty side of an equation")
        lhs, rhs = eq[0], eq[-1]
        if _NAME.fullmatch(lhs) or _FUNC.fullmatch(lhs):
            value = _structure(rhs)
            return Ans(value.kind, value.value, var=lhs.replace(" ", ""), places=value.places, sig=value.sig,
                       bare=value.bare, pair=value.pair, has_decimal=value.has_decimal)
        left, right = _leaf(lhs), _leaf(rhs)
        if left.kind != "expression" and right.kind != "expression":
            return right  # 2 + 3 = 5: the value
        for side in (left, right):
            if side.kind not in ("expression", "integer", "rational", "decimal", "constant", "mixed_number"):
                raise _Unsupported(f"equation with a {side.kind} side")
        return Ans("equation", (left.value, right.value), has_decimal=left.has_decimal or right.has_decimal)
    region = _region(s)
    if region is not None:
        return region
    pm = _pm_variants(s)
    if pm is not None:
        return Ans("plus_minus", tuple(_structure(v) for v in pm))
    if s[0] in "(⟨[" and _matching(s, 0) == len(s) - 1:
        inner = s[1:-1]
        parts = _split_top(inner, re.compile(","))
        if len(parts) >= 2:
            items = tuple(_structure(p) for p in parts)
            return Ans("tuple", items, pair=len(items) == 2 and s[0] == "(")
        if s[0] == "(":
            return _structure(inner)
    return _leaf(s)


_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(?P<body>.*)\\end\{\1\}", re.S)


def _matrix(s: str) -> Ans | None:
    """``\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}`` (in optional parentheses): rows of entries."""
    t = s
    while t.startswith("(") and t.endswith(")") and _matching(t, 0) == len(t) - 1:
        t = t[1:-1].strip()
    m = _MATRIX.fullmatch(t)
    if not m:
        return None
    rows = [r for r in _split_top(m.group("body"), re.compile(r"\\\\")) if r.strip()]
    grid = tuple(tuple(_structure(e) for e in _split_top(r, re.compile("&"))) for r in rows)
    if not grid or len({len(r) for r in grid}) != 1:
        raise _Unsupported("ragged matrix")
    return Ans("matrix", grid)


def _list_answer(items: list[Ans], raw: str) -> Ans:
    if any(i.kind == "text" and i.value == "…" for i in items):
        return Ans("sequence", tuple(items))
    vars_ = {i.var for i in items}
    if len(vars_) == 1 and None not in vars_:
        # x = 1 or x = 2: the set of values of x
        flat: list[Ans] = []
        for i in items:
            plain = Ans(i.kind, i.value, places=i.places, sig=i.sig, bare=i.bare, pair=i.pair, has_decimal=i.has_decimal)
            flat.extend(plain.value if plain.kind in ("set", "plus_minus") else [plain])
        return Ans("set", tuple(flat), var=next(iter(vars_)))
    if None not in vars_:
        return Ans("tuple", tuple(sorted(items, key=lambda a: a.var or "")), var="*")  # a=1, b=2: by name
    return Ans("set", tuple(items))


_MAX_CHARS = 2000  # longer answers are not recognised (the parser is slow on them)
_MAX_ITEMS = 64  # nor lists longer than this (elements are matched pairwise)


def recognise(answer: str) -> Ans:
    """The typed form of one answer string (raises ``ValueError`` when it is not recognised)."""
    s = clean(answer)
    if not s:
        raise ValueError("empty answer")
    if len(s) > _MAX_CHARS:
        raise ValueError(f"answer longer than {_MAX_CHARS} characters")
    try:
        c = _choice(s, gold=True)
        if c is not None:
            return Ans("choice", c)
        t = _text(s)
        if t is not None:
            return Ans("text", t)
        return _structure(s)
    except _Unsupported as e:
        raise ValueError(str(e)) from None
    except (RecursionError, MemoryError):
        raise ValueError("answer too deeply nested or too large") from None


def _recognise_pred(answer: str, gold: Ans) -> Ans:
    s = clean(answer)
    if gold.kind == "choice":
        c = _choice(s, gold=False)
        if c is not None:
            return Ans("choice", c)
    return recognise(answer)


# -- comparison --------------------------------------------------------------------------------
_NUMERIC = ("integer", "rational", "mixed_number", "decimal", "constant", "percent")
_EXACT_REL = 10 ** -40  # relative difference below which two 60-digit evaluations agree


def _n(x: Any, digits: int = 60) -> Any:
    sp = _sympy()
    v = sp.N(x, digits)
    if not v.is_number or v.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise _Unsupported("not a finite number")
    return v


def _num_equal(g: Ans, pv: Any, kind: str) -> Decision:
    """A gold number against an exact predicted value (a sympy number)."""
    sp = _sympy()
    gv = g.value
    if gv.is_Rational and pv.is_Rational:
        if gv == pv:
            return Decision("equal", kind, True, "exact")
        if g.kind == "decimal" and g.places is not None:
            if abs(pv - gv) * 2 * sp.Integer(10) ** g.places <= 1:
                return Decision("equal", kind, False, f"rounds to the gold's {g.places} decimal places")
        return Decision("different", kind, True, "exact")
    try:
        a, b = _n(gv), _n(pv)
    except _Unsupported:
        return Decision("unknown", kind, False, "not a finite number")
    if g.kind == "decimal" and g.places is not None:
        if abs(b - a) * 2 * sp.Integer(10) ** g.places <= 1:
            return Decision("equal", kind, False, f"rounds to the gold's {g.places} decimal places")
        return Decision("different", kind, True, "outside the gold's precision")
    scale = max(abs(a), abs(b), sp.Integer(1)) if (a == 0 or b == 0) else max(abs(a), abs(b))
    if abs(a - b) > _EXACT_REL * scale:
        return Decision("different", kind, True, "differs at 60 digits")
    if gv.is_Rational != pv.is_Rational:
        return Decision("different", kind, True, "rational against irrational")
    try:
        d = gv - pv
        if sp.simplify(d) == 0 or sp.radsimp(sp.sqrtdenest(d)) == 0:
            return Decision("equal", kind, True, "exact algebra")
        if not d.has(sp.pi, sp.E, sp.exp, sp.log):
            t = sp.Symbol("_t")
            if sp.minimal_polynomial(d, t) == t:
                return Decision("equal", kind, True, "minimal polynomial")
    except Exception:  # noqa: BLE001 - no proof, the numeric agreement stands
        pass
    return Decision("equal", kind, False, "agrees at 60 digits")


def _values(a: Ans) -> list[Any]:
    """The number an answer stands for (a percent: both 28% = 0.28 and the bare 28)."""
    if a.kind == "percent":
        return [a.value, a.bare.value]
    return [a.value]


def _cmp_number(g: Ans, p: Ans, kind: str) -> Decision:
    if p.kind in ("mixed_number", "percent") and kind in ("integer", "rational", "decimal"):
        kind = p.kind  # the form being checked is the answer's
    if p.kind not in _NUMERIC:
        if p.kind == "expression":
            return Decision("different", kind, False, "a number against an expression")
        return Decision("different", kind, p.kind in ("set", "tuple", "plus_minus", "interval", "choice"), f"a number against a {p.kind}")
    if g.kind == "percent":
        # 28% against 28% / 0.28 / 28
        cands = [(g.value, p.value)] if p.kind == "percent" else [(g.value, p.value), (g.bare.value, p.value)]
        gb = g.bare
        decs = [_num_equal(Ans(gb.kind, gv, places=gb.places, sig=gb.sig), pv, kind) for gv, pv in cands]
    elif p.kind == "percent":
        # 28% against 0.28 (its value) or against 28 (the bare number: the gold may have dropped
        # the sign, or be a fraction, so never sure)
        by_bare = _num_equal(g, p.bare.value, kind)
        decs = [_num_equal(g, p.value, kind), Decision(by_bare.verdict, kind, False, by_bare.why + " (without the sign)")]
    else:
        decs = [_num_equal(g, p.value, kind)]
    return _best(decs, kind)


def _best(decs: list[Decision], kind: str) -> Decision:
    for want in (("equal", True), ("equal", False)):
        for d in decs:
            if (d.verdict, d.sure) == want:
                return d
    if any(d.verdict == "unknown" for d in decs):
        return Decision("unknown", kind, False, "; ".join(d.why for d in decs))
    return Decision("different", kind, all(d.sure for d in decs), decs[0].why if decs else "")


def _points(symbols: list[Any], k: int, seed: int = 7) -> list[dict[Any, Any]]:
    sp = _sympy()
    rnd = random.Random(seed)
    return [{s: sp.Rational(rnd.randint(11, 97), rnd.randint(7, 31)) for s in symbols} for _ in range(k)]


def _cmp_expr(gv: Any, pv: Any, kind: str) -> Decision:
    """Two sympy expressions: symbolic difference, then random positive points at 40 digits."""
    sp = _sympy()
    try:
        if sp.expand(gv - pv) == 0:
            return Decision("equal", kind, True, "expands to the same")
    except Exception:  # noqa: BLE001
        pass
    syms = sorted(gv.free_symbols | pv.free_symbols, key=str)
    agree, tried = 0, 0
    for pt in _points(syms, 6):
        try:
            a, b = _n(gv.subs(pt), 40), _n(pv.subs(pt), 40)
        except Exception:  # noqa: BLE001 - undefined here (a function symbol, a pole)
            continue
        tried += 1
        scale = max(abs(a), abs(b), sp.Integer(1))
        if abs(a - b) > sp.Float("1e-12") * scale:
            return Decision("different", kind, True, "differs at a sample point")
        if abs(a - b) <= sp.Float("1e-25") * scale:
            agree += 1
    try:
        if sp.simplify(gv - pv) == 0:
            return Decision("equal", kind, True, "simplifies to the same")
    except Exception:  # noqa: BLE001
        pass
    if tried >= 3 and agree == tried:
        return Decision("equal", kind, False, "agrees at sample points")
    return Decision("unknown", kind, False, "no decision")


def _as_equation(a: Ans) -> Any | None:
    """An equation / an assignment with an expression value as ``lhs - rhs`` (sympy), else None."""
    sp = _sympy()
    if a.kind == "equation":
        lhs, rhs = a.value
        return sp.sympify(lhs) - sp.sympify(rhs)
    if a.var and a.var != "*" and a.kind in ("expression", "integer", "rational", "decimal", "constant", "mixed_number"):
        try:
            lhs = _parse_leaf(a.var)
        except Exception:  # noqa: BLE001
            return None
        if isinstance(lhs, sp.Expr):
            return lhs - a.value
    return None


def _cmp_equation(g: Ans, p: Ans, kind: str) -> Decision:
    sp = _sympy()
    e1, e2 = _as_equation(g), _as_equation(p)
    if e1 is None or e2 is None:
        return Decision("different", kind, False, f"an equation against a {p.kind}")
    if not e1.free_symbols or not e2.free_symbols:
        return Decision("unknown", kind, False, "an equation without variables")
    if e1.free_symbols != e2.free_symbols:
        return Decision("different", kind, True, "different variables")
    try:
        ratio = sp.cancel(sp.together(e1 / e2))
        if not ratio.free_symbols and ratio.is_number and ratio != 0 and ratio.is_finite:
            return Decision("equal", kind, True, "a constant multiple")
    except Exception:  # noqa: BLE001
        pass
    for s in sorted(e1.free_symbols, key=str):
        try:
            s1, s2 = sp.solve(e1, s), sp.solve(e2, s)
        except Exception:  # noqa: BLE001
            continue
        if len(s1) == 1 and len(s2) == 1:
            d = _cmp_expr(s1[0], s2[0], kind)
            if d.verdict != "unknown":
                return Decision(d.verdict, kind, d.sure, f"solved for {s}: {d.why}")
    return Decision("different", kind, False, "not a constant multiple")


def _cmp_region(g: Ans, p: Ans, kind: str) -> Decision:
    sp = _sympy()
    if p.kind == "tuple" and p.pair and len(p.value) == 2 and all(i.kind in _NUMERIC for i in p.value):
        ends = [i.value for i in p.value]
        p = Ans("interval", sp.Interval.open(*ends), pair=True)
    if p.kind != "interval":
        return Decision("different", kind, False, f"a set of reals against a {p.kind}")
    try:
        a = sp.Complement(g.value, p.value)
        b = sp.Complement(p.value, g.value)
        ea, eb = a.is_empty, b.is_empty
    except Exception:  # noqa: BLE001
        return Decision("unknown", kind, False, "cannot compare the sets")
    if ea is True and eb is True:
        same_var = not (g.var and p.var and g.var != p.var)
        return Decision("equal", kind, same_var, "same set of reals" + ("" if same_var else " (another variable)"))
    if ea is False or eb is False:
        return Decision("different", kind, True, "different sets of reals")
    return Decision("unknown", kind, False, "cannot compare the sets")


def _elements(a: Ans) -> tuple[Ans, ...]:
    if a.kind in ("set", "tuple", "plus_minus", "sequence"):
        return a.value
    return (a,)


def _cmp_ordered(gs: tuple[Ans, ...], ps: tuple[Ans, ...], kind: str) -> Decision:
    if len(gs) != len(ps):
        return Decision("different", kind, True, f"{len(ps)} elements, the gold has {len(gs)}")
    sure, unknown = True, False
    for i, (g, p) in enumerate(zip(gs, ps)):
        d = _compare(g, p)
        if d.verdict == "different":
            return Decision("different", kind, d.sure, f"element {i + 1}: {d.why}")
        unknown |= d.verdict == "unknown"
        sure &= d.sure
    if unknown:
        return Decision("unknown", kind, False, "an element is undecided")
    return Decision("equal", kind, sure, "element by element")


def _cmp_unordered(gs: tuple[Ans, ...], ps: tuple[Ans, ...], kind: str) -> Decision:
    gs, ps = _dedupe(gs), _dedupe(ps)
    if len(gs) != len(ps):
        return Decision("different", kind, True, f"{len(ps)} distinct elements, the gold has {len(gs)}")
    table = [[_compare(g, p) for p in ps] for g in gs]

    def matching(ok: set[str]) -> list[int] | None:
        match: dict[int, int] = {}

        def augment(i: int, seen: set[int]) -> bool:
            for j in range(len(ps)):
                if table[i][j].verdict in ok and j not in seen:
                    seen.add(j)
                    if j not in match or augment(match[j], seen):
                        match[j] = i
                        return True
            return False

        for i in range(len(gs)):
            if not augment(i, set()):
                return None
        return [match[j] for j in range(len(ps))]

    m = matching({"equal"})
    if m is not None:
        sure = all(table[m[j]][j].sure for j in range(len(ps)))
        return Decision("equal", kind, sure, "a one-to-one match")
    if matching({"equal", "unknown"}) is not None:
        return Decision("unknown", kind, False, "an element is undecided")
    sure = all(d.sure or d.verdict == "equal" for row in table for d in row)
    return Decision("different", kind, sure, "no one-to-one match")


def _dedupe(items: tuple[Ans, ...]) -> tuple[Ans, ...]:
    out: list[Ans] = []
    for it in items:
        if not any(_compare(o, it).verdict == "equal" and _compare(o, it).sure for o in out):
            out.append(it)
    return tuple(out)


def _cmp_collection(g: Ans, p: Ans, kind: str) -> Decision:
    if g.pair and p.kind == "interval":
        return _cmp_region(p, g, "interval")
    if p.var and p.kind in ("set", "plus_minus", "tuple") and p.var != "*":
        p = Ans(p.kind, p.value, pair=p.pair)
    if g.kind == "sequence" or p.kind == "sequence":
        if g.kind != p.kind:
            return Decision("different", kind, False, "a sequence against a list")
        return _cmp_ordered(g.value, p.value, kind)
    gs, ps = _elements(g), _elements(p)
    if g.kind == "tuple" and g.var == "*":  # a=1, b=2
        if p.var != "*":
            return Decision("unknown", kind, False, "named values against unnamed ones")
        if [a.var for a in gs] != [b.var for b in ps]:
            return Decision("different", kind, True, "different names")
        return _cmp_ordered(tuple(Ans(a.kind, a.value, places=a.places, sig=a.sig, bare=a.bare) for a in gs),
                            tuple(Ans(b.kind, b.value, places=b.places, sig=b.sig, bare=b.bare) for b in ps), kind)
    if g.kind == "tuple" or p.kind == "tuple":
        if g.kind == "tuple" and p.kind == "tuple":
            return _cmp_ordered(gs, ps, kind)
        # an unordered list against a tuple: equal only in the same order, and not sure
        d = _cmp_ordered(gs, ps, kind)
        if d.verdict == "equal":
            return Decision("equal", kind, False, "same elements in the same order (a list against a tuple)")
        return Decision("different" if d.verdict == "different" and len(gs) != len(ps) else "unknown", kind, False, d.why)
    return _cmp_unordered(gs, ps, kind)


def _unwrap_assign(a: Ans) -> Ans:
    return Ans(a.kind, a.value, places=a.places, sig=a.sig, bare=a.bare, pair=a.pair, has_decimal=a.has_decimal)


def _compare(g: Ans, p: Ans) -> Decision:
    """``g`` (the gold) against ``p``, both recognised."""
    kind = g.kind
    # assignments: x = 5 against 5 / y = 5 / 2x - y = 0
    if g.assignment or p.assignment:
        ga, pa = g.assignment and g.var != "*", p.assignment and p.var != "*"
        if g.kind == "equation" or p.kind == "equation" or (ga and g.kind == "expression") or (pa and p.kind == "expression"):
            if (ga or g.kind == "equation") and (pa or p.kind == "equation"):
                return _cmp_equation(g, p, "equation")
        if ga and pa and g.var != p.var:
            d = _compare(_unwrap_assign(g), _unwrap_assign(p))
            return Decision(d.verdict, d.kind, False, f"{d.why} (another variable)")
        if ga:
            g = _unwrap_assign(g)
        if pa:
            p = _unwrap_assign(p)
        kind = g.kind
    if kind == "choice":
        if p.kind == "choice":
            return Decision("equal" if g.value == p.value else "different", kind, True, "letter")
        return Decision("different", kind, False, f"a letter against a {p.kind}")
    if kind == "text":
        if p.kind == "text":
            return Decision("equal", kind, True, "same words") if g.value == p.value else Decision("different", kind, False, "other words")
        return Decision("different", kind, False, f"words against a {p.kind}")
    if kind == "equation":
        return _cmp_equation(g, p, kind)
    if kind == "interval":
        return _cmp_region(g, p, kind)
    if kind in ("set", "tuple", "plus_minus", "sequence"):
        if p.kind in ("set", "tuple", "plus_minus", "sequence") or (g.pair and p.kind == "interval"):
            return _cmp_collection(g, p, kind)
        if len(g.value) == 1:
            return _compare(g.value[0], p)
        if kind == "tuple" and g.pair and p.kind == "interval":
            return _cmp_region(p, g, "interval")
        return Decision("different", kind, all(i.kind in _NUMERIC for i in g.value), f"one value, the gold has {len(g.value)}")
    if kind == "matrix":
        return _cmp_matrix(g, p, kind)
    if kind in _NUMERIC:
        if p.kind in ("set", "plus_minus") and len(p.value) == 1:
            p = p.value[0]
        if p.kind in ("set", "tuple", "plus_minus") and len(p.value) > 1:
            return Decision("different", kind, True, f"{len(p.value)} values, the gold has one")
        return _cmp_number(g, p, kind)
    if kind == "expression":
        if p.kind in ("expression",) + _NUMERIC and p.kind != "percent":
            return _cmp_expr(g.value, p.value, kind)
        return Decision("different", kind, False, f"an expression against a {p.kind}")
    return Decision("unknown", kind, False, f"no comparison for {kind}")


def _cmp_matrix(g: Ans, p: Ans, kind: str) -> Decision:
    grid = g.value
    flat = tuple(e for row in grid for e in row)
    if p.kind == "matrix":
        if (len(grid), len(grid[0])) != (len(p.value), len(p.value[0])):
            return Decision("different", kind, True, "different shapes")
        return _cmp_ordered(flat, tuple(e for row in p.value for e in row), kind)
    if p.kind == "tuple" and 1 in (len(grid), len(grid[0])) and len(p.value) == len(flat):
        d = _cmp_ordered(flat, p.value, kind)
        return Decision(d.verdict, kind, False, d.why + " (a vector written as a tuple)")
    return Decision("different", kind, False, f"a matrix against a {p.kind}")


def compare_answers(gold: str, pred: str) -> Decision:
    """Typed comparison of a gold answer and a predicted one (strings as written)."""
    try:
        cg = clean(gold)
        if cg and cg == clean(pred):
            try:
                kind = recognise(gold).kind
            except ValueError:
                kind = "text"
            return Decision("equal", kind, True, "same answer")
        try:
            g = recognise(gold)
        except ValueError as e:
            return Decision("unknown", "unrecognised", False, f"gold: {e}")
        try:
            p = _recognise_pred(pred, g)
        except ValueError as e:
            return Decision("unknown", g.kind, False, f"answer: {e}")
        try:
            return _compare(g, p)
        except _Unsupported as e:
            return Decision("unknown", g.kind, False, str(e))
    except (RecursionError, MemoryError, OverflowError, ZeroDivisionError) as e:
        return Decision("unknown", "unrecognised", False, type(e).__name__)
    except Exception as e:  # noqa: BLE001 - sympy's many internal errors must not sink a batch
        if type(e).__name__ == "TimeoutException":
            raise
        return Decision("unknown", "unrecognised", False, f"{type(e).__name__}: {str(e)[:80]}")


__all__ = ["KINDS", "Ans", "Decision", "clean", "compare_answers", "recognise"]
