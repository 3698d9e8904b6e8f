"""The ``verify`` stage end to end: recipes through load_recipe + Runner on real data."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.fixtures.verify_data import gsm8k_items, humaneval_rows, humaneval_tests, math500_items
from tracepipe import DATA_DIR
from tracepipe.pipeline.keys import fingerprint
from tracepipe.pipeline.runner import RunFailed, Runner
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages import get_stage
from tracepipe.verifiers.code import isolation

GSM8K_TEST = DATA_DIR / "benchmarks" / "gsm8k_test.jsonl"
needs_bwrap = pytest.mark.skipif(isolation().bwrap is None, reason="bubblewrap unavailable: apt-get install -y bubblewrap")


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _out(tmp_path: Path, name: str = "out") -> pl.DataFrame:
    return pl.read_parquet(str(tmp_path / name / "data" / "*.parquet"))


def test_replayed_gsm8k_solutions_verify_end_to_end(tmp_path):
    """The demo: GSM8K test solutions replayed as responses (map sets response <- solution)."""
    recipe = _write(tmp_path / "gsm8k-verify.yaml", {
        "name": "gsm8k-verify",
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(GSM8K_TEST), "preset": "gsm8k"}],
        "stages": [
            {"map": {"set": {"response": "solution"}}},
            {"verify": {"drop": ["incorrect", "error"]}},
        ],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out"), "options": {"keep_columns": ["pred_answer", "verify_detail"]}}],
        "executor": {"workers": 2},
    })
    res = Runner(load_recipe(recipe)).run()
    st = res.stats.stages[1]
    assert st.name == "verify" and st.rows_in == 1319 and st.errors == 0
    assert st.extra["verdicts"] == {"correct": 1319}
    out = _out(tmp_path)
    assert out.height == 1319
    assert out["verdict"].unique().to_list() == ["correct"]
    assert (out["pred_answer"] == out["answer"]).all()
    assert out["verify_detail"].str.starts_with("math: equal").all()
    # run again: everything comes from the store
    again = Runner(load_recipe(recipe)).run().stats.stages[1]
    assert (again.cached, again.computed) == (1319, 0)


def _rows() -> list[dict]:
    """Math, code and other rows with known verdicts and format issues."""
    m = math500_items()[:6]
    g = gsm8k_items()[:4]
    he = humaneval_rows()[:3]
    rows = [
        {"id": "m-ok", "domain": "math", "answer": m[0]["answer"], "response": m[0]["response"]},
        {"id": "m-ok-think", "domain": "math", "answer": m[1]["answer"], "response": "<think>hmm</think>\n" + m[1]["response"]},
        {"id": "m-wrong", "domain": "math", "answer": "12345", "response": m[2]["response"]},
        {"id": "m-none", "domain": "math", "answer": m[3]["answer"], "response": "I am not sure."},
        {"id": "m-nogold", "domain": "math", "answer": None, "response": m[4]["response"]},
        {"id": "m-trunc", "domain": "math", "answer": m[5]["answer"], "response": m[5]["response"], "finish_reason": "length"},
        {"id": "g-ok", "domain": "math", "answer": g[0]["answer"], "response": g[0]["response"], "finish_reason": "stop"},
        {"id": "g-loop", "domain": "math", "answer": g[1]["answer"], "response": g[1]["response"],
         "reasoning": "Let me check again. " * 30},
        {"id": "g-null-domain", "domain": None, "answer": g[2]["answer"], "response": g[2]["response"]},
        {"id": "other", "domain": "chat", "answer": None, "response": "Hello!"},
        {"id": "c-ok", "domain": "code", "tests": humaneval_tests(he[0]), "response": f"```python\n{he[0]['prompt'] + he[0]['canonical_solution']}\n```"},
        {"id": "c-wrong", "domain": "code", "tests": humaneval_tests(he[1]), "response": f"```python\n{he[1]['prompt']}    return []\n```"},
        {"id": "c-nocode", "domain": "code", "tests": humaneval_tests(he[2]), "response": "Sorry, no idea."},
        {"id": "c-null-domain", "domain": None, "tests": humaneval_tests(he[0]), "response": f"```python\n{he[0]['prompt'] + he[0]['canonical_solution']}\n```"},
    ]
    for r in rows:
        r.setdefault("problem", r["id"])
        r["kind"] = r.pop("domain")  # sources set one domain per source; a map stage sets it per row
    return rows


EXPECTED = {
    "m-ok": ("correct", []), "m-ok-think": ("correct", []), "m-wrong": ("incorrect", []), "m-none": ("incorrect", ["no_answer"]),
    "m-nogold": ("unverifiable", []), "m-trunc": ("incorrect", ["truncated"]), "g-ok": ("correct", []),
    "g-loop": ("incorrect", ["repetition_loop"]), "g-null-domain": ("correct", []), "other": ("unverifiable", []),
    "c-ok": ("correct", []), "c-wrong": ("incorrect", []), "c-nocode": ("incorrect", ["no_answer"]), "c-null-domain": ("correct", []),
}


@needs_bwrap
def test_routing_verdicts_format_and_drops(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    base = {
        "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "columns": {"problem": "problem"}}],
        "executor": {"workers": 2},
    }
    keep = _write(tmp_path / "keep.yaml", {**base, "name": "keep", "stages": [{"map": {"set": {"domain": "kind"}}}, {"verify": {"batch_size": 4}}],
                                           "outputs": [{"format": "sft-messages", "path": str(tmp_path / "keep"),
                                                        "options": {"keep_columns": ["pred_answer", "verify_detail", "format_issues"]}}]})
    Runner(load_recipe(keep)).run()
    out = _out(tmp_path, "keep")
    # sft-messages skips rows without a response: every row here has one
    got = {r["id"]: (r["verdict"], r["format_issues"]) for r in out.iter_rows(named=True)}
    assert got == EXPECTED
    details = dict(zip(out["id"], out["verify_detail"]))
    assert details["m-trunc"].startswith("format: truncated; math: equal")
    assert details["c-ok"] == "code: passed [bwrap]"
    assert details["other"] == "no checker for domain 'chat'"
    assert details["m-nogold"] == "math: no gold answer"
    pred = dict(zip(out["id"], out["pred_answer"]))
    assert pred["m-none"] is None and pred["m-ok"] == math500_items()[0]["answer"]

    # same rows, failures dropped: they land in the rejects with their reasons
    drop = _write(tmp_path / "drop.yaml", {**base, "name": "drop", "stages": [{"map": {"set": {"domain": "kind"}}},
                                                                        {"verify": {"drop": ["format", "incorrect", "unverifiable"]}}],
                                           "outputs": [{"format": "sft-messages", "path": str(tmp_path / "drop")}]})
    res = Runner(load_recipe(drop)).run()
    kept = set(_out(tmp_path, "drop")["id"].to_list())
    assert kept == {k for k, (v, f) in EXPECTED.items() if v == "correct" and not f}
    assert res.stats.stages[1].dropped == {
        "verify:incorrect": 2, "verify:unverifiable": 2, "verify:format:no_answer": 2, "verify:format:truncated": 1,
        "verify:format:repetition_loop": 1,
    }
    rejects = pl.read_parquet(str(tmp_path / "work" / "rejects" / "*.parquet"))
    assert dict(zip(rejects["id"], rejects["_reason"]))["m-wrong"] == "verify:incorrect"
    assert set(rejects["verdict"].to_list()) == {"incorrect", "unverifiable"}  # negatives keep their verdict


def test_require_isolation_refuses_and_the_run_fails(tmp_path):
    he = humaneval_rows()[0]
    src = tmp_path / "rows.jsonl"
    row = {"problem": "p", "tests": humaneval_tests(he), "response": f"```python\n{he['prompt'] + he['canonical_solution']}\n```"}
    src.write_text("".join(json.dumps({**row, "id": f"c{i}"}) + "\n" for i in range(5)))
    recipe = _write(tmp_path / "r.yaml", {
        "name": "refuse", "workdir": str(tmp_path / "work"), "source": [{"path": str(src), "domain": "code"}],
        "stages": [{"verify": {"batch_size": 2, "code": {"require_isolation": True, "bwrap": "/nonexistent/bwrap"}}}],
        "max_error_rate": 0.0, "executor": {"workers": 1},
    })
    with pytest.raises(RunFailed, match="require_isolation is set but bubblewrap"):
        Runner(load_recipe(recipe)).run()
    q = pl.read_parquet(str(tmp_path / "work" / "quarantine" / "*.parquet"))
    assert q.height == 5 and q["_error"].str.contains("apt-get install -y bubblewrap").all()  # every batch refused


def test_params_validation_and_fingerprint(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"name": "bad", "source": [{"path": str(GSM8K_TEST), "preset": "gsm8k"}],
                                         "stages": [{"verify": {"code": {"timeout": 3}, "drop": ["wrong"]}}]})
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert "stages[0].verify.code.timeout" in msg and "stages[0].verify.drop[0]" in msg
    cls = get_stage("verify")

    def fp(**kw):
        return fingerprint(cls(cls.Params.model_validate(kw)).fingerprint_inputs())

    assert fp() == fp(batch_size=8, code_concurrency=1, math_workers=2)  # execution knobs stay out
    assert fp() != fp(code={"timeout_s": 3})
    assert fp() != fp(drop=["incorrect"])
    assert fp() != fp(math={"hard_timeout_s": 5})
    st = cls(cls.Params())
    assert "completion_tokens" not in st.input_columns()
    assert "completion_tokens" in cls(cls.Params.model_validate({"format": {"max_completion_tokens": 10}})).input_columns()
    assert cls.cpu_bound
