"""Deterministic near-duplicate variants of problems, for measuring dedup and decontamination.

Used by the tests and ``benchmarks/dedup.py`` to plant known duplicates into real data (GSM8K
train) and measure precision and recall. Kinds:

- ``exact``: the same text;
- ``format``: case, whitespace and punctuation changed (the words and numbers stay);
- ``reword``: phrases rewritten with synonyms and the first two statements swapped; every number
  stays (a rewording, so a true duplicate);
- ``numbers``: the same words with every number changed: a *different* problem (hard negative);
- ``wrapped``: extra leading and trailing text around the item (decontamination);
- ``respaced``: LaTeX and whitespace re-spaced (``x^2`` -> ``x^{2}``, ``\\frac`` -> ``\\dfrac``,
  spaces around operators, ``\\,``), nothing else (decontamination).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import polars as pl

DUP_KINDS = ("exact", "format", "reword")
CONTAM_KINDS = ("verbatim", "wrapped", "respaced", "reword")

_SYNONYMS: list[tuple[str, str]] = [
    (r"\bHow many\b", "What number of"),
    (r"\bhow many\b", "what number of"),
    (r"\bHow much money\b", "What amount of money"),
    (r"\bbought\b", "purchased"),
    (r"\bbuys\b", "purchases"),
    (r"\bbuy\b", "purchase"),
    (r"\bwants to\b", "would like to"),
    (r"\bwant to\b", "would like to"),
    (r"\bneeds to\b", "has to"),
    (r"\bgave\b", "handed"),
    (r"\bgives\b", "hands"),
    (r"\baltogether\b", "in total"),
    (r"\bin total\b", "altogether"),
    (r"\beach\b", "every"),
    (r"\bIf\b", "Suppose"),
    (r"\bstarted\b", "began"),
    (r"\bstarts\b", "begins"),
    (r"\bfinds\b", "discovers"),
    (r"\bfound\b", "discovered"),
    (r"\bbig\b", "large"),
    (r"\bsmall\b", "little"),
    (r"\bquickly\b", "fast"),
    (r"\bmakes\b", "produces"),
    (r"\bmade\b", "produced"),
    (r"\bearns\b", "makes"),
    (r"\bearned\b", "made"),
    (r"\btotal\b", "overall"),
    (r"\bhas\b", "owns"),
    (r"\bhad\b", "owned"),
    (r"\bthen\b", "after that"),
    (r"\bcosts\b", "is priced at"),
    (r"\bcost\b", "price"),
    (r"\bHow long\b", "How much time"),
    (r"\bwill\b", "is going to"),
    (r"\bFind\b", "Determine"),
    (r"\bDetermine\b", "Find"),
    (r"\bCompute\b", "Calculate"),
    (r"\bCalculate\b", "Compute"),
    (r"\bEvaluate\b", "Compute the value of"),
    (r"\bSimplify\b", "Reduce"),
    (r"\bWhat is\b", "Find"),
    (r"\bDefine\b", "Let"),
    (r"\bLet\b", "Suppose"),
    (r"\bExpress\b", "Write"),
    (r"\bthe number of\b", "the count of"),
    (r"\bsuch that\b", "so that"),
    (r"\bthere are\b", "there exist"),
    (r"\bthe sum of\b", "the total of"),
    (r"\bsmallest\b", "least"),
    (r"\blargest\b", "greatest"),
    (r"\bpositive integers\b", "positive whole numbers"),
    (r"\bprobability\b", "chance"),
    (r"\bReturn\b", "Give back"),
    (r"\bGiven\b", "For"),
    (r"\breturn\b", "give back"),
]
_WRAP_PRE = [
    "Solve the following problem.", "Here is a question for you:", "Problem:", "Please answer carefully.",
    "Consider this exercise from a practice sheet.", "Question 7.", "Try this one:",
]
_WRAP_POST = [
    "Show your reasoning step by step.", "Give only the final answer.", "Put the answer in a box.",
    "Explain your answer.", "Answer:", "Think carefully before answering.",
]
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z$])")
_NUM = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def _format(text: str, rng: random.Random) -> str:
    ops = rng.sample(["upper", "lower", "title", "spaces", "newlines", "nopunct", "punct"], k=3)
    t = text
    for op in ops:
        if op == "upper":
            t = t.upper()
        elif op == "lower":
            t = t.lower()
        elif op == "title":
            t = t.title()
        elif op == "spaces":
            t = re.sub(r" ", lambda m: "  " if rng.random() < 0.3 else " ", t)
        elif op == "newlines":
            t = _SENT.sub("\n", t)
        elif op == "nopunct":
            t = re.sub(r"[,;:!?]", "", t)
        elif op == "punct":
            t = re.sub(r"([.?])\s*$", r"\1\1", t.strip()) + " "
    return t


def _reword(text: str, rng: random.Random) -> str:
    t = text
    subs = [s for s in _SYNONYMS if re.search(s[0], t) and s[0] != rf"\b{s[1]}\b"]
    rng.shuffle(subs)
    for pat, rep in subs[: max(2, len(subs) * 2 // 3)]:
        t = re.sub(pat, rep, t)
    sents = _SENT.split(t)
    if len(sents) >= 3:  # swap the first two statements (the question stays last)
        sents[0], sents[1] = sents[1], sents[0]
        t = " ".join(sents)
    return t


def _numbers(text: str, rng: random.Random) -> str:
    def repl(m: re.Match[str]) -> str:
        v = m.group(0)
        if "." in v:
            return f"{float(v) + rng.randint(1, 9) / 2:g}"
        return str(int(v) + rng.randint(1, 9) * (1 if int(v) < 10 else max(1, int(v) // 10)))

    return _NUM.sub(repl, text)


def _respace(text: str, rng: random.Random) -> str:
    t = re.sub(r"\\frac(?=\{)", r"\\dfrac", text)
    t = re.sub(r"\^(\w)", r"^{\1}", t)
    t = re.sub(r"\s*([=+\-<>])\s*", lambda m: f" {m.group(1)} " if rng.random() < 0.7 else m.group(1), t)
    t = re.sub(r"\$(\S)", r"$ \1", t)
    t = re.sub(r"(\d)\s*\\cdot\s*(\d)", r"\1 \\cdot \2", t)
    t = re.sub(r"\$ ([a-z])", r"$\\,\1", t, count=1)
    t = t.replace(". ", ".  ").replace(", ", " , ", 1)
    return t


def _wrap(text: str, rng: random.Random) -> str:
    return f"{rng.choice(_WRAP_PRE)} {text.strip()} {rng.choice(_WRAP_POST)}"


_FUNCS = {
    "exact": lambda t, r: t,
    "verbatim": lambda t, r: t,
    "format": _format,
    "reword": _reword,
    "numbers": _numbers,
    "respaced": _respace,
    "wrapped": _wrap,
}


def variant(text: str, kind: str, rng: random.Random) -> str:
    """One variant of ``text`` of the given kind."""
    return _FUNCS[kind](text, rng)


def _changed_variant(text: str, kind: str, rng: random.Random) -> str:
    """A variant that differs from ``text`` (kinds other than exact copies), else the best try."""
    v = variant(text, kind, rng)
    for _ in range(3):
        if v != text or kind in ("exact", "verbatim"):
            break
        v = variant(text, kind, rng)
    return v


def plant_duplicates(
    texts: Sequence[str], per_kind: int, kinds: Sequence[str] = (*DUP_KINDS, "numbers"), seed: int = 0,
) -> pl.DataFrame:
    """``texts`` followed by planted variants of ``per_kind`` randomly chosen texts per kind.

    Columns: ``problem``, ``group`` (index of the original; a ``numbers`` variant gets a group of
    its own, since it is a different problem), ``kind`` (``original`` or the variant kind),
    ``orig`` (index of the text it was made from).
    """
    rng = random.Random(seed)
    rows: list[tuple[str, int, str, int]] = [(t, i, "original", i) for i, t in enumerate(texts)]
    next_group = len(texts)
    with_digits = [i for i, t in enumerate(texts) if _NUM.search(t)]
    for kind in kinds:
        for i in rng.sample(with_digits if kind == "numbers" else range(len(texts)), per_kind):
            v = _changed_variant(texts[i], kind, rng)
            if kind == "numbers":
                rows.append((v, next_group, kind, i))
                next_group += 1
            else:
                rows.append((v, i, kind, i))
    return pl.DataFrame(rows, schema={"problem": pl.String, "group": pl.Int64, "kind": pl.String, "orig": pl.Int64}, orient="row")


def plant_benchmark_items(
    texts: Sequence[str], bench: pl.DataFrame, per_kind: int, kinds: Sequence[str] = CONTAM_KINDS, seed: int = 0,
) -> pl.DataFrame:
    """``texts`` (clean) followed by variants of ``per_kind`` benchmark items per kind.

    ``bench`` has ``benchmark``, ``id``, ``text`` (as from :func:`tracepipe.benchmarks_data.load_benchmarks`).
    Columns: ``problem``, ``kind`` (``clean`` or the plant kind), ``plant_benchmark``, ``plant_id``.
    """
    rng = random.Random(seed)
    rows: list[tuple[str, str, str | None, str | None]] = [(t, "clean", None, None) for t in texts]
    items = list(bench.iter_rows(named=True))
    for kind in kinds:
        for it in rng.sample(items, per_kind):
            rows.append((_changed_variant(it["text"], kind, rng), kind, it["benchmark"], it["id"]))
    return pl.DataFrame(rows, schema={"problem": pl.String, "kind": pl.String, "plant_benchmark": pl.String, "plant_id": pl.String}, orient="row")


def replicate(
    texts: Sequence[str], n_total: int, weights: dict[str, float] | None = None, seed: int = 0,
) -> pl.DataFrame:
    """``texts`` followed by perturbed replicas up to ``n_total`` rows (same columns as
    :func:`plant_duplicates`): each replica copies a random text with a kind drawn by ``weights``
    (default exact 0.2, format 0.3, reword 0.3, numbers 0.2)."""
    w = weights or {"exact": 0.2, "format": 0.3, "reword": 0.3, "numbers": 0.2}
    rng = random.Random(seed)
    kinds, probs = list(w), list(w.values())
    with_digits = [i for i, t in enumerate(texts) if _NUM.search(t)]
    rows: list[tuple[str, int, str, int]] = [(t, i, "original", i) for i, t in enumerate(texts)]
    next_group = len(texts)
    new_groups: dict[str, int] = {}  # a numbers variant made twice is one new problem
    while len(rows) < n_total:
        kind = rng.choices(kinds, probs)[0]
        i = rng.choice(with_digits) if kind == "numbers" else rng.randrange(len(texts))
        v = _changed_variant(texts[i], kind, rng)
        if kind == "numbers":
            if v not in new_groups:
                new_groups[v] = next_group
                next_group += 1
            rows.append((v, new_groups[v], kind, i))
        else:
            rows.append((v, i, kind, i))
    return pl.DataFrame(rows, schema={"problem": pl.String, "group": pl.Int64, "kind": pl.String, "orig": pl.Int64}, orient="row")
