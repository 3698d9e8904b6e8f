"""dedup semantic: embed (cached row stage) + FAISS decision (set stage), through the real runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.fixtures.dedup_data import run_recipe
from tracepipe.text.vectors import components, similar_pairs

pytestmark = pytest.mark.slow


def _decisions(rej: pl.DataFrame) -> dict[str, str]:
    d = rej.filter(pl.col("_stage") == "dedup") if rej.height else rej
    return dict(zip(d["id"].to_list(), d["_dup_of"].to_list())) if d.height else {}


def _recall(rows: pl.DataFrame, rej: pl.DataFrame) -> dict[str, float]:
    dec = _decisions(rej)
    grp = dict(zip(rows["rid"].to_list(), rows["group"].to_list()))
    out = {}
    for kind in ("exact", "format", "reword", "numbers", "original"):
        part = rows.filter(pl.col("kind") == kind)
        right = [r in dec and grp.get(dec[r].split(":", 1)[1]) == g for r, g in zip(part["rid"].to_list(), part["group"].to_list())]
        dropped = [r in dec for r in part["rid"].to_list()]
        out[kind] = float(np.mean(right)) if kind not in ("numbers", "original") else float(np.mean(dropped))
    return out


def test_semantic_precision_recall(tmp_path: Path, semantic_rows: pl.DataFrame, embed_workdir: Path) -> None:
    res, rej = run_recipe(tmp_path, semantic_rows, "  - embed: {}\n  - dedup: {method: semantic}\n", workdir=embed_workdir)
    m = _recall(semantic_rows, rej)
    print("semantic 0.95:", m, res.stats.stages[1].extra)
    # measured: exact 1.0, format 1.0, reword 1.0; numbers-changed copies dropped 0.57 (they are
    # near-identical in embedding space), originals 0.0
    assert m["exact"] == 1.0 and m["format"] >= 0.9 and m["reword"] >= 0.9 and m["original"] <= 0.01
    dd = rej.filter(pl.col("_stage") == "dedup")
    assert (dd["_reason"] == "dedup:semantic").all() and dd["_dup_score"].min() >= 0.95 - 1e-6
    res2, rej2 = run_recipe(tmp_path, semantic_rows, "  - embed: {}\n  - dedup: {method: semantic, threshold: 0.9, same_numbers: true}\n", workdir=embed_workdir)
    m2 = _recall(semantic_rows, rej2)
    print("semantic 0.9 same_numbers:", m2)
    # measured: exact 1.0, format 0.97, reword 1.0, numbers 0.0, originals 0.0
    assert m2["exact"] == 1.0 and m2["format"] >= 0.9 and m2["reword"] >= 0.9
    assert m2["numbers"] == 0.0 and m2["original"] <= 0.01
    assert res2.stats.stages[0].computed == 0  # vectors came from the embed cache


def test_semantic_is_stable_across_reruns_and_appends(tmp_path: Path, semantic_rows: pl.DataFrame, train_texts: list[str], embed_workdir: Path) -> None:
    stages = "  - embed: {}\n  - dedup: {method: semantic, threshold: 0.9, same_numbers: true}\n"
    res1, rej1 = run_recipe(tmp_path, semantic_rows, stages, workdir=embed_workdir)
    res2, rej2 = run_recipe(tmp_path, semantic_rows, stages, workdir=embed_workdir)
    before = _decisions(rej1)
    assert before and _decisions(rej2) == before
    assert res2.stats.stages[1].cached == semantic_rows.height  # decision reused for the same input

    # 40 new, unrelated GSM8K problems appended at the end, and the same 40 put in front
    new = pl.DataFrame({"problem": train_texts[2000:2040], "group": list(range(10_000, 10_040)), "kind": ["new"] * 40,
                        "orig": [-1] * 40, "rid": [f"new{i}" for i in range(40)]}, schema=semantic_rows.schema)
    for name, rows in (("end", pl.concat([semantic_rows, new])), ("front", pl.concat([new, semantic_rows]))):
        _, rej = run_recipe(tmp_path, rows, stages, workdir=embed_workdir)
        after = _decisions(rej)
        assert {k: v for k, v in after.items() if not k.startswith("new")} == before, name

    # new rows that duplicate old ones: only they change (dropped, pointing at the old keepers)
    kept = semantic_rows.filter(~pl.col("rid").is_in(list(before)))
    dups = kept.head(3).with_columns(pl.col("problem").str.to_uppercase(), pl.Series("rid", ["d0", "d1", "d2"]))
    _, rej = run_recipe(tmp_path, pl.concat([semantic_rows, new, dups]), stages, workdir=embed_workdir)
    after = _decisions(rej)
    assert {k: v for k, v in after.items() if k[0] not in "dn"} == before
    assert {k: after.get(k) for k in ("d0", "d1", "d2")} == {f"d{i}": f"t:{r}" for i, r in enumerate(kept.head(3)["rid"].to_list())}


def test_ivf_index_matches_flat_on_small_sets(tmp_path: Path, semantic_rows: pl.DataFrame, embed_workdir: Path) -> None:
    _, flat = run_recipe(tmp_path, semantic_rows, "  - embed: {}\n  - dedup: {method: semantic, index: flat}\n", workdir=embed_workdir)
    res, ivf = run_recipe(tmp_path, semantic_rows, "  - embed: {}\n  - dedup: {method: semantic, index: ivf, nprobe: 64}\n", workdir=embed_workdir)
    assert res.stats.stages[1].extra["index"] == "ivf"
    assert _decisions(ivf) == _decisions(flat)


def test_semantic_keep_policies(tmp_path: Path, semantic_rows: pl.DataFrame, embed_workdir: Path) -> None:
    rows = semantic_rows.with_columns(
        pl.when(pl.col("kind") == "original").then(pl.lit("incorrect")).otherwise(pl.lit("correct")).alias("verdict"))
    _, rej = run_recipe(tmp_path, rows, "  - embed: {}\n  - dedup: {method: semantic, keep: best-verdict, threshold: 0.9, same_numbers: true}\n", workdir=embed_workdir)
    dec = _decisions(rej)
    kinds = dict(zip(rows["rid"].to_list(), rows["kind"].to_list()))
    # a planted (correct) copy replaces its incorrect original as the kept row
    assert any(kinds[k] == "original" for k in dec) and all(kinds[v.split(":", 1)[1]] != "original" for v in dec.values())
    _, rej = run_recipe(tmp_path, rows, "  - embed: {}\n  - dedup: {method: semantic, keep: longest}\n", workdir=embed_workdir)
    lens = dict(zip(rows["rid"].to_list(), rows["problem"].str.len_chars().to_list()))
    assert all(lens[v.split(":", 1)[1]] >= lens[k] for k, v in _decisions(rej).items())


def test_semantic_without_embeddings_fails_clearly(tmp_path: Path) -> None:
    rows = pl.DataFrame({"rid": ["a", "b"], "problem": ["x 1", "x 1"]})
    with pytest.raises(ValueError, match="embed"):
        run_recipe(tmp_path, rows, "  - dedup: {method: semantic}\n")


def test_similar_pairs_threshold_is_inclusive_and_components_chain() -> None:
    x = np.array([[1, 0], [0.95, np.sqrt(1 - 0.95**2)], [0.8, 0.6], [0, 1]], dtype=np.float32)
    pairs, sims, info = similar_pairs(x, 0.95)
    assert info["index"] == "flat" and pairs.tolist() == [[0, 1]]
    assert components(4, np.array([[0, 1], [1, 2]])).tolist()[:3] == [0, 0, 0]
