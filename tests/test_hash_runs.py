"""Hash runs: the sorted 64-bit hash sets the source keeps to find repeated ids after an append."""

from __future__ import annotations

from pathlib import Path

from tracepipe.pipeline.frames import FrameCache


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
