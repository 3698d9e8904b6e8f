"""``tracepipe plan``'s estimates for model stages: requests, tokens, cost and GPU-hours.

For each row stage that drives a model engine (not a ``bulk`` one such as ``replay``), over the
rows the store lacks, before anything is sent and without starting the engine (only tokenizers
load):

- **requests and prompt tokens**: the stage builds the requests :meth:`process` would send
  (:meth:`~tracepipe.stages.base.RowStage.requests`); their chats are counted with the engine's
  own rendering (:meth:`~tracepipe.engines.base.Engine.count_prompt_tokens`: chat template
  applied, as vLLM and its server count them). An engine that cannot count (an ``openai`` engine
  without ``tokenizer:``) gets an approximation (characters / 4), marked as such. A stage that
  cannot build its requests gets ``rows * requests_per_row()`` requests and no token counts.
  A stage that scores token ids (``logprobs``, ``tip``:
  :meth:`~tracepipe.stages.base.RowStage.score_tokens`) sends one request a sequence, whose
  token ids are its prompt tokens (``prompt_tokens_method: token ids``), and no completion tokens.
- **completion tokens**: at most ``max_tokens * n`` a request; estimated from the rows already in
  the stage's store (its ``completion_tokens``; else those of the same stage at other
  fingerprints) as the median and p90 per sample, each capped by the request's ``max_tokens``.
- **cost**: the engine's ``price`` (``batch_discount`` applied for batch-priced engines), for the
  bound, the median and the p90.
- **GPU-hours** (engines that occupy GPUs, :meth:`~tracepipe.engines.base.Engine.gpus`): the
  completion tokens over the throughput that earlier runs of the same engine fingerprint recorded
  (``runs/*.json``: ``spend.engines.<name>``: completion tokens / seconds busy), times the GPUs.

:func:`budget_outlook` compares every budget with the workdir's spend plus the estimates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from tracepipe.contract import DROP_COL, IN_KEY_COL
from tracepipe.engines.base import Engine, GenerationRequest
from tracepipe.pipeline.store import StageStore, list_stage_dirs
from tracepipe.spend import LIMITED, Spend, SpendBook

#: rows turned into requests (and chats counted) at a time
CHUNK_ROWS = 2048


def missing_rows(
    read: Callable[[Any, list[str]], pl.DataFrame], stage: Any, parts: dict[int, Any], keys: dict[int, pl.DataFrame],
    missing: pl.DataFrame,
) -> Iterator[pl.DataFrame]:
    """The rows a row stage would compute (``_in_key`` + the columns it reads; the first row of
    each missing key), one input part at a time."""
    want = missing.select(IN_KEY_COL)
    for j, k in keys.items():
        if not want.height:
            return
        idx = (k.with_row_index("_r").join(want, on=IN_KEY_COL, how="semi", maintain_order="left")
               .unique(IN_KEY_COL, keep="first", maintain_order=True))
        if not idx.height:
            continue
        want = want.join(idx.select(IN_KEY_COL), on=IN_KEY_COL, how="anti")
        df = read(parts[j], stage.input_columns())
        rows = df[idx["_r"]] if df.width else pl.DataFrame()
        yield pl.concat([idx.select(IN_KEY_COL), rows], how="horizontal") if rows.width else idx.select(IN_KEY_COL)


def _approx_tokens(msgs: list[dict[str, str]]) -> int:
    return sum(len(str(m.get("content") or "")) // 4 + 4 for m in msgs) + 3


class _Tally:
    """Requests, prompt tokens and completion-token bounds of a stage's requests."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.requests = self.samples = self.prompt = self.bound = 0
        self.method = "tokenizer"
        self.per_max: dict[int, int] = {}  # max_tokens -> samples asked with it
        self.scores = False  # token ids scored (no completions), not chats sent

    def add_scored(self, lengths: list[int]) -> None:
        """Sequences a scoring stage sends: their token ids are the prompt; nothing is written."""
        self.scores, self.method = True, "token ids"
        self.requests += len(lengths)
        self.samples += len(lengths)
        self.prompt += sum(lengths)

    def add(self, reqs: list[GenerationRequest]) -> None:
        chats: dict[str, list[dict[str, str]]] = {}
        for r in reqs:
            chats.setdefault(json.dumps(r.messages, sort_keys=True), r.messages)
        order = list(chats)
        counts = self.engine.count_prompt_tokens([chats[c] for c in order]) if self.method == "tokenizer" else None
        if counts is None:
            self.method = "approx (chars/4)"
            counts = [_approx_tokens(chats[c]) for c in order]
        tokens = dict(zip(order, counts))
        for r in reqs:
            self.requests += 1
            self.samples += r.n
            self.prompt += tokens[json.dumps(r.messages, sort_keys=True)]
            self.bound += r.sampling.max_tokens * r.n
            self.per_max[r.sampling.max_tokens] = self.per_max.get(r.sampling.max_tokens, 0) + r.n

    def completion(self, per_sample: float) -> int:
        """Completion tokens if each sample wrote ``per_sample`` tokens (capped by its ``max_tokens``)."""
        return int(round(sum(min(float(m), per_sample) * k for m, k in self.per_max.items())))


def observed_completion_tokens(store: StageStore) -> tuple[list[int], str] | None:
    """``completion_tokens`` of the rows in the stage's store (else in its stores at other
    fingerprints), and which store they came from; None when there are none."""
    stores = [store] + [StageStore(store.root, store.stage, d.removeprefix(f"{store.stage}-"))
                        for d in list_stage_dirs(store.root) if d.startswith(f"{store.stage}-") and d != f"{store.stage}-{store.fp}"]
    for s in stores:
        lf = s.scan()
        if lf is None or "completion_tokens" not in lf.collect_schema().names():
            continue
        if DROP_COL in lf.collect_schema().names():
            lf = lf.filter(pl.col(DROP_COL).is_null())
        vals = lf.select(pl.col("completion_tokens").drop_nulls()).collect().to_series().to_list()
        if vals:
            return [int(v) for v in vals], ("this stage" if s is store else f"{s.stage}-{s.fp}")
    return None


def recorded_throughput(workdir: Path | None, fingerprint: str) -> tuple[float, int] | None:
    """Completion tokens per second busy, over earlier runs' engines of this fingerprint
    (``runs/*.json``), and how many runs recorded one."""
    if workdir is None:
        return None
    tokens = seconds = 0.0
    runs = 0
    for p in sorted((workdir / "runs").glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        found = False
        for e in ((data.get("spend") or {}).get("engines") or {}).values():
            if e.get("fingerprint") == fingerprint and (e.get("seconds") or 0) > 0:
                tokens += float((e.get("run") or {}).get("completion_tokens") or 0)
                seconds += float(e["seconds"])
                found = True
        runs += found
    if tokens <= 0 or seconds <= 0:
        return None
    return tokens / seconds, runs


def _quantile(vals: list[int], q: float) -> float:
    s = pl.Series(vals, dtype=pl.Float64)
    return float(s.median() if q == 0.5 else s.quantile(q, interpolation="linear"))  # type: ignore[arg-type]


def _tally(stage: Any, engine: Engine, rows: Iterable[pl.DataFrame]) -> _Tally | None:
    """What the stage would send for ``rows``: the token ids it scores (:meth:`score_tokens`),
    else its requests (:meth:`requests`); None when it cannot tell."""
    tally = _Tally(engine)
    for df in rows:
        for chunk in df.iter_slices(CHUNK_ROWS):
            scored = stage.score_tokens(chunk)
            if scored is not None:
                tally.add_scored(scored)
                continue
            reqs = stage.requests(chunk)
            if reqs is None:
                return None
            tally.add(reqs)
    return tally


def _completion(tally: _Tally, store: StageStore) -> dict[str, Any]:
    """Completion tokens: the bound (``max_tokens * n``), and the median and p90 from the rows
    already stored (none for a scoring stage: it writes nothing)."""
    if tally.scores:
        return {"max": 0, "median": 0, "p90": 0}
    comp: dict[str, Any] = {"max": tally.bound, "median": None, "p90": None}
    seen = observed_completion_tokens(store)
    if seen is not None and tally.samples:
        vals, where = seen
        med, p90 = _quantile(vals, 0.5), _quantile(vals, 0.9)
        comp.update(median=tally.completion(med), p90=tally.completion(p90),
                    per_sample={"median": med, "p90": p90, "rows": len(vals), "from": where})
    return comp


def _gpu_hours(stage: Any, engine: Engine, name: str, comp: dict[str, Any], workdir: Path | None) -> dict[str, Any] | None:
    """Completion tokens over the throughput earlier runs of this engine fingerprint recorded,
    times the engine's GPUs; None without such a run."""
    tp = recorded_throughput(workdir, stage.ctx.engine_fingerprint(name))
    if tp is None:
        return None
    rate, runs = tp
    gpus = engine.gpus()

    def hours(c: int | None) -> float | None:
        return None if c is None else float(f"{c / rate / 3600 * gpus:.4g}")

    return {"max": hours(comp["max"]), "median": hours(comp["median"]), "p90": hours(comp["p90"]),
            "tokens_per_s": round(rate, 2), "gpus": gpus, "runs": runs}


def estimate_stage(
    stage: Any, store: StageStore, rows: Iterable[pl.DataFrame], n_rows: int, workdir: Path | None, partial: bool,
) -> dict[str, Any]:
    """The estimate of one row stage over ``rows`` (its missing rows); {} when it drives no model."""
    names = [n for n in stage.engine_names() if n in stage.ctx.engines]
    if not names:
        return {}
    engine: Engine = stage.ctx.engine(names[0])
    if engine.bulk:
        return {}
    out: dict[str, Any] = {"engine": names[0], "kind": engine.kind, "rows": n_rows, "partial": partial}
    tally = _tally(stage, engine, rows)
    if tally is None:
        out["requests"] = n_rows * stage.requests_per_row()
        return out
    out.update(requests=tally.requests, samples=tally.samples, prompt_tokens=tally.prompt,
               prompt_tokens_method=tally.method)
    comp = out["completion_tokens"] = _completion(tally, store)
    price = engine.config.price
    if price is not None:
        def usd(c: int | None) -> float | None:
            return None if c is None else round(price.cost(tally.prompt, c, engine.batch_priced), 6)

        out["usd"] = {"max": usd(comp["max"]), "median": usd(comp["median"]), "p90": usd(comp["p90"]),
                      "batch_priced": engine.batch_priced}
    if engine.gpus() > 0:  # scoring writes no completion tokens: its GPU time is not measured in them
        out["gpu_hours"] = None if tally.scores else _gpu_hours(stage, engine, names[0], comp, workdir)
    return out


def budget_outlook(estimates: list[dict[str, Any]], spend: dict[str, Any], engine_budgets: dict[str, Any],
                   recipe_budget: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each budget limit against the workdir's spend plus this plan's estimates (bound and
    median): ``fits`` (even at the bound), ``may stop`` (the median fits, the bound does not),
    ``will stop`` (the median, or the bound when there is no median, does not fit)."""
    def planned(ests: list[dict[str, Any]], attr: str, which: str) -> float | None:
        total = 0.0
        for e in ests:
            if attr == "requests":
                v = e.get("requests")
            elif attr == "completion_tokens":
                v = (e.get("completion_tokens") or {}).get(which)
            else:
                v = (e.get("usd") or {}).get(which)
            if v is None:
                return None
            total += float(v)
        return total

    scopes = [(f"engine {n!r}", b, [e for e in estimates if e.get("engine") == n],
               ((spend.get("engines") or {}).get(n) or {}).get("workdir") or {}) for n, b in sorted(engine_budgets.items()) if b]
    if recipe_budget:
        scopes.append(("the recipe", recipe_budget, estimates, spend.get("workdir") or {}))
    out: list[dict[str, Any]] = []
    for who, limits, ests, spent in scopes:
        for key, limit in limits.items():
            attr = LIMITED[key]
            done = float(spent.get(attr) or 0)
            bound, median = planned(ests, attr, "max"), planned(ests, attr, "median")
            if attr == "requests":
                median = bound  # requests are known exactly
            verdict = "unknown"
            if bound is not None and done + bound <= limit:
                verdict = "fits"
            elif median is not None:
                verdict = "may stop" if done + median <= limit else "will stop"
            elif bound is not None:
                verdict = "may stop"
            out.append({"scope": who, "limit": key, "value": limit, "spent": done, "planned_max": bound,
                        "planned_median": median, "verdict": verdict})
    return out


def spend_stats(ctx: Any, stats: Any, plan: bool) -> dict[str, Any]:
    """The ``spend`` of the run stats: the book's summary (this run and the workdir, per engine,
    with fingerprints for the GPU-hours of later plans); in a plan, also :func:`budget_outlook`.
    Closes the book (its ledger file is compacted)."""
    book: SpendBook | None = ctx.spend
    if book is None:
        return {}
    for name in book.meters:
        try:
            book.fingerprints[name] = ctx.engine_fingerprint(name)
        except Exception:  # noqa: BLE001 - a fingerprint that failed was reported where it failed
            pass
    book.close()
    out = book.summary()
    if plan:
        budgets = {n: c.budget.limits() for n, c in ctx.engines.items() if getattr(c, "budget", None) is not None}
        for n in budgets:
            out["engines"].setdefault(n, {"run": Spend().to_dict(), "workdir": Spend().to_dict()})
        ests = [s.estimate for s in stats.stages if s.estimate]
        out["outlook"] = budget_outlook(ests, out, budgets, book.budget.limits() if book.budget else None)
    return out
