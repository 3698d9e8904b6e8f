"""Math verification on real data: MATH-500 and GSM8K reference solutions replayed as responses.

Every reference solution must verify against its own gold answer, and the same solutions with a
wrong answer substituted (first number + 1, a different fraction, a sign flip) must not.
The supervised workers must survive a hang that SIGALRM cannot interrupt.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.fixtures.verify_data import (
    gsm8k_items,
    math500_items,
    with_wrong_boxed,
    with_wrong_gsm8k,
    wrong_answer,
)
from tracepipe.verifiers.math import MathChecker, check_math, extract_answer, last_boxed


@pytest.fixture(scope="module")
def checker():
    with MathChecker(workers=2) as mc:
        yield mc


def _report(items, results, want):
    bad = [(it["id"], it["answer"], r.pred_answer, r.verdict, r.detail) for it, r in zip(items, results) if r.verdict != want]
    for b in bad:
        print("EXCEPTION", b)
    return bad


def test_math500_reference_solutions_verify(checker):
    items = math500_items()
    assert len(items) == 500
    results = checker.check([(it["response"], it["answer"]) for it in items])
    bad = _report(items, results, "correct")
    print("MATH-500:", Counter(r.verdict for r in results))
    assert len(bad) <= 5  # >= 99% (measured: 500 / 500)
    assert all(r.pred_answer for r in results)


def test_gsm8k_reference_solutions_verify(checker):
    items = gsm8k_items()
    assert len(items) == 1319
    results = checker.check([(it["response"], it["answer"]) for it in items])
    bad = _report(items, results, "correct")
    print("GSM8K:", Counter(r.verdict for r in results))
    assert len(bad) <= 6  # >= 99.5% (measured: 1319 / 1319)
    assert Counter(r.detail for r in results).most_common(1)[0][0] == "equal (gsm8k)"


def test_wrong_answers_are_incorrect(checker):
    """Each solution with each of the three kinds of wrong answer: false positives <= 0.5%."""
    items, variants = [], []
    for it in math500_items():
        for k in range(3):
            w, kind = wrong_answer(it["answer"], k)
            items.append((with_wrong_boxed(it["response"], w), it["answer"]))
            variants.append((it["id"], it["answer"], w, kind))
    for it in gsm8k_items():
        for k in range(3):
            w, kind = wrong_answer(it["answer"], k)
            items.append((with_wrong_gsm8k(it["response"], w), it["answer"]))
            variants.append((it["id"], it["answer"], w, kind))
    results = checker.check(items)
    fp = [(v, r.detail) for v, r in zip(variants, results) if r.verdict == "correct"]
    for f in fp:
        print("FALSE POSITIVE", f)
    print("wrong-answer verdicts:", Counter(r.verdict for r in results), "kinds:", Counter(v[3] for v in variants))
    assert len(results) == 3 * (500 + 1319)
    assert len(fp) <= 0.005 * len(results)  # measured: 0
    assert sum(r.verdict == "incorrect" for r in results) >= 0.99 * len(results)


@pytest.mark.parametrize(
    ("text", "want", "how"),
    [
        ("so the area is $\\boxed{\\frac{14}{3}}$.", "\\frac{14}{3}", "boxed"),
        ("first \\boxed{1} then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)", "boxed"),
        ("It is \\boxed 5.", "5", "boxed"),
        ("She pays 3 * 6 = <<3*6=18>>18\n#### 18", "18", "gsm8k"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", "final_answer"),
        ("**Final answer:** 42", "42", "final_answer"),
        ("The final answer is 18 dollars.", "18", "final_answer"),
        ("So the answer is 3.5.", "3.5", "answer_is"),
        ("Answer: \\(x = 5\\)", "x = 5", "answer_is"),
        ("I computed 12 and then 13 but I am not sure", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text, want, how):
    assert extract_answer(text) == (want, how)


def test_last_number_fallback_is_opt_in():
    assert extract_answer("12 apples and 13 pears")[0] is None
    assert extract_answer("12 apples and 13 pears", last_number=True) == ("13", "last_number")


def test_last_boxed_balanced():
    assert last_boxed("\\boxed{\\frac{a}{\\sqrt{2}}} x") == "\\frac{a}{\\sqrt{2}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{unclosed") is None


def test_verdicts_in_process():
    assert check_math("\\boxed{\\frac12}", "0.5").verdict == "correct"
    assert check_math("\\boxed{1,000}", "1000").verdict == "correct"
    r = check_math("no answer here", "3")
    assert (r.verdict, r.pred_answer, r.detail) == ("incorrect", None, "no answer found")
    assert check_math("\\boxed{3}", None).verdict == "unverifiable"
    assert check_math("\\boxed{3}", "  ").verdict == "unverifiable"
    # math-verify drops base subscripts; a different base must not compare equal
    assert check_math("\\boxed{52_9}", "52_8").verdict == "incorrect"
    assert check_math("\\boxed{52_8}", "52_8").verdict == "correct"


def test_unparseable_gold_is_unverifiable():
    r = check_math("\\boxed{3}", "\\begin{tabular}")
    assert r.verdict == "unverifiable", r


def test_math_verify_timeout_is_error_not_incorrect():
    """A comparison math-verify gives up on (its own SIGALRM timeout) is `error`, in a worker."""
    with MathChecker(timeout_s=1, hard_timeout_s=30) as mc:
        res = mc.check([("\\boxed{9^{9^{9^{9}}}}", "2"), ("\\boxed{2}", "2")])
    assert res[0].verdict == "error" and "timeout" in res[0].detail, res[0]
    assert res[1].verdict == "correct"


def test_hard_timeout_kills_stuck_worker_and_keeps_the_batch():
    """A hang SIGALRM cannot interrupt (alarm ignored, stuck in a sleep) and a worker that dies:
    both get `error`, every other item of the batch is verified, and in order."""
    items = [("\\boxed{1}", "1"), ("HANG", "1"), ("\\boxed{2}", "1"), ("DIE", "1"), ("\\boxed{3}", "3"), ("\\boxed{4}", "4")]
    with MathChecker(hard_timeout_s=2, target="tests.fixtures.verify_data:misbehaving_check_item") as mc:
        res = mc.check(items)
        assert mc.supervisor.timeouts == 1
        assert mc.supervisor.restarts == 2
    assert [r.verdict for r in res] == ["correct", "error", "incorrect", "error", "correct", "correct"]
    assert res[1].detail.startswith("timeout")
    assert res[3].detail.startswith("worker died")


def test_hard_timeout_with_two_workers():
    items = [("HANG", "1")] + [(f"\\boxed{{{i}}}", str(i)) for i in range(20)]
    with MathChecker(hard_timeout_s=2, workers=2, target="tests.fixtures.verify_data:misbehaving_check_item") as mc:
        res = mc.check(items)
    assert res[0].verdict == "error"
    assert all(r.verdict == "correct" for r in res[1:])
