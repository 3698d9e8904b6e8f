"""Recipes with an ``openai`` engine: validate and plan work offline; a key never goes in a recipe."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from tracepipe import DATA_DIR
from tracepipe.cli import app

DEAD = "http://127.0.0.1:9/v1"  # nothing listens here: any network use fails


def recipe(tmp_path: Path, **engine: object) -> Path:
    r = {
        "name": "api",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(DATA_DIR / "sources" / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": 5}],
        "engines": {"api": {"kind": "openai", "base_url": DEAD, "model": "m", "api_key_env": "TP_NOT_SET", **engine}},
        "stages": [{"generate": {"engine": "api", "n": 2}}],
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def test_validate_and_plan_offline_with_a_pinned_fingerprint(tmp_path: Path) -> None:
    p = recipe(tmp_path, fingerprint="my-teacher-v1")
    assert CliRunner().invoke(app, ["validate", str(p)]).exit_code == 0
    res = CliRunner().invoke(app, ["plan", str(p), "--json"])
    assert res.exit_code == 0, res.output
    assert '"to_compute": 5' in res.output


def test_plan_without_pin_needs_the_server_and_says_so(tmp_path: Path) -> None:
    p = recipe(tmp_path)
    assert CliRunner().invoke(app, ["validate", str(p)]).exit_code == 0  # validate never needs it
    res = CliRunner().invoke(app, ["plan", str(p)])
    # the key's variable is needed to ask the server: the run fails (exit 1) naming the stage and why
    assert res.exit_code == 1, res.output
    assert "stages[0].generate" in res.output and "OpenAIEngineError" in res.output and "TP_NOT_SET" in res.output
    res = CliRunner().invoke(app, ["plan", str(recipe(tmp_path, api_key_env=None))])
    assert res.exit_code == 1
    assert "OpenAIEngineError" in res.output and "pin `fingerprint:`" in res.output


def test_a_key_in_the_recipe_is_a_recipe_error(tmp_path: Path) -> None:
    key = "sk-abcdefabcdefabcdef123456"
    res = CliRunner().invoke(app, ["validate", str(recipe(tmp_path, api_key=key))])
    assert res.exit_code == 2
    assert "api_key_env" in res.output and key not in res.output
