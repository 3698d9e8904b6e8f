"""Mixture quotas for ``select``: exact marginal counts over one or two columns.

``quotas: {domain: {math: 0.7, code: 0.3}, difficulty: {easy: 0.2, medium: 0.5, hard: 0.3}}``
with ``size: 1000`` asks for 700 math / 300 code rows *and* 200 easy / 500 medium / 300 hard rows.
Fractions become counts by largest remainder (they add up to ``size`` exactly); integer quotas
are counts. With two columns the joint cells start from the independent split
(``floor(r_i * c_j / N)``, capped by the rows available in each cell) and a max-flow
(Edmonds-Karp on the bipartite graph row-label -> column-label, cell capacity = rows available)
completes it, so both marginals hold exactly whenever *any* allocation with those marginals
exists; otherwise the flow is the largest feasible selection and the shortfall is reported per
label.
"""

from __future__ import annotations

import math
from collections import deque

Cell = tuple[str, ...]


def quota_counts(weights: dict[str, float], size: int | None, what: str) -> dict[str, int]:
    """Integer quota per label: integer counts as given, or fractions (summing to 1) of ``size``."""
    if not weights:
        raise ValueError(f"quotas.{what}: empty")
    vals = list(weights.values())
    if any(v < 0 for v in vals):
        raise ValueError(f"quotas.{what}: negative quota")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        out = {k: int(v) for k, v in weights.items()}
        if size is not None and sum(out.values()) != size:
            raise ValueError(f"quotas.{what}: counts add up to {sum(out.values())}, not size {size}")
        return out
    if not math.isclose(sum(vals), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"quotas.{what}: give fractions that sum to 1, or integer counts (got {weights})")
    if size is None:
        raise ValueError(f"quotas.{what}: fractions need `size`")
    total = sum(vals)
    raw = {k: v / total * size for k, v in weights.items()}
    out = {k: int(math.floor(r + 1e-9)) for k, r in raw.items()}
    rest = max(0, size - sum(out.values()))
    # largest remainder; ties keep the labels' order as written
    for k in sorted(raw, key=lambda k: -(raw[k] - out[k]))[:rest]:
        out[k] += 1
    return out


def targets(quotas: dict[str, dict[str, float]], size: int | None) -> tuple[int, dict[str, dict[str, int]]]:
    """(total, per-column label counts); every column's counts add up to the same total."""
    per = {col: quota_counts(w, size, col) for col, w in quotas.items()}
    totals = {col: sum(c.values()) for col, c in per.items()}
    if len(set(totals.values())) > 1:
        raise ValueError(f"quotas: columns ask for different totals {totals}; give `size` with fractions, or equal counts")
    return next(iter(totals.values())), per


def _max_flow(rows: list[str], cols: list[str], r: dict[str, int], c: dict[str, int],
              cap: dict[tuple[str, str], int], flow: dict[tuple[str, str], int]) -> None:
    """Augment ``flow`` (a feasible start) to a maximum flow, in place (Edmonds-Karp)."""
    src, snk = ("s",), ("t",)

    def nid(kind: str, label: str) -> tuple[str, str]:
        return (kind, label)

    while True:
        used_r = {i: sum(flow[(i, j)] for j in cols) for i in rows}
        used_c = {j: sum(flow[(i, j)] for i in rows) for j in cols}
        prev: dict[tuple[str, ...], tuple[tuple[str, ...], int] | None] = {src: None}
        q: deque[tuple[str, ...]] = deque([src])
        while q and snk not in prev:
            u = q.popleft()
            nbrs: list[tuple[tuple[str, ...], int]] = []
            if u == src:
                nbrs = [(nid("r", i), r[i] - used_r[i]) for i in rows]
            elif u[0] == "r":
                i = u[1]
                nbrs = [(nid("c", j), cap[(i, j)] - flow[(i, j)]) for j in cols]
                nbrs.append((src, used_r[i]))  # reverse of source edge (never useful, harmless)
            elif u[0] == "c":
                j = u[1]
                nbrs = [(nid("r", i), flow[(i, j)]) for i in rows]  # reverse of cell edges
                nbrs.append((snk, c[j] - used_c[j]))
            for v, res in nbrs:
                if res > 0 and v not in prev:
                    prev[v] = (u, res)
                    q.append(v)
        if snk not in prev:
            return
        # bottleneck and augment
        path: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        v: tuple[str, ...] = snk
        bott = math.inf
        while prev[v] is not None:
            u, res = prev[v]  # type: ignore[misc]
            bott = min(bott, res)
            path.append((u, v))
            v = u
        amount = int(bott)
        for u, v in path:
            if u[0] == "r" and v[0] == "c":
                flow[(u[1], v[1])] += amount
            elif u[0] == "c" and v[0] == "r":
                flow[(v[1], u[1])] -= amount


def allocate(per: dict[str, dict[str, int]], available: dict[Cell, int]) -> dict[Cell, int]:
    """Rows to take per cell (a tuple of labels, one per quota column, in ``per`` order)."""
    cols = list(per)
    if len(cols) == 1:
        (col,) = cols
        return {(lab,): min(q, available.get((lab,), 0)) for lab, q in per[col].items()}
    if len(cols) != 2:
        raise ValueError(f"quotas: at most two columns (got {cols})")
    a, b = cols
    r, c = per[a], per[b]
    n = sum(r.values())
    rows, colls = list(r), list(c)
    cap = {(i, j): available.get((i, j), 0) for i in rows for j in colls}
    flow = {(i, j): min(cap[(i, j)], (r[i] * c[j]) // n if n else 0) for i in rows for j in colls}
    _max_flow(rows, colls, r, c, cap, flow)
    return {(i, j): flow[(i, j)] for i in rows for j in colls}
