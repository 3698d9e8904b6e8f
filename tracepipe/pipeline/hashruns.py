"""A set of 64-bit hashes kept in the frame cache as a few sorted runs (``.npy`` files).

Adding hashes writes them as one new run, so a rerun that adds a few rows writes a few bytes,
not the whole set again; once there are more than :data:`MAX_RUNS` runs they are merged into one
(log-structured, as LSM trees do), so a lookup binary-searches a handful of sorted arrays. Used
for the source's repeated-key check and for the key index of each stage store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import xxhash

from tracepipe.pipeline.frames import FrameCache, digest_of

MAX_RUNS = 8


class HashRuns:
    def __init__(self, cache: FrameCache, prefix: str, runs: list[tuple[str, np.ndarray]] | None = None) -> None:
        self.cache = cache
        self.prefix = prefix
        self.runs = list(runs or [])
        self._added = 0  # hashes added by this process

    @classmethod
    def load(cls, cache: FrameCache, prefix: str, names: list[str]) -> HashRuns | None:
        """The runs named (as :attr:`names` gave them), or None if one is missing."""
        runs = []
        for name in names:
            arr = cache.get_array(name)
            if arr is None or arr.dtype != np.uint64:
                return None
            runs.append((name, arr))
        return cls(cache, prefix, runs)

    @classmethod
    def from_meta(cls, cache: FrameCache, prefix: str, meta: dict[str, Any]) -> HashRuns | None:
        """The runs a record made by :meth:`meta` names, or None if it names none, was made by
        another polars release (the hashes are polars' seeded hashes) or a run is missing."""
        if not meta.get("runs") or meta.get("polars") != pl.__version__:
            return None
        return cls.load(cache, prefix, list(meta["runs"]))

    def meta(self) -> dict[str, Any]:
        """What to record (in a cache meta file) to find these runs again."""
        return {"runs": self.names, "polars": pl.__version__}

    @staticmethod
    def retain(cache: FrameCache, meta: dict[str, Any]) -> None:
        """Keep the runs a :meth:`meta` record names through the cache's garbage collection,
        without loading them."""
        cache.used.update(meta.get("runs") or [])

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.runs]

    def __len__(self) -> int:
        return sum(len(a) for _, a in self.runs)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """Per hash in ``h``: whether the set holds it."""
        hit = np.zeros(len(h), dtype=bool)
        for _, arr in self.runs:
            if len(arr):
                pos = np.minimum(np.searchsorted(arr, h), len(arr) - 1)
                hit |= arr[pos] == h
        return hit

    def add(self, h: np.ndarray) -> None:
        """Add hashes (written now as a new run; all runs merged into one past ``MAX_RUNS``)."""
        new = np.sort(np.asarray(h, dtype=np.uint64))
        if not len(new):
            return
        self._added += len(new)
        runs = [*self.runs, ("", new)]
        if len(runs) > MAX_RUNS:
            runs = [("", np.sort(np.concatenate([a for _, a in runs])))]
        self.runs = [(n, a) if n else (self._put(a), a) for n, a in runs]

    def compact_if_mostly_new(self) -> None:
        """Merge the runs into one when at least half the hashes were added by this process (a
        first or large run: merging costs little next to the work that made them), so later
        runs load one file instead of several."""
        if len(self.runs) > 1 and self._added * 2 >= len(self):
            merged = np.sort(np.concatenate([a for _, a in self.runs]))
            self.runs = [(self._put(merged), merged)]

    def _put(self, arr: np.ndarray) -> str:
        name = f"{self.prefix}-{digest_of(len(arr), xxhash.xxh3_128_hexdigest(arr.tobytes()))}"
        self.cache.put_array(name, arr)
        return name
