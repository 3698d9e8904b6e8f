"""Test harness run *inside* the sandbox (``python -I -c <this file>``); standard library only.

The parent (:mod:`tracepipe.verifiers.code`) writes one JSON document to stdin and closes it:
``mode`` (``functional`` | ``stdio``), the candidate ``code``, the tests, ``limits`` and ``fds``
(``[nonce_fd, result_fd]``). Results go to ``result_fd``, never to stdout (which the candidate
owns):

- ``S``                  harness started (before any candidate code ran)
- ``P <nonce>``          functional: every test ran and passed (the nonce is read from
                         ``nonce_fd`` only *after* the tests, so exiting early cannot produce it)
- ``F <json>``           functional: failed, with a reason
- ``C <json>``           stdio: one case's captured output (the parent compares; expected outputs
                         never enter the sandbox)
- ``E <nonce>``          stdio: all cases ran

Defences in functional mode, each turning a hack into a failure: tests run against a copy of the
builtins taken before the candidate ran; any change to builtins or to functions / classes of
modules loaded before the candidate ran is reported as tampering; functions the candidate defines
are wrapped so that returning an object of a class the candidate made with its own ``__eq__`` /
``__ne__`` / ``__bool__`` (the "always equal" trick) fails; ``SystemExit`` / ``os._exit`` before
the end never yields the nonce. A program that deliberately hunts for the harness's descriptors
could still forge a pass; the sandbox contains what it can do either way.
"""

import json
import os
import sys

CAND_FILE = "solution.py"  # set from boot["workdir"] in _main
CAND_MOD = "__candidate__"
HEAPTYPE = 1 << 9
PRE_IMPORT = (  # modules tests commonly use: loaded before the candidate so tampering shows
    "math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "random",
    "typing", "fractions", "decimal", "operator", "copy", "numbers", "cmath", "json",
)
EQ_DUNDERS = ("__eq__", "__ne__", "__bool__")


def _set_limits(lim, own=True):
    import resource

    def cap(which, soft, hard=None):
        try:
            resource.setrlimit(which, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    if own:
        if lim.get("nproc"):
            cap(resource.RLIMIT_NPROC, int(lim["nproc"]))
        if lim.get("fsize_mb"):
            cap(resource.RLIMIT_FSIZE, int(lim["fsize_mb"]) << 20)
        if lim.get("nofile"):
            cap(resource.RLIMIT_NOFILE, int(lim["nofile"]))
        cap(resource.RLIMIT_CORE, 0)
    if lim.get("cpu_s"):
        cap(resource.RLIMIT_CPU, int(lim["cpu_s"]), int(lim["cpu_s"]) + 1)
    if lim.get("memory_mb"):
        cap(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)


def _no_dump():
    """Make /proc/<pid>/fd and ptrace of this process unavailable to same-uid processes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass


def _emitter(fd, write):
    def emit(text):
        data = text.encode("utf-8", "replace")
        while data:
            n = write(fd, data)
            data = data[n:]

    return emit


def _all_classes():
    seen = set()
    stack = [object]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        try:
            stack.extend(type.__subclasses__(c))
        except TypeError:
            pass
    return seen


def _functional(boot, emit, nonce_fd, read, exit_):
    import builtins
    import types

    lim = boot.get("limits") or {}
    for name in PRE_IMPORT:
        try:
            __import__(name)
        except Exception:
            pass
    trusted = tuple(p for p in {sys.base_prefix, sys.prefix, sys.exec_prefix} if p) or ("/usr",)
    safe_builtins = dict(vars(builtins))
    skip_mods = {"sys", "__main__", "builtins"}
    snapshot = {}
    for mname, mod in list(sys.modules.items()):
        if mod is None or mname in skip_mods:
            continue
        try:
            attrs = dict(vars(mod))
        except TypeError:
            continue
        kept = {k: v for k, v in attrs.items() if callable(v) or isinstance(v, types.ModuleType)}
        snapshot[mname] = (mod, kept, frozenset(attrs))
    pre_classes = _all_classes()

    def foreign(c):
        if id(c) in pre_classes or not (c.__flags__ & HEAPTYPE):
            return False
        for k in EQ_DUNDERS:
            if k in c.__dict__:
                f = c.__dict__[k]
                code = getattr(f, "__code__", None)
                fname = getattr(code, "co_filename", "") if code is not None else ""
                if not fname or not fname.startswith(trusted) or c.__module__ == CAND_MOD:
                    return True
        return False

    def check_value(v):
        todo, n = [v], 0
        while todo and n < 100000:
            x = todo.pop()
            n += 1
            t = type(x)
            if t in (int, float, complex, bool, str, bytes, type(None)):
                continue
            for c in t.__mro__:
                if foreign(c):
                    raise TypeError(f"returned a {t.__name__!s} whose class (defined by the solution) overrides comparison")
            if t in (list, tuple, set, frozenset):
                todo.extend(x)
            elif t is dict:
                todo.extend(x.keys())
                todo.extend(x.values())

    def guard(f):
        def guarded(*a, **k):
            r = f(*a, **k)
            check_value(r)
            return r

        guarded.__name__ = getattr(f, "__name__", "candidate")
        guarded.__doc__ = getattr(f, "__doc__", None)
        return guarded

    def fail(stage, e):
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        where = ""
        for fr in reversed(tb):
            if fr.filename in (CAND_FILE, "<tests>"):
                where = f" ({'solution' if fr.filename == CAND_FILE else 'tests'} line {fr.lineno})"
                break
        msg = f"{stage}: {type(e).__name__}: {e}"[:500] + where
        emit("F " + json.dumps({"reason": msg}) + "\n")
        exit_(1)

    _set_limits(lim)
    code = boot.get("preamble", "") + boot["code"]
    cand_ns = {"__name__": CAND_MOD, "__file__": CAND_FILE, "__builtins__": builtins}
    try:
        compiled = compile(code, CAND_FILE, "exec")
    except BaseException as e:  # noqa: BLE001
        fail("solution does not compile", e)
    def restore_builtins():
        """Undo changes to builtins (the harness needs them too); returns what was changed."""
        cur = vars(builtins)
        changed = sorted(k for k in set(safe_builtins) | set(cur) if cur.get(k, fail) is not safe_builtins.get(k, fail))
        if changed:
            for k in [k for k in cur if k not in safe_builtins]:
                del cur[k]
            cur.update(safe_builtins)
        return [f"builtins.{k}" for k in changed]

    def tampered(what):
        emit("F " + json.dumps({"reason": "tampering: the solution changed " + ", ".join(what[:8])}) + "\n")
        exit_(1)

    try:
        exec(compiled, cand_ns)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: leaving early is a failure
        restore_builtins()
        fail("solution raised", e)
    changed = restore_builtins()
    if changed:
        tampered(changed)
    test_ns = dict(cand_ns)
    test_ns["__builtins__"] = safe_builtins
    test_ns["__name__"] = "__tests__"
    for k, v in list(test_ns.items()):
        if isinstance(v, types.FunctionType) and v.__code__.co_filename == CAND_FILE:
            test_ns[k] = guard(v)
    entry = boot.get("entry_point")
    try:
        exec(compile(boot["test"], "<tests>", "exec"), test_ns)
        check = test_ns.get("check")
        if entry and "check" in test_ns and callable(check) and getattr(check, "__code__", None) is not None and check.__code__.co_filename == "<tests>":
            if entry not in test_ns:
                raise NameError(f"the solution defines no {entry!r}")
            check(test_ns[entry])
    except BaseException as e:  # noqa: BLE001
        changed = restore_builtins()
        if changed:
            tampered(changed)
        fail("test failed", e)
    changed = restore_builtins()
    for mname, (mod, attrs, keys) in snapshot.items():
        cur = getattr(mod, "__dict__", {})
        changed += [f"{mname}.{k}" for k, v in attrs.items() if cur.get(k, fail) is not v]
        changed += [
            f"{mname}.{k}" for k, v in list(cur.items())
            if k not in keys and not k.startswith("__") and callable(v) and not isinstance(v, types.ModuleType)
        ]
    if changed:
        tampered(changed)
    try:
        nonce = read(nonce_fd, 256).decode("ascii", "replace").strip()
    except OSError:
        nonce = ""
    if not nonce:
        emit("F " + json.dumps({"reason": "harness nonce missing (the solution read or closed harness descriptors)"}) + "\n")
        exit_(1)
    emit("P " + nonce + "\n")
    exit_(0)


def _run_case(argv, inp, wall_s, max_out, lim):
    import selectors
    import signal
    import subprocess
    import time

    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        start_new_session=True, preexec_fn=lambda: _set_limits(lim, own=False), cwd=os.path.dirname(CAND_FILE),
    )
    data = inp.encode("utf-8")
    out, err = bytearray(), bytearray()
    status = None
    sel = selectors.DefaultSelector()
    for f, ev in ((p.stdout, selectors.EVENT_READ), (p.stderr, selectors.EVENT_READ)):
        os.set_blocking(f.fileno(), False)
        sel.register(f, ev)
    if data:
        os.set_blocking(p.stdin.fileno(), False)
        sel.register(p.stdin, selectors.EVENT_WRITE)
    else:
        p.stdin.close()
    deadline = time.monotonic() + wall_s
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(left):
            f = key.fileobj
            if f is p.stdin:
                try:
                    n = os.write(f.fileno(), data[:65536])
                    data = data[n:]
                except (BrokenPipeError, OSError):
                    data = b""
                if not data:
                    sel.unregister(f)
                    f.close()
                continue
            try:
                chunk = os.read(f.fileno(), 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(f)
                continue
            buf = out if f is p.stdout else err
            if f is p.stdout or len(buf) < 65536:
                buf += chunk
            if len(out) > max_out:
                status = "output limit"
                break
        if status:
            break
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    if status is None:
        try:
            rc = p.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
            rc = None
    else:
        rc = None
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if status is None:
        if rc == -signal.SIGXCPU:
            status = "timeout"  # the CPU limit, the same verdict as the wall clock
        else:
            status = "ok" if rc == 0 else ("runtime error" if rc and rc > 0 else f"killed by signal {-rc}")
    return {"status": status, "rc": rc, "out": out[: max_out].decode("utf-8", "replace"), "err": err[-2000:].decode("utf-8", "replace")}


def _stdio(boot, emit, nonce_fd, read, exit_):
    _no_dump()
    lim = boot.get("limits") or {}
    _set_limits({k: lim.get(k) for k in ("nproc", "fsize_mb", "nofile")})
    path = CAND_FILE
    with open(path, "w") as fh:
        fh.write(boot["code"])
    argv = [sys.executable, "-I", path]
    case_lim = {"cpu_s": lim.get("case_cpu_s"), "memory_mb": lim.get("memory_mb")}
    for i, inp in enumerate(boot["inputs"]):
        res = _run_case(argv, inp, float(lim.get("case_wall_s", 2.0)), int(lim.get("max_output_bytes", 1 << 20)), case_lim)
        res["i"] = i
        emit("C " + json.dumps(res) + "\n")
    nonce = read(nonce_fd, 256).decode("ascii", "replace").strip()
    emit("E " + nonce + "\n")
    exit_(0)


def _main():
    global CAND_FILE
    write, read, exit_ = os.write, os.read, os._exit
    boot = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    CAND_FILE = os.path.join(boot.get("workdir") or os.getcwd(), "solution.py")
    nonce_fd, result_fd = boot.pop("fds")
    for fd in (nonce_fd, result_fd):
        os.set_inheritable(fd, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    emit = _emitter(result_fd, write)
    emit("S\n")
    if boot["mode"] == "functional":
        _functional(boot, emit, nonce_fd, read, exit_)
    else:
        _stdio(boot, emit, nonce_fd, read, exit_)


if __name__ == "__main__":
    _main()
