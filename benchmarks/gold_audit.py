"""Benchmark ``gold_audit`` on GSM8K train with planted wrong gold answers; prints JSON.

GSM8K train (7,473 problems, ``tracepipe/data/sources/gsm8k_train.jsonl``); ``--plants`` problems
(default 100, seeded) get a wrong gold answer (the true one plus or minus a small amount, doubled
or halved). Every problem gets ``--samples`` traces (default 4), replayed by a ``replay`` engine:
the reasoning is the GSM8K solution, the final answer is the true answer in one of several
equivalent spellings (``72``, ``72.0``, ``\\frac{144}{2}``, ``\\$72``, ``1,234``, ``30 + 42``)
or, with probability ``--noise`` (default 0.25), wrong in another way: a random wrong number
(40% of the noise), the problem's one "popular mistake" that several samples may share (30%), or no
final answer at all (30%). The recipe is ``generate (replay) -> verify -> gold_audit``, run through
``load_recipe`` + ``Runner``; the figures:

- ``plants_flagged``: share of the planted problems with ``gold_suspect`` (target >= 0.9), and
  ``alt_is_true``: share of those whose ``gold_alt`` is the true answer;
- ``clean_flagged``: share of the other problems flagged (target <= 0.01);
- the same two figures, side by side, for a baseline that groups the samples' answers by string
  equality instead of mathematical equivalence (same thresholds, same verdicts);
- a sweep of ``min_agreement`` (the set stage alone is decided again; nothing else recomputes).

Usage: ``python benchmarks/gold_audit.py [--samples 4] [--noise 0.25] [--plants 100] [--limit N]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import yaml  # noqa: E402

from tracepipe import DATA_DIR  # noqa: E402
from tracepipe.sources import gsm8k_answer  # noqa: E402


def spell(v: int, rng: random.Random) -> str:
    """The true answer in a random equivalent spelling."""
    r = rng.random()
    if r < 0.5:
        return str(v)
    if r < 0.6:
        return f"{v}.0"
    if r < 0.7:
        return f"\\frac{{{2 * v}}}{{2}}"
    if r < 0.8:
        return f"\\${v}"
    if r < 0.9 and abs(v) >= 1000:
        return f"{v:,}"
    a = rng.randint(0, abs(v)) if v else 0
    return f"{a} + {v - a}"


def plant(v: int, rng: random.Random) -> int:
    """A wrong gold answer near the true one."""
    while True:
        w = rng.choice([v + rng.randint(1, 9), v - rng.randint(1, 9), 2 * v, v // 2, v + 10])
        if w != v:
            return w


def build_rows(samples: int, noise: float, plants: int, limit: int | None, seed: int) -> tuple[list[dict[str, Any]], dict[str, int], set[str]]:
    rng = random.Random(seed)
    probs = []
    with open(DATA_DIR / "sources" / "gsm8k_train.jsonl") as fh:
        for i, line in enumerate(fh):
            r = json.loads(line)
            gold = gsm8k_answer(r["answer"])
            try:
                v = int(gold or "")
            except ValueError:
                continue  # a few golds are decimals: keep the benchmark to integers
            probs.append((f"gsm8k-train-{i}", r["question"], r["answer"].rsplit("####", 1)[0].strip(), v))
    if limit:
        probs = probs[:limit]
    planted = set(rng.sample([p[0] for p in probs], plants))
    truth: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for pid, question, steps, v in probs:
        truth[pid] = v
        gold = plant(v, rng) if pid in planted else v
        mistake = v + rng.choice([-1, 1]) * rng.randint(1, 12)  # this problem's popular mistake
        for s in range(samples):
            r = rng.random()
            if r >= noise:
                final = f"The final answer is $\\boxed{{{spell(v, rng)}}}$."
            elif r < 0.4 * noise:
                final = f"The final answer is $\\boxed{{{v + rng.randint(13, 500)}}}$."
            elif r < 0.7 * noise:
                final = f"The final answer is $\\boxed{{{mistake}}}$."
            else:
                final = "I could not finish the calculation."
            rows.append({"pid": pid, "question": question, "gold": str(gold), "sample_no": s,
                         "trace": f"<think>\n{steps}\n</think>\n\n{final}"})
    return rows, truth, planted


def equal_num(a: str | None, v: int) -> bool:
    """Whether an answer spelled as :func:`spell` does (``a + b`` included) is the number ``v``."""
    from tracepipe.stages.gold_audit import canonical

    m = re.fullmatch(r"\s*(-?\d+) \+ (-?\d+)\s*", a or "")
    return a is not None and (canonical(a) == f"n:{v}" or (m is not None and int(m.group(1)) + int(m.group(2)) == v))


def missed(df: pl.DataFrame, flagged: set[str], planted: set[str]) -> dict[str, int]:
    """Why the planted problems that were not flagged were not."""
    per = df.group_by("id").agg((pl.col("verdict") == "correct").any().alias("hit"), pl.col("gold_alt").first())
    why: dict[str, int] = {}
    for _pid, hit, alt in per.filter(pl.col("id").is_in(sorted(planted - flagged))).iter_rows():
        reason = "a sample gave the planted gold" if hit else "no single most common answer" if alt is None else "below min_agreement"
        why[reason] = why.get(reason, 0) + 1
    return why


def string_baseline(df: pl.DataFrame, min_samples: int, min_agreement: float) -> set[str]:
    """Problems flagged when answers are grouped by string equality (after trimming)."""
    judged = df.filter(~pl.col("verdict").is_in(["error", "unverifiable"]))
    per = judged.group_by("id").agg(
        pl.len().alias("n"),
        (pl.col("verdict") == "correct").any().alias("any_correct"),
        (pl.col("pred_answer").str.strip_chars() == pl.col("answer").str.strip_chars()).any().alias("any_same"),
        pl.col("pred_answer").str.strip_chars().drop_nulls().value_counts(sort=True).alias("vc"),
    )
    flagged = set()
    for pid, n, any_correct, any_same, vc in per.iter_rows():
        if any_correct or any_same or not vc:
            continue
        counts = [c["count"] for c in vc]
        if len(counts) > 1 and counts[0] == counts[1]:
            continue
        if n >= min_samples and counts[0] / n >= min_agreement:
            flagged.add(pid)
    return flagged


def run_recipe(tmp: Path, src: Path, audit: dict[str, Any], workers: int) -> tuple[pl.DataFrame, dict[str, Any], float]:
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    recipe = {
        "name": "gold-audit-bench", "workdir": str(tmp / "work"),
        "source": [{"path": str(src), "columns": {"problem": "question", "answer": "gold", "id": "pid"},
                    "answer_format": "raw", "domain": "math"}],
        "engines": {"samples": {"kind": "replay", "column": "trace"}},
        "stages": [{"generate": {"engine": "samples"}}, {"verify": {}}, {"gold_audit": audit}],
        "executor": {"kind": "local", "workers": workers},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    res = Runner(load_recipe(path)).run()
    wall = time.perf_counter() - t0
    df = pl.concat([pl.read_parquet(p.path) for p in res.final_parts], how="diagonal_relaxed")
    stages = {s.name: {"seconds": round(s.seconds, 2), "computed": s.computed, "cached": s.cached} for s in res.stats.stages}
    return df, stages, wall


def figures(flagged: set[str], truth: dict[str, int], planted: set[str]) -> dict[str, Any]:
    clean = len(truth) - len(planted)
    return {
        "plants_flagged": round(len(flagged & planted) / len(planted), 4),
        "clean_flagged": round(len(flagged - planted) / clean, 5),
        "plants_flagged_n": len(flagged & planted), "clean_flagged_n": len(flagged - planted),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--plants", type=int, default=100)
    ap.add_argument("--limit", type=int, default=None, help="first N problems only (quick runs)")
    ap.add_argument("--min-samples", type=int, default=3)
    ap.add_argument("--min-agreement", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows, truth, planted = build_rows(args.samples, args.noise, args.plants, args.limit, args.seed)
    out: dict[str, Any] = {
        "data": "GSM8K train", "problems": len(truth), "samples_per_problem": args.samples, "rows": len(rows),
        "noise": args.noise, "plants": len(planted), "min_samples": args.min_samples, "min_agreement": args.min_agreement,
    }
    with tempfile.TemporaryDirectory(prefix="tp-gold-audit-") as d:
        tmp = Path(d)
        src = tmp / "samples.jsonl"
        with open(src, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        audit = {"min_samples": args.min_samples, "min_agreement": args.min_agreement}
        df, stages, wall = run_recipe(tmp, src, audit, args.workers)
        per = df.group_by("id").agg(pl.col("gold_suspect").any(), pl.col("gold_alt").first())
        flagged = set(per.filter(pl.col("gold_suspect"))["id"].to_list())
        alt_ok = sum(equal_num(alt, truth[pid]) for pid, sus, alt in per.iter_rows() if sus and pid in planted)
        out["tracepipe"] = {**figures(flagged, truth, planted),
                            "alt_is_true": round(alt_ok / max(1, len(flagged & planted)), 4)}
        out["tracepipe"]["plants_missed_because"] = missed(df, flagged, planted)
        out["string_equality_baseline"] = figures(string_baseline(df, args.min_samples, args.min_agreement), truth, planted)
        out["verdicts"] = dict(df.group_by("verdict").len().iter_rows())
        out["stages"] = stages
        out["wall_seconds"] = round(wall, 1)
        sweep = {}
        for agreement in (0.5, 0.75, 1.0):
            if agreement == args.min_agreement:
                sweep[str(agreement)] = figures(flagged, truth, planted)
                continue
            df2, stages2, wall2 = run_recipe(tmp, src, {**audit, "min_agreement": agreement}, args.workers)
            f2 = set(df2.filter(pl.col("gold_suspect"))["id"].unique().to_list())
            sweep[str(agreement)] = {**figures(f2, truth, planted), "rerun_seconds": round(wall2, 1),
                                     "recomputed": {k: v["computed"] for k, v in stages2.items()}}
        out["min_agreement_sweep"] = sweep
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
