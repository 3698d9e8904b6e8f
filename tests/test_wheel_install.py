"""tracepipe installs like a library: a non-editable wheel in a fresh venv runs a recipe.

The wheel is built from a copy of the package sources (no ``build/`` left in the checkout), then
installed with ``--no-deps`` into a new venv that sees the heavy dependencies of ``.venv`` through
a plain path line in a ``.pth`` file (a path line, not an ``import`` line: ``.venv``'s editable
finder never runs, so the wheel's own copy of tracepipe is the one imported). The recipe runs
from a directory outside the checkout, on the GSM8K file shipped inside the installed wheel, so
any package data the wheel lacks (sources, benchmarks, card templates) fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS = 200


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    """``pip wheel`` over a copy of what the sdist holds (pyproject, README, the package)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tracepipe", src / "tracepipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist)], cwd=tmp, env=env)
    wheels = sorted(dist.glob("tracepipe-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _venv_with_wheel(tmp: Path, wheel: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A fresh venv with the wheel installed (no deps); returns (its bin dir, its site-packages)."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp, env=env)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env).stdout.strip())
    # the test venv's packages (polars, math-verify, ...) as a plain path line, after the wheel's
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_tracepipe_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    return venv / "bin", site


@pytest.mark.slow
def test_wheel_installs_and_runs_a_recipe(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRACEPIPE_NO_PUSH="1")
    wheel = _build_wheel(tmp_path, env)
    bindir, site = _venv_with_wheel(tmp_path, wheel, env)
    elsewhere = tmp_path / "elsewhere"  # cwd outside the checkout: nothing of it on sys.path
    elsewhere.mkdir()

    probe = _run([str(bindir / "python"), "-c", (
        "import tracepipe; from tracepipe.outputs._card import templates_dir; "
        "print(tracepipe.__file__); print(templates_dir())"
    )], cwd=elsewhere, env=env).stdout.split("\n")
    pkg_file, templates = Path(probe[0]).resolve(), Path(probe[1]).resolve()
    assert pkg_file.is_relative_to(site.resolve()), f"tracepipe imported from {pkg_file}, not the wheel in {site}"
    assert not pkg_file.is_relative_to(ROOT)
    assert (templates / "dataset_card.md.j2").is_file() and (templates / "report.html.j2").is_file()
    assert templates.is_relative_to(site.resolve())

    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["workdir"] = str(tmp_path / "work")
    recipe["source"][0]["path"] = str(pkg_file.parent / "data" / "sources" / "gsm8k_train.jsonl")
    recipe["source"][0]["limit"] = ROWS
    recipe["outputs"][0]["path"] = str(tmp_path / "out")
    path = elsewhere / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    _run([str(bindir / "tracepipe"), "run", str(path), "--no-progress"], cwd=elsewhere, env=env)
    out = tmp_path / "out"
    shards = sorted((out / "data").glob("train-*.parquet"))
    assert shards, sorted(p.name for p in out.rglob("*"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "gsm8k" in card
