"""``verify``: check every trace's answer (math), program (code) and format (a cpu-bound row stage).

Input columns: ``response``, ``domain``, ``answer`` (math gold), ``tests`` (code tests JSON), and
for the format checks ``reasoning``, ``finish_reason``, ``truncated`` (and ``completion_tokens``
when ``format.max_completion_tokens`` is set), each when present.
Output columns: ``pred_answer`` (the extracted final answer, math), ``verdict`` (``correct`` |
``incorrect`` | ``unverifiable`` | ``error``), ``verdict_method`` (``rule``: these checks; a
``judge`` stage after it sets ``judge`` where an LLM decided), ``verify_detail`` (why, in words)
and ``format_issues`` (list of named format failures, see :mod:`tracepipe.verifiers.format`).

Why: SFT keeps only verified traces, DPO pairs a correct trace with an incorrect one, and
difficulty needs the verdict of every sample; so failures are kept by default (annotated) and
dropped only when ``drop`` names them (rejects get reason ``verify:<verdict>`` or
``verify:format:<issue>``, still queryable under ``<workdir>/rejects/``).

Routing by ``domain``: ``math`` -> math-verify against ``answer`` (in supervised worker
processes with a hard per-item wall timeout; a stuck item gets ``error`` with detail
``timeout``); ``code`` -> the last fenced Python block runs against ``tests`` in the sandbox
(bubblewrap + rlimits + wall timeout; see :mod:`tracepipe.verifiers.code`); any other domain ->
``unverifiable``. A row whose domain is null is routed by what it has (``tests`` -> code, else
math). With ``format.strict`` (default) a trace that fails a format check is never ``correct``.

An LLM judge for what no rule can decide: ``judge: {engine: grader, when: unverifiable}`` (or
``always``) adds a ``judge`` stage right after this one (see :mod:`tracepipe.stages.judge`; the
recipe loader expands it, and its settings never change this stage's results or cache). ``drop:
[unverifiable]`` would drop those rows before the judge sees them, so it is refused with a judge
(drop them after it: ``filter: {where: "verdict <> 'unverifiable'"}``).

When bubblewrap is missing the stage warns loudly and sandboxes with rlimits only; with
``code.require_isolation: true`` it refuses: code rows are quarantined with the reason, and the
run fails past ``max_error_rate``.

Example::

    - verify: {drop: [error], code: {timeout_s: 5, memory_mb: 512}, format: {max_completion_tokens: 16000}}
    - verify: {judge: {engine: grader, when: unverifiable}}
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tracepipe.contract import DROP_COL, ERROR_COL, IN_KEY_COL
from tracepipe.stages import register
from tracepipe.stages._judge import JudgeParams
from tracepipe.stages.base import ExecField, RowStage, StageParams


class _Sub(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MathParams(_Sub):
    timeout_s: int = Field(5, ge=1, description="math-verify's own timeout per parse / comparison (SIGALRM)")
    hard_timeout_s: float = Field(30.0, gt=0, description="wall time per item; past it the worker is killed and the item gets error: timeout")
    last_number: bool = Field(False, description="fall back to the last number in the response when no answer marker is found")
    memory_mb: int | None = Field(4096, ge=256, description="address-space limit of a math worker")


class CodeParams(_Sub):
    timeout_s: float = Field(10.0, gt=0, description="wall time of one functional test run (whole sandbox)")
    cpu_s: int = Field(10, ge=1, description="CPU seconds (RLIMIT_CPU) of a functional test run")
    memory_mb: int = Field(1024, ge=64, description="address space (RLIMIT_AS) of the program")
    nproc: int = Field(32, ge=4, description="processes + threads the sandbox may hold (RLIMIT_NPROC)")
    fsize_mb: int = Field(16, ge=1, description="largest file the program may write (RLIMIT_FSIZE)")
    nofile: int = Field(64, ge=16, description="open files (RLIMIT_NOFILE)")
    tmpfs_mb: int = Field(64, ge=1, description="size of the private /work and /tmp")
    max_output_bytes: int = Field(1 << 20, ge=1024, description="stdout+stderr (functional) / per-case stdout (stdio) before the run is killed")
    stdio_time_limit_s: float = Field(2.0, gt=0, description="per-case time limit when the tests give none")
    stdio_slack_s: float = Field(1.0, ge=0, description="wall allowance per stdio case on top of its time limit")
    require_isolation: bool = Field(False, description="refuse (quarantine code rows) when bubblewrap cannot run instead of falling back to rlimits")
    isolation: Literal["auto", "none"] = Field("auto", description="auto: bubblewrap when it works; none: rlimits only (trusted code)")
    bwrap: str = Field("bwrap", description="bubblewrap executable (name on PATH or path)")
    python: str | None = Field(None, description="interpreter inside the sandbox (default: this one if the sandbox can run it, else /usr/bin/python3)")
    preamble: str = Field("from typing import *\n", description="prepended to functional programs (typing names used in signatures)")
    allow_unfenced: bool = Field(True, description="use the whole response as the program when it has no fenced block but is Python")


class FormatParams(_Sub):
    enabled: bool = Field(True, description="run the format checks")
    strict: bool = Field(True, description="a trace failing a format check is never `correct` (verdict becomes incorrect)")
    think_open: str = "<think>"
    think_close: str = "</think>"
    require_answer: bool = Field(True, description="`no_answer` when math finds no answer / code no program")
    loop_min_repeats: int = Field(4, ge=2)
    loop_min_chars: int = Field(200, ge=10)
    loop_max_period: int = Field(500, ge=1)
    max_line_repeats: int = Field(10, ge=0, description="same line this many times in a row -> repeated_lines (0: off)")
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1, description="response + reasoning characters")
    max_completion_tokens: int | None = Field(None, ge=1)


DropKind = Literal["incorrect", "unverifiable", "error", "format"]


class VerifyParams(StageParams):
    drop: list[DropKind] = Field(default_factory=list, description="verdicts to drop (default: keep every row, annotated); `format` drops format failures")
    math: MathParams = Field(default_factory=MathParams)
    code: CodeParams = Field(default_factory=CodeParams)
    format: FormatParams = Field(default_factory=FormatParams)
    batch_size: int = ExecField(128, ge=1, description="rows per batch (and per committed part)")
    code_concurrency: int = ExecField(4, ge=1, description="sandboxes run at once per worker process")
    math_workers: int = ExecField(1, ge=1, description="math-verify processes per worker process")
    # an ExecField: the judge is a stage of its own (added right after this one by the recipe
    # loader), so its settings never change verify's results nor its cache
    judge: JudgeParams | None = ExecField(None, description="{engine, when: unverifiable | always, ...}: a `judge` stage right after verify")

    @model_validator(mode="after")
    def _judge(self) -> VerifyParams:
        j = self.judge
        if j is None:
            return self
        if "unverifiable" in self.drop:
            raise ValueError("drop: [unverifiable] drops those rows before the judge sees them; "
                             "drop them after it (filter: {where: \"verdict <> 'unverifiable'\"})")
        if "format_strict" not in j.model_fields_set and j.format_strict != self.format.strict:
            self.judge = j.model_copy(update={"format_strict": self.format.strict})
        return self


def _row_domain(domain: Any, tests: Any) -> str:
    if isinstance(domain, str) and domain:
        return domain
    return "code" if tests not in (None, "") else "math"


def _after_think(text: str | None, close_tag: str) -> str | None:
    """A response that still holds the thinking block: keep what follows the last closing tag."""
    if text and close_tag in text:
        return text.rsplit(close_tag, 1)[1]
    return text


@register("verify")
class Verify(RowStage):
    version: ClassVar[str] = "2"  # 2: verdict_method; typed answer comparison (tracepipe.verifiers)
    Params = VerifyParams
    cpu_bound: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("response", "answer", "tests", "domain")
    adds: ClassVar[tuple[str, ...]] = ("pred_answer", "verdict", "verdict_method", "verify_detail", "format_issues")
    params: VerifyParams

    def __init__(self, params: VerifyParams, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._math: Any = None
        self._code: Any = None

    def __getstate__(self) -> dict[str, Any]:  # live workers never cross process boundaries
        state = dict(self.__dict__)
        state["_math"] = None
        state["_code"] = None
        return state

    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        if self.params.format.enabled:
            cols += ["reasoning", "finish_reason", "truncated"]
            if self.params.format.max_completion_tokens is not None:
                cols.append("completion_tokens")
        return cols

    # -- lifecycle ---------------------------------------------------------------------------
    def _math_checker(self) -> Any:
        if self._math is None:
            from tracepipe.verifiers.math import MathChecker

            m = self.params.math
            self._math = MathChecker(
                timeout_s=m.timeout_s, hard_timeout_s=m.hard_timeout_s, last_number=m.last_number,
                workers=self.params.math_workers, memory_mb=m.memory_mb,
            )
        return self._math

    def _code_verifier(self) -> Any:
        if self._code is None:
            from tracepipe.verifiers.code import CodeVerifier, SandboxLimits

            c = self.params.code
            limits = SandboxLimits(
                wall_s=c.timeout_s, cpu_s=c.cpu_s, memory_mb=c.memory_mb, nproc=c.nproc, fsize_mb=c.fsize_mb,
                nofile=c.nofile, tmpfs_mb=c.tmpfs_mb, max_output_bytes=c.max_output_bytes,
                stdio_time_limit_s=c.stdio_time_limit_s, stdio_slack_s=c.stdio_slack_s,
            )
            self._code = CodeVerifier(
                limits, isolation_mode=c.isolation, require_isolation=c.require_isolation, python=c.python,
                preamble=c.preamble, allow_unfenced=c.allow_unfenced, bwrap=c.bwrap,
            )
        return self._code

    def teardown(self) -> None:
        if self._math is not None:
            self._math.close()
            self._math = None

    # -- processing --------------------------------------------------------------------------
    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        n = batch.height

        def col(name: str) -> list[Any]:
            return batch.get_column(name).to_list() if name in batch.columns else [None] * n

        keys = col(IN_KEY_COL)
        close = self.params.format.think_close
        responses = [_after_think(r, close) for r in col("response")]
        answers, tests, domains = col("answer"), col("tests"), col("domain")
        tests = [t if (t is None or isinstance(t, str)) else json.dumps(t) for t in tests]
        routes = [_row_domain(d, t) for d, t in zip(domains, tests)]
        pred: list[str | None] = [None] * n
        verdict: list[str] = ["unverifiable"] * n
        detail: list[str] = [""] * n
        errors: list[str | None] = [None] * n
        has_answer: list[bool | None] = [None] * n

        math_idx = [i for i, r in enumerate(routes) if r == "math"]
        if math_idx:
            results = self._math_checker().check([(responses[i], answers[i]) for i in math_idx])
            for i, res in zip(math_idx, results):
                pred[i], verdict[i], detail[i] = res.pred_answer, res.verdict, f"math: {res.detail}"
                has_answer[i] = res.pred_answer is not None
        code_idx = [i for i, r in enumerate(routes) if r == "code"]
        if code_idx:
            from tracepipe.verifiers.code import IsolationUnavailable

            verifier = self._code_verifier()
            try:
                iso = verifier.iso
            except IsolationUnavailable as e:
                iso = None
                for i in code_idx:
                    errors[i] = f"verify: {e}"
            if iso is not None:
                workers = min(self.params.code_concurrency, len(code_idx))
                with ThreadPoolExecutor(workers) as ex:
                    results = list(ex.map(lambda i: verifier.verify(responses[i], tests[i]), code_idx))
                for i, res in zip(code_idx, results):
                    verdict[i] = res.verdict
                    detail[i] = f"code: {res.detail}" + (f" [{res.isolation}]" if res.isolation else "")
                    has_answer[i] = res.code is not None or res.verdict == "unverifiable"
        for i, r in enumerate(routes):
            if r not in ("math", "code"):
                detail[i] = f"no checker for domain {r!r}"

        issues: list[list[str]] = [[] for _ in range(n)]
        fp = self.params.format
        if fp.enabled:
            from tracepipe.verifiers.format import FormatConfig, check_format

            cfg = FormatConfig(
                think_open=fp.think_open, think_close=fp.think_close, require_answer=fp.require_answer,
                loop_min_repeats=fp.loop_min_repeats, loop_min_chars=fp.loop_min_chars, loop_max_period=fp.loop_max_period,
                max_line_repeats=fp.max_line_repeats, min_chars=fp.min_chars, max_chars=fp.max_chars,
                max_completion_tokens=fp.max_completion_tokens,
            )
            raw_resp, reasoning, finish, trunc, ctoks = col("response"), col("reasoning"), col("finish_reason"), col("truncated"), col("completion_tokens")
            for i in range(n):
                fr = "length" if trunc[i] is True else finish[i]
                issues[i] = check_format(raw_resp[i], reasoning=reasoning[i], finish_reason=fr, completion_tokens=ctoks[i],
                                         has_answer=has_answer[i], cfg=cfg)
                if issues[i] and fp.strict and verdict[i] == "correct":
                    verdict[i] = "incorrect"
                    detail[i] = f"format: {', '.join(issues[i])}; {detail[i]}"

        drops: list[str | None] = [None] * n
        drop = set(self.params.drop)
        for i in range(n):
            if "format" in drop and issues[i]:
                drops[i] = f"verify:format:{issues[i][0]}"
            elif verdict[i] in drop:
                drops[i] = f"verify:{verdict[i]}"
        return pl.DataFrame(
            {
                IN_KEY_COL: keys, "pred_answer": pred, "verdict": verdict, "verdict_method": ["rule"] * n,
                "verify_detail": detail, "format_issues": issues, DROP_COL: drops, ERROR_COL: errors,
            },
            schema={
                IN_KEY_COL: pl.String, "pred_answer": pl.String, "verdict": pl.String, "verdict_method": pl.String, "verify_detail": pl.String,
                "format_issues": pl.List(pl.String), DROP_COL: pl.String, ERROR_COL: pl.String,
            },
        )

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        schema = out.collect_schema()
        if "verdict" not in schema:
            return {}
        counts = out.group_by("verdict").len().collect()
        res: dict[str, Any] = {"verdicts": {str(v): int(c) for v, c in counts.iter_rows()}}
        if "format_issues" in schema:
            fi = out.select(pl.col("format_issues").explode().drop_nulls()).collect()
            if fi.height:
                res["format_issues"] = {str(v): int(c) for v, c in fi.group_by("format_issues").len().iter_rows()}
        if "verify_detail" in schema:
            iso = out.select(pl.col("verify_detail").str.extract(r"\[(bwrap|rlimits-only)\]$").drop_nulls().unique()).collect()
            if iso.height:
                res["code_isolation"] = sorted(iso.to_series().to_list())
        return res
