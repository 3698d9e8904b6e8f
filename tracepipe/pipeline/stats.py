"""Per-stage counters: rows in/out, cached vs computed, drops by reason, errors, time, tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageStats:
    index: int
    name: str
    kind: str
    fingerprint: str = ""
    rows_in: int = 0
    rows_out: int = 0
    keys: int = 0  # distinct row keys (row stages) / rows decided (set stages)
    cached: int = 0  # keys whose results came from the store
    computed: int = 0  # keys processed in this run
    to_compute: int = 0  # plan: keys missing from the store
    upstream_pending: bool = False  # plan: an earlier stage still has work, so counts are partial
    parts: int = 0  # frame parts in
    parts_reused: int = 0  # of them, parts whose output came from the frame cache (no work)
    parts_prepared: int = 0  # set stages: parts whose prepare() ran in this run (the rest were cached)
    dropped: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # rows quarantined
    error_keys: int = 0  # distinct row keys that failed
    seconds: float = 0.0
    compute_seconds: float = 0.0
    tokens: int = 0
    parts_committed: int = 0  # store parts this run committed (streamed stages commit as they go)
    followed: dict[str, Any] = field(default_factory=dict)  # CPU stages run on its commits while it streamed
    engines: dict[str, Any] = field(default_factory=dict)  # engine name -> usage counters
    estimate: dict[str, Any] = field(default_factory=dict)  # plan: requests, tokens, cost, GPU-hours (pipeline/estimate.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.computed / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows_per_s"] = round(self.rows_per_s, 2)
        d["seconds"] = round(self.seconds, 3)
        d["compute_seconds"] = round(self.compute_seconds, 3)
        return d


@dataclass
class RunStats:
    recipe: str
    run_id: str
    mode: str = "run"
    source_rows: int = 0
    source_seconds: float = 0.0
    source_bad_lines: int = 0  # quarantined lines of the source files
    stages: list[StageStats] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    engines: list[dict[str, Any]] = field(default_factory=list)  # when each engine started / was released
    spend: dict[str, Any] = field(default_factory=dict)  # this run's and the workdir's spend (tracepipe.spend)
    seconds: float = 0.0
    ok: bool = True
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "run_id": self.run_id,
            "mode": self.mode,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "source": {"rows": self.source_rows, "bad_lines": self.source_bad_lines, "seconds": round(self.source_seconds, 3)},
            "stages": [s.to_dict() for s in self.stages],
            "outputs": self.outputs,
            "engines": self.engines,
            "spend": self.spend,
        }
