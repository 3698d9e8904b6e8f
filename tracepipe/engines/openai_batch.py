"""``openai-batch`` engine: the OpenAI Batch API, spoken by OpenAI and other hosted providers, at about
half the online price.

Recipe (every key of the ``openai`` engine works too; switching ``kind`` between ``openai`` and
``openai-batch`` keeps the fingerprint, so every committed row is reused)::

    engines:
      teacher:
        kind: openai-batch
        base_url: https://api.openai.com/v1
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY          # NAME of the environment variable; never the key
        max_requests_per_batch: 50000        # the provider's limit of requests per job
        max_batch_bytes: 200000000           # the provider's limit of an input file (bytes)
        max_jobs_in_flight: 16               # jobs submitted and not finished, at most
        completion_window: 24h
        poll_s: 30                           # seconds between two polls of a job
        gather_s: 5                          # a job that is not full waits this long for more requests
        max_resubmits: 3                     # failed / expired requests are sent again this often

How it works:

- **Requests.** Each chat request is built exactly as the ``openai`` engine builds it
  (:meth:`~tracepipe.engines.openai.OpenAIEngine._body`: same model, sampling, seed, reasoning
  options, ``extra_body``) and becomes one line of a JSONL file (``custom_id``: the request's
  journal key and sample index). ``n`` samples are ``n`` lines with seeds ``seed, seed+1, ...``
  (what the ``openai`` engine and vLLM do), unless ``n_mode`` asks for ``n`` in one line.
  Answers are parsed by the ``openai`` engine's parser (``reasoning`` / ``reasoning_content``,
  ``usage``).
- **Jobs.** Callers (the stage's streaming threads, see :meth:`capacity`) queue requests; a
  driver thread cuts the queue into jobs of at most ``max_requests_per_batch`` lines and
  ``max_batch_bytes`` bytes (a job that is not full leaves after ``gather_s``), uploads each
  (``POST /files``, ``purpose=batch``), creates the batch (``POST /batches``, with ``metadata:
  {tracepipe_job: <id>}``), polls it (``GET /batches/{id}``) and, once it ends, downloads its
  output and error files (``GET /files/{id}/content``). At most ``max_jobs_in_flight`` jobs run
  at once. A caller returns when its requests are answered: the stage sees completions as the
  jobs finish, and the runtime commits them then.
- **Failures.** A request whose job failed, expired or was cancelled, or that answered 5xx / 429
  / 408, goes back to the queue and is sent again alone (only it, in a later job), at most
  ``max_resubmits`` times; then, as a 4xx that no retry fixes, it fails and its row is
  quarantined (and retried on the next run, not again in this one). 401 / 403 / 404 are fatal
  (the stage stops), as with ``openai``. A prompt the context cannot hold gives ``n`` empty
  completions with ``finish_reason = "prompt_too_long"``; a ``max_tokens`` that does not fit is
  sent again with what fits.
- **Journal, re-attach.** ``<workdir>/engines/openai-batch-<fp>/`` holds ``jobs-*.jsonl`` (each
  job's custom ids before its upload, then its file id, its batch id right after the create, and
  ``done`` once its results are journaled) and the ``openai`` engine's result journal (one entry
  per answered line). A run killed at any point (``kill -9`` included) re-attaches to the jobs it
  submitted: it polls them and collects their results instead of submitting their requests again;
  a job whose create was in flight at the kill is looked up by its ``metadata``. A request is
  never in two live jobs. Results stay journaled until their rows are committed.
- **Progress.** :meth:`usage` counts jobs (``jobs_running``, ``jobs_completed``, ``jobs_expired``,
  ``jobs_failed``, ``jobs_attached``) and requests (``requests_queued``, ``requests_running``,
  ``requests_done``, ``requests_failed``, ``requests_resubmitted``) by state, and the tokens of
  the providers' ``usage`` fields; the progress bar and ``stats.json`` show them.
- **Spend and budgets** (:mod:`tracepipe.spend`). Answers charge the provider's ``usage`` at the
  batch price (``price.batch_discount``: :attr:`batch_priced`). Each ``generate`` call reserves
  the worst case of the requests the journal cannot answer, all or nothing, before it queues
  them: a call a ``budget`` refuses sends nothing and raises
  :class:`~tracepipe.errors.BudgetExceeded`, while the calls already queued finish and are
  committed.
- **Secrets.** The key is read from ``api_key_env`` at start, sent only in the ``Authorization``
  header and scrubbed from every message; journals hold ids, never the key.
- ``concurrency``, ``rpm``, ``tpm`` and ``rate_limit_timeout_s`` concern the online API and are
  ignored here (accepted so that only ``kind`` changes when a stage switches).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from tracepipe.engines import register_engine
from tracepipe.engines.base import Completion, EngineConfig, EngineFatalError, GenerationRequest
from tracepipe.engines.openai import (
    _QUOTA,
    FATAL_STATUS,
    PROMPT_TOO_LONG,
    RETRY_STATUS,
    OpenAIConfig,
    OpenAIEngine,
    OpenAIEngineError,
    OpenAIFatalError,
    _Journal,
    _retry_after,
    classify_context_error,
)
from tracepipe.hashing import obj_hash
from tracepipe.spend import Reservation

log = logging.getLogger("tracepipe.engines.openai_batch")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: how many pages of ``GET /batches`` a re-attach looks through for a job whose create was cut off
LOOKUP_PAGES = 20


class OpenAIBatchConfig(OpenAIConfig):
    """A provider that speaks the OpenAI Batch API (``/files`` + ``/batches``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)
    kind: Literal["openai-batch"] = "openai-batch"  # type: ignore[assignment]
    max_requests_per_batch: int = Field(50_000, ge=1, description="requests (JSONL lines) per batch job at most")
    max_batch_bytes: int = Field(200_000_000, ge=1024, description="bytes of a job's input file at most")
    max_jobs_in_flight: int = Field(16, ge=1, description="jobs submitted and not finished, at most")
    completion_window: str = Field("24h", description="the batch's completion window")
    endpoint: str = Field("/v1/chat/completions", description="the `url` of each line and the batch's endpoint")
    poll_s: float = Field(30.0, gt=0, description="seconds between two polls of a job")
    gather_s: float = Field(5.0, ge=0, description="a job that is not full is submitted this long after its first request")
    max_resubmits: int = Field(3, ge=0, description="times a failed or expired request is sent again (in a new job)")
    delete_files: bool = Field(True, description="delete a job's input, output and error files once collected")


@dataclass
class _Line:
    """One line of a job: a custom id and its body (None: re-attached, no caller asked yet)."""

    id: str
    body: dict[str, Any] | None
    n: int = 1
    counts: str = "usage"
    attempts: int = 0
    job: str | None = None  # None: queued
    nbytes: int = 0  # of its JSONL line, as last queued


@dataclass
class _Call:
    """One request a caller waits for: the lines it needs and what came back."""

    ids: list[str]
    got: dict[str, list[Completion]] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.error is not None or len(self.got) == len(self.ids):
            self.finish()

    def finish(self) -> None:
        self.done.set()


@dataclass
class _Job:
    id: str
    ids: list[str]
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "planned"
    next_poll: float = 0.0


class _JobLog:
    """Append-only record of the batch jobs (one JSON line per event, flushed at once).

    Events: ``{"job", "ids"}`` before the upload, ``{"job", "file"}``, ``{"job", "batch"}`` right
    after the create, ``{"job", "done": true}`` once the results are journaled. Each process
    writes its own ``jobs-<ns>-<pid>.jsonl`` under ``flock``; a new log reads the files no live
    process holds, copies the jobs not done into its own file and deletes them.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, dict[str, Any]] = {}
        old: list[tuple[Path, Any]] = []
        for p in sorted(directory.glob("jobs-*.jsonl")):
            fh = open(p, "rb")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live engine writes it
                fh.close()
                continue
            old.append((p, fh))
            for raw in fh:
                if not raw.endswith(b"\n"):  # torn by a kill
                    break
                try:
                    rec = json.loads(raw)
                    jobs.setdefault(str(rec["job"]), {}).update(rec)
                except (ValueError, KeyError, TypeError):
                    break
        self.open: dict[str, dict[str, Any]] = {j: r for j, r in jobs.items() if not r.get("done")}
        self.path = directory / f"jobs-{time.time_ns():020d}-{os.getpid()}.jsonl"
        self._fh = open(self.path, "ab")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        self._lock = threading.Lock()
        for rec in self.open.values():
            self._fh.write((json.dumps(rec) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for p, fh in old:
            p.unlink(missing_ok=True)
            fh.close()

    def write(self, job: str, **event: Any) -> None:
        rec = {"job": job, **event}
        with self._lock:
            self._fh.write((json.dumps(rec) + "\n").encode())
            self._fh.flush()  # in the OS page cache: survives kill -9
            if event.get("done"):
                self.open.pop(job, None)
            else:
                self.open.setdefault(job, {}).update(rec)

    def close(self) -> None:
        with self._lock:
            self._fh.close()
            if not self.open:
                self.path.unlink(missing_ok=True)


class _Stopped(Exception):
    """The engine is closing: the driver's HTTP retries end."""


@register_engine("openai-batch", OpenAIBatchConfig)
class OpenAIBatchEngine(OpenAIEngine):
    """Chat generation through a provider's Batch API (see the module docstring)."""

    config: OpenAIBatchConfig
    batch_priced: ClassVar[bool] = True  # price.batch_discount applies (tracepipe.spend)

    _RUNTIME = (*OpenAIEngine._RUNTIME, "_http", "_log", "_driver", "_stop", "_cv")

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self._init_batch_state()

    def _init_batch_state(self) -> None:
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        self._http: Any = None
        self._log: _JobLog | None = None
        self._lines: dict[str, _Line] = {}  # queued or in a job
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._queued_since: float | None = None
        self._waiting: dict[str, list[_Call]] = {}  # line id -> calls waiting for it
        self._failed: dict[str, BaseException] = {}  # lines failed for good in this engine's life
        self._jobs: dict[str, _Job] = {}  # jobs in flight

    def __repr__(self) -> str:
        return f"OpenAIBatchEngine(model={self.config.model!r}, base_url={self._display_url()!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for k in ("_lines", "_queue", "_waiting", "_failed", "_jobs"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_batch_state()

    # -- counters ----------------------------------------------------------------------------
    _BATCH_COUNTERS = (
        "jobs_submitted", "jobs_attached", "jobs_completed", "jobs_expired", "jobs_failed", "jobs_cancelled",
        "requests_done", "requests_failed", "requests_resubmitted",
    )

    def _reset_stats(self) -> None:
        super()._reset_stats()
        with self._stats_lock:
            self._stats.update(dict.fromkeys(self._BATCH_COUNTERS, 0.0))

    def capacity(self) -> int:
        """Requests the engine takes at once: every job in flight full. The runtime keeps about
        this many submitted (bounded by its own window), so whole jobs are cut from the queue."""
        return self.config.max_requests_per_batch * self.config.max_jobs_in_flight

    def usage(self) -> dict[str, float]:
        """The ``openai`` counters (``requests``: HTTP calls to the files and batches endpoints;
        ``ok_requests``: lines answered; the providers' ``prompt_tokens`` / ``completion_tokens``;
        ``journal_hits``) plus jobs and requests by state (see the module docstring)."""
        out = super().usage()
        for k in ("window", "window_min", "concurrency", "in_flight"):
            out.pop(k, None)
        with self._cv:
            out["jobs_running"] = float(len(self._jobs))
            out["requests_queued"] = float(len(self._queue))
            out["requests_running"] = float(sum(len(j.ids) for j in self._jobs.values()))
        out["jobs_done"] = sum(out[k] for k in ("jobs_completed", "jobs_expired", "jobs_failed", "jobs_cancelled"))
        out["max_requests_per_batch"] = float(self.config.max_requests_per_batch)
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def _start(self) -> None:
        """Read the key, open the client, the journal and the job log, re-attach to the jobs of a
        killed run, start the driver (called under the start lock by ``start``)."""
        import httpx

        cfg = self.config
        self._begin_start()
        self._init_batch_state()
        headers = {"Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.get()}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s, connect=min(30.0, cfg.timeout_s)))
        try:
            fp = self.fingerprint()
            if cfg.journal and self.ctx is not None and getattr(self.ctx, "workdir", None) is not None:
                jdir = Path(self.ctx.workdir) / "engines" / f"openai-batch-{obj_hash(fp, 16)}"
                self._journal = _Journal(jdir)
                self._log = _JobLog(jdir)
                self._reattach()
            self._driver = threading.Thread(target=self._drive, name="tracepipe-openai-batch", daemon=True)
            self._driver.start()
        except BaseException:
            self._shutdown()
            raise

    def _reattach(self) -> None:
        """Take back the jobs a killed run left at the provider (see the module docstring)."""
        assert self._log is not None and self._journal is not None
        for jid, rec in list(self._log.open.items()):
            ids = [str(i) for i in rec.get("ids") or []]
            batch_id = rec.get("batch") or self._find_batch(jid)
            if batch_id is None:  # never created: its requests are queued again when asked for
                self._log.write(jid, done=True, dropped="never created")
                self._delete_file(rec.get("file"))
                continue
            if not rec.get("batch"):
                self._log.write(jid, batch=batch_id)
            job = _Job(jid, [], rec.get("file"), batch_id, "attached")
            for cid in ids:
                if cid not in self._lines and self._journal.get(cid) is None:
                    self._lines[cid] = _Line(cid, None, attempts=1, job=jid)
                    job.ids.append(cid)
            if not job.ids:  # collected before the kill, only its `done` was lost
                self._log.write(jid, done=True)
                continue
            self._jobs[jid] = job
            self._count(jobs_attached=1)
        if self._jobs:
            log.info("openai-batch engine: re-attached to %d job(s) of an earlier run (%d requests)",
                     len(self._jobs), sum(len(j.ids) for j in self._jobs.values()))

    def close(self) -> None:
        """Stop the driver and close the client. Jobs still running stay at the provider and in
        the job log: the next run re-attaches to them."""
        with self._start_lock:
            self._shutdown()
            self._started = False

    def _shutdown(self) -> None:
        self._stop.set()
        closed = OpenAIEngineError("the openai-batch engine closed before the answer came")
        with self._cv:
            for calls in self._waiting.values():  # no caller waits forever on a closed engine
                for call in calls:
                    call.error = call.error or closed
                    call.finish()
            self._waiting.clear()
            self._cv.notify_all()
        if self._driver is not None and self._driver is not threading.current_thread():
            self._driver.join(timeout=30)
        if self._http is not None:
            self._http.close()
        if self._journal is not None:
            self._journal.close()
        if self._log is not None:
            self._log.close()
        self._http = self._journal = self._log = self._driver = None
        self._key = None

    def settle(self, requests: Iterable[GenerationRequest]) -> int:
        """These requests' rows are committed: the journal forgets their lines."""
        if self._journal is None:
            return 0
        return self._journal.settle([cid for r in requests for cid, _ in self._plan_lines(r, bodies=False)])

    # -- requests ----------------------------------------------------------------------------
    def _native_n(self) -> bool:
        return self.config.n_mode in ("n+logprobs", "n+tokenizer")

    def _plan_lines(self, req: GenerationRequest, bodies: bool = True) -> list[tuple[str, _Line | None]]:
        """The lines of a request: ``<key>-<i>`` per sample (seed + i), or ``<key>-n`` (n in one line)."""
        rk = self.request_key(req)
        if req.n > 1 and self._native_n():
            logprobs = self.config.n_mode == "n+logprobs"
            counts = "logprobs" if logprobs else "tokenizer"
            body = self._body(req, req.n, req.sampling.seed, logprobs) if bodies else None
            return [(f"{rk}-n", _Line(f"{rk}-n", body, req.n, counts) if bodies else None)]
        seed = req.sampling.seed
        out: list[tuple[str, _Line | None]] = []
        for i in range(req.n):
            cid = f"{rk}-{i}"
            body = self._body(req, 1, None if seed is None else seed + i, False) if bodies else None
            out.append((cid, _Line(cid, body) if bodies else None))
        return out

    def _register(self, req: GenerationRequest) -> _Call:
        """Queue the lines of ``req`` not answered yet; returns the call to wait on."""
        planned = self._plan_lines(req)
        call = _Call([cid for cid, _ in planned])
        journal = self._journal
        with self._cv:
            if self._fatal is not None or self._stop.is_set():
                call.error = self._fatal or OpenAIEngineError("the openai-batch engine is closed")
                call.finish()
                return call
            for cid, line in planned:
                assert line is not None
                cached = journal.get(cid) if journal is not None else None
                if cached is not None:
                    call.got[cid] = cached
                    continue
                if cid in self._failed:
                    call.error = self._failed[cid]
                    break
                self._waiting.setdefault(cid, []).append(call)
                have = self._lines.get(cid)
                if have is None:
                    self._lines[cid] = line
                    self._enqueue(line)
                elif have.body is None:  # re-attached from a killed run: now we know its body
                    have.body, have.n, have.counts = line.body, line.n, line.counts
            if len(call.got) == len(call.ids) and call.ids:
                self._count(journal_hits=1)
            if call.error is not None:
                self._unwait(call)
            call.check()
            self._cv.notify_all()
        return call

    def _enqueue(self, line: _Line) -> None:
        """Put a line at the end of the queue (caller holds the lock)."""
        line.job = None
        line.nbytes = len(self._jsonl(line))
        self._queue.append(line.id)
        self._queued_bytes += line.nbytes
        if self._queued_since is None:
            self._queued_since = time.monotonic()

    def _jsonl(self, line: _Line) -> bytes:
        rec = {"custom_id": line.id, "method": "POST", "url": self.config.endpoint, "body": line.body}
        return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")

    def _unwait(self, call: _Call) -> None:
        for cid in call.ids:
            calls = self._waiting.get(cid)
            if calls and call in calls:
                calls.remove(call)
                if not calls:
                    del self._waiting[cid]

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Completions for every request, in order, once the jobs holding them finish; raises
        the first failure after all finish (a fatal error at once). Safe from many threads."""
        try:
            self.ensure_started()
        except OpenAIEngineError as e:  # no key, say: nothing can be sent
            if isinstance(e, EngineFatalError):
                raise
            raise OpenAIFatalError(str(e), e.status, e.detail) from None
        self._check_fatal()
        held = self._reserve_unanswered(requests)  # raises BudgetExceeded: nothing of this call goes out
        try:
            calls = [self._register(r) if r.n >= 1 else None for r in requests]
            for call in calls:
                if call is not None:
                    call.done.wait()
                    if isinstance(call.error, EngineFatalError):
                        raise call.error
        finally:
            if held is not None:
                held.release()
        first = next((c.error for c in calls if c is not None and c.error is not None), None)
        if first is not None:
            raise first
        out: list[list[Completion]] = []
        journal = self._journal
        for call in calls:
            if call is None:
                out.append([])
                continue
            out.append([c for cid in call.ids for c in call.got[cid]])
            if journal is not None:
                for cid in call.ids:
                    journal.handed(cid)
        self.check_context(out, "the provider's context")
        return out

    def _reserve_unanswered(self, requests: list[GenerationRequest]) -> Reservation | None:
        """Reserve the worst case of the requests the journal cannot answer, all or nothing
        (``Engine.reserve``): a call the budget refuses sends nothing, so every answer that comes
        back belongs to a call that returns and is committed."""
        journal = self._journal
        todo = [r for r in requests if r.n >= 1 and (
            journal is None or any(journal.get(cid) is None for cid, _ in self._plan_lines(r, bodies=False)))]
        return self.reserve(todo) if todo else None

    # -- the driver ----------------------------------------------------------------------------
    def _drive(self) -> None:
        """Submit jobs, poll them, collect the finished ones, until the engine closes."""
        while not self._stop.is_set():
            try:
                self._step()
            except _Stopped:
                return
            except OpenAIFatalError as e:
                self._set_fatal(e)
                return
            except Exception as e:  # noqa: BLE001 - the driver must outlive a bad answer
                log.warning("openai-batch engine: %s; trying again in %.0fs", self._scrub(str(e))[:500], self.config.poll_s)
                self._stop.wait(self.config.poll_s)

    def _step(self) -> None:
        with self._cv:
            new = self._cut_jobs()
            now = time.monotonic()
            due = [j for j in self._jobs.values() if j.batch_id is not None and j.next_poll <= now]
        for job in new:
            self._launch(job)
        for job in due:
            if self._stop.is_set():
                return
            self._poll(job)
        with self._cv:
            if self._stop.is_set():
                return
            self._cv.wait(self._idle_time())

    def _idle_time(self) -> float:
        """Seconds until the driver has something to do (caller holds the lock)."""
        now = time.monotonic()
        waits = [j.next_poll - now for j in self._jobs.values() if j.batch_id is not None]
        if self._queue and len(self._jobs) < self.config.max_jobs_in_flight:
            if self._queue_full():
                return 0.0
            waits.append((self._queued_since or now) + self.config.gather_s - now)
        return max(0.0, min(waits, default=5.0))

    def _queue_full(self) -> bool:
        return len(self._queue) >= self.config.max_requests_per_batch or self._queued_bytes >= self.config.max_batch_bytes

    def _cut_jobs(self) -> list[_Job]:
        """New jobs from the queue: full ones at once, the rest after ``gather_s`` (caller holds
        the lock)."""
        cfg = self.config
        jobs: list[_Job] = []
        while self._queue and len(self._jobs) < cfg.max_jobs_in_flight:
            if not self._queue_full() and time.monotonic() - (self._queued_since or 0.0) < cfg.gather_s:
                break
            ids: list[str] = []
            size = 0
            while self._queue and len(ids) < cfg.max_requests_per_batch:
                line = self._lines[self._queue[0]]
                nbytes = line.nbytes
                if ids and size + nbytes > cfg.max_batch_bytes:
                    break
                self._queue.popleft()
                self._queued_bytes -= nbytes
                size += nbytes
                ids.append(line.id)
            job = _Job(f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:12]}", ids)
            for cid in ids:
                self._lines[cid].job = job.id
                self._lines[cid].attempts += 1
            self._jobs[job.id] = job
            jobs.append(job)
            self._queued_since = time.monotonic() if self._queue else None
        return jobs

    def _launch(self, job: _Job) -> None:
        """Upload a job's file and create its batch, journaling each step first."""
        with self._cv:  # bodies are replaced, never changed in place: serialize outside the lock
            lines = [dataclasses.replace(self._lines[cid]) for cid in job.ids]
        data = b"".join(self._jsonl(line) for line in lines)
        try:
            if self._log is not None:
                self._log.write(job.id, ids=job.ids)
            job.file_id = self._upload(job.id, data)
            if self._log is not None:
                self._log.write(job.id, file=job.file_id)
            batch = self._create(job)
        except (_Stopped, OpenAIFatalError):
            raise
        except OpenAIEngineError as e:  # not at the provider: the lines fail or go back
            if self._log is not None:
                self._log.write(job.id, done=True, dropped=str(e)[:200])
            retry = e.status is None or e.status in RETRY_STATUS or e.status >= 500
            self._finish(job, {cid: ("retry" if retry else "fail", str(e)) for cid in job.ids})
            return
        job.batch_id, job.status = str(batch["id"]), str(batch.get("status") or "validating")
        if self._log is not None:
            self._log.write(job.id, batch=job.batch_id)
        job.next_poll = time.monotonic() + self.config.poll_s
        self._count(jobs_submitted=1)
        with self._stats_lock:
            self._t_first = self._t_first if self._t_first is not None else time.monotonic()
        log.info("openai-batch engine: job %s submitted as %s (%d requests, %d bytes)", job.id, job.batch_id, len(job.ids), len(data))

    def _poll(self, job: _Job) -> None:
        assert job.batch_id is not None
        r = self._http_call("GET", f"/batches/{job.batch_id}", missing_ok=True)
        if r is None:  # gone at the provider: its requests go back to the queue
            batch: dict[str, Any] = {"status": "failed", "errors": {"data": [{"message": "the batch is gone (HTTP 404)"}]}}
        else:
            batch = r.json()
        job.status = str(batch.get("status") or "")
        if job.status in TERMINAL:
            self._collect(job, batch)
        else:
            job.next_poll = time.monotonic() + self.config.poll_s

    # -- results -------------------------------------------------------------------------------
    def _collect(self, job: _Job, batch: dict[str, Any]) -> None:
        """Read a finished job's output and error files; answer, resubmit or fail each line."""
        outcome: dict[str, tuple[str, Any]] = {}
        for key in ("output_file_id", "error_file_id"):
            fid = batch.get(key)
            if not fid:
                continue
            r = self._http_call("GET", f"/files/{fid}/content", missing_ok=True)
            if r is None:  # deleted elsewhere: its lines count as unanswered
                continue
            for raw in r.text.splitlines():
                if raw.strip():
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    cid = str(rec.get("custom_id"))
                    if cid in job.ids:
                        outcome[cid] = self._outcome(rec)
        why = f"batch {batch.get('id', job.batch_id)} ended {job.status!r} without an answer"
        errs = (batch.get("errors") or {}).get("data") if isinstance(batch.get("errors"), dict) else None
        if errs:
            why += ": " + "; ".join(self._scrub(str(e.get("message") or e.get("code")))[:200] for e in errs[:3])
        for cid in job.ids:
            outcome.setdefault(cid, ("retry", why))
        self._count(**{f"jobs_{job.status}": 1} if job.status in TERMINAL else {})
        with self._stats_lock:
            self._t_last = time.monotonic()
        self._finish(job, outcome)
        if self._log is not None:
            self._log.write(job.id, done=True)
        if self.config.delete_files:
            for fid in (job.file_id, batch.get("output_file_id"), batch.get("error_file_id")):
                self._delete_file(fid)
        log.info("openai-batch engine: job %s (%s) %s", job.id, job.batch_id, job.status)

    def _outcome(self, rec: dict[str, Any]) -> tuple[str, Any]:
        """What one output / error line means: ``ok`` (body), ``retry`` / ``fail`` (message),
        ``too_long`` (prompt tokens), ``clamp`` (max tokens that fit)."""
        resp = rec.get("response") if isinstance(rec.get("response"), dict) else {}
        code = resp.get("status_code")
        body = resp.get("body")
        if code == 200 and isinstance(body, dict) and body.get("choices"):
            return "ok", body
        err = body.get("error") if isinstance(body, dict) else None
        err = err if err is not None else rec.get("error")
        detail = str(err.get("message") or err.get("code") or err) if isinstance(err, dict) else str(err or body or "")
        detail = self._scrub(detail)[:2000]
        if isinstance(code, int) and code in FATAL_STATUS:
            raise self._fatal_for(code, detail, f"{self._display_url()} (batch line)")
        if code == 429 and _QUOTA.search(detail):
            raise self._fatal_for(code, detail, f"{self._display_url()} (batch line)")
        if code in (400, 413, 422) and detail:
            what = classify_context_error(detail, self._max_tokens(str(rec.get("custom_id"))))
            if what is not None:
                return what
        if code is None or code in RETRY_STATUS or code >= 500:
            return "retry", f"HTTP {code}: {detail}" if code else detail or "no response"
        return "fail", f"HTTP {code}: {detail}"

    def _max_tokens(self, cid: str) -> int:
        line = self._lines.get(cid)
        body = line.body if line is not None and line.body else {}
        return int(body.get(self.config.max_tokens_param) or 0) or 1 << 30

    def _completions(self, line: _Line, body: dict[str, Any]) -> list[Completion]:
        if line.counts == "usage":
            comps = self._parse(body, "usage")[:1]
        else:
            comps = self._parse(body, line.counts)[: line.n]
        if len(comps) < line.n:
            raise OpenAIEngineError(f"{self._display_url()}: {len(comps)} choices for n={line.n}; use `n_mode: separate`")
        return comps

    def _finish(self, job: _Job, outcome: dict[str, tuple[str, Any]]) -> None:
        """Journal the answers, then (under the lock) deliver them, queue the lines to send
        again and fail the others."""
        answers: dict[str, list[Completion]] = {}
        for cid, (what, value) in outcome.items():
            line = self._lines.get(cid)
            if line is None:
                continue
            try:
                if what == "ok":
                    answers[cid] = self._completions(line, value)
                    usage = value.get("usage") or {}
                    pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                    self._count(prompt_tokens=pt, completion_tokens=ct)
                    self.meter().charge(requests=1, prompt_tokens=pt, completion_tokens=ct)  # the provider's usage
                elif what == "too_long":
                    answers[cid] = [Completion("", PROMPT_TOO_LONG, int(value), 0) for _ in range(line.n)]
            except OpenAIEngineError as e:
                outcome[cid] = ("fail", str(e))
        if self._journal is not None:
            for cid, comps in answers.items():
                self._journal.put(cid, comps)
        with self._cv:
            self._jobs.pop(job.id, None)
            for cid, (what, value) in outcome.items():
                line = self._lines.get(cid)
                if line is None or line.job != job.id:
                    continue
                if cid in answers:
                    self._deliver(cid, answers[cid], None)
                elif what == "clamp" and line.body is not None:
                    line.body = {**line.body, self.config.max_tokens_param: int(value)}
                    self._enqueue(line)
                elif what == "retry" and line.body is not None and line.attempts <= self.config.max_resubmits:
                    self._count(requests_resubmitted=1)
                    self._enqueue(line)
                elif what == "retry" and line.body is None and not self._waiting.get(cid):
                    del self._lines[cid]  # re-attached and nobody asked: asked again, it is queued anew
                else:
                    tries = f" after {line.attempts} job(s)" if what == "retry" else ""
                    err = OpenAIEngineError(f"{self._display_url()} batch request {cid} failed{tries}: {value}"[:2000])
                    self._deliver(cid, None, err)
            self._cv.notify_all()

    def _deliver(self, cid: str, comps: list[Completion] | None, err: BaseException | None) -> None:
        """A line is answered (``comps``) or failed for good (``err``); caller holds the lock."""
        self._lines.pop(cid, None)
        if err is not None:
            self._failed[cid] = err
            self._count(requests_failed=1)
        else:
            self._count(requests_done=1, ok_requests=1)
        for call in self._waiting.pop(cid, []):
            if err is not None:
                call.error = call.error or err
                self._unwait(call)
            else:
                assert comps is not None
                call.got[cid] = comps
            call.check()

    def _set_fatal(self, exc: OpenAIFatalError) -> OpenAIFatalError:
        """Remember the first fatal error and fail every call waiting with it."""
        if self._fatal is None:
            self._fatal = exc
            log.error("openai-batch engine: %s; failing every request of this engine", exc)
            with self._cv:
                for calls in self._waiting.values():
                    for call in calls:
                        call.error = exc
                        call.finish()
                self._waiting.clear()
        return self._fatal

    # -- HTTP ----------------------------------------------------------------------------------
    def _http_call(self, method: str, path: str, *, missing_ok: bool = False, **kw: Any) -> Any:
        """One call to the files / batches API, retried on 429, 5xx, 408 / 409 / 425, timeouts
        and connection errors (``max_retries``, backoff, Retry-After); 401 / 403 / 404 are fatal
        (404 returns None with ``missing_ok``), other 4xx raise :class:`OpenAIEngineError`."""
        import httpx

        where = f"{self._display_url()}{path.split('?')[0]}"
        reason = ""
        for attempt in range(self.config.max_retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            retry_after = None
            try:
                r = self._http.request(method, f"{self.config.base_url}{path}", **kw)
            except httpx.TimeoutException:
                reason = f"timeout after {self.config.timeout_s:g}s"
            except httpx.HTTPError as e:
                reason = f"connection error ({type(e).__name__})"
            else:
                self._count(requests=1)
                code = r.status_code
                if code < 300:
                    return r
                if code == 404 and missing_ok:
                    return None
                detail = self._error_detail(r)
                if code in FATAL_STATUS or (code == 429 and _QUOTA.search(detail)):
                    raise self._fatal_for(code, detail, where)
                if not (code in RETRY_STATUS or code >= 500):
                    raise OpenAIEngineError(f"{where}: HTTP {code}: {detail[:500]}", code, detail)
                reason, retry_after = f"HTTP {code}", _retry_after(r.headers)
            if attempt < self.config.max_retries:
                self._count(retries=1)
                self._stop.wait(self._backoff(attempt, retry_after))
        raise OpenAIEngineError(f"{where}: gave up after {self.config.max_retries + 1} attempts; last: {reason}")

    def _upload(self, job_id: str, data: bytes) -> str:
        files = {"file": (f"tracepipe-{job_id}.jsonl", data, "application/jsonl")}
        r = self._http_call("POST", "/files", files=files, data={"purpose": "batch"})
        return str(r.json()["id"])

    def _create(self, job: _Job) -> dict[str, Any]:
        """Create the batch. A failed create is looked up by its metadata before it is tried
        again, so an answer lost on the way (a timeout) never makes a second batch."""
        body = {
            "input_file_id": job.file_id, "endpoint": self.config.endpoint,
            "completion_window": self.config.completion_window, "metadata": {"tracepipe_job": job.id},
        }
        for attempt in range(self.config.max_retries + 1):
            try:
                r = self._http_call("POST", "/batches", json=body)
                return dict(r.json())
            except OpenAIEngineError as e:
                if isinstance(e, OpenAIFatalError) or (e.status is not None and e.status < 500 and e.status not in RETRY_STATUS):
                    raise
                found = self._find_batch(job.id)
                if found is not None:
                    return {"id": found, "status": "validating"}
                if attempt == self.config.max_retries:
                    raise
                self._stop.wait(self._backoff(attempt, None))
        raise AssertionError("unreachable")

    def _find_batch(self, job_id: str) -> str | None:
        """The provider's id of the batch whose ``metadata.tracepipe_job`` is ``job_id``."""
        after: str | None = None
        for _ in range(LOOKUP_PAGES):
            path = "/batches?limit=100" + (f"&after={after}" if after else "")
            r = self._http_call("GET", path)
            page = r.json()
            for b in page.get("data") or []:
                if (b.get("metadata") or {}).get("tracepipe_job") == job_id:
                    return str(b["id"])
            after = page.get("last_id") or ((page.get("data") or [{}])[-1].get("id"))
            if not page.get("has_more") or not after:
                return None
        return None

    def _delete_file(self, file_id: str | None) -> None:
        if not file_id:
            return
        try:
            self._http_call("DELETE", f"/files/{file_id}", missing_ok=True)
        except (OpenAIEngineError, _Stopped) as e:  # best effort: an orphan file costs nothing
            log.debug("openai-batch engine: could not delete file %s: %s", file_id, e)
