"""Code verification in the sandbox on real data (HumanEval) plus stdio tests and isolation modes."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures.verify_data import humaneval_rows, humaneval_tests
from tracepipe.verifiers import code as code_mod
from tracepipe.verifiers.code import (
    CodeVerifier,
    SandboxLimits,
    extract_code,
    isolation,
    outputs_match,
    parse_tests,
)

pytestmark = pytest.mark.skipif(isolation().bwrap is None, reason="bubblewrap unavailable: apt-get install -y bubblewrap")

WRAP_WRONG = '''

_tp_orig = {ep}


def {ep}(*args, **kwargs):  # the canonical answer, made slightly wrong
    r = _tp_orig(*args, **kwargs)
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "x"
    if isinstance(r, (list, tuple)):
        return type(r)(list(r) + [None])
    return 0
'''


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(SandboxLimits(wall_s=20, cpu_s=15))


def _run_all(verifier, programs, tests, workers=4):
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda pt: verifier.verify(f"Here is the code:\n```python\n{pt[0]}\n```\n", pt[1]), zip(programs, tests)))


def test_humaneval_canonical_solutions_pass_in_the_sandbox(verifier):
    rows = humaneval_rows()
    assert len(rows) == 164
    res = _run_all(verifier, [r["prompt"] + r["canonical_solution"] for r in rows], [humaneval_tests(r) for r in rows])
    bad = [(r["task_id"], x.verdict, x.detail) for r, x in zip(rows, res) if x.verdict != "correct"]
    assert not bad, bad
    assert {x.isolation for x in res} == {"bwrap"}


def test_humaneval_wrong_bodies_fail(verifier):
    rows = humaneval_rows()
    tests = [humaneval_tests(r) for r in rows]
    none_body = _run_all(verifier, [r["prompt"] + "    return None\n" for r in rows], tests)
    near_miss = _run_all(verifier, [r["prompt"] + r["canonical_solution"] + WRAP_WRONG.format(ep=r["entry_point"]) for r in rows], tests)
    for name, res in (("return None", none_body), ("off by one", near_miss)):
        passed = [r["task_id"] for r, x in zip(rows, res) if x.verdict == "correct"]
        assert not passed, (name, passed)
        assert {x.verdict for x in res} == {"incorrect"}, Counter(x.detail for x in res)
        print(name, Counter(x.detail.split(":")[0] for x in res))


STDIO = json.dumps({
    "style": "stdio",
    "cases": [{"input": "3\n1 2 3\n", "output": "6\n"}, {"input": "2\n5 5\n", "output": "10"}, {"input": "1\n-4\n", "output": "-4\n"}],
    "time_limit_s": 2,
})


@pytest.mark.parametrize(
    ("program", "verdict", "detail"),
    [
        ("n = int(input())\nprint(sum(map(int, input().split())))", "correct", "passed 3 cases"),
        ("import sys\ndata = sys.stdin.read().split()\nprint('  ', sum(map(int, data[1:])), '  \\n\\n')", "correct", "passed 3 cases"),
        ("n = int(input())\nprint(6)", "incorrect", "case 1: wrong answer"),
        ("n = int(input())\nraise ValueError('boom')", "incorrect", "case 0: runtime error (ValueError: boom)"),
        ("while True:\n    pass", "incorrect", "case 0: timeout"),
        ("print('x' * 10**7)", "incorrect", "case 0: output limit"),
    ],
)
def test_stdio(verifier, program, verdict, detail):
    r = verifier.verify(f"```python\n{program}\n```", STDIO)
    assert (r.verdict, r.detail) == (verdict, detail)


def test_stdio_stops_at_first_wrong_case(verifier):
    tests = json.dumps({"style": "stdio", "cases": [{"input": "", "output": "1"}] + [{"input": "", "output": "2"}] * 50, "time_limit_s": 5})
    r = verifier.verify("```python\nimport time\ntime.sleep(0.5)\nprint(1)\n```", tests)
    assert r.detail == "case 1: wrong answer"
    assert r.seconds < 12  # did not run the other 49 cases (they alone would take 25 s)


def test_mbpp_style_bare_asserts(verifier):
    tests = json.dumps({"style": "functional", "code": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"})
    assert verifier.verify("```python\ndef add(a, b):\n    return a + b\n```", tests).verdict == "correct"
    r = verifier.verify("```python\ndef add(a, b):\n    return a - b\n```", tests)
    assert r.verdict == "incorrect" and r.detail.startswith("test failed: AssertionError")
    # a main block of the solution does not run (it would wait for stdin)
    assert verifier.verify("```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 2))\n```", tests).verdict == "correct"


def test_missing_entry_point_and_syntax_errors(verifier):
    row = humaneval_rows()[0]
    tests = humaneval_tests(row)
    r = verifier.verify("```python\ndef something_else():\n    pass\n```", tests)
    assert r.verdict == "incorrect" and "defines no 'has_close_elements'" in r.detail
    r = verifier.verify("```python\ndef has_close_elements(:\n```", tests)
    assert r.verdict == "incorrect" and r.detail.startswith("solution does not compile")


def test_no_code_and_bad_tests(verifier):
    assert verifier.verify("I cannot solve this.", STDIO).verdict == "incorrect"
    assert verifier.verify("I cannot solve this.", STDIO).detail == "no code block in the response"
    assert verifier.verify("```python\nprint(1)\n```", None).verdict == "unverifiable"
    assert verifier.verify("```python\nprint(1)\n```", "{not json").verdict == "unverifiable"
    assert verifier.verify("```python\nprint(1)\n```", json.dumps({"style": "stdio", "cases": []})).verdict == "unverifiable"


def test_extract_code():
    text = "x\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```cpp\nint main() {}\n```") is None
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1\n", allow_unfenced=False) is None
    assert extract_code("Hello") is None  # parses as Python, but is not a program
    assert extract_code(None) is None


def test_parse_tests_and_outputs_match():
    assert parse_tests({"style": "functional", "code": "assert 1"}) == {"style": "functional", "code": "assert 1"}
    assert parse_tests(json.dumps({"style": "other"})) is None
    assert outputs_match("1 2\n3\n", "1 2 3")
    assert outputs_match("YES\n", "YES")
    assert not outputs_match("1 2", "12")


def test_without_bubblewrap_warns_and_falls_back_to_rlimits(monkeypatch):
    """No bwrap: a loud warning, programs still run (rlimits + process group + uid kill) and the
    usual failure modes still fail."""
    monkeypatch.setattr(code_mod, "_WARNED", set())
    v = CodeVerifier(SandboxLimits(wall_s=5, cpu_s=3, memory_mb=512), bwrap="/nonexistent/bwrap")
    with pytest.warns(RuntimeWarning, match="NOT isolated"):
        iso = v.iso
    assert iso.bwrap is None and "not installed" in iso.reason
    row = humaneval_rows()[2]
    ok = v.verify(f"```python\n{row['prompt'] + row['canonical_solution']}\n```", humaneval_tests(row))
    assert (ok.verdict, ok.isolation) == ("correct", "rlimits-only")
    tests = json.dumps({"style": "functional", "code": "assert f(2) == 4", "entry_point": "f"})
    for prog, want in [
        ("import os\nos._exit(0)", ("exited before the tests finished",)),
        ("print('P ' + '0' * 32)\ndef f(x):\n    return 0", ("test failed",)),
        ("x = bytearray(4 * 1024 ** 3)", ("solution raised: MemoryError",)),
        ("while True:\n    pass", ("SIGXCPU", "timeout")),  # CPU limit, or the wall clock on a busy machine
    ]:
        r = v.verify(f"```python\n{prog}\n```", tests)
        assert r.verdict == "incorrect" and any(w in r.detail for w in want), (prog, r)
    assert v.verify("```python\nn = int(input())\nprint(sum(map(int, input().split())))\n```", STDIO).verdict == "correct"
    if os.geteuid() == 0:  # the random uid's processes are all killed after the run, daemons too
        tag = uuid.uuid4().hex
        daemon = (f"import os, time\ndef f(x):\n    if os.fork() == 0:\n        os.setsid()\n"
                  f"        os.execv('/bin/sleep', ['sleep', '60', '{tag}'])\n    time.sleep(0.3)\n    return 0\n")
        assert v.verify(f"```python\n{daemon}\n```", tests).verdict == "incorrect"
        time.sleep(0.5)
        alive = [d for d in os.listdir("/proc") if d.isdigit() and tag.encode() in _cmdline(d)]
        assert not alive


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def test_require_isolation_refuses_without_bubblewrap():
    v = CodeVerifier(bwrap="/nonexistent/bwrap", require_isolation=True)
    for _ in range(2):  # and keeps refusing
        r = v.verify("```python\ndef f(x):\n    return 2 * x\n```", json.dumps({"style": "functional", "code": "assert f(2) == 4"}))
        assert r.verdict == "error" and "require_isolation" in r.detail and "apt-get install -y bubblewrap" in r.detail


def test_sandbox_environment(verifier):
    """What a program sees: not root, PID 1 is not the host's init, no network, empty env, a
    private writable work dir, the limits set, and the pipeline's own interpreter when reachable."""
    prog = '''
import os, resource, socket, sys
def f(x):
    facts = {
        "uid_not_root": os.getuid() != 0,
        "own_pid_ns": len([p for p in os.listdir("/proc") if p.isdigit()]) < 10,
        "env_empty": not any(k for k in os.environ if k not in ("HOME", "PATH", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD", "LC_CTYPE")),
        "cwd_writable": open("scratch.txt", "w").write("x") == 1,
        "nproc_limited": resource.getrlimit(resource.RLIMIT_NPROC)[0] < 1000,
        "as_limited": resource.getrlimit(resource.RLIMIT_AS)[0] <= 2048 * 2**20,
        "no_network": [n for _, n in socket.if_nameindex()] in ([], ["lo"]),
    }
    bad = [k for k, v in facts.items() if not v]
    if bad:
        raise AssertionError(bad)
    return x * 2
'''
    tests = json.dumps({"style": "functional", "code": "assert f(2) == 4", "entry_point": "f"})
    r = verifier.verify(f"```python\n{prog}\n```", tests)
    assert r.verdict == "correct", r.detail


def test_pipeline_interpreter_is_used_when_reachable():
    iso = isolation()
    if iso.python != sys.executable:
        pytest.skip(f"the sandbox uses {iso.python} (this interpreter is not reachable from the sandbox here)")
    try:
        import numpy  # noqa: F401
    except ImportError:
        pytest.skip("numpy not installed")
    v = CodeVerifier()
    tests = json.dumps({"style": "functional", "code": "assert f(2) == 4", "entry_point": "f"})
    assert v.verify("```python\nimport numpy as np\ndef f(x):\n    return int(np.int64(x) * 2)\n```", tests).verdict == "correct"
