"""Verifiers: math answers (math-verify), code in a sandbox, trace-format checks.

- :mod:`tracepipe.verifiers.math`: extract the final answer, compare with math-verify in worker
  processes with a hard per-item wall timeout;
- :mod:`tracepipe.verifiers.answers`: the typed comparison run on top of math-verify (each answer's
  kind on both sides, compared within the kind, exact where both are exact);
- :mod:`tracepipe.verifiers.code`: run the last fenced Python block against functional or stdio
  tests in bubblewrap + rlimits;
- :mod:`tracepipe.verifiers.format`: thinking block closed, not truncated, answer present, no
  repetition loops, length bounds.

Submodules are imported on use (math-verify pulls in sympy), so importing this package is cheap.
"""

from __future__ import annotations

VERDICTS = ("correct", "incorrect", "unverifiable", "error")

__all__ = ["VERDICTS"]
