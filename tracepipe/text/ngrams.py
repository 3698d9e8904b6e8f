"""N-gram overlap index for decontamination.

Every benchmark item is tokenized with :func:`tracepipe.text.normalize.match_tokens` and indexed
by its distinct ``n``-grams. An item shorter than ``n`` tokens is indexed as one n-gram (the
whole item) when it has at least ``min_n`` tokens; shorter items cannot be matched by n-grams.

The score of a text against an item is the share of the item's distinct n-grams that occur in
the text (1.0 when the whole item occurs verbatim after normalization, whatever surrounds it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tracepipe.text.normalize import match_tokens


@dataclass(frozen=True)
class Match:
    item: int  # index into the indexed items
    score: float  # share of the item's n-grams found in the text
    matched: int  # how many of its distinct n-grams


class NgramIndex:
    def __init__(self, texts: Sequence[str], n: int = 13, min_n: int = 3) -> None:
        self.n = n
        self.min_n = min_n
        self._index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self._short: dict[str, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)  # first token ->
        self._short_items: dict[tuple[str, ...], list[int]] = defaultdict(list)  # whole short item -> items
        self.totals: list[int] = []  # distinct n-grams per item (0: too short to match)
        for i, text in enumerate(texts):
            toks = match_tokens(text)
            if len(toks) >= n:
                grams = {tuple(toks[j : j + n]) for j in range(len(toks) - n + 1)}
                for g in grams:
                    self._index[g].append(i)
                self.totals.append(len(grams))
            elif len(toks) >= min_n:
                full = tuple(toks)
                if full not in self._short_items:
                    self._short[toks[0]].append((len(full), full))
                self._short_items[full].append(i)
                self.totals.append(1)
            else:
                self.totals.append(0)

    @property
    def unmatchable(self) -> list[int]:
        """Items with fewer than ``min_n`` tokens (never matched by n-grams)."""
        return [i for i, t in enumerate(self.totals) if t == 0]

    def __len__(self) -> int:
        return len(self.totals)

    def matches(self, text: str | None) -> list[Match]:
        """Every indexed item sharing at least one n-gram with ``text``, best first."""
        toks = match_tokens(text)
        hits: dict[int, set[tuple[str, ...]]] = defaultdict(set)
        n = self.n
        index = self._index
        for j in range(len(toks) - n + 1):
            g = tuple(toks[j : j + n])
            items = index.get(g)
            if items:
                for it in items:
                    hits[it].add(g)
        short_hits: set[int] = set()
        if self._short:
            for j, tok in enumerate(toks):
                cands = self._short.get(tok)
                if cands:
                    for length, full in cands:
                        if tuple(toks[j : j + length]) == full:
                            short_hits.update(self._short_items[full])
        out = [Match(it, len(gs) / self.totals[it], len(gs)) for it, gs in hits.items()]
        out += [Match(it, 1.0, 1) for it in short_hits]
        out.sort(key=lambda m: (-m.score, m.item))
        return out

    def best(self, text: str | None) -> Match | None:
        m = self.matches(text)
        return m[0] if m else None
