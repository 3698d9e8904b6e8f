"""``tracepipe plan``'s estimates for the model stages other than ``generate``: ``compress``,
``judge`` (chats, counted with the engine's tokenizer) and the scoring stages ``logprobs`` and
``tip`` (token ids, counted as the stage encodes them).

Each test first runs the stages before the one estimated (a plan computes nothing, so a stage
sees rows only once those before it have run), then plans the recipe with the stage added, then
runs it and compares the plan with what was sent: for ``compress`` and ``judge`` what
:class:`TokenizingServer` (tests/fixtures/usage_server.py) billed, a real chat template applied
to the messages it received; for the scoring stages the token ids they stored. Planning must
start no engine and send nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.logprobs_data import logprobs_recipe, write_rollouts
from tests.fixtures.recipes import GSM8K_TRAIN, MATH500, read_jsonl, write_jsonl, write_recipe
from tests.fixtures.usage_server import TokenizingServer
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}


@pytest.fixture
def server(tiny_model_dir: Path) -> Any:
    with TokenizingServer(tiny_model_dir, model_id="api-model") as srv:
        yield srv


def api_engine(srv: TokenizingServer, tok: Path) -> dict[str, Any]:
    return {"kind": "openai", "base_url": srv.base_url, "model": "api-model", "fingerprint": "api-v1", "tokenizer": str(tok),
            "concurrency": 4, "price": PRICE, "backoff": {"base": 0.05, "max": 0.5}}


def plan(path: Path, stage: str) -> dict[str, Any]:
    """The estimate of ``stage`` in a plan of ``path``, checking the plan started no engine."""
    runner = Runner(load_recipe(path))
    stats = runner.plan()
    assert not [e for e in runner.ctx.engine_events if e[2] == "start"], runner.ctx.engine_events
    est = next(s for s in stats.stages if s.name == stage).estimate
    assert est, f"no estimate for {stage}"
    return est


def billed_prompt(srv: TokenizingServer, start: int) -> tuple[int, int]:
    """(answered requests, prompt tokens the server billed for them) since request ``start``."""
    seen = [s for s in srv.chat_requests()[start:] if s.status == 200 and s.response is not None]
    return len(seen), sum(s.response["usage"]["prompt_tokens"] for s in seen)


def stage_rows(workdir: Path, stage: str) -> pl.DataFrame:
    files = sorted(workdir.glob(f"stages/{stage}-*/part-*.parquet"))
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    return df.filter(pl.col("_drop").is_null()) if "_drop" in df.columns else df


# -- compress ------------------------------------------------------------------------------------

def test_compress_estimate_matches_what_the_server_bills(tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path) -> None:
    probs = read_jsonl(MATH500, limit=12)
    rows = [{"pid": p["unique_id"], "problem": p["problem"], "answer": p["answer"],
             "trace": f"<think>\n{p['solution']}\n</think>\n\nThe final answer is $\\boxed{{{p['answer']}}}$."} for p in probs]
    rows[3]["trace"] = f"The final answer is $\\boxed{{{probs[3]['answer']}}}$."  # no reasoning: skipped, not sent
    src = write_jsonl(tmp_path / "src.jsonl", rows)

    def recipe(stages: list[dict[str, Any]]) -> Path:
        return write_recipe(tmp_path / "c.yaml", {
            "name": "c", "workdir": str(tmp_path / "work"),
            "source": [{"path": str(src), "columns": {"id": "pid"}, "domain": "math"}],
            "engines": {"traces": {"kind": "replay", "column": "trace"}, "api": api_engine(server, tiny_model_dir)},
            "stages": [{"generate": {"engine": "traces"}}, *stages], "outputs": [],
        })

    Runner(load_recipe(recipe([]))).run()  # the traces (replayed) are in the store
    path = recipe([{"compress": {"engine": "api", "verdicts": None, "budgets": {"default": 0.4}, "max_tokens": 12, "record_prompt": True,
                                 "system_prompt": "You edit reasoning traces."}}])
    est = plan(path, "compress")
    assert server.chat_requests() == []  # planning sends nothing
    assert est["prompt_tokens_method"] == "tokenizer" and est["rows"] == 12
    assert est["requests"] == est["samples"] == 11  # the row without reasoning is not sent
    assert est["completion_tokens"]["max"] == 11 * 12
    assert est["usd"]["max"] == pytest.approx((est["prompt_tokens"] * 1.0 + 11 * 12 * 4.0) / 1e6, abs=1e-6)

    stats = Runner(load_recipe(path)).run().stats
    assert next(s for s in stats.stages if s.name == "compress").computed == 12
    sent, prompt = billed_prompt(server, 0)
    assert sent == est["requests"]
    assert prompt > 1000 and abs(est["prompt_tokens"] - prompt) <= 0.01 * prompt
    # what process recorded as sent is what the server received
    recorded = stage_rows(tmp_path / "work", "compress")["compress_messages"].drop_nulls().to_list()
    assert sorted(json.dumps(m) for m in recorded) == sorted(json.dumps(s.body["messages"]) for s in server.chat_requests())
    assert plan_has_nothing_left(path, "compress")


def plan_has_nothing_left(path: Path, stage: str) -> bool:
    stats = Runner(load_recipe(path)).plan()
    return not next(s for s in stats.stages if s.name == stage).estimate


# -- judge ---------------------------------------------------------------------------------------

# (GSM8K train row, gold answer, final answer of the trace): prose golds no rule reads, numeric ones it decides
JUDGE_CASES = [
    (1, "Weng earned ten dollars.", "ten dollars"),
    (2, "Betty still needs five dollars.", "five more dollars"),
    (3, "Julie should read forty-two pages tomorrow.", "about half of the book"),
    (6, "James writes 624 pages a year.", "624 pages"),
    (0, "72", "\\boxed{72}"),
    (4, "624", "\\boxed{600}"),
]


def test_judge_estimate_matches_what_the_server_bills(tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path) -> None:
    probs = read_jsonl(GSM8K_TRAIN, limit=8)
    rows = [{"pid": f"gsm8k-train-{i}", "question": probs[i]["question"], "gold": gold,
             "trace": f"<think>\n{probs[i]['answer'].rsplit('####', 1)[0]}\n</think>\n\nThe answer is: {final}"}
            for i, gold, final in JUDGE_CASES]
    src = write_jsonl(tmp_path / "j.jsonl", rows)

    def recipe(verify: dict[str, Any]) -> Path:
        return write_recipe(tmp_path / "j.yaml", {
            "name": "j", "workdir": str(tmp_path / "work"),
            "source": [{"path": str(src), "columns": {"problem": "question", "answer": "gold", "id": "pid"},
                        "answer_format": "raw", "domain": "math"}],
            "engines": {"traces": {"kind": "replay", "column": "trace"}, "grader": api_engine(server, tiny_model_dir)},
            "stages": [{"generate": {"engine": "traces"}}, {"verify": verify}], "outputs": [],
        })

    Runner(load_recipe(recipe({}))).run()  # verify has decided what the rules can
    undecided = stage_rows(tmp_path / "work", "verify").filter(pl.col("verdict") == "unverifiable").height
    assert undecided >= 4  # the prose golds
    path = recipe({"judge": {"engine": "grader", "when": "unverifiable", "max_tokens": 6}})
    est = plan(path, "judge")
    assert server.chat_requests() == []
    assert est["rows"] == len(rows) and est["requests"] == undecided  # rows the rules decided cost nothing
    assert est["completion_tokens"]["max"] == 6 * undecided and est["prompt_tokens_method"] == "tokenizer"

    Runner(load_recipe(path)).run()
    sent, prompt = billed_prompt(server, 0)
    assert sent == est["requests"]
    assert abs(est["prompt_tokens"] - prompt) <= 0.01 * prompt
    assert plan_has_nothing_left(path, "judge")


# -- scoring stages ------------------------------------------------------------------------------

def test_logprobs_and_tip_estimates_count_the_scored_token_ids(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    src = write_rollouts(tmp_path / "rollouts.jsonl", 8)
    lp = {"logprobs": {"engine": "teacher", "max_length": 100, "incomplete": "drop"}}
    path = logprobs_recipe(tmp_path, "s", src, hf_engines, [lp], outputs=[])
    est = plan(path, "logprobs")
    assert est["prompt_tokens_method"] == "token ids" and est["rows"] == 8
    assert est["completion_tokens"] == {"max": 0, "median": 0, "p90": 0}

    Runner(load_recipe(path)).run()
    scored = stage_rows(tmp_path / "work-s", "logprobs")
    lengths = scored["token_ids"].list.len()
    assert scored["logprobs_truncated"].any()  # max_length cut some: the plan counted them cut
    assert est["requests"] == est["samples"] == scored.height
    assert est["prompt_tokens"] == int(lengths.sum())

    # tip, planned after logprobs ran: the stored ids are what the student scores
    path = logprobs_recipe(tmp_path, "s", src, hf_engines, [lp, {"tip": {"engine": "other", "top_k": 4}}], outputs=[])
    est = plan(path, "tip")
    assert est["prompt_tokens_method"] == "token ids" and est["completion_tokens"]["max"] == 0
    assert est["requests"] == scored.height and est["prompt_tokens"] == int(lengths.sum())
    stats = Runner(load_recipe(path)).run().stats
    assert next(s for s in stats.stages if s.name == "tip").computed == scored.height
    assert stage_rows(tmp_path / "work-s", "tip")["student_logprobs"].list.len().sum() == est["prompt_tokens"]
