"""``transformers`` engine: CPU / small models, and the reference for log-prob checks.

Recipe::

    engines:
      small:
        kind: transformers
        model: Qwen/Qwen2.5-0.5B-Instruct    # Hub id or local directory
        dtype: float32
        device: cpu

Requests are generated one at a time (no padding, so greedy output is exactly the model's);
choice ``i`` of a seeded request uses ``torch.manual_seed(seed + i)``, vLLM's convention for
``n`` samples (the random streams differ from vLLM's, so only greedy outputs are comparable).
``finish_reason`` is ``stop`` when an eos token or a stop string ended the completion (the
stop string is cut from the text, as vLLM does), else ``length``; like vLLM's detokenizer, an
incomplete UTF-8 character at the end of the text is left out. :meth:`score` runs one
forward pass per sequence in float32 log-softmax and gathers the given ids. The fingerprint is
the same as the ``vllm`` engine's for the same checkpoint, tokenizer and template.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tracepipe.engines import register_engine
from tracepipe.engines._hf import CheckpointIdentity, load_tokenizer, render_chat, resolve_local
from tracepipe.engines.base import Completion, Engine, EngineConfig, GenerationRequest, ScoreResult


class TransformersConfig(EngineConfig):
    kind: str = "transformers"
    model: str = Field(..., description="Hugging Face model id or local checkpoint directory")
    revision: str | None = Field(None, description="model revision (commit, branch, tag)")
    tokenizer: str | None = Field(None, description="tokenizer id or directory (default: the model's)")
    dtype: str = Field("float32", description="float32 | bfloat16 | float16 | auto")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps")
    chat_template: str | None = Field(None, description="Jinja chat template (inline, or a file path) replacing the tokenizer's")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra variables for the chat template")
    fingerprint: str | None = Field(None, description="pin the teacher fingerprint (used verbatim)")


@register_engine("transformers", TransformersConfig)
class TransformersEngine(CheckpointIdentity, Engine):
    config: TransformersConfig

    def __init__(self, config: EngineConfig, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self._model: Any = None
        self._tok: Any = None
        self._eos: set[int] = set()
        self._fp: dict[str, Any] | None = None

    @property
    def _base_dir(self) -> Any:
        return getattr(self.ctx, "recipe_dir", None)

    def _path(self, name: str) -> str:
        local = resolve_local(name, self._base_dir)
        return str(local) if local else name

    def tokenizer(self) -> Any:
        if self._tok is None:
            c = self.config
            self._tok = load_tokenizer(self._path(c.tokenizer or c.model), c.revision, c.chat_template, self._base_dir)
        return self._tok

    def start(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM

        c = self.config
        dtype = "auto" if c.dtype == "auto" else getattr(torch, c.dtype)
        local = resolve_local(c.model, self._base_dir)
        self._model = AutoModelForCausalLM.from_pretrained(
            str(local) if local else c.model, revision=None if local else c.revision, dtype=dtype
        ).to(c.device).eval()
        tok = self.tokenizer()
        eos = self._model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self._eos = {int(e) for e in eos_list} | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set())
        self._started = True

    def close(self) -> None:
        self._model = None
        self._started = False

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        return render_chat(self.tokenizer(), messages, self.config.chat_template_kwargs or None)

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        self.ensure_started()
        tok = self.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(self._eos, default=0)
        out: list[list[Completion]] = []
        held = self.reserve(requests)  # a budget (tracepipe.spend) refuses the call as a whole
        try:
            for req in requests:
                comps = self._sample(req, tok, pad)
                out.append(comps)
                self.meter().charge(1, comps[0].prompt_tokens if comps else 0, sum(c.completion_tokens for c in comps))
        finally:
            held.release()
        return out

    def _sample(self, req: GenerationRequest, tok: Any, pad: int) -> list[Completion]:
        """The ``n`` completions of one request."""
        import torch

        _, ids = self.render(req.messages)
        s = req.sampling
        inp = torch.tensor([ids], device=self._model.device)
        comps: list[Completion] = []
        for i in range(req.n):
            if s.seed is not None:
                torch.manual_seed(s.seed + i)
            kw: dict[str, Any] = {"max_new_tokens": s.max_tokens, "eos_token_id": sorted(self._eos), "pad_token_id": pad}
            if s.temperature > 0:
                kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k if s.top_k > 0 else None, min_p=s.min_p or None)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if s.stop:
                kw.update(stop_strings=list(s.stop), tokenizer=tok)
            with torch.no_grad():
                gen = self._model.generate(inp, attention_mask=torch.ones_like(inp), **kw)[0, len(ids):].tolist()
            # an incomplete UTF-8 character at the end decodes to U+FFFD; vLLM's incremental
            # detokenizer never emits it, so neither do we (same text for the same tokens)
            text = tok.decode(gen, skip_special_tokens=True).rstrip("\ufffd")
            reason = "stop" if gen and gen[-1] in self._eos else "length"
            for st in s.stop:
                if st in text:
                    text, reason = text[: text.index(st)], "stop"
            comps.append(Completion(text, reason, len(ids), len(gen)))
        return comps

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoreResult]:
        """``logprobs[i] = log p(ids[i] | ids[:i])`` in float32; position 0 is None."""
        self.ensure_started()
        import torch

        out: list[ScoreResult] = []
        for ids in sequences:
            inp = torch.tensor([ids], device=self._model.device)
            with torch.no_grad():
                logits = self._model(inp).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            tgt = torch.tensor(ids[1:], device=lp.device)
            chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
            res = ScoreResult([None, *chosen])
            if top_k:
                v, ix = lp.topk(top_k, dim=-1)
                res.topk_ids = [[], *ix.tolist()]
                res.topk_logprobs = [[], *v.tolist()]
            out.append(res)
        return out
