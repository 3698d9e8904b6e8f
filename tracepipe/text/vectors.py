"""Similar pairs over embedding vectors with FAISS, and connected components of a pair graph.

``similar_pairs`` returns every pair (i < j) whose cosine similarity is at least ``threshold``:
exact inner-product range search (``IndexFlatIP``) up to ``flat_max`` vectors, an IVF index
(``IndexIVFFlat``, ``nlist ~ 4 sqrt(n)``, ``nprobe`` lists probed) above. Flat search is exact
and its decisions depend only on the vectors; IVF is approximate (a pair whose vectors fall in
lists that are not probed is missed) and its k-means training sample is drawn with a fixed seed.

``flat_max`` (20,000 in the dedup stage) comes from ``benchmarks/dedup.py`` (``index_sweep``:
GSM8K-derived vectors, cosine 0.95, 2 shared cores): flat vs IVF (nprobe 16) took 5.4 / 5.7 s
at 10k, 38 / 19 s at 25k, 98 / 15 s at 50k and 181 / 85 s at 100k, IVF finding 100% of the exact
pairs at every size (duplicates land in the same lists).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def normalized(x: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-norm rows (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def similar_pairs(
    x: np.ndarray, threshold: float, index: str = "auto", flat_max: int = 20_000, nprobe: int = 16,
    seed: int = 1, query_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pairs (``(m, 2)`` int64, i < j) with cosine >= ``threshold``, their similarities, and info."""
    import faiss

    n, d = x.shape
    xn = normalized(x)
    kind = index if index != "auto" else ("flat" if n <= flat_max else "ivf")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"index": kind, "n": n}
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32), info
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(max(1, min(n // 39, 4 * np.sqrt(n))))
        quant = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = xn[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        idx.cp.seed = seed
        idx.train(train)
        idx.nprobe = min(nprobe, nlist)
        info.update(nlist=nlist, nprobe=idx.nprobe)
    else:
        raise ValueError(f"unknown index {index!r} (auto | flat | ivf)")
    idx.add(xn)
    info["build_s"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    pi: list[np.ndarray] = []
    pj: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    # faiss compares with a strict '>' for inner products; nudge so ">= threshold" holds
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    for s in range(0, n, query_chunk):
        q = xn[s : s + query_chunk]
        lims, dist, ids = idx.range_search(q, radius)
        qi = np.repeat(np.arange(s, s + len(q), dtype=np.int64), np.diff(lims).astype(np.int64))
        ids = ids.astype(np.int64)
        keep = (ids > qi) & (dist >= threshold)
        pi.append(qi[keep])
        pj.append(ids[keep])
        ps.append(dist[keep].astype(np.float32))
    info["search_s"] = round(time.perf_counter() - t1, 3)
    pairs = np.stack([np.concatenate(pi), np.concatenate(pj)], axis=1) if pi else np.zeros((0, 2), dtype=np.int64)
    sims = np.concatenate(ps) if ps else np.zeros(0, dtype=np.float32)
    if kind == "ivf":  # a pair can be found from both ends; keep it once
        code = pairs[:, 0] * n + pairs[:, 1]
        _, first = np.unique(code, return_index=True)
        pairs, sims = pairs[first], sims[first]
    info["pairs"] = int(len(pairs))
    return pairs, sims, info


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given undirected edges ``pairs``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    g = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    _, labels = connected_components(g, directed=False)
    return labels.astype(np.int64)
