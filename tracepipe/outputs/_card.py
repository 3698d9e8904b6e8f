"""Dataset card: the numbers (``summary.json``), the plots, and ``README.md`` from the templates.

:func:`summarize` aggregates the final rows, the run stats and the rejects into one JSON-able dict
(teacher fingerprints, rows in/out and drop reasons per stage, verification pass rates,
difficulty bands, decontamination and compression stats, length histograms). :func:`render_card`
fills the Jinja template ``dataset_card.md.j2`` with it, under a YAML front matter the Hub reads
(``configs`` with ``data_files`` globs, license, task_categories, language, size_categories,
tags, dataset_info). This module only formats: the writer scrubs secrets from what it writes
(:class:`tracepipe.secrets.Scrubber`, made once by :func:`tracepipe.publish.publish`).

The templates (this card's and the HTML report's) are package data in ``tracepipe/data_cards/``,
found through the installed package only (:func:`templates_dir`), so a wheel install has them.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import polars as pl
import yaml

import tracepipe
from tracepipe.contract import STAGE_COL
from tracepipe.outputs import _plots

if TYPE_CHECKING:  # pragma: no cover
    from importlib.resources.abc import Traversable

TEMPLATES_DIR = "data_cards"
CARD_TEMPLATE = "dataset_card.md.j2"
PLOT_FILES = ("token_lengths.png", "difficulty.png")
FORMAT_TAGS = {
    "sft-messages": ["sft"],
    "prompt-completion": ["sft"],
    "sharegpt": ["sft", "llama-factory"],
    "dpo-pairs": ["dpo", "preference"],
    "opd": ["distillation", "on-policy-distillation"],
}
SIZE_BINS = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
]
HIST_BINS = 40
BAND_ORDER = ("trivial", "easy", "medium", "hard", "very_hard", "unsolved")


def band_sorted(counts: dict[str, int]) -> dict[str, int]:
    """Difficulty bands in their natural order (easy, medium, hard), unknown labels after."""
    rank = {b: i for i, b in enumerate(BAND_ORDER)}
    return dict(sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def templates_dir() -> Traversable:
    """The card / report templates: ``data_cards/`` inside the installed package (package data)."""
    return importlib.resources.files("tracepipe") / TEMPLATES_DIR


@functools.lru_cache(maxsize=4)
def jinja_env(autoescape: bool = False) -> Any:
    """The card / report templates' environment (one per process; compiled templates are kept in
    jinja's bytecode cache, so a process does not recompile them)."""
    if not templates_dir().is_dir():
        raise FileNotFoundError(
            f"the tracepipe package has no {TEMPLATES_DIR}/ templates ({templates_dir()}): "
            "it was installed without its package data; reinstall it"
        )
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tracepipe", TEMPLATES_DIR),
        autoescape=autoescape,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,
        bytecode_cache=_bytecode_cache(),
    )
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else (f"{v:,.3g}" if isinstance(v, float) else str(v))
    env.filters["cell"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * float(v):.1f}%"
    env.filters["usd"] = lambda v: "-" if v is None else f"${float(v):,.4f}"
    return env


def _bytecode_cache() -> Any:
    """Compiled templates under ``$XDG_CACHE_HOME/tracepipe/jinja`` (or the temp dir); None if
    neither is writable. Entries are keyed by template source, so edits are picked up."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (os.path.join(base, "tracepipe", "jinja"), os.path.join(tempfile.gettempdir(), f"tracepipe-jinja-{os.getuid()}")):
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            st = os.stat(root)
            # compiled code is loaded from here: only a directory of ours that no one else can write
            if st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(root, os.W_OK):
                return jinja2.FileSystemBytecodeCache(root)
        except OSError:
            continue
    return None


def size_category(n: int) -> str:
    for bound, label in SIZE_BINS:
        if n < bound:
            return label
    return "1B<n<10B"


# -- numbers ------------------------------------------------------------------------------------
def hist(values: list[float] | Any, edges: list[float] | None = None, bins: int = HIST_BINS) -> dict[str, Any]:
    """Histogram + quantiles of a numeric series (list or numpy), JSON-able."""
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=float) if isinstance(values, list) else np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)] if arr.size else arr
    if arr.size == 0:
        return {"n": 0, "edges": [], "counts": []}
    if edges is None:
        hi = float(arr.max()) if arr.max() > 0 else 1.0
        edges = list(np.linspace(0.0, hi, bins + 1))
    counts, e = np.histogram(arr, bins=np.asarray(edges, dtype=float))
    return {
        "n": int(arr.size), "edges": [round(float(x), 4) for x in e], "counts": [int(c) for c in counts],
        "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()), "min": float(arr.min()),
    }


def shared_hists(series: dict[str, Any], bins: int = HIST_BINS) -> dict[str, dict[str, Any]]:
    """Histograms of several series over the same bin edges (for before/after overlays)."""
    import numpy as np

    arrays = {k: np.asarray(v, dtype=float) for k, v in series.items() if v is not None and len(v)}
    if not arrays:
        return {}
    hi = max(float(a.max()) for a in arrays.values()) or 1.0
    edges = list(np.linspace(0.0, hi, bins + 1))
    return {k: hist(a, edges) for k, a in arrays.items()}


def _first(schema: pl.Schema, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in schema), None)


def length_stats(final: pl.LazyFrame, schema: pl.Schema) -> dict[str, Any]:
    """Trace length histograms: teacher completion tokens, and the trace before/after compression.

    Token counts come from columns where the rows have them (``completion_tokens``,
    ``reasoning_tokens``, ``reasoning_compressed_tokens``); otherwise lengths are estimated as
    characters / 4, and ``unit`` says so.
    """
    out: dict[str, Any] = {"hists": {}, "unit": None, "completion_tokens": None, "compression": None}
    if "completion_tokens" in schema:
        ct = final.select(pl.col("completion_tokens").cast(pl.Float64)).collect().to_series().drop_nulls().to_numpy()
        out["completion_tokens"] = hist(ct)
    if "reasoning" not in schema:
        return out
    tok_before = _first(schema, ("reasoning_tokens",))
    tok_after = _first(schema, ("reasoning_compressed_tokens", "compressed_tokens"))
    comp = "reasoning_compressed" in schema
    use_tokens = tok_before is not None and (not comp or tok_after is not None)
    if use_tokens:
        before = pl.col(tok_before).cast(pl.Float64)
        after = pl.coalesce(pl.col(tok_after).cast(pl.Float64), before) if comp else None
        out["unit"] = "tokens"
    else:
        before = pl.col("reasoning").str.len_chars().cast(pl.Float64) / 4.0
        after = (pl.coalesce(pl.col("reasoning_compressed"), pl.col("reasoning")).str.len_chars().cast(pl.Float64) / 4.0) if comp else None
        out["unit"] = "≈ tokens, chars/4"
    cols = [before.alias("before")] + ([after.alias("after")] if after is not None else [])
    if comp:
        cols.append(pl.col("reasoning_compressed").is_not_null().alias("compressed"))
    df = final.filter(pl.col("reasoning").is_not_null()).select(cols).collect()
    if df.height == 0:
        return out
    if comp:
        out["hists"] = shared_hists({"original trace": df["before"].to_numpy(), "trace in the output (compressed where kept)": df["after"].to_numpy()})
        n_comp = int(df["compressed"].sum())
        b, a = float(df["before"].sum()), float(df["after"].sum())
        out["compression"] = {
            "rows": df.height, "rows_compressed": n_comp, "share_compressed": n_comp / df.height,
            "mean_before": b / df.height, "mean_after": a / df.height, "ratio": (a / b) if b else None,
        }
    else:
        out["hists"] = shared_hists({"reasoning trace": df["before"].to_numpy()})
    return out


def verification_stats(final: pl.LazyFrame, rejects: list[str], schema: pl.Schema) -> dict[str, Any] | None:
    """Verdict counts over the kept rows, and over every verified sample (kept + dropped later)."""
    if "verdict" not in schema:
        return None
    kept = dict(final.group_by("verdict").len().collect().iter_rows())
    allv = dict(kept)
    for p in rejects:
        if "verdict" in pl.read_parquet_schema(p):
            for v, n in pl.scan_parquet(p).group_by("verdict").len().collect().iter_rows():
                allv[v] = allv.get(v, 0) + n

    def rates(c: dict[Any, int]) -> dict[str, Any]:
        c = {str(k): int(v) for k, v in c.items() if k is not None}
        total = sum(c.values())
        judged = c.get("correct", 0) + c.get("incorrect", 0)
        return {"counts": dict(sorted(c.items())), "total": total,
                "pass_rate": (c.get("correct", 0) / total) if total else None,
                "pass_rate_judged": (c.get("correct", 0) / judged) if judged else None}

    by_domain = None
    if "domain" in schema:
        dom = final.group_by("domain").agg(
            pl.len().alias("n"), (pl.col("verdict") == "correct").sum().alias("correct")
        ).sort("domain").collect()
        by_domain = {str(r["domain"]): {"rows": int(r["n"]), "correct": int(r["correct"])} for r in dom.iter_rows(named=True)}
    return {"kept": rates(kept), "all": rates(allv), "by_domain": by_domain}


def difficulty_stats(final: pl.LazyFrame, schema: pl.Schema) -> dict[str, Any] | None:
    if "difficulty" not in schema and "pass_rate" not in schema:
        return None
    per = final.select([c for c in ("id", "difficulty", "pass_rate") if c in schema])
    if "id" in schema:
        per = per.unique("id", keep="first", maintain_order=True)
    df = per.collect()
    out: dict[str, Any] = {"problems": df.height, "bands": {}, "pass_rate": None}
    if "difficulty" in df.columns:
        out["bands"] = band_sorted({str(k): int(v) for k, v in df.group_by("difficulty").len().iter_rows()})
    if "pass_rate" in df.columns:
        out["pass_rate"] = hist(df["pass_rate"].cast(pl.Float64).drop_nulls().to_numpy(), edges=[i / 10 for i in range(11)])
    return out


def teacher_stats(final: pl.LazyFrame, schema: pl.Schema) -> list[dict[str, Any]]:
    if "teacher" not in schema:
        return []
    df = final.group_by("teacher").len().sort("len", descending=True).collect()
    return [{"teacher": str(t), "rows": int(n)} for t, n in df.iter_rows() if t is not None]


def contamination_by_benchmark(rejects: list[str]) -> dict[str, int]:
    """Rows a decontaminate stage dropped, per ``benchmark:method`` (from the workdir's rejects)."""
    out: dict[str, int] = {}
    for p in rejects:
        schema = pl.read_parquet_schema(p)
        if "contam_benchmark" not in schema:
            continue
        cols = [pl.col("contam_benchmark").cast(pl.String).fill_null("?").alias("b")]
        cols.append(pl.col("contam_method").cast(pl.String).fill_null("?").alias("m") if "contam_method" in schema else pl.lit("?").alias("m"))
        lf = pl.scan_parquet(p)
        if STAGE_COL in schema:
            lf = lf.filter(pl.col(STAGE_COL) == "decontaminate")
        for b, m, n in lf.select(cols).group_by("b", "m").len().sort("b", "m").collect().iter_rows():
            out[f"{b}:{m}"] = out.get(f"{b}:{m}", 0) + int(n)
    return out


def stage_summaries(stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    keys = ("index", "name", "kind", "rows_in", "rows_out", "dropped", "errors", "cached", "computed",
            "seconds", "compute_seconds", "rows_per_s", "tokens", "extra")
    return [{k: s.get(k) for k in keys} for s in (stats or {}).get("stages", [])]


def spend_summary(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the model engines were billed (tracepipe.spend): per engine, in the run that wrote the
    output and over every run in the workdir; None when no engine sent a request."""
    spend = (stats or {}).get("spend") or {}
    engines = {n: e for n, e in (spend.get("engines") or {}).items() if ((e.get("workdir") or {}).get("requests") or 0) > 0}
    if not engines:
        return None
    return {"engines": engines, "run": spend.get("run"), "workdir": spend.get("workdir"), "budget": spend.get("budget")}


def summarize(
    final: pl.LazyFrame, spec: Any, recipe: Any, stats: dict[str, Any] | None, files: list[dict[str, Any]],
    rejects: list[str], known: dict[str, Any] | None = None, schema: pl.Schema | None = None,
) -> dict[str, Any]:
    """Everything the card and the report show about one output, as a JSON-able dict.

    ``known`` may give ``final_rows`` and ``domains`` already summed over the final parts (the
    writer keeps them per part), so they are not counted over every row again. Not scrubbed of
    secrets: the writer scrubs it (with the run's one :class:`~tracepipe.secrets.Scrubber`)."""
    known = known or {}
    stages = stage_summaries(stats)
    rows = {s: sum(f["rows"] for f in files if f["split"] == s) for s in dict.fromkeys(f["split"] for f in files)}
    schema = schema if schema is not None else final.collect_schema()
    if "domains" in known:
        domains = list(known["domains"])
    else:
        domains = sorted(str(d) for d in final.select(pl.col("domain").unique()).collect().to_series().drop_nulls()) if "domain" in schema else []
    lengths = length_stats(final, schema)
    summary = {
        "name": recipe.name,
        "description": recipe.description,
        "license": recipe.license,
        "format": spec.format,
        "options": {k: v for k, v in dict(spec.options).items() if not str(k).startswith("_")},
        "test_fraction": spec.test_fraction,
        "tracepipe_version": tracepipe.__version__,
        "run_id": (stats or {}).get("run_id"),
        "source_rows": ((stats or {}).get("source") or {}).get("rows"),
        "final_rows": known["final_rows"] if "final_rows" in known else final.select(pl.len()).collect().item(),
        "rows": rows,
        "files": [{"file": f["file"], "split": f["split"], "rows": f["rows"], "bytes": f.get("bytes")} for f in files],
        "columns": list(files[0].get("columns", [])) if files else [],
        "domains": domains,
        "teachers": teacher_stats(final, schema),
        "stages": stages,
        "verification": verification_stats(final, rejects, schema),
        "difficulty": difficulty_stats(final, schema),
        "lengths": lengths,
        "decontamination": [s for s in stages if s["name"] == "decontaminate"],
        # only a decontaminate stage writes these columns: without one, no rejects file to open
        "contamination_by_benchmark": contamination_by_benchmark(rejects) if any(s["name"] == "decontaminate" for s in stages) or stats is None else {},
        "compression": [s for s in stages if s["name"] == "compress"],
        "spend": spend_summary(stats),
        "logprobs": [
            {k: (s.get("extra") or {}).get(k) for k in ("logprobs_teacher", "teacher_consistency", "allow_teacher_mismatch", "teacher_mismatch_rows")}
            for s in stages if s["name"] == "logprobs"
        ],
    }
    return summary


# -- plots and card ------------------------------------------------------------------------------
def write_plots(summary: dict[str, Any], out: Path) -> list[str]:
    """The card's PNGs next to README.md; returns the file names written."""
    written = []
    lengths = summary.get("lengths") or {}
    hists = dict(lengths.get("hists") or {})
    unit = lengths.get("unit") or "tokens"
    if not hists and lengths.get("completion_tokens"):
        hists = {"teacher completion tokens": lengths["completion_tokens"]}
        unit = "tokens"
    if _plots.histograms(out / "token_lengths.png", hists, "trace length", unit):
        written.append("token_lengths.png")
    diff = summary.get("difficulty") or {}
    if _plots.difficulty(out / "difficulty.png", diff.get("bands") or {}, diff.get("pass_rate")):
        written.append("difficulty.png")
    return written


def front_matter(summary: dict[str, Any], card_opts: dict[str, Any], features: dict[str, Any] | None) -> dict[str, Any]:
    splits = list(summary["rows"])
    total = sum(summary["rows"].values())
    tags = ["reasoning", "synthetic", "tracepipe", *FORMAT_TAGS.get(summary["format"], []), *summary.get("domains", [])]
    tags += [t for t in card_opts.get("tags") or [] if t not in tags]
    fm: dict[str, Any] = {
        "pretty_name": card_opts.get("pretty_name") or summary["name"],
        "license": card_opts.get("license") or summary.get("license") or "unknown",
        "language": list(card_opts.get("language") or ["en"]),
        "task_categories": list(card_opts.get("task_categories") or ["text-generation"]),
        "size_categories": [size_category(total)],
        "tags": list(dict.fromkeys(str(t) for t in tags)),
        "configs": [{
            "config_name": card_opts.get("config_name") or "default",
            "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits],
        }],
    }
    if features is not None:
        fm["dataset_info"] = {
            "features": features,
            "splits": [{"name": s, "num_examples": int(summary["rows"][s]),
                        "num_bytes": int(sum(f.get("bytes") or 0 for f in summary["files"] if f["split"] == s))} for s in splits],
        }
    return fm


_HF_DTYPES = {
    "string": "string", "large_string": "large_string", "bool": "bool",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "halffloat": "float16", "float": "float32", "double": "float64", "binary": "binary", "null": "null",
}


def _hf_feature(t: Any) -> dict[str, Any] | None:
    """One Arrow type as a ``datasets`` YAML feature entry (without its name), or None."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        fields = []
        for f in t:
            sub = _hf_feature(f.type)
            if sub is None:
                return None
            fields.append({"name": f.name, **sub})
        return {"struct": fields}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        sub = _hf_feature(t.value_type)
        if sub is None:
            return None
        inner = sub["dtype"] if set(sub) == {"dtype"} else sub.get("struct", sub)
        return {"list": inner}
    name = str(t)
    return {"dtype": _HF_DTYPES[name]} if name in _HF_DTYPES else None


def hf_features(schema: Any) -> Any:
    """The ``dataset_info.features`` YAML of an Arrow schema, as ``datasets`` writes it (or None).

    Computed from the Arrow types directly: importing ``datasets`` for this costs seconds.
    """
    out = []
    for f in schema:
        entry = _hf_feature(f.type)
        if entry is None:
            return None
        out.append({"name": f.name, **entry})
    return out


def usage_snippet(fmt: str, repo_or_path: str) -> str:
    load = f'from datasets import load_dataset\n\nds = load_dataset("{repo_or_path}")'
    if fmt in ("sft-messages", "prompt-completion"):
        return load + '\n\nfrom trl import SFTConfig, SFTTrainer\ntrainer = SFTTrainer(model="<model>", train_dataset=ds["train"], args=SFTConfig(output_dir="out"))\ntrainer.train()'
    if fmt == "dpo-pairs":
        return load + '\n\nfrom trl import DPOConfig, DPOTrainer\ntrainer = DPOTrainer(model="<model>", train_dataset=ds["train"], args=DPOConfig(output_dir="out"))\ntrainer.train()'
    if fmt == "sharegpt":
        return load + "\n\n# LLaMA-Factory: dataset_info.json in this repo declares formatting: sharegpt"
    return load


def render_card(summary: dict[str, Any], recipe_text: str | None, card_opts: dict[str, Any], features: Any, plots: list[str]) -> str:
    """README.md's text (not scrubbed: the writer scrubs what it writes)."""
    fm = front_matter(summary, card_opts, features)
    env = jinja_env()
    text = env.get_template(CARD_TEMPLATE).render(
        # libyaml's emitter when present (same text as the pure-Python one, a fraction of the time)
        front_matter=yaml.dump(fm, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, allow_unicode=True,
                               width=1000).rstrip("\n"),
        s=summary,
        recipe_text=recipe_text,
        plots=plots,
        usage=usage_snippet(summary["format"], card_opts.get("repo") or summary["name"]),
        extra_text=card_opts.get("text"),
        isfinite=math.isfinite,
    )
    return text
