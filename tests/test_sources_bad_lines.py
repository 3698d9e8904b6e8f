"""Bad source lines (issue #15): each is quarantined with its file, line and reason, the rest of
the file goes through unchanged; `on_bad_line: error` stops with `file:LINE: reason`; misspelt
recipe names get a suggestion; bad input never ends the CLI in a traceback.

The data is the real GSM8K train set (tracepipe/data, copied from ../shared/data), damaged on
purpose in a copy: a truncated line, a line of binary junk, a null and a numeric question, an
oversized line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

import tracepipe.sources as sources
from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl
from tracepipe.cli import app
from tracepipe.pipeline.frames import FrameCache
from tracepipe.recipe import RecipeError, SourceSpec, load_recipe
from tracepipe.sources import BadSourceLine, Sources, load_sources, source_parts

ROWS = 160
LIMIT = 64 << 10  # max_row_bytes of the damaged file's spec: 64 KiB
# 0-based positions of the damaged lines (1-based line numbers are one more)
TRUNCATED, JUNK, NULL_Q, NUM_Q, HUGE = 5, 18, 40, 63, 131
JUNK_BYTES = b"\xff\xfe\x00\x9c\x81PK\x03\x04\xc3(\xa0\xa1\xe2\x28\xa1"


def _damaged_lines(rows: list[dict[str, Any]]) -> tuple[list[bytes], dict[int, bytes]]:
    """The rows as JSONL lines, five of them damaged; returns the lines and the damaged ones."""
    lines = [json.dumps(r).encode() for r in rows]
    bad = {
        TRUNCATED: lines[TRUNCATED][: len(lines[TRUNCATED]) // 2],
        JUNK: JUNK_BYTES,
        NULL_Q: json.dumps({**rows[NULL_Q], "question": None}).encode(),
        NUM_Q: json.dumps({**rows[NUM_Q], "question": 42}).encode(),
        HUGE: json.dumps({**rows[HUGE], "question": rows[HUGE]["question"] * (2 * LIMIT // len(rows[HUGE]["question"]))}).encode(),
    }
    assert len(bad[HUGE]) > LIMIT
    return [bad.get(i, line) for i, line in enumerate(lines)], bad


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path, dict[int, bytes]]:
    """A clean copy of GSM8K rows and a damaged one (same rows, five lines damaged)."""
    rows = read_jsonl(GSM8K_TRAIN, limit=ROWS)
    clean = write_jsonl(tmp_path / "clean" / "gsm8k.jsonl", rows)
    lines, bad = _damaged_lines(rows)
    path = tmp_path / "damaged" / "gsm8k.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines) + b"\n")
    return clean, path, bad


def _spec(path: Path, **kw: Any) -> SourceSpec:
    return SourceSpec(path=str(path), preset="gsm8k", max_row_bytes=LIMIT, **kw)


def _frame(src: Sources) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p.path) for p in src.parts], how="diagonal_relaxed")


def _expected_bad(path: Path, bad: dict[int, bytes]) -> list[tuple[str, int, str, str]]:
    huge = f"row of {len(bad[HUGE]) / 1e6:.1f} MB is over max_row_bytes 64 KiB"
    reasons = {NULL_Q: "problem is null", NUM_Q: "problem is not text (int)", JUNK: "not UTF-8 text", HUGE: huge}
    return [(str(path), i + 1, reasons.get(i, "malformed JSON"), line[:800].decode("utf-8", "replace")[:200]) for i, line in sorted(bad.items())]


@pytest.mark.parametrize("chunk_bytes", [sources.CHUNK_BYTES, 16 << 10], ids=["one-chunk", "many-chunks"])
def test_bad_lines_are_quarantined_and_the_rest_goes_through(
    damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int,
) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk_bytes)
    clean, path, bad = damaged
    want = load_sources([_spec(clean)], tmp_path, FrameCache(tmp_path / "clean-frames"))
    assert want.bad.height == 0 and want.rows_read == ROWS
    got = load_sources([_spec(path)], tmp_path, FrameCache(tmp_path / "frames"))
    if chunk_bytes < sources.CHUNK_BYTES:
        assert len(got.parts) > 3  # the damaged lines are spread over several chunks

    # every good row, same values, ids, keys and order as the clean file without the damaged lines
    keep = pl.Series([i not in bad for i in range(ROWS)])
    assert _frame(got).equals(_frame(want).filter(keep))
    assert got.rows_read == ROWS

    # exactly the damaged lines, with their 1-based line numbers, reasons and raw text
    assert got.bad.schema == pl.Schema({"file": pl.String, "line": pl.Int64, "_error": pl.String, "raw": pl.String})
    rows = got.bad.rows()
    expected = _expected_bad(path, bad)
    assert [r[:2] for r in rows] == [e[:2] for e in expected]
    assert [r[3] for r in rows] == [e[3] for e in expected]
    for (*_, reason, _raw), (*_, want_reason, _w) in zip(rows, expected):
        assert reason.startswith(want_reason), (reason, want_reason)
    assert rows[0][2].startswith("malformed JSON: Unterminated string")


def test_rerun_reports_the_same_bad_lines_from_the_cache(
    damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, path, _ = damaged
    first = load_sources([_spec(path)], tmp_path, FrameCache(tmp_path / "frames"))

    def no_parse(*a: Any) -> Any:
        raise AssertionError("an unchanged chunk was parsed again")

    monkeypatch.setattr(sources, "_jsonl_raw", no_parse)
    again = load_sources([_spec(path)], tmp_path, FrameCache(tmp_path / "frames"))
    assert again.bad.equals(first.bad) and again.bad.height == 5
    assert [p.digest for p in again.parts] == [p.digest for p in first.parts]
    assert again.rows_read == first.rows_read == ROWS
    assert [p.digest for p in source_parts([_spec(path)], tmp_path, FrameCache(tmp_path / "frames"))] == [p.digest for p in first.parts]


def test_clean_chunks_stay_on_the_fast_path(
    damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean, path, bad = damaged
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16 << 10)
    checked: list[bytes] = []
    real = sources._line_problem
    monkeypatch.setattr(sources, "_line_problem", lambda line, *a: checked.append(line) or real(line, *a))
    load_sources([_spec(clean)], tmp_path, FrameCache(tmp_path / "clean-frames"))
    assert checked == []  # a clean file is read by polars alone
    load_sources([_spec(path)], tmp_path, FrameCache(tmp_path / "frames"))
    # a chunk polars cannot read, or where it may have read the number 42 as text, goes line by
    # line (a null question polars reads as null: its chunk stays on the fast path) ...
    assert {bad[i] for i in (TRUNCATED, JUNK, NUM_Q, HUGE)} <= set(checked) and bad[NULL_Q] not in checked
    assert len(checked) < ROWS // 2  # ... and only those chunks


def test_on_bad_line_error_names_file_and_line(damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path) -> None:
    _, path, _ = damaged
    with pytest.raises(BadSourceLine, match=rf"^{path}:{TRUNCATED + 1}: malformed JSON") as err:
        load_sources([_spec(path, on_bad_line="error")], tmp_path, FrameCache(tmp_path / "frames"))
    assert (err.value.file, err.value.line) == (str(path), TRUNCATED + 1) and isinstance(err.value, ValueError)
    # the in-memory loader (no cache) reads the same way
    with pytest.raises(BadSourceLine, match=rf"^{path}:{TRUNCATED + 1}: "):
        load_sources([_spec(path, on_bad_line="error")], tmp_path)
    assert load_sources([_spec(path)], tmp_path).height == ROWS - 5


def test_default_max_row_bytes_is_8_mib(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=3)
    big = {**rows[1], "question": "x" * 9_100_000}
    path = write_jsonl(tmp_path / "s.jsonl", [rows[0], big, rows[2]])
    got = load_sources([SourceSpec(path=str(path), preset="gsm8k")], tmp_path, FrameCache(tmp_path / "frames"))
    assert got.bad.select("line", "_error").rows() == [(2, "row of 9.1 MB is over max_row_bytes 8 MiB")]
    assert _frame(got)["problem"].to_list() == [rows[0]["question"], rows[2]["question"]]


def test_parquet_rows_with_null_problem_are_quarantined_by_row_index(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=20)
    nulls = {3, 11}
    df = pl.DataFrame(rows).with_columns(
        pl.when(pl.int_range(pl.len()).is_in(list(nulls))).then(None).otherwise(pl.col("question")).alias("question")
    )
    df.write_parquet(tmp_path / "p.parquet")
    got = load_sources([SourceSpec(path=str(tmp_path / "p.parquet"), preset="gsm8k")], tmp_path, FrameCache(tmp_path / "frames"))
    assert got.bad.select("file", "line", "_error").rows() == [(str(tmp_path / "p.parquet"), i, "problem is null") for i in sorted(nulls)]
    assert _frame(got)["problem"].to_list() == [r["question"] for i, r in enumerate(rows) if i not in nulls]
    assert got.rows_read == 20


# -- recipes and the CLI -----------------------------------------------------------------------
RECIPE = """\
name: typo
workdir: {work}
source:
  - path: {source}
    preset: gsm8k
stages:
  - dedup: {{method: exact}}
  - {stage}: {{method: exact}}
outputs:
  - format: sft-messages
    path: {out}
"""


def _recipe(tmp_path: Path, source: Path = GSM8K_TRAIN, stage: str = "dedup", extra: str = "") -> Path:
    text = RECIPE.format(work=tmp_path / "work", source=source, stage=stage, out=tmp_path / "out")
    p = tmp_path / "recipe.yaml"
    p.write_text(text.replace("    preset: gsm8k\n", "    preset: gsm8k\n" + extra))
    return p


def _invoke(*args: str) -> Any:
    res = CliRunner().invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res


@pytest.mark.parametrize(("typo", "fix"), [("dedupe", "dedup"), ("genrate", "generate")])
def test_misspelt_stage_names_the_line_and_the_closest_stage(tmp_path: Path, typo: str, fix: str) -> None:
    path = _recipe(tmp_path, stage=typo)
    res = _invoke("validate", str(path))
    assert res.exit_code == 2
    assert f"{path}:8: stages[1]: unknown stage '{typo}'" in res.output
    assert f"did you mean '{fix}'?" in res.output


def test_misspelt_engine_kind_output_format_and_preset_get_suggestions(tmp_path: Path) -> None:
    text = _recipe(tmp_path).read_text().replace("preset: gsm8k", "preset: gsm8kk").replace("sft-messages", "sft-mesages")
    path = tmp_path / "r.yaml"
    path.write_text(text + "engines:\n  teacher: {kind: vlm, model: m}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    found = {(p.path, p.line): p.message for p in err.value.problems}
    assert found[("engines.teacher.kind", 13)].endswith("did you mean 'vllm'?")
    assert found[("outputs[0].format", 10)].endswith("did you mean 'sft-messages'?")
    assert found[("source[0].preset", 5)].endswith("did you mean 'gsm8k'?")


def test_bad_recipe_files_exit_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "bad.yaml").write_text("name: [x\nsource: :\n")
    (tmp_path / "ctrl.yaml").write_bytes(b"name: x\n\x07source: y\n")
    cases = {"missing.yaml": "not found", "dir.yaml": "is a directory", "latin1.yaml": "latin1.yaml:1: <top>: not UTF-8",
             "bad.yaml": "bad YAML", "ctrl.yaml": "ctrl.yaml:2: <top>: bad YAML"}
    for name, expect in cases.items():
        for cmd in ("validate", "plan", "run"):
            res = _invoke(cmd, str(tmp_path / name))
            assert res.exit_code == 2, (name, cmd, res.output)
            assert expect in res.output and len(res.output.strip().splitlines()) <= 3, (name, cmd, res.output)
    gone = _recipe(tmp_path, source=tmp_path / "nope" / "*.jsonl")
    res = _invoke("run", str(gone))
    assert res.exit_code == 2 and "source[0].path: no file matches" in res.output


def test_run_with_on_bad_line_error_exits_1_naming_file_and_line(damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path) -> None:
    _, path, _ = damaged
    res = _invoke("run", str(_recipe(tmp_path, source=path, extra="    on_bad_line: error\n")), "--no-progress")
    assert res.exit_code == 1, res.output
    assert f"{path}:{TRUNCATED + 1}: malformed JSON" in res.output


def test_run_quarantines_bad_lines_and_writes_every_good_row(damaged: tuple[Path, Path, dict[int, bytes]], tmp_path: Path) -> None:
    """Through the runner: the damaged lines land in ``quarantine/000-source.parquet`` with their
    file and line numbers, and the output holds every good row; too many bad lines stop the run."""
    from tracepipe.pipeline.runner import RunFailed, Runner

    clean, path, bad = damaged

    def recipe(name: str, src: Path, rate: float) -> Path:
        p = tmp_path / f"{name}.yaml"
        p.write_text(
            f"name: {name}\nworkdir: {tmp_path / ('wd-' + name)}\nmax_error_rate: {rate}\n"
            f"source:\n  - path: {src}\n    preset: gsm8k\n    max_row_bytes: {LIMIT}\n"
            f"stages:\n  - dedup: {{method: exact}}\noutputs:\n  - format: sft-messages\n    path: {tmp_path / ('out-' + name)}\n"
        )
        return p

    res = Runner(load_recipe(recipe("damaged", path, 0.05))).run()
    assert res.stats.source_bad_lines == 5
    quar = pl.read_parquet(tmp_path / "wd-damaged" / "quarantine" / "000-source.parquet")
    assert sorted(quar["line"].to_list()) == sorted(i + 1 for i in bad)
    assert set(quar["file"]) == {str(path)} and quar["_error"].is_not_null().all()
    want = Runner(load_recipe(recipe("clean", clean, 0.05))).run().final_frame().collect()
    got = res.final_frame().collect()
    keep_ids = set(want["id"]) - {want["id"][i] for i in bad}
    assert set(got["id"]) == keep_ids and got.height == len(keep_ids)
    with pytest.raises(RunFailed, match=r"5 of 160 source lines could not be read .*gsm8k.jsonl:6: malformed JSON"):
        Runner(load_recipe(recipe("strict", path, 0.01))).run()
