"""dedup exact + minhash on GSM8K train with planted duplicates, through the real runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.fixtures.dedup_data import run_recipe
from tracepipe.pipeline.keys import fingerprint
from tracepipe.stages.dedup import DedupParams
from tracepipe.text.minhash import candidate_pairs, optimal_bands, signatures
from tracepipe.text.perturb import plant_duplicates


@pytest.fixture(scope="module")
def planted(train_texts: list[str]) -> pl.DataFrame:
    df = plant_duplicates(train_texts, 150, seed=5)
    return df.with_row_index("rid").with_columns(pl.col("rid").cast(pl.String))


def evaluate(planted: pl.DataFrame, rej: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Per kind: recall (planted dups dropped with `_dup_of` in their group) and drop rate."""
    grp = dict(zip(planted["rid"].to_list(), planted["group"].to_list()))
    j = planted.join(rej.select(pl.col("id").alias("rid"), "_dup_of", "_reason"), on="rid", how="left").with_columns(
        pl.col("_dup_of").str.split(":").list.get(1).replace_strict(grp, default=None).alias("dup_group"))
    out = {}
    for kind in ("exact", "format", "reword", "numbers", "original"):
        part = j.filter(pl.col("kind") == kind)
        dropped = part["_reason"].is_not_null()
        right = (part["dup_group"] == part["group"]).fill_null(False)
        out[kind] = {"dropped": float(dropped.mean()), "right": float(right.mean()), "n": part.height}
    drops = j.filter(pl.col("_reason").is_not_null())
    out["all"] = {"precision": float((drops["dup_group"] == drops["group"]).fill_null(False).mean()) if drops.height else 1.0}
    return out


def test_exact_keeps_its_behaviour_and_fingerprint(tmp_path: Path, planted: pl.DataFrame) -> None:
    # the fingerprint inputs of `dedup: {method: exact}` are those of the original stage
    from tracepipe.stages.dedup import Dedup

    st = Dedup(DedupParams(method="exact"))
    assert st.fingerprint_inputs() == {"stage": "dedup", "version": "1", "reads": ["problem"],
                                       "params": {"method": "exact", "field": "problem", "ignore_punctuation": False}}
    assert fingerprint(st.fingerprint_inputs()) == fingerprint({"stage": "dedup", "version": "1", "params": {
        "method": "exact", "field": "problem", "ignore_punctuation": False}, "reads": ["problem"]})
    _, rej = run_recipe(tmp_path, planted, "  - dedup: {method: exact}\n")
    m = evaluate(planted, rej)
    assert m["exact"]["right"] == 1.0 and m["numbers"]["dropped"] == 0.0 and m["all"]["precision"] == 1.0
    # reference: first row of each lower-cased, whitespace-folded text is kept
    norm = planted["problem"].str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    expect = set(planted.filter(norm.is_duplicated() & ~norm.is_first_distinct())["rid"].to_list())
    assert set(rej["id"].to_list()) == expect
    assert (rej["_reason"] == "dedup:exact").all() and "_dup_score" not in rej.columns


def test_minhash_precision_recall_floors(tmp_path: Path, planted: pl.DataFrame) -> None:
    res, rej = run_recipe(tmp_path, planted, "  - dedup: {method: minhash}\n")
    m = evaluate(planted, rej)
    print("minhash(0.7):", m, res.stats.stages[0].extra)
    # measured (150 plants per kind): exact 1.0, format 1.0, reword 0.19, precision 0.91
    assert m["exact"]["right"] == 1.0
    assert m["format"]["right"] >= 0.97
    assert m["reword"]["right"] >= 0.08
    assert m["all"]["precision"] >= 0.85
    assert m["original"]["dropped"] <= 0.002  # native GSM8K near-duplicates
    assert (rej["_reason"] == "dedup:minhash").all()
    assert rej["_dup_score"].min() >= 0.7


def test_minhash_same_numbers_removes_number_changed_false_positives(tmp_path: Path, planted: pl.DataFrame) -> None:
    _, rej = run_recipe(tmp_path, planted, "  - dedup: {method: minhash, threshold: 0.5, same_numbers: true}\n")
    m = evaluate(planted, rej)
    print("minhash(0.5, same_numbers):", m)
    # measured: exact 1.0, format 1.0, reword 0.79, numbers dropped 0.0, precision 0.998
    assert m["numbers"]["dropped"] <= 0.02
    assert m["reword"]["right"] >= 0.6
    assert m["all"]["precision"] >= 0.97


def test_minhash_is_deterministic_and_stable_under_appends(tmp_path: Path, planted: pl.DataFrame, train_texts: list[str]) -> None:
    _, rej1 = run_recipe(tmp_path / "a", planted, "  - dedup: {method: minhash}\n")
    _, rej2 = run_recipe(tmp_path / "b", planted, "  - dedup: {method: minhash}\n")
    assert rej1.sort("id").select("id", "_dup_of").equals(rej2.sort("id").select("id", "_dup_of"))
    extra = pl.DataFrame({"problem": [train_texts[10], "A completely new question: 4 owls and 9 mice?"],
                          "group": [10, -1], "kind": ["exact", "original"], "orig": [10, -1], "rid": ["n1", "n2"]},
                         schema=planted.schema)
    _, rej3 = run_recipe(tmp_path / "c", pl.concat([planted, extra]), "  - dedup: {method: minhash}\n")
    old = rej1.select("id", "_dup_of").sort("id")
    new = rej3.filter(~pl.col("id").is_in(["n1", "n2"])).select("id", "_dup_of").sort("id")
    assert old.equals(new)
    assert rej3.filter(pl.col("id") == "n1")["_dup_of"].to_list() == [f"t:{planted['rid'][10]}"]


def test_keep_policies(tmp_path: Path) -> None:
    rows = pl.DataFrame({"rid": ["a", "b", "c", "d"], "problem": [
        "Tom has 3 apples and buys 4 more apples at the big market today. How many apples does Tom have now?",
        "Tom has 3 apples and buys 4 more apples at the big market today.  How many apples does Tom have now in total?",
        "tom has 3 apples and buys 4 more apples at the big market today how many apples does tom have now",
        "A train leaves at 9 and arrives at 11. How long is the trip?",
    ], "verdict": ["incorrect", "correct", "error", "correct"]})
    got = {}
    for keep in ("first", "shortest", "longest", "best-verdict"):
        _, rej = run_recipe(tmp_path / keep, rows, f"  - dedup: {{method: minhash, threshold: 0.6, keep: {keep}}}\n")
        kept = sorted(set(rows["rid"].to_list()) - set(rej["id"].to_list()))
        got[keep] = kept
        assert set(rej["_dup_of"].str.split(":").list.get(1).to_list()) <= set(kept)
    assert got == {"first": ["a", "d"], "shortest": ["c", "d"], "longest": ["b", "d"], "best-verdict": ["b", "d"]}


def test_best_verdict_without_verdict_column_fails_clearly(tmp_path: Path) -> None:
    rows = pl.DataFrame({"rid": ["a", "b"], "problem": ["same text 1", "same text 1"]})
    with pytest.raises(Exception, match="verdict"):
        run_recipe(tmp_path, rows, "  - dedup: {method: minhash, keep: best-verdict}\n")


def test_lsh_helpers() -> None:
    b, r = optimal_bands(0.7, 128)
    assert b * r <= 128 and (b, r) == (14, 9)
    sig = signatures([["a b c", "b c d"], ["a b c", "b c d"], ["x y z"]], 64, 1)
    assert sig.dtype == np.uint32 and sig.shape == (3, 64)
    assert candidate_pairs(sig, 8, 8).tolist() == [[0, 1]]
