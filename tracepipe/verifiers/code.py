"""Code verification: run a response's last fenced Python block against the problem's tests.

``tests`` is JSON in one of two shapes (ARCHITECTURE section 2)::

    {"style": "functional", "code": "assert f(1) == 2\\n...", "entry_point": "f"}
    {"style": "stdio", "cases": [{"input": "3\\n1 2 3\\n", "output": "6\\n"}], "time_limit_s": 2}

Functional ``code`` is bare asserts (MBPP) or a ``check(candidate)`` function (HumanEval) that is
called with the entry point. Stdio cases are compared whitespace-tolerantly (token by token).

Every execution happens in a sandbox:

- **bubblewrap** (``bwrap``): every namespace unshared (no network, own PID / IPC / UTS / user /
  cgroup namespaces, nested user namespaces disabled), read-only binds of the system directories
  and the interpreter, a private size-capped tmpfs as work dir and ``/tmp``, a fresh ``/proc`` and
  ``/dev``, an empty environment, ``--die-with-parent`` and ``--new-session``; when tracepipe runs
  as root the sandbox also runs under a random unprivileged uid (so the process limit means
  something and nothing of root's files is readable);
- **rlimits** inside: CPU seconds, address space, processes, file size, open files, no cores;
- a **wall timeout** that kills the whole process group (and, with the random uid, every process
  of that uid).

Without bubblewrap the verifier warns loudly and falls back to rlimits + process group + random
uid only, or refuses (``require_isolation=True``: verdict ``error``).

A program passes only when the harness reports, on a descriptor the program is not told about,
the nonce it reads from a second descriptor *after* all tests ran (see ``_harness.py``); exiting
early with status 0, printing "all tests passed", redefining builtins, patching modules, or
returning "always equal" objects all fail. Stdio expected outputs never enter the sandbox: the
parent compares each case's output as it arrives and stops at the first wrong one.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tracepipe.errors import IsolationUnavailable

log = logging.getLogger(__name__)

HARNESS_SOURCE = (Path(__file__).parent / "_harness.py").read_text()
SANDBOX_WORKDIR = "/work"
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_LANGS = {"", "python", "python3", "py", "py3"}


@dataclass
class SandboxLimits:
    """Resource limits of one sandboxed execution (functional tests, or one stdio run)."""

    wall_s: float = 10.0  # functional: whole run; stdio: cap of the whole run
    cpu_s: int = 10  # RLIMIT_CPU of the harness (functional)
    memory_mb: int = 1024  # RLIMIT_AS
    nproc: int = 32  # RLIMIT_NPROC (processes + threads of the sandbox uid)
    fsize_mb: int = 16  # RLIMIT_FSIZE
    nofile: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of the private /work and /tmp
    max_output_bytes: int = 1 << 20  # stdout+stderr (functional) / per-case stdout (stdio)
    stdio_time_limit_s: float = 2.0  # per case when the tests give no time_limit_s
    stdio_slack_s: float = 1.0  # wall allowance per case on top of its time limit


@dataclass
class CodeResult:
    verdict: str  # correct | incorrect | unverifiable | error
    detail: str
    code: str | None = None
    isolation: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- extraction ------------------------------------------------------------------------------
def extract_code(response: str | None, allow_unfenced: bool = True) -> str | None:
    """The last fenced Python block (```python / ```py / bare ```); else the whole response if it
    is a Python program (parses and defines / imports / assigns something)."""
    if not response:
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(response)]
    py = [b for lang, b in blocks if lang in _PY_LANGS]
    if py:
        return py[-1]
    if not allow_unfenced or "```" in response:
        return None
    try:
        tree = ast.parse(response)
    except (SyntaxError, ValueError):
        return None
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Assign, ast.For, ast.While)
    return response if any(isinstance(n, kinds) for n in tree.body) else None


def parse_tests(tests: Any) -> dict[str, Any] | None:
    """The ``tests`` column (JSON text or mapping) as a dict, or None when unusable."""
    if tests is None:
        return None
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            return None
    if not isinstance(tests, dict):
        return None
    style = tests.get("style")
    if style == "functional" and isinstance(tests.get("code"), str):
        return tests
    if style == "stdio" and isinstance(tests.get("cases"), list) and tests["cases"]:
        return tests
    return None


def outputs_match(expected: str, got: str) -> bool:
    """Whitespace-tolerant comparison: same tokens in the same order."""
    return expected.split() == got.split()


# -- isolation probe -------------------------------------------------------------------------
@dataclass(frozen=True)
class Isolation:
    bwrap: str | None  # path of bwrap when usable
    python: str  # interpreter used inside the sandbox
    binds: tuple[str, ...]  # extra read-only directories (interpreter prefix)
    drop_uid: bool  # running as root: use a random unprivileged uid
    reason: str  # why bubblewrap is not used (empty when it is)
    userns: bool = True  # explicit --unshare-user + --disable-userns (no nested user namespaces)
    setpriv: str | None = None  # root: bwrap mounts as root, then setpriv drops to the random uid

    @property
    def label(self) -> str:
        return "bwrap" if self.bwrap else "rlimits-only"


def _python_binds(py: str) -> tuple[str, ...]:
    real = os.path.realpath(py)
    dirs: set[str] = set()
    if os.path.realpath(sys.executable) == real or os.path.abspath(py) == os.path.abspath(sys.executable):
        dirs.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    else:
        dirs.add(str(Path(real).parent.parent))
    for d in (os.path.dirname(os.path.abspath(py)), os.path.dirname(real)):
        dirs.add(str(Path(d).parent))
    keep = sorted(d for d in dirs if d and not d.startswith("/usr") and d not in ("/", ""))
    return tuple(keep)


def _python_candidates(python: str | None) -> list[str]:
    out = [python] if python else []
    out += [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    seen: list[str] = []
    for p in out:
        if p and os.path.exists(p) and p not in seen:
            seen.append(p)
    return seen


_PROBE_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def isolation(python: str | None = None, mode: str = "auto", bwrap: str = "bwrap") -> Isolation:
    """Find out once per process whether bubblewrap works here, and with which interpreter.

    ``mode``: ``auto`` (bubblewrap when it works, else rlimits only with a warning),
    ``bwrap`` (same, but the caller refuses without it), ``none`` (never bubblewrap).
    """
    drop = os.geteuid() == 0
    cands = _python_candidates(python)
    if not cands:
        raise RuntimeError("no Python interpreter found for the code sandbox")
    bw = shutil.which(bwrap)
    reason = ""
    if mode == "none":
        reason = "isolation disabled (isolation: none)"
    elif not bw:
        reason = f"bubblewrap ({bwrap}) is not installed; install it: apt-get install -y bubblewrap"
    else:
        errors = []
        sp = shutil.which("setpriv") if drop else None
        # root: privileged bwrap + setpriv first (every interpreter reachable, e.g. under /root),
        # then the random uid from the start with an unprivileged user namespace
        tries = [(c, False, sp) for c in cands] if sp and sp.startswith("/usr/") else []
        tries += [(c, u, None) for c in cands for u in (True, False)]
        for py, userns, setpriv in tries:
            iso = Isolation(bw, py, _python_binds(py), drop, "", userns, setpriv)
            try:
                uid = secrets.randbelow(1_900_000_000) + 100_000_000 if drop else None
                res = _spawn(iso, [py, "-I", "-c", "import sys; print('tracepipe-ok', sys.version_info[0])"], b"", (), 20.0,
                             SandboxLimits(), uid=uid)
            except OSError as e:
                errors.append(f"{py}: {e}")
                continue
            if res.rc == 0 and b"tracepipe-ok 3" in res.stdout:
                return iso
            errors.append(f"{py}: rc={res.rc} {res.stderr.decode('utf-8', 'replace').strip()[-300:]}")
        reason = "bubblewrap cannot start a sandbox here: " + "; ".join(errors)
    py = cands[0]
    if drop:  # the random uid must be able to run the interpreter
        for c in cands:
            if _world_executable(c):
                py = c
                break
    return Isolation(None, py, (), drop, reason)


def _world_executable(path: str) -> bool:
    p = Path(os.path.realpath(path))
    try:
        if not (p.stat().st_mode & 0o001):
            return False
        for parent in p.parents:
            if not (parent.stat().st_mode & 0o001):
                return False
    except OSError:
        return False
    return True


_WARNED: set[str] = set()


def warn_unisolated(iso: Isolation) -> None:
    if iso.reason in _WARNED:
        return
    _WARNED.add(iso.reason)
    msg = (f"code verification is NOT isolated: {iso.reason}. Falling back to rlimits + process-group kill only; "
           "untrusted code can reach the network and the file system. Set `require_isolation: true` to refuse instead.")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# -- one sandboxed process -------------------------------------------------------------------
@dataclass
class _Run:
    rc: int | None
    stdout: bytes
    stderr: bytes
    result: bytes
    timed_out: bool = False
    output_limited: bool = False
    stopped: bool = False
    seconds: float = 0.0
    out_bytes: int = 0


def _bwrap_argv(iso: Isolation, limits: SandboxLimits, argv: list[str], uid: int | None = None) -> list[str]:
    size = str(int(limits.tmpfs_mb) << 20)
    if iso.setpriv:  # root: no user namespace (it would map the sandbox to uid 0); setpriv drops uid
        ns = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
              "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        ns = ["--unshare-all"]
    a = [
        iso.bwrap or "bwrap", *ns, "--die-with-parent", "--new-session", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            a += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            a += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        if os.path.exists(f):
            a += ["--ro-bind", f, f]
    a += [
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", size, "--tmpfs", SANDBOX_WORKDIR, "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
    ]
    made: set[str] = {"/", SANDBOX_WORKDIR, "/tmp"}
    for d in iso.binds:  # after the tmpfs mounts, so an interpreter under /tmp or /work stays visible
        for anc in reversed(Path(d).parents):  # parents of the bind (e.g. /root) traversable inside
            if str(anc) not in made and not str(anc).startswith("/usr"):
                made.add(str(anc))
                a += ["--perms", "0755", "--dir", str(anc)]
        a += ["--ro-bind", d, d]
    a += [
        "--chdir", SANDBOX_WORKDIR, "--clearenv",
        "--setenv", "HOME", SANDBOX_WORKDIR, "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
    ]
    if iso.userns and not iso.setpriv:
        a += ["--unshare-user", "--disable-userns"]
    if iso.setpriv:
        if uid is None:
            uid = secrets.randbelow(1_900_000_000) + 100_000_000
        argv = [iso.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--", *argv]
    return [*a, "--", *argv]


def _uid_tasks(uid: int) -> int:
    """Processes + threads owned by ``uid`` (what RLIMIT_NPROC counts)."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as fh:
                uid_ok = threads = None
                for line in fh:
                    if line.startswith("Uid:"):
                        uid_ok = int(line.split()[1]) == uid
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
            if uid_ok:
                n += threads or 1
        except (OSError, ValueError, IndexError):
            continue
    return n


def kill_uid(uid: int) -> int:
    """SIGKILL every process whose real uid is ``uid`` (never 0); returns how many were signalled."""
    if uid <= 0:
        return 0
    n = 0
    for _ in range(3):
        found = 0
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/status") as fh:
                    zombie = False
                    for line in fh:
                        if line.startswith("State:"):
                            zombie = line.split()[1] in ("Z", "X")
                        elif line.startswith("Uid:"):
                            if int(line.split()[1]) == uid and not zombie:
                                os.kill(int(d), signal.SIGKILL)
                                found += 1
                            break
            except (OSError, ValueError, IndexError):
                continue
        n += found
        if not found:
            break
        time.sleep(0.01)
    return n


def _spawn(
    iso: Isolation, argv: list[str], stdin: bytes, pass_fds: tuple[int, ...], wall_s: float, limits: SandboxLimits,
    result_fd: int | None = None, on_result: Any = None, uid: int | None = None,
    workdir: str | None = None,
) -> _Run:
    """Start ``argv`` (in bwrap when ``iso.bwrap``), feed stdin, collect stdout / stderr / results."""
    t0 = time.monotonic()
    full = _bwrap_argv(iso, limits, argv, uid) if iso.bwrap else argv
    kw: dict[str, Any] = {}
    if uid is not None and not iso.setpriv:
        kw.update(user=uid, group=uid, extra_groups=[])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if not iso.bwrap:
        env["HOME"] = workdir or "/nonexistent"
    p = subprocess.Popen(
        full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
        start_new_session=True, env=env, cwd=workdir or "/", close_fds=True, **kw,
    )
    for fd in pass_fds:  # the child has them now; holding them would keep the pipes from EOF
        os.close(fd)
    run = _Run(None, b"", b"", b"")
    out, err, res = bytearray(), bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    assert p.stdin and p.stdout and p.stderr
    for f in (p.stdout, p.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ, f)
    if result_fd is not None:
        os.set_blocking(result_fd, False)
        sel.register(result_fd, selectors.EVENT_READ, "result")
    data = memoryview(stdin)
    if data:
        os.set_blocking(p.stdin.fileno(), False)
        sel.register(p.stdin.fileno(), selectors.EVENT_WRITE, p.stdin)
    else:
        p.stdin.close()
    deadline = t0 + wall_s
    exited_at: float | None = None
    tail = 16384
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                run.timed_out = True
                break
            if exited_at is None and p.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.3:
                break  # main process gone; only stray holders of the pipes remain
            for key, _ in sel.select(min(0.1, deadline - now)):
                fd = key.fd
                if key.data is p.stdin:
                    try:
                        n = os.write(fd, data[:65536])
                        data = data[n:]
                    except (BrokenPipeError, OSError):
                        data = memoryview(b"")
                    if not data:
                        sel.unregister(fd)
                        p.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(fd)
                    continue
                if key.data == "result":
                    res += chunk
                    if len(res) > 64 * limits.max_output_bytes:
                        run.output_limited = True
                    if on_result is not None and not on_result(res):
                        run.stopped = True
                else:
                    buf = out if key.data is p.stdout else err
                    run.out_bytes += len(chunk)
                    buf += chunk
                    if len(buf) > 2 * tail:
                        del buf[: len(buf) - tail]
                    if run.out_bytes > limits.max_output_bytes:
                        run.output_limited = True
            if run.output_limited or run.stopped:
                break
    finally:
        sel.close()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            run.rc = p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd
            run.rc = None
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                f.close()
            except OSError:
                pass
        if uid is not None and not iso.bwrap:
            kill_uid(uid)
    run.stdout, run.stderr, run.result = bytes(out[-tail:]), bytes(err[-tail:]), bytes(res)
    run.seconds = time.monotonic() - t0
    return run


# -- the verifier ----------------------------------------------------------------------------
class CodeVerifier:
    """Runs candidate programs against tests in the sandbox; thread-safe (one sandbox per call)."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        isolation_mode: str = "auto",
        require_isolation: bool = False,
        python: str | None = None,
        preamble: str = "from typing import *\n",
        allow_unfenced: bool = True,
        bwrap: str = "bwrap",
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.bwrap = bwrap
        self.isolation_mode = isolation_mode
        self.require_isolation = require_isolation
        self.python = python
        self.preamble = preamble
        self.allow_unfenced = allow_unfenced
        self._iso: Isolation | None = None

    @property
    def iso(self) -> Isolation:
        if self._iso is None:
            with _PROBE_LOCK:
                iso = isolation(self.python, "none" if self.isolation_mode == "none" else "auto", self.bwrap)
            if not iso.bwrap and not self.require_isolation:
                warn_unisolated(iso)
            self._iso = iso
        if not self._iso.bwrap and self.require_isolation:  # every time: never run unisolated
            raise IsolationUnavailable(f"require_isolation is set but {self._iso.reason}")
        return self._iso

    def verify(self, response: str | None, tests: Any) -> CodeResult:
        """Extract the program from ``response`` and run it against ``tests``."""
        t0 = time.monotonic()
        spec = parse_tests(tests)
        if spec is None:
            return CodeResult("unverifiable", "tests missing or malformed", None)
        code = extract_code(response, self.allow_unfenced)
        if code is None:
            return CodeResult("incorrect", "no code block in the response", None)
        try:
            iso = self.iso
        except IsolationUnavailable as e:
            return CodeResult("error", f"sandbox: {e}", code)
        try:
            if spec["style"] == "functional":
                r = self._functional(iso, code, spec)
            else:
                r = self._stdio(iso, code, spec)
        except OSError as e:
            r = CodeResult("error", f"sandbox: {type(e).__name__}: {e}", None)
        r.code = code
        r.isolation = iso.label
        r.seconds = time.monotonic() - t0
        return r

    def run_program(self, code: str, tests: Any) -> CodeResult:
        """Run ``code`` as-is (no extraction) against ``tests``."""
        return self.verify(f"```python\n{code}\n```", tests)

    # ---------------------------------------------------------------------------------------
    def _launch(self, iso: Isolation, boot: dict[str, Any], wall_s: float, on_result: Any = None) -> tuple[_Run, str]:
        nonce = secrets.token_hex(16)
        nr, nw = os.pipe2(os.O_CLOEXEC)
        rr, rw = os.pipe2(os.O_CLOEXEC)
        tmp = None
        uid = None
        try:
            os.write(nw, nonce.encode() + b"\n")
            os.close(nw)
            nw = -1
            lim = self.limits
            if iso.drop_uid:
                uid = secrets.randbelow(1_900_000_000) + 100_000_000
                nproc = lim.nproc
            else:
                nproc = _uid_tasks(os.getuid()) + lim.nproc
            boot = {**boot, "fds": [nr, rw]}
            boot["limits"] = {**boot.get("limits", {}), "nproc": nproc, "fsize_mb": lim.fsize_mb, "nofile": lim.nofile}
            if iso.bwrap:
                boot["workdir"] = SANDBOX_WORKDIR
                workdir = None
            else:
                tmp = tempfile.mkdtemp(prefix="tracepipe-sbx-")
                if uid is not None:
                    os.chown(tmp, uid, uid)
                os.chmod(tmp, 0o700)
                boot["workdir"] = tmp
                workdir = tmp
            argv = [iso.python, "-I", "-c", HARNESS_SOURCE]
            fds, nr, rw = (nr, rw), -1, -1  # _spawn closes them once the child holds them
            run = _spawn(iso, argv, json.dumps(boot).encode(), fds, wall_s, lim, result_fd=rr,
                         on_result=on_result, uid=uid, workdir=workdir)
            return run, nonce
        finally:
            for fd in (nr, rw, rr, nw):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _signal_detail(run: _Run, bwrap: bool) -> str | None:
        rc = run.rc
        if rc is None:
            return None
        sig = -rc if rc < 0 else (rc - 128 if bwrap and rc > 128 else 0)
        if sig <= 0:
            return None
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        extra = " (CPU time limit)" if name == "SIGXCPU" else (" (file size limit)" if name == "SIGXFSZ" else "")
        return f"killed by {name}{extra}"

    def _functional(self, iso: Isolation, code: str, spec: dict[str, Any]) -> CodeResult:
        lim = self.limits
        boot = {
            "mode": "functional", "code": code, "preamble": self.preamble, "test": spec["code"],
            "entry_point": spec.get("entry_point"), "limits": {"cpu_s": lim.cpu_s, "memory_mb": lim.memory_mb},
        }
        run, nonce = self._launch(iso, boot, lim.wall_s)
        lines = run.result.decode("utf-8", "replace").splitlines()
        if run.result == f"S\nP {nonce}\n".encode() and run.rc == 0 and not (run.timed_out or run.output_limited):
            return CodeResult("correct", "passed")
        if run.output_limited:
            return CodeResult("incorrect", f"output limit exceeded ({lim.max_output_bytes} bytes)")
        if run.timed_out:
            return CodeResult("incorrect", f"timeout ({lim.wall_s:g}s wall)")
        if not lines or lines[0] != "S":
            msg = run.stderr.decode("utf-8", "replace").strip()
            if "bwrap" in msg:
                return CodeResult("error", f"sandbox failed to start: {msg[-300:]}")
            return CodeResult("incorrect", f"harness did not start (rc={run.rc}): {msg[-300:]}")
        fails = [ln for ln in lines[1:] if ln.startswith("F ")]
        if fails:
            try:
                reason = json.loads(fails[-1][2:])["reason"]
            except (ValueError, KeyError, TypeError):
                reason = "malformed failure report"
            return CodeResult("incorrect", reason)
        sig = self._signal_detail(run, bool(iso.bwrap))
        if sig:
            return CodeResult("incorrect", sig)
        if any(ln.startswith("P ") for ln in lines[1:]):
            return CodeResult("incorrect", "forged or malformed pass report")
        return CodeResult("incorrect", f"exited before the tests finished (exit status {run.rc})")

    def _stdio(self, iso: Isolation, code: str, spec: dict[str, Any]) -> CodeResult:
        lim = self.limits
        cases = [c for c in spec["cases"] if isinstance(c, dict)]
        try:
            tl = float(spec.get("time_limit_s") or lim.stdio_time_limit_s)
        except (TypeError, ValueError):
            tl = lim.stdio_time_limit_s
        case_wall = tl + lim.stdio_slack_s
        wall = min(lim.wall_s * max(1, len(cases)), len(cases) * case_wall + 5.0)
        expected = [str(c.get("output", "")) for c in cases]
        state: dict[str, Any] = {"n": 0, "verdict": None, "pos": 0, "end": False}

        def on_result(buf: bytearray) -> bool:
            while True:
                nl = buf.find(b"\n", state["pos"])
                if nl < 0:
                    return True
                line = bytes(buf[state["pos"]: nl]).decode("utf-8", "replace")
                state["pos"] = nl + 1
                if line.startswith("C "):
                    try:
                        rec = json.loads(line[2:])
                    except ValueError:
                        state["verdict"] = "malformed case report"
                        return False
                    i = state["n"]
                    if rec.get("i") != i or i >= len(expected):
                        state["verdict"] = "malformed case report"
                        return False
                    state["n"] = i + 1
                    if rec.get("status") != "ok":
                        err = (rec.get("err") or "").strip().splitlines()
                        state["verdict"] = f"case {i}: {rec.get('status')}" + (f" ({err[-1][:200]})" if err else "")
                        return False
                    if not outputs_match(expected[i], rec.get("out") or ""):
                        state["verdict"] = f"case {i}: wrong answer"
                        return False
                elif line.startswith("E "):
                    state["end"] = line[2:].strip()
                    return False

        boot = {
            "mode": "stdio", "code": code, "inputs": [str(c.get("input", "")) for c in cases],
            "limits": {"case_cpu_s": int(math.ceil(tl)) + 1, "case_wall_s": case_wall, "memory_mb": lim.memory_mb,
                       "max_output_bytes": lim.max_output_bytes},
        }
        run, nonce = self._launch(iso, boot, wall, on_result=on_result)
        if state["verdict"]:
            return CodeResult("incorrect", state["verdict"])
        if state["n"] == len(cases) and state["end"] == nonce:
            return CodeResult("correct", f"passed {len(cases)} cases")
        if run.timed_out:
            return CodeResult("incorrect", f"timeout ({wall:g}s wall for {len(cases)} cases)")
        if not run.result.startswith(b"S\n"):
            msg = run.stderr.decode("utf-8", "replace").strip()
            if "bwrap" in msg:
                return CodeResult("error", f"sandbox failed to start: {msg[-300:]}")
        err = run.stderr.decode("utf-8", "replace").strip().splitlines()
        return CodeResult("incorrect", f"runner stopped after {state['n']} of {len(cases)} cases (rc={run.rc})"
                          + (f": {err[-1][:200]}" if err else ""))


__all__ = [
    "CodeResult", "CodeVerifier", "Isolation", "IsolationUnavailable", "SandboxLimits", "extract_code",
    "isolation", "kill_uid", "outputs_match", "parse_tests",
]
