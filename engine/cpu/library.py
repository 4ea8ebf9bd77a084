"""The CPU kernels' shared library: built with gcc on first use, loaded once with ctypes.

Why ctypes and not a torch C++ extension: torch's headers take minutes to compile on the 2-core
machines; the C files build in about a second and need only gcc.

The library lands in `$KVLAB_CACHE_DIR/kernels/` under a hash of the sources, the compiler
command and the CPU (`-march=native` code must not run on a machine with fewer instructions),
so a second process loads it without compiling. `load()` returns None whenever the library
cannot be had (no gcc, a failed build, `KVLAB_DISABLE_CPU_KERNEL=1`): every caller then keeps
its PyTorch path. A failure is logged once per process, never raised.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from engine.cache_files import atomic_write, cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("*.c"))
HEADERS = sorted(HERE.glob("*.h"))
# no -ffast-math: it would let gcc reassociate more than the results may drift (~1e-5);
# `omp simd reduction` in the sources (-fopenmp-simd: the pragmas only, no OpenMP runtime)
# allows the reductions that do need vectorising. Threads are the pool's own (pthreads).
COMPILER = ["gcc"]
CFLAGS = ["-O3", "-march=native", "-pthread", "-fopenmp-simd", "-fno-math-errno",
          "-ffp-contract=fast", "-std=gnu11", "-shared", "-fPIC"]
DISABLE_ENV = "KVLAB_DISABLE_CPU_KERNEL"


def _cpu_signature() -> str:
    """The CPU's feature flags, which decide what `-march=native` emits."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where the library for these sources, compiler command and CPU is (or will be) cached."""
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS),
                 " ".join(COMPILER + CFLAGS).encode(), platform.machine().encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "kernels" / f"kvlab_cpu-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compile to a temporary name and rename, so a concurrent process never loads half a
    file. Raises on failure (the caller logs and remembers)."""
    if shutil.which(COMPILER[0]) is None:
        raise FileNotFoundError(f"compiler {COMPILER[0]!r} not found")

    def compile_to(tmp: str) -> None:
        done = subprocess.run([*COMPILER, *CFLAGS, f"-I{HERE}", "-o", tmp,
                               *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(COMPILER)} failed ({done.returncode}): "
                               f"{done.stderr.strip()[:2000]}")

    atomic_write(target, compile_to)


class _Library:
    """Loaded once under a lock (the engine may serve from several threads), then read without
    locking; stays None after a failure or when disabled, so a failed build is tried and
    logged once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tried = False
        self.lib: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL | None:
        if not self.tried:
            with self._lock:
                if not self.tried:
                    self.lib = self._load()
                    self.tried = True
        return self.lib

    @staticmethod
    def _load() -> ctypes.CDLL | None:
        if os.environ.get(DISABLE_ENV) == "1":
            log.info("CPU kernels disabled by %s=1", DISABLE_ENV)
            return None
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            return ctypes.CDLL(str(path))
        except Exception as err:  # noqa: BLE001 - any failure means "use the PyTorch path"
            log.warning("CPU kernels unavailable, using the PyTorch path: %s", err)
            return None


_LIBRARY = _Library()


def load() -> ctypes.CDLL | None:
    """The process's library (building it now if needed), or None: use PyTorch instead."""
    return _LIBRARY.get()


def reset() -> None:
    """Forget the loaded (or failed) library; the next call loads again. For tests."""
    global _LIBRARY
    _LIBRARY = _Library()


class Entry:
    """One function of the library with its C signature, bound on first use and again after
    `reset()`; `get()` is None while the library is unavailable, or when `usable` (called once
    with the bound function) says this build cannot serve it."""

    def __init__(self, name: str, argtypes: list, restype: type | None = ctypes.c_int,
                 usable: Callable[[ctypes._CFuncPtr], bool] | None = None) -> None:  # type: ignore[name-defined]
        self.name, self.argtypes, self.restype, self.usable = name, argtypes, restype, usable
        self._lib: ctypes.CDLL | None = None
        self._fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]

    def get(self) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
        lib = load()  # cheap after the first call: this runs for every op of a decode step
        if lib is not self._lib:
            self._lib, self._fn = lib, None
            if lib is not None:
                fn = getattr(lib, self.name)
                fn.argtypes, fn.restype = self.argtypes, self.restype
                self._fn = fn if self.usable is None or self.usable(fn) else None
        return self._fn
