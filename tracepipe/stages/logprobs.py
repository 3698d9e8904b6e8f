"""``logprobs``: teacher log-probs over finished traces, for offline on-policy distillation.

Input columns: ``messages`` (the chat that was sent; else ``problem`` as one user turn),
``reasoning``, ``response``, ``teacher`` (the fingerprint of the model that wrote the trace:
the SFT teacher for teacher traces, the student for on-policy rollouts).
Output columns: ``token_ids`` (list<int32>), ``loss_mask`` (list<int8>, 1 exactly on the
assistant completion tokens), ``teacher_logprobs`` (list<float32>, ``[i] = log p_teacher(
token_ids[i] | token_ids[:i])``, ``[0]`` null), with ``top_k > 0`` also ``teacher_topk_ids``
(list<list<int32>>) and ``teacher_topk_logprobs`` (list<list<float32 | float16>>, sorted
best first, ``[0]`` null), ``n_tokens``, ``logprobs_truncated`` (cut at ``max_length``) and
``logprobs_teacher`` (the scoring teacher's fingerprint).

Why: Lightning OPD precomputes the teacher's log-probs once over student rollouts and trains on
them, so no teacher server runs during training. It matches standard (online) on-policy
distillation only when the teacher that scores is the teacher that produced the SFT data the
student was trained on ("teacher consistency"), and only when student and teacher share the
tokenizer (the stored token ids are the student's tokens and the teacher's at once).

- **Tokens.** The prompt is rendered with the teacher's chat template and the generation prompt,
  exactly as an engine sends it (:func:`tracepipe.engines._hf.render_chat`); the assistant
  completion (``<think>\\n{reasoning}\\n</think>\\n\\n{response}``, as the SFT outputs render the
  trained turn; option ``assistant_template``) is tokenized on its own and appended, followed by
  the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``...). The completion and the
  end-of-turn token get ``loss_mask`` 1: decoding the masked tokens without special tokens gives
  back the completion text exactly. A completion cut by ``max_tokens`` (``response`` null) is
  scored as written (open think block, no end-of-turn token) unless ``incomplete: drop``. A
  generation prompt that already opens the think block (DeepSeek-R1) is not repeated.
- **Length.** Sequences are cut to ``max_length`` tokens (and to the engine's context), recorded
  in ``logprobs_truncated`` / ``n_tokens``; a row whose prompt leaves no completion token is
  dropped (``logprobs: prompt fills max_length``).
- **Teacher consistency guard** (checked before any stage runs; the run fails with the reason):
  name the SFT teacher with ``sft_teacher`` (an engine), ``sft_teacher_fingerprint`` or
  ``sft_dataset`` (a tracepipe output directory, whose ``summary.json`` / shards record the
  teacher, or Parquet files with a ``teacher`` column). A scoring teacher with another
  fingerprint (other weights, tokenizer or chat template, even under the same name) is refused.
  Rows whose ``teacher`` column names a writer that is neither the declared student
  (``student_engine``) nor the scoring teacher are teacher traces from another teacher: they fail
  (quarantined, the run fails past ``max_error_rate``). Scoring rollouts of a declared student
  requires naming the SFT teacher. ``allow_teacher_mismatch: true`` scores anyway; the run stats
  record it (``stages[i].extra.teacher_consistency = "overridden"``).
- **Tokenizer.** ``student_engine`` / ``student_tokenizer`` must have the teacher's tokenizer
  (same files, or the same vocabulary and encodings); without them, the rows' writer fingerprint
  (``|tok:<hash>``) is compared. There is no override: other tokens make the log-probs useless.

The guard parameters decide whether the stage may run, never what it computes, so they are
execution parameters (left out of the fingerprint): naming the SFT teacher later rescored nothing.

Example::

    - generate: {engine: student, n: 4, temperature: 1.0, max_tokens: 4096}
    - logprobs: {engine: teacher, student_engine: student, sft_teacher: teacher, top_k: 20}
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from tracepipe.contract import DROP_COL, ERROR_COL, IN_KEY_COL
from tracepipe.engines.base import Engine
from tracepipe.errors import RunFailed, TeacherMismatchError  # TeacherMismatchError: re-exported
from tracepipe.stages import register
from tracepipe.stages._columns import arrow_frame
from tracepipe.stages._context import scoring_limit
from tracepipe.stages.base import ExecField, RowStage, StageParams

DEFAULT_ASSISTANT_TEMPLATE = "<think>\n{reasoning}\n</think>\n\n{response}"  # = outputs' default
_TOK_RE = re.compile(r"\|tok:([0-9A-Za-z]+)")
_PROBES = (
    "Hello, world! 1234 + 5678 = 6912.\n\n",
    "<think>\nLet me think step by step.\n</think>\n\nThe answer is \\boxed{42}.",
    "```python\ndef f(x):\n    return x ** 2\n```",
    "  naïve café — ünïcödé 中文 🤖 \t\r\n",
)
WHY = (
    "Lightning OPD (precomputed teacher log-probs) matches standard on-policy distillation only when "
    "the teacher that scores the rollouts is the same teacher that produced the SFT data the student "
    "was trained on; with another teacher the stored log-probs optimise a different objective."
)


def _refuse(message: str) -> None:
    """Fail the run with ``message`` before any stage runs (the CLI prints it, exit 1)."""
    raise RunFailed(message) from TeacherMismatchError(message)


class LogprobsParams(StageParams):
    engine: str = Field(..., description="the scoring teacher (an engine that can score: vllm, transformers)")
    top_k: int = Field(0, ge=0, description="also store the teacher's top-k ids and log-probs per position (0 = off)")
    topk_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of teacher_topk_logprobs (float16 halves its size)")
    max_length: int = Field(8192, ge=2, description="cut sequences to this many tokens (prompt + completion)")
    incomplete: Literal["score", "drop"] = Field("score", description="completions cut by max_tokens (response null): score as written, or drop")
    reasoning: Literal["think", "none"] = Field("think", description="think: reasoning in the assistant turn via assistant_template; none: response only")
    assistant_template: str = Field(DEFAULT_ASSISTANT_TEMPLATE, description="the trained assistant turn, with {reasoning} and {response}")
    mask_end_of_turn: bool = Field(True, description="append the template's end-of-turn token to a finished completion, with loss_mask 1")
    # -- teacher-consistency guard (execution-only: decides whether to run, not what is computed)
    student_engine: str | None = ExecField(None, description="engine of the student whose rollouts are scored (tokenizer check; its rows are rollouts)")
    student_tokenizer: str | None = ExecField(None, description="the student's tokenizer (directory or Hub id); checked instead of the student engine's")
    sft_teacher: str | None = ExecField(None, description="engine that produced the SFT data (its fingerprint must equal the scoring teacher's)")
    sft_teacher_fingerprint: str | None = ExecField(None, description="fingerprint of the teacher that produced the SFT data")
    sft_dataset: str | None = ExecField(None, description="the SFT dataset: a tracepipe output directory or Parquet files with a `teacher` column")
    allow_teacher_mismatch: bool = ExecField(False, description="score with a teacher other than the SFT teacher (recorded in the run stats)")
    batch_size: int = ExecField(64, ge=1, description="rows per batch (and per committed store part)")
    max_batch_tokens: int = ExecField(65536, ge=1, description="tokens per engine scoring call")

    @field_validator("assistant_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{response}" not in v:
            raise ValueError("assistant_template must contain {response}")
        if "{reasoning}" in v and v.index("{reasoning}") > v.index("{response}"):
            raise ValueError("assistant_template must put {reasoning} before {response}")
        return v


@dataclass
class Encoded:
    """One row as the teacher scores it."""

    token_ids: list[int]
    loss_mask: list[int]
    n_prompt: int
    completion: str  # the assistant text whose tokens carry loss_mask 1 (before max_length cuts)
    truncated: bool


# -- tokens ---------------------------------------------------------------------------------------
def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat that was sent: the ``messages`` column, else one user turn with the problem."""
    msgs = row.get("messages")
    if msgs:
        return [{"role": str(m["role"]), "content": "" if m.get("content") is None else str(m["content"])} for m in msgs]
    problem = row.get("problem")
    if problem is None:
        raise ValueError("row has neither `messages` nor `problem`")
    return [{"role": "user", "content": str(problem)}]


def completion_text(reasoning: str | None, response: str | None, template: str, mode: str) -> tuple[str | None, bool]:
    """(assistant text, finished) of a trace; ``None`` when there is nothing to score."""
    reasoning = reasoning if reasoning else None
    if response is None:
        if reasoning is None:
            return None, False
        head = template.partition("{reasoning}")[0] if "{reasoning}" in template and mode == "think" else ""
        return head + reasoning, False  # cut by max_tokens: the open think block as written
    if mode != "think" or reasoning is None or "{reasoning}" not in template:
        if "{reasoning}" in template:
            return response, True
        head, _, tail = template.partition("{response}")
        return head + response + tail, True
    return template.replace("{reasoning}", reasoning, 1).replace("{response}", response, 1), True


def end_of_turn_ids(tok: Any, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids the template writes right after an assistant turn, up to its first special token.

    For ChatML that is ``<|im_end|>`` (not the newline after it): what a model emits to stop.
    Found by rendering a probe conversation; falls back to the tokenizer's eos token.
    """
    kw = dict(chat_template_kwargs or {})
    probe = [{"role": "user", "content": "Q"}]
    fallback = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    try:
        prompt = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kw)
        full = tok.apply_chat_template([*probe, {"role": "assistant", "content": "A"}], tokenize=False, **kw)
    except Exception:  # noqa: BLE001 - a template that cannot render a probe: use eos
        return fallback
    if not full.startswith(prompt + "A"):
        return fallback
    suffix = tok(full[len(prompt) + 1:], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    for i, t in enumerate(suffix):
        if t in special:
            return [int(x) for x in suffix[: i + 1]]
    return fallback


def encode_rows(
    tok: Any,
    rows: list[dict[str, Any]],
    *,
    template: str = DEFAULT_ASSISTANT_TEMPLATE,
    reasoning_mode: str = "think",
    eot_ids: list[int] | None = None,
    max_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    think_open: str = "<think>",
) -> list[Encoded | str]:
    """Tokens and loss mask of each row (or the reason it cannot be scored), tokenized in one call.

    The prompt ids are exactly :func:`tracepipe.engines._hf.render_chat`'s (the template's text
    with the generation prompt, tokenized without adding special tokens again).
    """
    kw = dict(chat_template_kwargs or {})
    out: list[Encoded | str] = []
    prompts: list[str] = []
    contents: list[str] = []
    where: list[int] = []
    finished_flags: list[bool] = []
    for i, row in enumerate(rows):
        content, finished = completion_text(row.get("reasoning"), row.get("response"), template, reasoning_mode)
        if content is None:
            out.append("logprobs: no completion")
            continue
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; set `chat_template:` in the engine config")
        prompt_text = tok.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True, **kw)
        # a generation prompt that already opens the think block (DeepSeek-R1): do not repeat it
        stripped = prompt_text.rstrip()
        if think_open and stripped.endswith(think_open) and content.startswith(think_open):
            opened = prompt_text[stripped.rindex(think_open):]
            content = content[len(opened):] if content.startswith(opened) else content[len(think_open):].lstrip()
        out.append("")
        prompts.append(prompt_text)
        contents.append(content)
        where.append(i)
        finished_flags.append(finished)
    if not where:
        return out
    enc = tok([*prompts, *contents], add_special_tokens=False)["input_ids"]
    n = len(where)
    for j, i in enumerate(where):
        prompt_ids, comp_ids = list(enc[j]), list(enc[n + j])
        if finished_flags[j] and eot_ids:
            comp_ids += eot_ids
        ids = prompt_ids + comp_ids
        mask = [0] * len(prompt_ids) + [1] * len(comp_ids)
        truncated = False
        if max_length is not None and len(ids) > max_length:
            if len(prompt_ids) >= max_length:
                out[i] = "logprobs: prompt fills max_length"
                continue
            ids, mask, truncated = ids[:max_length], mask[:max_length], True
        out[i] = Encoded(ids, mask, len(prompt_ids), contents[j], truncated)
    return out


def encode_row(tok: Any, row: dict[str, Any], **kw: Any) -> Encoded | str:
    """:func:`encode_rows` for one row."""
    return encode_rows(tok, [row], **kw)[0]


def tokenizer_identity(tok: Any) -> str:
    """A hash of what a tokenizer does: its vocabulary (with added tokens) and probe encodings."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    for p in _PROBES:
        h.update(json.dumps(tok(p, add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()[:16]


def tok_part(fingerprint: str | None) -> str | None:
    """The ``|tok:<hash>`` part of an engine fingerprint (None when it has none)."""
    m = _TOK_RE.search(fingerprint or "")
    return m.group(1) if m else None


def sft_dataset_teachers(path: str | Path) -> list[str]:
    """Teacher fingerprints recorded by an SFT dataset (output dir or Parquet files)."""
    p = Path(path)
    if p.is_dir():
        summary = p / "summary.json"
        if summary.is_file():
            teachers = [str(t["teacher"]) for t in json.loads(summary.read_text()).get("teachers") or [] if t.get("teacher")]
            if teachers:
                return sorted(set(teachers))
        files = sorted(glob.glob(str(p / "data" / "*.parquet"))) or sorted(glob.glob(str(p / "**" / "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(str(p)))
    if not files:
        return []
    lf = pl.scan_parquet(files)
    if "teacher" not in lf.collect_schema():
        return []
    vals = lf.select(pl.col("teacher").drop_nulls().unique()).collect().to_series().to_list()
    return sorted(str(v) for v in vals)


# -- the stage -------------------------------------------------------------------------------------
@register("logprobs")
class Logprobs(RowStage):
    """Teacher log-probs (and top-k) of each trace's tokens, with the teacher-consistency guard."""

    version: ClassVar[str] = "1"
    Params = LogprobsParams
    reads: ClassVar[tuple[str, ...]] = ("problem", "messages", "reasoning", "response", "teacher")
    adds: ClassVar[tuple[str, ...]] = (
        "token_ids", "loss_mask", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
        "n_tokens", "logprobs_truncated", "logprobs_teacher",
    )
    params: LogprobsParams

    def __init__(self, params: StageParams, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._guard: dict[str, Any] | None = None
        self._tok: Any = None
        self._eot: list[int] = []
        self._limit: int | None = None
        self._ready = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None
        state["_ready"] = False
        return state

    # -- declarations ------------------------------------------------------------------------------
    def output_columns(self) -> list[str]:
        cols = list(self.adds)
        if not self.params.top_k:
            cols = [c for c in cols if not c.startswith("teacher_topk_")]
        return cols

    def engine_names(self) -> list[str]:
        p = self.params
        return [p.engine] + ([str(p.student_engine)] if p.student_engine and p.student_engine != p.engine else [])

    def fingerprint_extra(self) -> dict[str, Any]:
        guard = self.check_guard()
        extra: dict[str, Any] = {"engine": guard["teacher"]}
        max_len = getattr(self.ctx.engines[self.params.engine], "max_model_len", None)
        if max_len:
            extra["engine_max_model_len"] = max_len
        return extra

    # -- the guard (runs when the runner builds the stages: before anything runs) ----------------
    def check_guard(self) -> dict[str, Any]:
        """Check scoring ability, tokenizer and teacher consistency; refuse (RunFailed) or record."""
        if self._guard is not None:
            return self._guard
        p = self.params
        where = f"stage `logprobs` (engine {p.engine!r})"
        try:
            engine = self.ctx.engine(p.engine)
        except KeyError as e:
            _refuse(f"{where}: {e.args[0]}")
        if type(engine).score is Engine.score:
            _refuse(
                f"{where}: engine kind {engine.kind!r} cannot score given token ids (it needs prompt log-probs). "
                "Score with a `vllm` or `transformers` engine on the same checkpoint: its fingerprint then equals the "
                "SFT teacher's."
            )
        max_logprobs = getattr(engine.config, "max_logprobs", None)
        if isinstance(max_logprobs, int) and p.top_k > max_logprobs:
            _refuse(f"{where}: top_k={p.top_k} is above the engine's max_logprobs={max_logprobs}; raise `max_logprobs` in its config")
        teacher = self.ctx.engine_fingerprint(p.engine)
        info = engine.fingerprint_info()
        guard: dict[str, Any] = {"teacher": teacher, "teacher_tok": info.get("tokenizer_hash") or tok_part(teacher)}

        # the student shares the teacher's tokenizer (no override)
        student_fp = None
        tok_check = "unchecked"
        if p.student_engine or p.student_tokenizer:
            s_hash, s_tok = None, None
            if p.student_engine:  # its fingerprint marks its rollouts in the rows' `teacher` column
                student_fp = self.ctx.engine_fingerprint(p.student_engine)
            if p.student_tokenizer:  # the tokenizer to check: this one when given, else the engine's
                from tracepipe.engines._hf import load_tokenizer, resolve_local, tokenizer_digest

                local = resolve_local(str(p.student_tokenizer), self.ctx.recipe_dir)
                s_hash = tokenizer_digest(local) if local is not None else None

                def s_tok() -> Any:
                    return load_tokenizer(str(p.student_tokenizer), base_dir=self.ctx.recipe_dir)
            else:
                s_engine = self.ctx.engine(str(p.student_engine))
                s_hash = s_engine.fingerprint_info().get("tokenizer_hash") or tok_part(student_fp)

                def s_tok() -> Any:
                    return s_engine.tokenizer()
            if not (s_hash and guard["teacher_tok"] and s_hash == guard["teacher_tok"]):
                try:
                    same = tokenizer_identity(s_tok()) == tokenizer_identity(engine.tokenizer())
                except NotImplementedError as e:
                    _refuse(f"{where}: cannot compare the student's and the teacher's tokenizers ({e}); set `student_tokenizer:`")
                if not same:
                    who = f"student tokenizer {p.student_tokenizer!r}" if p.student_tokenizer else f"student engine {p.student_engine!r}"
                    _refuse(
                        f"{where}: the {who} does not share the teacher's tokenizer (vocabulary or encodings differ). "
                        "On-policy distillation compares the two models token by token on the same token ids; "
                        "there is no override."
                    )
            tok_check = "verified"
        guard["student"] = student_fp
        guard["tokenizer_check"] = tok_check

        # the SFT teacher, as the recipe names it
        declared: list[str] = []
        sources: list[str] = []
        if p.sft_teacher:
            try:
                declared.append(self.ctx.engine_fingerprint(p.sft_teacher))
            except KeyError as e:
                _refuse(f"{where}: sft_teacher: {e.args[0]}")
            sources.append(f"sft_teacher {p.sft_teacher!r}")
        if p.sft_teacher_fingerprint:
            declared.append(p.sft_teacher_fingerprint)
            sources.append("sft_teacher_fingerprint")
        if p.sft_dataset:
            path = p.sft_dataset if "://" in p.sft_dataset else str(self.ctx.resolve_path(p.sft_dataset))
            found = sft_dataset_teachers(path)
            if not found:
                _refuse(
                    f"{where}: sft_dataset {p.sft_dataset!r} records no teacher (no summary.json `teachers`, no "
                    "`teacher` column); name it with `sft_teacher:` or `sft_teacher_fingerprint:`"
                )
            declared += found
            sources.append(f"sft_dataset {p.sft_dataset!r}")
        declared = sorted(set(declared))
        guard["sft_teachers"] = declared
        mismatch = bool(declared) and declared != [teacher]
        if mismatch and not p.allow_teacher_mismatch:
            _refuse(
                f"{where}: refusing to score with teacher {teacher} because the SFT data was produced by "
                f"{', '.join(declared)} (from {', '.join(sources)}). {WHY} Score with the SFT teacher's exact "
                "checkpoint, tokenizer and chat template, or set `allow_teacher_mismatch: true` to score anyway "
                "(recorded in the run stats and the dataset card)."
            )
        if (p.student_engine or p.student_tokenizer) and not declared and not p.allow_teacher_mismatch:
            _refuse(
                f"{where}: the rows are rollouts of a declared student, but the recipe does not say which teacher produced "
                f"the student's SFT data. {WHY} Name it with `sft_teacher:` (an engine), `sft_teacher_fingerprint:` or "
                "`sft_dataset:`, or set `allow_teacher_mismatch: true`."
            )
        guard["config_mismatch"] = mismatch
        self._guard = guard
        return guard

    def _row_check(self, generator: str | None) -> str | None:
        """Error for a row whose trace writer contradicts the guard (None when it is fine)."""
        g = self.check_guard()
        if generator is None or generator == g["teacher"] or generator == g["student"]:
            return None
        if self.params.allow_teacher_mismatch:
            gt = tok_part(generator)
            if g["student"] is None and gt and g["teacher_tok"] and gt != g["teacher_tok"]:
                return (f"logprobs: the trace was written by {generator}, whose tokenizer (tok:{gt}) is not the teacher's "
                        f"(tok:{g['teacher_tok']}); declare `student_engine:` / `student_tokenizer:` if the student's matches")
            return None
        return (
            f"logprobs: the trace was written by {generator} but teacher {g['teacher']} scores it. {WHY} "
            "If these rows are student rollouts, name the student (`student_engine:`) and the SFT teacher "
            "(`sft_teacher:`); to score anyway set `allow_teacher_mismatch: true`."
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    def setup(self) -> None:
        self.check_guard()
        engine = self.ctx.engine(self.params.engine)
        self._load_tokens(engine)
        engine.ensure_started()
        self._limit = self._length_limit(engine)  # the live context
        self._ready = True

    def _load_tokens(self, engine: Engine) -> None:
        """Tokenizer, end-of-turn ids and length limit (the engine's context once started, else
        its config's): all :meth:`encode` needs, without starting the engine."""
        self._tok = engine.tokenizer()
        kwargs = getattr(engine.config, "chat_template_kwargs", None) or None
        self._eot = end_of_turn_ids(self._tok, kwargs) if self.params.mask_end_of_turn else []
        self._limit = self._length_limit(engine)

    def _length_limit(self, engine: Engine) -> int:
        ctx = scoring_limit(engine)
        return self.params.max_length if ctx is None else min(self.params.max_length, ctx)

    def encode(self, rows: list[dict[str, Any]]) -> list[Encoded | str]:
        """Tokens and loss masks of rows, as this stage scores them (see :func:`encode_rows`)."""
        p = self.params
        engine = self.ctx.engine(p.engine)
        if self._tok is None:
            self._load_tokens(engine)
        return encode_rows(
            self._tok, rows, template=p.assistant_template, reasoning_mode=p.reasoning, eot_ids=self._eot,
            max_length=self._limit, chat_template_kwargs=getattr(engine.config, "chat_template_kwargs", None) or None,
        )

    def _encoded(self, rows: list[dict[str, Any]]) -> tuple[list[Encoded | None], list[str | None], list[str | None]]:
        """Per row: its sequence to score, or why it is dropped, or why it fails (the guard):
        what :meth:`process` scores and ``tracepipe plan`` counts."""
        n = len(rows)
        enc: list[Encoded | None] = [None] * n
        drops: list[str | None] = [None] * n
        errors: list[str | None] = [self._row_check(r.get("teacher")) for r in rows]
        ok: list[int] = []
        for i, r in enumerate(rows):
            if errors[i] is not None:
                continue
            if r.get("response") is None and self.params.incomplete == "drop":
                drops[i] = "logprobs: incomplete completion"
            else:
                ok.append(i)
        for i, e in zip(ok, self.encode([rows[i] for i in ok])):
            if isinstance(e, Encoded):
                enc[i] = e
            else:
                drops[i] = e
        return enc, drops, errors

    def score_tokens(self, batch: pl.DataFrame) -> list[int] | None:
        if not {"reasoning", "response"} & set(batch.columns):
            return None  # the traces are not there yet (an earlier stage has not run)
        return [len(e.token_ids) for e in self._encoded(batch.to_dicts())[0] if e is not None]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        if not self._ready:
            self.setup()
        engine = self.ctx.engine(p.engine)
        teacher = self.check_guard()["teacher"]
        enc, drops, errors = self._encoded(batch.to_dicts())
        todo = [i for i, e in enumerate(enc) if e is not None]
        scores: dict[int, Any] = {}
        chunk: list[int] = []
        used = 0
        for i in [*todo, None]:
            size = len(enc[i].token_ids) if i is not None else 0  # type: ignore[union-attr]
            if chunk and (i is None or used + size > p.max_batch_tokens):
                res = engine.score([enc[j].token_ids for j in chunk], p.top_k)  # type: ignore[union-attr]
                if len(res) != len(chunk):
                    raise RuntimeError(f"engine returned {len(res)} scores for {len(chunk)} sequences")
                scores.update(zip(chunk, res))
                chunk, used = [], 0
            if i is not None:
                chunk.append(i)
                used += size
        return self._frame(batch.get_column(IN_KEY_COL), enc, scores, drops, errors, teacher)

    def _frame(self, keys: pl.Series, enc: list[Encoded | None], scores: dict[int, Any], drops: list[str | None],
               errors: list[str | None], teacher: str) -> pl.DataFrame:
        p = self.params
        n = len(enc)
        ids = [e.token_ids if e is not None else None for e in enc]
        cols: dict[str, pa.Array] = {
            IN_KEY_COL: keys.to_arrow(),
            "token_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "loss_mask": pa.array([e.loss_mask if e is not None else None for e in enc], type=pa.list_(pa.int8())),
            "teacher_logprobs": pa.array([scores[i].logprobs if i in scores else None for i in range(n)], type=pa.list_(pa.float32())),
        }
        if p.top_k:
            f_pa = pa.float16() if p.topk_dtype == "float16" else pa.float32()
            tk_ids, tk_lps = [], []
            for i in range(n):
                s = scores.get(i)
                if s is None:
                    tk_ids.append(None)
                    tk_lps.append(None)
                    continue
                tk_ids.append([None, *s.topk_ids[1:]])
                tk_lps.append([None, *s.topk_logprobs[1:]])
            cols["teacher_topk_ids"] = pa.array(tk_ids, type=pa.list_(pa.list_(pa.int32())))
            cols["teacher_topk_logprobs"] = pa.array(tk_lps, type=pa.list_(pa.list_(f_pa)))
        cols["n_tokens"] = pa.array([len(e.token_ids) if e is not None else None for e in enc], type=pa.int32())
        cols["logprobs_truncated"] = pa.array([e.truncated if e is not None else None for e in enc], type=pa.bool_())
        cols["logprobs_teacher"] = pa.array([teacher if e is not None else None for e in enc], type=pa.string())
        cols[DROP_COL] = pa.array(drops, type=pa.string())
        cols[ERROR_COL] = pa.array(errors, type=pa.string())
        return arrow_frame(cols)

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        """Token counts and the teacher-consistency record (``teacher_consistency``) of this run."""
        schema = out.collect_schema()
        if "token_ids" not in schema:
            return {}
        g = self.check_guard()
        s = out.select(
            pl.len().alias("rows"),
            pl.col("n_tokens").sum().alias("tokens"),
            pl.col("loss_mask").list.sum().sum().alias("loss_tokens"),
            pl.col("logprobs_truncated").fill_null(False).sum().alias("truncated"),
        ).collect().row(0, named=True)
        writers = (
            out.select(pl.col("teacher").drop_nulls().unique()).collect().to_series().to_list() if "teacher" in schema else []
        )
        foreign = [w for w in writers if w not in (g["teacher"], g["student"])]
        mismatch_rows = 0
        if foreign:
            mismatch_rows = int(out.filter(pl.col("teacher").is_in(foreign)).select(pl.len()).collect().item())
            if not self.params.allow_teacher_mismatch:  # cached rows scored under an override that is gone
                _refuse(
                    f"stage `logprobs`: {mismatch_rows} stored row(s) are traces written by {', '.join(foreign)}, not by "
                    f"the scoring teacher {g['teacher']}. {WHY} Set `allow_teacher_mismatch: true` to keep them."
                )
        tok_check = g["tokenizer_check"]
        if tok_check == "unchecked" and writers and all(tok_part(w) == g["teacher_tok"] for w in writers if w):
            tok_check = "verified"  # every writer's fingerprint carries the teacher's tokenizer hash
        known = set(g["sft_teachers"]) | set(foreign) | ({g["teacher"]} if g["teacher"] in writers else set())
        if g["config_mismatch"] or foreign:
            consistency = "overridden"
        elif known:
            consistency = "verified"
        else:
            consistency = "unknown"
        return {
            "logprobs_teacher": g["teacher"],
            "sft_teachers": sorted(set(g["sft_teachers"]) | set(foreign)),
            "teacher_consistency": consistency,
            "allow_teacher_mismatch": bool(self.params.allow_teacher_mismatch),
            "teacher_mismatch_rows": mismatch_rows if foreign else (int(s["rows"]) if g["config_mismatch"] else 0),
            "tokenizer_check": tok_check,
            "top_k": self.params.top_k,
            "rows": int(s["rows"]),
            "tokens": int(s["tokens"] or 0),
            "loss_tokens": int(s["loss_tokens"] or 0),
            "truncated": int(s["truncated"] or 0),
        }
