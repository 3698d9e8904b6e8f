"""decontaminate (n-gram): GSM8K train with planted benchmark items, through the real runner."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tests.fixtures.dedup_data import run_recipe
from tracepipe.benchmarks_data import benchmarks_digest, known_benchmarks, load_benchmarks
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.text.normalize import match_tokens
from tracepipe.text.perturb import plant_benchmark_items


@pytest.fixture(scope="module")
def planted(train_texts: list[str]) -> pl.DataFrame:
    bench = load_benchmarks(known_benchmarks())
    df = plant_benchmark_items(train_texts, bench, 60, seed=11)
    return df.with_row_index("rid").with_columns(pl.col("rid").cast(pl.String))


@pytest.fixture(scope="module")
def decontaminated(planted: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, pl.DataFrame, Path]:
    tmp = tmp_path_factory.mktemp("decontam")
    res, rej = run_recipe(tmp, planted, "  - decontaminate: {}\n")
    return res, rej, tmp


def _joined(planted: pl.DataFrame, rej: pl.DataFrame) -> pl.DataFrame:
    return planted.join(
        rej.select(pl.col("id").alias("rid"), "_reason", "contam_benchmark", "contam_id", "contam_method", "contam_score"),
        on="rid", how="left",
    )


def test_shipped_benchmarks_load_by_name() -> None:
    df = load_benchmarks(known_benchmarks())
    sizes = dict(df.group_by("benchmark").len().iter_rows())
    assert sizes == {"math500": 500, "aime24": 30, "amc23": 40, "gsm8k_test": 1319, "humaneval": 164}
    assert df["text"].null_count() == 0 and df["id"].null_count() == 0
    assert df.filter(pl.col("benchmark") == "humaneval")["id"][0] == "HumanEval/0"


def test_latex_respacing_gives_same_tokens() -> None:
    a = r"Suppose Aya walks at $s+\frac{1}{2}$ km/h; find $x^2 + 3\,x$."
    b = r"suppose aya walks at $ s + \dfrac12 $ km/h ; find $x^{2}+3 x$"
    assert match_tokens(a) == match_tokens(b)
    assert match_tokens("He has 12 apples") != match_tokens("He has 13 apples")  # numbers kept


def test_every_verbatim_wrapped_and_respaced_plant_is_found(decontaminated: tuple, planted: pl.DataFrame) -> None:
    res, rej, _ = decontaminated
    j = _joined(planted, rej)
    for kind in ("verbatim", "respaced", "wrapped"):
        part = j.filter(pl.col("kind") == kind)
        assert part["contam_id"].null_count() == 0, f"{kind}: {part.filter(pl.col('contam_id').is_null())['problem'].to_list()[:3]}"
        right = part.filter((pl.col("contam_id") == pl.col("plant_id")) & (pl.col("contam_benchmark") == pl.col("plant_benchmark")))
        assert right.height == part.height  # it names the item that was planted
        assert (part["contam_method"] == "ngram").all() and (part["_reason"] == "decontaminate:ngram").all()
        assert (part["contam_score"] == 1.0).all()
    reword = j.filter(pl.col("kind") == "reword")
    recall = reword["contam_id"].is_not_null().mean()
    print(f"reworded plants recall (n-gram 13): {recall:.3f}")
    assert recall >= 0.6  # measured 0.80 on 100 plants; rewording breaks many 13-grams


def test_false_positives_on_clean_gsm8k_train(decontaminated: tuple, planted: pl.DataFrame) -> None:
    _, rej, _ = decontaminated
    j = _joined(planted, rej).filter(pl.col("kind") == "clean")
    fp = j["contam_id"].is_not_null().sum()
    rate = fp / j.height
    print(f"false positives on clean GSM8K train: {fp} / {j.height} = {rate:.4%}")
    assert rate <= 0.005


def test_rerun_is_cached_and_appended_rows_only_are_checked(decontaminated: tuple, planted: pl.DataFrame, train_texts: list[str]) -> None:
    res, rej, tmp = decontaminated
    st = res.stats.stages[0]
    assert st.computed == planted.height
    more = pl.concat([planted, pl.DataFrame({"problem": ["A brand new problem about 7 cats and 3 dogs."], "kind": ["clean"],
                                             "plant_benchmark": [None], "plant_id": [None], "rid": ["new-1"]},
                                            schema=planted.schema)])
    res2, rej2 = run_recipe(tmp, more, "  - decontaminate: {}\n")
    st2 = res2.stats.stages[0]
    assert st2.computed == 1 and st2.cached == planted["problem"].n_unique()
    assert rej2.height == rej.height


def test_user_benchmark_file_and_custom_ngram(tmp_path: Path, train_texts: list[str]) -> None:
    bench = pl.DataFrame({"qid": ["q1", "q2"], "question": [
        "A farmer has 17 sheep and all but 9 run away. How many sheep does the farmer have left now?",
        "Compute the value of $2^{10} - 1$ modulo $7$.",
    ]})
    bench.write_ndjson(tmp_path / "mine.jsonl")
    rows = pl.DataFrame({"rid": ["a", "b", "c"], "problem": [
        train_texts[0],
        "Warm-up. a farmer has 17 sheep, and ALL but 9 run away! how many sheep does the farmer have left now",
        "compute the value of $2^{10}-1$ modulo $7$",
    ]})
    _, rej = run_recipe(tmp_path, rows, "  - decontaminate: {benchmarks: [aime24, {path: mine.jsonl, field: question, id: qid, name: mine}], ngram: 8}\n")
    got = dict(zip(rej["id"].to_list(), rej["contam_id"].to_list()))
    assert got == {"b": "q1", "c": "q2"}
    assert set(rej["contam_benchmark"].to_list()) == {"mine"}


def test_flag_only_keeps_rows(tmp_path: Path) -> None:
    bench = load_benchmarks(["gsm8k_test"])
    rows = pl.DataFrame({"rid": ["x", "y"], "problem": [bench["text"][5], "Nothing to see here, 1 2 3."]})
    res, rej = run_recipe(tmp_path, rows, "  - decontaminate: {benchmarks: [gsm8k_test], drop: false}\n")
    assert rej.height == 0
    assert res.stats.stages[0].extra == {"flagged_kept": {"gsm8k_test:ngram": 1}}


def test_unknown_benchmark_is_a_recipe_error(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"problem": "x"}\n')
    (tmp_path / "r.yaml").write_text("name: t\nsource:\n  - path: p.jsonl\nstages:\n  - decontaminate: {benchmarks: [math501]}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "math501" in str(e.value) and "math500" in str(e.value)


def test_benchmark_digest_changes_with_content() -> None:
    a = load_benchmarks(["aime24"])
    b = a.with_columns(pl.when(pl.col("id") == a["id"][0]).then(pl.lit("changed")).otherwise(pl.col("text")).alias("text"))
    assert benchmarks_digest(a) != benchmarks_digest(b)
