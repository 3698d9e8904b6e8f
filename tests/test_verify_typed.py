"""Typed answer comparison on top of math-verify (tracepipe.verifiers.answers + verifiers.math).

The pair corpus (tests/data/math_pairs.jsonl) holds hard answer pairs with their mathematically
expected verdict: pairs from math-verify's own issue tracker (each citing its issue or pull
request) and pairs for every answer family of issue 16. Over the corpus: no wrong answer is ever
``correct``, and equivalent forms are accepted at least as often as by plain math-verify, both
measured here on the same pairs. Then unit tests of the kinds and of how the two are combined.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tracepipe.verifiers.answers import KINDS, clean, compare_answers, recognise
from tracepipe.verifiers.math import OVERRIDE_KINDS, MathChecker, check_math, check_math_plain, typed_compare

CORPUS = Path(__file__).parent / "data" / "math_pairs.jsonl"
TRACKER = re.compile(r"^https://github\.com/huggingface/Math-Verify/(issues|pull)/\d+$")


def _corpus() -> list[dict]:
    with open(CORPUS) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _response(pred: str) -> str:
    return "So the answer is $\\boxed{" + pred + "}$."


@pytest.fixture(scope="module")
def verdicts():
    """(pair, plain math-verify result, tracepipe result) for every pair; tracepipe through the
    supervised workers the verify stage uses."""
    pairs = _corpus()
    items = [(_response(p["pred"]), p["gold"]) for p in pairs]
    plain = [check_math_plain(r, g) for r, g in items]
    with MathChecker(workers=2) as mc:
        typed = mc.check(items)
    return list(zip(pairs, plain, typed))


def test_corpus_is_well_formed():
    pairs = _corpus()
    assert len(pairs) >= 80
    for p in pairs:
        assert set(p) >= {"gold", "pred", "expected", "family", "source"}, p
        assert p["expected"] in ("correct", "incorrect"), p
        assert p["source"] == "tracepipe" or TRACKER.match(p["source"]), p["source"]
    tracker = [p for p in pairs if p["source"] != "tracepipe"]
    assert len(tracker) >= 30
    assert len({p["source"] for p in tracker}) >= 15  # many distinct issues, not one
    fams = Counter(p["family"] for p in pairs)
    for fam in ("integer", "rational", "decimal", "expression", "equation", "interval", "set", "tuple", "choice",
                "text", "mixed_number", "plus_minus", "times", "percent", "constant"):
        assert fams[fam] >= 2, fam
    for fam in ("rational", "equation", "interval", "set", "percent", "mixed_number", "plus_minus", "decimal"):
        both = {p["expected"] for p in pairs if p["family"] == fam}
        assert both == {"correct", "incorrect"}, fam
    assert len({(p["gold"], p["pred"]) for p in pairs}) == len(pairs)


def test_no_wrong_answer_is_accepted(verdicts):
    wrong = [(p["gold"], p["pred"], t.detail) for p, _mv, t in verdicts if p["expected"] == "incorrect" and t.verdict == "correct"]
    assert wrong == []
    # and math-verify alone does accept some of them: the corpus tests something
    assert sum(p["expected"] == "incorrect" and mv.verdict == "correct" for p, mv, _t in verdicts) >= 8


def test_equivalent_forms_accepted_at_least_as_often_as_math_verify(verdicts):
    good = [(p, mv, t) for p, mv, t in verdicts if p["expected"] == "correct"]
    mv_ok = sum(mv.verdict == "correct" for _p, mv, _t in good)
    tp_ok = sum(t.verdict == "correct" for _p, _mv, t in good)
    table: dict[str, list[int]] = {}
    for p, mv, t in verdicts:
        row = table.setdefault(p["family"], [0, 0, 0, 0, 0])
        row[0] += 1
        if p["expected"] == "correct":
            row[1] += mv.verdict == "correct"
            row[2] += t.verdict == "correct"
        else:
            row[3] += mv.verdict == "correct"
            row[4] += t.verdict == "correct"
    print(f"{'family':14}{'pairs':>6}{'mv ok':>7}{'tp ok':>7}{'mv wrong':>10}{'tp wrong':>10}")
    for fam, r in sorted(table.items()):
        print(f"{fam:14}{r[0]:>6}{r[1]:>7}{r[2]:>7}{r[3]:>10}{r[4]:>10}")
    print(f"equivalent forms accepted: math-verify {mv_ok}/{len(good)}, tracepipe {tp_ok}/{len(good)}")
    assert tp_ok >= mv_ok
    # per pair: a form math-verify accepts is never lost, except to `ambiguous` (disagreement)
    lost = [(p["gold"], p["pred"], t.detail) for p, mv, t in good if mv.verdict == "correct" and t.verdict != "correct"]
    assert all(d.startswith("ambiguous:") for _g, _p, d in lost), lost


def test_disagreements_are_ambiguous_not_correct(verdicts):
    """Where math-verify says correct and the typed comparison says otherwise, the row is
    `unverifiable` with an `ambiguous:` detail (for a judge), never `correct`."""
    amb = [(p, mv, t) for p, mv, t in verdicts if t.detail.startswith("ambiguous:")]
    assert amb, "the corpus holds pairs where the two disagree"
    for p, mv, t in amb:
        assert t.verdict == "unverifiable", (p, t)
        m = re.match(r"ambiguous: math-verify=(correct|incorrect) typed=(correct|incorrect|unknown) \((\w+)", t.detail)
        assert m, t.detail
        assert m.group(1) == mv.verdict, (p, mv, t)
        assert m.group(3) in KINDS or m.group(3) == "unrecognised", t.detail
    # math-verify's known false accepts from its tracker are among them
    golds = {p["gold"] for p, _mv, _t in amb}
    assert "\\frac{1}{2^{99}}" in golds and "\\frac{1}{2004!}" in golds


def test_overrides_only_where_documented(verdicts):
    """`correct` against math-verify's `not equal` only for a sure typed decision in OVERRIDE_KINDS."""
    for p, mv, t in verdicts:
        if t.verdict == "correct" and mv.verdict != "correct":
            m = re.match(r"equal: typed (\w+) \(math-verify(=incorrect| cannot parse)", t.detail)
            assert m, (p, t.detail)
            if "=incorrect" in t.detail:
                assert m.group(1) in OVERRIDE_KINDS
            assert p["expected"] == "correct", p


# -- the kinds ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("answer", "kind"), [
    ("42", "integer"), ("-1,000", "integer"), ("10,\\!080", "integer"), ("\\$32,\\!348", "integer"),
    ("\\frac{3}{4}", "rational"), ("-7/2", "rational"), ("\\frac{1}{2^{99}}", "rational"), ("0.\\overline{3}", "rational"),
    ("2\\frac{1}{2}", "mixed_number"), ("-3 1/4", "mixed_number"),
    ("0.25", "decimal"), (".0000672", "decimal"), ("1.5 \\times 10^{-3}", "decimal"), ("5.4 \\text{ cents}", "decimal"),
    ("28\\%", "percent"), ("12.5 percent", "percent"),
    ("\\sqrt{2}", "constant"), ("2\\pi", "constant"), ("e^{16}-1", "constant"), ("30^\\circ", "integer"),
    ("x^2 + 1", "expression"), ("(a+5)(b+2)", "expression"),
    ("2x + 4y - 3 = 0", "equation"),
    ("(-\\infty, 3)", "interval"), ("[1, 2)", "interval"), ("x \\le 5", "interval"), ("(0,9) \\cup (9,36)", "interval"),
    ("x < -1 \\text{ or } x > 2", "interval"), ("x \\in [-2, 7]", "interval"), ("\\mathbb{R}", "interval"),
    ("3, 5, 7", "set"), ("\\{1, 2\\}", "set"), ("19, 46, \\text{ and } 82", "set"), ("x = 1 \\text{ or } x = 2", "set"),
    ("(1, 2, 3)", "tuple"), ("(1, 2)", "tuple"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "tuple"),
    ("\\pm 3", "plus_minus"), ("1 \\pm \\sqrt{19}", "plus_minus"),
    ("1, 2, \\ldots, n", "sequence"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "matrix"),
    ("\\text{(C)}", "choice"), ("B", "choice"),
    ("\\text{even}", "text"), ("\\text{no solution}", "text"), ("Monday", "text"),
])
def test_recognise_kind(answer, kind):
    assert recognise(answer).kind == kind


def test_recognise_assignment_keeps_the_value_kind():
    a = recognise("x = \\frac{1}{2}")
    assert (a.kind, a.var) == ("rational", "x")
    assert recognise("k = 7").kind == "integer"
    with pytest.raises(ValueError):
        recognise("   ")


def test_clean_removes_presentation_only():
    assert clean("$\\boxed{\\dfrac{1}{2}}$") == "\\frac{1}{2}"
    assert clean("\\left( 1, 2 \\right)") == "( 1, 2 )"
    assert clean("15\\mbox{ cm}^2") == "15"
    assert clean("90^\\circ") == "90"
    assert clean("\\$18.90") == "18.90"
    assert clean("5 \\text{ or } 6") == "5 \\text{ or } 6"  # not a unit


def _d(gold: str, pred: str) -> tuple[str, bool]:
    d = compare_answers(gold, pred)
    return d.verdict, d.sure


def test_exact_rationals_are_exact():
    assert _d("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}") == ("different", True)
    assert _d("\\frac{1}{2004!}", "\\frac{1}{2006!}") == ("different", True)
    assert _d("\\frac{1}{2^{99}}", "2^{-99}") == ("equal", True)
    assert _d("\\frac{2}{3}", "\\frac{4}{6}") == ("equal", True)
    assert _d("\\frac{10^{9}+1}{10^{9}}", "1") == ("different", True)


def test_decimal_tolerance_only_from_the_gold():
    # the gold writes a decimal: the answer must round to it at the gold's places (not sure)
    assert _d("33.3", "\\frac{100}{3}") == ("equal", False)
    assert _d("0.29", "0.290243531202435") == ("equal", False)
    assert _d("33.3", "33.4")[0] == "different"
    assert _d(".0000672", "0.0000673") == ("different", True)
    # an exact gold: a decimal answer is taken at its exact value
    assert _d("\\frac{1}{3}", "0.333333") == ("different", True)
    assert _d("\\frac{1}{12}", "0.0833333333333333") == ("different", True)
    assert _d("\\sqrt{17}", "4.123105625617661") == ("different", True)
    assert _d("\\frac{5}{2}", "2.5") == ("equal", True)
    assert _d("2.50", "2.5") == ("equal", True)


def test_equations_compared_as_equations():
    assert _d("2x+4y-3=0", "y = -\\frac{1}{2}x + \\frac{3}{4}") == ("equal", True)
    assert _d("34x+45y-20z+100=0", "-34x-45y+20z-100=0") == ("equal", True)
    assert _d("2x - 4 = 0", "x = 2") == ("equal", True)
    # moved to zero both would be "= 0": they must not match
    assert _d("3x-y+13=0", "3x+4y+14=0")[0] == "different"
    assert _d("x - y = 0", "x + y = 0")[0] == "different"
    assert _d("y = x^2", "y = x^2 + 10^{-9}")[0] == "different"
    assert _d("\\frac{x^2}{4}+\\frac{y^2}{3}=1", "\\frac{x^2}{16}+\\frac{y^2}{12}=1")[0] == "different"
    assert _d("x = 5", "y = 5") == ("equal", False)  # another variable: never sure


def test_sets_and_tuples_element_by_element():
    assert _d("3, 5, 7", "7, 5, 3") == ("equal", True)
    assert _d("3, 5, 7", "3, 5") == ("different", True)
    assert _d("1331 \\text{ and } 1728", "1728") == ("different", True)
    assert _d("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt5, 1-\\sqrt5") == ("equal", True)
    assert _d("(15,-29)", "(-29, 15)")[0] == "different"
    assert _d("(1,-16,-4,43)", "(1,-16,-4)") == ("different", True)
    assert _d("(3, 1)", "(5, 2)")[0] == "different"  # pairs, not two empty intervals
    assert _d("x = 1 \\text{ or } x = -3", "-3, 1") == ("equal", True)
    assert _d("a=1, b=2", "b=2, a=1") == ("equal", True)


def test_mixed_numbers_plus_minus_times_percent():
    assert _d("\\frac{5}{4}", "1 1/4") == ("equal", True)
    assert _d("1\\frac{4}{5}", "1.8") == ("equal", True)
    assert _d("2", "2 2/3")[0] == "different"
    assert _d("10", "4 10/3")[0] == "different"
    assert _d("\\pm 2021", "2021") == ("different", True)
    assert _d("\\pm 2021", "-2021, 2021") == ("equal", True)
    assert _d("\\frac{-1 \\pm \\sqrt{5}}{2}", "\\frac{-1-\\sqrt5}{2}, \\frac{-1+\\sqrt5}{2}") == ("equal", True)
    assert _d("6 \\times 10^{23}", "600000000000000000000000") == ("equal", True)
    assert _d("2.5 \\times 10^{-8}", "2.6 \\times 10^{-8}")[0] == "different"
    assert _d("28\\%", "28") == ("equal", True)
    assert _d("28\\%", "0.28") == ("equal", True)
    assert _d("0.28", "28\\%") == ("equal", True)
    assert _d("28\\%", "2.8")[0] == "different"


def test_intervals_inequalities_radicals_choice_text():
    assert _d("(-\\infty, 2) \\cup (3, \\infty)", "x<2 \\text{ or } x>3") == ("equal", True)
    assert _d("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2] \\cup [3, \\infty)") == ("different", True)
    assert _d("(0, 12.5)", "0 < x < 12.5") == ("equal", True)
    assert _d("x \\in [-2,7]", "-2 \\le x \\le 7") == ("equal", True)
    assert _d("(5, \\infty)", "x \\geq 5") == ("different", True)
    assert _d("\\frac{\\sqrt{6}}{3}", "\\sqrt{\\frac{2}{3}}") == ("equal", True)
    assert _d("\\sqrt{5+2\\sqrt{6}}", "\\sqrt{2}+\\sqrt{3}") == ("equal", True)
    assert _d("2\\sqrt{113}", "\\sqrt{451}") == ("different", True)
    assert _d("\\pi", "\\pi + 10^{-12}") == ("different", True)
    assert _d("\\text{(C)}", "C") == ("equal", True)
    assert _d("\\text{(C)}", "(E)") == ("different", True)
    assert _d("\\text{even}", "even") == ("equal", True)
    assert _d("\\text{even}", "neve")[0] == "different"
    assert _d("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{18}{5} \\end{pmatrix}") == ("equal", True)
    assert _d("1, 2, \\ldots, n", "1, 3, 5, \\ldots, 2n-1")[0] == "different"


def test_expressions_symbolic_and_sampled():
    assert _d("\\frac{x+2}{7}", "\\frac{x}{7}+\\frac{2}{7}") == ("equal", True)
    assert _d("\\tan^2(y)+1", "\\sec^2(y)") == ("equal", True)
    assert _d("p - q", "q - p") == ("different", True)
    assert _d("10^{-9}x", "0")[0] == "different"
    # equal for positive n only: numeric agreement is never sure
    assert _d("\\sqrt{1/n}", "\\frac{1}{\\sqrt{n}}") == ("equal", False)


def test_never_raises_and_fails_closed():
    junk = ["", "\\frac{", "}{", "(((", "\\begin{pmatrix}", "x = = 2", "\\pm\\pm\\pm\\pm 1", "1/0", "\\infty", "12:00",
            "\\sqrt(2)", "a_{", "\\text{", "%", "\\{\\}", "[1,", "\\ldots", "x <", "=", "\\cup", "9^{9^{9^{9}}}"]
    for g in junk:
        for p in junk[:8] + ["2"]:
            d = compare_answers(g, p)
            assert d.verdict in ("equal", "different", "unknown")
            if d.verdict == "equal":
                assert clean(g) == clean(p) or d.sure is False or g == p, (g, p, d)


def test_huge_numbers_are_not_evaluated():
    t0 = time.monotonic()
    d = compare_answers("2", "9^{9^{9^{9}}}")
    assert d.verdict == "unknown"
    d = compare_answers("\\frac{1}{20001!}", "0")
    assert d.verdict == "unknown"
    assert time.monotonic() - t0 < 5


# -- combined with math-verify -----------------------------------------------------------------
def test_combination_details():
    r = check_math("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}")
    assert (r.verdict, r.detail) == ("unverifiable", "ambiguous: math-verify=correct typed=incorrect (rational: exact)")
    r = check_math("\\boxed{x<2 \\text{ or } x>3}", "(-\\infty, 2) \\cup (3, \\infty)")
    assert (r.verdict, r.detail) == ("correct", "equal: typed interval (math-verify=incorrect) (boxed)")
    r = check_math("\\boxed{\\frac{100}{3}}", "33.3")  # a tolerance is never enough to override
    assert r.verdict == "unverifiable" and r.detail.startswith("ambiguous: math-verify=incorrect typed=correct (decimal")
    r = check_math("\\boxed{1 + \\frac{1}{\\mathrm{e}}}", "1 - \\frac{1}{\\mathrm{e}}")  # math-verify cannot parse the gold
    assert (r.verdict, r.detail) == ("incorrect", "not equal: typed constant (math-verify cannot parse the gold) (boxed)")
    r = check_math("\\boxed{0.\\overline{3}}", "\\frac{1}{3}")  # ... nor the answer
    assert (r.verdict, r.detail) == ("correct", "equal: typed rational (math-verify cannot parse the answer) (boxed)")
    # agreement keeps the old details
    assert check_math("\\boxed{5}", "5").detail == "equal (boxed)"
    assert check_math("The answer is 6.", "5").detail == "not equal (answer_is)"
    assert check_math("\\boxed{\\text{Monday}}", "\\text{Sunday}").verdict == "incorrect"


def test_typed_compare_budget_and_threads():
    """typed_compare has its own SIGALRM budget in the main thread and runs without one in others."""
    assert typed_compare("\\frac{1}{2}", "0.5", timeout_s=2).verdict == "equal"
    # 60 radicals against the same 60 reordered: many seconds of sympy, cut at the budget
    gold = ", ".join(f"\\sqrt{{{k}}}+\\sqrt{{{k + 1}}}" for k in range(2, 62))
    pred = ", ".join(f"\\sqrt{{{k + 1}}}+\\sqrt{{{k}}}" for k in reversed(range(2, 62)))
    t0 = time.monotonic()
    d = typed_compare(gold, pred, timeout_s=1)
    assert (d.verdict, d.why) == ("unknown", "timeout")
    assert time.monotonic() - t0 < 3
    out = []
    t = threading.Thread(target=lambda: out.append(typed_compare("\\frac{1}{2}", "0.5", timeout_s=2)))
    t.start()
    t.join()
    assert out[0].verdict == "equal"


def test_verify_stage_labels_the_corpus(tmp_path):
    """The `verify` stage of a recipe on the corpus: no wrong answer labelled `correct`, and the
    disagreements are `unverifiable` with `math: ambiguous: ...`."""
    import polars as pl
    import yaml

    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    pairs = _corpus()
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"pair {i}", "answer": p["gold"], "response": _response(p["pred"]),
                                       "expected": p["expected"]}) + "\n" for i, p in enumerate(pairs)))
    recipe = tmp_path / "pairs.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "pairs", "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "columns": {"problem": "problem"}, "domain": "math"}],
        "stages": [{"verify": {"batch_size": 40}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out"),
                     "options": {"keep_columns": ["pred_answer", "verify_detail", "expected"]}}],
        "executor": {"workers": 2},
    }, sort_keys=False))
    res = Runner(load_recipe(recipe)).run()
    assert res.stats.stages[0].rows_in == len(pairs) and res.stats.stages[0].errors == 0
    out = pl.read_parquet(str(tmp_path / "out" / "data" / "*.parquet"))
    assert out.height == len(pairs)
    assert out.filter((pl.col("expected") == "incorrect") & (pl.col("verdict") == "correct")).height == 0
    amb = out.filter(pl.col("verify_detail").str.starts_with("math: ambiguous:"))
    assert amb.height > 0 and amb["verdict"].unique().to_list() == ["unverifiable"]
