"""Benchmark the ``verify`` stage against the raw libraries, in one run; prints JSON.

Math: reference solutions of MATH-500, GSM8K test and (``--train``) GSM8K train replayed as responses, each
also with a wrong answer substituted (so half the items are incorrect), verified

- by a plain single-process math-verify loop (``verify(parse(gold), parse(response))``, the
  library's own extraction) -- the baseline;
- by tracepipe's ``check_math`` in one process (same per-item work as the stage, no workers);
- by ``MathChecker`` with one supervised worker (the cost of the hard-timeout design);
- through the ``verify`` stage of a recipe (``load_recipe`` + ``Runner``, ``--workers`` cores).

Code: HumanEval canonical solutions (164) run one at a time as a bare ``python -c`` subprocess,
with the harness under rlimits only, and in the bubblewrap sandbox; plus sandbox throughput with
``--code-concurrency`` sandboxes at once.

Usage: ``python benchmarks/verify.py [--workers 2] [--math-limit N] [--skip-code]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def math_items(limit: int | None, train: int = 3000) -> list[dict]:
    from tests.fixtures.verify_data import (
        gsm8k_items,
        math500_items,
        read_jsonl,
        with_wrong_boxed,
        with_wrong_gsm8k,
        wrong_answer,
    )
    from tracepipe import DATA_DIR
    from tracepipe.sources import gsm8k_answer

    train = [{"id": f"train-{i}", "response": r["answer"], "answer": gsm8k_answer(r["answer"])}
             for i, r in enumerate(read_jsonl(DATA_DIR / "sources" / "gsm8k_train.jsonl")[:train])]
    items = []
    for i, it in enumerate(math500_items()):
        items.append({**it, "kind": "math500"})
        w, _ = wrong_answer(it["answer"], i)
        items.append({"id": it["id"] + "/wrong", "response": with_wrong_boxed(it["response"], w), "answer": it["answer"], "kind": "math500"})
    for i, it in enumerate(gsm8k_items() + train):
        items.append({**it, "kind": "gsm8k"})
        w, _ = wrong_answer(it["answer"], i)
        items.append({"id": it["id"] + "/wrong", "response": with_wrong_gsm8k(it["response"], w), "answer": it["answer"], "kind": "gsm8k"})
    return items[:limit] if limit else items


def _load(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class TreeCPU:
    """CPU seconds used by this process and all its descendants (sampled from /proc; Linux)."""

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.tck = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _tree(self) -> list[int]:
        out, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
            except OSError:
                continue
        return out

    def _sample(self) -> None:
        for pid in self._tree():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                self.seen[pid] = max(self.seen.get(pid, 0.0), (int(f[11]) + int(f[12])) / self.tck)
            except (OSError, IndexError, ValueError):
                continue

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def __enter__(self) -> TreeCPU:
        self._sample()
        self.base = dict(self.seen)
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.seen.items())


def plain_math_verify(path: str) -> dict:
    """The baseline: the library's own extraction on the full response, one process."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    items = _load(path)
    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    t0, c0 = time.perf_counter(), _cpu()
    ok = 0
    for it in items:
        gold = parse("\\boxed{" + it["answer"] + "}", extraction_config=cfg)
        ok += bool(verify(gold, parse(it["response"])))
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "correct": ok}


def inprocess_check_math(path: str) -> dict:
    """tracepipe's per-item work (extraction + math-verify) in one process, no workers."""
    from tracepipe.verifiers.math import check_math

    items = _load(path)
    t0, c0 = time.perf_counter(), _cpu()
    ok = sum(check_math(it["response"], it["answer"]).verdict == "correct" for it in items)
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "correct": ok}


def supervised_one_worker(path: str) -> dict:
    """The same work in one supervised worker process (hard per-item timeout design)."""
    from tracepipe.verifiers.math import MathChecker

    items = _load(path)
    t0 = time.perf_counter()
    with MathChecker(workers=1) as mc:
        mc.check([("\\boxed{1}", "1")])  # worker up
        t1 = time.perf_counter()
        with TreeCPU() as cpu:
            res = mc.check([(it["response"], it["answer"]) for it in items])
        t2 = time.perf_counter()
    return {"seconds": t2 - t1, "startup_s": t1 - t0, "cpu_s_all_processes": cpu.seconds,
            "correct": sum(r.verdict == "correct" for r in res)}


def stage_run(path: str, workers: int, batch_size: int | None) -> dict:
    """The items as a recipe source through the verify stage (load_recipe + Runner)."""
    import yaml

    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    with tempfile.TemporaryDirectory(prefix="tp-bench-verify-") as d:
        params = {} if batch_size is None else {"batch_size": batch_size}
        recipe = {"name": "bench-verify", "workdir": str(Path(d) / "work"), "source": [{"path": path, "domain": "math"}],
                  "stages": [{"verify": params}], "executor": {"workers": workers}}
        (Path(d) / "r.yaml").write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        with TreeCPU() as cpu:
            res = Runner(load_recipe(Path(d) / "r.yaml")).run()
        wall = time.perf_counter() - t0
        st = res.stats.stages[0]
        return {"seconds": wall, "cpu_s_all_processes": cpu.seconds, "stage_s": st.seconds, "compute_s": st.compute_seconds,
                "correct": st.extra.get("verdicts", {}).get("correct", 0), "verdicts": st.extra.get("verdicts", {})}


def _call(conn: object, fn: object, args: tuple) -> None:
    conn.send(fn(*args))  # type: ignore[attr-defined, operator]


def fresh(fn: object, *args: object) -> dict:
    """Run ``fn(*args)`` in a fresh spawned interpreter (no warm caches shared between variants)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_call, args=(child, fn, args))
    p.start()
    out = parent.recv()
    p.join()
    return out


def code_bench(concurrency: int) -> dict:
    """HumanEval canonical solutions; the three ways of running each program are interleaved
    (bare, rlimits-only harness, bwrap sandbox) so they share the machine's load; medians."""
    import statistics

    from tests.fixtures.verify_data import humaneval_rows, humaneval_tests
    from tracepipe.verifiers.code import CodeVerifier, SandboxLimits, isolation

    rows = humaneval_rows()
    progs = [r["prompt"] + r["canonical_solution"] for r in rows]
    tests = [humaneval_tests(r) for r in rows]
    lim = SandboxLimits(wall_s=30, cpu_s=20)
    variants: dict[str, CodeVerifier | None] = {"bare_subprocess": None, "harness_rlimits_only": CodeVerifier(lim, isolation_mode="none")}
    if isolation().bwrap:
        variants["sandbox_bwrap"] = CodeVerifier(lim)
    for v in variants.values():
        if v is not None:
            _ = v.iso  # probe outside the timing
    times: dict[str, list[float]] = {k: [] for k in variants}
    passed = dict.fromkeys(variants, 0)
    for p, r, t in zip(progs, rows, tests):
        for name, v in variants.items():
            t0 = time.perf_counter()
            if v is None:
                src = p + "\n" + r["test"] + f"\ncheck({r['entry_point']})\n"
                ok = subprocess.run([sys.executable, "-I", "-c", src], capture_output=True, timeout=60).returncode == 0
            else:
                ok = v.run_program(p, t).verdict == "correct"
            times[name].append(time.perf_counter() - t0)
            passed[name] += ok
    out: dict = {"programs": len(rows)}
    for name in variants:
        med = statistics.median(times[name])
        out[name] = {"median_ms_per_exec": 1000 * med, "execs_per_s": len(rows) / sum(times[name]), "passed": passed[name]}
    if "sandbox_bwrap" in variants:
        bare, box = out["bare_subprocess"]["median_ms_per_exec"], out["sandbox_bwrap"]["median_ms_per_exec"]
        out["sandbox_overhead_vs_bare"] = f"{box - bare:+.1f} ms per execution ({(box / bare - 1) * 100:+.0f}%, medians)"
        v = variants["sandbox_bwrap"]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            res = list(ex.map(lambda pt: v.run_program(*pt), zip(progs, tests)))
        dt = time.perf_counter() - t0
        out[f"sandbox_bwrap_concurrency_{concurrency}"] = {"execs_per_s": len(rows) / dt, "passed": sum(x.verdict == "correct" for x in res)}
    else:
        out["sandbox_bwrap"] = {"skipped": isolation().reason}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--math-limit", type=int, default=None, help="use the first N math items")
    ap.add_argument("--batch-size", type=int, default=None, help="verify stage batch_size (default: the stage's)")
    ap.add_argument("--code-concurrency", type=int, default=4)
    ap.add_argument("--skip-code", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="alternate baseline / stage runs, report the best of each")
    ap.add_argument("--train", type=int, default=3000, help="GSM8K train solutions added to MATH-500 + GSM8K test")
    args = ap.parse_args()

    items = math_items(args.math_limit, args.train)
    n = len(items)
    report: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}, "math": {"items": n}}
    with tempfile.TemporaryDirectory(prefix="tp-bench-items-") as d:
        path = str(Path(d) / "items.jsonl")
        with open(path, "w") as fh:
            for it in items:
                fh.write(json.dumps({"id": it["id"], "problem": it["id"], "response": it["response"], "answer": it["answer"]}) + "\n")
        m = report["math"]
        m["rounds"] = args.rounds
        m["tracepipe_check_math_in_process"] = fresh(inprocess_check_math, path)
        m["supervised_1_worker"] = fresh(supervised_one_worker, path)
        # the machine may be shared: alternate baseline and stage, keep the best round of each
        plains, stages = [], []
        for _ in range(args.rounds):
            plains.append(fresh(plain_math_verify, path))
            stages.append(fresh(stage_run, path, args.workers, args.batch_size))
        m["plain_math_verify_loop"] = {**min(plains, key=lambda r: r["seconds"]), "all_rounds_s": [r["seconds"] for r in plains]}
        m[f"verify_stage_{args.workers}_workers"] = {**min(stages, key=lambda r: r["seconds"]), "all_rounds_s": [r["seconds"] for r in stages]}
    for v in m.values():
        if isinstance(v, dict) and "seconds" in v:
            v["items_per_s"] = n / v["seconds"]
    plain, inproc = m["plain_math_verify_loop"], m["tracepipe_check_math_in_process"]
    stage = m[f"verify_stage_{args.workers}_workers"]
    m["supervised_1_worker"]["overhead_vs_in_process"] = f"{(m['supervised_1_worker']['seconds'] / inproc['seconds'] - 1) * 100:+.1f}%"
    m["speedup_stage_vs_plain_loop"] = plain["seconds"] / stage["seconds"]
    m["cpu_efficiency_stage_vs_plain"] = plain["cpu_s"] / stage["cpu_s_all_processes"]
    m["speedup_stage_vs_check_math_in_process"] = inproc["seconds"] / stage["seconds"]
    if not args.skip_code:
        report["code"] = code_bench(args.code_concurrency)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(_rounded(report), indent=2, default=str))


def _rounded(o: object) -> object:
    if isinstance(o, float):
        return round(o, 3)
    if isinstance(o, dict):
        return {k: _rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v) for v in o]
    return o


if __name__ == "__main__":
    main()
