"""Run one untrusted Python program (model-generated code plus its tests) and say whether it passed.

    result = run_program(source, timeout_s=10)   # SandboxResult(passed, reason, wall_s, ...)

Threat model. The code comes from a language model we are training: not a targeted attacker, but
it can do anything a confused programmer can do by accident, and some things no one would write on
purpose: loop forever, fork without end, allocate all memory, fill the disk, delete files, read the
environment (where cluster tokens live), kill other processes, exit with status 0 before its tests
run, or print "passed". None of this may hurt the machine, the training run, or the score.

How each layer works (process tree: caller -> supervisor -> harness running the program):

* The caller never forks from its own (threaded: torch, tokenizers) process with Python code
  between fork and exec. It starts a small supervisor (`python -I -S this_file.py`, root if the
  caller is root) with only C-level Popen options. The supervisor is single-threaded, so its
  preexec function (limits, privilege drop) is safe there.
* The supervisor marks itself a child subreaper: descendants orphaned by the program re-parent to
  it, not to PID 1 (which in a container may never reap them; zombies still count against
  RLIMIT_NPROC).
* Namespaces (`_isolate`), the same as root and as an ordinary user: a user that is not root first
  creates a user namespace (unprivileged user namespaces: Linux >= 3.8 where the distribution allows
  them), which gives it what it needs to create the others; the program keeps the caller's uid and
  loses those capabilities at exec. The program gets a network namespace (a loopback device, down:
  no connection to anything, 127.0.0.1 included), a PID namespace of which it is PID 1 (it cannot
  see or signal the caller or anything else, and the kernel kills whatever it left when it ends), a
  mount namespace in which every mount is read-only (mount_setattr, Linux >= 5.12) but fresh tmpfs on
  /tmp, /var/tmp and /dev/shm (its files there die with it) and its own directory, and a /proc of its
  own PID namespace (the caller's environment is not in view). Each layer that the kernel refuses is
  missing from `SandboxResult.isolated`; the code scorer then says once per process, loudly, what is
  not isolated (`isolation_warning`).
* The program's process: a new session and process group; cwd a fresh temp directory holding
  only program.py (so tracebacks show source lines), removed afterwards; an environment built
  from nothing (PATH, LANG, HOME/TMPDIR = the temp dir,
  PYTHONHASHSEED=0 and a run marker; no inherited variable, so no secrets); stdin /dev/null;
  stdout and stderr to a log file the caller reads the tail of; every other fd closed;
  RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC (processes and threads), RLIMIT_FSIZE,
  RLIMIT_NOFILE and RLIMIT_CORE = 0 set in preexec. When the supervisor is root, preexec also drops
  to uid/gid 65534 (nobody/nogroup) with setgroups([]), setgid, setuid before exec: root ignores
  RLIMIT_NPROC, so without the drop a fork bomb would not be bounded, and the program could write
  anywhere. The temp dir is chowned to that user (mode 0700).
* The interpreter: `python -s -S -B` (no user or system site-packages, no bytecode writes) of an
  interpreter the sandbox user can execute (the venv's if it can, else a system python3; probed
  once). `-E`/`-I` are not used because the environment is ours anyway and PYTHONHASHSEED=0 must
  reach the interpreter: set and dict-of-str iteration order then does not change between runs, so
  pass@1 of a program that depends on it is reproducible. The harness also drops "" from sys.path.
* The wall-clock limit: the supervisor waits `timeout_s`, then SIGKILLs the whole process group.
  After every run it kills what is left (the group, its own children, and every process of the
  sandbox uid that carries this run's marker, which catches a descendant that called setsid) and
  reaps them, until nothing is left (bounded by a few seconds; what survives is reported).
* The verdict comes from our harness, not from the program. The caller writes a random token into
  a pipe; the harness reads it and closes that fd before the program starts, execs the program
  (which includes the tests and `check(entry_point)`), and only if that returned writes the token
  to a second inherited pipe. passed = the token came back and the exit status is 0. An
  os._exit(0), sys.exit(0), a killed process or a printed "passed" before the tests finish is a
  fail.

What it does not stop (say so rather than pretend): in the single-program mode the program runs in
the harness's own interpreter, so code written to cheat on purpose can find the token in the
harness's frame or memory (sys._getframe, ctypes) and write it early, redefine `check`, or return an
object whose `__eq__` is always true; the checked mode (`tests=`, `_CHECKED_HARNESS`) closes that by
running the tests in a process the program cannot reach, with plain data crossing between them.
It can read any world-readable file (read-only), use RLIMIT_CPU of CPU and
RLIMIT_AS of memory per process times RLIMIT_NPROC processes, and exploit kernel bugs. Where the
kernel refuses the namespaces (no unprivileged user namespaces, mount_setattr missing), the layers
that failed are named and their protection is gone: as a user without them there is no privilege
drop, the program runs with the caller's file permissions and can see and signal the caller's
processes. As root, RLIMIT_NPROC counts every process of uid 65534 on the machine: other programs
running as nobody share the budget. For hostile code use a VM or gVisor.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup
_MARKER_VAR = "CLKIT_SANDBOX_RUN"
_TOKEN_BYTES = 32
_PROGRAM_FILE = "program.py"
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_OUTPUT_TAIL_BYTES = 4000
# Extra seconds the caller waits for the supervisor beyond the program's own time limit: the
# supervisor's start, the harness's start and the cleanup sweep. Only a supervisor bug uses them up.
_SUPERVISOR_GRACE_S = 30.0
_SWEEP_LIMIT_S = 5.0
_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 0x2, 0x4, 0x8, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux >= 5.12)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
# Directories every user may write: each gets a fresh tmpfs of the run's own, gone with the run.
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# What a complete isolation consists of (SandboxResult.isolated lists those in place).
ISOLATION_LAYERS = ("network", "pid", "mount", "read_only", "private_tmp", "proc")

# The end of both harnesses: no atexit handlers or leftover threads of the program run after the verdict.
_HARNESS_EXIT = r"""
try:
    sys.stdout.flush()
    sys.stderr.flush()
finally:
    os._exit(0)
"""

# Runs inside the sandboxed interpreter, before and after the untrusted program. Kept to the
# stdlib calls every Python 3 has, since the sandbox interpreter may not be the caller's.
# %-formatting, because the code itself is full of braces.
_HARNESS = (
    r"""
import os, sys

def _harness():
    token_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    token = b""
    while len(token) < %(n)d:
        chunk = os.read(token_fd, %(n)d - len(token))
        if not chunk:
            break
        token += chunk
    os.close(token_fd)  # the program cannot read the token from the pipe
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    with open(%(file)r, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": %(file)r, "__builtins__": __builtins__}
    harness_pid = os.getpid()
    exec(compile(source, %(file)r, "exec"), namespace)
    # Only reached when the program, its tests and check(...) returned without raising; a child
    # the program forked that falls through to here is not the one whose verdict counts.
    if os.getpid() == harness_pid:
        os.write(result_fd, token)

_harness()
"""  # noqa: UP031 - see above
    % {"n": _TOKEN_BYTES, "file": _PROGRAM_FILE}
    + _HARNESS_EXIT
)

_CHECK_FILE = "check.json"  # the tests of a checked run; read and removed before the program starts

# The checked mode (run_program(..., tests=, entry_point=)): the verdict out of the program's reach.
# This process (the checker, PID 1 of the sandbox's PID namespace) reads the tests and removes them,
# forks the program's process before it ever holds the token, makes itself undumpable (a process of the
# same uid can then neither ptrace it nor read its memory through /proc), reads the token, and runs the
# tests here, against a proxy of the entry point. Each call crosses a pipe as plain data (None, bool,
# int, float, complex, str, bytes, list, tuple, set, frozenset, dict; exact types): an object whose
# __eq__ is always true cannot cross, a redefined check() or a token read from a frame exist only in
# the program's own process, and killing this one (it is PID 1: it cannot even be signalled from the
# program) or the program's only fails the run.
_CHECKED_HARNESS = (
    r"""
import builtins, json, os, struct, sys

MAX_DEPTH = 64

def enc(v, depth=0):
    if depth > MAX_DEPTH:
        raise TypeError("a value nested more than %%d deep" %% MAX_DEPTH)
    t = type(v)
    if v is None:
        return ["none"]
    if t is bool:
        return ["bool", v]
    if t is int:
        return ["int", str(v)]
    if t is float:
        return ["float", repr(v)]
    if t is complex:
        return ["complex", repr(v.real), repr(v.imag)]
    if t is str:
        return ["str", v]
    if t is bytes:
        return ["bytes", v.hex()]
    if t in (list, tuple, set, frozenset):
        return [t.__name__, [enc(x, depth + 1) for x in v]]
    if t is dict:
        return ["dict", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]]
    raise TypeError("a %%s cannot cross the sandbox's boundary (only plain data: numbers, strings, bytes, "
                    "None and lists, tuples, sets and dicts of them)" %% t.__name__)

def dec(v):
    tag = v[0]
    if tag == "none":
        return None
    if tag == "bool":
        return bool(v[1])
    if tag == "int":
        return int(v[1])
    if tag == "float":
        return float(v[1])
    if tag == "complex":
        return complex(float(v[1]), float(v[2]))
    if tag == "str":
        return str(v[1])
    if tag == "bytes":
        return bytes.fromhex(v[1])
    if tag in ("list", "tuple", "set", "frozenset"):
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](dec(x) for x in v[1])
    if tag == "dict":
        return {dec(k): dec(x) for k, x in v[1]}
    raise ValueError("unknown tag %%r" %% (tag,))

def send(fd, obj):
    data = json.dumps(obj).encode("utf-8", "surrogatepass")
    data = struct.pack(">Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]

def recv(fd):
    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out
    n = struct.unpack(">Q", exactly(8))[0]
    if n > 1 << 26:
        raise EOFError  # not a message of ours: the other side wrote into the pipe itself
    return json.loads(exactly(n).decode("utf-8", "surrogatepass"))

def last_line(exc):
    return ("%%s: %%s" %% (type(exc).__name__, exc))[:500]

def program(source, entry_point, requests, replies):
    # the program's process: run the candidate, then answer calls of its entry point
    namespace = {"__name__": "__main__", "__file__": %(file)r, "__builtins__": __builtins__}
    try:
        exec(compile(source, %(file)r, "exec"), namespace)
        function = namespace[entry_point]
    except BaseException as exc:
        # the traceback goes to stderr before the checker hears of the error, so the checker's own line
        # ("the program failed before its tests ran: ...") is always the last one: the reason is the same
        # every run (both processes share stderr, and a traceback printed on the way out raced it)
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        send(replies, {"error": last_line(exc)})
        os._exit(1)
    send(replies, {"ready": True})
    while True:
        try:
            request = recv(requests)
        except EOFError:
            os._exit(0)
        try:
            value = function(*dec(request["args"]), **dec(request["kwargs"]))
            reply = {"value": enc(value)}
        except BaseException as exc:
            reply = {"raise": type(exc).__name__, "message": str(exc)[:2000]}
        send(replies, reply)

def checker():
    token_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    with open(%(file)r, encoding="utf-8") as f:
        source = f.read()
    requests, to_program = os.pipe()
    from_program, replies = os.pipe()
    # fork before the tests or the token are in this process's memory: the program's copy holds neither
    pid = os.fork()
    if pid == 0:
        for fd in (token_fd, result_fd, to_program, from_program):
            os.close(fd)
        entry_point = recv(requests)["go"]  # once the tests are read and gone from the disk
        program(source, entry_point, requests, replies)
        os._exit(1)
    for fd in (requests, replies):
        os.close(fd)
    with open(%(check)r, encoding="utf-8") as f:
        job = json.load(f)
    os.remove(%(check)r)  # the program never reads the tests
    send(to_program, {"go": job["entry_point"]})
    try:
        import ctypes
        if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 0
            raise OSError("prctl")
    except Exception:
        sys.exit("the checker could not make itself undumpable: not running the tests")
    token = b""
    while len(token) < %(n)d:
        chunk = os.read(token_fd, %(n)d - len(token))
        if not chunk:
            break
        token += chunk
    os.close(token_fd)
    try:
        first = recv(from_program)
    except EOFError:
        first = {"error": "the program's process ended before its entry point could be called"}
    if "error" in first:
        sys.exit("the program failed before its tests ran: " + first["error"])

    def proxy(*args, **kwargs):
        send(to_program, {"args": enc(args), "kwargs": enc(kwargs)})
        try:
            reply = recv(from_program)
        except EOFError:
            raise RuntimeError("the program's process ended during a call") from None
        if "raise" in reply:
            kind = getattr(builtins, reply["raise"], None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(reply["message"])
        return dec(reply["value"])

    proxy.__name__ = proxy.__qualname__ = job["entry_point"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if job["context"]:
        exec(compile(job["context"], "<prompt>", "exec"), namespace)  # the task's own helpers, trusted
    namespace[job["entry_point"]] = proxy
    exec(compile(job["tests"] + "\ncheck(" + job["entry_point"] + ")\n", "<tests>", "exec"), namespace)
    os.write(result_fd, token)

checker()
"""  # noqa: UP031 - braces
    % {"n": _TOKEN_BYTES, "file": _PROGRAM_FILE, "check": _CHECK_FILE}
    + _HARNESS_EXIT
)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", or why not: timeout, exit status and the last line of stderr, ...
    wall_s: float
    returncode: int | None = None  # of the harness process; negative = killed by that signal
    output_tail: str = ""  # last few KB of the program's stdout+stderr
    network_isolated: bool = False
    # the namespace layers in place for this run (ISOLATION_LAYERS); a missing one is named by
    # isolation_warning() and warned about once per process by the code scorer
    isolated: tuple[str, ...] = ()
    isolation_error: str = ""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (no interpreter the sandbox user can execute)."""


# ----------------------------------------------------------------------------------------------
# the caller's side


_python_lock = threading.Lock()
_python_cache: dict[bool, str] = {}


def _drop_privileges() -> bool:
    return os.geteuid() == 0


def _minimal_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": _MINIMAL_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",
    }


def sandbox_python() -> str:
    """An interpreter the sandboxed program can run under; probed once per process.

    Without a privilege drop that is our own interpreter. As root the program runs as uid 65534,
    which cannot execute an interpreter under a private home (uv and pyenv put theirs in /root), so
    candidates are tried as that user until one imports a few stdlib modules. The program only ever
    gets the standard library (site-packages are off), so any Python 3 does.
    """
    drop = _drop_privileges()
    with _python_lock:
        if drop in _python_cache:
            return _python_cache[drop]
        if not drop:
            _python_cache[drop] = sys.executable
            return sys.executable
        candidates = [
            sys.executable,
            os.path.realpath(sys.executable),
            getattr(sys, "_base_executable", ""),
            shutil.which("python3", path=_MINIMAL_PATH) or "",
            "/usr/bin/python3",
            "/usr/local/bin/python3",
        ]
        tried: list[str] = []
        for cand in dict.fromkeys(c for c in candidates if c):
            tried.append(cand)
            try:
                proc = subprocess.run(
                    [cand, "-s", "-S", "-B", "-c", "import json, math, re, collections, typing"],
                    user=SANDBOX_UID,
                    group=SANDBOX_GID,
                    extra_groups=[],
                    cwd="/",
                    env=_minimal_env("/"),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if proc.returncode == 0:
                _python_cache[drop] = cand
                return cand
        raise SandboxUnavailable(
            f"no Python interpreter is executable by uid {SANDBOX_UID} (tried {', '.join(tried)}): the sandbox "
            "runs programs as that user because we are root; install python3 in /usr/bin (any Python 3), or "
            "pass python= to run_program"
        )


def run_program(
    source: str,
    timeout_s: float,
    memory_mb: int = 512,
    *,
    max_processes: int = 16,
    file_size_mb: int = 16,
    max_open_files: int = 64,
    python: str | None = None,
    tests: str | None = None,
    entry_point: str = "",
    context: str = "",
) -> SandboxResult:
    """Run `source` in the sandbox (module docstring) and report whether it ran to its end.

    With `tests` and `entry_point` (the checked mode): `source` is only the candidate (prompt +
    completion); `tests` (which define check) and `context` (the task's prompt, for the helpers the tests
    use) run in a separate checker process that calls the entry point across a plain-data boundary, and
    passed means check(entry_point) returned there (_CHECKED_HARNESS).

    timeout_s: wall-clock limit (the CPU limit is the same, rounded up); memory_mb: address-space
    limit per process; max_processes: RLIMIT_NPROC (processes and threads of the sandbox user);
    file_size_mb: largest file (and output log) it may write; max_open_files: RLIMIT_NOFILE.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0 or file_size_mb <= 0 or max_open_files <= 0:
        raise ValueError("timeout_s, memory_mb, max_processes, file_size_mb and max_open_files must be > 0")
    drop = _drop_privileges()
    interpreter = python or sandbox_python()
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="clkit-sandbox-")
    private = tempfile.mkdtemp(prefix="clkit-sandbox-log-")  # ours only: the program cannot reach it
    fds: list[int] = []
    try:
        program_path = os.path.join(workdir, _PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8", errors="replace") as f:  # a lone surrogate must not crash us
            f.write(source)
        os.chmod(program_path, 0o444)
        checked = tests is not None
        if checked:
            if not entry_point.isidentifier():
                raise ValueError(f"entry_point {entry_point!r} is not a Python identifier")
            with open(os.path.join(workdir, _CHECK_FILE), "w", encoding="utf-8", errors="replace") as f:
                json.dump({"tests": tests, "entry_point": entry_point, "context": context}, f)
        if drop:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
        os.chmod(workdir, 0o700)
        token = secrets.token_hex(_TOKEN_BYTES // 2).encode()
        token_r, token_w = os.pipe()
        result_r, result_w = os.pipe()
        status_r, status_w = os.pipe()
        fds += [token_r, token_w, result_r, result_w, status_r, status_w]
        os.write(token_w, token)  # 32 bytes always fit in a pipe buffer: no one has to read first
        os.close(token_w)
        fds.remove(token_w)
        marker = secrets.token_hex(8)
        uid = SANDBOX_UID if drop else os.getuid()
        config = {
            "python": interpreter,
            "workdir": workdir,
            "timeout_s": float(timeout_s),
            "memory_bytes": int(memory_mb) << 20,
            "max_processes": int(max_processes),
            "file_size_bytes": int(file_size_mb) << 20,
            "max_open_files": int(max_open_files),
            "drop": drop,
            "uid": uid,
            "gid": SANDBOX_GID if drop else os.getgid(),
            "marker": marker,
            "token_fd": token_r,
            "result_fd": result_w,
            "status_fd": status_w,
            "checked": checked,
        }
        log_path = os.path.join(private, "output.log")
        with open(log_path, "wb") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(token_r, result_w, status_w),
                close_fds=True,
                start_new_session=True,
                cwd=private,
                env={"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8"},
            )
        for fd in (token_r, result_w, status_w):  # the supervisor and the program hold them now
            os.close(fd)
            fds.remove(fd)
        try:
            supervisor.wait(timeout=timeout_s + _SUPERVISOR_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(supervisor.pid)
            supervisor.wait()
            _sweep(uid, marker, reap=False)
        status = _read_json(status_r)
        returned = _read_nonblocking(result_r, _TOKEN_BYTES + 1)
        tail = _tail(log_path)
    finally:
        for fd in fds:
            os.close(fd)
        _remove_tree(workdir)
        _remove_tree(private)
    wall_s = time.monotonic() - start
    returncode = status.get("returncode")
    passed = (
        status.get("started", False) and not status.get("timed_out", False) and returncode == 0 and returned == token
    )
    reason = "passed" if passed else _why_not(status, returncode, returned, token, tail, timeout_s)
    if status.get("leftover"):
        reason += f" ({status['leftover']} sandbox process(es) survived the cleanup)"
    isolated = tuple(layer for layer in ISOLATION_LAYERS if layer in status.get("isolated", ()))
    return SandboxResult(
        passed=passed,
        reason=reason,
        wall_s=wall_s,
        returncode=returncode,
        output_tail=tail,
        network_isolated="network" in isolated,
        isolated=isolated,
        isolation_error=str(status.get("isolation_error", ""))[:300],
    )


def isolation_warning(result: SandboxResult) -> str | None:
    """One line naming what this machine's kernel did not let the sandbox isolate, or None when all is."""
    missing = [layer for layer in ISOLATION_LAYERS if layer not in result.isolated]
    if not missing:
        return None
    meaning = {
        "network": "the program can open network connections",
        "pid": "the program sees and can signal the caller's processes",
        "mount": "no private mounts",
        "read_only": "the program can write wherever its uid may",
        "private_tmp": "its files in /tmp, /var/tmp and /dev/shm outlive it",
        "proc": "it can read /proc of the caller's processes (their environment included)",
    }
    why = f" ({result.isolation_error})" if result.isolation_error else ""
    return (
        "the code sandbox could not isolate "
        + ", ".join(missing)
        + why
        + ": "
        + "; ".join(meaning[m] for m in missing)
        + ". Allow unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.apparmor_restrict_"
        "unprivileged_userns=0) or run untrusted code in a VM"
    )


def _why_not(status: dict, returncode: int | None, returned: bytes, token: bytes, tail: str, timeout_s: float) -> str:
    if not status:
        return "supervisor failed: " + (_last_line(tail) or "no status")
    if not status.get("started"):
        return "could not start the sandboxed process: " + status.get("error", "unknown error")
    if status.get("timed_out"):
        return f"timeout: still running after {timeout_s:g} s (killed with its process group)"
    if returncode is not None and returncode < 0:
        name = _signal_name(-returncode)
        limits = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}
        return f"{limits.get(name, 'terminated')} ({name})"
    if returncode == 0 and returned != token:
        return "exited with status 0 before its tests returned (no harness token): not a pass"
    line = _last_line(tail)
    return f"failed (exit status {returncode})" + (f": {line}" if line else "")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _read_json(fd: int) -> dict:
    data = _read_nonblocking(fd, 1 << 16)
    try:
        value = json.loads(data.decode("utf-8")) if data else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_nonblocking(fd: int, limit: int) -> bytes:
    """What is in the pipe now; never waits (a process that escaped the sweep may hold the write end)."""
    os.set_blocking(fd, False)
    out = b""
    while len(out) < limit:
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            break
        try:
            chunk = os.read(fd, limit - len(out))
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _OUTPUT_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _remove_tree(path: str) -> None:
    """rmtree that also removes what a non-root program made unreadable (root needs no chmod)."""

    def make_writable_and_retry(func: Callable[[str], object], p: str, _exc: object) -> None:  # shutil's onerror
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if not os.path.islink(p) and os.path.isdir(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)  # fd-based: never follows the program's symlinks
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# process cleanup (used by the supervisor, and by the caller as a backstop)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_status(pid: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def _carries_marker(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{_MARKER_VAR}={marker}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _sandbox_processes(uid: int, marker: str, parent: int | None) -> list[int]:
    """Live processes of this run: children of `parent` (the supervisor's children are all the
    program's) and processes of the sandbox uid with this run's marker in their environment."""
    found = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        fields = _proc_status(pid)
        if not fields or fields.get("State", "").startswith("Z"):
            continue  # gone, or a zombie: nothing to kill, its parent (or we) reap it
        real_uid = int(fields.get("Uid", "-1").split()[0])
        if (parent is not None and fields.get("PPid") == str(parent)) or (
            real_uid == uid and _carries_marker(pid, marker)
        ):
            found.append(int(pid))
    return found


def _reap_children() -> bool:
    """Reap every exited child; True while children remain."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _sweep(uid: int, marker: str, reap: bool) -> int:
    """Kill (and, in the supervisor, reap) every process of this run; the number that survived."""
    deadline = time.monotonic() + _SWEEP_LIMIT_S
    while True:
        found = _sandbox_processes(uid, marker, os.getpid() if reap else None)
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        children_left = _reap_children() if reap else False
        if not found and not children_left:
            return 0
        if time.monotonic() > deadline:
            return len(found)
        time.sleep(0.005)


# ----------------------------------------------------------------------------------------------
# the supervisor (this file run as a script by run_program; standard library only)


def _libc_call(name: str, *args: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return getattr(libc, name)(*args) == 0
    except (OSError, AttributeError):
        return False


def _libc_errno() -> str:
    import ctypes

    return os.strerror(ctypes.get_errno())


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    import ctypes

    def enc(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0
    except (OSError, AttributeError):
        return False


def _read_only_tree() -> bool:
    """Every mount of this (private) mount namespace read-only, recursively: mount_setattr(2)."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        return (
            libc.syscall(
                ctypes.c_long(_SYS_MOUNT_SETATTR),
                ctypes.c_int(_AT_FDCWD),
                b"/",
                ctypes.c_uint(_AT_RECURSIVE),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            )
            == 0
        )
    except (OSError, AttributeError):
        return False


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def _isolate(cfg: dict, status: dict) -> str:
    """Namespaces for the program, set up in the supervisor before it starts the program; the program's
    working directory (it may have moved onto a private /tmp).

    As root: a new mount, PID and network namespace (root may create them; the program itself runs as
    uid 65534). Otherwise: a new user namespace first (the kernel lets an unprivileged user create one
    where it is allowed), which grants exactly the capabilities to create the others inside it; the
    program, which keeps the caller's uid, loses them at exec. Then:
      network  only a loopback device, down: no connection to anything, 127.0.0.1 included;
      pid      the program is PID 1 of its own namespace: it cannot see or signal the caller (or any other
               process), and when it ends the kernel kills every process it left;
      mount    private mounts: the whole tree read-only (mount_setattr), fresh tmpfs on /tmp, /var/tmp and
               /dev/shm (what it writes there is gone with the run), a fresh /proc of its own PID
               namespace (mounted by the program's process itself, _child_mounts).
    Each layer that fails is left out of status["isolated"]; run_program reports what is missing.
    """
    isolated: list[str] = status.setdefault("isolated", [])
    workdir = cfg["workdir"]
    if not cfg["drop"]:
        uid, gid = os.getuid(), os.getgid()
        if not _libc_call("unshare", _CLONE_NEWUSER):
            status["isolation_error"] = f"unshare(CLONE_NEWUSER): {_libc_errno()}"
            return workdir
        # map our own ids (the only ones an unprivileged user may map); the program keeps them
        if not (
            _write("/proc/self/setgroups", "deny")
            and _write("/proc/self/uid_map", f"{uid} {uid} 1")
            and _write("/proc/self/gid_map", f"{gid} {gid} 1")
        ):
            status["isolation_error"] = "writing the user namespace's id maps failed"
            return workdir
    if _libc_call("unshare", _CLONE_NEWNET):
        isolated.append("network")
    if _libc_call("unshare", _CLONE_NEWPID):  # applies to the children: the program is its PID 1
        isolated.append("pid")
    if not (_libc_call("unshare", _CLONE_NEWNS) and _mount(None, "/", None, _MS_REC | _MS_PRIVATE)):
        status["isolation_error"] = f"a private mount namespace: {_libc_errno()}"
        return workdir
    isolated.append("mount")
    files = {}
    for name in os.listdir(workdir):  # program.py (and check.json), read before /tmp is covered
        with open(os.path.join(workdir, name), "rb") as f:
            files[name] = (f.read(), os.stat(f.fileno()).st_mode & 0o777)
    if _read_only_tree():
        isolated.append("read_only")
    size = f"size={max(16 << 20, 4 * cfg['file_size_bytes'])},mode=1777"
    private = [
        d for d in _PRIVATE_TMP_DIRS if os.path.isdir(d) and _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, size)
    ]
    if len(private) == len([d for d in _PRIVATE_TMP_DIRS if os.path.isdir(d)]):
        isolated.append("private_tmp")
    if private and (workdir + os.sep).startswith(tuple(d + os.sep for d in private)):
        # the caller's workdir is hidden under the fresh tmpfs now: the same path, made anew on it
        os.makedirs(workdir, mode=0o700)
        for name, (data, mode) in files.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(workdir, name), mode)
            if cfg["drop"]:
                os.chown(os.path.join(workdir, name), cfg["uid"], cfg["gid"])
        if cfg["drop"]:
            os.chown(workdir, cfg["uid"], cfg["gid"])
    # its own directory stays writable: a writable mount of it on top of the read-only tree
    elif "read_only" in isolated and not (
        _mount(workdir, workdir, None, _MS_BIND) and _mount(None, workdir, None, _MS_BIND | _MS_REMOUNT)
    ):
        status["isolation_error"] = f"the program's directory stayed read-only: {_libc_errno()}"
    return workdir


def _child_mounts(isolated: list[str]) -> None:
    """In the program's process, before exec: a /proc of its own PID namespace, in a mount namespace of its
    own (a /proc mounted in the supervisor's namespace would show the supervisor the wrong PIDs)."""
    if "pid" not in isolated or "mount" not in isolated:
        return
    if _libc_call("unshare", _CLONE_NEWNS) and _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC):
        return
    # a kernel that refuses a new proc here (a container that masks parts of /proc): hide it instead
    if not _mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4096,mode=555"):
        os._exit(124)  # never run the program with the caller's /proc in view when we said it is hidden


def _supervise(config_json: str) -> None:
    cfg = json.loads(config_json)
    status: dict = {"started": False, "timed_out": False, "returncode": None, "leftover": 0, "isolated": []}
    _libc_call("prctl", _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _isolate(cfg, status)
    isolated = list(status["isolated"])
    if "pid" in isolated and "mount" in isolated:
        isolated.append("proc")  # _child_mounts makes it so, or the program never starts
        status["isolated"] = isolated
    cpu_s = max(1, math.ceil(cfg["timeout_s"]))

    def limit_and_drop() -> None:
        # Runs in the forked child before exec; the supervisor has a single thread, so this is safe.
        _child_mounts(isolated)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_size_bytes"], cfg["file_size_bytes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_open_files"], cfg["max_open_files"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
        if cfg["drop"]:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
            if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"] or os.getegid() != cfg["gid"]:
                os._exit(125)  # never run the program with privileges we meant to drop

    env = {**_minimal_env(cfg["workdir"]), _MARKER_VAR: cfg["marker"]}
    token_fd, result_fd = cfg["token_fd"], cfg["result_fd"]
    try:
        harness = _CHECKED_HARNESS if cfg["checked"] else _HARNESS
        proc = subprocess.Popen(
            [cfg["python"], "-s", "-S", "-B", "-c", harness, str(token_fd), str(result_fd)],
            cwd=cfg["workdir"],
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=(token_fd, result_fd),
            close_fds=True,
            start_new_session=True,
            preexec_fn=limit_and_drop,  # noqa: PLW1509 - single-threaded supervisor, see above
        )
    except (OSError, subprocess.SubprocessError) as exc:
        status["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BlockingIOError):
            status["error"] += (
                f" (RLIMIT_NPROC {cfg['max_processes']} counts every process of uid {cfg['uid']} on this machine)"
            )
    else:
        status["started"] = True
        os.close(token_fd)
        os.close(result_fd)
        try:
            status["returncode"] = proc.wait(timeout=cfg["timeout_s"])
        except subprocess.TimeoutExpired:
            status["timed_out"] = True
            _kill_group(proc.pid)
            status["returncode"] = proc.wait()
        _kill_group(proc.pid)  # whatever the program left running in its group
    status["leftover"] = _sweep(cfg["uid"], cfg["marker"], reap=True)
    os.write(cfg["status_fd"], json.dumps(status).encode())


if __name__ == "__main__":
    _supervise(sys.argv[1])
