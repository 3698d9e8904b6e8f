"""The README's main job: the offline demo recipe, end to end on the bundled GSM8K data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_runs_offline_and_reruns_from_cache(tmp_path: Path) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["workdir"] = str(tmp_path / "work")
    recipe["source"][0]["path"] = str(ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl")
    recipe["outputs"][0]["path"] = str(tmp_path / "out")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "tracepipe.cli", "run", str(path), "--no-progress", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    stats = json.loads(first.stdout)
    names = [s["name"] for s in stats["stages"]]
    assert names == ["decontaminate", "dedup", "dedup", "filter", "generate", "verify", "difficulty", "map", "select"]
    decon = stats["stages"][0]
    assert sum(decon["dropped"].values()) >= 1  # GSM8K train really overlaps GSM8K test in a few items
    out = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet")
    assert out.height == stats["stages"][-1]["rows_out"] > 7000
    assert set(out["verdict"].unique()) == {"correct"}
    assert (tmp_path / "out" / "README.md").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert all(s["computed"] == 0 for s in json.loads(second.stdout)["stages"])
