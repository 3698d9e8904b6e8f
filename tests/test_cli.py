"""CLI: schema, init, plan/status output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures.recipes import GSM8K_TRAIN


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracepipe.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_schema_covers_stages_and_engines(tmp_path: Path) -> None:
    r = _cli("schema", "-o", str(tmp_path / "s.json"))
    assert r.returncode == 0
    schema = json.loads((tmp_path / "s.json").read_text())
    names = {next(iter(item["properties"])) for item in schema["properties"]["stages"]["items"]["oneOf"]}
    assert {"dedup", "filter", "map"} <= names
    assert "stage_dedup" in schema["$defs"]


def test_init_writes_a_recipe_that_parses(tmp_path: Path) -> None:
    r = _cli("init", str(tmp_path / "recipe.yaml"), "--name", "mine")
    assert r.returncode == 0
    data = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert data["name"] == "mine" and data["stages"]
    assert _cli("init", str(tmp_path / "recipe.yaml")).returncode == 2  # no silent overwrite


def test_plan_run_status_on_a_small_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "cli",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k", "limit": 100}],
        "stages": [{"dedup": {"method": "exact"}}, {"map": {"set": {"response": "solution"}}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out")}],
    }))
    plan = json.loads(_cli("plan", str(recipe), "--json").stdout)
    assert [s["to_compute"] for s in plan["stages"]] == [100, 100]
    assert not (tmp_path / "out").exists()
    r = _cli("run", str(recipe), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "wrote sft-messages" in r.stderr
    st = json.loads(_cli("status", str(recipe), "--json").stdout)
    assert st["last_run"]["ok"] and st["last_run"]["stages"][1]["rows_out"] == 100
    assert _cli("nonsense").returncode == 2


def test_every_shipped_recipe_validates() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(root.glob("*.yaml"))
    assert {p.name for p in recipes} >= {"demo.yaml", "vllm-example.yaml", "opd-example.yaml"}
    for p in recipes:
        r = _cli("validate", str(p))
        assert r.returncode == 0, (p, r.stderr)
