"""Bad recipes exit 2 naming the place; bad rows are quarantined; too many fail the run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, MATH500, read_jsonl, write_recipe


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracepipe.cli", *args], capture_output=True, text=True, timeout=300)


GOOD = f"""\
name: errs
source:
  - path: {GSM8K_TRAIN}
    preset: gsm8k
    limit: 50
stages:
  - dedup: {{method: exact}}
  - filter: {{where: "length(problem) < 500"}}
outputs:
  - format: sft-messages
    path: out
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_good_recipe_validates(tmp_path: Path) -> None:
    r = _cli("validate", str(_write(tmp_path, GOOD)))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("mutate", "expect_line", "expect"),
    [
        # bad YAML: an unclosed flow mapping on line 8
        (lambda t: t.replace('{method: exact}', '{method: exact'), 8, "bad YAML"),
        # unknown stage: the message lists the known stages
        (lambda t: t.replace("  - dedup:", "  - dedupe:"), 7, "unknown stage 'dedupe'; known stages: .*dedup.*filter"),
        # wrong type / value in a stage parameter
        (lambda t: t.replace("{method: exact}", "{method: fuzzy}"), 7, r"stages\[0\]\.dedup\.method"),
        # wrong type at the top level
        (lambda t: t.replace("    limit: 50", "    limit: many"), 5, r"source\[0\]\.limit"),
        # missing file
        (lambda t: t.replace(str(GSM8K_TRAIN), "/nonexistent/problems.jsonl"), 3, r"source\[0\]\.path: no such file"),
        # unknown parameter
        (lambda t: t.replace('{where: "length(problem) < 500"}', '{where: "length(problem) < 500", wher: 1}'), 8, r"stages\[1\]\.filter\.wher: unknown key"),
        # bad SQL in a filter
        (lambda t: t.replace('length(problem) < 500', 'length(problem) <<< 500'), 8, r"stages\[1\]\.filter\.where: .*not a valid SQL"),
    ],
    ids=["bad-yaml", "unknown-stage", "bad-value", "wrong-type", "missing-file", "unknown-key", "bad-sql"],
)
def test_bad_recipes_exit_2_and_name_the_place(tmp_path: Path, mutate, expect_line: int, expect: str) -> None:
    path = _write(tmp_path, mutate(GOOD))
    for cmd in ("validate", "run", "plan"):
        r = _cli(cmd, str(path))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        msg = r.stderr
        assert f"{path}:{expect_line}:" in msg, msg
        assert re.search(expect, msg), msg
    assert not (tmp_path / "out").exists()  # nothing ran


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("{method: exact}", "{method: fuzzy}").replace("    limit: 50", "    limit: -3")
    r = _cli("validate", str(_write(tmp_path, text)))
    assert r.returncode == 2
    assert "2 problem(s)" in r.stderr
    assert "stages[0].dedup.method" in r.stderr and "source[0].limit" in r.stderr


def test_missing_recipe_file_exits_2(tmp_path: Path) -> None:
    r = _cli("run", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "not found" in r.stderr


def _math_recipe(tmp_path: Path, rate: float) -> Path:
    return write_recipe(tmp_path / "q.yaml", {
        "name": "quarantine",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(MATH500), "preset": "math"}],
        # real data that makes a stage raise: MATH-500 answers that are not integers
        "stages": [{"map": {"set": {"answer_int": "CAST(answer AS INTEGER)"}, "batch_size": 64}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out")}],
        "max_error_rate": rate,
    })


def _not_int(a: str) -> bool:
    return re.fullmatch(r"\s*[+-]?\d+\s*", a) is None


def test_raising_rows_are_quarantined_and_the_run_finishes(tmp_path: Path) -> None:
    rows = read_jsonl(MATH500)
    bad = {r["unique_id"] for r in rows if _not_int(r["answer"])}
    assert 0 < len(bad) < len(rows)
    r = _cli("run", str(_math_recipe(tmp_path, 1.0)), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    st = stats["stages"][0]
    assert st["errors"] == len(bad)
    assert st["rows_out"] == len(rows) - len(bad)
    q = pl.read_parquet(tmp_path / "work" / "quarantine" / "001-map.parquet")
    assert set(q["id"].to_list()) == bad
    assert q["_stage"].unique().to_list() == ["map"]
    assert q["_error"].str.contains("InvalidOperationError").all()
    status = _cli("status", str(tmp_path / "q.yaml"))
    assert status.returncode == 0 and f"{len(bad)} rows" in status.stdout


def test_past_max_error_rate_the_run_fails_clearly(tmp_path: Path) -> None:
    r = _cli("run", str(_math_recipe(tmp_path, 0.05)), "--no-progress")
    assert r.returncode == 1
    assert "quarantined" in r.stderr and "max_error_rate" in r.stderr and "stages[0]" in r.stderr
    assert (tmp_path / "work" / "quarantine" / "001-map.parquet").exists()


def test_the_fast_loader_reads_a_recipe_as_the_round_trip_loader_does(tmp_path: Path) -> None:
    """A valid recipe is read by the C-backed safe loader; it must give what the round-trip
    loader (used for error lines) gives, YAML 1.2 scalars included (``on`` / ``no`` stay text)."""
    from tracepipe.recipe import _quick_load, load_recipe, parse_yaml, validate_tree

    text = GOOD.replace("name: errs", "name: errs\ndescription: on\nlicense: no\nmax_error_rate: 0.5")
    p = _write(tmp_path, text)
    quick = _quick_load(text)
    assert isinstance(quick, dict) and quick["description"] == "on" and quick["license"] == "no"
    fast = load_recipe(p)
    slow = validate_tree(parse_yaml(text, str(p)), str(p), p.resolve())
    assert fast.model_dump() == slow.model_dump()
    assert [(s.name, s.params.model_dump()) for s in fast.stage_specs] == [(s.name, s.params.model_dump()) for s in slow.stage_specs]
    assert fast.description == "on" and fast.license == "no"
