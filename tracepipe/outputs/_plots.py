"""PNG plots for dataset cards and ``tracepipe report`` (matplotlib, Agg backend, no display).

Every function takes already-aggregated numbers (histogram counts, per-stage counters) so the card
and the report draw the same pictures from ``summary.json`` / ``stats.json`` without re-reading
the rows. Each returns the path written, or None when there was nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # no timestamps in the PNG metadata: the same data gives the same bytes (re-push skips it)
    fig.savefig(path, dpi=100, format="png", metadata={"Software": None})
    _plt().close(fig)
    return path


def histograms(path: Path, hists: dict[str, dict[str, Any]], title: str, xlabel: str, ylabel: str = "rows") -> Path | None:
    """Overlaid histograms; each value is ``{"edges": [...], "counts": [...]}`` (shared edges)."""
    hists = {k: h for k, h in hists.items() if h and sum(h.get("counts") or []) > 0}
    if not hists:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, h) in enumerate(hists.items()):
        edges, counts = h["edges"], h["counts"]
        widths = [edges[j + 1] - edges[j] for j in range(len(counts))]
        extra = f" (n={h.get('n', sum(counts))}, median {h['p50']:.0f})" if h.get("p50") is not None else ""
        ax.bar(edges[:-1], counts, width=widths, align="edge", alpha=0.55 if len(hists) > 1 else 0.85,
               color=COLORS[i % len(COLORS)], label=label + extra, edgecolor="white", linewidth=0.3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bars(path: Path, counts: dict[str, float], title: str, ylabel: str, xlabel: str = "", annotate: bool = True) -> Path | None:
    """A bar chart of ``label -> value`` (in the given order)."""
    if not counts or not any(v for v in counts.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [str(k) for k in counts]
    vals = [float(v) for v in counts.values()]
    rects = ax.bar(labels, vals, color=[COLORS[i % len(COLORS)] for i in range(len(vals))])
    if annotate:
        for r, v in zip(rects, vals):
            ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:,.2f}", (r.get_x() + r.get_width() / 2, r.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    if max(len(s) for s in labels) > 10:
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    return _save(fig, path)


def difficulty(path: Path, bands: dict[str, int], pass_hist: dict[str, Any] | None) -> Path | None:
    """Problems per difficulty band and the distribution of per-problem pass rates."""
    have_bands = bool(bands) and sum(bands.values()) > 0
    have_hist = bool(pass_hist) and sum(pass_hist.get("counts") or []) > 0
    if not have_bands and not have_hist:
        return None
    plt = _plt()
    n = int(have_bands) + int(have_hist)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))
    axes = [axes] if n == 1 else list(axes)
    i = 0
    if have_bands:
        ax = axes[i]
        i += 1
        ax.bar(list(bands), list(bands.values()), color=[COLORS[j % len(COLORS)] for j in range(len(bands))])
        ax.set_title("problems per difficulty band")
        ax.set_ylabel("problems")
    if have_hist:
        ax = axes[i]
        assert pass_hist is not None
        edges, counts = pass_hist["edges"], pass_hist["counts"]
        ax.bar(edges[:-1], counts, width=[edges[j + 1] - edges[j] for j in range(len(counts))], align="edge",
               color=COLORS[2], edgecolor="white")
        ax.set_title("per-problem pass rate")
        ax.set_xlabel("correct / samples")
        ax.set_ylabel("problems")
    return _save(fig, path)


def drops(path: Path, stages: list[dict[str, Any]]) -> Path | None:
    """Rows kept and dropped (by reason) per stage, stacked."""
    if not stages:
        return None
    plt = _plt()
    labels = [f"{s['index']}:{s['name']}" for s in stages]
    kept = [int(s.get("rows_out", 0)) for s in stages]
    reasons: list[str] = []
    for s in stages:
        for r in s.get("dropped") or {}:
            if r not in reasons:
                reasons.append(r)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.bar(labels, kept, color="#55A868", label="kept")
    bottom = list(kept)
    for i, r in enumerate(reasons[:8]):
        vals = [int((s.get("dropped") or {}).get(r, 0)) for s in stages]
        ax.bar(labels, vals, bottom=bottom, color=COLORS[(i + 3) % len(COLORS)], label=r[:60])
        bottom = [b + v for b, v in zip(bottom, vals)]
    if len(reasons) > 8:
        vals = [sum(int(n) for rr, n in (s.get("dropped") or {}).items() if rr not in reasons[:8]) for s in stages]
        ax.bar(labels, vals, bottom=bottom, color="#8C8C8C", label="other reasons")
    ax.set_title("rows per stage: kept and dropped")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    return _save(fig, path)


def throughput(path: Path, runs: list[dict[str, Any]]) -> Path | None:
    """Rows/s per stage (rows computed / compute seconds) for each run that computed something."""
    series: dict[str, dict[str, float]] = {}
    for run in runs:
        vals = {f"{s['index']}:{s['name']}": float(s.get("rows_per_s") or 0.0) for s in run.get("stages", [])}
        if any(vals.values()):
            series[str(run.get("run_id", len(series)))] = vals
    if not series:
        return None
    plt = _plt()
    stages: list[str] = []
    for vals in series.values():
        for k in vals:
            if k not in stages:
                stages.append(k)
    series = dict(list(series.items())[-6:])  # the last few runs
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(series)
    for i, (run_id, vals) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(stages))]
        ax.bar(xs, [vals.get(s, 0.0) for s in stages], width=width, color=COLORS[i % len(COLORS)], label=run_id)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))])
    ax.set_xticklabels(stages, rotation=25, ha="right")
    ax.set_yscale("symlog")
    ax.set_title("throughput per stage (rows computed / compute seconds)")
    ax.set_ylabel("rows/s")
    ax.legend(fontsize=7, title="run")
    return _save(fig, path)
