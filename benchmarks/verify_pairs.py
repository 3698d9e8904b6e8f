"""Typed answer comparison against plain math-verify, side by side in one run; prints JSON.

1. The hard-pair corpus ``tests/data/math_pairs.jsonl`` (pairs from math-verify's issue tracker
   and the answer families of issue 16, each with its expected verdict): per family, the number
   of pairs, of equivalent forms accepted (expected ``correct``, verdict ``correct``) and of wrong
   answers accepted (expected ``incorrect``, verdict ``correct``), for plain math-verify
   (``check_math_plain``: the same extraction, math-verify alone) and for tracepipe
   (``check_math``: math-verify + the typed comparison), plus how many pairs tracepipe leaves
   ``ambiguous`` for a judge.
2. Self-verification of the gold answers: MATH-500 and GSM8K reference solutions replayed as
   responses against their own gold, for both; the rate of ``correct`` and the time per item.
3. The same solutions with a wrong answer substituted (one variant per item, as in
   tests/test_verify_math.py): the rate of ``incorrect`` and the time per item.

Both checkers run in this process, one item after the other (the two interleaved, so that a
busy machine slows both alike), with every per-answer parse cache (math-verify's and tracepipe's)
and sympy's cache emptied before each call, and the order of the two alternating: the times are
those of an answer seen for the first time.

Usage: ``python benchmarks/verify_pairs.py [--gold-limit N]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "tests" / "data" / "math_pairs.jsonl"


def _cold() -> None:
    """Empty the per-answer caches (math-verify's parser caches, tracepipe's parse caches), so
    that neither checker profits from the other having just parsed the same strings."""
    from math_verify import parser as mvp
    from sympy.core.cache import clear_cache

    from tracepipe.verifiers import answers
    from tracepipe.verifiers import math as vm

    vm._gold_parsed.cache_clear()
    answers._parse_leaf.cache_clear()
    for fn in (mvp.parse_latex_cached, mvp.parse_expr_cached, mvp.extract_latex):
        fn.cache_clear()
    clear_cache()  # sympy's own


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    _cold()
    t0 = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t0


def pairs_table() -> dict[str, Any]:
    from tracepipe.verifiers.math import check_math, check_math_plain

    with open(CORPUS) as fh:
        pairs = [json.loads(line) for line in fh if line.strip()]
    fams: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    secs = {"mv": 0.0, "tp": 0.0}
    total: dict[str, int] = defaultdict(int)
    for i, p in enumerate(pairs):
        resp = "So the answer is $\\boxed{" + p["pred"] + "}$."
        if i % 2:  # which one runs first alternates
            mv, t_mv = _timed(check_math_plain, resp, p["gold"])
            tp, t_tp = _timed(check_math, resp, p["gold"])
        else:
            tp, t_tp = _timed(check_math, resp, p["gold"])
            mv, t_mv = _timed(check_math_plain, resp, p["gold"])
        secs["mv"] += t_mv
        secs["tp"] += t_tp
        for row in (fams[p["family"]], total):
            row["pairs"] += 1
            row[f"expected_{p['expected']}"] += 1
            if p["expected"] == "correct":
                row["accepted_correct_mv"] += mv.verdict == "correct"
                row["accepted_correct_tp"] += tp.verdict == "correct"
            else:
                row["wrongly_accepted_mv"] += mv.verdict == "correct"
                row["wrongly_accepted_tp"] += tp.verdict == "correct"
            row["ambiguous_tp"] += tp.detail.startswith("ambiguous:")
    keys = ["pairs", "expected_correct", "expected_incorrect", "accepted_correct_mv", "accepted_correct_tp",
            "wrongly_accepted_mv", "wrongly_accepted_tp", "ambiguous_tp"]
    return {
        "families": {f: {k: r[k] for k in keys} for f, r in sorted(fams.items())},
        "total": {k: total[k] for k in keys},
        "tracker_pairs": sum(p["source"] != "tracepipe" for p in pairs),
        "ms_per_pair_mv": 1000 * secs["mv"] / len(pairs), "ms_per_pair_tp": 1000 * secs["tp"] / len(pairs),
    }


def gold_selfcheck(limit: int | None, wrong: bool = False) -> dict[str, Any]:
    """Reference solutions against their own gold (``wrong``: with a wrong answer substituted,
    one variant per item as in tests/test_verify_math.py; then the rate of ``incorrect``)."""
    from tests.fixtures.verify_data import (
        gsm8k_items,
        math500_items,
        with_wrong_boxed,
        with_wrong_gsm8k,
        wrong_answer,
    )
    from tracepipe.verifiers.math import check_math, check_math_plain

    out: dict[str, Any] = {}
    want = "incorrect" if wrong else "correct"
    for name, items, subst in (("math500", math500_items(), with_wrong_boxed), ("gsm8k", gsm8k_items(), with_wrong_gsm8k)):
        items = items[:limit] if limit else items
        if wrong:
            items = [{**it, "response": subst(it["response"], wrong_answer(it["answer"], i)[0])} for i, it in enumerate(items)]
        ok = {"mv": 0, "tp": 0}
        secs = {"mv": 0.0, "tp": 0.0}
        amb = 0
        for i, it in enumerate(items):
            if i % 2:  # which one runs first alternates
                mv, t_mv = _timed(check_math_plain, it["response"], it["answer"])
                tp, t_tp = _timed(check_math, it["response"], it["answer"])
            else:
                tp, t_tp = _timed(check_math, it["response"], it["answer"])
                mv, t_mv = _timed(check_math_plain, it["response"], it["answer"])
            ok["mv"] += mv.verdict == want
            ok["tp"] += tp.verdict == want
            secs["mv"] += t_mv
            secs["tp"] += t_tp
            amb += tp.detail.startswith("ambiguous:")
        n = len(items)
        out[name] = {
            "items": n,
            f"{want}_rate_mv": ok["mv"] / n, f"{want}_rate_tp": ok["tp"] / n, "ambiguous_tp": amb,
            "ms_per_item_mv": 1000 * secs["mv"] / n, "ms_per_item_tp": 1000 * secs["tp"] / n,
        }
    return out


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gold-limit", type=int, default=None, help="first N items of MATH-500 / GSM8K (default: all)")
    args = ap.parse_args()
    from tracepipe.verifiers.math import check_math

    check_math("\\boxed{1}", "1")  # imports and parser warm-up outside the timings
    t0 = time.perf_counter()
    report = {"pairs": pairs_table(), "gold_selfcheck": gold_selfcheck(args.gold_limit),
              "wrong_answers": gold_selfcheck(args.gold_limit, wrong=True)}
    report["wall_s"] = time.perf_counter() - t0
    print(json.dumps(_rounded(report), indent=2))


if __name__ == "__main__":
    main()
