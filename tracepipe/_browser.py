"""Trace browser: one self-contained HTML page to read the rows of a build, kept and dropped.

Inputs: the rows (a LazyFrame of final rows; for ``tracepipe report`` the final parts the last
write recorded in an output's ``output.json``, read from ``<workdir>/frames/``), the workdir's
``rejects/*.parquet`` (each with ``_stage`` / ``_reason``), the ``dpo-pairs`` shards (pairs shown
side by side under the rows of their problem) and, for rows the ``logprobs`` stage scored, the
completion tokens with the teacher's log-probs (or a ``tip_class`` column) for a per-token colouring.

Output: a ``<section>`` (inside ``report.html``) or a whole page (``browser.html``, written by
the shard writer next to each output and pushed with it): data embedded as compact column-oriented
JSON in a ``<script type="application/json">`` (``<``, ``>``, ``&`` escaped, so no text can end
the tag), inline CSS and JS, no network, so it opens from a file or a pushed dataset repo.

Why bounded: a page must stay fast, so at most ``rows`` rows are embedded (a stable hash sample
of the row keys when there are more, the sample size shown), texts are cut so that all of them
fit in ``mb`` megabytes (the cut shown on the row), and at most ``tokens`` completion tokens per
row are coloured. The page renders lazily (only the visible rows of a virtual list exist in the
DOM), so 10,000 rows load in well under 2 s (``benchmarks/report_browser.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tracepipe.contract import KEY_COL, REASON_COL, STAGE_COL

TEMPLATE = "browser.html.j2"
#: texts shown on an opened row (cut to fit the page budget)
TEXT_COLUMNS = ("problem", "answer", "pred_answer", "gold_alt", "verify_detail", "verdict_method", "reasoning",
                "reasoning_compressed", "response", "format_issues", "finish_reason")
#: filters, in this order, for the columns the rows have (``split`` and ``stage`` are the page's own)
FILTER_COLUMNS = ("split", "domain", "verdict", "difficulty", "gold_suspect", "compress_status", "stage")
FILTER_LABELS = {"split": "split", "domain": "domain", "verdict": "verdict", "difficulty": "difficulty band",
                 "gold_suspect": "gold suspect", "compress_status": "compress status", "stage": "dropped by stage"}
NUMBER_COLUMNS = ("sample", "pass_rate", "completion_tokens", "gold_agreement")
TOKEN_COLUMNS = ("token_ids", "loss_mask", "teacher_logprobs")
TIP_COLUMN = "tip_class"
#: per-token values shown on hover where the rows have them (lists aligned with ``token_ids``)
TOKEN_EXTRAS = ("student_entropy", "tip_log_ratio", "tip_mask")
#: coloured tokens in a page, all rows together (each row gets an equal share, up to ``tokens``)
TOKEN_BUDGET = 1_000_000
KEPT = "kept"
#: the texts of a pair (chosen / rejected) count against the same budget as the rows' texts
PAIR_TEXTS = ("chosen", "rejected")


@dataclass(frozen=True)
class Limits:
    """How much one page embeds: rows (sampled beyond), megabytes of text, tokens per row."""

    rows: int = 10_000
    mb: float = 24.0
    tokens: int = 2048

    @classmethod
    def from_option(cls, value: Any) -> Limits | None:
        """``outputs[].options.browser``: ``false`` (no page), ``true`` / absent, or ``{rows, mb, tokens, rejects}``."""
        if value is None or value is True:
            return cls()
        if value is False or (isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off")):
            return None
        if isinstance(value, dict):
            known = {k: value[k] for k in ("rows", "mb", "tokens") if k in value}
            extra = set(value) - {"rows", "mb", "tokens", "rejects"}
            if extra:
                raise ValueError(f"outputs[].options.browser: unknown key(s) {sorted(extra)} (have: rows, mb, tokens, rejects)")
            return cls(**known)
        return cls()


# -- reading rows ---------------------------------------------------------------------------------
def _scan_all(paths: list[str | Path]) -> pl.LazyFrame | None:
    paths = [p for p in paths if Path(p).exists()]
    if not paths:
        return None
    scans = [pl.scan_parquet(p, hive_partitioning=False) for p in paths]
    return scans[0] if len(scans) == 1 else pl.concat(scans, how="diagonal_relaxed")


def final_rows_of(recipe: Any) -> tuple[pl.LazyFrame | None, Any]:
    """The final rows of the last write (``output.json``'s ``layout.parts`` in the workdir's
    frame cache) of the first local output written, and that output's spec (None, None: none)."""
    from tracepipe.locations import output_location

    frames = Path(recipe.workdir_path()) / "frames"
    for spec in recipe.outputs:
        loc = output_location(recipe, spec)
        info = Path(loc) / "output.json"
        if "://" in loc or not info.exists():
            continue
        try:
            digests = list((json.loads(info.read_text()).get("layout") or {}).get("parts") or [])
        except (OSError, ValueError):
            continue
        lf = _scan_all([frames / f"{d}.parquet" for d in digests])
        if lf is not None:
            return lf, spec
    return None, None


def dpo_pair_files(recipe: Any) -> list[Path]:
    """Shards of the recipe's local ``dpo-pairs`` outputs."""
    from tracepipe.locations import output_location

    out: list[Path] = []
    for spec in recipe.outputs:
        loc = output_location(recipe, spec)
        if spec.format == "dpo-pairs" and "://" not in loc:
            out += sorted((Path(loc) / "data").glob("*.parquet"))
    return out


def _split_col(lf: pl.LazyFrame, split: pl.Expr | None) -> pl.LazyFrame:
    if split is None or "id" not in lf.collect_schema():
        return lf
    return lf.with_columns(split.alias("split"))


def _hash(lf: pl.LazyFrame, i: int) -> pl.Expr:
    """A row's sampling hash: of its key, else of its position."""
    return pl.col(KEY_COL).hash(seed=17) if KEY_COL in lf.collect_schema() else pl.int_range(pl.len()).hash(seed=17 + i)


def _sample(frames: list[pl.LazyFrame], limit: int) -> tuple[list[pl.DataFrame], int]:
    """Each frame's rows, at most ``limit`` in all: those with the smallest hash of their row key
    (else of their position) when there are more. Returns the frames and the total row count."""
    counts = [int(lf.select(pl.len()).collect().item()) for lf in frames]
    total = sum(counts)
    if total <= limit:
        return [lf.collect() for lf in frames], total
    # pass 1: one 64-bit hash a row (of its key, else its position); pass 2 keeps the rows whose
    # hash is at most the limit-th smallest, streamed: only the chosen rows are ever held, not
    # every row of a million-row output
    # (filtered on the expression itself: a filter on a column added first holds every row)
    exprs = [_hash(lf, i) for i, lf in enumerate(frames)]
    hashes = pl.concat([lf.select(h.alias("__h")).collect() for lf, h in zip(frames, exprs)])["__h"]
    cut = hashes.sort().gather(limit - 1).item()
    out = [lf.filter(h <= cut).collect(engine="streaming") for lf, h in zip(frames, exprs)]
    over = sum(df.height for df in out) - limit
    if over > 0:  # ties at the cut (equal hashes): drop the surplus from the last frames
        for j in range(len(out) - 1, -1, -1):
            k = min(over, out[j].height)
            out[j] = out[j].head(out[j].height - k)
            over -= k
            if not over:
                break
    return out, total


def _texts(df: pl.DataFrame, col: str) -> list[str | None]:
    if col not in df.columns:
        return [None] * df.height
    s = df[col]
    if s.dtype == pl.String:
        return s.to_list()
    if isinstance(s.dtype, pl.List) and s.dtype.inner == pl.String:
        return [None if v is None else ", ".join(x for x in v if x is not None) for v in s.to_list()]
    if s.dtype.is_numeric() or s.dtype == pl.Boolean:
        return [None if v is None else str(v) for v in s.to_list()]
    return [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in s.to_list()]


def _cat(values: list[Any]) -> dict[str, Any]:
    """A dictionary-encoded column: ``values`` (labels, null as ``(none)``) and one code per row."""
    labels: dict[str, int] = {}
    codes = []
    for v in values:
        key = "(none)" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        codes.append(labels.setdefault(key, len(labels)))
    return {"values": list(labels), "codes": codes}


def _cap(lengths: np.ndarray, budget: int) -> int | None:
    """The largest per-text cut that keeps ``sum(min(len, cut)) <= budget`` (None: no cut)."""
    if lengths.size == 0 or int(lengths.sum()) <= budget:
        return None
    lo, hi = 0, int(lengths.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(lengths, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 200)


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# -- tokens -----------------------------------------------------------------------------------------
def load_tokenizer(recipe: Any) -> Any:
    """The tokenizer of the ``logprobs`` stage's engine (local files only), or None."""
    stages = recipe.stages or []
    names = [str((next(iter(s.values())) or {}).get("engine")) for s in stages if isinstance(s, dict) and "logprobs" in s]
    for name in names:
        cfg = (recipe.engines or {}).get(name) or {}
        path = cfg.get("tokenizer") or cfg.get("model")
        if not path:
            continue
        try:
            from tracepipe.engines._hf import resolve_local

            local = resolve_local(str(path), Path(recipe.base_dir))
            from transformers import AutoTokenizer

            if local is not None:
                return AutoTokenizer.from_pretrained(str(local))
            return AutoTokenizer.from_pretrained(str(path), revision=cfg.get("revision"), local_files_only=True)
        except Exception:  # noqa: BLE001 - no tokenizer: tokens are shown by id
            continue
    return None


class _Flat:
    """A list column as one flat numpy array and row offsets (null lists as empty ones), so a
    row's values are one slice, not a Python list per row."""

    def __init__(self, s: pl.Series) -> None:
        lens = s.list.len().fill_null(0).to_numpy()
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.values = s.explode(empty_as_null=False, keep_nulls=False).to_numpy()

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]: self.offsets[i + 1]]


def _at(values: np.ndarray, pos: np.ndarray, n_ids: int, n_completion: int) -> np.ndarray | None:
    """A per-token list at the completion positions ``pos``: aligned with ``token_ids`` or with
    the completion tokens only; None when its length fits neither."""
    if len(values) == n_ids:
        return values[pos]
    if len(values) == n_completion:
        return values[: len(pos)]
    return None


def _rounded(values: np.ndarray, scale: float, digits: int) -> list[float | int | None]:
    """Finite values x ``scale``, rounded (compact JSON); None for null / NaN / inf."""
    v = np.asarray(values, dtype=np.float64) * scale
    ok = np.isfinite(v)
    r = np.round(v, digits)
    return [(int(x) if digits == 0 else float(x)) if k else None for x, k in zip(r.tolist(), ok.tolist())]


def _tokens(df: pl.DataFrame, per_row: int, tokenizer: Any) -> dict[str, Any] | None:
    """Completion tokens (``loss_mask`` 1, the first ``per_row``) of the rows that have them: ids,
    teacher log-probs (x100, rounded), the TIP class where a ``tip_class`` column exists (one digit
    per token), the ``TOKEN_EXTRAS`` for the hover text; and the text of each id used."""
    if not all(c in df.columns for c in TOKEN_COLUMNS):
        return None
    ids, mask, lps = (_Flat(df[c]) for c in TOKEN_COLUMNS)
    tip = _Flat(df[TIP_COLUMN]) if TIP_COLUMN in df.columns else None
    extras = {c: _Flat(df[c]) for c in TOKEN_EXTRAS if c in df.columns}
    rows: dict[str, Any] = {}
    used: set[int] = set()
    for i in range(df.height):
        r_ids, r_mask = ids.row(i), mask.row(i)
        if not len(r_ids) or len(r_mask) != len(r_ids):
            continue
        completion = np.flatnonzero(r_mask == 1)
        pos = completion[:per_row]
        t_ids = r_ids[pos].astype(np.int64).tolist()
        r_lp = lps.row(i)
        entry: dict[str, Any] = {"ids": t_ids, "n": len(completion),
                                 "lp": _rounded(r_lp[pos], 100, 0) if len(r_lp) == len(r_ids) else [None] * len(pos)}
        cls = _at(tip.row(i), pos, len(r_ids), len(completion)) if tip is not None else None
        if cls is not None and len(cls):
            c = np.nan_to_num(cls.astype(np.float64), nan=-1).astype(np.int64)
            # one digit per token when every class is one (tip_mask's 0-4): half the bytes of a list
            entry["tip"] = "".join(map(str, c.tolist())) if ((c >= 0) & (c <= 9)).all() else c.tolist()
        for name, flat in extras.items():
            got = _at(flat.row(i), pos, len(r_ids), len(completion))
            if got is not None and len(got):
                entry.setdefault("extra", {})[name] = _rounded(got, 1, 3)
        rows[str(i)] = entry
        used.update(t_ids)
    if not rows:
        return None
    vocab: dict[str, str] = {}
    for t in sorted(used):
        try:
            vocab[str(t)] = tokenizer.decode([t]) if tokenizer is not None else f"⟨{t}⟩"
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know
            vocab[str(t)] = f"⟨{t}⟩"
    mode = "tip" if any(r.get("tip") is not None for r in rows.values()) else "logprob"
    return {"rows": rows, "vocab": vocab, "decoded": tokenizer is not None, "mode": mode, "per_row": per_row}


def tip_labels() -> dict[str, str]:
    """Names of the ``tip_class`` codes (the ``tip_mask`` stage's, where it is installed)."""
    labels = {0: "not classified", 1: "high entropy, high divergence", 2: "high entropy, low divergence",
              3: "overconfident (low entropy, high divergence)", 4: "low entropy, low divergence"}
    try:
        from tracepipe.stages.tip_mask import CLASS_NAMES

        labels.update({int(k): str(v).replace("_", " ") for k, v in CLASS_NAMES.items()})
    except (ImportError, AttributeError, ValueError):
        pass
    return {str(k): v for k, v in labels.items()}


# -- pairs ------------------------------------------------------------------------------------------
def _last_text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        last = v[-1]
        if isinstance(last, dict):
            return last.get("content") if last.get("content") is not None else last.get("value")
    return json.dumps(v, default=str, ensure_ascii=False)


def _pairs(files: list[Path], ids: set[str]) -> pl.DataFrame | None:
    lf = _scan_all(list(files))
    if lf is None:
        return None
    schema = lf.collect_schema()
    if not {"id", "chosen", "rejected"} <= set(schema):
        return None
    cols = [c for c in ("id", "pair_kind", "chosen", "rejected", "chosen_sample", "rejected_sample", "chosen_length",
                        "rejected_length", "length_unit") if c in schema]
    return lf.select(cols).filter(pl.col("id").cast(pl.String).is_in(sorted(ids))).collect()


# -- the payload ------------------------------------------------------------------------------------
def _frames(kept: pl.LazyFrame | None, rejects: Iterable[str | Path], split: pl.Expr | None) -> tuple[list[pl.LazyFrame], list[str | None]]:
    """The row frames (final rows first, then each rejects file) with the columns the page uses,
    and each frame's status (``kept``; None: the rows' ``_stage`` says which stage dropped them)."""
    frames: list[pl.LazyFrame] = []
    statuses: list[str | None] = []
    if kept is not None:
        frames.append(_split_col(kept, split))
        statuses.append(KEPT)
    for p in rejects:
        if Path(p).exists():
            frames.append(_split_col(pl.scan_parquet(p, hive_partitioning=False), split))
            statuses.append(None)
    wanted = {*TEXT_COLUMNS, *FILTER_COLUMNS, *NUMBER_COLUMNS, *TOKEN_COLUMNS, TIP_COLUMN, *TOKEN_EXTRAS, "id", KEY_COL,
              STAGE_COL, REASON_COL}
    return [lf.select([c for c in lf.collect_schema() if c in wanted]) for lf in frames], statuses


def _cut_texts(groups: list[dict[str, list[str | None]]], mb: float) -> tuple[int | None, list[dict[str, list[int]]]]:
    """Cut every text of ``groups`` (name -> texts) in place at one length so that all fit in
    ``mb`` megabytes; returns the cut (None: none) and, per group, the full lengths of the
    columns that were cut (for the page's "cut at X of Y" notes)."""
    lens = np.array([len(v) for g in groups for vs in g.values() for v in vs if v], dtype=np.int64)
    cut = _cap(lens, int(mb * 1e6))
    full: list[dict[str, list[int]]] = [{} for _ in groups]
    if cut is None:
        return None, full
    for g, f in zip(groups, full):
        for c, vals in g.items():
            if any(v is not None and len(v) > cut for v in vals):
                f[c] = [0 if v is None else len(v) for v in vals]
                g[c] = [v if v is None or len(v) <= cut else v[:cut] for v in vals]
    return cut, full


def _categories(dfs: list[pl.DataFrame], stage: list[str], split_label: str) -> dict[str, Any]:
    """The filter columns the rows have, dictionary-encoded, with their labels."""
    cats: dict[str, Any] = {}
    for c in FILTER_COLUMNS:
        if c == "stage":
            vals: list[Any] = stage
        elif any(c in d.columns for d in dfs):
            vals = [v for d in dfs for v in (d[c].to_list() if c in d.columns else [None] * d.height)]
        else:
            continue
        enc = _cat(vals)
        if c == "stage" and enc["values"] == [KEPT]:
            continue  # nothing dropped: no filter
        cats[c] = {**enc, "label": split_label if c == "split" else FILTER_LABELS[c]}
    return cats


def _token_payload(dfs: list[pl.DataFrame], limits: Limits, tokenizer: Any) -> dict[str, Any] | None:
    """The tokens of every frame that has them, keyed by the row's position in the page."""
    n = sum(d.height for d in dfs)
    per_row = max(16, min(limits.tokens, int(TOKEN_BUDGET / max(1, n))))
    offset, merged = 0, {"rows": {}, "vocab": {}, "mode": "logprob"}
    for d in dfs:
        t = _tokens(d, per_row, tokenizer)
        if t is not None:
            merged["rows"].update({str(int(k) + offset): v for k, v in t["rows"].items()})
            merged["vocab"].update(t["vocab"])
            merged.update(decoded=t["decoded"], per_row=per_row, mode="tip" if "tip" in (t["mode"], merged["mode"]) else "logprob")
        offset += d.height
    if not merged["rows"]:
        return None
    return {**merged, "tip_labels": tip_labels()} if merged["mode"] == "tip" else merged


def _pair_payload(files: list[Path], ids: list[str | None]) -> dict[str, Any] | None:
    pairs = _pairs(files, {i for i in ids if i is not None}) if files else None
    if pairs is None or not pairs.height:
        return None
    out: dict[str, Any] = {c: [_clean(v) for v in pairs[c].to_list()] for c in pairs.columns if c not in PAIR_TEXTS}
    out["id"] = [None if v is None else str(v) for v in out["id"]]
    out.update({c: [_last_text(v) for v in pairs[c].to_list()] for c in PAIR_TEXTS})
    return out


def build_payload(
    kept: pl.LazyFrame | None, rejects: Iterable[str | Path] = (), pair_files: Iterable[Path] = (), split: pl.Expr | None = None,
    limits: Limits = Limits(), tokenizer: Any = None, title: str = "", split_label: str = "split",
) -> dict[str, Any] | None:
    """Everything the page shows, as JSON-able columns (None: no rows at all).

    ``kept``: the final rows; ``rejects``: Parquet files of dropped rows (``_stage``, ``_reason``);
    ``pair_files``: ``dpo-pairs`` shards; ``split``: the writer's split expression (over ``id``);
    ``tokenizer``: decodes the token ids of OPD rows (None: tokens shown by id).
    """
    frames, statuses = _frames(kept, rejects, split)
    if not frames:
        return None
    dfs, total = _sample(frames, limits.rows)
    n = sum(d.height for d in dfs)
    if n == 0:
        return None

    def column(c: str) -> list[Any]:
        return [v for d in dfs for v in (_texts(d, c) if c in TEXT_COLUMNS or c in ("id", KEY_COL, REASON_COL, STAGE_COL) else
                                         (d[c].to_list() if c in d.columns else [None] * d.height))]

    stage: list[str] = []
    for d, status in zip(dfs, statuses):
        stage += [status] * d.height if status else [v if v is not None else "?" for v in _texts(d, STAGE_COL)]
    ids = column("id")
    texts = {c: column(c) for c in TEXT_COLUMNS if any(c in d.columns for d in dfs)}
    pairs = _pair_payload(list(pair_files), ids)
    pair_texts = {c: pairs[c] for c in PAIR_TEXTS} if pairs else {}
    cut, (full_len, pair_full) = _cut_texts([texts, pair_texts], limits.mb)
    payload: dict[str, Any] = {
        "title": title, "total": total, "shown": n, "sampled": n < total, "cut": cut, "mb": limits.mb,
        "ids": ids, "keys": column(KEY_COL), "reasons": column(REASON_COL), "texts": texts, "full_len": full_len,
        "cats": _categories(dfs, stage, split_label), "stage_kept": KEPT,
        "numbers": {c: [_clean(v) for v in column(c)] for c in NUMBER_COLUMNS if any(c in d.columns for d in dfs)},
    }
    if pairs:
        payload["pairs"] = {**pairs, **pair_texts, **{f"{c}_len": v for c, v in pair_full.items()}}
    tokens = _token_payload(dfs, limits, tokenizer)
    if tokens:
        payload["tokens"] = tokens
    return payload


# -- rendering --------------------------------------------------------------------------------------
def script_json(payload: dict[str, Any]) -> str:
    """``payload`` as JSON that is safe inside a ``<script>`` element (no ``<``, ``>``, ``&``,
    U+2028 / U+2029 left unescaped: no text can close the tag or start a comment)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render(payload: dict[str, Any], standalone: bool = False) -> str:
    """The browser as a ``<section>`` of a page, or (``standalone``) as a whole HTML page."""
    from markupsafe import Markup

    from tracepipe.outputs import _card

    env = _card.jinja_env(autoescape=True)
    return env.get_template(TEMPLATE).render(data_json=Markup(script_json(payload)), p=payload, standalone=standalone)


def report_section(recipe: Any, split_of: Callable[[float], pl.Expr], limits: Limits = Limits()) -> str | None:
    """The browser for ``tracepipe report``: the final rows of the last write, the workdir's
    rejects (each with its stage and reason), the ``dpo-pairs`` shards; None when nothing is written.
    ``split_of(test_fraction)``: the writer's split expression (the rows get the split of that output)."""
    from tracepipe.locations import rejects_paths

    kept, spec = final_rows_of(recipe)
    rejects = rejects_paths(recipe)
    if kept is None and not rejects:
        return None
    index = recipe.outputs.index(spec) if spec is not None else None
    split = split_of(spec.test_fraction) if spec is not None else None
    label = f"split (output {index}: {spec.format})" if spec is not None else "split"
    tok = load_tokenizer(recipe) if kept is not None and "token_ids" in kept.collect_schema() else None
    payload = build_payload(kept, rejects, dpo_pair_files(recipe), split, limits, tok, recipe.name, label)
    return render(payload) if payload is not None else None


def output_page(final: pl.LazyFrame, spec: Any, recipe: Any, pair_files: list[Path], value: Any, split: pl.Expr | None) -> str | None:
    """The ``browser.html`` written next to an output's shards (option ``browser``): its final rows
    (after ``where``) with the ``split`` the writer gave them, its pairs; rejects only with ``rejects: true``."""
    limits = Limits.from_option(value)
    if limits is None:
        return None
    from tracepipe.locations import rejects_paths

    rejects = rejects_paths(recipe) if isinstance(value, dict) and value.get("rejects") else []
    tok = load_tokenizer(recipe) if "token_ids" in final.collect_schema() else None
    payload = build_payload(final, rejects, pair_files, split, limits, tok,
                            f"{recipe.name}: {spec.format} output", "split")
    return render(payload, standalone=True) if payload is not None else None
