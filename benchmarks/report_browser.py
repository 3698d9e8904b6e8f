"""Benchmark the trace browser: how long 10,000 rows take to load in headless Chromium; prints JSON.

Two pages of 10,000 rows each, both opened ``--repeats`` times in a fresh tab of the installed
chromium (Playwright with ``executable_path``), next to a baseline:

- ``gsm8k``: ``tracepipe report`` over a real run of the browser test recipe
  (``tests/fixtures/browser_data.py``, no model) on 5,000 GSM8K problems read twice: 10,000
  samples, kept and dropped, with DPO pairs;
- ``long``: 10,000 synthetic rows with 30,000-character traces (a long-CoT build), so the page's
  text budget (``mb``, default 24) cuts them, each with 1,200 scored tokens (OPD rows: token ids,
  loss mask, teacher log-probs, TIP classes), so the token budget (1 M in all) applies too;
- ``static-table`` (baseline): the gsm8k rows as one plain server-rendered ``<table>`` with every
  row in the DOM, as a report without a virtual list would show them.

Figures: page bytes, Python build seconds, load (navigation start to the browser's first render:
``wall_s`` from Playwright's ``goto``, ``ready_ms`` from the page's own clock), then, on the
loaded page, applying a filter, a first text search (it builds the lower-case index; the search
box's 120 ms debounce is not included: the timing calls the same filter function directly through
the select) and opening a row.

Usage: ``python benchmarks/report_browser.py [--repeats 5] [--rows 10000]``
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ON_PAGE = """async () => {
  const t = (f) => { const a = performance.now(); f(); return performance.now() - a; };
  const sel = document.getElementById("tpb-f-verdict");
  const filter = t(() => { sel.value = "incorrect"; sel.dispatchEvent(new Event("change")); });
  const n = +document.getElementById("tpb-count").dataset.n;
  sel.value = ""; sel.dispatchEvent(new Event("change"));
  const q = document.getElementById("tpb-q");
  const search = t(() => { q.value = "apples"; const s = document.getElementById("tpb-f-domain") || sel;
                           s.dispatchEvent(new Event("change")); });
  const open = t(() => document.querySelector(".tpb-row").click());
  return {filter_ms: filter, rows_after_filter: n, first_search_ms: search, open_row_ms: open,
          rows_matching_search: +document.getElementById("tpb-count").dataset.n};
}"""


def gsm8k_report(tmp: Path, rows: int) -> tuple[Path, float, float]:
    from tests.fixtures.browser_data import write_browser_recipe
    from tests.fixtures.outputs_data import run_recipe
    from tracepipe.report import build_report

    (tmp / "gsm8k").mkdir()
    t = time.perf_counter()
    recipe, _ = run_recipe(write_browser_recipe(tmp / "gsm8k", limit=rows // 2))
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    path = build_report(recipe, tmp / "gsm8k" / "report")
    return path, run_s, time.perf_counter() - t


def long_page(tmp: Path, rows: int) -> tuple[Path, float]:
    import numpy as np
    import polars as pl

    from tracepipe import _browser

    words = "Let me check this step again, because the sum of the first terms might be off by one. "
    lf = pl.LazyFrame({
        "_key": [f"s:{i}" for i in range(rows)], "id": [f"p{i // 4}" for i in range(rows)], "sample": [i % 4 for i in range(rows)],
        "problem": [f"Problem {i}: how many apples are left after {i} steps?" for i in range(rows)],
        "answer": [str(i) for i in range(rows)],
        "reasoning": [words * (30_000 // len(words))] * rows,
        "reasoning_compressed": [words * (8_000 // len(words)) if i % 3 == 0 else None for i in range(rows)],
        "response": [f"So the answer is \\boxed{{{i}}}." for i in range(rows)],
        "verdict": ["correct" if i % 5 else "incorrect" for i in range(rows)],
        "difficulty": [("easy", "medium", "hard")[i % 3] for i in range(rows)], "domain": ["math"] * rows,
        "compress_status": ["accepted" if i % 3 == 0 else "rejected:not-shorter" for i in range(rows)],
    })
    rng = np.random.default_rng(0)
    n_tok, prompt = 1200, 200
    ids = rng.integers(0, 150_000, size=(rows, n_tok), dtype=np.int32)
    mask = np.zeros((rows, n_tok), dtype=np.int8)
    mask[:, prompt:] = 1
    lps = -rng.exponential(1.5, size=(rows, n_tok)).astype(np.float32)
    tip = (rng.integers(1, 5, size=(rows, n_tok)) * mask).astype(np.int8)
    lf = lf.with_columns(*(pl.Series(name, arr).cast(pl.List(dtype)) for name, arr, dtype in (
        ("token_ids", ids, pl.Int32), ("loss_mask", mask, pl.Int8), ("teacher_logprobs", lps, pl.Float32), ("tip_class", tip, pl.Int8))))
    t = time.perf_counter()
    payload = _browser.build_payload(lf, split=pl.lit("train"), title="long traces")
    assert payload is not None
    page = tmp / "long.html"
    page.write_text(_browser.render(payload, standalone=True))
    return page, time.perf_counter() - t


def static_table(report: Path, tmp: Path) -> Path:
    """The rows of the report's browser as one plain table (every row in the DOM)."""
    import re

    data = json.loads(re.search(r'<script type="application/json" id="tpb-data">(.*?)</script>', report.read_text(), re.S).group(1))
    cats = data["cats"]

    def cat(c: str, i: int) -> str:
        return cats[c]["values"][cats[c]["codes"][i]] if c in cats else ""

    body = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(data['ids'][i] or '')}</td><td>{cat('stage', i)}</td><td>{cat('verdict', i)}</td>"
        f"<td>{cat('difficulty', i)}</td><td>{cat('domain', i)}</td><td>{cat('split', i)}</td>"
        f"<td>{html.escape((data['texts']['problem'][i] or '')[:200])}</td></tr>"
        for i in range(data["shown"])
    )
    page = tmp / "static.html"
    page.write_text(f"<!doctype html><html><body><table id='t'>{body}</table>"
                    "<script>document.body.dataset.ready='1'; window.tpbReadyMs = performance.now();</script></body></html>")
    return page


def load(browser: Any, path: Path, repeats: int, ready: str, interact: bool) -> dict[str, Any]:
    walls, readies, extra = [], [], []
    for _ in range(repeats):
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        t = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_selector(ready, timeout=120_000)
        walls.append(time.perf_counter() - t)
        readies.append(page.evaluate("window.tpbReadyMs"))
        if interact:
            extra.append(page.evaluate(ON_PAGE))
        if errors:
            raise RuntimeError(f"{path.name}: {errors}")
        page.close()
    out: dict[str, Any] = {"bytes": path.stat().st_size, "wall_s_median": round(statistics.median(walls), 3),
                           "wall_s": [round(w, 3) for w in walls], "ready_ms_median": round(statistics.median(readies), 1)}
    if extra:
        for k in extra[0]:
            out[k] = round(statistics.median(e[k] for e in extra), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    if CHROMIUM is None:
        sys.exit("chromium not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tp-browser-bench-") as d:
        tmp = Path(d)
        report, run_s, build_s = gsm8k_report(tmp, args.rows)
        long, long_build_s = long_page(tmp, args.rows)
        static = static_table(report, tmp)
        shown = json.loads(report.read_text().split('id="tpb-data">', 1)[1].split("</script>", 1)[0])["shown"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            res = {
                "chromium": browser.version,
                "rows": shown,
                "gsm8k": {"run_s": round(run_s, 2), "report_build_s": round(build_s, 2),
                          **load(browser, report, args.repeats, "#tpb[data-ready='1']", True)},
                "long": {"build_s": round(long_build_s, 2), **load(browser, long, args.repeats, "#tpb[data-ready='1']", True)},
                "static-table": load(browser, static, args.repeats, "body[data-ready='1']", False),
            }
            browser.close()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
