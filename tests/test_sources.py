"""Sources: JSONL, Parquet, globs, Hugging Face datasets (local, offline), mapping, answers, ids."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, MATH500, read_jsonl, write_jsonl
from tracepipe import DATA_DIR
from tracepipe.recipe import SourceSpec
from tracepipe.sources import SourceError, gsm8k_answer, last_boxed, load_sources


def _load(tmp_path: Path, **spec) -> pl.DataFrame:
    return load_sources([SourceSpec(**spec)], tmp_path)


def test_gsm8k_preset_maps_columns_and_answers() -> None:
    df = _load(Path("/"), path=str(GSM8K_TRAIN), preset="gsm8k", limit=200)
    rows = read_jsonl(GSM8K_TRAIN, limit=200)
    assert df.height == 200
    assert df["problem"].to_list() == [r["question"] for r in rows]
    assert df["solution"].to_list() == [r["answer"] for r in rows]
    assert df["answer"].to_list() == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows]
    assert set(df["domain"].unique()) == {"math"} and set(df["source"].unique()) == {"gsm8k_train"}
    assert df["_key"].n_unique() == 200


def test_ids_are_stable_hashes_of_the_normalized_problem(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=50)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "question": "  " + r["question"].upper() + "\n"} for r in rows])
    ida = _load(tmp_path, path=str(a), preset="gsm8k")["id"].to_list()
    idb = _load(tmp_path, path=str(b), preset="gsm8k")["id"].to_list()
    assert ida == idb and len(set(ida)) == 50
    assert ida == _load(tmp_path, path=str(a), preset="gsm8k")["id"].to_list()  # stable


def test_source_id_column_is_used_and_repeated_ids_get_distinct_keys(tmp_path: Path) -> None:
    rows = [{"qid": "x", "q": "1+1?", "a": "2"}, {"qid": "x", "q": "2+2?", "a": "4"}, {"qid": "y", "q": "3+3?", "a": "6"}]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    df = _load(tmp_path, path=str(p), columns={"id": "qid", "problem": "q", "answer": "a"}, answer_format="raw")
    assert df["id"].to_list() == ["x", "x", "y"]
    assert df["_key"].to_list() == ["s:x", "s:x~1", "s:y"]
    assert df["qid"].to_list() == ["x", "x", "y"]  # unmapped source columns stay


def test_parquet_glob_and_limit(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=300)
    d = tmp_path / "pq"
    d.mkdir()
    for i in range(3):
        pl.DataFrame(rows[i * 100 : (i + 1) * 100]).write_parquet(d / f"part-{i}.parquet")
    df = _load(tmp_path, path=str(d / "*.parquet"), preset="gsm8k")
    assert df["problem"].to_list() == [r["question"] for r in rows]
    assert _load(tmp_path, path=str(d / "*.parquet"), preset="gsm8k", limit=150).height == 150


def test_hf_dataset_from_local_disk(tmp_path: Path) -> None:
    import datasets

    rows = read_jsonl(MATH500, limit=40)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    df = _load(tmp_path, hf=str(tmp_path / "ds"), preset="math")
    assert df["problem"].to_list() == [r["problem"] for r in rows]
    assert df["answer"].to_list() == [r["answer"] for r in rows]
    assert df["id"].to_list() == [r["unique_id"] for r in rows]


def test_boxed_answers_from_math500_solutions(tmp_path: Path) -> None:
    rows = read_jsonl(MATH500)
    p = write_jsonl(tmp_path / "m.jsonl", [{"problem": r["problem"], "solution": r["solution"]} for r in rows])
    df = _load(tmp_path, path=str(p), columns={"problem": "problem", "answer": "solution"}, answer_format="boxed")
    got = df["answer"].to_list()
    # the gold answer is the last \boxed{} of the reference solution for nearly every row
    agree = sum(g is not None and g.replace(" ", "") == r["answer"].replace(" ", "") for g, r in zip(got, rows))
    assert agree / len(rows) > 0.95
    assert last_boxed(r"so \boxed{\frac{1}{2}} and then \boxed{x^{2}}") == "x^{2}"
    assert gsm8k_answer("He pays 1,000 dollars.\n#### 1,000") == "1000"


def test_humaneval_preset_builds_functional_tests() -> None:
    df = _load(Path("/"), path=str(DATA_DIR / "benchmarks" / "humaneval.jsonl"), preset="humaneval")
    assert df.height == 164 and set(df["domain"].unique()) == {"code"}
    t = json.loads(df["tests"][0])
    assert t["style"] == "functional" and t["entry_point"] == "has_close_elements" and "def check" in t["code"]


def test_bad_sources_name_the_entry(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "s.jsonl", [{"q": "x"}])
    with pytest.raises(SourceError, match=r"source\[0\]\.columns: source has no column\(s\) \['question'\]"):
        _load(tmp_path, path=str(p), columns={"problem": "question"})
    with pytest.raises(SourceError, match=r"source\[0\]: no `problem` column"):
        _load(tmp_path, path=str(p))
    with pytest.raises(SourceError, match=r"source\[0\]\.preset: unknown preset 'nope'"):
        _load(tmp_path, path=str(p), preset="nope")
