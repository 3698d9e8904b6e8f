"""Screenshots of the trace browser for docs/report.md (docs/img/browser-*.png), with Playwright.

Builds the tiny model, runs the browser test recipe (``tests/fixtures/browser_data.py``: 40 GSM8K
problems read twice, the tiny model scoring the kept samples), renders ``tracepipe report`` and
photographs the page in the installed chromium. Usage: ``.venv/bin/python scripts/browser_screenshots.py``
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "img"


def main() -> None:
    from playwright.sync_api import sync_playwright

    from tests.fixtures.browser_data import write_browser_recipe
    from tests.fixtures.outputs_data import run_recipe
    from tests.fixtures.tiny_model import build_tiny_model
    from tracepipe.report import build_report

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("chromium not installed (apt-get install -y chromium)")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tp-shots-") as d:
        tmp = Path(d)
        model = build_tiny_model(tmp / "model")
        recipe, _ = run_recipe(write_browser_recipe(tmp, limit=40, model_dir=model))
        report = build_report(recipe, tmp / "report")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
            page.goto(report.as_uri())
            page.wait_for_selector("#tpb[data-ready='1']")
            tpb = page.locator("#tpb")

            def shot(name: str, top: str, bottom: str) -> None:
                """The page from the top of ``top`` to the bottom of ``bottom``."""
                a, b, box = page.locator(top).first.bounding_box(), page.locator(bottom).first.bounding_box(), tpb.bounding_box()
                assert a and b and box
                y = page.evaluate("window.scrollY")  # boxes are in the viewport; a full-page clip is in the page
                page.screenshot(path=str(OUT / name), full_page=True,
                                clip={"x": box["x"] - 8, "y": a["y"] + y - 8, "width": box["width"] + 16,
                                      "height": b["y"] + b["height"] - a["y"] + 16})
                print(OUT / name)

            # 1. the list, filtered to the dropped rows
            page.select_option("#tpb-f-stage", "filter")
            shot("browser-list.png", "#tpb > h2", "#tpb-list")
            # 2. a kept row with a compressed trace: problem, gold, verdict, reasoning, the diff
            page.select_option("#tpb-f-stage", "kept")
            page.select_option("#tpb-f-compress_status", "accepted")
            page.locator(".tpb-row").first.click()
            shot("browser-row.png", "#tpb-detail h3", "#tpb-detail .tpb-compress")
            # 3. the per-token colouring of that row (teacher log-probs of the tiny random model)
            shot("browser-tokens.png", "#tpb-detail .tpb-tok", "#tpb-detail .tpb-tok")
            # 4. a DPO pair side by side
            page.select_option("#tpb-f-compress_status", "")
            page.select_option("#tpb-f-stage", "filter")
            rid = page.locator(".tpb-row").first.get_attribute("data-row")
            page.locator(f".tpb-row[data-row='{rid}']").click()
            page.select_option("#tpb-f-stage", "kept")
            page.fill("#tpb-q", page.inner_text("#tpb-detail h3").split(" ")[0])
            page.wait_for_timeout(300)
            page.locator(".tpb-row").first.click()
            shot("browser-dpo.png", "#tpb-detail h3", "#tpb-detail .tpb-dpo")
            browser.close()


if __name__ == "__main__":
    main()
