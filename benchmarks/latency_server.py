"""A fast OpenAI-compatible stand-in server that sleeps an injected latency per request.

It measures how well a client keeps a server's slots busy: every chat completion sleeps a
latency drawn deterministically from a hash of the request's ``messages`` (so every client sees
the same latency for the same problem, whatever else it puts in the body), then answers a valid
chat completion with a ``usage`` field. The server tracks, exactly, the time-weighted number of
requests in flight between the first request's arrival and the last answer.

Latency modes:

- ``fixed``: every request sleeps ``latency`` seconds;
- ``lognormal``: ``exp(mu + sigma * z)`` with ``z`` the standard normal quantile of a hash-derived
  uniform and ``mu = ln(latency) - sigma**2 / 2``, so the mean is ``latency`` (default 0.7 s,
  sigma 0.8).

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /stats``,
``POST /reset`` (zero the counters between measurements).

Run it as its own process so it never shares a GIL with the client under test::

    python benchmarks/latency_server.py --port 8123 --mode fixed --latency 0.5
    python benchmarks/latency_server.py --port 8123 --mode lognormal --latency 0.7 --sigma 0.8

or from Python (tests, benchmarks)::

    from benchmarks.latency_server import running_server
    with running_server("lognormal", latency=0.7, sigma=0.8) as srv:
        ...  # point a client at srv.base_url ("http://127.0.0.1:<port>/v1")
        print(srv.stats())

Only ``aiohttp`` is needed on the server side (uvloop is used when installed); the client-side
helpers (:class:`ServerHandle`, :func:`running_server`) use the standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

MODES = ("fixed", "lognormal")
DEFAULT_LATENCY = {"fixed": 0.5, "lognormal": 0.7}
DEFAULT_SIGMA = 0.8
REPLY = "The answer is \\boxed{42}."
_NORMAL = NormalDist()


def messages_hash(messages: Any) -> int:
    """64-bit hash of a request's ``messages`` (canonical JSON): what the latency is drawn from."""
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def messages_digest(hashes: Any) -> str:
    """Order-free digest of a set of requests (sum of their :func:`messages_hash` mod 2**64)."""
    return f"{sum(hashes) % 2**64:016x}"


def draw_latency(messages: Any, mode: str, latency: float, sigma: float = DEFAULT_SIGMA,
                 h: int | None = None) -> float:
    """The latency (seconds) the server sleeps for a request carrying these ``messages``."""
    if mode == "fixed":
        return latency
    if mode != "lognormal":
        raise ValueError(f"unknown latency mode {mode!r}; use one of {MODES}")
    h = messages_hash(messages) if h is None else h
    u = (h + 0.5) / 2**64  # in (0, 1)
    mu = math.log(latency) - sigma**2 / 2
    return math.exp(mu + sigma * _NORMAL.inv_cdf(u))


@dataclass
class Meter:
    """Counters of one measurement: requests, in-flight integral, slept latencies."""

    requests: int = 0
    answered: int = 0
    bad_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    first_arrival: float | None = None
    last_answer: float | None = None
    _last_change: float = 0.0
    _area: float = 0.0  # integral of in_flight over time, from the first arrival
    latency_drawn_sum: float = 0.0
    latency_slept_sum: float = 0.0
    latency_max: float = 0.0
    handler_sum: float = 0.0  # arrival to answer, summed over requests
    digest: int = 0  # sum of messages hashes mod 2**64: which requests came, in any order
    started: float = field(default_factory=time.perf_counter)

    def _advance(self, now: float) -> None:
        self._area += self.in_flight * (now - self._last_change)
        self._last_change = now

    def arrive(self, now: float) -> None:
        """A request entered (its body has been read)."""
        if self.first_arrival is None:
            self.first_arrival = now
            self._last_change = now
        self._advance(now)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, now: float, arrived: float, answered: bool) -> None:
        """A request left (answered or failed)."""
        self._advance(now)
        self.in_flight -= 1
        self.handler_sum += now - arrived
        if answered:
            self.answered += 1
            self.last_answer = now

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON; ``mean_in_flight`` is time-weighted over ``window_s``."""
        window = 0.0
        area = self._area
        if self.first_arrival is not None:
            end = self.last_answer if self.in_flight == 0 and self.last_answer else time.perf_counter()
            if self.in_flight:  # still running: count the open interval too
                area += self.in_flight * (end - self._last_change)
            window = max(0.0, end - self.first_arrival)
        return {
            "requests": self.requests,
            "answered": self.answered,
            "bad_requests": self.bad_requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "window_s": round(window, 6),
            "mean_in_flight": round(area / window, 4) if window > 0 else 0.0,
            "latency_drawn_sum_s": round(self.latency_drawn_sum, 6),
            "latency_slept_sum_s": round(self.latency_slept_sum, 6),
            "latency_max_s": round(self.latency_max, 6),
            "handler_sum_s": round(self.handler_sum, 6),
            "messages_digest": f"{self.digest:016x}",
        }


def build_app(mode: str, latency: float, sigma: float = DEFAULT_SIGMA, model: str = "bench",
              max_model_len: int = 32768) -> Any:
    """The aiohttp application (one :class:`Meter`, replaced by ``POST /reset``)."""
    from aiohttp import web

    if mode not in MODES:
        raise ValueError(f"unknown latency mode {mode!r}; use one of {MODES}")
    state: dict[str, Any] = {"meter": Meter(), "config": {"mode": mode, "latency": latency, "sigma": sigma, "model": model}}

    async def chat(request: web.Request) -> web.Response:
        meter: Meter = state["meter"]
        try:
            body = await request.json()
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except Exception as e:  # noqa: BLE001 - any malformed body is a 400
            meter.bad_requests += 1
            return web.json_response({"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}}, status=400)
        arrived = time.perf_counter()
        meter.arrive(arrived)
        answered = False
        try:
            h = messages_hash(messages)
            meter.digest = (meter.digest + h) % 2**64
            lat = draw_latency(messages, mode, latency, sigma, h=h)
            t = time.perf_counter()
            await asyncio.sleep(lat)
            slept = time.perf_counter() - t
            meter.latency_drawn_sum += lat
            meter.latency_slept_sum += slept
            meter.latency_max = max(meter.latency_max, lat)
            n = int(body.get("n") or 1)
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            completion_tokens = min(max_tokens, 8)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
            payload = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or model,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": REPLY}, "logprobs": None, "finish_reason": "stop"}
                    for i in range(n)
                ],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                          "total_tokens": prompt_tokens + completion_tokens * n},
            }
            resp = web.json_response(payload)
            answered = True
            return resp
        finally:
            # a request the client cancelled still leaves the in-flight count
            if state["meter"] is meter:
                meter.leave(time.perf_counter(), arrived, answered)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "latency-server", "root": model,
             "max_model_len": max_model_len}
        ]})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({**state["meter"].snapshot(), **state["config"]})

    async def reset(_: web.Request) -> web.Response:
        old = state["meter"].snapshot()
        state["meter"] = Meter()
        return web.json_response({"reset": True, "previous": old})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, **state["config"]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_get("/health", health)
    return app


def serve(port: int, mode: str = "fixed", latency: float | None = None, sigma: float = DEFAULT_SIGMA,
          host: str = "127.0.0.1", model: str = "bench") -> None:
    """Serve until killed (blocks). ``latency`` defaults to 0.5 s (fixed) / 0.7 s mean (lognormal)."""
    from aiohttp import web

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    lat = DEFAULT_LATENCY.get(mode, 0.5) if latency is None else latency
    app = build_app(mode, lat, sigma, model=model)
    web.run_app(app, host=host, port=port, access_log=None, print=None, backlog=4096,
                handle_signals=True, shutdown_timeout=1.0)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, method: str = "GET", timeout: float = 10.0) -> dict[str, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class ServerHandle:
    """A running latency server: its URLs and its ``/stats`` / ``/reset`` endpoints."""

    port: int
    mode: str
    latency: float
    sigma: float
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root (``.../v1``)."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        return _call(f"{self.url}/stats")

    def reset(self) -> dict[str, Any]:
        return _call(f"{self.url}/reset", "POST")

    def healthy(self) -> bool:
        try:
            return bool(_call(f"{self.url}/health", timeout=1.0).get("ok"))
        except (OSError, urllib.error.URLError, ValueError):
            return False


@contextlib.contextmanager
def running_server(mode: str = "fixed", latency: float | None = None, sigma: float = DEFAULT_SIGMA,
                   port: int | None = None, python: str | None = None, ready_timeout: float = 30.0,
                   model: str = "bench") -> Iterator[ServerHandle]:
    """Start the server in a subprocess, wait until it answers, yield its handle, stop it."""
    lat = DEFAULT_LATENCY.get(mode, 0.5) if latency is None else latency
    port = port or free_port()
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--mode", mode,
           "--latency", str(lat), "--sigma", str(sigma), "--model", model]
    errlog = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    handle = ServerHandle(port=port, mode=mode, latency=lat, sigma=sigma, process=proc)
    try:
        deadline = time.monotonic() + ready_timeout
        while not handle.healthy():
            if proc.poll() is not None:
                errlog.seek(0)
                err = errlog.read().decode(errors="replace")
                raise RuntimeError(f"latency server exited with {proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"latency server not ready on port {port} after {ready_timeout:.0f}s")
            time.sleep(0.05)
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errlog.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--port --mode --latency --sigma``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--mode", choices=MODES, default="fixed")
    ap.add_argument("--latency", type=float, default=None, help="fixed latency / lognormal mean (s)")
    ap.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="lognormal sigma")
    ap.add_argument("--model", default="bench", help="model id served by /v1/models")
    args = ap.parse_args(argv)
    serve(args.port, args.mode, args.latency, args.sigma, host=args.host, model=args.model)


if __name__ == "__main__":
    main()
