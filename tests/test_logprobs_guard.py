"""Teacher consistency (Lightning OPD): the ``logprobs`` stage scores only with the SFT teacher.

``teacher`` and ``other`` are the tiny model with different weights under the same name, tokenizer
and chat template: only the weights hash tells them apart. A refusal comes before any stage runs
(the runner raises ``RunFailed`` while it builds the stages); ``allow_teacher_mismatch`` overrides
it and the run stats record the override.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.fixtures.logprobs_data import logprobs_recipe, rollout_rows, write_jsonl
from tracepipe.engines import engine_config_model, engine_fingerprint
from tracepipe.pipeline.runner import RunFailed, Runner
from tracepipe.recipe import load_recipe
from tracepipe.stages.base import StageContext
from tracepipe.stages.logprobs import Logprobs, LogprobsParams, TeacherMismatchError


def _ctx(engines: dict[str, dict[str, Any]], recipe_dir: Path | None = None) -> StageContext:
    cfgs = {k: engine_config_model(v["kind"]).model_validate(v) for k, v in engines.items()}
    return StageContext(engines=cfgs, recipe_dir=recipe_dir or Path.cwd())


def _guard(engines: dict[str, dict[str, Any]], **params: Any) -> dict[str, Any]:
    return Logprobs(LogprobsParams(**params), _ctx(engines)).check_guard()


def _extra(result: Any, name: str = "logprobs") -> dict[str, Any]:
    return next(s for s in result.stats.stages if s.name == name).extra


def test_same_name_other_weights_have_other_fingerprints(hf_engines: dict[str, Any]) -> None:
    cfg = {k: engine_config_model("transformers").model_validate(v) for k, v in hf_engines.items()}
    a, b = engine_fingerprint(cfg["teacher"]), engine_fingerprint(cfg["other"])
    assert a != b
    assert a.split("@")[0] == b.split("@")[0] == "tiny-qwen2"
    assert a.split("|")[1:] == b.split("|")[1:]  # same tokenizer and chat template


def test_refuses_a_mismatched_teacher(hf_engines: dict[str, Any]) -> None:
    with pytest.raises(RunFailed, match="refusing to score with teacher") as info:
        _guard(hf_engines, engine="other", sft_teacher="teacher")
    msg = str(info.value)
    assert "Lightning OPD" in msg and "same teacher" in msg and "allow_teacher_mismatch" in msg
    assert isinstance(info.value.__cause__, TeacherMismatchError)
    teacher_fp = _guard(hf_engines, engine="teacher")["teacher"]
    assert teacher_fp in msg  # names the SFT teacher it expected
    with pytest.raises(RunFailed, match="refusing"):
        _guard(hf_engines, engine="other", sft_teacher_fingerprint=teacher_fp)


def test_accepts_the_same_teacher(hf_engines: dict[str, Any]) -> None:
    g = _guard(hf_engines, engine="teacher", sft_teacher="teacher")
    assert g["sft_teachers"] == [g["teacher"]] and not g["config_mismatch"]
    g2 = _guard(hf_engines, engine="teacher", sft_teacher_fingerprint=g["teacher"], student_engine="other")
    assert not g2["config_mismatch"] and g2["tokenizer_check"] == "verified"


def test_override_is_recorded_and_execution_only(hf_engines: dict[str, Any]) -> None:
    g = _guard(hf_engines, engine="other", sft_teacher="teacher", allow_teacher_mismatch=True)
    assert g["config_mismatch"]
    fp = Logprobs(LogprobsParams(engine="other"), _ctx(hf_engines)).fingerprint_inputs()
    fp2 = Logprobs(LogprobsParams(engine="other", sft_teacher="teacher", allow_teacher_mismatch=True), _ctx(hf_engines)).fingerprint_inputs()
    assert fp == fp2  # the guard decides whether to run, never what is computed


def test_rollouts_of_a_student_need_the_sft_teacher_named(hf_engines: dict[str, Any]) -> None:
    with pytest.raises(RunFailed, match="does not say which teacher"):
        _guard(hf_engines, engine="teacher", student_engine="other")
    g = _guard(hf_engines, engine="teacher", student_engine="other", allow_teacher_mismatch=True)
    assert g["sft_teachers"] == []


def test_tokenizer_must_be_shared(hf_engines: dict[str, Any], other_vocab_tokenizer_dir: Path, same_vocab_tokenizer_dir: Path) -> None:
    with pytest.raises(RunFailed, match="does not share the teacher's tokenizer"):
        _guard(hf_engines, engine="teacher", sft_teacher="teacher", student_tokenizer=str(other_vocab_tokenizer_dir))
    # other files, same vocabulary and encodings: accepted (and the override does not apply to tokenizers)
    g = _guard(hf_engines, engine="teacher", sft_teacher="teacher", student_tokenizer=str(same_vocab_tokenizer_dir))
    assert g["tokenizer_check"] == "verified"
    with pytest.raises(RunFailed, match="tokenizer"):
        _guard(hf_engines, engine="teacher", allow_teacher_mismatch=True, student_tokenizer=str(other_vocab_tokenizer_dir))


def test_engine_that_cannot_score_is_refused(hf_engines: dict[str, Any]) -> None:
    engines = {**hf_engines, "api": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "fingerprint": "api-model"}}
    with pytest.raises(RunFailed, match="cannot score given token ids"):
        _guard(engines, engine="api")


# -- through the runner ----------------------------------------------------------------------------
def test_runner_refuses_before_running_and_records_the_override(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    src = write_jsonl(tmp_path / "rollouts.jsonl", rollout_rows(4))
    bad = logprobs_recipe(tmp_path, "bad", src, hf_engines, [{"logprobs": {"engine": "other", "sft_teacher": "teacher"}}])
    for call in ("plan", "run"):
        with pytest.raises(RunFailed, match="Lightning OPD"):
            getattr(Runner(load_recipe(bad)), call)()
    assert not list((tmp_path / "work-bad").glob("stages/logprobs-*"))  # nothing was scored
    assert not (tmp_path / "out-bad").exists()

    ok = logprobs_recipe(tmp_path, "ok", src, hf_engines, [{"logprobs": {"engine": "teacher", "sft_teacher": "teacher"}}])
    extra = _extra(Runner(load_recipe(ok)).run())
    assert extra["teacher_consistency"] == "verified" and extra["allow_teacher_mismatch"] is False

    forced = logprobs_recipe(tmp_path, "forced", src, hf_engines,
                             [{"logprobs": {"engine": "other", "sft_teacher": "teacher", "allow_teacher_mismatch": True}}])
    res = Runner(load_recipe(forced)).run()
    extra = _extra(res)
    assert extra["teacher_consistency"] == "overridden" and extra["allow_teacher_mismatch"] is True
    assert extra["teacher_mismatch_rows"] == 4 and extra["logprobs_teacher"] != extra["sft_teachers"][0]
    saved = json.loads((tmp_path / "work-forced" / "stats.json").read_text())
    assert saved["stages"][0]["extra"]["teacher_consistency"] == "overridden"
    rows = pl.read_parquet(tmp_path / "out-forced" / "data")
    assert set(rows["teacher"].to_list()) == {extra["logprobs_teacher"]}
    card = (tmp_path / "out-forced" / "README.md").read_text()
    assert "teacher consistency with the SFT teacher: **overridden**" in card and "allow_teacher_mismatch: true" in card
    ok_card = (tmp_path / "out-ok" / "README.md").read_text()
    assert "teacher consistency with the SFT teacher: **verified**" in ok_card


def test_rows_written_by_another_teacher_fail(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    """Teacher traces (the ``teacher`` column of generate) scored by another teacher are refused."""
    src = write_jsonl(tmp_path / "problems.jsonl", [{"problem": r["problem"]} for r in rollout_rows(3, start=100)])
    gen = {"generate": {"engine": "teacher", "n": 1, "temperature": 0.0, "max_tokens": 8}}

    def recipe(**lp: Any) -> Path:
        return logprobs_recipe(tmp_path, "traces", src, hf_engines, [gen, {"logprobs": {"max_length": 160, **lp}}],
                               outputs=[{"format": "sft-messages", "path": str(tmp_path / "sft")},
                                        {"format": "opd", "path": str(tmp_path / "opd")}])

    # scored by the teacher that wrote them: verified from the rows' `teacher` column alone
    res = Runner(load_recipe(recipe(engine="teacher"))).run()
    extra = _extra(res)
    assert extra["teacher_consistency"] == "verified" and extra["rows"] == 3
    teacher_fp = extra["logprobs_teacher"]
    # the SFT dataset written above records its teacher: scoring with another teacher is refused...
    with pytest.raises(RunFailed, match="refusing to score"):
        _guard(hf_engines, engine="other", sft_dataset=str(tmp_path / "sft"))
    assert _guard(hf_engines, engine="teacher", sft_dataset=str(tmp_path / "sft"))["sft_teachers"] == [teacher_fp]
    # ...and so are the rows themselves (quarantined: the run fails past max_error_rate)
    with pytest.raises(RunFailed, match="quarantined 3") as info:
        Runner(load_recipe(recipe(engine="other"))).run()
    assert "written by" in str(info.value)
    # with the override they are scored, and the record says so
    res = Runner(load_recipe(recipe(engine="other", allow_teacher_mismatch=True))).run()
    extra = _extra(res)
    assert extra["teacher_consistency"] == "overridden" and extra["teacher_mismatch_rows"] == 3
    assert extra["sft_teachers"] == [teacher_fp]
    # the generate stage was never rerun: only the scoring teacher changed
    assert [s.computed for s in res.stats.stages] == [0, 3]
    # dropping the override later refuses the stored rows too
    with pytest.raises(RunFailed, match="written by"):
        Runner(load_recipe(recipe(engine="other"))).run()


def test_student_rollouts_are_accepted_with_the_student_named(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    src = write_jsonl(tmp_path / "problems.jsonl", [{"problem": r["problem"]} for r in rollout_rows(3, start=200)])
    gen = {"generate": {"engine": "other", "n": 2, "temperature": 1.0, "max_tokens": 8}}  # `other` is the student
    with_student = logprobs_recipe(tmp_path, "opd", src, hf_engines, [
        gen, {"logprobs": {"engine": "teacher", "student_engine": "other", "sft_teacher": "teacher", "max_length": 160}},
    ])
    extra = _extra(Runner(load_recipe(with_student)).run())
    assert extra["teacher_consistency"] == "verified" and extra["tokenizer_check"] == "verified" and extra["rows"] == 6
    rows = pl.read_parquet(tmp_path / "out-opd" / "data")
    assert rows.height == 6 and rows["generator"].n_unique() == 1 and rows["generator"][0] != rows["teacher"][0]
    # without naming the student, its rollouts look like traces of another teacher: refused
    no_student = logprobs_recipe(tmp_path, "opd2", src, hf_engines, [
        gen, {"logprobs": {"engine": "teacher", "sft_teacher": "teacher", "max_length": 160}},
    ])
    with pytest.raises(RunFailed, match="student_engine"):
        Runner(load_recipe(no_student)).run()


def test_rollouts_from_files_through_a_replay_student(tmp_path: Path, hf_engines: dict[str, Any], tiny_model_dir: Path) -> None:
    """Rollouts written elsewhere: a ``replay`` engine is the student; its tokenizer is checked."""
    rows = rollout_rows(4, start=400)
    for r in rows:
        r["trace"] = (f"<think>\n{r['reasoning']}\n</think>\n\n" if r["reasoning"] else "") + r["response"]
    src = write_jsonl(tmp_path / "rollouts.jsonl", [{"id": r["id"], "problem": r["problem"], "trace": r["trace"]} for r in rows])
    engines = {**hf_engines, "student": {"kind": "replay", "column": "trace", "name": "student-sft"}}
    lp = {"engine": "teacher", "student_engine": "student", "sft_teacher": "teacher", "max_length": 200}
    # the replay engine has no tokenizer: the check needs one
    with pytest.raises(RunFailed, match="student_tokenizer"):
        _guard(engines, **lp)
    recipe = logprobs_recipe(tmp_path, "replay", src, engines, [
        {"generate": {"engine": "student", "n": 1}},
        {"logprobs": {**lp, "student_tokenizer": str(tiny_model_dir)}},
    ])
    extra = _extra(Runner(load_recipe(recipe)).run())
    assert extra["teacher_consistency"] == "verified" and extra["tokenizer_check"] == "verified" and extra["rows"] == 4
    out = pl.read_parquet(tmp_path / "out-replay" / "data")
    assert out["generator"].str.starts_with("student-sft").all()


def test_top_k_above_the_engines_limit_is_refused(tiny_model_dir: Path) -> None:
    from tests.fixtures.teacher_engines import tiny_vllm_config

    engines = {"teacher": tiny_vllm_config(tiny_model_dir, max_logprobs=5)}
    with pytest.raises(RunFailed, match="max_logprobs"):
        _guard(engines, engine="teacher", top_k=20)
    assert _guard(engines, engine="teacher", top_k=5)["teacher"]
