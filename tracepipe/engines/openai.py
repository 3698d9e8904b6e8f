"""``openai`` engine: any OpenAI-compatible chat server (vLLM and SGLang servers, hosted APIs).

Recipe::

    engines:
      api:
        kind: openai
        base_url: http://127.0.0.1:8000/v1
        model: my-teacher                 # the id the server serves (``/v1/models``)
        api_key_env: TEACHER_API_KEY      # NAME of the environment variable; never the key
        concurrency: 64                   # requests in flight at most (the AIMD window's ceiling)
        rpm: 500                          # optional: requests per minute (token bucket)
        tpm: 200000                       # optional: tokens per minute (token bucket, see below)
        timeout_s: 600                    # per HTTP request, end to end
        max_retries: 8                    # on 5xx, 408/409/425, timeouts and connection errors
        rate_limit_timeout_s: 600         # 429s are retried until nothing succeeded for this long
        backoff: {base: 1.0, max: 60.0}   # exponential, with jitter; Retry-After is honoured
        chat_template_kwargs: {enable_thinking: true}
        extra_body: {repetition_penalty: 1.05}

How it works:

- **Client.** one ``aiohttp`` session (``concurrency`` connections) on one background event loop per engine,
  so the sync :meth:`OpenAIEngine.generate` works from any thread, even one that already runs a
  loop, and from many threads at once (the runtime streams: it keeps :meth:`capacity` requests
  submitted). aiohttp rather than httpx for the requests: at hundreds of slots httpx's pool costs
  a core (see :class:`_Clients`); rather than the ``openai`` SDK: one retry policy that we own
  (the SDK retries on its own, with its own backoff and without our request counting) and the
  raw JSON (``reasoning`` / ``reasoning_content`` are not SDK fields). ``/v1/models`` is one
  httpx GET.
- **Concurrency (AIMD).** The HTTP requests in flight are bounded by a window of at most
  ``concurrency`` (backoff sleeps hold no slot). A rate-limit answer (429, 503) halves it (at
  least 1), once per round trip: an answer to a request sent before the last cut does not cut
  again. Each window's worth of successes widens it by one, back up to ``concurrency``.
- **Rate limits.** ``rpm`` / ``tpm`` are token buckets (refilled continuously, holding one
  second's worth, so a burst is at most ``rpm/60`` requests); a request waits (no busy loop)
  for its slot first, then for its tokens. A request's ``tpm`` cost is its prompt estimated as
  ``len(json(messages)) // 4`` plus ``max_tokens * n`` (what hosted APIs reserve); the
  difference from the ``usage`` the server reports is given back when the answer arrives.
- **Retries.** 429 is retried without a count limit while the engine makes progress: it gives
  up (fatally) only when no request of the engine succeeded for ``rate_limit_timeout_s``. 408,
  409, 425, every 5xx (503 included), timeouts and connection errors are retried up to
  ``max_retries`` times. The wait is ``uniform(d/2, d)`` seconds, ``d = min(backoff.max,
  backoff.base * 2**attempt)``; a ``Retry-After`` / ``retry-after-ms`` header on a 429/503
  raises it to what the server asks (capped by ``backoff.retry_after_max``) and holds every
  new request of the engine until then. Other 4xx fail at once.
- **Fatal errors.** 401 / 403 (the key is refused: the message names ``api_key_env``, never the
  key), 404 (no such model or endpoint: names ``model`` and ``base_url``), a 429 saying the
  quota is exhausted, 429s with no success for ``rate_limit_timeout_s``, and (in ``generate``) a
  missing key variable raise :class:`OpenAIFatalError` (an
  :class:`~tracepipe.engines.base.EngineFatalError`). The engine remembers it: every request in
  flight or waiting, and every later one, fails at once with the same exception without sending
  anything, and :meth:`OpenAIEngine.generate_iter` raises it even with ``return_exceptions``.
- **Secrets.** The key is read from ``os.environ[api_key_env]`` when the engine starts, kept in an
  object whose repr is ``<secret>``, sent only in the ``Authorization`` header, and scrubbed from
  every message this module logs or raises. ``base_url`` may not carry credentials.
- **Reasoning.** ``message.reasoning`` (newer vLLM) or ``message.reasoning_content`` (older vLLM,
  DeepSeek API, SGLang) becomes :attr:`Completion.reasoning`; ``message.content`` is the text.
- **n samples.** ``n_mode: auto`` sends ``n`` in one request and asks for ``logprobs`` (no top-k)
  so each choice's completion tokens are counted exactly (``usage`` is a sum over the ``n``
  choices). If the server refuses that (400/422), it uses ``n`` + the configured ``tokenizer`` to
  count (an estimate: the returned text re-tokenized), else ``n`` separate requests (exact usage
  per request). Separate requests use seeds ``seed, seed+1, ...``: what vLLM does for choice
  ``i`` of an ``n`` request, so both ways give the same samples on vLLM. A server that returns
  fewer choices than asked gets the rest as separate requests.
- **Context window.** ``max_tokens`` is capped at the ``max_model_len`` that ``/v1/models``
  reports; a 400 saying the completion does not fit is retried with what fits, and a prompt the
  context cannot hold gives ``n`` empty completions with ``finish_reason = "prompt_too_long"``
  (as the ``vllm`` engine does), not an error.
- **Request journal.** Each finished request is appended (flushed) to
  ``<workdir>/engines/openai-<fp>/journal-*.jsonl`` the moment it completes, keyed by a hash of
  the teacher fingerprint, messages, n and sampling parameters (seed included). A request found
  there is answered from it, never sent again: a run killed mid-stage (even ``kill -9``) pays for
  no finished request twice, and a batch the executor bisects after an error re-sends only the
  failed requests. Entries stay until the runtime says their rows are committed
  (:meth:`OpenAIEngine.settle`, optional) or the engine closes (by then the runtime committed all
  it was handed); results never handed to a caller (a failed ``generate``, an abandoned
  iterator) outlive :meth:`~OpenAIEngine.close` for the next run. Files are compacted when they
  pass ``max_bytes`` and at least half of them is settled. Memory holds an index, not results.
- **Usage.** :meth:`OpenAIEngine.usage`: requests, retries, rate-limited answers, tokens, rates
  and the current window, for the stage stats and the progress bar.
- **Spend and budgets** (:mod:`tracepipe.spend`). Every 200 answer charges its ``usage`` to the
  engine's meter (at the ``price`` of the engine config); a request found in the journal charges
  nothing. Before a request is submitted its worst case is reserved in the caller's thread
  (prompt tokens counted with ``tokenizer`` when set, else bounded by the bytes, plus
  ``max_tokens * n``); a reservation that could cross a ``budget`` is refused with
  :class:`~tracepipe.errors.BudgetExceeded`: that request is not sent, the ones in flight finish
  (and are journaled), and ``generate`` raises it once they have.
- **Fingerprint.** ``fingerprint`` (pinned in the recipe) is used verbatim and needs no network;
  else ``model`` + ``revision`` + the ``tokenizer`` files' hash when ``revision`` is set (no
  network); else ``/v1/models`` is queried once for the model's ``root`` and ``max_model_len``.
  ``extra_body`` / ``chat_template_kwargs`` change outputs, so they are hashed in as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import fcntl
import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracepipe.engines import register_engine
from tracepipe.engines.base import (
    PROMPT_TOO_LONG,
    Completion,
    Engine,
    EngineConfig,
    EngineFatalError,
    GenerationRequest,
)
from tracepipe.errors import BudgetExceeded
from tracepipe.hashing import obj_hash, tokenizer_digest
from tracepipe.spend import Reservation

log = logging.getLogger("tracepipe.engines.openai")

RETRY_STATUS = frozenset({408, 409, 425, 429})
RATE_LIMIT_STATUS = frozenset({429, 503})  # "slow down": the window shrinks
FATAL_STATUS = frozenset({401, 403, 404})  # no retry can fix these
FALLBACK_STATUS = frozenset({400, 422})
_QUOTA = re.compile(r"insufficient_quota|exceeded your current quota", re.I)  # not a rate: money


_MODELS_CACHE: dict[tuple[str, str], dict[str, Any]] = {}
_MODELS_LOCK = threading.Lock()


class BackoffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: float = Field(1.0, gt=0, description="first retry waits about this many seconds")
    max: float = Field(60.0, gt=0, description="cap of the exponential backoff (seconds)")
    retry_after_max: float = Field(600.0, ge=0, description="cap on a server's Retry-After (seconds)")


class OpenAIConfig(EngineConfig):
    """An OpenAI-compatible chat-completions server."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)
    kind: Literal["openai"] = "openai"
    base_url: str = Field(..., description="API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., description="model id the server serves")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    concurrency: int = Field(16, ge=1, description="HTTP requests in flight at most (the AIMD window's ceiling)")
    rpm: float | None = Field(None, gt=0, description="requests per minute (token bucket, 1 s of burst)")
    tpm: float | None = Field(
        None, gt=0, description="tokens per minute: estimated prompt + max_tokens * n, corrected by `usage`"
    )
    timeout_s: float = Field(600.0, gt=0, description="per HTTP request, end to end")
    max_retries: int = Field(6, ge=0, description="retries on 5xx / 408 / 409 / 425 / timeouts / connection errors")
    rate_limit_timeout_s: float = Field(
        600.0, gt=0, description="429s are retried until no request succeeded for this many seconds"
    )
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    extra_body: dict[str, Any] = Field(default_factory=dict, description="merged into every request body")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="sent as `chat_template_kwargs` (vLLM, SGLang)")
    n_mode: Literal["auto", "n+logprobs", "n+tokenizer", "separate"] = Field(
        "auto", description="how n samples are asked for and their tokens counted (see module docs)"
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    tokenizer: str | None = Field(None, description="local tokenizer dir: hashed into the fingerprint; counts tokens if needed")
    revision: str | None = Field(None, description="weights revision; with it the fingerprint needs no server")
    fingerprint: str | None = Field(None, description="pinned teacher fingerprint (no server query)")
    journal: bool = Field(True, description="journal finished requests in the workdir (no request paid twice)")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for bad in ("api_key", "key", "token", "api_token"):
                if bad in data:
                    raise ValueError(
                        f"`{bad}` is not allowed: never put a key in a recipe; export it and name the "
                        "variable with `api_key_env: NAME`"
                    )
        return data

    @field_validator("base_url")
    @classmethod
    def _clean_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("base_url must be an http(s) URL such as http://127.0.0.1:8000/v1")
        if parts.username or parts.password or parts.query:
            raise ValueError("base_url may not carry credentials or a query string; use `api_key_env`")
        return v.rstrip("/")


class OpenAIEngineError(RuntimeError):
    """A request failed for good; the message is scrubbed of the API key."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail  # the server's error message (scrubbed)


class OpenAIFatalError(OpenAIEngineError, EngineFatalError):
    """No retry can fix it (key refused, no such model, quota gone, no key): the engine fails
    every request with it from then on, and the runtime stops the stage."""


_NUM = r"(\d[\d,]*)"
_CTX_LEN = [
    re.compile(rf"max_model_len\s*=\s*{_NUM}", re.I),
    re.compile(rf"maximum context length is {_NUM}", re.I),
    re.compile(rf"context length (?:is |of )?\(?{_NUM} tokens", re.I),
]
_REQUESTED = re.compile(rf"{_NUM} in the messages, {_NUM} in the completion", re.I)
_PROMPT_LEN = [
    re.compile(rf"prompt contains at least {_NUM}", re.I),
    re.compile(rf"input \({_NUM} tokens\)", re.I),
    re.compile(rf"prompt is too long: {_NUM}", re.I),
]
_TOO_LONG = re.compile(
    r"reduce the length of the (?:input|prompt|messages)|prompt is too long|longer than the model'?s context length|"
    r"exceeds this limit even without any output|context_length_exceeded|exceeds the (?:maximum )?context",
    re.I,
)


def _int(m: re.Match[str] | None, group: int = 1) -> int | None:
    return int(m.group(group).replace(",", "")) if m else None


def classify_context_error(detail: str, max_tokens: int) -> tuple[str, int] | None:
    """What a 4xx about the context window means: ``("clamp", max_tokens)`` to retry with fewer
    output tokens, ``("too_long", prompt_tokens)`` for a prompt that cannot fit, else None."""
    ctx = next((v for v in (_int(r.search(detail)) for r in _CTX_LEN) if v), None)
    req = _REQUESTED.search(detail)
    if req and ctx:
        prompt = _int(req, 1) or 0
        return ("clamp", ctx - prompt) if 0 < ctx - prompt < max_tokens else ("too_long", prompt)
    if _TOO_LONG.search(detail):
        return ("too_long", next((v for v in (_int(r.search(detail)) for r in _PROMPT_LEN) if v), 0))
    if ctx and ctx < max_tokens and re.search(r"max_tokens|max_completion_tokens|output tokens", detail, re.I):
        return ("clamp", ctx)
    return None


class _Secret:
    """Holds the API key; never shows it (repr, str, pickling)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an API key does not pickle")


tokenizer_hash = tokenizer_digest  # the one digest every engine uses (tracepipe.hashing)


def _retry_after(headers: Any) -> float | None:
    """Seconds a server asks us to wait (``retry-after-ms``, ``Retry-After`` seconds or date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _completion_to_dict(c: Completion) -> dict[str, Any]:
    return dataclasses.asdict(c)


class _Journal:
    """Append-only record of finished requests (one JSON line each, flushed as they finish).

    Lines are ``{"k": key, "c": [completions]}`` when a request finishes and ``{"d": key}`` once
    its row is known to be committed (:meth:`settle`). An entry stays until then, or until
    :meth:`close` if it was handed to a caller (:meth:`handed`): concurrent callers commit in
    their own time, so no later call may assume that what an earlier one returned is committed.
    Memory holds an index (key to file, offset, length), not the completions: :meth:`get` reads
    the line back. Each process writes its own ``journal-<ns>-<pid>.jsonl`` under an exclusive
    ``flock``; a new engine reads (and finally deletes) only files no live process holds. When
    the files pass ``max_bytes`` and at least half of their bytes are settled, the live entries
    are copied to a new file and the old ones deleted. Thread-safe.
    """

    def __init__(self, directory: Path, max_bytes: int = 256 << 20) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.live: dict[str, tuple[int, int, int]] = {}  # key -> (file id, offset, length)
        self.handed_keys: set[str] = set()
        self._files: dict[int, tuple[Path, Any]] = {}
        self._next_id = 0
        self._bytes = 0  # bytes in our files
        self._dead = 0  # of which settled or superseded
        self._lock = threading.Lock()
        for p in sorted(self.dir.glob("journal-*.jsonl")):
            fh = open(p, "rb")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live engine is writing it
                fh.close()
                continue
            fid = self._add_file(p, fh)
            off = 0
            for line in fh:
                if not line.endswith(b"\n"):  # a torn last line of a killed run
                    break
                try:
                    rec = json.loads(line)
                    if "d" in rec:
                        self._drop(rec["d"])
                    else:
                        self._set(rec["k"], (fid, off, len(line)))
                except (ValueError, KeyError, TypeError):
                    break
                off += len(line)
            self._bytes += p.stat().st_size
        self._dead = max(0, self._bytes - sum(loc[2] for loc in self.live.values()))
        self.loaded = len(self.live)
        self._open_current()

    # -- bookkeeping (callers hold the lock, or are __init__) -------------------------------
    def _add_file(self, path: Path, fh: Any) -> int:
        fid = self._next_id
        self._next_id += 1
        self._files[fid] = (path, fh)
        return fid

    def _open_current(self) -> None:
        path = self.dir / f"journal-{time.time_ns():020d}-{os.getpid()}.jsonl"
        fh = open(path, "a+b")
        fcntl.flock(fh, fcntl.LOCK_EX)
        self.path, self._fh = path, fh
        self._cur = self._add_file(path, fh)
        self._cur_size = 0

    def _set(self, key: str, loc: tuple[int, int, int]) -> None:
        old = self.live.get(key)
        if old is not None:
            self._dead += old[2]
        self.live[key] = loc

    def _drop(self, key: str) -> None:
        loc = self.live.pop(key, None)
        if loc is not None:
            self._dead += loc[2]
        self.handed_keys.discard(key)

    def _read(self, loc: tuple[int, int, int]) -> bytes:
        fid, off, length = loc
        return os.pread(self._files[fid][1].fileno(), length, off)

    def _append(self, data: bytes) -> int:
        off = self._cur_size
        self._fh.write(data)
        self._cur_size += len(data)
        self._bytes += len(data)
        return off

    # -- API ------------------------------------------------------------------------------
    def get(self, key: str) -> list[Completion] | None:
        with self._lock:
            loc = self.live.get(key)
            if loc is None:
                return None
            if loc[0] == self._cur:
                self._fh.flush()
            raw = self._read(loc)
        return [Completion(**c) for c in json.loads(raw)["c"]]

    def put(self, key: str, comps: list[Completion]) -> None:
        rec = [_completion_to_dict(c) for c in comps]
        line = (json.dumps({"k": key, "c": rec}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            off = self._append(line)
            self._fh.flush()  # in the OS page cache: survives kill -9 of this process
            self._set(key, (self._cur, off, len(line)))
            self.handed_keys.discard(key)

    def handed(self, key: str) -> None:
        """``key``'s result went to a caller: :meth:`close` settles it (the caller committed it)."""
        with self._lock:
            if key in self.live:
                self.handed_keys.add(key)

    def settle(self, keys: Iterable[str]) -> int:
        """Forget ``keys`` (their rows are committed); compact the files when worth it. Returns
        how many were journaled."""
        n = 0
        with self._lock:
            for key in keys:
                if key in self.live:
                    self._append((json.dumps({"d": key}) + "\n").encode())
                    self._drop(key)
                    n += 1
            if n:
                self._fh.flush()
                if self._bytes > self.max_bytes and 2 * self._dead >= self._bytes:
                    self._compact()
        return n

    def _compact(self) -> None:
        """Copy the live entries to a new file, then delete every older one (a kill in between
        leaves both, which read back the same)."""
        old = dict(self._files)
        live = {k: self._read(loc) for k, loc in self.live.items()}
        self._files = {}
        self._bytes = self._dead = 0
        self._open_current()
        for k, raw in live.items():
            self.live[k] = (self._cur, self._append(raw), len(raw))
        self._fh.flush()
        for path, fh in old.values():
            path.unlink(missing_ok=True)
            fh.close()

    def close(self) -> None:
        """Settle what was handed back; keep only the entries no caller got (one new file)."""
        with self._lock:
            keep = [self._read(loc) for k, loc in self.live.items() if k not in self.handed_keys]
            if keep:
                tmp = self.dir / f".tmp-{os.getpid()}-{time.time_ns()}.jsonl"
                with open(tmp, "wb") as fh:
                    fh.writelines(keep)
                os.replace(tmp, self.dir / f"journal-{time.time_ns():020d}-{os.getpid()}.jsonl")
            for path, fh in self._files.values():
                path.unlink(missing_ok=True)
                fh.close()
            self._files = {}
            self.live.clear()
            self.handed_keys.clear()


class _TokenBucket:
    """Async token bucket: ``per_minute / 60`` tokens a second, holding at most one second's
    worth (at least 1). Waiters are served in order (an ``asyncio.Lock``) and sleep exactly as
    long as the refill needs; a cost above the capacity waits for a full bucket and leaves a
    debt that later waiters pay. Used on the engine's loop only."""

    def __init__(self, per_minute: float, burst_s: float = 1.0) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self._t = time.monotonic()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    async def acquire(self, cost: float, sleep: Callable[[float], Awaitable[None]]) -> None:
        """Take ``cost`` tokens, waiting with ``sleep`` (which may raise) until there are enough."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                self._refill()
                need = min(cost, self.capacity)
                if self.level >= need - 1e-9:
                    self.level -= cost
                    return
                await sleep((need - self.level) / self.rate)

    def give_back(self, tokens: float) -> None:
        """Return ``tokens`` (negative: take more) after the real cost became known."""
        self._refill()
        self.level = min(self.capacity, self.level + tokens)


class _Response:
    """What the retry loop reads of an HTTP answer (status, headers, body text)."""

    __slots__ = ("headers", "status_code", "text")

    def __init__(self, status_code: int, headers: Any, text: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.text = text

    def json(self) -> Any:
        return json.loads(self.text)


class _Clients:
    """The chat-completions transport: one ``aiohttp`` session with ``concurrency`` connections.

    aiohttp, not httpx, for the requests themselves: measured at 256 slots on 2 cores
    (``benchmarks/generate_api.py``), httpx + httpcore spent a full core per few hundred requests
    a second (its pool scans every connection on each request) and kept 0.05 of the slots busy,
    a bare aiohttp loop 0.94. Created on the engine's loop (aiohttp needs a running loop)."""

    def __init__(self, concurrency: int, timeout_s: float, headers: dict[str, str]) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
            timeout=aiohttp.ClientTimeout(total=None, connect=min(30.0, timeout_s)),
            headers=headers,
        )

    async def post(self, url: str, json: Any) -> _Response:
        async with self._session.post(url, json=json) as r:
            return _Response(r.status, r.headers, await r.text(errors="replace"))

    async def aclose(self) -> None:
        await self._session.close()


class _Window:
    """Requests in flight, bounded by an AIMD window between 1 and ``limit``.

    :meth:`acquire` waits (FIFO) for a slot and returns the request's sequence number. A
    rate-limit answer to a request sent after the last cut halves the window
    (:meth:`on_rate_limited`); every window's worth of successes widens it by one. After
    :meth:`fail` every waiter and every later acquire raises that error. Loop-only.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = float(limit)
        self.min_size = float(limit)
        self.in_flight = 0
        self.cuts = 0
        self._ok = 0
        self._issued = 0
        self._cut_at = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._error: BaseException | None = None

    @property
    def slots(self) -> int:
        return max(1, int(self.size))

    async def acquire(self) -> int:
        if self._error is not None:
            raise self._error
        if self._waiters or self.in_flight >= self.slots:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self.release()  # granted, then cancelled: hand the slot on
                elif fut in self._waiters:
                    self._waiters.remove(fut)
                raise
        else:
            self.in_flight += 1
        self._issued += 1
        return self._issued

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.slots:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def on_success(self) -> None:
        if self.size < self.limit:
            self._ok += 1
            if self._ok >= self.size:
                self.size, self._ok = min(float(self.limit), self.size + 1), 0
                self._wake()

    def on_rate_limited(self, seq: int) -> bool:
        """Halve the window, unless request ``seq`` went out before the last cut; True if cut."""
        if seq <= self._cut_at:
            return False
        self.size = max(1.0, self.size * 0.5)
        self.min_size = min(self.min_size, self.size)
        self._cut_at, self._ok = self._issued, 0
        self.cuts += 1
        return True

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


class _LoopThread:
    """An asyncio loop on a daemon thread; coroutines are submitted from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="tracepipe-openai", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel what still runs (each caller waiting on a request wakes with CancelledError:
        a stage stopping on a fatal error must not leave threads waiting forever), then stop."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            for t in tasks:  # their errors went to their callers; do not log them again at exit
                if t.done() and not t.cancelled():
                    t.exception()

        if self.thread.is_alive():
            try:
                self.submit(cancel_all()).result(timeout=10)
            except Exception:  # noqa: BLE001 - best effort: the loop is going away
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


@register_engine("openai", OpenAIConfig)
class OpenAIEngine(Engine):
    """Chat generation against an OpenAI-compatible server (see the module docstring)."""

    config: OpenAIConfig

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self._fp: str | None = None
        self._fp_info: dict[str, Any] | None = None
        self._key: _Secret | None = None
        self._loop: _LoopThread | None = None
        self._client: Any = None
        self._window: _Window | None = None
        self._rpm: _TokenBucket | None = None
        self._tpm: _TokenBucket | None = None
        self._fatal: OpenAIFatalError | None = None
        self._fatal_event: asyncio.Event | None = None
        self._posts: set[asyncio.Future[Any]] = set()  # POSTs in flight (cancelled on a fatal error)
        self._pause_until = 0.0  # time.monotonic() before which no request is sent (Retry-After)
        self._last_ok = 0.0
        self._tok: Any = None
        self._journal: _Journal | None = None
        self._mode: str = "n+logprobs" if self.config.n_mode == "auto" else self.config.n_mode
        self._start_lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._stats: dict[str, float] = {}
        self._t_first: float | None = None  # first request sent
        self._t_last: float | None = None  # last answer (or failure) received
        self._t_busy_since: float | None = None  # since when >= 1 request is in flight
        self._busy = 0.0  # seconds with >= 1 request in flight, before _t_busy_since
        self._http_in_flight = 0
        self._reset_stats()

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.config.model!r}, base_url={self._display_url()!r})"

    _RUNTIME = ("_key", "_loop", "_client", "_window", "_rpm", "_tpm", "_fatal", "_fatal_event", "_tok", "_journal", "_meter")

    def __getstate__(self) -> dict[str, Any]:  # runtime state (key, client, loop, locks) never pickles
        state = dict(self.__dict__)
        for k in self._RUNTIME:
            state[k] = None
        for k in ("_start_lock", "_stats_lock"):
            state.pop(k, None)
        state["_started"] = False
        state["_posts"] = set()
        state["on_start"] = None  # the run's hook: never crosses a process boundary
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_lock = threading.RLock()
        self._stats_lock = threading.Lock()

    # -- counters ----------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = dict.fromkeys(
                ("requests", "ok_requests", "retries", "rate_limited", "prompt_tokens", "completion_tokens", "journal_hits"),
                0.0,
            )
            self._t_first = self._t_last = self._t_busy_since = None
            self._busy = 0.0
            self._http_in_flight = 0

    def _count(self, **inc: float) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                self._stats[k] += v

    @property
    def http_requests(self) -> int:
        """HTTP requests sent since start (attempts included)."""
        return int(self._stats["requests"])

    @property
    def retries(self) -> int:
        return int(self._stats["retries"])

    @property
    def journal_hits(self) -> int:
        return int(self._stats["journal_hits"])

    def capacity(self) -> int:
        """Requests this engine runs at once: ``concurrency`` (HTTP requests; the AIMD window
        may hold fewer in flight while the server rate-limits)."""
        return self.config.concurrency

    def usage(self) -> dict[str, float]:
        """Cumulative counters since :meth:`start`.

        ``requests`` (HTTP requests sent, retries included), ``ok_requests``, ``retries``,
        ``rate_limited`` (429 / 503 answers), ``prompt_tokens`` / ``completion_tokens`` (the
        servers' ``usage``), ``journal_hits``; ``seconds_active`` (first request sent to last
        answer, or to now while requests are in flight), ``seconds_busy`` (time with at least
        one request in flight), ``requests_per_s`` (``ok_requests / seconds_active``),
        ``tokens_per_s`` (``completion_tokens / seconds_active``), ``in_flight``, ``window``
        (the AIMD window now), ``window_min`` (its lowest so far), ``concurrency``.
        """
        now = time.monotonic()
        with self._stats_lock:
            out = dict(self._stats)
            first, last, in_flight = self._t_first, self._t_last, self._http_in_flight
            busy = self._busy + (now - self._t_busy_since if self._t_busy_since is not None else 0.0)
        end = now if in_flight else (last if last is not None else first)
        active = max(0.0, end - first) if first is not None and end is not None else 0.0
        win = self._window
        out.update(
            seconds_active=active,
            seconds_busy=busy,
            requests_per_s=out["ok_requests"] / active if active > 0 else 0.0,
            tokens_per_s=out["completion_tokens"] / active if active > 0 else 0.0,
            in_flight=float(in_flight),
            window=float(win.slots if win is not None else self.config.concurrency),
            window_min=float(max(1, int(win.min_size)) if win is not None else self.config.concurrency),
            concurrency=float(self.config.concurrency),
        )
        return out

    def _sent(self) -> None:
        now = time.monotonic()
        with self._stats_lock:
            self._stats["requests"] += 1
            if self._t_first is None:
                self._t_first = now
            if self._http_in_flight == 0:
                self._t_busy_since = now
            self._http_in_flight += 1

    def _answered(self) -> None:
        now = time.monotonic()
        with self._stats_lock:
            self._t_last = now
            self._http_in_flight -= 1
            if self._http_in_flight == 0 and self._t_busy_since is not None:
                self._busy += now - self._t_busy_since
                self._t_busy_since = None

    # -- secrets -----------------------------------------------------------------------------
    def _display_url(self) -> str:
        p = urlsplit(self.config.base_url)
        return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}{p.path}"

    def _scrub(self, text: str, secret: _Secret | None = None) -> str:
        secret = secret or self._key
        key = secret.get() if secret else None
        if not key:
            return text
        text = text.replace(key, "***")
        half = len(key) // 2
        for piece in (key[:half], key[half:]):
            if len(piece) >= 8:
                text = text.replace(piece, "***")
        return text

    def _read_key(self) -> _Secret | None:
        name = self.config.api_key_env
        if not name:
            return None
        value = os.environ.get(name)
        if not value:
            raise OpenAIEngineError(
                f"engine {self.config.model!r}: environment variable {name} (api_key_env) is not set or empty"
            )
        return _Secret(value.strip())

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            h["Authorization"] = f"Bearer {self._key.get()}"
        return h

    # -- fingerprint -------------------------------------------------------------------------
    def _output_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.config.extra_body:
            opts["extra_body"] = self.config.extra_body
        if self.config.chat_template_kwargs:
            opts["chat_template_kwargs"] = self.config.chat_template_kwargs
        return opts

    def fingerprint_info(self) -> dict[str, Any]:
        if self._fp_info is None:
            cfg = self.config
            info: dict[str, Any] = {"kind": "openai", "model": cfg.model}
            if cfg.fingerprint:
                info["pinned"] = cfg.fingerprint
            else:
                if cfg.revision:
                    info["revision"] = cfg.revision
                else:
                    info["server"] = self.server_model_info()
                if cfg.tokenizer:
                    info["tokenizer_hash"] = tokenizer_digest(self._resolve(cfg.tokenizer))
            opts = self._output_options()
            if opts:
                info["options"] = opts
            self._fp_info = info
        return dict(self._fp_info)

    def fingerprint(self) -> str:
        if self._fp is None:
            info = self.fingerprint_info()
            opts = info.get("options")
            if "pinned" in info:
                fp = str(info["pinned"])
            else:
                ident = {k: v for k, v in info.items() if k != "options"}
                fp = f"openai:{self.config.model}:{obj_hash(ident)}"
            if opts:
                fp += f"+opts:{obj_hash(opts, 8)}"
            self._fp = fp
        return self._fp

    def server_model_info(self) -> dict[str, Any]:
        """What ``GET /models`` reports for our model (id, root, max_model_len), once per process."""
        ck = (self.config.base_url, self.config.model)
        with _MODELS_LOCK:
            if ck not in _MODELS_CACHE:
                _MODELS_CACHE[ck] = self._query_models()
            return dict(_MODELS_CACHE[ck])

    def _query_models(self) -> dict[str, Any]:
        import httpx

        key = self._key or self._read_key()
        headers = {"Accept": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key.get()}"
        url = f"{self.config.base_url}/models"
        last = ""
        for attempt in range(3):
            try:
                r = httpx.get(url, headers=headers, timeout=min(30.0, self.config.timeout_s))
                if r.status_code == 200:
                    data = r.json().get("data") or []
                    ids = [m.get("id") for m in data]
                    for m in data:
                        if m.get("id") == self.config.model:
                            keep = ("id", "root", "max_model_len", "owned_by", "parent")
                            return {k: m[k] for k in keep if m.get(k) is not None}
                    raise OpenAIFatalError(
                        f"model {self.config.model!r} is not served at {self._display_url()} (it serves: {ids[:20]})", 404
                    )
                if r.status_code in (401, 403):
                    detail = self._scrub(self._error_detail(r), key)
                    raise self._fatal_for(r.status_code, detail, f"{self._display_url()}/models", key)
                last = f"HTTP {r.status_code}"
                if r.status_code < 500 and r.status_code != 429:
                    break
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(0.5 * 2**attempt)
        raise OpenAIEngineError(self._scrub(
            f"cannot fingerprint openai engine {self.config.model!r}: GET {self._display_url()}/models failed ({last}). "
            "Start the server, or pin `fingerprint:` (or `revision:`) in the engine config to plan offline."
        ))

    def _resolve(self, p: str) -> Path:
        ctx = self.ctx
        if ctx is not None and hasattr(ctx, "resolve_path"):
            return Path(ctx.resolve_path(p))
        return Path(p).expanduser()

    # -- lifecycle ---------------------------------------------------------------------------
    def ensure_started(self) -> None:
        if not self._started:
            self.start()

    def start(self) -> None:
        """Read the key, start the loop, client, limiters and journal (the subclass: its own
        transport). Idempotent and thread-safe: concurrent first calls start one client."""
        with self._start_lock:
            if self._started:
                return
            self._start()
            self._started = True
            if self.on_start is not None:
                self.on_start()

    def _begin_start(self) -> None:
        """What every start does first: read the key, check the options, reset the counters."""
        cfg = self.config
        self._key = self._read_key()
        if cfg.n_mode == "n+tokenizer" and not cfg.tokenizer:
            raise OpenAIEngineError("n_mode 'n+tokenizer' needs `tokenizer:` (a local tokenizer directory)")
        self._reset_stats()
        self._fatal = None

    def _start(self) -> None:
        cfg = self.config
        self._begin_start()
        self._pause_until = 0.0
        self._last_ok = time.monotonic()
        self._loop = _LoopThread()

        async def make() -> None:
            self._client = _Clients(cfg.concurrency, cfg.timeout_s, self._headers())
            self._window = _Window(cfg.concurrency)
            self._fatal_event = asyncio.Event()
            self._rpm = _TokenBucket(cfg.rpm) if cfg.rpm else None
            self._tpm = _TokenBucket(cfg.tpm) if cfg.tpm else None

        try:
            self._loop.submit(make()).result()
            if cfg.journal and self.ctx is not None and getattr(self.ctx, "workdir", None) is not None:
                jdir = Path(self.ctx.workdir) / "engines" / f"openai-{obj_hash(self.fingerprint(), 16)}"
                self._journal = _Journal(jdir)
                if self._journal.loaded:
                    log.info("openai engine: %d finished requests in the journal (%s)", self._journal.loaded, jdir)
        except BaseException:
            self._shutdown()
            raise

    def close(self) -> None:
        """Close the client and the loop; settle the journal (call it once the runtime has
        committed every result it was handed: those are forgotten)."""
        with self._start_lock:
            self._shutdown()
            self._started = False

    def _shutdown(self) -> None:
        if self._loop is not None:
            client = self._client

            async def shut() -> None:
                if client is not None:
                    await client.aclose()

            try:
                self._loop.submit(shut()).result(timeout=10)
            except Exception:  # pragma: no cover - best effort
                pass
            self._loop.stop()
        if self._journal is not None:
            self._journal.close()
        self._loop = self._client = self._journal = None
        self._window = self._rpm = self._tpm = self._fatal_event = None
        self._key = None

    def settle(self, requests: Iterable[GenerationRequest]) -> int:
        """Tell the engine these requests' results are committed: the journal forgets them (so
        its files stay small over a long stage). Optional: :meth:`close` settles whatever was
        handed back. Returns how many were journaled."""
        if self._journal is None:
            return 0
        return self._journal.settle([self.request_key(r) for r in requests])

    def tokenizer(self) -> Any:
        if not self.config.tokenizer:
            raise NotImplementedError("this openai engine has no `tokenizer:` configured")
        with self._start_lock:  # loaded once, whichever thread asks first
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(str(self._resolve(self.config.tokenizer)))
        return self._tok

    # -- requests ----------------------------------------------------------------------------
    def request_key(self, req: GenerationRequest) -> str:
        """Journal key of a request: teacher, messages, n, sampling (seed included), options."""
        return obj_hash({
            "fp": self.fingerprint(),
            "messages": req.messages,
            "n": req.n,
            "sampling": req.sampling.model_dump(mode="json"),
        }, 32)

    def _body(self, req: GenerationRequest, n: int, seed: int | None, logprobs: bool) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": req.messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            self.config.max_tokens_param: self._fit_max_tokens(s.max_tokens),
        }
        if n != 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.top_k not in (-1, 0):
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = 0
        if self.config.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(self.config.chat_template_kwargs)
        body.update(self.config.extra_body)
        return body

    def _fit_max_tokens(self, max_tokens: int) -> int:
        """At most the server's ``max_model_len`` when ``/v1/models`` reported it (vLLM then
        clamps to the room the prompt leaves)."""
        limit = ((self._fp_info or {}).get("server") or {}).get("max_model_len")
        return min(max_tokens, int(limit)) if isinstance(limit, int) and limit > 0 else max_tokens

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        b = self.config.backoff
        d = min(b.max, b.base * (2 ** min(attempt, 30)))
        delay = random.uniform(d / 2, d)
        if retry_after is not None:
            delay = max(delay, min(retry_after, b.retry_after_max))
        return delay

    # -- limits, fatal errors ------------------------------------------------------------------
    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _sleep(self, seconds: float) -> None:
        """``asyncio.sleep`` that ends at once (raising it) when the engine hits a fatal error."""
        self._check_fatal()
        if seconds <= 0 or self._fatal_event is None:
            return
        try:
            await asyncio.wait_for(self._fatal_event.wait(), seconds)
        except asyncio.TimeoutError:
            return
        self._check_fatal()

    async def _wait_pause(self) -> None:
        """Hold until the server's last ``Retry-After`` has passed."""
        while (wait := self._pause_until - time.monotonic()) > 0:
            await self._sleep(wait)

    def _set_fatal(self, exc: OpenAIFatalError) -> OpenAIFatalError:
        """Remember the first fatal error; wake every waiter with it. Returns the one to raise."""
        if self._fatal is None:
            self._fatal = exc
            log.error("openai engine: %s; failing every request of this engine", exc)
            if self._fatal_event is not None:
                self._fatal_event.set()
            if self._window is not None:
                self._window.fail(exc)
            for post in list(self._posts):  # the requests in flight end now, with this error
                post.cancel()
        return self._fatal

    def _fatal_for(self, code: int, detail: str, where: str, secret: _Secret | None = None) -> OpenAIFatalError:
        """The error of an answer no retry can fix (401/403: key, 404: model or endpoint)."""
        said = f": {detail[:300]}" if detail else ""
        if code in (401, 403):
            env = self.config.api_key_env
            fix = (
                f"check the key in the environment variable {env} (api_key_env)" if env
                else "no key was sent: export one and name its variable with `api_key_env: NAME`"
            )
            msg = f"openai engine {self.config.model!r}: {where} refused the API key (HTTP {code}{said}); {fix}"
        elif code == 429:
            msg = (f"openai engine {self.config.model!r}: {where}: the account's quota is exhausted (HTTP 429{said}); "
                   "add credit or raise the limit, then run again")
        else:
            msg = (f"openai engine: {where} answered HTTP {code} for model {self.config.model!r}: no such model or "
                   f"endpoint{said}; check `model` and `base_url` ({self._display_url()})")
        return OpenAIFatalError(self._scrub(msg, secret), code, self._scrub(detail, secret))

    def _error_detail(self, resp: Any) -> str:
        """The server's error message in ``resp`` (scrubbed of the key)."""
        detail = self._scrub(resp.text[:2000])
        try:
            err = resp.json().get("error")
            detail = self._scrub(str(err.get("message") if isinstance(err, dict) else err or resp.text)[:2000])
        except (ValueError, AttributeError):
            pass
        return detail

    @staticmethod
    def _token_cost(body: dict[str, Any], max_tokens_param: str) -> float:
        """``tpm`` reservation of a request: prompt ``len(json) // 4`` + ``max_tokens * n``."""
        prompt = len(json.dumps(body.get("messages"), ensure_ascii=False)) // 4
        return float(prompt + int(body.get(max_tokens_param) or 0) * int(body.get("n") or 1))

    def _on_ok(self, data: dict[str, Any], cost: float) -> None:
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self._count(ok_requests=1, prompt_tokens=pt, completion_tokens=ct)
        self.meter().charge(prompt_tokens=pt, completion_tokens=ct)  # spend: the provider's usage
        self._last_ok = time.monotonic()
        if self._window is not None:
            self._window.on_success()
        if self._tpm is not None and (pt or ct):
            self._tpm.give_back(cost - (pt + ct))

    def _on_rate_limited(self, seq: int, code: int, retry_after: float | None) -> None:
        self._count(rate_limited=1)
        win = self._window
        if win is not None:
            before = win.slots
            if win.on_rate_limited(seq):
                log.warning(
                    "openai engine: rate limited (HTTP %d) by %s; requests in flight at most %d (was %d)",
                    code, self._display_url(), win.slots, before,
                )
        if retry_after is not None:
            wait = min(retry_after, self.config.backoff.retry_after_max)
            self._pause_until = max(self._pause_until, time.monotonic() + wait)

    async def _send(self, url: str, body: dict[str, Any]) -> Any:
        """POST ``body``; raises :class:`asyncio.TimeoutError` after ``timeout_s`` and the fatal
        error as soon as another request hits one (:meth:`_set_fatal` cancels every POST in
        flight: one task a request, no second waiter per request)."""
        assert self._client is not None
        post = asyncio.ensure_future(self._client.post(url, json=body))
        self._posts.add(post)
        self._sent()
        try:
            return await asyncio.wait_for(post, self.config.timeout_s)
        except asyncio.CancelledError:
            if self._fatal is not None:  # cancelled by _set_fatal, not by our caller
                raise self._fatal from None
            raise
        finally:
            self._posts.discard(post)
            self._answered()

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a chat completion: window slot, Retry-After pause, rpm / tpm tokens, then the
        request, retried as the module docs say."""
        import aiohttp

        assert self._window is not None
        url = f"{self.config.base_url}/chat/completions"
        where = f"{self._display_url()}/chat/completions"
        cost = self._token_cost(body, self.config.max_tokens_param) if self._tpm is not None else 0.0
        tries = budgeted = 0
        limited_since: float | None = None
        while True:
            self._check_fatal()
            seq = await self._window.acquire()
            retry_after: float | None = None
            code = 0
            took_tokens = False
            try:
                await self._wait_pause()
                if self._rpm is not None:
                    await self._rpm.acquire(1, self._sleep)
                if self._tpm is not None:
                    await self._tpm.acquire(cost, self._sleep)
                    took_tokens = True
                self._check_fatal()
                tries += 1
                try:
                    resp = await self._send(url, body)
                except (asyncio.TimeoutError, TimeoutError):
                    reason = f"timeout after {self.config.timeout_s:g}s"
                except (aiohttp.ClientError, OSError) as e:
                    reason = f"connection error ({type(e).__name__})"
                else:
                    code = resp.status_code
                    if code == 200:
                        try:
                            data = resp.json()
                        except ValueError:
                            data = None
                        if isinstance(data, dict) and data.get("choices"):
                            self._on_ok(data, cost)
                            took_tokens = False
                            return data
                        reason = "HTTP 200 without choices"
                        snippet = self._scrub(resp.text[:300])
                        if not (isinstance(data, dict) and "error" in data):
                            raise OpenAIEngineError(f"{self._display_url()}: {reason}: {snippet}", code)
                    elif code in FATAL_STATUS:
                        raise self._set_fatal(self._fatal_for(code, self._error_detail(resp), where))
                    elif code == 429 and _QUOTA.search(resp.text[:2000]):
                        raise self._set_fatal(self._fatal_for(code, self._error_detail(resp), where))
                    elif code in RETRY_STATUS or code >= 500:
                        reason = f"HTTP {code}"
                        if code in RATE_LIMIT_STATUS:
                            retry_after = _retry_after(resp.headers)
                            self._on_rate_limited(seq, code, retry_after)
                    else:
                        detail = self._error_detail(resp)
                        raise OpenAIEngineError(f"{where}: HTTP {code}: {detail[:500]}", code, detail)
            finally:
                self._window.release()
                if took_tokens and code not in (0, 200) and self._tpm is not None:
                    self._tpm.give_back(cost)  # answered, but not served: the tokens were not used
            now = time.monotonic()
            if code == 429:  # no count limit while the engine makes progress
                limited_since = limited_since if limited_since is not None else now
                stalled = now - max(limited_since, self._last_ok)
                if stalled > self.config.rate_limit_timeout_s:
                    raise self._set_fatal(OpenAIFatalError(
                        f"openai engine {self.config.model!r}: {where} rate-limited every request (HTTP 429) for "
                        f"{stalled:.0f}s and none succeeded; gave up (rate_limit_timeout_s). Lower `concurrency` "
                        "or set `rpm` / `tpm` to the account's limits", 429,
                    ))
            elif budgeted >= self.config.max_retries:
                raise OpenAIEngineError(f"{where}: gave up after {tries} attempts; last: {reason}")
            else:
                budgeted += 1
            delay = self._backoff(tries - 1, retry_after)
            self._count(retries=1)
            level = logging.DEBUG if code in RATE_LIMIT_STATUS else logging.WARNING
            log.log(
                level, "openai engine: %s from %s; retry %d (%d/%d counted) in %.2fs",
                reason, self._display_url(), tries, budgeted, self.config.max_retries, delay,
            )
            await self._sleep(delay)

    @staticmethod
    def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))

    def _parse(self, data: dict[str, Any], counts: str) -> list[Completion]:
        """Completions of one response; ``counts``: usage | logprobs | tokenizer."""
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total = usage.get("completion_tokens")
        choices = self._choices(data)
        out: list[Completion] = []
        for ch in choices:
            msg = ch.get("message") or {}
            reasoning = msg.get("reasoning")
            if reasoning is None:
                reasoning = msg.get("reasoning_content")
            out.append(Completion(
                text=msg.get("content") or "",
                finish_reason=ch.get("finish_reason") or "unknown",
                prompt_tokens=prompt_tokens,
                completion_tokens=0,
                reasoning=reasoning,
            ))
        if len(out) == 1 and total is not None:
            out[0].completion_tokens = int(total)
            return out
        counted: list[int | None] = [None] * len(out)
        if counts == "logprobs":
            for i, ch in enumerate(choices):
                lp = (ch.get("logprobs") or {}).get("content")
                if lp is not None:
                    counted[i] = len(lp)
        if any(c is None for c in counted) and self.config.tokenizer:
            tok = self.tokenizer()
            for i, c in enumerate(out):
                if counted[i] is None:
                    n = len(tok.encode(c.text, add_special_tokens=False))
                    if c.reasoning:
                        n += len(tok.encode(c.reasoning, add_special_tokens=False))
                    counted[i] = n
        if any(c is None for c in counted):
            # the server gave neither per-choice logprobs nor have we a tokenizer: split the total
            # in proportion to the text (an estimate, logged once; the total stays exact)
            if not getattr(self, "_warned_split", False):
                log.warning("openai engine: per-choice completion tokens estimated from the aggregated usage")
                self._warned_split = True
            lens = [len(c.text) + len(c.reasoning or "") for c in out]
            tot = int(total or 0)
            s = sum(lens) or 1
            est = [tot * x // s for x in lens]
            if est:
                est[-1] += tot - sum(est)
            counted = [e if c is None else c for e, c in zip(est, counted)]
        for c, n in zip(out, counted):
            c.completion_tokens = int(n or 0)
        return out

    async def _separate(self, req: GenerationRequest, first: int, count: int) -> list[Completion]:
        seed = req.sampling.seed
        coros = [
            self._post(self._body(req, 1, None if seed is None else seed + first + i, False))
            for i in range(count)
        ]
        results = await asyncio.gather(*coros)
        out: list[Completion] = []
        for data in results:
            out.extend(self._parse(data, "usage")[:1])
        return out

    async def _native(self, req: GenerationRequest, mode: str) -> list[Completion]:
        data = await self._post(self._body(req, req.n, req.sampling.seed, mode == "n+logprobs"))
        comps = self._parse(data, "logprobs" if mode == "n+logprobs" else "tokenizer")[: req.n]
        if len(comps) < req.n:  # the server ignored n: ask for the rest one by one
            comps += await self._separate(req, len(comps), req.n - len(comps))
        return comps

    async def _one(self, req: GenerationRequest) -> list[Completion]:
        """Completions of one request; context-window errors become a clamp or ``prompt_too_long``."""
        for _ in range(3):
            try:
                return await self._sample(req)
            except OpenAIEngineError as e:
                what = self._context_error(e, req)
                if what is None:
                    raise
                kind, value = what
                if kind == "too_long":
                    return [Completion("", PROMPT_TOO_LONG, value, 0) for _ in range(req.n)]
                log.info("openai engine: max_tokens %d does not fit the context; asking for %d", req.sampling.max_tokens, value)
                req = dataclasses.replace(req, sampling=req.sampling.model_copy(update={"max_tokens": value}))
        return await self._sample(req)

    @staticmethod
    def _context_error(e: OpenAIEngineError, req: GenerationRequest) -> tuple[str, int] | None:
        if e.status not in (400, 413, 422) or not e.detail:
            return None
        return classify_context_error(e.detail, req.sampling.max_tokens)

    async def _sample(self, req: GenerationRequest) -> list[Completion]:
        if req.n < 1:
            return []
        if req.n == 1:
            data = await self._post(self._body(req, 1, req.sampling.seed, False))
            return self._parse(data, "usage")[:1]
        mode = self._mode
        if self.config.n_mode != "auto":
            return await (self._separate(req, 0, req.n) if mode == "separate" else self._native(req, mode))
        chain = ["n+logprobs", "n+tokenizer", "separate"]
        if not self.config.tokenizer:
            chain.remove("n+tokenizer")
        chain = chain[chain.index(mode):]
        first_err: OpenAIEngineError | None = None
        for m in chain:
            try:
                comps = await (self._separate(req, 0, req.n) if m == "separate" else self._native(req, m))
            except OpenAIEngineError as e:
                if e.status not in FALLBACK_STATUS or self._context_error(e, req) is not None:
                    raise
                first_err = first_err or e
                continue
            if m != self._mode:
                log.warning("openai engine: server refused %r (HTTP %s); using %r from now on", self._mode, first_err and first_err.status, m)
                self._mode = m
            return comps
        assert first_err is not None
        raise first_err

    async def _one_journaled(self, key: str, req: GenerationRequest, held: Reservation) -> list[Completion]:
        try:
            comps = await self._one(req)
        finally:
            held.release()
        self.meter().charge(requests=1)
        if self._journal is not None:
            self._journal.put(key, comps)
        return comps

    # -- public API --------------------------------------------------------------------------
    def generate_iter(
        self, requests: list[GenerationRequest], *, return_exceptions: bool = False
    ) -> Iterator[tuple[int, list[Completion] | BaseException]]:
        """Yield ``(index, completions)`` as requests finish (journal hits first).

        With ``return_exceptions`` a failed request yields ``(index, exception)`` and the others
        go on; without it the first failure cancels the rest and raises. A fatal error
        (:class:`OpenAIFatalError`: key refused, no such model) is always raised. Closing the
        iterator early cancels the requests still in flight. Safe to call from many threads at
        once. Every yielded result counts as handed to the caller: it stays in the journal until
        :meth:`settle` or :meth:`close`, so a kill before the caller commits it costs nothing.
        """
        for i, key, res in self._iter(requests, return_exceptions):
            journal = self._journal
            if journal is not None and not isinstance(res, BaseException):
                journal.handed(key)
            yield i, res

    def _iter(
        self, requests: list[GenerationRequest], return_exceptions: bool
    ) -> Iterator[tuple[int, str, list[Completion] | BaseException]]:
        try:
            self.ensure_started()
        except OpenAIEngineError as e:  # no key, say: nothing can be sent
            if isinstance(e, EngineFatalError):
                raise
            raise OpenAIFatalError(str(e), e.status, e.detail) from None
        self._check_fatal()
        loop, journal = self._loop, self._journal
        assert loop is not None
        done: queue.Queue[tuple[int, str, concurrent.futures.Future[Any]]] = queue.Queue()
        futures: list[concurrent.futures.Future[Any]] = []
        hits: list[tuple[int, str, list[Completion]]] = []
        refused: list[tuple[int, str, BudgetExceeded]] = []  # a budget stops dispatching (tracepipe.spend)
        for i, req in enumerate(requests):
            key = self.request_key(req)
            cached = journal.get(key) if journal is not None else None
            if cached is not None and len(cached) == req.n:
                hits.append((i, key, cached))
                continue
            try:
                held = self.reserve([req])  # in the caller's thread: counting prompt tokens stays off the loop
            except BudgetExceeded as e:
                refused.append((i, key, e))
                continue
            fut = loop.submit(self._one_journaled(key, req, held))
            fut.add_done_callback(lambda f, i=i, key=key: done.put((i, key, f)))
            futures.append(fut)
        try:
            for i, key, comps in hits:
                self._count(journal_hits=1)
                yield i, key, comps
            for i, key, refusal in refused if return_exceptions else ():
                yield i, key, refusal
            for _ in range(len(futures)):
                i, key, fut = done.get()
                exc = fut.exception() if not fut.cancelled() else concurrent.futures.CancelledError()
                if exc is not None:
                    if not return_exceptions or isinstance(exc, EngineFatalError):
                        raise exc
                    yield i, key, exc
                    continue
                yield i, key, fut.result()
            if refused and not return_exceptions:  # what was dispatched has finished: now stop
                raise refused[0][2]
        finally:
            for fut in futures:
                fut.cancel()

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Completions for every request, in order; raises the first failure after all finish
        (a fatal error at once). Safe to call from many threads at once.

        Every request that succeeded is journaled before the raise (and not handed, since the
        caller got nothing), so when the executor bisects the batch, or the run is started
        again, only the failing requests are sent again.
        """
        out: list[list[Completion] | None] = [None] * len(requests)
        keys: list[str] = []
        first: BaseException | None = None
        for i, key, res in self._iter(requests, return_exceptions=True):
            if isinstance(res, BaseException):
                first = first or res
            else:
                out[i] = res
                keys.append(key)
        if first is not None:
            raise first
        journal = self._journal
        if journal is not None:
            for key in keys:
                journal.handed(key)
        done = [o or [] for o in out]
        self.check_context(done, "the server's context")
        return done
