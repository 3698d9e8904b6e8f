"""Which row keys a stage store may hold, without reading the store: a sorted array of 64-bit
hashes of the ``_in_key`` of every committed part it covers, kept in the frame cache.

A row stage that meets new rows (an append) looks their keys up here first; keys whose hash is
absent are certainly not committed, so the store is read only for the rest (usually none). The
index covers a list of store parts by name; parts committed since (by this run, another run, or
another machine sharing the store) are read and added when it is next loaded, so it is never
wrong, only sometimes incomplete, and an incomplete index costs a read of the parts it lacks.
Hashes are polars' seeded string hash (stable within a release: the version is recorded).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from tracepipe.pipeline.frames import FrameCache
from tracepipe.pipeline.hashruns import HashRuns
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.store import StageStore

INDEX_VERSION = "2"
SEED = 0x1D


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _meta_name(store: StageStore) -> str:
    return f"key-index-{INDEX_VERSION}-{store.stage}-{store.fp}"


class KeyIndex:
    """The committed keys of one stage store (see the module docstring)."""

    def __init__(self, cache: FrameCache, store: StageStore) -> None:
        self.cache = cache
        self.store = store
        self.meta_name = _meta_name(store)
        self.covered: list[str] = []
        self.hashes = HashRuns(cache, self.meta_name)
        self.changed = False
        self._load()

    @staticmethod
    def retain(cache: FrameCache, store: StageStore) -> None:
        """Keep a store's index through the cache's garbage collection in a run that does not
        load it (no new rows for the stage)."""
        HashRuns.retain(cache, cache.get_meta(_meta_name(store)) or {})

    def _load(self) -> None:
        meta: dict[str, Any] = self.cache.get_meta(self.meta_name) or {}
        parts = self.store.parts()
        covered = list(meta.get("parts") or [])
        runs = HashRuns.from_meta(self.cache, self.meta_name, meta)
        if runs is None or not set(covered) <= {_name(p) for p in parts}:  # none, or parts it names are gone: start over
            covered, runs, self.changed = [], HashRuns(self.cache, self.meta_name), True
        self.covered, self.hashes = covered, runs
        have = set(covered)
        todo = [p for p in parts if _name(p) not in have]
        if todo:
            self._add([_name(p) for p in todo], self.store.key_column(todo))

    def _add(self, names: list[str], keys: pl.Series) -> None:
        self.hashes.add(keys.hash(seed=SEED).to_numpy())
        self.covered += names
        self.changed = True

    def add(self, part_url: str, keys: pl.Series) -> None:
        """Record a part this run committed (its keys are at hand: no read)."""
        self._add([_name(part_url)], keys)

    def candidates(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The rows of ``keys`` (a frame with ``_in_key``) whose key the store may hold."""
        if not len(self.hashes) or not keys.height:
            return keys.head(0)
        hit = np.flatnonzero(self.hashes.contains(keys[IN_KEY_COL].hash(seed=SEED).to_numpy()))
        return keys[hit.tolist()] if len(hit) else keys.head(0)  # usually none: no array to convert

    def save(self) -> None:
        if not self.changed:
            return
        self.hashes.compact_if_mostly_new()
        self.cache.put_meta(self.meta_name, {"parts": self.covered, **self.hashes.meta()})
        self.changed = False
