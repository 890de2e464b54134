"""The child side of the pass@k sandbox: limit this process, install the guards, then run one program.

Run by :mod:`.sandbox` as ``python -I -B sandbox_child.py CONFIG_JSON``, in a fresh empty folder, with a
scrubbed environment, in a session (process group) of its own. Only the standard library is used, and nothing
from mergeplug: this file must start in a bare interpreter.

Order matters: resource limits first (so nothing afterwards runs unlimited), then the program's source is
read and compiled, then the guards go in, and only then does the program run. The guards are Python-level and
can be undone by code that goes looking for the originals (through ``gc``, frame or closure introspection, or
by loading an extension module by hand); they stop accidents and casual misuse, not a determined attacker.
The exit code tells the parent what happened (``EXIT_*`` below): the program cannot pick its own, since
``os._exit`` is blocked and every exception, ``SystemExit`` included, is caught here.
"""
import builtins
import io
import json
import linecache
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import traceback
import types

EXIT_PASSED = 0
EXIT_FAILED = 1  # the program raised (a failing assert, any other exception, exit())
EXIT_SYNTAX = 2  # the program does not compile
EXIT_MEMORY = 3  # MemoryError: the address-space limit
EXIT_BLOCKED = 4  # the program tried something the sandbox forbids
EXIT_SETUP = 5  # the sandbox itself could not be set up

_real_exit = os._exit
_real_write = os.write


class SandboxViolation(PermissionError):
    """Raised by a guard: the program tried to leave its folder, start a process, use the network..."""


def _report(message):
    # Straight to fd 2, so the parent sees the attempt even when the program catches the exception.
    try:
        _real_write(2, f"mergeplug sandbox: blocked {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _refuse(message):
    _report(message)
    raise SandboxViolation(f"{message}: not allowed in the sandbox")


# --- resource limits ---------------------------------------------------------------------------------------
def _limit(name, soft, hard=None):
    kind = getattr(resource, name, None)
    if kind is None or soft is None:
        return
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(kind, (soft, hard))


def set_limits(config):
    cpu = config["cpu_seconds"]
    _limit("RLIMIT_CPU", cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL one second later
    _limit("RLIMIT_AS", config["memory_bytes"])
    _limit("RLIMIT_FSIZE", config["file_size_bytes"])  # also caps what the program writes to stdout/stderr
    _limit("RLIMIT_NOFILE", config["open_files"])
    _limit("RLIMIT_CORE", 0)
    # Counts every process and thread of the user, and root is exempt: the prelude's process guards are the
    # second line (see install_guards).
    _limit("RLIMIT_NPROC", config["max_processes"])


def die_with_parent(parent_pid):
    """Ask the kernel to kill this process when the evaluator dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError, ImportError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        _real_exit(EXIT_SETUP)


# --- guards --------------------------------------------------------------------------------------------------
def install_guards(root):
    """Replace what would let the program escape its folder, spawn processes, signal others or use the network."""
    import _io
    import posix

    root = os.path.realpath(root)
    own_proc = f"/proc/{os.getpid()}"
    real_readlink, real_realpath = os.readlink, os.path.realpath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return real_readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        if not os.path.isabs(path):
            base = os.getcwd() if dir_fd is None else real_readlink(f"/proc/self/fd/{dir_fd}")
            path = os.path.join(base, path)
        return real_realpath(path)

    def inside(path, dir_fd=None):
        if isinstance(path, int) and path in (0, 1, 2):
            return True
        try:
            target = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return target == root or target.startswith(root + os.sep) or target == os.devnull

    def check_write(what, path, dir_fd=None):
        if not inside(path, dir_fd):
            _refuse(f"{what}({path!r}) outside the sandbox folder")

    def check_read(what, path, dir_fd=None):
        # Reading is allowed (imports need the standard library), except other processes' /proc entries:
        # /proc/<parent>/environ would hand over the evaluator's environment.
        try:
            target = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return
        if re.match(r"/proc/\d+(/|$)", target) and not (target == own_proc or target.startswith(own_proc + "/")):
            _refuse(f"{what}({path!r}): another process's /proc entry")

    def replace(name, function, *modules):
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, function)

    # files
    real_open = io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
            check_write("open", file)
        else:
            check_read("open", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    real_file_io = io.FileIO

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", closefd=True, opener=None):
            if any(flag in mode for flag in "wax+"):
                check_write("FileIO", file)
            else:
                check_read("FileIO", file)
            super().__init__(file, mode, closefd, opener)

    io.FileIO = _io.FileIO = GuardedFileIO
    real_os_open = os.open

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check_write("os.open", path, dir_fd)
        else:
            check_read("os.open", path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    replace("open", guarded_os_open, os, posix)

    def path_guard(name, params):
        # params: (position, keyword, dir_fd keyword) of each path argument the call modifies
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            for position, keyword, dir_fd_keyword in params:
                path = args[position] if position < len(args) else kwargs.get(keyword)
                if path is not None:
                    check_write(f"os.{name}", path, kwargs.get(dir_fd_keyword) if dir_fd_keyword else None)
            return real(*args, **kwargs)

        guarded.__name__ = name
        return guarded

    one = ((0, "path", "dir_fd"),)
    two = ((0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    for name, params in {
        "remove": one, "unlink": one, "rmdir": one, "mkdir": one, "mkfifo": one, "mknod": one, "chmod": one,
        "chown": one, "lchown": one, "utime": one, "truncate": one, "setxattr": one, "removexattr": one,
        "rename": two, "replace": two, "link": two, "symlink": ((1, "dst", "dir_fd"),),
    }.items():
        if hasattr(os, name):
            replace(name, path_guard(name, params), os, posix)
    real_rmtree = shutil.rmtree

    def guarded_rmtree(path, *args, **kwargs):
        check_write("shutil.rmtree", path, kwargs.get("dir_fd"))
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = guarded_rmtree

    # processes, signals, leaving the process group, exiting with a chosen code
    def blocked(what):
        def refuse(*args, **kwargs):
            _refuse(what)

        refuse.__name__ = what.rsplit(".", 1)[-1]
        return refuse

    for name in (
        "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp",
        "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "execv", "execve", "execl", "execle", "execlp",
        "execlpe", "execvp", "execvpe", "kill", "killpg", "setsid", "setpgid", "setpgrp", "chroot", "_exit",
    ):
        replace(name, blocked(f"os.{name}"), os, posix)
    import _posixsubprocess

    replace("fork_exec", blocked("_posixsubprocess.fork_exec"), _posixsubprocess)
    subprocess.Popen = blocked("subprocess.Popen")
    replace("pidfd_send_signal", blocked("signal.pidfd_send_signal"), signal)
    # root may raise its own hard limits again
    replace("setrlimit", blocked("resource.setrlimit"), resource)
    replace("prlimit", blocked("resource.prlimit"), resource)

    # network (DNS lookups included: a name lookup can carry data out)
    import _socket

    def blocked_class(base, what):
        # A subclass, not a function: modules such as ssl subclass socket.socket when imported.
        class Blocked(base):
            def __init__(self, *args, **kwargs):
                _refuse(what)

        Blocked.__name__ = Blocked.__qualname__ = base.__name__
        return Blocked

    replace("socket", blocked_class(socket.socket, "socket.socket"), socket)
    replace("socket", blocked_class(_socket.socket, "_socket.socket"), _socket)
    replace("SocketType", blocked_class(_socket.socket, "socket.SocketType"), socket, _socket)
    for name in (
        "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
        "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn", "dup",
    ):
        replace(name, blocked(f"socket.{name}"), socket, _socket)

    # foreign-function interfaces would reach every system call the guards above cover
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
        sys.modules[name] = None


# --- running the program --------------------------------------------------------------------------------------
def run(source, filename):
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        traceback.print_exc()
        return EXIT_SYNTAX
    except MemoryError:
        return EXIT_MEMORY
    # Tracebacks show the failing test line although the program is no file on disk.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("__main__")
    module.__file__ = filename
    sys.modules["__main__"] = module  # a fresh module: `import __main__` must not reach this bootstrap
    sys.argv = [filename]
    try:
        exec(code, module.__dict__)
    except SandboxViolation:
        traceback.print_exc()
        return EXIT_BLOCKED
    except MemoryError:
        return EXIT_MEMORY
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt count as failures too
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - a broken traceback must not change the verdict
            pass
        return EXIT_FAILED
    return EXIT_PASSED


def main():
    try:
        config = json.loads(sys.argv[1])
        set_limits(config)
        die_with_parent(config["parent_pid"])
        with open(config["program"], encoding="utf-8") as file:
            source = file.read()
        install_guards(config["root"])
    except Exception:  # noqa: BLE001 - any setup failure is the sandbox's, reported on stderr
        traceback.print_exc()
        _real_exit(EXIT_SETUP)
    status = run(source, "program.py")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the verdict stands even if the output cannot be flushed
            pass
    _real_exit(status)


if __name__ == "__main__":
    main()
