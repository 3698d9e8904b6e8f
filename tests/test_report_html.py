"""``tracepipe report``: the HTML page and its PNG plots, rendered in headless Chromium.

Needs Debian's ``chromium`` (CI: ``apt-get update && apt-get install -y chromium``); the browser
tests skip with that reason when it is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (CI: apt-get update && apt-get install -y chromium)"
)
IMG_CHECK = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images).map(i => ({src: i.getAttribute("src"), complete: i.complete,
                                                      w: i.naturalWidth, h: i.naturalHeight}));
  const pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify(imgs);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report(traces_outputs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tracepipe.report import build_report

    return build_report(traces_outputs["recipe"], tmp_path_factory.mktemp("report"))


def test_report_files(report: Path, traces_outputs: dict[str, Any]) -> None:
    html = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    # run-level plots and, per output, lengths / pass rates / difficulty / verdicts
    for name in ("drops_per_stage.png", "throughput_per_stage.png", "out0_token_lengths.png", "out0_pass_rate.png",
                 "out0_difficulty.png", "out0_verdicts.png"):
        assert name in srcs
    for s in srcs:
        assert (report.parent / s).stat().st_size > 1000
    stats = traces_outputs["result"].stats
    assert stats.run_id in html and "incorrect answer: " in html
    for i, _ in enumerate(traces_outputs["recipe"].outputs):
        assert f"Output {i}:" in html


def test_report_cli(traces_outputs: dict[str, Any], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tracepipe.cli", "report", str(traces_outputs["recipe_path"]), "-o", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report.html").exists() and "report.html" in r.stdout
    assert len(list(tmp_path.glob("*.png"))) >= 6


def test_report_without_a_run(tmp_path: Path) -> None:
    from tests.fixtures.outputs_data import write_traces_recipe
    from tracepipe.recipe import load_recipe
    from tracepipe.report import build_report

    recipe = load_recipe(write_traces_recipe(tmp_path, [{"format": "sft-messages", "path": "out"}], limit=5))
    page = build_report(recipe).read_text()
    assert "No run recorded yet" in page and "Not written yet" in page


@needs_chromium
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    # images load (naturalWidth > 0): a copy of the page with a script that lists them, DOM dumped
    probe = report.parent / "probe.html"
    probe.write_text(report.read_text().replace("</body>", IMG_CHECK + "</body>"))
    r = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path / "profile-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<pre id="img-check">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stdout[-2000:]
    imgs = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(imgs) >= 6
    for img in imgs:
        assert img["complete"] and img["w"] > 100 and img["h"] > 100, img

    # a screenshot of the page is not blank
    shot = tmp_path / "report.png"
    r = _chromium(["--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile-shot")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 24) or []
        assert len(colors) > 50  # text, tables and plots, not one flat colour
        white = sum(n for n, c in colors if min(c) > 245)
        assert white < 0.97 * 1200 * 2000
