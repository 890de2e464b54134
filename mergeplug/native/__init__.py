"""Fused CPU kernels for the prune-and-combine merge methods (``kernels.c``), compiled on first use.

The first merge that can use them compiles ``kernels.c`` with the machine's C compiler (``$CC``, else ``cc``;
under a second) into ``$MERGEPLUG_CACHE/native`` (default ``~/.cache/mergeplug/native``), one file per source,
flags and CPU, and later runs load it in milliseconds. Where there is no compiler, the compile fails, the
device is not the CPU or ``MERGEPLUG_NATIVE=0`` is set, :mod:`mergeplug.merging` runs the same arithmetic as
torch operations instead: the two agree to float32 rounding and keep exactly the same entries (tested).

Each call takes a range of positions; :func:`parallel` splits a tensor's range over :func:`threads` threads, as
ctypes releases the GIL while C runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SWITCH_ENV = "MERGEPLUG_NATIVE"
KERNELS_VERSION = 20  # kernels.c's mergeplug_kernels_version(): a cached library of another is rebuilt
CACHE_ENV = "MERGEPLUG_CACHE"
SOURCE = Path(__file__).with_name("kernels.c")
#: -ffp-contract=off: no multiply-add is fused unless the source says so, so the arithmetic is torch's, step
#: by step; -march=native: the machine's vector instructions (the cache file is per CPU).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared", "-std=c11")

DTYPE_CODES = {"float32": 0, "bfloat16": 1}
KEEP_ALL, KEEP_BAND, KEEP_RANDOM, KEEP_RANKED = 0, 1, 2, 3
REDUCE_SUM, REDUCE_TIES = 0, 1
SCORE_MAGNITUDE, SCORE_VARIANCE = 0, 1
#: kth of a rule that keeps every entry / none (keys are 31-bit).
KEEP_EVERY_KTH, KEEP_NONE_KTH = -1, (1 << 63) - 1

_lock = threading.Lock()
_lending_lock = threading.Lock()
_state: dict[str, object] = {}


class InputsSpec(ctypes.Structure):
    _fields_ = [("n_models", ctypes.c_int64), ("base", ctypes.c_void_p), ("base_dtype", ctypes.c_int32),
                ("models", ctypes.POINTER(ctypes.c_void_p)), ("model_dtypes", ctypes.POINTER(ctypes.c_int32))]


_i64p, _f32p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)


class BandSpec(ctypes.Structure):
    _fields_ = [("model", ctypes.c_int64), ("lo", ctypes.c_int64), ("hi", ctypes.c_int64),
                ("count_above", ctypes.c_int64),
                ("keys", ctypes.c_void_p), ("histogram", ctypes.c_void_p),
                ("found", ctypes.c_int64)]


class MergeSpec(ctypes.Structure):
    _fields_ = [("inputs", InputsSpec), ("rule", ctypes.POINTER(ctypes.c_int32)),
                ("outer_kth", _i64p), ("outer_last", _i64p), ("inner_kth", _i64p), ("inner_last", _i64p),
                ("density", _f32p), ("rng_key", ctypes.POINTER(ctypes.c_uint64)),
                ("slope", _f32p), ("offset", _f32p), ("row_length", ctypes.c_int64),
                ("rescale", ctypes.c_int32), ("select", ctypes.c_int32), ("select_kth", ctypes.c_int64),
                ("select_last", ctypes.c_int64), ("reduce", ctypes.c_int32), ("weight", _f32p), ("vote", _f32p),
                ("sign_count", ctypes.c_int32), ("normalize", ctypes.c_int32), ("weight_total", ctypes.c_float),
                ("add_base", ctypes.c_int32), ("scale", ctypes.c_float), ("out", ctypes.c_void_p)]


def cache_folder() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergeplug" / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(wanted))) + platform.machine()


def _library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_identity().encode())
    return cache_folder() / f"kernels-{digest.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # whole or absent, even with several processes compiling at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    c_i64, c_i32, c_vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    spec = ctypes.POINTER(InputsSpec)
    signatures = {
        "mergeplug_kernels_version": ([], ctypes.c_int),
        "mergeplug_uniform": ([ctypes.c_uint64, c_i64, c_i64, c_vp], None),
        "mergeplug_sample_keys": ([spec, c_i32, c_i64, c_i64, c_i64, c_i64, c_vp], ctypes.c_int),
        "mergeplug_band_scan": ([spec, c_i32, c_i64, c_i64, c_i64, ctypes.POINTER(BandSpec)], ctypes.c_int),
        "mergeplug_touch": ([c_vp, c_i64], c_i64),
        "mergeplug_find_key": ([spec, c_i32, c_i64, c_i64, c_i64, c_i64, c_i64], c_i64),
        "mergeplug_selected_energy": ([spec, c_i64, c_i64, c_i64, c_i64, c_vp], ctypes.c_int),
        "mergeplug_fused_merge": ([ctypes.POINTER(MergeSpec), c_i64, c_i64], ctypes.c_int),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result


def enabled() -> bool:
    """False when ``MERGEPLUG_NATIVE`` switches the kernels off (0, false, no, off)."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (switched off, or they cannot be built here: warned once, with why)."""
    if not enabled():
        return None
    with _lock:
        if "library" in _state:
            return _state["library"]  # type: ignore[return-value]
        lib = None
        try:
            path = _library_path()
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.mergeplug_kernels_version() != KERNELS_VERSION:
                raise OSError("the cached kernels are of another version")
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            warnings.warn(f"mergeplug: the fused CPU merge kernels are not available ({e}); merging with torch "
                          f"operations instead, slower (set {SWITCH_ENV}=0 to silence this)", stacklevel=2)
            lib = None
        _state["library"] = lib
        return lib


def threads() -> int:
    """How many threads the kernels use: torch's intra-op thread count, or, inside :func:`lending_threads`, the
    count torch had when it began.

    Inside :func:`lending_threads` the first call also sets torch to one thread. After each of its parallel
    operations, torch's idle OpenMP threads spin for a while before they sleep; spinning beside the kernels'
    own threads they took cores from them (a 370M-parameter DELLA merge on 2 cores: 3.7 s, 3.2 s without the
    spinning). torch's remaining work in a fused merge (casting the result) is small enough for one thread.
    """
    import torch

    lent = _state.get("lent_threads")
    if lent:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        return lent  # type: ignore[return-value]
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def lending_threads():
    """While a merge runs: if the kernels are used, torch's threads are theirs (see :func:`threads`); torch's
    thread count is restored at the end. A merge that never calls the kernels keeps torch's threads.

    torch's thread count is the process's, so the lending is too: nested or overlapping (merges in several
    threads of one process) contexts share it, the first to begin records torch's count and the last to end
    restores it."""
    import torch

    with _lending_lock:
        if not _state.get("lending"):
            _state["lent_threads"] = torch.get_num_threads()
        _state["lending"] = int(_state.get("lending") or 0) + 1
    try:
        yield
    finally:
        with _lending_lock:
            _state["lending"] = int(_state["lending"]) - 1  # type: ignore[arg-type]
            if not _state["lending"]:
                before = _state.pop("lent_threads")
                if torch.get_num_threads() != before:
                    torch.set_num_threads(before)  # type: ignore[arg-type]


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool per process and thread count: a forked child (whose copy of the pool has no threads) makes
    its own."""
    key = (os.getpid(), threads)
    if _state.get("pool_key") != key:
        _state["pool"] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergeplug-native")
        _state["pool_key"] = key
    return _state["pool"]  # type: ignore[return-value]


def split(start: int, stop: int, threads: int, grain: int = 1 << 16) -> list[tuple[int, int]]:
    """[start, stop) as at most ``threads`` contiguous ranges of at least ``grain`` positions each."""
    size = stop - start
    parts = max(1, min(threads, size // grain))
    bounds = [start + size * p // parts for p in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def parallel(call, start: int, stop: int, threads: int, grain: int = 1 << 16) -> list:
    """``call(lo, hi)`` over the ranges of :func:`split`, on as many threads; the results in range order."""
    ranges = split(start, stop, threads, grain)
    if len(ranges) == 1:
        return [call(start, stop)]
    futures = [_executor(threads).submit(call, lo, hi) for lo, hi in ranges]
    return [f.result() for f in futures]
