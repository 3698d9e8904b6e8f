"""What model work costs: price tables, hard budgets, and the spend ledger of a workdir.

Recipe keys (on any engine, and ``budget`` on the recipe as a whole)::

    engines:
      api:
        kind: openai
        price: {input_per_mtok: 0.55, output_per_mtok: 2.19, batch_discount: 0.5}   # USD per 1M tokens
        budget: {max_usd: 20, max_output_tokens: 5000000, max_requests: 20000}
    budget: {max_usd: 50}                    # every engine of the recipe together

How it works:

- **Accounting.** An engine *charges* what the provider's ``usage`` says (prompt and completion
  tokens) when an answer arrives, and a request when one of its requests is answered; the cost is
  ``prompt * input_per_mtok / 1e6 + completion * output_per_mtok / 1e6``, times
  ``batch_discount`` for an engine that goes through a provider's batch API
  (:attr:`tracepipe.engines.base.Engine.batch_priced`). Answers found in a request journal cost
  nothing and are not charged.
- **Budgets.** Before it dispatches a request, an engine *reserves* its worst case: its prompt
  tokens (counted, or bounded when the engine has no tokenizer), ``max_tokens * n`` completion
  tokens and their price. When the workdir's spend so far, plus what requests in flight reserved,
  plus this reservation could cross a limit of the engine's ``budget`` or the recipe's, the
  reservation raises :class:`~tracepipe.errors.BudgetExceeded` and the engine dispatches nothing
  more in this run: what is in flight finishes and is committed, and the run ends with exit 1.
  A limit is never crossed, so a run stops a little before it (by at most one request's worst case).
- **Ledger.** Charges are appended (one short JSON line each, flushed) to
  ``<workdir>/spend/<time>-<pid>.jsonl`` as they happen, so a ``kill -9`` loses no spend; at the
  end of a run the file is rewritten as one line per engine. The workdir's spend is the sum over
  every file: a budget holds across runs, and a rerun with a raised budget continues from there.
- **Stats.** :meth:`SpendBook.summary` (this run's and the workdir's spend per engine, the
  budgets, how long each engine was busy) goes into ``stats.json`` as ``spend``.

Ray workers get a copy of the book with the spend so far; each keeps its own reservations, so
with the ``ray`` executor a budget holds per worker process, not across them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tracepipe.errors import BudgetExceeded

LEDGER_DIR = "spend"


class Price(BaseModel):
    """Price table of an engine, in USD per million tokens."""

    model_config = ConfigDict(extra="forbid")
    input_per_mtok: float = Field(0.0, ge=0, description="USD per 1M prompt tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per 1M completion tokens (reasoning included)")
    batch_discount: float = Field(
        1.0, gt=0, le=1, description="what a provider's batch API charges, as a fraction of the online price (0.5: half)"
    )

    def cost(self, prompt_tokens: float, completion_tokens: float, batch: bool = False) -> float:
        """USD of that many tokens (at the batch price when ``batch``)."""
        usd = (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6
        return usd * self.batch_discount if batch else usd


class Budget(BaseModel):
    """Hard limits over every run in the workdir (a limit left out is no limit)."""

    model_config = ConfigDict(extra="forbid")
    max_usd: float | None = Field(None, ge=0, description="USD at most (needs a `price` on the engines)")
    max_output_tokens: int | None = Field(None, ge=0, description="completion tokens at most")
    max_requests: int | None = Field(None, ge=0, description="requests at most")

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


#: budget key -> the :class:`Spend` field it limits
LIMITED = {"max_usd": "usd", "max_output_tokens": "completion_tokens", "max_requests": "requests"}


@dataclass
class Spend:
    """Requests, tokens and USD (a total, a charge, or a reservation)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    def add(self, other: Spend, sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.prompt_tokens += sign * other.prompt_tokens
        self.completion_tokens += sign * other.completion_tokens
        self.usd += sign * other.usd

    def plus(self, *others: Spend) -> Spend:
        out = Spend(self.requests, self.prompt_tokens, self.completion_tokens, self.usd)
        for o in others:
            out.add(o)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "usd": round(self.usd, 6)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spend:
        return cls(int(d.get("requests") or d.get("n") or 0), int(d.get("prompt_tokens") or d.get("p") or 0),
                   int(d.get("completion_tokens") or d.get("c") or 0), float(d.get("usd") or 0.0))


def describe(s: Spend, priced: bool = True) -> str:
    """``$0.0421 (12 requests, 3,400 prompt + 1,800 completion tokens)``."""
    money = f"${s.usd:,.4f} " if priced else ""
    return f"{money}({s.requests:,} requests, {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion tokens)"


def read_ledger(workdir: str | Path | None) -> dict[str, Spend]:
    """Spend per engine name over every ledger file of ``workdir`` (a torn last line is skipped)."""
    out: dict[str, Spend] = {}
    if workdir is None:
        return out
    d = Path(workdir) / LEDGER_DIR
    for p in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
        try:
            lines = p.read_bytes().split(b"\n")
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
                out.setdefault(str(rec["e"]), Spend()).add(Spend.from_dict(rec))
            except (ValueError, KeyError, TypeError):
                continue
    return out


@dataclass
class Reservation:
    """What a dispatched request may cost at most; released when it is answered or fails."""

    meter: Meter
    spend: Spend
    released: bool = False

    def release(self) -> None:
        self.meter.release(self)


@dataclass
class Meter:
    """One engine's account in a :class:`SpendBook` (built by :meth:`SpendBook.meter`)."""

    book: SpendBook
    name: str
    price: Price | None = None
    budget: Budget | None = None
    batch: bool = False
    run: Spend = field(default_factory=Spend)  # charged in this process's run
    reserved: Spend = field(default_factory=Spend)  # requests in flight, worst case
    t_first: float | None = None  # first reservation (or charge)
    t_last: float | None = None  # last charge
    stopped: str | None = None  # why a reservation was refused (nothing is dispatched after)

    def limited(self) -> bool:
        """Whether a budget (the engine's or the recipe's) applies to this engine."""
        return self.budget is not None or self.book.budget is not None

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return self.price.cost(prompt_tokens, completion_tokens, self.batch) if self.price else 0.0

    def reserve(self, requests: int, prompt_tokens: int, completion_tokens: int) -> Reservation:
        """Reserve the worst case of ``requests`` requests about to be dispatched; raises
        :class:`BudgetExceeded` (and refuses everything after) when it could cross a budget."""
        want = Spend(requests, prompt_tokens, completion_tokens, self.cost(prompt_tokens, completion_tokens))
        return self.book._reserve(self, want)

    def release(self, r: Reservation) -> None:
        self.book._release(r)

    def charge(self, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record what the provider reported (``usage``) for answered requests."""
        if requests or prompt_tokens or completion_tokens:
            s = Spend(int(requests), int(prompt_tokens), int(completion_tokens), self.cost(prompt_tokens, completion_tokens))
            self.book._charge(self, s)

    def spent(self) -> Spend:
        """The workdir's spend of this engine: earlier runs and this one."""
        with self.book._lock:
            return self.book.before.get(self.name, Spend()).plus(self.run)

    def summary(self) -> dict[str, Any]:
        busy = (self.t_last - self.t_first) if self.t_first is not None and self.t_last is not None else 0.0
        return {
            "run": self.run.to_dict(),
            "workdir": self.spent().to_dict(),
            "seconds": round(max(0.0, busy), 3),
            "price": self.price.model_dump() if self.price else None,
            "batch_priced": self.batch,
            "budget": self.budget.limits() if self.budget else None,
        }


class SpendBook:
    """The spend of one run: engines' meters, the workdir's spend before it, the ledger file.

    ``workdir`` None keeps everything in memory (an engine used outside a run). Thread-safe."""

    def __init__(self, workdir: str | Path | None = None, budget: Budget | None = None, write: bool = True) -> None:
        self.workdir = Path(workdir) if workdir is not None else None
        self.budget = budget
        self.write = write and self.workdir is not None
        self.before = read_ledger(self.workdir)
        self.meters: dict[str, Meter] = {}
        self.stopped: str | None = None  # why the recipe's budget refused a request
        self.fingerprints: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fh: Any = None
        self._path: Path | None = None

    # -- pickling (Ray workers): no file handle, no lock --------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_lock=None, _fh=None, _path=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- meters --------------------------------------------------------------------------------
    def meter(self, name: str, price: Price | None = None, budget: Budget | None = None, batch: bool = False) -> Meter:
        """The account of engine ``name`` (made on first use; later calls return the same one)."""
        with self._lock:
            m = self.meters.get(name)
            if m is None:
                m = self.meters[name] = Meter(self, name, price, budget, batch)
            return m

    def total(self) -> Spend:
        """Every engine's spend in the workdir (earlier runs and this one)."""
        with self._lock:
            return self._total()

    def _total(self) -> Spend:
        out = Spend()
        for s in self.before.values():
            out.add(s)
        for m in self.meters.values():
            out.add(m.run)
        return out

    def _reserved(self) -> Spend:
        out = Spend()
        for m in self.meters.values():
            out.add(m.reserved)
        return out

    # -- the gate ------------------------------------------------------------------------------
    def _reserve(self, m: Meter, want: Spend) -> Reservation:
        with self._lock:
            m.t_first = m.t_first if m.t_first is not None else time.monotonic()
            why = m.stopped or self.stopped
            if why is None:
                why = m.stopped = self._crossing(f"engine {m.name!r}", m.budget, self.before.get(m.name, Spend()).plus(m.run),
                                                 m.reserved, want)
            if why is None:
                why = self._crossing("the recipe", self.budget, self._total(), self._reserved(), want)
                if why is not None:
                    self.stopped = why
            if why is not None:
                raise BudgetExceeded(why, engine=m.name)
            m.reserved.add(want)
            return Reservation(m, want)

    @staticmethod
    def _crossing(who: str, budget: Budget | None, spent: Spend, reserved: Spend, want: Spend) -> str | None:
        """Why ``want`` could cross ``budget`` (None when it cannot)."""
        if budget is None:
            return None
        for key, limit in budget.limits().items():
            attr = LIMITED[key]
            now = getattr(spent, attr) + getattr(reserved, attr)
            if now + getattr(want, attr) > limit + 1e-12:
                nxt = f"${want.usd:,.4f}" if attr == "usd" else f"{getattr(want, attr):,} {attr.replace('_', ' ')}"
                return f"budget of {who} reached ({key}: {limit:g}; the next request could take up to {nxt})"
        return None

    def _release(self, r: Reservation) -> None:
        with self._lock:
            if not r.released:
                r.released = True
                r.meter.reserved.add(r.spend, -1)

    def _charge(self, m: Meter, s: Spend) -> None:
        with self._lock:
            m.run.add(s)
            now = time.monotonic()
            m.t_first = m.t_first if m.t_first is not None else now
            m.t_last = now
            if self.write:
                self._append({"e": m.name, "n": s.requests, "p": s.prompt_tokens, "c": s.completion_tokens, "usd": s.usd})

    # -- ledger --------------------------------------------------------------------------------
    def _append(self, rec: dict[str, Any]) -> None:
        if self._fh is None:
            assert self.workdir is not None
            d = self.workdir / LEDGER_DIR
            d.mkdir(parents=True, exist_ok=True)
            self._path = d / f"{time.time_ns():020d}-{os.getpid()}.jsonl"
            self._fh = open(self._path, "ab")
        self._fh.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        self._fh.flush()  # in the OS page cache: survives kill -9 of this process

    def close(self) -> None:
        """Rewrite this run's ledger file as one line per engine (the totals)."""
        with self._lock:
            if self._fh is None or self._path is None:
                return
            self._fh.close()
            self._fh = None
            totals = self._own_totals()
            tmp = self._path.with_suffix(".tmp")
            with open(tmp, "w") as fh:
                for name, s in totals.items():
                    fh.write(json.dumps({"e": name, **s.to_dict()}, separators=(",", ":")) + "\n")
            os.replace(tmp, self._path)

    def _own_totals(self) -> dict[str, Spend]:
        """This process's charges per engine, read back from its own ledger file."""
        out: dict[str, Spend] = {}
        assert self._path is not None
        for line in self._path.read_bytes().split(b"\n"):
            try:
                rec = json.loads(line)
                out.setdefault(str(rec["e"]), Spend()).add(Spend.from_dict(rec))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    # -- stats ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """This run's and the workdir's spend per engine and in total, with the budgets."""
        engines = {name: {**m.summary(), **({"fingerprint": self.fingerprints[name]} if name in self.fingerprints else {})}
                   for name, m in sorted(self.meters.items())}
        with self._lock:
            for name, s in self.before.items():  # engines of earlier runs this run did not use
                engines.setdefault(name, {"run": Spend().to_dict(), "workdir": s.to_dict()})
            run = Spend()
            for m in self.meters.values():
                run.add(m.run)
            total = self._total()
        return {
            "engines": engines,
            "run": run.to_dict(),
            "workdir": total.to_dict(),
            "budget": self.budget.limits() if self.budget else None,
            "stopped": self.stopped or next((m.stopped for m in self.meters.values() if m.stopped), None),
        }


def stop_message(book: SpendBook, e: BudgetExceeded, where: str) -> str:
    """What a run that a budget stopped says: the limit, what was spent (in the workdir and in
    this run), how many rows of the stage remain, and what to do."""
    meter = book.meters.get(e.engine)
    if meter is None or meter.stopped is None:  # the recipe's budget: every engine together
        spent = book.total()
        run = Spend().plus(*(m.run for m in book.meters.values()))
        priced = all(m.price is not None for m in book.meters.values())
    else:
        spent, run, priced = meter.spent(), meter.run, meter.price is not None
    left = (f"{e.remaining:,} of {e.to_compute:,} rows of this stage remain" if e.remaining is not None and e.to_compute is not None
            else "rows remain")
    return (f"{where}: {e}. Spent {describe(spent, priced)} in this workdir, {describe(run, priced)} in this run. "
            f"Stopped dispatching; the requests in flight finished and are committed. {left}; later stages did not run. "
            "Raise the `budget` and run again: nothing committed or already answered is asked again.")
