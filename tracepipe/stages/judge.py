"""``judge``: an LLM judges the final answers the rules could not decide (a model row stage).

Input columns: ``problem``, ``answer`` (gold), ``pred_answer``, ``response`` (only its last line,
when no answer was extracted), ``verdict``, ``verify_detail``, ``format_issues`` (and, for a
``replay`` engine as judge, the columns it replays). Never ``reasoning``.
Output columns: ``verdict`` (rewritten where the judge decides), ``verdict_method`` (``rule`` |
``judge``), ``rule_verdict`` (the verdict the rules gave), ``judge_verdict`` (``correct`` |
``incorrect`` | null: not asked, or the reply names neither), ``judge_agrees`` (``when: always``:
whether the judge gives the rules' verdict; null where the rules did not decide) and
``judge_output`` (the judge's raw reply, at most 2,000 characters).

Why: a gold answer in prose, or an answer no rule can parse, leaves ``verify`` with
``unverifiable``, which says nothing about the trace. The judge engine sees a fixed prompt with
the problem, the gold answer and the final answer (``pred_answer``, else the response's last
line), never the reasoning, and answers one word. ``when: unverifiable`` (default) asks only for
rows whose verdict is ``unverifiable`` (or null: no verify stage) and that have a gold answer; their
verdict becomes the judge's (``unverifiable`` when the reply names neither word) with
``verdict_method: judge``. ``when: always`` also asks for rows the rules decided, keeps the rules'
verdict there and records every disagreement (``judge_agrees`` false; counts and the rows in the
run stats and ``tracepipe report``), which is how a user audits both. A rule verdict that only
format checks made ``incorrect`` counts as an answer the rules found ``correct``; with
``format_strict`` (verify's ``format.strict``) a judged row with format issues is never ``correct``.

Why a stage of its own: the runtime streams a stage through an engine only when the stage names
one (``engine_names()``), and caches, resumes and counts its requests per row; ``verify`` is a
CPU stage run in a process pool. So ``verify: {judge: {engine: grader}}`` is expanded by the
recipe loader into ``verify`` followed by this stage with the same parameters (a judge setting
never changes verify's own results), and ``judge`` may also be written on its own after any stage
that leaves verdicts. Its row key is the columns above, so a rerun asks nothing, ``kill -9`` loses
at most the uncommitted rows, and the rows the rules decided cost no request under
``when: unverifiable``.

Example::

    - verify: {judge: {engine: grader, when: unverifiable}}
    - judge: {engine: grader, when: always}
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import polars as pl

from tracepipe.contract import IN_KEY_COL
from tracepipe.engines.base import GenerationRequest, SamplingParams
from tracepipe.hashing import seed_for
from tracepipe.stages import register
from tracepipe.stages._judge import JudgeParams
from tracepipe.stages.base import RowStage

PROMPT = (
    "You check a final answer against the reference answer of a problem. The final answer is correct when it "
    "means the same as the reference answer: an equivalent number, expression or wording counts; a different, "
    "partial or extra answer does not. Do not solve the problem again.\n\n"
    "Problem:\n{problem}\n\nReference answer:\n{gold}\n\nFinal answer:\n{answer}\n\n"
    "Reply with one word: correct or incorrect."
)
UNDECIDED = (None, "unverifiable")
OUTPUT_CHARS = 2000
_WORD = re.compile(r"\b(not\s+correct|incorrect|correct|wrong)\b", re.IGNORECASE)
_SLOT = re.compile(r"\{(problem|gold|answer)\}")
SCHEMA: dict[str, Any] = {
    IN_KEY_COL: pl.String, "verdict": pl.String, "verdict_method": pl.String, "rule_verdict": pl.String,
    "judge_verdict": pl.String, "judge_agrees": pl.Boolean, "judge_output": pl.String,
}


def parse_verdict(text: str | None, close_tag: str = "</think>") -> str | None:
    """``correct`` / ``incorrect`` from a judge's reply (the last such word after its thinking), or None."""
    if not text:
        return None
    if close_tag in text:
        text = text.rsplit(close_tag, 1)[1]
    hits = _WORD.findall(text)
    if not hits:
        return None
    return "correct" if hits[-1].lower() == "correct" else "incorrect"


def final_answer(pred: str | None, response: str | None, limit: int, close_tag: str = "</think>") -> str | None:
    """What the judge is shown: the extracted answer, else the response's last non-empty line."""
    text = (pred or "").strip()
    if not text and response:
        tail = response.rsplit(close_tag, 1)[1] if close_tag in response else response
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return text[:limit] if text else None


def judge_prompt(problem: str, gold: str, answer: str) -> str:
    """The fixed prompt (one pass, so a problem that contains ``{gold}`` stays as written)."""
    values = {"problem": problem, "gold": gold, "answer": answer}
    return _SLOT.sub(lambda m: values[m.group(1)], PROMPT)


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= OUTPUT_CHARS:
        return text
    return "…" + text[-(OUTPUT_CHARS - 1):]  # a reasoning judge says its word at the end


@register("judge")
class Judge(RowStage):
    """The judge engine decides the final answers the rules left undecided (and audits the rest)."""

    version: ClassVar[str] = "1"
    Params = JudgeParams
    reads: ClassVar[tuple[str, ...]] = ("problem", "answer", "pred_answer", "response", "verdict", "verify_detail", "format_issues")
    adds: ClassVar[tuple[str, ...]] = ("verdict", "verdict_method", "rule_verdict", "judge_verdict", "judge_agrees", "judge_output")
    params: JudgeParams

    def input_columns(self) -> list[str]:
        cols = list(self.reads)
        return cols + [c for c in self.ctx.engine_row_columns(self.params.engine) if c not in cols]

    def engine_names(self) -> list[str]:
        return [self.params.engine]

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"judge": self.ctx.engine_fingerprint(self.params.engine), "prompt": PROMPT}

    def setup(self) -> None:
        self.ctx.engine(self.params.engine).ensure_started()

    def _shown(self, r: dict[str, Any]) -> str | None:
        """The final answer to show the judge, or None when the row is not for the judge."""
        gold = r.get("answer")
        if gold is None or not str(gold).strip():
            return None
        if self.params.when == "unverifiable" and r.get("verdict") not in UNDECIDED:
            return None
        return final_answer(r.get("pred_answer"), r.get("response"), self.params.answer_chars, self.params.think_tags[1])

    def _requests(self, rows: list[dict[str, Any]]) -> tuple[list[int], list[GenerationRequest]]:
        """The rows to ask about (their positions) and one request for each."""
        p = self.params
        shown = [self._shown(r) for r in rows]
        ask = [i for i, s in enumerate(shown) if s is not None]
        reqs = [
            GenerationRequest(
                messages=[{"role": "user", "content": judge_prompt(str(rows[i].get("problem") or ""), str(rows[i]["answer"]), str(shown[i]))}],
                n=1, key=rows[i][IN_KEY_COL],
                sampling=SamplingParams(temperature=p.temperature, max_tokens=p.max_tokens, seed=seed_for(rows[i][IN_KEY_COL], 0, p.seed)),
                row={k: v for k, v in rows[i].items() if k != IN_KEY_COL},
            )
            for i in ask
        ]
        return ask, reqs

    def requests(self, batch: pl.DataFrame) -> list[GenerationRequest] | None:
        """What :meth:`process` would ask (``tracepipe plan`` counts it): rows the rules decided
        cost nothing. None (one request a row) while the stages before it have not run."""
        if not {"pred_answer", "response"} & set(batch.columns):
            return None
        return self._requests(batch.to_dicts())[1]

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        rows = batch.to_dicts()
        ask, reqs = self._requests(rows)
        results = self.ctx.engine(p.engine).generate(reqs) if reqs else []
        if len(results) != len(reqs):
            raise RuntimeError(f"judge engine returned {len(results)} results for {len(reqs)} requests")
        replies: dict[int, str | None] = {}
        for i, res in zip(ask, results):
            c = res[0] if res else None
            replies[i] = None if c is None or c.finish_reason == "prompt_too_long" else c.text
        out: dict[str, list[Any]] = {c: [] for c in SCHEMA}
        for i, r in enumerate(rows):
            rule = r.get("verdict")
            detail = r.get("verify_detail") or ""
            # a verdict only format checks made incorrect: the rules found the answer itself correct
            rule_answer = "correct" if rule == "incorrect" and detail.startswith("format:") else rule
            text = replies.get(i)
            said = parse_verdict(text, p.think_tags[1]) if i in replies else None
            verdict, method, agrees = rule, "rule", None
            if i in replies and text is not None and rule in UNDECIDED:
                verdict, method = said or "unverifiable", "judge"
                if verdict == "correct" and p.format_strict and r.get("format_issues"):
                    verdict = "incorrect"
            elif said is not None and rule_answer in ("correct", "incorrect"):
                agrees = said == rule_answer
            for col, v in (("verdict", verdict), ("verdict_method", method), ("rule_verdict", rule), ("judge_verdict", said),
                           ("judge_agrees", agrees), ("judge_output", _clip(text))):
                out[col].append(v)
            out[IN_KEY_COL].append(r[IN_KEY_COL])
        return pl.DataFrame(out, schema=SCHEMA)

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        schema = out.collect_schema()
        if "verdict_method" not in schema:
            return {}
        counts = out.select(
            (pl.col("verdict_method") == "judge").sum().alias("judged"),
            pl.col("judge_output").is_not_null().sum().alias("asked"),
            (pl.col("judge_output").is_not_null() & pl.col("judge_verdict").is_null()).sum().alias("unparsed"),
            (pl.col("judge_agrees") == True).sum().alias("agreements"),  # noqa: E712 - polars expression
            (pl.col("judge_agrees") == False).sum().alias("disagreements"),  # noqa: E712
        ).collect().row(0, named=True)
        res: dict[str, Any] = {k: int(v or 0) for k, v in counts.items()}
        methods = out.group_by("verdict_method").len().collect()
        res["verdict_method"] = {str(k): int(n) for k, n in methods.iter_rows()}
        judged = out.filter(pl.col("verdict_method") == "judge").group_by("verdict").len().collect()
        res["judge_verdicts"] = {str(k): int(n) for k, n in judged.iter_rows()}
        dis = out.filter(pl.col("judge_agrees") == False)  # noqa: E712
        pairs = dis.group_by("rule_verdict", "judge_verdict").len().collect()
        res["disagreement_pairs"] = {f"rule {a} / judge {b}": int(n) for a, b, n in pairs.sort("rule_verdict", "judge_verdict").iter_rows()}
        if res["disagreements"] and self.params.report_rows:
            cols = [c for c in ("id", "problem", "answer", "pred_answer", "rule_verdict", "judge_verdict", "judge_output") if c in schema]
            rows = dis.select(cols).head(self.params.report_rows).collect()
            res["disagreement_rows"] = [
                {k: (v[:300] if isinstance(v, str) and k in ("problem", "judge_output") else v) for k, v in row.items()}
                for row in rows.iter_rows(named=True)
            ]
        return res
