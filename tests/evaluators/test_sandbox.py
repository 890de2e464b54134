"""The pass_at_k sandbox contains hostile programs: each one fails, leaves no process behind, and the
evaluation goes on. Limits are kept tight (2 s, 256 MiB) so that the test cannot hurt the machine even if a
guard broke; the fork loops are bounded for the same reason."""
import os
import re
import socket
import time

import psutil
import pytest

from mergeplug.plugins import Registry
from mergeplug_plugins.evaluators.pass_at_k import sandbox
from mergeplug_plugins.evaluators.pass_at_k.sandbox import TAIL_CHARS, Limits, check_sandbox, run_program, run_programs

LIMITS = Limits(timeout=2.0, memory_mb=256, file_size_mb=1)
SECRET_NAME, SECRET_VALUE = "MERGEPLUG_TEST_SECRET", "hunter2-do-not-leak"

CORRECT = "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\nprint('ok')\n"
LOOP = "while True:\n    pass\n"
FORK_BOMB = (  # bounded: 32 sleeping children at most, even if os.fork were allowed
    "import os, time\n"
    "for _ in range(32):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(30)\n"
)
ALLOCATE = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))\n"
READ_SECRET = f"import os\nprint(os.environ['{SECRET_NAME}'])\n"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(outcome) -> None:
    """The program's process is gone and no process is left in its process group."""
    assert not alive(outcome.pid)
    group = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == outcome.pid and process.status() != psutil.STATUS_ZOMBIE:
                group.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    assert group == []


def run_contained(source: str, limits: Limits = LIMITS):
    outcome = run_program(source, limits)
    assert outcome.status != "passed", outcome
    assert_nothing_left(outcome)
    return outcome


def test_a_correct_program_passes_and_its_folder_is_removed():
    extra = "import os\nopen('scratch.txt', 'w').write('x')\nopen(os.devnull, 'w').write('x')\nprint(os.getcwd())\n"
    outcome = run_program(CORRECT + extra, LIMITS)
    assert (outcome.status, outcome.returncode) == ("passed", 0)
    folder = outcome.stdout.split()[-1]
    assert outcome.stdout.startswith("ok\n") and "mergeplug-sandbox-" in folder
    assert not os.path.exists(folder)
    assert_nothing_left(outcome)
    check_sandbox(LIMITS)


def test_1_an_endless_loop_times_out_and_is_killed():
    started = time.monotonic()
    outcome = run_contained(LOOP)
    assert outcome.status == "timeout" and "2 s" in outcome.reason
    assert 2.0 <= time.monotonic() - started < 4.0


def test_1b_the_cpu_limit_holds_even_without_the_wall_clock():
    outcome = run_contained(LOOP, Limits(timeout=10.0, cpu_seconds=1, memory_mb=256))
    assert outcome.status == "timeout" and "CPU-time limit" in outcome.reason and outcome.seconds < 5


@pytest.mark.parametrize("bomb", [
    FORK_BOMB,
    "import subprocess, sys\nfor _ in range(32):\n    subprocess.Popen([sys.executable, '-c', 'input()'])\n",
    "import multiprocessing as mp, time\nfor _ in range(32):\n    mp.Process(target=time.sleep, args=(9,)).start()\n",
    "import os\nos.system('sleep 30 &')\n",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})\n",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 30'])\n",
    "import pty\npty.fork()\n",
    "import ctypes\nctypes.CDLL(None).fork()\n",
    "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n",
])
def test_2_fork_bombs_are_blocked_and_leave_no_process(bomb):
    outcome = run_contained(bomb)
    assert outcome.status == "failed"
    assert "blocked" in outcome.stderr or "thread" in outcome.reason or "ctypes" in outcome.reason


def test_3_endless_allocation_hits_the_memory_limit():
    outcome = run_contained(ALLOCATE)
    assert outcome.status == "error" and "memory limit (256 MiB" in outcome.reason


def test_3c_the_limits_cannot_be_lifted_from_inside():
    lift = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n"
    outcome = run_contained(lift + ALLOCATE)
    assert outcome.status == "failed" and "resource.setrlimit: not allowed" in outcome.reason


def test_3b_endless_output_hits_the_file_size_limit_not_the_evaluators_memory():
    outcome = run_contained("while True:\n    print('x' * 65536)\n")
    assert outcome.status == "failed" and "File too large" in outcome.reason
    assert len(outcome.stdout) <= TAIL_CHARS


@pytest.mark.parametrize("how", [
    "open({path!r}, 'w').write('pwned')",
    "import pathlib\npathlib.Path({path!r}).write_text('pwned')",
    "import os\nos.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))",
    "import io\nio.FileIO({path!r}, 'w')",
    "import shutil\nopen('local', 'w').write('pwned')\nshutil.copy('local', {path!r})",
    "import os\nopen(os.path.relpath({path!r}), 'w').write('pwned')",
    "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('pwned')",
])
def test_4_writing_outside_the_folder_is_blocked(tmp_path, how):
    target = tmp_path / "written_by_the_program.txt"
    outcome = run_contained(how.format(path=str(target)))
    assert outcome.status == "failed" and "outside the sandbox folder" in outcome.stderr
    assert not target.exists()


@pytest.mark.parametrize("how", [
    "import os\nos.remove({path!r})",
    "import os\nos.unlink({path!r})",
    "import pathlib\npathlib.Path({path!r}).unlink()",
    "import shutil, os\nshutil.rmtree(os.path.dirname({path!r}))",
    "import os\nos.rename({path!r}, 'stolen.txt')",
    "import os\nos.replace({path!r}, 'stolen.txt')",
    "import os\nos.truncate({path!r}, 0)",
    "import os\nos.chmod({path!r}, 0)",
])
def test_5_deleting_or_changing_a_file_outside_the_folder_is_blocked(tmp_path, how):
    victim_folder = tmp_path / "victim"
    victim_folder.mkdir()
    victim = victim_folder / "keep_me.txt"
    victim.write_text("precious")
    outcome = run_contained(how.format(path=str(victim)))
    assert outcome.status == "failed" and "outside the sandbox folder" in outcome.stderr
    assert victim.read_text() == "precious" and os.access(victim, os.R_OK)


@pytest.mark.parametrize("how", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))",
    "import _socket\n_socket.socket()",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
    "import socket\nsocket.getaddrinfo('localhost', {port})",
])
def test_6_no_network(how):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        outcome = run_contained(how.format(port=server.getsockname()[1]))
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()
    assert outcome.status == "failed" and re.search(r"socket\.\w+: not allowed in the sandbox", outcome.stderr)


@pytest.mark.parametrize("source", [
    READ_SECRET,
    "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
    "import os\nprint(open(f'/proc/self/../{os.getppid()}/environ', 'rb').read())",
])
def test_7_the_evaluators_environment_does_not_reach_the_program(monkeypatch, source):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    outcome = run_contained(source)
    assert outcome.status == "failed"
    assert SECRET_VALUE not in outcome.stdout and SECRET_VALUE not in outcome.stderr


def test_7b_the_environment_is_exactly_the_scrubbed_one(monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    outcome = run_program("import os\nprint(sorted(os.environ.items()))\nprint(os.getcwd())\n", LIMITS)
    assert outcome.status == "passed"
    folder = outcome.stdout.split()[-1]
    assert outcome.stdout.splitlines()[0] == str(sorted(sandbox.scrubbed_environment(folder).items()))


def test_exit_calls_cannot_fake_a_pass():
    for source in ("import sys\nsys.exit(0)\nassert False", "exit()\nassert False", "import os\nos._exit(0)"):
        assert run_contained(source).status == "failed"


def test_the_process_group_is_killed_even_when_the_guards_are_bypassed(tmp_path, monkeypatch):
    # Stand in for a program that got past the Python guards: a child with no guards at all that leaves a
    # sleeping grandchild behind, then exits (first run) or sleeps past the timeout (second run).
    for leader_sleeps in (False, True):
        fake_child = tmp_path / f"escaping_child_{leader_sleeps}.py"
        fake_child.write_text(
            "import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(30)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            + ("time.sleep(30)\n" if leader_sleeps else "")
        )
        monkeypatch.setattr(sandbox, "CHILD", fake_child)
        outcome = run_program("", Limits(timeout=1.0, memory_mb=256))
        grandchild = int(outcome.stdout.split()[0])
        assert outcome.status == ("timeout" if leader_sleeps else "passed")
        deadline = time.monotonic() + 2
        while alive(grandchild) and time.monotonic() < deadline:  # SIGKILL delivery is asynchronous
            time.sleep(0.01)
        assert not alive(grandchild)
        assert_nothing_left(outcome)


def test_a_batch_mixing_attacks_with_a_correct_program_scores_each(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    victim = tmp_path / "keep_me.txt"
    victim.write_text("precious")
    attacks = [
        LOOP, FORK_BOMB, ALLOCATE,
        f"open({str(tmp_path / 'new.txt')!r}, 'w')",
        f"import os\nos.remove({str(victim)!r})",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        READ_SECRET,
    ]
    outcomes = run_programs([CORRECT] + attacks, LIMITS, workers=2)
    statuses = [o.status for o in outcomes]
    assert statuses == ["passed", "timeout", "failed", "error", "failed", "failed", "failed", "failed"]
    for outcome in outcomes:
        assert_nothing_left(outcome)
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()

    # The same batch through the registered evaluator: one result per program, the correct one passes.
    evaluator = Registry().get("evaluator", "pass_at_k").load()(
        program="completion", k=[1, 10], timeout=2.0, memory_mb=256, file_size_mb=1, workers=2
    )
    sample = {"prompt": "Write add.", "tests": "assert add(2, 2) == 4\n"}
    scored = evaluator.score(sample, [[CORRECT] + attacks])
    assert scored.details["n"] == 8 and scored.details["passed"] == 1
    assert [r["status"] for r in scored.details["results"]][0] == "passed"
    assert scored.scores == {"pass@1": pytest.approx(1 / 8)}
    assert SECRET_VALUE not in str(scored.details)


def test_programs_run_in_their_own_isolated_interpreter_and_session():
    source = "import os, sys\nprint(os.getpid(), os.getpgid(0), os.getsid(0), sys.flags.isolated)\n"
    outcome = run_program(source, LIMITS)
    pid, group, session, isolated = map(int, outcome.stdout.split())
    assert pid == group == session == outcome.pid != os.getpid() and isolated == 1
