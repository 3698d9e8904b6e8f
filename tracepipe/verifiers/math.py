"""Math verification: extract the final answer from a response, compare it with the gold answer.

Extraction (:func:`extract_answer`), first hit wins:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` too);
2. the last GSM8K-style ``#### N`` line;
3. the last "final answer is X" / "Final Answer: X" phrase;
4. the last "the answer is X" / "Answer: X" phrase;
5. (only with ``last_number=True``) the last number in the text.

Comparison uses math-verify (``parse`` + ``verify``) on both sides wrapped in ``\\boxed{}``; an
answer counts as parsed only when math-verify turns it into a SymPy object (no string fallback).
On top of it runs the typed comparison of :mod:`tracepipe.verifiers.answers` (the kind of each
answer, compared within the kind, exact where both sides are exact), and the two must agree:

- both equal -> ``correct`` (``equal (<how>)``); both not equal -> ``incorrect``;
- they disagree -> ``unverifiable`` with ``ambiguous: math-verify=<v> typed=<v> (<kind>...)``
  (``typed=unknown`` when the typed comparison cannot decide), never ``correct``: a judge stage
  (``when: unverifiable``) can decide those rows. One exception, where math-verify is known to
  miss equivalent forms: a *sure* typed ``equal`` (exact arithmetic or a proof; not a tolerance,
  numeric sampling or words) in the kinds of :data:`OVERRIDE_KINDS` (mixed numbers, percentages,
  plus-minus, equations, intervals / inequalities, sets, tuples, radicals, choice letters, text)
  is ``correct`` with detail ``equal: typed <kind> (math-verify=incorrect) (<how>)``;
- math-verify cannot parse one side: a sure typed decision is used (``equal: typed <kind>
  (math-verify cannot parse the gold)`` ...), else the old verdicts stand.

Verdicts: ``correct``, ``incorrect`` (wrong, no answer, or an answer that does not parse),
``unverifiable`` (no gold answer, the gold answer does not parse, or ``ambiguous``) and ``error``
(math-verify timed out or failed).

math-verify interrupts itself with SIGALRM, which only works in a process's main thread and not
inside long C calls, so :class:`MathChecker` runs it in supervised worker processes
(:mod:`tracepipe.verifiers._supervisor`) with a hard per-item wall timeout: a stuck worker is
killed, that item gets ``error`` / ``timeout``, and the rest of the batch goes on in a fresh worker.
"""

from __future__ import annotations

import re
import signal
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from tracepipe.verifiers._supervisor import Supervisor
from tracepipe.verifiers.answers import Decision, compare_answers

# -- extraction ------------------------------------------------------------------------------
_FINAL = re.compile(
    r"(?:final\s+answer|final\s+result)\s*(?:is|=|:|would\s+be|will\s+be)?\s*[:\-]?\s*(?P<a>[^\n]+)", re.IGNORECASE
)
_ANSWER = re.compile(r"(?:\bthe\s+answer\s+is|\banswer\s*[:=])\s*[:\-]?\s*(?P<a>[^\n]+)", re.IGNORECASE)
_GSM8K = re.compile(r"^[ \t]*####[ \t]*(?P<a>[^\n]+?)[ \t]*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BASE = re.compile(r"^\s*([0-9A-Za-z]+)_\{?(\d+)\}?\s*$")  # 52_8, 4210_{5}
_UNIT_TAIL = re.compile(r"^(?P<n>[-+]?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?)\s*%?\s*[A-Za-z][A-Za-z .']*$")


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or ``\\boxed X``."""
    if not text:
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    j = idx + (6 if text.startswith("\\boxed", idx) else 5)
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] != "{":  # \boxed 5
        m = re.match(r"[^\s$]+", text[j:])
        return (m.group(0).rstrip(".,;") or None) if m else None
    depth = 0
    for k in range(j, len(text)):
        ch = text[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k].strip()
    return None


def _clean_phrase(s: str) -> str:
    """Trim what follows an answer phrase to the answer itself."""
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        b = last_boxed(s)
        if b:
            return b
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(opener):
            end = s.find(closer, len(opener))
            if end > 0:
                return s[len(opener) : end].strip()
    s = re.sub(r"\*\*|__", "", s).strip()
    s = re.split(r"\.(?=\s|$)", s)[0].strip()  # end of the sentence (a decimal point is kept)
    s = s.rstrip(".;,!").strip()
    m = _UNIT_TAIL.match(s)
    if m and "\\" not in s:
        s = m.group("n").replace("$", "").strip()
    if _THOUSANDS.fullmatch(s):  # 1,450,000 -> 1450000 (as the gsm8k answer format stores gold)
        s = s.replace(",", "")
    return s


def extract_answer(text: str | None, last_number: bool = False) -> tuple[str | None, str]:
    """The predicted final answer and how it was found (``boxed``, ``gsm8k``, ``final_answer``,
    ``answer_is``, ``last_number`` or ``none``)."""
    if not text:
        return None, "none"
    b = last_boxed(text)
    if b:
        return b, "boxed"
    m = list(_GSM8K.finditer(text))
    if m:
        ans = m[-1].group("a").strip()
        if ans:
            return _clean_phrase(ans) or ans, "gsm8k"
    for rx, how in ((_FINAL, "final_answer"), (_ANSWER, "answer_is")):
        hits = list(rx.finditer(text))
        for h in reversed(hits):
            raw = h.group("a")
            inner = rx.search(raw)
            while inner:  # "Final Answer: The final answer is $x$." -> the innermost phrase
                raw = inner.group("a")
                inner = rx.search(raw)
            ans = _clean_phrase(raw)
            if ans:
                return ans, how
    if last_number:
        nums = _NUMBER.findall(text)
        if nums:
            return nums[-1].replace(",", ""), "last_number"
    return None, "none"


# -- comparison (runs in a worker process's main thread) -------------------------------------
@dataclass
class MathResult:
    pred_answer: str | None
    verdict: str  # correct | incorrect | unverifiable | error
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MV:
    """math-verify, imported on first use (it pulls in sympy) and then bound once."""

    parse: Any = None
    verify: Any = None
    Timeout: Any = None
    configs: list[Any] = []

    @classmethod
    def load(cls) -> type[_MV]:
        if cls.parse is None:
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
            from math_verify.errors import TimeoutException

            cls.configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
            cls.verify, cls.Timeout, cls.parse = verify, TimeoutException, parse
        return cls


def _configs() -> list[Any]:
    return _MV.load().configs


def _wrap(ans: str) -> str:
    return ans if ("\\boxed" in ans or "\\fbox" in ans) else "\\boxed{" + ans + "}"


def parse_answer(ans: str, timeout_s: int = 5) -> list[Any]:
    """math-verify's parse of one answer string (empty list when it does not parse)."""
    mv = _MV.load()
    return mv.parse(_wrap(ans), extraction_config=mv.configs, parsing_timeout=timeout_s, raise_on_error=False)


def _parse_strict(ans: str, timeout_s: int) -> list[Any]:
    mv = _MV.load()
    try:
        return mv.parse(_wrap(ans), extraction_config=mv.configs, fallback_mode="no_fallback", parsing_timeout=timeout_s, raise_on_error=True)
    except mv.Timeout:
        raise
    except Exception:  # noqa: BLE001 - an answer that does not parse
        return []


@lru_cache(maxsize=4096)
def _gold_parsed(gold: str, timeout_s: int) -> tuple[Any, ...]:
    return tuple(_parse_strict(gold, timeout_s))


def _verify_pairs(gold: tuple[Any, ...], pred: list[Any], timeout_s: int) -> bool:
    """``verify`` pair by pair so that a timeout is told apart from 'not equal'."""
    mv = _MV.load()
    timed_out = False
    for g in gold:
        for p in pred:
            try:
                if mv.verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                    return True
            except mv.Timeout:
                timed_out = True
            except Exception:  # noqa: BLE001 - incomparable pair
                continue
    if timed_out:
        raise TimeoutError("math-verify comparison timed out")
    return False


# Kinds where math-verify is known to reject equivalent forms (mixed numbers written plainly,
# percentages without the sign, ``\\pm``, equations rearranged, inequalities against interval
# notation, reordered sets, radicals it cannot simplify, repeating decimals, letters and words) and
# where a *sure* typed ``equal`` is exact arithmetic on numbers read by strict patterns, or set /
# algebraic identity: here it wins over math-verify's ``not equal``. Not for ``expression``,
# ``matrix`` and ``sequence``, where the typed parse is math-verify's own and a disagreement more
# likely means a misread: there, as everywhere else, a disagreement is ``ambiguous``.
OVERRIDE_KINDS = frozenset({"integer", "rational", "decimal", "mixed_number", "percent", "constant", "plus_minus",
                            "equation", "interval", "set", "tuple", "choice", "text"})


def typed_compare(gold: str, pred: str, timeout_s: int = 5) -> Decision:
    """:func:`~tracepipe.verifiers.answers.compare_answers` under a ``timeout_s`` SIGALRM budget
    (in the main thread; elsewhere without one, the worker's hard timeout still applies)."""
    if threading.current_thread() is not threading.main_thread() or timeout_s <= 0:
        return compare_answers(gold, pred)
    TimeoutException = _MV.load().Timeout  # noqa: N806

    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutException("typed comparison timed out")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout_s))
    try:
        return compare_answers(gold, pred)
    except TimeoutException:
        return Decision("unknown", "unrecognised", False, "timeout")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _kind(t: Decision) -> str:
    return f"{t.kind}: {t.why}" if t.why else t.kind


def _combine(pred: str, how: str, mv_equal: bool, t: Decision) -> MathResult:
    """The verdict when both math-verify and the typed comparison ran (see the module doc)."""
    if mv_equal:
        if t.verdict == "equal":
            return MathResult(pred, "correct", f"equal ({how})")
        typed = "incorrect" if t.verdict == "different" else "unknown"
        return MathResult(pred, "unverifiable", f"ambiguous: math-verify=correct typed={typed} ({_kind(t)})")
    if t.verdict == "equal":
        if t.sure and t.kind in OVERRIDE_KINDS:
            return MathResult(pred, "correct", f"equal: typed {t.kind} (math-verify=incorrect) ({how})")
        return MathResult(pred, "unverifiable", f"ambiguous: math-verify=incorrect typed=correct ({_kind(t)})")
    return MathResult(pred, "incorrect", f"not equal ({how})")


def check_math(
    response: str | None, gold: str | None, *, timeout_s: int = 5, last_number: bool = False,
) -> MathResult:
    """Verdict for one response against one gold answer, in this process (main thread only)."""
    TimeoutException = _MV.load().Timeout  # noqa: N806

    pred, how = extract_answer(response, last_number)
    if gold is None or not str(gold).strip():
        return MathResult(pred, "unverifiable", "no gold answer")
    gold_s = str(gold).strip()
    try:
        g = _gold_parsed(gold_s, timeout_s)
    except TimeoutException:
        return MathResult(pred, "error", "timeout: parsing the gold answer")
    if not g:
        if pred is not None:
            t = typed_compare(gold_s, pred, timeout_s)
            if t.sure and t.verdict != "unknown":
                ok = t.verdict == "equal"
                return MathResult(pred, "correct" if ok else "incorrect",
                                  f"{'equal' if ok else 'not equal'}: typed {t.kind} (math-verify cannot parse the gold) ({how})")
        return MathResult(pred, "unverifiable", "gold answer cannot be parsed")
    if pred is None:
        return MathResult(None, "incorrect", "no answer found")
    try:
        p = _parse_strict(pred, timeout_s)
    except TimeoutException:
        return MathResult(pred, "error", "timeout: parsing the answer")
    bg, bp = _BASE.match(gold_s), _BASE.match(pred)
    if bg and bp and (bg.group(1), bg.group(2)) != (bp.group(1), bp.group(2)):
        # math-verify drops subscripts: 52_8 and 52_9 would compare equal
        return MathResult(pred, "incorrect", f"not equal: different numeral or base ({how})")
    if not p:
        t = typed_compare(gold_s, pred, timeout_s)
        if t.verdict == "equal" and t.sure:
            return MathResult(pred, "correct", f"equal: typed {t.kind} (math-verify cannot parse the answer) ({how})")
        return MathResult(pred, "incorrect", f"answer does not parse ({how})")
    try:
        ok = _verify_pairs(g, p, timeout_s)
    except (TimeoutException, TimeoutError):
        return MathResult(pred, "error", "timeout: math-verify comparison")
    return _combine(pred, how, ok, typed_compare(gold_s, pred, timeout_s))


def check_math_plain(response: str | None, gold: str | None, *, timeout_s: int = 5, last_number: bool = False) -> MathResult:
    """math-verify alone (the verdicts before the typed comparison): the baseline of the tests and
    ``benchmarks/verify_pairs.py``."""
    TimeoutException = _MV.load().Timeout  # noqa: N806

    pred, how = extract_answer(response, last_number)
    if gold is None or not str(gold).strip():
        return MathResult(pred, "unverifiable", "no gold answer")
    try:
        g = _gold_parsed(str(gold).strip(), timeout_s)
        if not g:
            return MathResult(pred, "unverifiable", "gold answer cannot be parsed")
        if pred is None:
            return MathResult(None, "incorrect", "no answer found")
        p = _parse_strict(pred, timeout_s)
        if not p:
            return MathResult(pred, "incorrect", f"answer does not parse ({how})")
        ok = _verify_pairs(g, p, timeout_s)
    except (TimeoutException, TimeoutError):
        return MathResult(pred, "error", "timeout")
    return MathResult(pred, "correct" if ok else "incorrect", f"{'equal' if ok else 'not equal'} ({how})")


def check_item(response: str | None, gold: str | None, timeout_s: int, last_number: bool) -> tuple[str | None, str, str]:
    """Worker entry point: :func:`check_math` as a plain tuple (cheap to send back)."""
    r = check_math(response, gold, timeout_s=timeout_s, last_number=last_number)
    return r.pred_answer, r.verdict, r.detail


# -- supervised workers ----------------------------------------------------------------------
class MathChecker:
    """Checks many (response, gold) pairs in ``workers`` supervised processes.

    Each item gets ``hard_timeout_s`` of wall time in its worker; past that the worker is killed
    (SIGKILL, so even a hang inside C code ends), the item gets ``error`` with detail
    ``timeout``, and the remaining items go on in a fresh worker.
    """

    def __init__(
        self, *, timeout_s: int = 5, hard_timeout_s: float = 30.0, last_number: bool = False,
        workers: int = 1, memory_mb: int | None = 4096, target: str = "tracepipe.verifiers.math:check_item",
    ) -> None:
        self.timeout_s = int(timeout_s)
        self.last_number = last_number
        self.supervisor = Supervisor(
            target, workers=workers, item_timeout_s=hard_timeout_s, memory_mb=memory_mb,
            preload=["tracepipe.verifiers.math", "tracepipe.verifiers.answers", "math_verify", "sympy"],
        )

    def check(self, items: list[tuple[str | None, str | None]]) -> list[MathResult]:
        """One result per (response, gold) pair, in order."""
        args = [(resp, gold, self.timeout_s, self.last_number) for resp, gold in items]
        out: list[MathResult] = []
        for (resp, _gold), (status, value) in zip(items, self.supervisor.map(args)):
            if status == "ok":
                out.append(MathResult(*value))
            else:
                pred, _how = extract_answer(resp, self.last_number)
                out.append(MathResult(pred, "error", value))
        return out

    def close(self) -> None:
        self.supervisor.close()

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()


__all__ = ["OVERRIDE_KINDS", "MathChecker", "MathResult", "check_item", "check_math", "check_math_plain", "extract_answer",
           "last_boxed", "parse_answer", "typed_compare"]
