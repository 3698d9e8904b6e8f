"""The ``judge`` stage (``verify: {judge: ...}``) through real recipe runs.

Problems are real GSM8K train rows; their traces are replayed by a ``replay`` engine. Three rows
get a gold answer in prose (which no rule reads: ``verify`` leaves them ``unverifiable``), three a
numeric gold that ``verify`` decides. The judge is a local OpenAI-compatible server that returns
fixed judgements (:class:`tests.fixtures.scripted_judge.JudgeServer`, requests counted at the
server) or the tiny vLLM model (slow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.recipes import GSM8K_TRAIN, read_jsonl, write_jsonl, write_recipe
from tests.fixtures.scripted_judge import JudgeServer, final_answer_of
from tests.fixtures.teacher_engines import tiny_vllm_config
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import RecipeError, load_recipe
from tracepipe.stages.judge import parse_verdict

MARK = "REASONING-NEVER-SHOWN"
# (GSM8K train row, gold answer, final answer of the trace, how it ends)
CASES: list[tuple[int, str, str, str]] = [
    (1, "Weng earned ten dollars.", "ten dollars", "answer"),
    (2, "Betty still needs five dollars.", "five more dollars", "answer"),
    (3, "Julie should read forty-two pages tomorrow.", "about half of the book", "answer"),
    (0, "72", "72", "boxed"),
    (4, "624", "600", "boxed"),
    (5, "35", "35", "boxed"),
]
PROSE = {"ten dollars", "five more dollars", "about half of the book"}


def rows(n_prose_copies: int = 1) -> list[dict[str, Any]]:
    probs = read_jsonl(GSM8K_TRAIN, limit=8)
    out = []
    for copy in range(n_prose_copies):
        for i, gold, final, how in CASES:
            if copy and final not in PROSE:
                continue
            end = f"The final answer is $\\boxed{{{final}}}$." if how == "boxed" else f"The answer is: {final}"
            out.append({"pid": f"gsm8k-train-{i}" + (f"-{copy}" if copy else ""),
                        "question": probs[i]["question"] + (f" (copy {copy})" if copy else ""),
                        "gold": gold, "trace": f"<think>\n{MARK} {probs[i]['answer'].rsplit('####', 1)[0]}\n</think>\n\n{end}"})
    return out


def recipe(tmp: Path, judge_engine: dict[str, Any], verify: dict[str, Any], name: str = "j",
           data: list[dict[str, Any]] | None = None, extra: list[dict[str, Any]] | None = None) -> Path:
    src = write_jsonl(tmp / f"{name}.jsonl", data or rows())
    return write_recipe(tmp / f"{name}.yaml", {
        "name": name, "workdir": str(tmp / f"work-{name}"),
        "source": [{"path": str(src), "columns": {"problem": "question", "answer": "gold", "id": "pid"},
                    "answer_format": "raw", "domain": "math"}],
        "engines": {"traces": {"kind": "replay", "column": "trace"}, "grader": judge_engine},
        "stages": [{"generate": {"engine": "traces"}}, {"verify": verify}, *(extra or [])],
        "outputs": [],
    })


def run(path: Path) -> tuple[pl.DataFrame, Any]:
    res = Runner(load_recipe(path)).run()
    df = pl.concat([pl.read_parquet(p.path) for p in res.final_parts], how="diagonal_relaxed")
    return df.sort("id"), res.stats


def server_engine(srv: JudgeServer, **over: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": srv.base_url, "model": "fixed-judge", "fingerprint": "fixed-judge-v1",
            "concurrency": 4, "backoff": {"base": 0.05, "max": 0.5}, **over}


def stage(stats: Any, name: str) -> Any:
    return next(s for s in stats.stages if s.name == name)


def test_parse_verdict() -> None:
    assert parse_verdict("Correct.") == "correct"
    assert parse_verdict("incorrect") == "incorrect"
    assert parse_verdict("It is not correct.") == "incorrect"
    assert parse_verdict("<think>maybe correct, maybe not</think>Wrong") == "incorrect"
    assert parse_verdict("<think>it is incorrect?</think> correct") == "correct"
    assert parse_verdict("I cannot tell") is None
    assert parse_verdict(None) is None


def test_prose_golds_are_judged_and_cached(tmp_path: Path) -> None:
    judgements = {"ten dollars": "correct", "five more dollars": "Correct.", "about half of the book": "incorrect"}
    with JudgeServer(judgements, think=True) as srv:
        path = recipe(tmp_path, server_engine(srv), {"judge": {"engine": "grader", "when": "unverifiable", "max_tokens": 64}})
        df, stats = run(path)
        asked = srv.chat_requests()
        assert [s.name for s in stats.stages] == ["generate", "verify", "judge"]
        by = {r["pred_answer"]: r for r in df.iter_rows(named=True)}
        # the rules could not read the prose golds: exactly those went to the judge, once each
        assert {by[a]["rule_verdict"] for a in PROSE} == {"unverifiable"}
        assert sorted(final_answer_of(s.body["messages"][-1]["content"]) or "" for s in asked) == sorted(PROSE)
        for s in asked:  # problem, gold and final answer; never the reasoning
            prompt = s.body["messages"][-1]["content"]
            assert MARK not in prompt and "Reference answer:" in prompt and "Problem:" in prompt
        assert {a: (by[a]["verdict"], by[a]["verdict_method"]) for a in PROSE} == {
            "ten dollars": ("correct", "judge"), "five more dollars": ("correct", "judge"), "about half of the book": ("incorrect", "judge"),
        }
        assert by["ten dollars"]["judge_output"].endswith("correct")
        assert {a: (by[a]["verdict"], by[a]["verdict_method"], by[a]["judge_output"]) for a in ("72", "600", "35")} == {
            "72": ("correct", "rule", None), "600": ("incorrect", "rule", None), "35": ("correct", "rule", None),
        }
        extra = stage(stats, "judge").extra
        assert extra["judged"] == 3 and extra["asked"] == 3 and extra["verdict_method"] == {"judge": 3, "rule": 3}
        assert extra["judge_verdicts"] == {"correct": 2, "incorrect": 1}

        # rerun: every judgement comes from the store, the server gets nothing
        n = len(srv.chat_requests())
        df2, stats2 = run(path)
        assert len(srv.chat_requests()) == n
        assert stage(stats2, "judge").computed == 0
        assert df2.equals(df)

        # a judge setting never recomputes verify; plan counts only the rows the rules left undecided
        path.write_text(path.read_text().replace("max_tokens: 64", "max_tokens: 65"))
        plan = Runner(load_recipe(path)).plan()
        assert (stage(plan, "verify").to_compute, stage(plan, "judge").estimate["requests"]) == (0, 3)
        _, stats3 = run(path)
        assert stage(stats3, "verify").computed == 0 and stage(stats3, "judge").computed == 6
        assert len(srv.chat_requests()) == n + 3


def test_always_records_disagreements_and_report_lists_them(tmp_path: Path) -> None:
    judgements = {"ten dollars": "correct", "five more dollars": "correct", "about half of the book": "incorrect",
                  "72": "incorrect", "600": "incorrect", "35": "correct"}
    with JudgeServer(judgements) as srv:
        path = recipe(tmp_path, server_engine(srv), {"judge": {"engine": "grader", "when": "always", "max_tokens": 8}})
        df, stats = run(path)
        assert len(srv.chat_requests()) == 6
    by = {r["pred_answer"]: r for r in df.iter_rows(named=True)}
    # the rules keep their verdicts; the judge's disagreement is recorded
    assert (by["72"]["verdict"], by["72"]["verdict_method"], by["72"]["judge_verdict"], by["72"]["judge_agrees"]) == \
        ("correct", "rule", "incorrect", False)
    assert by["600"]["judge_agrees"] is True and by["35"]["judge_agrees"] is True
    assert by["ten dollars"]["judge_agrees"] is None and by["ten dollars"]["verdict_method"] == "judge"
    extra = stage(stats, "judge").extra
    assert (extra["disagreements"], extra["agreements"]) == (1, 2)
    assert extra["disagreement_pairs"] == {"rule correct / judge incorrect": 1}
    assert [(r["id"], r["answer"], r["pred_answer"]) for r in extra["disagreement_rows"]] == [("gsm8k-train-0", "72", "72")]

    from tracepipe.report import build_report

    html = build_report(load_recipe(path), tmp_path / "report").read_text()
    table = html.split('id="judge-disagreements"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 2 and "gsm8k-train-0" in table and ">incorrect<" in table


def test_recipe_errors_name_the_judge_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(tmp_path, {"kind": "replay", "column": "trace"}, {"judge": {"engine": "nope"}}, name="e1"))
    msg = str(e.value)
    assert "stages[1].verify.judge.engine" in msg and "'nope' is not defined" in msg and "e1.yaml:" in msg
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(tmp_path, {"kind": "replay", "column": "trace"}, {"judge": {"engine": "grader", "when": "sometimes"}}, name="e2"))
    assert "stages[1].verify.judge.when" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(tmp_path, {"kind": "replay", "column": "trace"}, {"drop": ["unverifiable"], "judge": {"engine": "grader"}}, name="e3"))
    assert "before the judge sees them" in str(e.value)


def test_judge_stage_on_its_own_with_a_replay_judge(tmp_path: Path) -> None:
    """``judge`` written as a stage: a replay engine can be the judge (its column is the reply)."""
    data = rows()
    # a prose row whose response fails a format check: the judge may find the answer right, the
    # verdict stays incorrect (format_strict, as verify's format.strict)
    looped = dict(data[0], pid="gsm8k-train-1-looped")
    looped["trace"] = looped["trace"].replace("The answer is:", "Let me check.\n" * 12 + "The answer is:")
    data.append(looped)
    for r in data:
        r["reply"] = "incorrect" if "half" in r["trace"] else "correct"
    path = recipe(tmp_path, {"kind": "replay", "column": "reply", "name": "replayed-judge"}, {}, data=data,
                  extra=[{"judge": {"engine": "grader"}}])
    df, stats = run(path)
    judged = df.filter(pl.col("verdict_method") == "judge").sort("id")
    assert judged["pred_answer"].to_list() == ["ten dollars", "ten dollars", "five more dollars", "about half of the book"]
    assert judged.select("verdict", "judge_verdict").rows() == [("correct", "correct"), ("incorrect", "correct"),
                                                                  ("correct", "correct"), ("incorrect", "incorrect")]
    assert judged["format_issues"].to_list()[1] == ["repeated_lines"]
    assert stage(stats, "judge").extra["judge_verdicts"] == {"correct": 2, "incorrect": 2}


# -- kill -9 in the middle of judging ------------------------------------------------------------
def _judge_parts(work: Path) -> list[Path]:
    return sorted(work.glob("stages/judge-*/part-*.parquet"))


def _prompt(seen: Any) -> str:
    return str(seen.body["messages"][-1]["content"])


def _committed(work: Path) -> set[str]:
    keys: set[str] = set()
    for p in _judge_parts(work):
        keys.update(pl.read_parquet(p, columns=["_in_key"])["_in_key"].to_list())
    return keys


@pytest.mark.slow
def test_kill9_mid_judging_then_rerun_asks_no_committed_row_again(tmp_path: Path) -> None:
    copies = 8  # 24 prose rows to judge (+3 the rules decide)
    judgements = dict.fromkeys(PROSE, "correct")
    with JudgeServer(judgements, delay=0.25) as srv:
        path = recipe(tmp_path, server_engine(srv, concurrency=2),
                      {"judge": {"engine": "grader", "max_tokens": 8, "batch_size": 3}}, name="k", data=rows(copies))
        work = tmp_path / "work-k"
        cmd = [sys.executable, "-m", "tracepipe.cli", "run", str(path), "--no-progress"]
        with open(tmp_path / "run1.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 180
            while len(_judge_parts(work)) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            proc.wait()
        done = _committed(work)
        assert 0 < len(done) < 3 * copies + 3
        run1 = srv.chat_requests()
        safe = {_prompt(s) for s in run1 if s.t_done is not None and s.t_done < t_kill - 0.2}
        n1 = len(run1)
        r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r2.returncode == 0, r2.stderr[-3000:]
        run2 = srv.chat_requests()[n1:]
        # the journal: a request answered before the kill is never sent again; at most the
        # `concurrency` in flight at the kill are
        again = {_prompt(s) for s in run2} & {_prompt(s) for s in run1}
        assert len(again) <= 2 and not again & safe
        assert len({_prompt(s) for s in run1 + run2}) == 3 * copies
        df, _ = run(path)
        assert df.filter(pl.col("verdict_method") == "judge").height == 3 * copies
        assert len(srv.chat_requests()) == n1 + len(run2)  # and the third run asks nothing


@pytest.mark.slow
def test_tiny_vllm_model_as_judge(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = recipe(tmp_path, tiny_vllm_config(tiny_model_dir), {"judge": {"engine": "grader", "max_tokens": 12, "temperature": 0.0}},
                  name="v")
    df, stats = run(path)
    prose = df.filter(pl.col("pred_answer").is_in(list(PROSE)))
    assert prose["verdict_method"].to_list() == ["judge"] * 3
    assert all(isinstance(t, str) for t in prose["judge_output"].to_list())
    assert set(prose["verdict"].to_list()) <= {"correct", "incorrect", "unverifiable"}
    assert df.filter(~pl.col("pred_answer").is_in(list(PROSE)))["verdict_method"].to_list() == ["rule"] * 3
    assert stage(stats, "judge").extra["asked"] == 3
    # rerun: nothing computed, the judge engine not even started
    df2, stats2 = run(path)
    assert stage(stats2, "judge").computed == 0
    assert not [e for e in stats2.engines if e["engine"] == "grader" and e["event"] == "start"]
    assert df2.equals(df)
