"""Supervised worker processes with a hard wall timeout per item.

:class:`Supervisor` runs ``module:function`` over items in ``workers`` child processes, each item
in the child's main thread (so SIGALRM-based libraries such as math-verify work). Items are sent
to a child in one message and results stream back one by one; the parent gives the item at the
head of each child's queue ``item_timeout_s`` of wall time. When it runs over (or the child dies),
the child is SIGKILLed, that item is reported as ``("error", "timeout ...")`` and the rest of that
child's queue is resent to a fresh child. Nothing else of the batch is lost.

Children start from a ``forkserver`` that has imported the ``preload`` modules once, so a restart
costs a fork, not an interpreter start and a sympy import.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

Outcome = tuple[str, Any]  # ("ok", value) | ("error", message)
_READY = ("__ready__", None)


def _resolve(target: str) -> Any:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _child_main(conn: Connection, target: str, memory_mb: int | None) -> None:
    if memory_mb:
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        except (ValueError, OSError):
            pass
    fn = _resolve(target)
    try:
        conn.send(_READY)  # the parent starts an item's clock only once the worker can work
    except (EOFError, OSError, BrokenPipeError):
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for idx, args in msg:
            try:
                out: Outcome = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001 - report, keep serving
                out = ("error", f"{type(e).__name__}: {e}"[:500])
            try:
                conn.send((idx, out))
            except (EOFError, OSError, BrokenPipeError):
                return


class _Child:
    def __init__(self, ctx: Any, target: str, memory_mb: int | None) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child_main, args=(child, target, memory_mb), daemon=True)
        cfg = mp.current_process()._config  # type: ignore[attr-defined]
        was_daemon = cfg.get("daemon")
        try:
            # inside a daemonic process (a multiprocessing.Pool worker) multiprocessing refuses
            # children; ours are safe there: they exit when our end of the pipe closes
            cfg["daemon"] = False
            self.proc.start()
        finally:
            if was_daemon is not None:
                cfg["daemon"] = was_daemon
        child.close()
        self.conn: Connection = parent
        self.queue: deque[int] = deque()
        self.started = time.monotonic()
        self.ready = False

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(5)
        try:
            self.conn.close()
        except OSError:
            pass

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(2)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class Supervisor:
    """``map(items)`` with a hard per-item wall timeout; see the module docstring."""

    def __init__(
        self, target: str, *, workers: int = 1, item_timeout_s: float = 30.0, memory_mb: int | None = None,
        preload: list[str] | None = None, start_method: str | None = None, startup_timeout_s: float = 120.0,
    ) -> None:
        self.target = target
        self.workers = max(1, int(workers))
        self.item_timeout_s = float(item_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.memory_mb = memory_mb
        method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        self.ctx = mp.get_context(method)
        if method == "forkserver":
            self.ctx.set_forkserver_preload([target.partition(":")[0], *(preload or [])])
        self._children: list[_Child | None] = [None] * self.workers
        self.restarts = 0
        self.timeouts = 0
        self._pid = os.getpid()

    def _child(self, i: int) -> _Child:
        c = self._children[i]
        if c is None or not c.proc.is_alive():
            if c is not None:
                c.kill()
            c = _Child(self.ctx, self.target, self.memory_mb)
            self._children[i] = c
        return c

    def start(self) -> None:
        """Start the workers now (otherwise the first ``map`` does)."""
        for i in range(self.workers):
            self._child(i)

    def map(self, items: list[tuple[Any, ...]]) -> list[Outcome]:
        """Run the target on every argument tuple; one outcome per item, in order."""
        results: list[Outcome | None] = [None] * len(items)
        # contiguous shares: neighbouring items (samples of one problem) share a worker's caches
        bounds = [round(k * len(items) / self.workers) for k in range(self.workers + 1)]
        shares: list[list[int]] = [list(range(bounds[k], bounds[k + 1])) for k in range(self.workers)]
        active: dict[int, _Child] = {}
        for w, share in enumerate(shares):
            if share:
                active[w] = self._send(w, share, items)
        while active:
            now = time.monotonic()
            ready = wait([c.conn for c in active.values()], timeout=max(0.0, min(self._deadline(c) for c in active.values()) - now))
            now = time.monotonic()
            for w, c in list(active.items()):
                if c.conn in ready:
                    try:
                        while c.conn.poll():
                            idx, out = c.conn.recv()
                            if idx == _READY[0]:
                                c.ready = True
                                c.started = time.monotonic()
                            elif c.queue and c.queue[0] == idx:
                                c.queue.popleft()
                                results[idx] = out
                                c.started = time.monotonic()
                            if not c.queue:
                                break
                    except (EOFError, OSError):
                        c.proc.join(1)
                        self._fail_head(w, c, results, items, active, f"worker died (exit code {c.proc.exitcode})")
                        continue
                    if not c.queue:
                        del active[w]
                        continue
                if c.queue and now > self._deadline(c):
                    if c.ready:
                        self.timeouts += 1
                        why = f"timeout (hard limit {self.item_timeout_s:g}s)"
                    else:
                        why = f"worker did not start within {self.startup_timeout_s:g}s"
                    self._fail_head(w, c, results, items, active, why)
        return [r if r is not None else ("error", "lost") for r in results]

    def _deadline(self, c: _Child) -> float:
        return c.started + (self.item_timeout_s if c.ready else self.startup_timeout_s)

    def _send(self, w: int, share: list[int], items: list[tuple[Any, ...]]) -> _Child:
        c = self._child(w)
        c.queue = deque(share)
        c.conn.send([(i, items[i]) for i in share])
        if c.ready:
            c.started = time.monotonic()
        return c

    def _fail_head(
        self, w: int, c: _Child, results: list[Outcome | None], items: list[tuple[Any, ...]],
        active: dict[int, _Child], why: str,
    ) -> None:
        c.kill()
        self._children[w] = None
        self.restarts += 1
        head = c.queue.popleft() if c.queue else None
        if head is not None:
            results[head] = ("error", why)
        rest = list(c.queue)
        if rest:
            active[w] = self._send(w, rest, items)
        else:
            active.pop(w, None)

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        for i, c in enumerate(self._children):
            if c is not None:
                c.stop()
            self._children[i] = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
