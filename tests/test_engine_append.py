"""Appending rows to a source: only the new rows flow through the stages and into the output.

Real GSM8K train rows, a real runner, real files. JSONL chunks are made small (64 KiB) so a few
thousand rows make many frame parts. Every incremental result is compared with a fresh run
over the same final source in another workdir: appending must never change what is produced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import tracepipe.outputs._writer as writer
import tracepipe.sources as sources
from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tracepipe.pipeline.keys import KEY_COL, ORDER_COL
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.stages import get_stage
from tracepipe.stages.base import DROP_COL, StageContext
from tracepipe.stages.dedup import DUP_OF, NORM_HASH

STAGES = [
    {"dedup": {"method": "exact"}},
    {"filter": {"store": True, "where": "length(problem) < 400"}},
    {"map": {"store": True, "set": {"response": "solution"}}},
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64 << 10)


def _recipe(d: Path, src: Path, stages: list[dict[str, Any]] = STAGES, **source: Any) -> Path:
    spec = {"path": str(src), "preset": "gsm8k", **source} if not source.get("columns") else {"path": str(src), **source}
    return write_recipe(d / "r.yaml", {
        "name": "app",
        "workdir": str(d / "work"),
        "source": [spec],
        "stages": stages,
        "outputs": [{"format": "sft-messages", "path": str(d / "out"), "row_group_rows": 100}],
    })


def _run(recipe: Path) -> dict[str, Any]:
    return Runner(load_recipe(recipe)).run().stats.to_dict()


def _shards(out: Path) -> list[Path]:
    return sorted((out / "data").glob("*.parquet"))


def _rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in _shards(out)])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fresh(tmp_path: Path, rows: list[dict[str, Any]], stages: list[dict[str, Any]] = STAGES, **source: Any) -> tuple[dict[str, Any], Path]:
    d = tmp_path / "fresh"
    d.mkdir(parents=True)
    src = write_jsonl(d / "src.jsonl", rows)
    stats = _run(_recipe(d, src, stages, **source))
    return stats, d / "out"


def test_appended_rows_flow_alone_and_output_appends(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=3200)
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows[:3000])
    recipe = _recipe(d, src)
    first = _run(recipe)
    n_parts = first["stages"][0]["parts"]
    assert n_parts > 10  # precondition: 64 KiB chunks make many parts
    old_shards = {_sha(p): p.name for p in _shards(d / "out")}

    write_jsonl(src, rows)  # the same file, rewritten with 200 more rows at the end
    second = _run(recipe)
    new_parts = second["stages"][0]["parts"] - n_parts
    assert 1 <= new_parts <= 2  # 200 rows: one or two 64 KiB chunks
    assert first["stages"][0]["parts_prepared"] == n_parts and second["stages"][0]["parts_prepared"] == new_parts
    for st in second["stages"]:  # every earlier part comes from the frame cache; only the new ones are worked on
        assert st["parts"] == n_parts + new_parts and st["parts_reused"] == n_parts, st
    assert second["stages"][1]["computed"] == sum(1 for r in rows[3000:] if r["question"] not in {x["question"] for x in rows[:3000]})

    info = json.loads((d / "out" / "output.json").read_text())
    assert info["appended"] is True and (info["shards_kept"], info["shards_written"]) == (1, 1)
    shards = _shards(d / "out")
    assert len(shards) == len(old_shards) + 1
    assert [p.name for p in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    # the earlier shards are byte for byte the ones written before (renamed -of-N only)
    assert [_sha(p) for p in shards[:-1]] == list(old_shards)
    new_rows = pl.read_parquet(shards[-1])
    assert new_rows["id"].to_list() == [r for r in _rows(d / "out")["id"].to_list()[-new_rows.height:]]
    assert set(new_rows["id"].to_list()).isdisjoint(pl.concat([pl.read_parquet(p) for p in shards[:-1]])["id"].to_list())

    # the rows, in order, are exactly what a fresh run over the final file writes
    fresh_stats, fresh_out = _fresh(tmp_path, rows)
    assert _rows(d / "out").equals(_rows(fresh_out))
    assert [s["rows_out"] for s in second["stages"]] == [s["rows_out"] for s in fresh_stats["stages"]]
    card = (d / "out" / "README.md").read_text()
    assert f"num_examples: {_rows(fresh_out).height}" in card

    # nothing changed: nothing computed, no shard rewritten
    before = [(p.name, _sha(p)) for p in _shards(d / "out")]
    third = _run(recipe)
    assert all(s["computed"] == 0 and s["parts_reused"] == s["parts"] for s in third["stages"]), third["stages"]
    assert [(p.name, _sha(p)) for p in _shards(d / "out")] == before
    info = json.loads((d / "out" / "output.json").read_text())
    assert (info["shards_kept"], info["shards_written"]) == (2, 0)

    # one more append after the no-change run: dedup prepares only the new part(s)
    more = read_jsonl(GSM8K_TRAIN, limit=200, start=3200)
    write_jsonl(src, rows + more)
    fourth = _run(recipe)
    assert 1 <= fourth["stages"][0]["parts_prepared"] <= 2 and fourth["stages"][0]["parts_reused"] == third["stages"][0]["parts"]
    _, fresh_out = _fresh(tmp_path / "again", rows + more)
    assert _rows(d / "out").equals(_rows(fresh_out))


def test_appends_compact_past_the_shard_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "APPEND_MAX_SHARDS", 3)
    rows = read_jsonl(GSM8K_TRAIN, limit=2400)
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows[:2000])
    recipe = _recipe(d, src)
    _run(recipe)
    counts = []
    for n in (2100, 2200, 2300, 2400):
        write_jsonl(src, rows[:n])
        _run(recipe)
        counts.append((len(_shards(d / "out")), json.loads((d / "out" / "output.json").read_text())["appended"]))
    # 2 and 3 shards by appending; a 4th would pass the limit, so the output is rewritten (1 shard)
    assert counts[:3] == [(2, True), (3, True), (1, False)]
    assert counts[3] == (2, True)
    _, fresh_out = _fresh(tmp_path, rows)
    assert _rows(d / "out").equals(_rows(fresh_out))


def test_an_edit_inside_the_file_rewrites_the_output(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=2000)
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows)
    recipe = _recipe(d, src)
    first = _run(recipe)
    edited = [dict(r) for r in rows]
    edited[700]["question"] = "A farmer has 17 sheep and buys 5 more. How many sheep does the farmer have now?"
    write_jsonl(src, edited)
    second = _run(recipe)
    assert 0 < second["stages"][1]["parts_reused"] < second["stages"][1]["parts"]  # the parts before the edit are reused
    assert json.loads((d / "out" / "output.json").read_text())["appended"] is False
    _, fresh_out = _fresh(tmp_path, edited)
    assert _rows(d / "out").equals(_rows(fresh_out))
    assert first["stages"][0]["rows_in"] == second["stages"][0]["rows_in"]


def test_new_rows_that_repeat_old_ones_are_deduplicated_against_them(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=1500)
    extra = [{**r, "question": r["question"].upper()} for r in rows[:40]]  # same problems, other case
    new = read_jsonl(GSM8K_TRAIN, limit=3, start=5000)
    extra += new + [{**new[0], "question": new[0]["question"] + "  "}]  # a new problem twice (spacing differs)
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows)
    recipe = _recipe(d, src)
    first = _run(recipe)
    write_jsonl(src, rows + extra)
    second = _run(recipe)
    assert second["stages"][0]["dropped"] == {"dedup:exact": 41}
    # exact dedup decides over all rows again (cheap: the prepared hashes of old parts are cached),
    # and the old parts' output, whose decisions did not change, is reused as it was
    assert second["stages"][0]["computed"] == len(rows) + len(extra)
    assert second["stages"][0]["parts_reused"] == first["stages"][0]["parts"]
    rej = pl.concat([pl.read_parquet(f) for f in sorted((d / "work" / "rejects").glob("*dedup*.parquet"))], how="diagonal_relaxed")
    assert rej.height == 41
    # the gsm8k id hashes the normalized problem, so a repeat has the old row's id (key suffixed ~1),
    # and it points at that old row, or at the first of the new rows
    assert (rej[DUP_OF] + "~1").to_list() == rej[KEY_COL].to_list()
    assert rej[DUP_OF][-1].startswith("src:") and rej[DUP_OF][-1] not in set(rej[DUP_OF][:-1].to_list())
    _, fresh_out = _fresh(tmp_path, rows + extra)
    assert _rows(d / "out").equals(_rows(fresh_out))


def test_a_set_stage_whose_old_decisions_can_change_decides_all_rows(tmp_path: Path) -> None:
    """``keep: shortest``: an appended shorter copy displaces the old row, so nothing is kept as it was."""
    rows = read_jsonl(GSM8K_TRAIN, limit=1500)
    extra = [{**rows[10], "question": rows[10]["question"].replace(" ", "  ").strip()}]
    extra[0]["question"] = rows[10]["question"]  # the same text ...
    rows[10] = {**rows[10], "question": rows[10]["question"] + "   "}  # ... the old one longer (trailing spaces)
    stages = [{"dedup": {"method": "exact", "keep": "shortest"}}, *STAGES[1:]]
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows)
    recipe = _recipe(d, src, stages)
    _run(recipe)
    write_jsonl(src, rows + extra)
    second = _run(recipe)
    assert second["stages"][0]["computed"] == len(rows) + 1
    rej = pl.concat([pl.read_parquet(f) for f in sorted((d / "work" / "rejects").glob("*dedup*.parquet"))], how="diagonal_relaxed")
    assert rej.height == 1 and rej["question"][0] == rows[10]["question"]  # the old, longer row is the one dropped
    _, fresh_out = _fresh(tmp_path, rows + extra, stages)
    assert _rows(d / "out").equals(_rows(fresh_out))


def test_repeated_ids_in_appended_rows_get_the_next_suffix(tmp_path: Path) -> None:
    cols = {"columns": {"id": "qid", "problem": "q", "answer": "a", "response": "a"}, "answer_format": "raw"}
    rows = [{"qid": f"q{i % 900}", "q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(1000)]
    more = [{"qid": f"q{i}", "q": f"What is {i} times 3?", "a": str(3 * i)} for i in range(5)]
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows)
    stages = [{"filter": {"store": True, "where": "true"}}]
    recipe = _recipe(d, src, stages, **cols)
    _run(recipe)
    write_jsonl(src, rows + more)
    keys = Runner(load_recipe(recipe)).run().final_frame().select(KEY_COL).collect()[KEY_COL]
    assert keys.n_unique() == 1005 and {"src:q0", "src:q0~1", "src:q0~2", "src:q4~1"} <= set(keys.to_list())
    _, fresh_out = _fresh(tmp_path, rows + more, stages, **cols)
    got, want = _rows(d / "out"), _rows(fresh_out)
    assert got.equals(want) and got.height == 1005
    assert got["id"].to_list().count("q0") == 3  # rows 0 and 900, then the appended one: three keys


def test_a_file_without_a_final_newline_then_appended(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=1200)
    d = tmp_path / "inc"
    d.mkdir()
    src = d / "src.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows[:1000]))  # no newline at the end
    recipe = _recipe(d, src)
    _run(recipe)
    with open(src, "a") as fh:
        fh.write("\n" + "\n".join(json.dumps(r) for r in rows[1000:]) + "\n")
    _run(recipe)
    _, fresh_out = _fresh(tmp_path, rows)
    assert _rows(d / "out").equals(_rows(fresh_out))


def test_exact_dedup_groups_on_all_128_bits_when_halves_clash() -> None:
    """Two texts whose first 64-bit hash halves are equal but second halves differ stay apart."""
    stage = get_stage("dedup")(get_stage("dedup").Params(method="exact"), StageContext())
    df = pl.DataFrame({
        KEY_COL: ["a", "b", "c", "d"],
        ORDER_COL: [0, 1, 2, 3],
        NORM_HASH[0]: pl.Series([7, 7, 9, 7], dtype=pl.UInt64),
        NORM_HASH[1]: pl.Series([1, 2, 3, 1], dtype=pl.UInt64),
    })
    out = stage.decide(df)
    assert out[DROP_COL].to_list() == [None, None, None, "dedup:exact"]
    assert out[DUP_OF].to_list() == [None, None, None, "a"]


def test_card_figures_of_an_appending_run_equal_a_fresh_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows and domains on the card are summed from per-part figures kept in output.json: a
    rerun that adds a source of another domain (and an output ``where``) reports what a fresh
    run reports, and reads only the new parts for them."""
    rows = read_jsonl(GSM8K_TRAIN, limit=1500)
    code = [{"question": f"Write a Python function that takes no arguments and returns the square of {i}.", "answer": f"#### {i * i}"} for i in range(60)]
    d = tmp_path / "inc"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows)
    other = write_jsonl(d / "code.jsonl", code)

    def recipe(sources: list[dict[str, Any]], at: Path) -> Path:
        return write_recipe(at / "r.yaml", {
            "name": "app", "workdir": str(at / "work"), "source": sources, "stages": STAGES,
            "outputs": [{"format": "sft-messages", "path": str(at / "out"), "options": {"where": "length(problem) > 60"}}],
        })

    one = [{"path": str(src), "preset": "gsm8k"}]
    two = one + [{"path": str(other), "preset": "gsm8k", "domain": "code", "name": "code"}]
    _run(recipe(one, d))
    figures = json.loads((d / "out" / "output.json").read_text())["figures"]
    counted: list[str] = []
    scan = writer.scan_parts

    def spy(parts: list[Any], *a: Any, **kw: Any) -> pl.LazyFrame:
        if kw.get("file_column"):
            counted.extend(p.digest for p in parts)
        return scan(parts, *a, **kw)

    monkeypatch.setattr(writer, "scan_parts", spy)
    _run(recipe(two, d))
    monkeypatch.setattr(writer, "scan_parts", scan)
    info = json.loads((d / "out" / "output.json").read_text())
    assert info["appended"] is True
    assert {k: v for k, v in info["figures"]["parts"].items() if k in figures["parts"]} == figures["parts"]  # old parts: as counted before
    assert counted and set(counted) == set(info["figures"]["parts"]) - set(figures["parts"])  # only the new parts were read
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _run(recipe(two, fresh))
    got, want = (json.loads((x / "out" / "summary.json").read_text()) for x in (d, fresh))
    assert got["final_rows"] == want["final_rows"] == sum(f["rows"] for f in info["figures"]["parts"].values())
    assert got["domains"] == want["domains"] == ["code", "math"]
    assert want["final_rows"] < 1500 + 60  # `where` dropped some rows, and they are not counted
    assert _rows(d / "out").equals(_rows(fresh / "out"))


def test_bounded_memory_paths_give_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joins in many small groups, missing rows spilled to a scratch file: the same rows as the
    in-memory paths, and an append still computes only its rows."""
    import tracepipe.pipeline.runner as runner_mod

    rows = read_jsonl(GSM8K_TRAIN, limit=3200)
    fresh_stats, fresh_out = _fresh(tmp_path, rows)
    monkeypatch.setattr(runner_mod, "JOIN_GROUP_ROWS", 700)
    monkeypatch.setattr(runner_mod, "TODO_MEMORY_BYTES", 1)
    d = tmp_path / "small"
    d.mkdir()
    src = write_jsonl(d / "src.jsonl", rows[:3000])
    # batches of 500 (an execution parameter: the same fingerprint, the same results)
    stages = [STAGES[0], {"filter": {**STAGES[1]["filter"], "batch_size": 500}}, *STAGES[2:]]
    recipe = _recipe(d, src, stages)
    first = _run(recipe)
    assert first["stages"][1]["computed"] == first["stages"][1]["rows_in"] > 500  # more than a batch: groups of 700
    write_jsonl(src, rows)
    second = _run(recipe)
    assert second["stages"][1]["computed"] == second["stages"][1]["rows_in"] - first["stages"][1]["rows_in"]
    assert _rows(d / "out").equals(_rows(fresh_out))
    assert [s["rows_out"] for s in second["stages"]] == [s["rows_out"] for s in fresh_stats["stages"]]
    # the frame cache is lost: every part is worked on again, in groups, and the store (found
    # through a key index rebuilt from it) has every result: nothing is computed
    shutil.rmtree(d / "work" / "frames")
    third = _run(recipe)
    assert third["stages"][1]["computed"] == 0 and third["stages"][1]["cached"] == third["stages"][1]["rows_in"]
    assert _rows(d / "out").equals(_rows(fresh_out))
