"""``openai`` engine: any OpenAI-compatible chat server (vLLM and SGLang servers, hosted APIs).

Recipe::

    engines:
      api:
        kind: openai
        base_url: http://127.0.0.1:8000/v1
        model: my-teacher                 # the id the server serves (``/v1/models``)
        api_key_env: TEACHER_API_KEY      # NAME of the environment variable; never the key
        concurrency: 64                   # requests in flight at once
        timeout_s: 600                    # per HTTP request, end to end
        max_retries: 8                    # on 429, 5xx, timeouts and connection errors
        backoff: {base: 1.0, max: 60.0}   # exponential, with jitter; Retry-After is honoured
        chat_template_kwargs: {enable_thinking: true}
        extra_body: {repetition_penalty: 1.05}

How it works:

- **Client.** ``httpx.AsyncClient`` (a core dependency) on one background event loop per engine,
  so the sync :meth:`OpenAIEngine.generate` works from any thread, even one that already runs a
  loop. httpx rather than the ``openai`` SDK: one retry policy that we own (the SDK retries on its
  own, with its own backoff and without our request counting), the raw JSON (``reasoning`` /
  ``reasoning_content`` are not SDK fields), and no extra dependency.
- **Concurrency.** An ``asyncio.Semaphore(concurrency)`` bounds the HTTP requests in flight (the
  backoff sleeps do not hold a slot).
- **Retries.** 408, 409, 425, 429, every 5xx, timeouts and connection errors are retried up to
  ``max_retries`` times after ``uniform(d/2, d)`` seconds, ``d = min(backoff.max, backoff.base *
  2**attempt)``; a ``Retry-After`` / ``retry-after-ms`` header raises the wait to what the server
  asks (capped by ``backoff.retry_after_max``). Other 4xx fail at once.
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
  there is answered from it, never sent again: a run killed mid-batch (even ``kill -9``) pays for
  no finished request twice, and a batch the executor bisects after an error re-sends only the
  failed requests. Results a ``generate`` call returned are settled (dropped from the journal)
  when the next call starts, since the runner commits a batch before it asks for the next one;
  :meth:`close` settles the rest, so the journal holds only work in flight.
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
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracepipe.engines import register_engine
from tracepipe.engines.base import Completion, Engine, EngineConfig, GenerationRequest

log = logging.getLogger("tracepipe.engines.openai")

RETRY_STATUS = frozenset({408, 409, 425, 429})
FALLBACK_STATUS = frozenset({400, 422})
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)


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
    concurrency: int = Field(16, ge=1, description="HTTP requests in flight at once")
    timeout_s: float = Field(600.0, gt=0, description="per HTTP request, end to end")
    max_retries: int = Field(6, ge=0, description="retries on 429 / 5xx / timeouts / connection errors")
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


PROMPT_TOO_LONG = "prompt_too_long"  # finish_reason of a prompt the server's context cannot hold
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


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _hash(obj: Any, n: int = 16) -> str:
    import xxhash

    data = obj if isinstance(obj, bytes) else _canonical(obj).encode("utf-8")
    return xxhash.xxh3_128_hexdigest(data)[:n]


def tokenizer_hash(path: str | Path) -> str:
    """Hash of a local tokenizer directory's files (vocab, merges, config, chat template)."""
    p = Path(path)
    files = [p] if p.is_file() else [p / f for f in TOKENIZER_FILES if (p / f).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files under {p}")
    import xxhash

    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


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
    its result is known to be committed: results handed back by one ``generate`` call are
    settled at the start of the next call (the runner commits a batch before it asks for the
    next one) and at :meth:`close`. Reading skips settled entries, so memory holds only the
    unsettled ones (plus a bounded cache of recent ones, for a batch the executor bisects).
    Each process writes its own ``journal-<ns>-<pid>.jsonl`` under an exclusive ``flock``; a new
    engine reads (and finally deletes) only files no live process holds. A file past
    ``max_bytes`` is rewritten with the unsettled entries only.
    """

    def __init__(self, directory: Path, recent: int = 8192, max_bytes: int = 256 << 20) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.recent: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.recent_max = recent
        self.max_bytes = max_bytes
        self._handed: list[str] = []
        self._old: list[tuple[Path, Any]] = []
        self._lock = threading.Lock()
        for p in sorted(self.dir.glob("journal-*.jsonl")):
            fh = open(p, "r+", encoding="utf-8")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live engine is writing it
                fh.close()
                continue
            for line in fh:
                try:
                    rec = json.loads(line)
                    if "d" in rec:
                        self.pending.pop(rec["d"], None)
                    else:
                        self.pending[rec["k"]] = rec["c"]
                except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                    break
            self._old.append((p, fh))
        self.loaded = len(self.pending)
        self.path, self._fh = self._new_file()

    def _new_file(self) -> tuple[Path, Any]:
        path = self.dir / f"journal-{time.time_ns():020d}-{os.getpid()}.jsonl"
        fh = open(path, "a", encoding="utf-8")
        fcntl.flock(fh, fcntl.LOCK_EX)
        return path, fh

    def get(self, key: str) -> list[Completion] | None:
        with self._lock:
            rec = self.pending.get(key)
            if rec is None:
                rec = self.recent.get(key)
        return None if rec is None else [Completion(**c) for c in rec]

    def put(self, key: str, comps: list[Completion]) -> None:
        rec = [_completion_to_dict(c) for c in comps]
        line = json.dumps({"k": key, "c": rec}, ensure_ascii=False) + "\n"
        with self._lock:
            self.pending[key] = rec
            self._fh.write(line)
            self._fh.flush()  # in the OS page cache: survives kill -9 of this process

    def handed(self, key: str) -> None:
        """``key``'s result went to the caller (settled by the next :meth:`settle`)."""
        with self._lock:
            self._handed.append(key)

    def settle(self) -> None:
        """Mark everything handed back so far as committed; rotate a big file."""
        with self._lock:
            if not self._handed:
                return
            for key in self._handed:
                self._fh.write(json.dumps({"d": key}) + "\n")
                rec = self.pending.pop(key, None)
                if rec is not None:
                    self.recent[key] = rec
                    self.recent.move_to_end(key)
            self._handed.clear()
            while len(self.recent) > self.recent_max:
                self.recent.popitem(last=False)
            self._fh.flush()
            if self._fh.tell() > self.max_bytes:
                old_path, old_fh = self.path, self._fh
                self.path, self._fh = self._new_file()
                self._write_pending(self._fh)
                old_fh.close()
                old_path.unlink(missing_ok=True)
                for p, fh in self._old:
                    p.unlink(missing_ok=True)
                    fh.close()
                self._old = []

    def _write_pending(self, fh: Any) -> None:
        for k, v in self.pending.items():
            fh.write(json.dumps({"k": k, "c": v}, ensure_ascii=False) + "\n")
        fh.flush()

    def close(self) -> None:
        """Settle what was handed back; keep only unsettled entries (one new file), if any."""
        self.settle()
        with self._lock:
            if self.pending:
                tmp = self.dir / f".tmp-{os.getpid()}-{time.time_ns()}.jsonl"
                with open(tmp, "w", encoding="utf-8") as fh:
                    self._write_pending(fh)
                os.replace(tmp, self.dir / f"journal-{time.time_ns():020d}-{os.getpid()}.jsonl")
            self._fh.close()
            self.path.unlink(missing_ok=True)
            for p, fh in self._old:
                p.unlink(missing_ok=True)
                fh.close()
            self._old = []
            self.recent.clear()


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
        self._sem: asyncio.Semaphore | None = None
        self._tok: Any = None
        self._journal: _Journal | None = None
        self._mode: str = "n+logprobs" if self.config.n_mode == "auto" else self.config.n_mode
        #: HTTP requests sent (attempts included), for stats and tests
        self.http_requests = 0
        self.retries = 0
        self.journal_hits = 0

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.config.model!r}, base_url={self._display_url()!r})"

    def __getstate__(self) -> dict[str, Any]:  # runtime state (key, client, loop) never pickles
        state = dict(self.__dict__)
        for k in ("_key", "_loop", "_client", "_sem", "_tok", "_journal"):
            state[k] = None
        state["_started"] = False
        return state

    # -- secrets -----------------------------------------------------------------------------
    def _display_url(self) -> str:
        p = urlsplit(self.config.base_url)
        return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}{p.path}"

    def _scrub(self, text: str) -> str:
        key = self._key.get() if self._key else None
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
                    info["tokenizer_hash"] = tokenizer_hash(self._resolve(cfg.tokenizer))
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
                fp = f"openai:{self.config.model}:{_hash(ident)}"
            if opts:
                fp += f"+opts:{_hash(opts, 8)}"
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
                    raise OpenAIEngineError(
                        f"model {self.config.model!r} is not served at {self._display_url()} (it serves: {ids[:20]})"
                    )
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
    def start(self) -> None:
        if self._started:
            return
        import httpx

        self._key = self._read_key()
        self._loop = _LoopThread()
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
        timeout = httpx.Timeout(self.config.timeout_s, connect=min(30.0, self.config.timeout_s))

        async def make() -> None:
            self._client = httpx.AsyncClient(limits=limits, timeout=timeout, headers=self._headers())
            self._sem = asyncio.Semaphore(self.config.concurrency)

        self._loop.submit(make()).result()
        if self.config.n_mode == "n+tokenizer" and not self.config.tokenizer:
            raise OpenAIEngineError("n_mode 'n+tokenizer' needs `tokenizer:` (a local tokenizer directory)")
        if self.config.journal and self.ctx is not None and getattr(self.ctx, "workdir", None) is not None:
            jdir = Path(self.ctx.workdir) / "engines" / f"openai-{_hash(self.fingerprint(), 16)}"
            self._journal = _Journal(jdir)
            if self._journal.loaded:
                log.info("openai engine: %d finished requests in the journal (%s)", self._journal.loaded, jdir)
        self._started = True

    def close(self) -> None:
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
        self._loop = self._client = self._sem = self._journal = None
        self._key = None
        self._started = False

    def tokenizer(self) -> Any:
        if not self.config.tokenizer:
            raise NotImplementedError("this openai engine has no `tokenizer:` configured")
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self._resolve(self.config.tokenizer)))
        return self._tok

    # -- requests ----------------------------------------------------------------------------
    def request_key(self, req: GenerationRequest) -> str:
        """Journal key of a request: teacher, messages, n, sampling (seed included), options."""
        return _hash({
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
        d = min(b.max, b.base * (2**attempt))
        delay = random.uniform(d / 2, d)
        if retry_after is not None:
            delay = max(delay, min(retry_after, b.retry_after_max))
        return delay

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        assert self._client is not None and self._sem is not None
        url = f"{self.config.base_url}/chat/completions"
        attempt = 0
        while True:
            retry_after: float | None = None
            async with self._sem:
                self.http_requests += 1
                try:
                    resp = await asyncio.wait_for(self._client.post(url, json=body), self.config.timeout_s)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    reason = f"timeout after {self.config.timeout_s:g}s"
                except httpx.TransportError as e:
                    reason = f"connection error ({type(e).__name__})"
                else:
                    code = resp.status_code
                    if code == 200:
                        try:
                            data = resp.json()
                        except ValueError:
                            data = None
                        if isinstance(data, dict) and data.get("choices"):
                            return data
                        reason = "HTTP 200 without choices"
                        snippet = self._scrub(resp.text[:300])
                        if not (isinstance(data, dict) and "error" in data):
                            raise OpenAIEngineError(f"{self._display_url()}: {reason}: {snippet}", code)
                    elif code in RETRY_STATUS or code >= 500:
                        reason = f"HTTP {code}"
                        retry_after = _retry_after(resp.headers)
                    else:
                        detail = self._scrub(resp.text[:2000])
                        try:
                            err = resp.json().get("error")
                            detail = self._scrub(str(err.get("message") if isinstance(err, dict) else err or resp.text)[:2000])
                        except (ValueError, AttributeError):
                            pass
                        raise OpenAIEngineError(
                            f"{self._display_url()}/chat/completions: HTTP {code}: {detail[:500]}", code, detail
                        )
            if attempt >= self.config.max_retries:
                raise OpenAIEngineError(
                    f"{self._display_url()}/chat/completions: gave up after {attempt + 1} attempts; last: {reason}"
                )
            delay = self._backoff(attempt, retry_after)
            self.retries += 1
            log.warning(
                "openai engine: %s from %s; retry %d/%d in %.2fs",
                reason, self._display_url(), attempt + 1, self.config.max_retries, delay,
            )
            await asyncio.sleep(delay)
            attempt += 1

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

    async def _one_journaled(self, key: str, req: GenerationRequest) -> list[Completion]:
        comps = await self._one(req)
        if self._journal is not None:
            self._journal.put(key, comps)
        return comps

    # -- public API --------------------------------------------------------------------------
    def generate_iter(
        self, requests: list[GenerationRequest], *, return_exceptions: bool = False
    ) -> Iterator[tuple[int, list[Completion] | BaseException]]:
        """Yield ``(index, completions)`` as requests finish (journal hits first).

        With ``return_exceptions`` a failed request yields ``(index, exception)`` and the others
        go on; without it the first failure cancels the rest and raises. Closing the iterator
        early cancels the requests still in flight. Every yielded result counts as handed to the
        caller: the next call (or :meth:`close`) settles it in the journal, so commit what you
        got before asking for more.
        """
        for i, key, res in self._iter(requests, return_exceptions):
            if self._journal is not None and not isinstance(res, BaseException):
                self._journal.handed(key)
            yield i, res

    def _iter(
        self, requests: list[GenerationRequest], return_exceptions: bool
    ) -> Iterator[tuple[int, str, list[Completion] | BaseException]]:
        self.ensure_started()
        assert self._loop is not None
        if self._journal is not None:
            self._journal.settle()  # what earlier calls returned is committed by now
        done: queue.Queue[tuple[int, str, concurrent.futures.Future[Any]]] = queue.Queue()
        futures: list[concurrent.futures.Future[Any]] = []
        hits: list[tuple[int, str, list[Completion]]] = []
        for i, req in enumerate(requests):
            key = self.request_key(req)
            cached = self._journal.get(key) if self._journal is not None else None
            if cached is not None and len(cached) == req.n:
                hits.append((i, key, cached))
                continue
            fut = self._loop.submit(self._one_journaled(key, req))
            fut.add_done_callback(lambda f, i=i, key=key: done.put((i, key, f)))
            futures.append(fut)
        try:
            for i, key, comps in hits:
                self.journal_hits += 1
                yield i, key, comps
            for _ in range(len(futures)):
                i, key, fut = done.get()
                exc = fut.exception() if not fut.cancelled() else concurrent.futures.CancelledError()
                if exc is not None:
                    if not return_exceptions:
                        raise exc
                    yield i, key, exc
                    continue
                yield i, key, fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Completions for every request, in order; raises the first failure after all finish.

        Every request that succeeded is journaled before the raise (and stays unsettled, since
        the caller got nothing), so when the executor bisects the batch, or the run is started
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
        if self._journal is not None:
            for key in keys:
                self._journal.handed(key)
        return [o or [] for o in out]
