"""The trace browser (``tracepipe report`` and each output's ``browser.html``), driven in headless
Chromium with Playwright.

Expected counts are computed here from the Parquet files the run wrote (the SFT shards, the
workdir's rejects, the DPO and OPD shards, the run's final frame), never from the page's data.
Needs Debian's ``chromium`` (CI: ``apt-get install -y chromium``, done by ``scripts/install.sh
--test``) and the ``playwright`` package (the ``dev`` extra); Playwright drives the installed
chromium (``executable_path``), so no browser download is needed. The browser tests skip, with
that reason, when chromium is absent.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import xxhash

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (CI: apt-get update && apt-get install -y chromium)"
)
TEST_FRACTION = 0.25  # tests/fixtures/browser_data.py: the SFT output's test_fraction
SELECTS = ("split", "domain", "verdict", "difficulty", "gold_suspect", "compress_status", "stage")


# -- expectations from the Parquet files ------------------------------------------------------------
def _split_of(i: str) -> str:
    return "test" if xxhash.xxh32_intdigest(i.encode()) < int(TEST_FRACTION * 2**32) else "train"


@pytest.fixture(scope="module")
def rows(browser_build: dict[str, Any]) -> pl.DataFrame:
    """Every row the report's browser should hold: the SFT shards (kept rows; split from the file
    name, problem from the user turn) and the workdir's rejects (split by the id hash rule)."""
    kept = []
    for f in sorted((browser_build["sft-messages"] / "data").glob("*.parquet")):
        df = pl.read_parquet(f)
        kept.append(df.with_columns(
            pl.lit(f.name.split("-")[0]).alias("split"), pl.lit("kept").alias("stage"),
            pl.col("messages").list.eval(pl.element().filter(pl.element().struct.field("role") == "user").struct.field("content")).list.first().alias("problem"),
        ).select("id", "sample", "split", "stage", "domain", "verdict", "difficulty", "gold_suspect", "compress_status", "problem"))
    rej = pl.read_parquet(browser_build["dir"] / "work" / "rejects" / "*.parquet")
    rej = rej.with_columns(pl.col("id").map_elements(_split_of, return_dtype=pl.String).alias("split"), pl.col("_stage").alias("stage"))
    out = pl.concat([*kept, rej.select(kept[0].columns)], how="vertical_relaxed")
    # the rule used for the rejects is the writer's: it gives the SFT shards' splits too
    assert all(_split_of(i) == s for i, s in zip(out["id"], out["split"]))
    return out.with_columns(pl.col("gold_suspect").cast(pl.String).str.to_lowercase())


@pytest.fixture(scope="module")
def report(browser_build: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tracepipe.report import build_report

    return build_report(browser_build["recipe"], tmp_path_factory.mktemp("browser-report"))


# -- the browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI: apt-get update && apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (scripts/install.sh --test)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


class Page:
    """One opened page: JS errors and any request that is not a local file are recorded (and
    the requests refused), so a test can assert that the page works offline."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.errors: list[str] = []
        self.remote: list[str] = []
        self.dialogs: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.route("**/*", self._route)
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("#tpb[data-ready='1']", timeout=20_000)

    def _route(self, route: Any) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            self.remote.append(route.request.url)
            route.abort()

    def count(self) -> int:
        return int(self.page.get_attribute("#tpb-count", "data-n") or -1)

    def filter(self, filters: dict[str, str], search: str = "") -> int:
        for col in SELECTS:
            if self.page.locator(f"#tpb-f-{col}").count():
                self.page.select_option(f"#tpb-f-{col}", filters.get(col, ""))
        self.page.fill("#tpb-q", search)
        self.page.wait_for_timeout(200)  # the search box applies after a short pause
        return self.count()

    def visible(self) -> list[dict[str, Any]]:
        """The rows in the list's DOM: position, row index and the cells' texts."""
        return self.page.eval_on_selector_all(".tpb-row", """rs => rs.map(r => ({pos: +r.dataset.pos, row: +r.dataset.row,
            cells: Array.from(r.children).map(c => c.textContent)}))""")

    def last_position(self) -> int:
        self.page.eval_on_selector("#tpb-list", "l => { l.scrollTop = l.scrollHeight; }")
        self.page.wait_for_timeout(100)
        return max((r["pos"] for r in self.visible()), default=-1)

    def open_row(self, where: str) -> None:
        """Open the first visible row whose cells' text contains ``where``."""
        self.page.locator(".tpb-row", has_text=where).first.click()
        self.page.wait_for_selector("#tpb-detail h3")

    def close(self) -> None:
        self.page.close()


@pytest.fixture()
def report_page(chromium: Any, report: Path) -> Iterator[Page]:
    p = Page(chromium, report)
    yield p
    assert not p.errors and not p.remote and not p.dialogs, (p.errors, p.remote, p.dialogs)
    p.close()


CELL = {"stage": 2, "verdict": 3, "difficulty": 4, "domain": 5, "split": 6}


@needs_chromium
def test_filters_give_the_counts_of_the_parquet_files(report_page: Page, rows: pl.DataFrame) -> None:
    page = report_page
    assert page.count() == rows.height == 80
    ids = rows["id"].to_list()
    word = "babysitting"
    cases: list[tuple[dict[str, str], str]] = [
        ({}, ""),
        ({"stage": "kept"}, ""), ({"stage": "filter"}, ""),
        ({"split": "test"}, ""), ({"split": "test", "stage": "kept"}, ""),
        ({"verdict": "incorrect"}, ""), ({"difficulty": "hard", "split": "train"}, ""),
        ({"gold_suspect": "true"}, ""), ({"compress_status": "accepted", "stage": "kept"}, ""),
        ({"compress_status": "skipped:short"}, ""), ({"domain": "math"}, ""),
        ({}, word), ({"stage": "filter"}, word.upper()), ({}, ids[5]),
    ]
    seen = set()
    for filters, search in cases:
        want = rows
        for col, value in filters.items():
            want = want.filter(pl.col(col) == value)
        if search:
            q = search.lower()
            want = want.filter(pl.col("problem").str.to_lowercase().str.contains(q, literal=True) | (pl.col("id") == search))
        got = page.filter(filters, search)
        assert got == want.height, (filters, search, got, want.height)
        seen.add(got)
        if got:
            assert page.last_position() == got - 1  # the virtual list scrolls over exactly the matches
            for r in page.visible():
                for col, value in filters.items():
                    if col in CELL:
                        cell = r["cells"][CELL[col]]
                        assert (value in cell) if col == "stage" else cell == value, (filters, r)
    assert len(seen) >= 8  # the cases are not all the same count
    assert page.filter({"verdict": "incorrect", "stage": "kept"}) == 0
    assert "0 of 80" in page.page.inner_text("#tpb-count")


@needs_chromium
def test_a_row_opens_with_reasoning_diff_pair_and_tokens(report_page: Page, browser_build: dict[str, Any]) -> None:
    page = report_page
    final = browser_build["result"].final_frame().collect()
    # a kept row with an accepted compressed trace
    page.filter({"compress_status": "accepted", "stage": "kept"})
    first = page.visible()[0]
    page.page.locator(f".tpb-row[data-pos='{first['pos']}']").click()
    head = page.page.inner_text("#tpb-detail h3")
    rid, sample = re.match(r"(\S+) · sample (\d+)", head).groups()
    row = final.filter((pl.col("id") == rid) & (pl.col("sample") == int(sample))).row(0, named=True)

    # the reasoning is shown, and folds
    reasoning = page.page.locator("#tpb-detail .tpb-reasoning pre")
    assert reasoning.is_visible() and reasoning.text_content() == row["reasoning"]
    page.page.click("#tpb-detail .tpb-reasoning > summary")
    assert not reasoning.is_visible()
    page.page.click("#tpb-detail .tpb-reasoning > summary")
    assert reasoning.is_visible()
    assert page.page.inner_text("#tpb-detail .tpb-text-problem") == row["problem"]
    assert page.page.inner_text("#tpb-detail .tpb-text-answer") == row["answer"]
    assert "matches the gold answer" in page.page.inner_text("#tpb-detail .tpb-verdict")

    # the compressed trace beside the original: both whole, what was cut marked as deleted
    orig = page.page.locator("#tpb-detail .tpb-diff pre.tpb-orig")
    comp = page.page.locator("#tpb-detail .tpb-diff pre.tpb-comp")
    assert orig.text_content() == row["reasoning"] and comp.text_content() == row["reasoning_compressed"]
    deleted = "".join(orig.locator("del").all_text_contents())
    kept_text = orig.evaluate("p => Array.from(p.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('')")
    assert deleted and len(deleted) >= len(row["reasoning"]) - len(row["reasoning_compressed"])
    assert row["reasoning_compressed"].startswith(kept_text)  # what is not deleted is the compressed prefix

    # the per-token colouring: the completion tokens of the OPD shard, with the teacher's log-probs
    opd = pl.read_parquet(browser_build["opd"] / "data" / "*.parquet").filter((pl.col("id") == rid) & (pl.col("sample") == int(sample))).row(0, named=True)
    positions = [j for j, m in enumerate(opd["loss_mask"]) if m]
    spans = page.page.locator("#tpb-detail .tpb-tokens span")
    assert spans.count() == len(positions)
    titles = spans.evaluate_all("ss => ss.map(s => s.title)")
    for k in (0, len(positions) // 2, len(positions) - 1):
        j = positions[k]
        assert f"token {opd['token_ids'][j]}, teacher log p = {opd['teacher_logprobs'][j]:.2f}" in titles[k]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(browser_build["recipe"].engines["teacher"]["model"]))
    text = "".join(spans.all_text_contents())
    assert text == tok.decode([opd["token_ids"][j] for j in positions])
    colours = set(spans.evaluate_all("ss => ss.map(s => s.style.background)"))
    assert len(colours) > 1

    # a DPO pair of a problem, side by side, as in the dpo-pairs shard
    pair = pl.read_parquet(browser_build["dpo-pairs"] / "data" / "*.parquet").row(0, named=True)
    page.filter({"stage": "kept"}, pair["id"])
    page.open_row(f"{pair['id']} · {pair['chosen_sample']}")
    box = page.page.locator("#tpb-detail .tpb-pair").first
    assert box.locator(".tpb-chosen pre").text_content() == pair["chosen"][-1]["content"]
    assert box.locator(".tpb-rejected pre").text_content() == pair["rejected"][-1]["content"]
    assert "chosen sample 0 vs rejected sample 1" in box.inner_text()

    # a dropped row: its stage and reason
    page.filter({"stage": "filter"})
    page.open_row("dropped")
    assert "dropped by filter: incorrect answer" in page.page.inner_text("#tpb-detail .tpb-drop")


@needs_chromium
def test_output_page_is_pushed_and_works_from_the_copy(chromium: Any, browser_build: dict[str, Any]) -> None:
    pushed = browser_build["pushed"] / "browser.html"
    assert pushed.read_bytes() == (browser_build["sft-messages"] / "browser.html").read_bytes()
    html = pushed.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing loaded from the network
    sft = pl.read_parquet(browser_build["sft-messages"] / "data" / "*.parquet")
    moved = browser_build["dir"] / "elsewhere" / "copy.html"  # a download of the pushed file
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(pushed, moved)
    p = Page(chromium, moved)
    try:
        assert p.count() == sft.height  # the output's rows; no rejects by default
        assert p.page.locator("#tpb-f-stage").count() == 0
        test_rows = sum(pl.read_parquet(f).height for f in (browser_build["sft-messages"] / "data").glob("test-*.parquet"))
        assert p.filter({"split": "test"}) == test_rows
        assert not p.errors and not p.remote
    finally:
        p.close()
    # the DPO output's page shows its pairs under their rows
    assert (browser_build["dpo-pairs"] / "browser.html").exists()


@needs_chromium
def test_hostile_text_stays_text(chromium: Any, tmp_path: Path) -> None:
    from tracepipe import _browser

    evil = "</script><script>alert('x')</script><!-- \u2028 & <b>bold</b> ]]>"
    lf = pl.LazyFrame({"id": ["a", "b"], "problem": [evil, "plain"], "verdict": ["correct", "incorrect"], "_key": ["s:a", "s:b"]})
    payload = _browser.build_payload(lf)
    assert payload is not None
    page_html = _browser.render(payload, standalone=True)
    assert "</script><script>alert" not in page_html
    path = tmp_path / "evil.html"
    path.write_text(page_html)
    p = Page(chromium, path)
    try:
        # filters only for the columns the rows have
        assert [s.get_attribute("id") for s in p.page.locator(".tpb-bar select").all()] == ["tpb-f-verdict"]
        p.open_row("correct")
        assert p.page.inner_text("#tpb-detail .tpb-text-problem") == evil
        assert not p.dialogs and not p.errors and p.page.locator("#tpb-detail b").count() == 0
    finally:
        p.close()


@needs_chromium
def test_tip_classes_colour_the_tokens(chromium: Any, tmp_path: Path) -> None:
    from tracepipe import _browser

    # two rows: 3 prompt tokens then completion tokens; classes 1-4 on the completion, 0 elsewhere
    ids = [[5, 6, 7, 10, 11, 12, 13, 14], [5, 6, 7, 20, 21]]
    mask = [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    lps = [[None, -1.0, -2.0, -0.5, -3.25, -0.01, -7.0, -1.5], [None, -1.0, -1.0, -2.0, -0.1]]
    cls = [[0, 0, 0, 1, 3, 4, 2, 3], [0, 0, 0, 4, 4]]
    keep = [[0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 1]]
    lf = pl.LazyFrame({"_key": ["s:a", "s:b"], "id": ["a", "b"], "problem": ["p a", "p b"], "token_ids": ids, "loss_mask": mask,
                       "teacher_logprobs": lps, "tip_class": cls, "tip_mask": keep},
                      schema_overrides={"loss_mask": pl.List(pl.Int8), "tip_class": pl.List(pl.Int8), "tip_mask": pl.List(pl.Int8)})
    payload = _browser.build_payload(lf)
    assert payload is not None and payload["tokens"]["mode"] == "tip"
    path = tmp_path / "tip.html"
    path.write_text(_browser.render(payload, standalone=True))
    p = Page(chromium, path)
    try:
        p.open_row("p a")
        spans = p.page.locator("#tpb-detail .tpb-tokens span")
        assert spans.all_text_contents() == ["⟨10⟩", "⟨11⟩", "⟨12⟩", "⟨13⟩", "⟨14⟩"]  # no tokenizer: ids
        titles = spans.evaluate_all("ss => ss.map(s => s.title)")
        assert "TIP class 3 (overconfident)" in titles[1] and "teacher log p = -3.25" in titles[1]
        colours = spans.evaluate_all("ss => ss.map(s => getComputedStyle(s).backgroundColor)")
        assert colours[1] == colours[4] and len(set(colours)) == 4  # one colour per class
        assert spans.evaluate_all("ss => ss.map(s => s.classList.contains('tpb-masked') ? 1 : 0)") == [1, 1, 0, 1, 1]
        legend = p.page.inner_text("#tpb-detail .tpb-legend")
        assert "high entropy high divergence" in legend and "kept by tip_mask" in legend
    finally:
        p.close()
    assert not p.errors


# -- without a browser ----------------------------------------------------------------------------
def test_sampling_and_text_budget() -> None:
    from tracepipe import _browser

    n = 1000
    lf = pl.LazyFrame({"_key": [f"s:{i}" for i in range(n)], "id": [str(i) for i in range(n)],
                       "reasoning": ["x" * (i % 50 + 1) * 100 for i in range(n)], "verdict": ["correct"] * n})
    a = _browser.build_payload(lf, limits=_browser.Limits(rows=100, mb=0.1))
    b = _browser.build_payload(lf, limits=_browser.Limits(rows=100, mb=0.1))
    assert a is not None and b is not None
    assert a["shown"] == 100 and a["total"] == n and a["sampled"] and a["keys"] == b["keys"]  # a stable sample
    texts = [t for t in a["texts"]["reasoning"] if t]
    assert a["cut"] and max(len(t) for t in texts) == a["cut"] and sum(len(t) for t in texts) <= 0.1e6
    full = a["full_len"]["reasoning"]
    want = {int(k.split(":")[1]) % 50 * 100 + 100 for k in a["keys"]}
    assert set(full) == want  # the full lengths, for the "cut at" note
    # rejects count against the same bound, and the split is the caller's expression
    assert _browser.build_payload(lf, limits=_browser.Limits(rows=n))["shown"] == n  # type: ignore[index]
    whole = _browser.build_payload(lf, split=pl.lit("train"))
    assert whole is not None and whole["cats"]["split"]["values"] == ["train"] and not whole["sampled"]
    text = _browser.script_json({"t": "</script>\u2028&"})
    assert "<" not in text and "&" not in text and json.loads(text) == {"t": "</script>\u2028&"}


def test_browser_option(tmp_path: Path) -> None:
    from tests.fixtures.browser_data import write_browser_recipe
    from tests.fixtures.outputs_data import run_recipe
    from tracepipe import _browser

    assert _browser.Limits.from_option(False) is None and _browser.Limits.from_option(None) == _browser.Limits()
    assert _browser.Limits.from_option({"rows": 5}).rows == 5  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown key"):
        _browser.Limits.from_option({"row": 5})
    run_recipe(write_browser_recipe(tmp_path, limit=6, browser={"rows": 4, "rejects": True}))
    html = (tmp_path / "out" / "sft" / "browser.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="tpb-data">(.*?)</script>', html, re.S).group(1))
    assert data["shown"] == 4 and data["total"] > 4 and "stage" in data["cats"]
