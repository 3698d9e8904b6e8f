"""Dataset card: front matter the Hub and ``datasets`` read, the numbers of the run, the plots."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from tests.fixtures.outputs_data import TEACHER
from tracepipe.outputs._writer import write_output


def _front_matter(readme: Path) -> tuple[dict[str, Any], str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    _, fm, body = text.split("---\n", 2)
    return yaml.safe_load(fm), body


def _png_ok(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10  # a real plot, not a blank canvas


def test_front_matter_parses_and_globs_match_shards(traces_outputs: dict[str, Any]) -> None:
    out = traces_outputs["sft-messages"]
    fm, _ = _front_matter(out / "README.md")
    assert fm["license"] == "mit"  # from outputs[].options.card
    assert fm["language"] == ["en"] and fm["task_categories"] == ["text-generation"]
    assert fm["size_categories"] == ["n<1K"]
    assert {"reasoning", "sft", "gsm8k", "math"} <= set(fm["tags"])
    shards = sorted(p.relative_to(out).as_posix() for p in (out / "data").glob("*.parquet"))
    (config,) = fm["configs"]
    matched: list[str] = []
    for entry in config["data_files"]:
        hits = [s for s in shards if fnmatch.fnmatch(s, entry["path"])]
        assert hits and all(Path(h).name.startswith(entry["split"] + "-") for h in hits), entry
        matched += hits
    assert sorted(matched) == shards  # every shard in exactly one split
    rows = {s["name"]: s["num_examples"] for s in fm["dataset_info"]["splits"]}
    counted = {s: pl.read_parquet(str(out / "data" / f"{s}-*.parquet")).height for s in rows}
    assert rows == counted


def test_datasets_and_hub_read_the_card(traces_outputs: dict[str, Any]) -> None:
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    out = traces_outputs["sft-messages"]
    ds = load_dataset(str(out))  # the README's configs pick the shards and the splits
    fm, _ = _front_matter(out / "README.md")
    assert {s: ds[s].num_rows for s in ds} == {s["name"]: s["num_examples"] for s in fm["dataset_info"]["splits"]}
    card = DatasetCard.load(out / "README.md")
    assert card.data.to_dict()["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert ds["train"].features["messages"].feature["role"].dtype == "string"


def test_card_reports_the_run(traces_outputs: dict[str, Any]) -> None:
    out = traces_outputs["sft-messages"]
    card = (out / "README.md").read_text()
    stats = traces_outputs["result"].stats
    # rows in / out and drop reasons per stage, as the run counted them
    filt = stats.stages[-1]
    assert f"| {filt.index} | filter | {filt.rows_in:,} | {filt.rows_out:,} | incorrect answer: {filt.dropped['incorrect answer']:,} |" in card
    assert f"`{TEACHER}`" in card
    # verification: kept rows all correct; over every verified sample the rate counts the rejects too
    rejects = pl.read_parquet(traces_outputs["dir"] / "work" / "rejects" / "*.parquet")
    total = filt.rows_out + rejects.height
    assert f"| all verified samples (kept + dropped later) | {total:,} | {filt.rows_out:,} | {100 * filt.rows_out / total:.1f}% |" in card
    summary = json.loads((out / "summary.json").read_text())
    comp = summary["lengths"]["compression"]
    assert 0 < comp["rows_compressed"] < comp["rows"] and comp["mean_after"] < comp["mean_before"]
    assert f"rows with a compressed trace: {comp['rows_compressed']:,} of {comp['rows']:,}" in card
    assert "easy:" in card and "medium:" in card and "hard:" in card
    assert "```yaml\nname: traces" in card  # the recipe
    for png in ("token_lengths.png", "difficulty.png"):
        assert f"]({png})" in card
        _png_ok(out / png)


def test_card_decontamination_and_compress_stage_stats(tmp_path: Path) -> None:
    """Stats of decontaminate / compress stages (as the runner records them) reach the card."""
    from tracepipe.recipe import validate_tree

    rows = pl.DataFrame({
        "id": ["a", "b", "c"], "problem": ["p a", "p b", "p c"], "response": ["x", "y", "z"],
        "reasoning": ["long " * 50, "r", "rr"], "reasoning_compressed": ["short", None, None],
        "verdict": ["correct"] * 3,
    })
    stats = {"run_id": "r1", "source": {"rows": 5}, "stages": [
        {"index": 0, "name": "decontaminate", "kind": "row", "rows_in": 5, "rows_out": 3, "errors": 0, "seconds": 0.1,
         "dropped": {"decontaminate: 13-gram overlap with math500": 2}, "extra": {"benchmarks": "math500, aime24", "ngram": 13}},
        {"index": 1, "name": "compress", "kind": "row", "rows_in": 3, "rows_out": 3, "errors": 0, "seconds": 0.1,
         "dropped": {}, "extra": {"compressed": 1, "kept_original": 2, "mean_ratio": 0.12}},
    ]}
    recipe = validate_tree({"name": "d", "workdir": str(tmp_path / "w"), "source": [{"path": "x.jsonl"}],
                            "outputs": [{"format": "sft-messages", "path": str(tmp_path / "o")}]}, "inline")
    # the rows the stage dropped, as the runner publishes them under <workdir>/rejects/
    (tmp_path / "w" / "rejects").mkdir(parents=True)
    pl.DataFrame({"id": ["d", "e"], "problem": ["x", "y"], "contam_benchmark": ["math500", "math500"],
                  "contam_method": ["ngram", "ngram"], "_reason": ["decontaminate:ngram"] * 2, "_stage": ["decontaminate"] * 2,
                  }).write_parquet(tmp_path / "w" / "rejects" / "001-decontaminate.parquet")
    write_output(rows.lazy(), recipe.outputs[0], recipe, stats)
    card = (tmp_path / "o" / "README.md").read_text()
    dec = card.split("## Decontamination")[1].split("##")[0]
    assert "5 rows in, 3 out" in dec and "13-gram overlap with math500: 2" in dec and "ngram: 13" in dec
    assert "| math500:ngram | 2 |" in dec
    comp = card.split("## Compression")[1].split("##")[0]
    assert "mean_ratio: 0.12" in comp and "rows with a compressed trace: 1 of 3" in comp
    fm, _ = _front_matter(tmp_path / "o" / "README.md")
    assert fm["license"] == "unknown" and fm["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]


def test_card_template_comes_from_the_package() -> None:
    import tracepipe
    from tracepipe.outputs._card import templates_dir

    assert Path(str(templates_dir())).resolve() == Path(tracepipe.__file__).resolve().parent / "data_cards"
    assert (templates_dir() / "dataset_card.md.j2").is_file() and (templates_dir() / "report.html.j2").is_file()


@pytest.mark.parametrize("fmt", ["dpo-pairs", "sharegpt", "prompt-completion"])
def test_every_format_has_a_card(traces_outputs: dict[str, Any], fmt: str) -> None:
    fm, body = _front_matter(traces_outputs[fmt] / "README.md")
    assert fm["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert f"**`{fmt}`**" in body
    if fmt == "dpo-pairs":
        assert "dpo" in fm["tags"] and "DPOTrainer" in body
