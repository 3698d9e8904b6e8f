"""``tracepipe report RECIPE``: one HTML page with PNG plots of the last run and its outputs.

Inputs: ``<workdir>/stats.json`` (the last run), ``<workdir>/runs/*.json`` (every run, for
throughput over time) and, per output, the written shards plus the ``summary.json`` the writer
left next to them. Plots: trace lengths before/after compression, per-problem pass rates,
difficulty bands, rows kept/dropped per stage, throughput per stage. The page and its PNGs go to
``<workdir>/report/`` (or ``--output``); images are plain files next to ``report.html``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
from markupsafe import Markup

from tracepipe import _browser
from tracepipe.locations import output_location
from tracepipe.outputs import _card, _plots
from tracepipe.outputs._writer import split_expr
from tracepipe.secrets import Scrubber

REPORT_TEMPLATE = "report.html.j2"
ASSISTANT_COLUMNS = ("messages", "completion", "conversations", "chosen")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_runs(workdir: Path) -> list[dict[str, Any]]:
    """Every recorded run (``runs/*.json``), oldest first."""
    runs = [r for r in (_read_json(p) for p in sorted((workdir / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)) if r]
    return [r for r in runs if r.get("mode", "run") == "run"]


def _assistant_text(lf: pl.LazyFrame) -> pl.Expr | None:
    """The last turn's text of a shard row, whatever the format."""
    schema = lf.collect_schema()
    for col in ASSISTANT_COLUMNS:
        if col not in schema:
            continue
        dtype = schema[col]
        if dtype == pl.String:
            return pl.col(col)
        if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
            field = "value" if "value" in [f.name for f in dtype.inner.fields] else "content"
            return pl.col(col).list.last().struct.field(field)
    return None


def shard_stats(out: Path) -> dict[str, Any]:
    """What the shards themselves say: rows, bytes, row groups, assistant-turn lengths, bands."""
    import pyarrow.parquet as pq

    shards = sorted((out / "data").glob("*.parquet"))
    info: dict[str, Any] = {"shards": [], "assistant_len": None, "bands": {}, "pass_rate": None}
    for p in shards:
        md = pq.ParquetFile(p).metadata
        info["shards"].append({"file": f"data/{p.name}", "rows": md.num_rows, "bytes": p.stat().st_size,
                               "row_groups": md.num_row_groups})
    if not shards:
        return info
    lf = pl.scan_parquet([str(p) for p in shards])
    schema = lf.collect_schema()
    text = _assistant_text(lf)
    if text is not None:
        lens = lf.select((text.str.len_chars().cast(pl.Float64) / 4.0).alias("n")).collect()["n"].drop_nulls().to_numpy()
        info["assistant_len"] = _card.hist(lens)
    per = lf.select([c for c in ("id", "difficulty", "pass_rate") if c in schema])
    if "id" in schema and ("difficulty" in schema or "pass_rate" in schema):
        df = per.unique("id", keep="first", maintain_order=True).collect()
        if "difficulty" in df.columns:
            info["bands"] = _card.band_sorted({str(k): int(v) for k, v in df.group_by("difficulty").len().iter_rows()})
        if "pass_rate" in df.columns:
            info["pass_rate"] = _card.hist(df["pass_rate"].cast(pl.Float64).drop_nulls().to_numpy(), edges=[i / 10 for i in range(11)])
    return info


def _output_section(recipe: Any, spec: Any, out_dir: Path, index: int) -> dict[str, Any]:
    loc = output_location(recipe, spec)
    sec: dict[str, Any] = {"index": index, "format": spec.format, "path": loc, "written": False, "plots": {}}
    if "://" in loc or not (Path(loc) / "output.json").exists():
        return sec
    out = Path(loc)
    sec["written"] = True
    summary = _read_json(out / "summary.json") or {}
    shards = shard_stats(out)
    sec.update(summary=summary, shards=shards)
    tag = f"out{index}"
    lengths = summary.get("lengths") or {}
    hists = dict(lengths.get("hists") or {})
    unit = lengths.get("unit") or "≈ tokens, chars/4"
    if not hists and shards.get("assistant_len"):
        hists = {"assistant turn in the shards": shards["assistant_len"]}
        unit = "≈ tokens, chars/4"
    if _plots.histograms(out_dir / f"{tag}_token_lengths.png", hists, "trace length before / after compression", unit):
        sec["plots"]["lengths"] = f"{tag}_token_lengths.png"
    diff = summary.get("difficulty") or {}
    pass_hist = diff.get("pass_rate") or shards.get("pass_rate")
    bands = diff.get("bands") or shards.get("bands") or {}
    if pass_hist and _plots.histograms(out_dir / f"{tag}_pass_rate.png", {"problems": pass_hist}, "per-problem pass rate", "correct / samples", "problems"):
        sec["plots"]["pass_rate"] = f"{tag}_pass_rate.png"
    if _plots.bars(out_dir / f"{tag}_difficulty.png", bands, "problems per difficulty band", "problems"):
        sec["plots"]["difficulty"] = f"{tag}_difficulty.png"
    verification = summary.get("verification")
    if verification and _plots.bars(out_dir / f"{tag}_verdicts.png", verification["all"]["counts"], "verdicts of all verified samples", "samples"):
        sec["plots"]["verdicts"] = f"{tag}_verdicts.png"
    return sec


def label_audits(stats: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """What the ``judge`` and ``gold_audit`` stages left in the run stats: the judge's counts and
    its disagreements with the rules, and the problems whose gold answer the samples dispute."""
    out: dict[str, list[dict[str, Any]]] = {"judge": [], "gold": []}
    for s in (stats or {}).get("stages", []):
        extra = s.get("extra") or {}
        key = {"judge": "judge", "gold_audit": "gold"}.get(s.get("name", ""))
        if key and extra:
            out[key].append({"index": s.get("index"), **extra})
    return out


def build_report(recipe: Any, output_dir: Path | None = None, browser_limits: _browser.Limits | None = None) -> Path:
    """Write ``report.html`` and its PNGs; returns the path of ``report.html``.

    ``browser_limits``: rows, megabytes of text and tokens per row the trace browser embeds."""
    workdir = Path(recipe.workdir_path())
    out_dir = Path(output_dir) if output_dir is not None else workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    stats = _read_json(workdir / "stats.json")
    runs = load_runs(workdir)
    plots: dict[str, str] = {}
    if stats and _plots.drops(out_dir / "drops_per_stage.png", stats.get("stages", [])):
        plots["drops"] = "drops_per_stage.png"
    if _plots.throughput(out_dir / "throughput_per_stage.png", runs or ([stats] if stats else [])):
        plots["throughput"] = "throughput_per_stage.png"
    outputs = [_output_section(recipe, spec, out_dir, i) for i, spec in enumerate(recipe.outputs)]
    env = _card.jinja_env(autoescape=True)
    # the trace browser: every row of the last write (sampled beyond browser_limits.rows), and the rejects
    browser = _browser.report_section(recipe, split_expr, browser_limits or _browser.Limits())
    html = env.get_template(REPORT_TEMPLATE).render(
        name=recipe.name, workdir=str(workdir), stats=stats, runs=runs, plots=plots, outputs=outputs,
        browser=Markup(browser) if browser else None, audits=label_audits(stats),
    )
    path = out_dir / "report.html"
    path.write_text(Scrubber.for_recipe(recipe).text(html))
    return path
