"""Re-verification of rewritten / student responses with :mod:`tracepipe.verifiers`.

Used by the stages that produce a new response and must check it the way ``verify`` checks the
teacher's (``compress`` re-verifies rewrites, ``student_rollouts`` verifies student samples):
routing by ``domain`` as ``verify`` does (``math`` -> math-verify against the gold answer in
supervised worker processes, :class:`tracepipe.verifiers.math.MathChecker`, which keeps SIGALRM
out of the stage's thread; ``code`` -> the tests in the sandbox,
:class:`tracepipe.verifiers.code.CodeVerifier`; any other domain -> ``unverifiable``; a null
domain is routed by what the row has: ``tests`` -> code, else math). Both are created on first use and closed by
:meth:`Reverifier.close`.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Item:
    """One response to check: against ``gold`` (math) or ``tests`` (code)."""

    response: str | None
    domain: str | None
    gold: str | None = None
    tests: Any = None


@dataclass
class Outcome:
    verdict: str  # correct | incorrect | unverifiable | error
    pred: str | None
    detail: str


def route(domain: str | None, tests: Any) -> str:
    """``math``, ``code`` or another domain (unverifiable), as the ``verify`` stage routes rows."""
    if isinstance(domain, str) and domain:
        return domain
    return "code" if tests not in (None, "") else "math"


def is_code(domain: str | None, tests: Any) -> bool:
    return route(domain, tests) == "code"


def _tests(t: Any) -> Any:
    return t if (t is None or isinstance(t, str)) else json.dumps(t)


class Reverifier:
    """Checks batches of :class:`Item` with the project's verifiers (math and code)."""

    def __init__(self, *, math_timeout_s: int = 5, math_workers: int = 1, code_workers: int = 2) -> None:
        self.math_timeout_s = math_timeout_s
        self.math_workers = math_workers
        self.code_workers = code_workers
        self._math: Any = None
        self._code: Any = None
        # a streamed stage calls check() from several threads; the math workers serve one batch
        # at a time (the check is milliseconds beside the engine call that precedes it)
        self._math_lock = threading.Lock()

    def _math_checker(self) -> Any:
        if self._math is None:
            from tracepipe.verifiers.math import MathChecker

            self._math = MathChecker(timeout_s=self.math_timeout_s, workers=self.math_workers)
        return self._math

    def _code_verifier(self) -> Any:
        if self._code is None:
            from tracepipe.verifiers.code import CodeVerifier

            self._code = CodeVerifier()
        return self._code

    def check(self, items: list[Item]) -> list[Outcome]:
        """One outcome per item, in order."""
        out: list[Outcome | None] = [None] * len(items)
        routes = [route(it.domain, it.tests) for it in items]
        math_idx = [i for i, r in enumerate(routes) if r == "math"]
        code_idx = [i for i, r in enumerate(routes) if r == "code"]
        if math_idx:
            with self._math_lock:
                res = self._math_checker().check([(items[i].response, items[i].gold) for i in math_idx])
            for i, r in zip(math_idx, res):
                out[i] = Outcome(r.verdict, r.pred_answer, r.detail)
        if code_idx:
            ver = self._code_verifier()
            with ThreadPoolExecutor(max(1, self.code_workers)) as pool:  # one sandbox per call
                res = list(pool.map(lambda i: ver.verify(items[i].response, _tests(items[i].tests)), code_idx))
            for i, r in zip(code_idx, res):
                out[i] = Outcome(r.verdict, None, r.detail)
        return [o if o is not None else Outcome("unverifiable", None, f"no checker for domain {r!r}") for o, r in zip(out, routes)]

    def close(self) -> None:
        if self._math is not None:
            self._math.close()
            self._math = None
        self._code = None


class EngineReverifierLifecycle:
    """``setup`` / ``teardown`` of row stages that call ``params.engine`` and re-verify what it
    wrote (compress, student_rollouts): start the engine, hold one :class:`Reverifier`."""

    params: Any
    ctx: Any
    _rv: Reverifier | None = None

    def reverifier(self) -> Reverifier:
        if self._rv is None:
            self._rv = Reverifier(math_timeout_s=self.params.math_timeout_s, math_workers=self.params.verify_workers)
        return self._rv

    def engine_names(self) -> list[str]:
        return [self.params.engine] if self.params.engine else []

    def setup(self) -> None:
        self.ctx.engine(self.params.engine).ensure_started()
        self.reverifier()

    def teardown(self) -> None:
        if self._rv is not None:
            self._rv.close()
            self._rv = None
