"""The key index of a stage store: a rerun's lookup of new keys reads no store part, and the
index is never wrong (parts committed without it, e.g. by a killed run or another machine
sharing the store, are read and added when it is next loaded)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import tracepipe.sources as sources
from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.frames import FrameCache
from tracepipe.pipeline.keyindex import KeyIndex
from tracepipe.pipeline.keys import IN_KEY_COL, row_keys
from tracepipe.pipeline.runner import Runner
from tracepipe.pipeline.store import IDX_COL, StageStore
from tracepipe.recipe import load_recipe
from tracepipe.stages.base import DROP_COL


def _batch(texts: list[str]) -> pl.DataFrame:
    keys = row_keys(pl.DataFrame({"problem": texts}), ["problem"])
    return pl.DataFrame({IN_KEY_COL: keys, IDX_COL: [0] * len(texts), DROP_COL: [None] * len(texts)}, schema_overrides={DROP_COL: pl.String})


def test_candidates_cover_every_committed_key_however_it_was_committed(tmp_path: Path) -> None:
    rows = [r["question"] for r in read_jsonl(GSM8K_TRAIN, limit=600)]
    cache = FrameCache(tmp_path / "frames")
    store = StageStore(tmp_path / "work", "filter", "fp1")
    index = KeyIndex(cache, store)
    a, b, c = _batch(rows[:200]), _batch(rows[200:400]), _batch(rows[400:])
    index.add(store.commit(a), a[IN_KEY_COL])
    index.save()
    store.commit(b)  # committed by someone else (another machine, a killed run): not in the saved index

    again = KeyIndex(FrameCache(tmp_path / "frames"), store)
    assert len(again.covered) == 2  # the part it lacked was read and added
    probe = pl.concat([a, b, c]).select(IN_KEY_COL)
    got = set(again.candidates(probe)[IN_KEY_COL].to_list())
    assert set(a[IN_KEY_COL].to_list()) | set(b[IN_KEY_COL].to_list()) <= got  # never misses a committed key
    assert len(got & set(c[IN_KEY_COL].to_list())) <= 1  # new keys are (all but surely) not candidates

    # a part the index names has gone (the store was cleaned): it starts over from what is there
    first = sorted((tmp_path / "work" / "stages" / "filter-fp1").glob("part-*.parquet"))[0]
    first.unlink()
    fresh = KeyIndex(FrameCache(tmp_path / "frames"), store)
    assert len(fresh.covered) == 1
    assert set(fresh.candidates(probe)[IN_KEY_COL].to_list()) >= set(b[IN_KEY_COL].to_list())


def test_an_appending_rerun_reads_no_store_part_to_find_its_new_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64 << 10)
    rows = read_jsonl(GSM8K_TRAIN, limit=2200)
    src = write_jsonl(tmp_path / "src.jsonl", rows[:2000])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "idx", "workdir": str(tmp_path / "work"), "source": [{"path": str(src), "preset": "gsm8k"}],
        "stages": [{"filter": {"store": True, "where": "length(problem) < 400"}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out")}],
    })
    Runner(load_recipe(recipe)).run()
    write_jsonl(src, rows)
    lookups: list[Any] = []
    scan = StageStore.scan

    def spy(self: StageStore, *a: Any, **kw: Any) -> Any:
        if kw.get("only") is None:  # a lookup over every committed part
            lookups.append(kw)
        return scan(self, *a, **kw)

    monkeypatch.setattr(StageStore, "scan", spy)
    stats = Runner(load_recipe(recipe)).run().stats.to_dict()
    assert stats["stages"][0]["computed"] == 200 and lookups == []

    # the same rows again under a fresh frame cache (no index): the store is read, nothing recomputed
    shutil.rmtree(tmp_path / "work" / "frames")
    stats = Runner(load_recipe(recipe)).run().stats.to_dict()
    assert stats["stages"][0]["computed"] == 0 and stats["stages"][0]["cached"] == 2200 and len(lookups) == 1


def test_hash_runs_add_as_new_runs_and_merge_past_the_limit(tmp_path: Path) -> None:
    import numpy as np

    from tracepipe.pipeline import hashruns
    from tracepipe.pipeline.hashruns import HashRuns

    cache = FrameCache(tmp_path / "frames")
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 2**63, 50, dtype=np.int64).astype(np.uint64) for _ in range(hashruns.MAX_RUNS + 2)]
    runs = HashRuns(cache, "t")
    for i, b in enumerate(batches):
        runs.add(b)
        # one run per add, until there are too many: then all are one run
        assert len(runs.names) == (i + 1 if i < hashruns.MAX_RUNS else i + 1 - hashruns.MAX_RUNS)
        again = HashRuns.load(FrameCache(tmp_path / "frames"), "t", runs.names)
        assert again is not None and len(again) == 50 * (i + 1)
        seen = np.concatenate(batches[: i + 1])
        assert again.contains(seen).all()
        assert not again.contains(np.concatenate(batches[i + 1:]) if i + 1 < len(batches) else seen[:0]).any()
    (tmp_path / "frames" / f"{runs.names[0]}.npy").unlink()
    assert HashRuns.load(FrameCache(tmp_path / "frames"), "t", runs.names) is None


def test_hash_runs_compact_only_what_this_process_mostly_wrote(tmp_path: Path) -> None:
    import numpy as np

    from tracepipe.pipeline.hashruns import HashRuns

    rng = np.random.default_rng(3)
    runs = HashRuns(FrameCache(tmp_path / "frames"), "t")
    for _ in range(4):  # a first run: every hash is new
        runs.add(rng.integers(0, 2**63, 100, dtype=np.int64).astype(np.uint64))
    runs.compact_if_mostly_new()
    assert len(runs.names) == 1 and len(runs) == 400
    later = HashRuns.load(FrameCache(tmp_path / "frames"), "t", runs.names)
    assert later is not None
    later.add(rng.integers(0, 2**63, 10, dtype=np.int64).astype(np.uint64))  # a small append
    later.compact_if_mostly_new()
    assert len(later.names) == 2 and len(later) == 410  # left as runs: merging would rewrite 400 for 10
