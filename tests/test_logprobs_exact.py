"""The ``logprobs`` stage's numbers: vLLM (CPU, float32) scores equal a transformers forward pass.

The reference is :meth:`TransformersEngine.score` (one forward pass, float32 log-softmax, gather);
its full sorted distribution (``top_k`` = vocabulary size) gives the true top-k at each position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from tests.fixtures.logprobs_data import logprobs_recipe, rollout_rows, write_jsonl
from tests.fixtures.teacher_engines import tiny_hf_config, tiny_vllm_config
from tracepipe.formats import OPDReader
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.stages.base import StageContext
from tracepipe.stages.logprobs import Logprobs, LogprobsParams

TOL = 1e-4
K = 20


def _stage(engine_cfg: dict[str, Any], **params: Any) -> Logprobs:
    ctx = StageContext(engines={"teacher": _cfg(engine_cfg)})
    return Logprobs(LogprobsParams(engine="teacher", **params), ctx)


def _cfg(d: dict[str, Any]) -> Any:
    from tracepipe.engines import engine_config_model

    return engine_config_model(d["kind"]).model_validate(d)


def _batch(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame([{IN_KEY_COL: f"k{i}", **r} for i, r in enumerate(rows)], infer_schema_length=None)


def _check_row(ids: list[int], lps: list[float | None], tk_ids: list[list[int]] | None, tk_lps: list[list[float]] | None,
               ref_engine: Any) -> float:
    """Compare one scored row with the reference; returns the largest log-prob difference."""
    vocab = len(ref_engine.tokenizer())
    ref = ref_engine.score([ids], top_k=vocab)[0]
    assert lps[0] is None and ref.logprobs[0] is None
    assert len(lps) == len(ids)
    diff = float(np.max(np.abs(np.asarray(lps[1:], dtype=np.float64) - np.asarray(ref.logprobs[1:], dtype=np.float64))))
    assert diff < TOL, diff
    if tk_ids is None:
        return diff
    assert tk_ids[0] is None or tk_ids[0] == []
    for i in range(1, len(ids)):
        full_ids, full_lps = ref.topk_ids[i], ref.topk_logprobs[i]  # the whole distribution, sorted
        true = dict(zip(full_ids, full_lps))
        got_ids, got_lps = list(tk_ids[i]), [float(x) for x in tk_lps[i]]
        assert len(got_ids) == K == len(set(got_ids))
        assert got_lps == sorted(got_lps, reverse=True), f"position {i}: top-k not sorted"
        for t, v in zip(got_ids, got_lps):
            assert abs(true[t] - v) < TOL
        kth = full_lps[K - 1]
        # every token clearly inside the true top-k is listed; every listed token is (up to ties) in it
        assert {t for t, v in zip(full_ids, full_lps) if v > kth + TOL} <= set(got_ids)
        assert all(true[t] >= kth - TOL for t in got_ids)
        # the chosen token's log-prob is consistent with its rank
        if lps[i] >= got_lps[-1] + TOL:
            assert ids[i] in got_ids
    return diff


@pytest.mark.slow
def test_vllm_stage_scores_equal_transformers_forward(tiny_model_dir: Path, tiny_vllm_engine: Any, tiny_hf_engine: Any) -> None:
    stage = _stage(tiny_vllm_config(tiny_model_dir), top_k=K)
    rows = rollout_rows(12)
    out = stage.process(_batch(rows))
    assert out.height == len(rows) and out["_drop"].null_count() == len(rows) and out["_error"].null_count() == len(rows)
    assert out.schema["token_ids"] == pl.List(pl.Int32) and out.schema["loss_mask"] == pl.List(pl.Int8)
    assert out.schema["teacher_logprobs"] == pl.List(pl.Float32)
    assert out.schema["teacher_topk_ids"] == pl.List(pl.List(pl.Int32))
    assert out.schema["teacher_topk_logprobs"] == pl.List(pl.List(pl.Float32))
    worst = 0.0
    for r in out.iter_rows(named=True):
        worst = max(worst, _check_row(r["token_ids"], r["teacher_logprobs"], r["teacher_topk_ids"], r["teacher_topk_logprobs"], tiny_hf_engine))
        assert r["n_tokens"] == len(r["token_ids"]) and r["logprobs_truncated"] is False
        assert r["logprobs_teacher"] == tiny_vllm_engine.fingerprint()
    assert worst < TOL
    stage.ctx.close()


@pytest.mark.slow
def test_runner_opd_output_matches_reference(tmp_path: Path, tiny_model_dir: Path, tiny_vllm_engine: Any, tiny_hf_engine: Any) -> None:
    """Through the real runner, the store and the ``opd`` writer, read back with the reader."""
    src = write_jsonl(tmp_path / "rollouts.jsonl", rollout_rows(10, start=40))
    recipe = logprobs_recipe(
        tmp_path, "exact", src, {"teacher": tiny_vllm_config(tiny_model_dir)},
        [{"logprobs": {"engine": "teacher", "top_k": K, "max_length": 140, "batch_size": 4}}],
    )
    result = Runner(load_recipe(recipe)).run()
    st = result.stats.stages[0]
    assert st.computed == 10 and st.errors == 0
    out_dir = tmp_path / "out-exact"
    shards = sorted((out_dir / "data").glob("train-*.parquet"))
    schema = pq.read_schema(shards[0])
    assert str(schema.field("token_ids").type) == "list<element: int32>"
    assert str(schema.field("loss_mask").type) == "list<element: int8>"
    assert str(schema.field("teacher_logprobs").type) == "list<element: float>"
    rows = pl.read_parquet(shards)
    assert rows.height == 10, [p.name for p in shards]
    assert set(rows["teacher"].to_list()) == {tiny_vllm_engine.fingerprint()}
    assert rows["truncated"].sum() > 0 and not rows["truncated"].all()  # some rows were cut at max_length
    for r in rows.iter_rows(named=True):
        assert len(r["token_ids"]) == r["n_tokens"] <= 140
        _check_row(r["token_ids"], r["teacher_logprobs"], r["teacher_topk_ids"], r["teacher_topk_logprobs"], tiny_hf_engine)
    # the reader's padded batches hold the same numbers, aligned with the tokens
    batches = list(OPDReader(out_dir, batch_size=4, as_tensors="numpy"))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]
    for b, r in enumerate(rows.head(4).iter_rows(named=True)):
        n = len(r["token_ids"])
        assert first["input_ids"][b, :n].tolist() == r["token_ids"] and first["attention_mask"][b].sum() == n
        assert first["loss_mask"][b, :n].tolist() == r["loss_mask"]
        np.testing.assert_allclose(first["teacher_logprobs"][b, 1:n], np.asarray(r["teacher_logprobs"][1:], dtype=np.float32))
        assert first["teacher_logprobs"][b, 0] == 0 and not first["loss_mask"][b, n:].any()
        assert first["teacher_topk_ids"].shape[1:] == (first["input_ids"].shape[1], K)
        assert first["teacher_topk_ids"][b, 1:n].tolist() == r["teacher_topk_ids"][1:]


def test_float16_topk_and_transformers_engine(tiny_model_dir: Path) -> None:
    """``topk_dtype: float16`` stores the same top-k at half the size (float16 rounding only)."""
    rows = rollout_rows(3, start=7)
    s32 = _stage(tiny_hf_config(tiny_model_dir), top_k=5)
    s16 = _stage(tiny_hf_config(tiny_model_dir), top_k=5, topk_dtype="float16")
    a, b = s32.process(_batch(rows)), s16.process(_batch(rows))
    assert b.schema["teacher_topk_logprobs"] == pl.List(pl.List(pl.Float16))
    assert a["teacher_topk_ids"].to_list() == b["teacher_topk_ids"].to_list()
    assert a["teacher_logprobs"].to_list() == b["teacher_logprobs"].to_list()  # always float32
    for x, y in zip(a["teacher_topk_logprobs"].to_list(), b["teacher_topk_logprobs"].to_list()):
        for px, py in zip(x[1:], y[1:]):
            np.testing.assert_allclose(np.asarray(py, dtype=np.float32), np.asarray(px, dtype=np.float16).astype(np.float32))
    plain = _stage(tiny_hf_config(tiny_model_dir)).process(_batch(rows))
    assert "teacher_topk_ids" not in plain.columns
    assert plain["teacher_logprobs"].to_list() == a["teacher_logprobs"].to_list()
    for s in (s32, s16):
        s.ctx.close()
