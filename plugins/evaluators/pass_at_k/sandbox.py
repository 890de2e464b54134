"""Run untrusted Python programs (model-written code plus its tests) in separate, limited processes.

This is a best-effort sandbox, not a security boundary. It contains what generated code does by accident
(endless loops, runaway memory, fork loops, stray file writes, network calls) and makes casual misuse fail,
but a determined attacker who knows Python's internals can undo the Python-level guards, and the program can
read any file the evaluating user can read. Run untrusted code, or evaluate as a privileged user, inside a
container or a virtual machine with no network and no secrets mounted.

What each program gets (one process per program, :func:`run_program`):

- a process of its own: ``sys.executable -I -B sandbox_child.py`` (``-I``: no ``PYTHON*`` variables, no user
  site-packages, no script folder on ``sys.path``), never ``exec`` in the evaluator's process;
- resource limits the child sets on itself before it reads the program (``RLIMIT_CPU``, ``RLIMIT_AS``,
  ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, no core files). They are set in the child rather than
  in a ``preexec_fn`` because ``preexec_fn`` is unsafe in a parent with threads (the ``subprocess`` docs) and
  programs run from a thread pool;
- a session and process group of its own, killed as a whole with SIGKILL when the wall-clock ``timeout``
  passes and again after every run, so nothing it started outlives it; the kernel also kills it if the
  evaluator dies (``PR_SET_PDEATHSIG``);
- a fresh empty working folder (also ``HOME`` and ``TMPDIR``), removed afterwards;
- a scrubbed environment: none of the evaluator's variables (no tokens, no ``PATH``), only a locale and
  one-thread settings for BLAS libraries;
- Python-level guards (``sandbox_child.py``): writing, renaming or deleting outside its folder, starting
  processes, signalling other processes, leaving its process group, ``os._exit``, raising its own resource
  limits (which root could), sockets and DNS, reading other processes' ``/proc`` entries, and importing
  ``ctypes``/``cffi`` raise :class:`PermissionError` (``/dev/null`` stays writable).

``RLIMIT_NPROC`` counts every process of the user and does not apply to root, so the guards are what stops a
fork loop when evaluating as root; stdout and stderr go to files under ``RLIMIT_FSIZE``, so a program that
prints without end cannot fill the evaluator's memory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mergeplug.errors import MergeplugError

CHILD = Path(__file__).with_name("sandbox_child.py")
# Exit codes of sandbox_child.py
EXIT_PASSED, EXIT_FAILED, EXIT_SYNTAX, EXIT_MEMORY, EXIT_BLOCKED, EXIT_SETUP = range(6)
#: Characters of a program's stderr/stdout kept in its outcome (the tail, where the traceback ends).
TAIL_CHARS = 2000
STATUSES = ("passed", "failed", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    """What one program may use. Defaults: see the pass_at_k evaluator's parameters.json."""

    timeout: float = 20.0  #: wall-clock seconds, interpreter start-up included
    cpu_seconds: int | None = None  #: RLIMIT_CPU; None: the timeout rounded up, plus one second
    memory_mb: int = 1024  #: RLIMIT_AS (address space, not resident memory)
    file_size_mb: int = 10  #: RLIMIT_FSIZE: the largest file it may write, stdout and stderr included
    max_processes: int = 1  #: RLIMIT_NPROC (the user's processes and threads; root is exempt)
    open_files: int = 64  #: RLIMIT_NOFILE

    def check(self) -> None:
        problems = []
        if not self.timeout > 0:
            problems.append(f"timeout {self.timeout!r} must be a positive number of seconds")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            problems.append(f"cpu_seconds {self.cpu_seconds!r} must be at least 1")
        if self.memory_mb < 64:
            problems.append(f"memory_mb {self.memory_mb!r} must be at least 64 (Python itself needs that much)")
        if self.file_size_mb < 1:
            problems.append(f"file_size_mb {self.file_size_mb!r} must be at least 1")
        if self.max_processes < 1:
            problems.append(f"max_processes {self.max_processes!r} must be at least 1")
        if self.open_files < 16:
            problems.append(f"open_files {self.open_files!r} must be at least 16 (Python itself needs a few)")
        if problems:
            raise MergeplugError(*(f"pass_at_k sandbox: {p}" for p in problems))

    def child_config(self) -> dict:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1
        return {
            "cpu_seconds": int(cpu),
            "memory_bytes": int(self.memory_mb) << 20,
            "file_size_bytes": int(self.file_size_mb) << 20,
            "max_processes": int(self.max_processes),
            "open_files": int(self.open_files),
        }


@dataclass(frozen=True)
class Outcome:
    """How one program ended, with a one-line reason and the tails of its stderr and stdout.

    ``passed``: it ran to the end. ``failed``: it raised (a failing assert, any exception, ``exit()``, a write
    past the file-size limit, which Python reports as ``OSError: File too large``) or the sandbox blocked it.
    ``timeout``: the wall clock or the CPU-time limit ran out. ``error``: it does not compile, ran out of
    memory, was killed by a signal, or the sandbox could not start it.
    """

    status: str
    reason: str
    returncode: int | None
    stderr: str
    stdout: str
    seconds: float
    pid: int

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "returncode": self.returncode,
                "stderr": self.stderr, "seconds": round(self.seconds, 3)}


def scrubbed_environment(folder: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited from the evaluator."""
    return {
        "HOME": folder,
        "TMPDIR": folder,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # BLAS libraries start one thread per core at import; under RLIMIT_AS and RLIMIT_NPROC that fails.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 4 * TAIL_CHARS))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text[-TAIL_CHARS:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_without_reaping(pid: int, deadline: float) -> bool:
    """Wait until the child exits (True) or the deadline passes (False), leaving it unreaped.

    While the group leader is an unreaped zombie its pid (which is the group id) cannot be reused, so
    killing the group afterwards cannot hit an unrelated process.
    """
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped (SIGCHLD ignored by the embedding application)
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.05)


def _remove_tree(folder: str) -> None:
    def make_writable_and_retry(function, path, _exc_info):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=make_writable_and_retry)


def _classify(returncode: int, timed_out: bool, limits: Limits, stderr: str) -> tuple[str, str]:
    last_line = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if timed_out:
        return "timeout", f"no result within {limits.timeout:g} s (wall clock)"
    if returncode == EXIT_PASSED:
        return "passed", "ran to the end"
    if returncode == EXIT_FAILED:
        return "failed", last_line or "raised an exception"
    if returncode == EXIT_BLOCKED:
        return "failed", last_line or "blocked by the sandbox"
    if returncode == EXIT_SYNTAX:
        return "error", f"does not compile: {last_line}"
    if returncode == EXIT_MEMORY:
        return "error", f"memory limit ({limits.memory_mb} MiB of address space)"
    if returncode == EXIT_SETUP:
        return "error", f"the sandbox could not start the program: {last_line}"
    if returncode < 0:
        signal_number = -returncode
        if signal_number == signal.SIGXCPU:
            return "timeout", f"CPU-time limit ({limits.child_config()['cpu_seconds']} s)"
        if signal_number == signal.SIGXFSZ:
            return "error", f"file-size limit ({limits.file_size_mb} MiB; output counts)"
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = f"signal {signal_number}"
        return "error", f"killed by {name}"
    return "error", f"the interpreter exited with code {returncode}: {last_line}"


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run one program in the sandbox and say how it ended (see the module docstring)."""
    started = time.monotonic()
    top = tempfile.mkdtemp(prefix="mergeplug-sandbox-")
    try:
        folder = os.path.join(top, "work")
        os.mkdir(folder, 0o700)
        program = os.path.join(top, "program.py")
        with open(program, "w", encoding="utf-8") as file:
            file.write(source)
        config = {**limits.child_config(), "root": folder, "program": program, "parent_pid": os.getpid()}
        out_path, err_path = os.path.join(top, "stdout"), os.path.join(top, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(CHILD), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=folder, env=scrubbed_environment(folder),
                start_new_session=True, close_fds=True,
            )
        try:
            if hasattr(os, "waitid"):
                exited = _wait_without_reaping(process.pid, started + limits.timeout)
            else:  # macOS: reap first, then kill the group (its id could in principle be reused meanwhile)
                try:
                    process.wait(max(0.0, started + limits.timeout - time.monotonic()))
                    exited = True
                except subprocess.TimeoutExpired:
                    exited = False
        finally:
            _kill_group(process.pid)  # whatever it started dies with it, finished or not
            returncode = process.wait()
        stderr = _tail(err_path)
        status, reason = _classify(returncode, not exited, limits, stderr)
        return Outcome(status, reason, returncode, stderr, _tail(out_path), time.monotonic() - started, process.pid)
    finally:
        _remove_tree(top)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[Outcome]:
    """Run programs in parallel, ``workers`` at a time; one outcome per program, in order."""
    if workers < 1:
        raise MergeplugError(f"pass_at_k sandbox: workers {workers!r} must be at least 1")
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))


def check_sandbox(limits: Limits = Limits()) -> None:
    """Raise a clear error when the sandbox cannot run even an empty program (a missing library, say)."""
    outcome = run_program("pass\n", limits)
    if outcome.status != "passed":
        raise MergeplugError(
            f"pass_at_k sandbox: cannot run Python programs ({outcome.status}: {outcome.reason}); "
            f"stderr: {outcome.stderr.strip()[-500:] or '(empty)'}"
        )
