"""Stage contract: base classes for row stages and set stages.

A stage is one class in one file under ``tracepipe/stages/``, registered under the name recipes
use. It declares:

- ``Params``: a pydantic model of its recipe parameters (unknown keys are errors);
- ``reads``: the input columns whose values define the row key (cache key) of a row;
- ``adds``: the columns it writes;
- ``version``: bumped whenever its output for the same input changes.

Stages know nothing of the store or the executor. A **row stage** maps a batch of input rows to
output rows (0..n per input row) in :meth:`RowStage.process`; its results are cached per row key.
A **set stage** sees the whole current table (only the columns it reads) in
:meth:`SetStage.decide` and must be cheap and deterministic.

Conventions of the frames a stage returns (all optional except ``_in_key`` / ``_key``):

- ``_in_key`` (row stages) / ``_key`` (set stages): which input row the output row belongs to;
- ``_drop``: a reason string for rows the stage rejects (kept, queryable, never silently lost);
- ``_error``: an error string for rows that failed (quarantined).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tracepipe.contract import DROP_COL, ERROR_COL, IN_KEY_COL, KEY_COL  # noqa: F401 - DROP_COL, ERROR_COL re-exported

if TYPE_CHECKING:  # pragma: no cover
    from tracepipe.engines.base import Engine, GenerationRequest


def ExecField(default: Any = None, **kw: Any) -> Any:  # noqa: N802 - reads like pydantic's Field
    """A parameter that changes how a stage runs but never what it outputs (batch size, workers).

    Execution parameters are left out of the stage fingerprint, so changing them keeps the cache.
    """
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra["execution"] = True
    return Field(default, json_schema_extra=extra, **kw)


class StageParams(BaseModel):
    """Base of every stage's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def output_params(self) -> dict[str, Any]:
        """Parameters that change output (everything not declared with :func:`ExecField`)."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("execution"):
                continue
            out[name] = getattr(self, name)
        return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class StageContext:
    """What a stage may see of the run: engines by name, paths, options. Never the store."""

    recipe_name: str = "recipe"
    recipe_dir: Path = field(default_factory=Path.cwd)
    workdir: Path = field(default_factory=lambda: Path(".tracepipe"))
    engines: dict[str, Any] = field(default_factory=dict)  # name -> engine config model
    options: dict[str, Any] = field(default_factory=dict)
    #: (unix time, engine name, "start" | "release"), in order: when each engine lived
    engine_events: list[tuple[float, str, str]] = field(default_factory=list)
    #: the run's :class:`tracepipe.spend.SpendBook` (prices, budgets, usage); engines charge it
    spend: Any = None
    _live: dict[str, Engine] = field(default_factory=dict, repr=False)

    def engine(self, name: str) -> Engine:
        """The engine named in the recipe, built once per process and shared by the stages
        that name it until :meth:`release`."""
        if name not in self._live:
            from tracepipe.engines import build_engine

            if name not in self.engines:
                raise KeyError(f"engine {name!r} is not defined in the recipe's `engines` (have: {sorted(self.engines)})")
            eng = build_engine(self.engines[name], self)
            eng.name = name
            eng.on_start = lambda: self.engine_events.append((time.time(), name, "start"))
            self._live[name] = eng
        return self._live[name]

    def live(self, name: str) -> Engine | None:
        """The engine if this run built it (and has not released it)."""
        return self._live.get(name)

    def release(self, name: str) -> dict[str, float]:
        """Close an engine no later stage needs (vLLM: engine core, weights and KV cache freed);
        returns its last usage counters."""
        eng = self._live.pop(name, None)
        if eng is None:
            return {}
        usage = eng.usage()
        eng.close()
        self.engine_events.append((time.time(), name, "release"))
        return usage

    def engine_fingerprint(self, name: str) -> str:
        from tracepipe.engines import engine_fingerprint

        if name not in self.engines:
            raise KeyError(f"engine {name!r} is not defined in the recipe's `engines` (have: {sorted(self.engines)})")
        return engine_fingerprint(self.engines[name], self)

    def engine_row_columns(self, name: str | None) -> list[str]:
        """Row columns an engine reads (e.g. a replay engine's column): part of the row key."""
        if not name or name not in self.engines:
            return []
        return list(self.engine(name).row_columns())

    def resolve_path(self, p: str | Path) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.recipe_dir / path)

    def close(self) -> None:
        for name in list(self._live):
            try:
                self.release(name)
            except Exception:  # pragma: no cover - best effort
                self._live.pop(name, None)

    def __getstate__(self) -> dict[str, Any]:  # live engines never cross process boundaries
        state = dict(self.__dict__)
        state["_live"] = {}
        return state


class Stage(ABC):
    """Common part of row and set stages."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["row", "set"]] = "row"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: StageParams, ctx: StageContext | None = None) -> None:
        self.params = params
        self.ctx = ctx or StageContext()

    # -- declarations the runner uses -------------------------------------------------------
    def input_columns(self) -> list[str]:
        """Columns whose values define a row's cache key (may depend on params)."""
        return list(self.reads)

    def output_columns(self) -> list[str]:
        return list(self.adds)

    def fingerprint_extra(self) -> dict[str, Any]:
        """Anything beyond params and version that changes output (e.g. an engine fingerprint)."""
        return {}

    def engine_names(self) -> list[str]:
        """Engines (names under the recipe's ``engines``) this stage drives; the first one sets
        how its rows are streamed. The runtime starts an engine before the first stage that names
        it and releases it after the last one."""
        return []

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "version": self.version,
            "params": self.params.output_params(),
            "reads": sorted(self.input_columns()),
            **self.fingerprint_extra(),
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load what processing needs (models, indexes). Called once per worker."""

    def teardown(self) -> None:
        """Release what :meth:`setup` loaded."""

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        """Extra stats over this stage's output rows (e.g. compression ratios); cheap."""
        return {}


class RowStage(Stage):
    """Maps each input row to 0..n output rows; results cached per row key.

    ``process`` gets a batch with ``_in_key`` (unique) and the columns of :meth:`input_columns`
    and returns a frame with ``_in_key`` plus the added columns, one row per output row (in
    order), ``_drop`` for rejected rows and ``_error`` for failed ones.
    """

    kind: ClassVar[Literal["row", "set"]] = "row"
    #: run in a process pool (pure-CPU Python work); model stages stay in-process.
    cpu_bound: ClassVar[bool] = False
    #: one input row may give several output rows (``generate``'s samples): each output row gets
    #: its own ``_key`` (``<parent>/<stage>:<i>``) and ``_parent``.
    fanout: ClassVar[bool] = False
    #: rows per committed store part (and per ``process`` call, unless the stage streams).
    batch_size: ClassVar[int] = 2048

    @abstractmethod
    def process(self, batch: pl.DataFrame) -> pl.DataFrame: ...

    def rows_per_batch(self) -> int:
        bs = getattr(self.params, "batch_size", None)
        return int(bs) if isinstance(bs, int) and bs > 0 else self.batch_size

    def stores_rows(self) -> bool:
        """Whether results are kept in the per-row store. A stage whose work is cheaper than
        storing it (a SQL ``filter`` or ``map``) says False and is recomputed over each part."""
        return True

    def requests_per_row(self) -> int:
        """Engine requests one input row makes (``generate``: ``n``): sizes the stream."""
        return 1

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest] | None:
        """The engine requests :meth:`process` would send for these rows (``_in_key`` and the
        input columns), built without calling the engine: ``tracepipe plan`` counts and prices
        them. None: the stage cannot tell (plan then counts ``rows * requests_per_row()``)."""
        return None

    def score_tokens(self, batch: pl.DataFrame) -> list[int] | None:
        """For a stage that scores token ids (:meth:`Engine.score`) instead of sending chats: the
        length of each sequence :meth:`process` would score for these rows (rows it would drop
        left out), found without starting the engine; ``tracepipe plan`` counts them as prompt
        tokens with no completion. None: the stage does not score, or cannot tell yet."""
        return None

    def length_of(self, batch: pl.DataFrame) -> pl.Series | None:
        """Work per row, if the stage knows it (text length to embed): the runtime then hands
        ``process`` rows of like length together, so a padded forward pass wastes little."""
        return None


class SetStage(Stage):
    """Decides over the whole current table (dedup decisions, aggregation, selection).

    ``decide`` gets ``_key``, ``_ord`` (stable order) and the columns of :meth:`input_columns`
    and returns ``_key`` plus ``_drop`` (reason or null) and any added columns. Rows missing from
    its result are dropped with reason ``"<stage>: not selected"``.
    """

    kind: ClassVar[Literal["row", "set"]] = "set"

    def prepares(self) -> bool:
        """Whether :meth:`prepare` reduces the input columns (the runner then caches it per part)."""
        return False

    def caches_decision(self) -> bool:
        """Whether the runner stores decisions by input digest (False when deciding again costs
        less than writing and reading the decision back)."""
        return True

    def prepare(self, df: pl.DataFrame) -> pl.DataFrame:
        """Row-local, deterministic reduction of the input columns (same rows, same order).

        Gets the columns of :meth:`input_columns` the rows have; returns what :meth:`decide`
        needs (a text hash instead of the text, say). The runner caches the result per frame
        part, so a rerun after an append prepares only the new part and ``decide`` reads compact
        columns. The default keeps the columns as they are.
        """
        return df

    @abstractmethod
    def decide(self, df: pl.DataFrame) -> pl.DataFrame: ...


class FilterStage(RowStage):
    """A row stage that only keeps or drops rows (``keep`` returns a reason or None per row)."""

    adds: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def reasons(self, batch: pl.DataFrame) -> pl.Series:
        """One entry per row: null to keep, else the reason it is dropped."""

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        reasons = self.reasons(batch)
        return pl.DataFrame({IN_KEY_COL: batch.get_column(IN_KEY_COL), DROP_COL: reasons.cast(pl.String)})
