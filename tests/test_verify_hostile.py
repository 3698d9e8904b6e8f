"""Hostile programs in the code sandbox: each gets a verdict within its limit, none passes, the
host is untouched (no file outside the sandbox, the listeners receive nothing, no process
survives, the secrets stay secret) and the pipeline keeps running.

Every program is written so that it would *pass* its tests if its attack worked (it reads the
secret, reaches the listener, writes the file, ...), so a pass would mean a broken sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.fixtures.verify_data import humaneval_rows, humaneval_tests
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe
from tracepipe.verifiers.code import CodeVerifier, SandboxLimits, isolation

pytestmark = pytest.mark.skipif(isolation().bwrap is None, reason="bubblewrap unavailable: apt-get install -y bubblewrap")

LIMITS = SandboxLimits(wall_s=4, cpu_s=2, memory_mb=512, nproc=16, fsize_mb=8, tmpfs_mb=32, max_output_bytes=1 << 20)
FUNC = json.dumps({"style": "functional", "code": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"})
STDIO = json.dumps({"style": "stdio", "cases": [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9\n"}], "time_limit_s": 1})

# name -> (program, tests). Placeholders: @TAG@ @PORT@ @UDP@ @UNIX@ @HOSTFILE@ @SECRET@ @SECRETFILE@ @PYTEST_PID@ @CWD@
PROGRAMS: dict[str, tuple[str, str]] = {
    "fork_bomb": ("import os\ndef f(x):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n", FUNC),
    "fork_bomb_at_import": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", FUNC),
    "subprocess_bomb": (
        "import subprocess, sys\ndef f(x):\n    ps = []\n    while True:\n        try:\n"
        "            ps.append(subprocess.Popen([sys.executable, '-c', 'while True: pass', '@TAG@']))\n"
        "        except OSError:\n            pass\n", FUNC),
    "thread_bomb": ("import threading, time\nts = []\nwhile True:\n    t = threading.Thread(target=time.sleep, args=(60,))\n    t.start()\n    ts.append(t)\n", FUNC),
    "memory_bomb": ("x = bytearray(16 * 1024 ** 3)\ndef f(x):\n    return 4\n", FUNC),
    "memory_creep": ("blocks = []\ndef f(x):\n    while True:\n        blocks.append(bytearray(64 * 1024 * 1024))\n", FUNC),
    "infinite_loop_at_import": ("while True:\n    pass\n", FUNC),
    "infinite_loop_in_call": ("def f(x):\n    while True:\n        x += 1\n", FUNC),
    "long_sleep": ("import time\ntime.sleep(3600)\ndef f(x):\n    return 4\n", FUNC),
    "sleep_ignoring_signals": (
        "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\n"
        "def f(x):\n    time.sleep(3600)\n", FUNC),
    "network_to_host_listener": (
        "import socket\ndef f(x):\n    s = socket.create_connection(('127.0.0.1', @PORT@), timeout=2)\n    return int(s.recv(16))\n", FUNC),
    "network_udp_to_host": (
        "import socket\ndef f(x):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.sendto(b'leak', ('127.0.0.1', @UDP@))\n"
        "    s.settimeout(2)\n    return int(s.recvfrom(16)[0])\n", FUNC),
    "network_abstract_unix": (
        "import socket\ndef f(x):\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    s.connect('\\0@UNIX@')\n    return int(s.recv(16))\n", FUNC),
    "network_external": ("import socket\ndef f(x):\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    return 4\n", FUNC),
    "write_host_file": ("def f(x):\n    open('@HOSTFILE@', 'w').write('pwned')\n    return 4\n", FUNC),
    "write_host_tmp_root_usr_cwd": (
        "def f(x):\n    n = 0\n    for p in ('/tmp/pwned-@TAG@', '/root/pwned-@TAG@', '/usr/pwned-@TAG@', '@CWD@/pwned-@TAG@', '/var/tmp/pwned-@TAG@'):\n"
        "        try:\n            open(p, 'w').write('pwned')\n            n += 1\n        except OSError:\n            pass\n"
        "    return 4 if n >= 2 else n\n", FUNC),  # /tmp inside the sandbox is its own tmpfs: n == 1
    "read_env_secret": ("import os\ndef f(x):\n    return 4 if os.environ.get('TRACEPIPE_TEST_SECRET') == '@SECRET@' else 0\n", FUNC),
    "read_home_secret": (
        "import os\ndef f(x):\n    for p in (os.path.expanduser('~/.tp_secret'), '@SECRETFILE@'):\n        try:\n"
        "            if open(p).read().strip() == '@SECRET@':\n                return 4\n        except OSError:\n            pass\n    return 0\n", FUNC),
    "read_root_home": (
        "def f(x):\n    for p in ('/root/.bashrc', '/root/.profile', '/root/.ssh/id_rsa', '/etc/shadow', '/etc/passwd'):\n"
        "        try:\n            open(p).read()\n            return 4\n        except OSError:\n            pass\n    return 0\n", FUNC),
    "proc_environ_of_others": (
        "import os\ndef f(x):\n    for p in os.listdir('/proc'):\n        try:\n            if b'@SECRET@' in open(f'/proc/{p}/environ', 'rb').read():\n                return 4\n"
        "        except (OSError, ValueError):\n            pass\n    return 0\n", FUNC),
    "kill_parent": (
        "import os, signal\ndef f(x):\n    hits = 0\n    for pid in (os.getppid(), @PYTEST_PID@, 1):\n        try:\n            os.kill(pid, signal.SIGKILL)\n            hits += 1\n"
        "        except OSError:\n            pass\n    return 4 if hits == 3 else hits\n", FUNC),
    "kill_everything": ("import os, signal\ndef f(x):\n    os.kill(-1, signal.SIGKILL)\n    return 4\n", FUNC),
    "daemon_outlives_run": (
        "import os, time\ndef f(x):\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
        "            os.execv('/usr/bin/python3', ['python3', '-c', 'import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(120)', '@TAG@'])\n"
        "        os._exit(0)\n    time.sleep(0.5)\n    return 0\n", FUNC),
    "stdout_flood": ("import sys\nchunk = 'x' * 65536\nwhile True:\n    sys.stdout.write(chunk)\n", FUNC),
    "stderr_flood": ("import sys\nchunk = 'y' * 65536\nwhile True:\n    sys.stderr.write(chunk)\n", FUNC),
    "file_flood": (
        "def f(x):\n    with open('big.bin', 'wb') as fh:\n        for _ in range(1024):\n            fh.write(b'z' * (1 << 20))\n    return 4\n", FUNC),
    "segfault": ("import ctypes\nctypes.string_at(0)\ndef f(x):\n    return 4\n", FUNC),
    "stack_overflow": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef g(n):\n    return g(n + 1) + 1\ndef f(x):\n    return g(0)\n", FUNC),
    "os_exit_before_tests": ("import os\nos._exit(0)\n", FUNC),
    "sys_exit_before_tests": ("import sys\nsys.exit(0)\n", FUNC),
    "exit_inside_call": ("import os\ndef f(x):\n    os._exit(0)\n", FUNC),
    "fake_pass_print": ("import os\nprint('S')\nprint('P ' + '0' * 32)\nprint('All tests passed')\nos._exit(0)\n", FUNC),
    "fake_pass_on_every_fd": (
        "import os\nfor fd in range(1, 64):\n    try:\n        os.write(fd, b'S\\nP ' + b'0' * 32 + b'\\n')\n    except OSError:\n        pass\nos._exit(0)\n", FUNC),
    "redefine_builtins": (
        "import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.isinstance = lambda *a: True\ndef f(x):\n    return 0\n",
        json.dumps({"style": "functional", "code": "def check(candidate):\n    assert abs(candidate(2) - 4) < 1e-9\n", "entry_point": "f"})),
    "monkeypatch_check": ("def check(candidate):\n    return True\ndef f(x):\n    return 0\n", FUNC),
    "monkeypatch_stdlib_used_by_check": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0\n",
        json.dumps({"style": "functional", "code": "import math\ndef check(candidate):\n    assert math.isclose(candidate(2), 4)\n", "entry_point": "f"})),
    "always_equal_object": ("class Eq:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef f(x):\n    return Eq()\n", FUNC),
    "int_subclass_always_equal": ("class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\ndef f(x):\n    return I(0)\n", FUNC),
    "always_equal_disguised_module": (
        "class E:\n    __module__ = 'fractions'\n    __eq__ = lambda self, other: True\ndef f(x):\n    return [E()]\n",
        json.dumps({"style": "functional", "code": "def check(candidate):\n    assert candidate(2) == [4]\n", "entry_point": "f"})),
    "atexit_fake_pass": ("import atexit, os\natexit.register(lambda: print('P ' + '0' * 32))\ndef f(x):\n    return 0\n", FUNC),
    "system_exit_in_call": ("def f(x):\n    raise SystemExit(0)\n", FUNC),
    "keyboard_interrupt_in_call": ("def f(x):\n    raise KeyboardInterrupt\n", FUNC),
    "stdio_kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\n", STDIO),
    "stdio_fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", STDIO),
    "stdio_flood": ("import sys\nwhile True:\n    sys.stdout.write('4\\n' * 10000)\n", STDIO),
    "stdio_first_case_only": ("print(4)\n", STDIO),
}


class Listeners:
    """A TCP and a UDP listener on 127.0.0.1 and an abstract unix socket, counting what arrives."""

    def __init__(self) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_name = f"tracepipe-test-{uuid.uuid4().hex}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.unix_name)
        self.unix.listen()
        self.received: list[str] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._serve, args=(s, kind), daemon=True)
                         for s, kind in ((self.tcp, "tcp"), (self.unix, "unix"), (self.udp, "udp"))]
        for t in self._threads:
            t.start()

    def _serve(self, sock: socket.socket, kind: str) -> None:
        sock.settimeout(0.2)
        while not self._stop:
            try:
                if kind == "udp":
                    _, addr = sock.recvfrom(64)
                    self.received.append(f"udp from {addr}")
                    sock.sendto(b"4", addr)
                else:
                    conn, _ = sock.accept()
                    self.received.append(kind)
                    conn.sendall(b"4")
                    conn.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(2)
        for s in (self.tcp, self.udp, self.unix):
            s.close()


def _processes_with(markers: list[str], exclude: set[int]) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if any(m in cmd for m in markers):
            out.append((int(d), cmd[:120]))
    return out


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """The programs with their placeholders filled, plus the host-side traps to check afterwards."""
    tag = uuid.uuid4().hex
    secret = uuid.uuid4().hex
    home = tmp_path / "home"
    home.mkdir()
    (home / ".tp_secret").write_text(secret)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TRACEPIPE_TEST_SECRET", secret)
    lst = Listeners()
    hostfile = tmp_path / f"pwned-{tag}"
    subs = {
        "@TAG@": tag, "@PORT@": str(lst.tcp.getsockname()[1]), "@UDP@": str(lst.udp.getsockname()[1]),
        "@UNIX@": lst.unix_name, "@HOSTFILE@": str(hostfile), "@SECRET@": secret,
        "@SECRETFILE@": str(home / ".tp_secret"), "@PYTEST_PID@": str(os.getpid()), "@CWD@": os.getcwd(),
    }
    progs = {}
    for name, (prog, tests) in PROGRAMS.items():
        for k, v in subs.items():
            prog = prog.replace(k, v)
        progs[name] = (prog, tests)
    before = {int(d) for d in os.listdir("/proc") if d.isdigit()}
    yield progs
    lst.close()

    # the host is untouched
    time.sleep(1.0)
    assert lst.received == [], f"listeners were reached: {lst.received}"
    for p in (hostfile, Path(f"/tmp/pwned-{tag}"), Path(f"/root/pwned-{tag}"), Path(f"/usr/pwned-{tag}"),
              Path(os.getcwd()) / f"pwned-{tag}", Path(f"/var/tmp/pwned-{tag}")):
        assert not p.exists(), f"{p} was written from inside the sandbox"
    survivors = _processes_with([tag, "Test harness run *inside* the sandbox", "--die-with-parent --new-session"], before)
    assert not survivors, f"processes outlived the sandbox: {survivors}"


def test_hostile_battery_direct(hostile):
    assert len(hostile) >= 25
    v = CodeVerifier(LIMITS)
    names = list(hostile)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda n: v.verify(f"```python\n{hostile[n][0]}\n```", hostile[n][1]), names))
    elapsed = time.monotonic() - t0
    for n, r in zip(names, results):
        print(f"{n:34s} {r.verdict:10s} {r.seconds:5.2f}s  {r.detail[:110]}")
    passed = [n for n, r in zip(names, results) if r.verdict == "correct"]
    assert not passed, f"hostile programs passed: {passed}"
    assert {r.verdict for r in results} == {"incorrect"}
    assert {r.isolation for r in results} == {"bwrap"}
    # each within its limit (wall limit + kill / start-up allowance on a busy machine)
    slow = [(n, round(r.seconds, 1)) for n, r in zip(names, results) if r.seconds > LIMITS.wall_s + 8]
    assert not slow, slow
    d = dict(zip(names, (r.detail for r in results)))
    assert "output limit" in d["stdout_flood"] and "output limit" in d["stderr_flood"]
    assert "MemoryError" in d["memory_bomb"]
    assert "exited before the tests finished" in d["os_exit_before_tests"]
    assert "SystemExit" in d["sys_exit_before_tests"]
    assert "SIGSEGV" in d["segfault"]
    assert "tampering" in d["monkeypatch_stdlib_used_by_check"]
    assert d["redefine_builtins"] == "tampering: the solution changed builtins.abs, builtins.isinstance"
    assert "overrides comparison" in d["always_equal_object"] and "overrides comparison" in d["int_subclass_always_equal"]
    assert "overrides comparison" in d["always_equal_disguised_module"]
    assert d["stdio_first_case_only"] == "case 1: wrong answer"
    print(f"battery of {len(names)} programs in {elapsed:.1f}s")


def test_hostile_battery_through_the_pipeline(hostile, tmp_path):
    """The same programs as rows of a recipe (mixed with honest HumanEval solutions) through
    load_recipe + Runner: the run completes, honest rows are correct, hostile rows are not."""
    honest = humaneval_rows()[:4]
    rows = [{"id": f"hostile/{n}", "problem": n, "response": f"```python\n{p}\n```", "tests": t} for n, (p, t) in hostile.items()]
    rows += [{"id": r["task_id"], "problem": r["prompt"], "response": f"```python\n{r['prompt'] + r['canonical_solution']}\n```",
              "tests": humaneval_tests(r)} for r in honest]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "hostile", "workdir": str(tmp_path / "work"),
        "source": [{"path": str(src), "domain": "code"}],
        "stages": [{"verify": {"batch_size": 8, "code_concurrency": 4, "code": {
            "timeout_s": LIMITS.wall_s, "cpu_s": LIMITS.cpu_s, "memory_mb": LIMITS.memory_mb, "nproc": LIMITS.nproc,
            "fsize_mb": LIMITS.fsize_mb, "tmpfs_mb": LIMITS.tmpfs_mb, "require_isolation": True}}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp_path / "out"), "options": {"keep_columns": ["verify_detail"]}}],
        "executor": {"workers": 2},
    }
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = Runner(load_recipe(path)).run()
    st = result.stats.stages[0]
    assert st.errors == 0 and st.rows_out == len(rows)
    out = pl.read_parquet(str(tmp_path / "out" / "data" / "*.parquet"))
    verdicts = dict(zip(out["id"].to_list(), out["verdict"].to_list()))
    assert len(verdicts) == len(rows)
    assert all(verdicts[r["task_id"]] == "correct" for r in honest)
    bad = {k: v for k, v in verdicts.items() if k.startswith("hostile/") and v != "incorrect"}
    assert not bad, bad
    assert st.extra["verdicts"] == {"correct": len(honest), "incorrect": len(hostile)}
    assert st.extra["code_isolation"] == ["bwrap"]
