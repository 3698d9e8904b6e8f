"""Logprobs benchmark: the ``logprobs`` stage vs raw vLLM ``prompt_logprobs`` on the same sequences.

Rows are GSM8K train problems with the gold solution as the completion (reasoning = its steps,
response = the final answer), rendered by the stage with the tiny model's chat template and cut
at ``--max-length`` tokens. The raw side scores exactly the stage's token ids (taken from the
stage's own encoding) with one ``llm.generate(TokensPrompt..., SamplingParams(max_tokens=1,
prompt_logprobs=k))`` call on the same loaded ``LLM`` (the stage's vllm engine shares it).

For ``k`` in ``--ks`` (default 0 and 20), repeated ``--repeats`` times alternately; for each
side the best wall time and the best CPU time of this process (vLLM runs in-process here, so CPU
time is the work done, much less disturbed by other load on a shared machine) are kept:

- ``raw``: the ``llm.generate`` call alone, vLLM's default output (one dict of ``Logprob`` per
  position); ``raw_flat``: the same with ``flat_logprobs=True`` (what the stage's engine asks for),
  the fastest raw configuration;
- ``raw_flat_extract``: ``raw_flat`` plus pulling the chosen token's log-prob (and the top-k) out
  into Python lists: the least any user of the raw API does;
- ``stage``: ``Logprobs.process`` over the rows (tokenization with the chat template, loss mask,
  scoring, Arrow columns), with ``batch_size`` = all rows like the raw call;
- ``runner``: ``tracepipe run`` end to end on a fresh workdir (source, keys, the stage with its
  default batch size, Parquet commits, joins, the ``opd`` output with its card);
- ``stage_overhead_vs_its_vllm_call``: within each ``stage`` measurement, the time outside
  ``llm.generate`` (tokenization, loss mask, reading vLLM's output, Arrow columns) divided by the
  time inside it (median over repeats). The stage's vLLM call is the ``raw_flat`` call, so this is
  the stage's cost over raw vLLM measured in one run under the same load: the robust figure on a
  shared machine, where separate runs vary by far more than 5%;
- ``stage_vs_raw_flat`` = ``stage / raw_flat - 1`` on CPU and on wall time (target: within 5%);
  ``stage_vs_raw`` the same against vLLM's default output;
- ``bytes_per_token``: size of the ``opd`` output shards (zstd Parquet, what a trainer
  downloads) and of the stage's store parts, divided by the tokens stored; for ``k = 20`` also with
  ``topk_dtype: float16``.

    python benchmarks/logprobs.py [--rows 256] [--max-length 256] [--ks 0,20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
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


def dir_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _keep(wall: dict[str, float], cpu: dict[str, float], side: str, w: float, c: float) -> None:
    wall[side], cpu[side] = min(wall[side], w), min(cpu[side], c)


def _run(recipe: Path) -> Any:
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    return Runner(load_recipe(recipe)).run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ks", default="0,20")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    import polars as pl
    import yaml

    from tests.fixtures.tiny_model import build_tiny_model
    from tracepipe.engines import build_engine, engine_config_model
    from tracepipe.pipeline.keys import IN_KEY_COL
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe
    from tracepipe.stages.base import StageContext
    from tracepipe.stages.logprobs import Encoded, Logprobs, LogprobsParams

    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-lp-"))
    model_dir = build_tiny_model(tmp / "model")
    engine_cfg = {"kind": "vllm", "model": str(model_dir), "dtype": "float32", "max_model_len": 512,
                  "enforce_eager": True, "max_logprobs": max(ks)}
    engine = build_engine(engine_cfg)  # holds the shared LLM for the whole benchmark
    t0 = time.perf_counter()
    engine.ensure_started()
    load_s = time.perf_counter() - t0
    llm = engine.llm

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rows = rows_from_gsm8k(args.rows)
    src = tmp / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = pl.DataFrame([{IN_KEY_COL: f"k{i}", **r} for i, r in enumerate(rows)])

    def make_stage(k: int, **kw: Any) -> Logprobs:
        ctx = StageContext(engines={"teacher": engine_config_model("vllm").model_validate(engine_cfg)})
        return Logprobs(LogprobsParams(engine="teacher", top_k=k, max_length=args.max_length, batch_size=len(rows), **kw), ctx)

    probe = make_stage(0)
    probe.setup()
    encoded = probe.encode(rows)
    seqs = [e.token_ids for e in encoded if isinstance(e, Encoded)]
    n_tokens = sum(len(s) for s in seqs)
    loss_tokens = sum(sum(e.loss_mask) for e in encoded if isinstance(e, Encoded))

    def timed(fn: Any, *a: Any) -> tuple[float, float, Any]:
        gc.collect()  # garbage of the previous side is not charged to this one
        w, c = time.perf_counter(), time.process_time()
        r = fn(*a)
        return time.perf_counter() - w, time.process_time() - c, r

    def raw(k: int, flat: bool, extract: bool) -> Any:
        import numpy as np

        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False, flat_logprobs=flat)
        res = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
        if extract:  # flat layout: per position the prompt token first, then the top-k in rank order
            for ids, r in zip(seqs, res):
                plp = r.prompt_logprobs
                starts = np.asarray(plp.start_indices[1:len(ids)])
                vals = np.asarray(plp.logprobs)
                chosen = vals[starts].tolist()
                if k:
                    idx = starts[:, None] + 1 + np.arange(k)
                    top = (np.asarray(plp.token_ids)[idx].tolist(), vals[idx].tolist())
                del chosen
                if k:
                    del top
        return res

    inside = [0.0, 0.0]  # wall, cpu seconds spent inside llm.generate (instrumentation only)
    generate = llm.generate

    def generate_timed(*a: Any, **kw: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return generate(*a, **kw)
        finally:
            inside[0] += time.perf_counter() - w
            inside[1] += time.process_time() - c

    llm.generate = generate_timed

    sides = ("raw", "raw_flat", "raw_flat_extract", "stage", "runner")
    results: dict[str, Any] = {}
    for k in ks:
        stage = make_stage(k)
        stage.setup()
        wall = dict.fromkeys(sides, 1e9)
        cpu = dict.fromkeys(sides, 1e9)
        keep = functools.partial(_keep, wall, cpu)
        overhead_w: list[float] = []
        overhead_c: list[float] = []
        raw(k, True, True)  # warm-up: first calls with a new prompt_logprobs setting are slower
        stage.process(batch)
        for rep in range(args.repeats):
            keep("raw", *timed(raw, k, False, False)[:2])
            keep("raw_flat", *timed(raw, k, True, False)[:2])
            inside[:] = [0.0, 0.0]
            w, c, out = timed(stage.process, batch)
            keep("stage", w, c)
            # the same call, split: vLLM's own work vs the stage's (one run, same machine load)
            overhead_w.append((w - inside[0]) / inside[0])
            overhead_c.append((c - inside[1]) / inside[1])
            assert out.height == len(seqs) and out["token_ids"].to_list() == seqs
            keep("raw_flat_extract", *timed(raw, k, True, True)[:2])
            work, outd = tmp / f"work-{k}-{rep}", tmp / f"out-{k}-{rep}"
            recipe = tmp / f"r-{k}-{rep}.yaml"
            recipe.write_text(yaml.safe_dump({
                "name": f"bench-lp-{k}", "workdir": str(work), "source": [{"path": str(src)}],
                "engines": {"teacher": engine_cfg},
                "stages": [{"logprobs": {"engine": "teacher", "top_k": k, "max_length": args.max_length}}],
                "outputs": [{"format": "opd", "path": str(outd)}],
            }))
            keep("runner", *timed(_run, recipe)[:2])
            if rep:
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(outd, ignore_errors=True)
        stage.ctx.close()
        shards = sorted((tmp / f"out-{k}-0" / "data").glob("*.parquet"))
        parts = sorted((tmp / f"work-{k}-0" / "stages").glob("logprobs-*/part-*.parquet"))
        entry: dict[str, Any] = {
            "wall_s": {k_: round(v, 4) for k_, v in wall.items()},
            "cpu_s": {k_: round(v, 4) for k_, v in cpu.items()},
            "stage_vs_raw_flat": {"cpu": round(cpu["stage"] / cpu["raw_flat"] - 1, 4), "wall": round(wall["stage"] / wall["raw_flat"] - 1, 4)},
            "stage_vs_raw": {"cpu": round(cpu["stage"] / cpu["raw"] - 1, 4), "wall": round(wall["stage"] / wall["raw"] - 1, 4)},
            "stage_vs_raw_flat_extract": {"cpu": round(cpu["stage"] / cpu["raw_flat_extract"] - 1, 4),
                                          "wall": round(wall["stage"] / wall["raw_flat_extract"] - 1, 4)},
            "stage_overhead_vs_its_vllm_call": {"cpu_median": round(statistics.median(overhead_c), 4),
                                                "wall_median": round(statistics.median(overhead_w), 4)},
            "tokens_per_s_stage": round(n_tokens / wall["stage"], 1),
        }
        entry["bytes_per_token"] = {"opd_shards": round(dir_bytes(shards) / n_tokens, 3), "store_parts": round(dir_bytes(parts) / n_tokens, 3)}
        if k:
            recipe = tmp / f"r-{k}-f16.yaml"
            recipe.write_text(yaml.safe_dump({
                "name": f"bench-lp-{k}-f16", "workdir": str(tmp / f"work-{k}-f16"), "source": [{"path": str(src)}],
                "engines": {"teacher": engine_cfg},
                "stages": [{"logprobs": {"engine": "teacher", "top_k": k, "max_length": args.max_length, "topk_dtype": "float16"}}],
                "outputs": [{"format": "opd", "path": str(tmp / f"out-{k}-f16")}],
            }))
            Runner(load_recipe(recipe)).run()
            entry["bytes_per_token_float16_topk"] = {
                "opd_shards": round(dir_bytes(sorted((tmp / f"out-{k}-f16" / "data").glob("*.parquet"))) / n_tokens, 3),
                "store_parts": round(dir_bytes(sorted((tmp / f"work-{k}-f16" / "stages").glob("logprobs-*/part-*.parquet"))) / n_tokens, 3),
            }
        results[f"k={k}"] = entry

    import vllm

    print(json.dumps({
        "benchmark": "logprobs stage vs raw vLLM prompt_logprobs",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "vllm": vllm.__version__},
        "model": "tiny Qwen2 (tests/fixtures/tiny_model.py), float32, vLLM-cpu",
        "rows": len(seqs), "tokens": n_tokens, "loss_tokens": loss_tokens, "max_length": args.max_length,
        "repeats": args.repeats, "engine_load_s": round(load_s, 2),
        "results": results,
    }, indent=2))
    engine.close()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
