"""Executors run a row stage's missing batches: ``local`` (default) and ``ray`` (Ray Data).

Both share the store, so either one can resume or extend the other's work.
"""

from __future__ import annotations

from typing import Any

from tracepipe.pipeline.executors.base import Executor, normalize_output, safe_process
from tracepipe.pipeline.executors.local import LocalExecutor  # the default: imported with the package


def get_executor(kind: str, **kw: Any) -> Executor:
    if kind == "local":
        return LocalExecutor(**kw)
    if kind == "ray":
        from tracepipe.pipeline.executors.ray import RayExecutor  # type: ignore[import-not-found]

        return RayExecutor(**kw)
    raise ValueError(f"unknown executor {kind!r} (local | ray)")


__all__ = ["Executor", "get_executor", "normalize_output", "safe_process"]
