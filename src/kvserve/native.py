"""Build and load kvserve's C++ kernels (src/kvserve/csrc/*.cpp) as ctypes libraries.

Each kernel is one C++ file with a plain C ABI, compiled by g++ for this CPU
(-march=native, OpenMP) the first time it is needed: a few seconds, no torch
headers, no pybind11, no ninja. The library is cached under ~/.cache/kvserve/
(or $KVSERVE_CACHE_DIR), keyed by the source, every other csrc/ file it may include, the flags and this CPU's feature
flags, so a cache shared between machines never hands one CPU code built for
another. OpenMP resolves to the libgomp torch has already loaded, so kernels and
torch ops share one thread pool.

Where a kernel cannot be built (no g++), `build` returns None after a logged
warning and the caller falls back to torch. KVSERVE_DISABLE_CPU_KERNEL=1 turns
all of them off (for comparisons and for debugging). KVSERVE_MARCH (default
"native") is passed as -march: x86-64-v3 builds the AVX2 paths and x86-64 the
portable ones on a CPU that has more, which is how the tests cover them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from kvserve import startup
from kvserve.config import cpu_flags

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"


def march() -> str:
    """The -march the kernels are built for: KVSERVE_MARCH, or native."""
    return os.environ.get("KVSERVE_MARCH", "native")


def flags() -> list[str]:
    """g++ flags for every kernel; KVSERVE_MARCH overrides -march=native."""
    return ["-O3", f"-march={march()}", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def compiled_isa(lib: ctypes.CDLL) -> str:
    """The widest instruction set `lib`'s kernels were compiled for: avx512_bf16, avx512, avx2 or portable."""
    fn = lib.kvserve_isa
    fn.argtypes, fn.restype = [], ctypes.c_char_p
    return fn().decode()


def cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve")
    return Path(root)


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """Machine architecture plus the CPU's feature flags (what -march=native compiles for)."""
    return platform.machine() + " " + " ".join(sorted(cpu_flags()))


def kernels_disabled() -> bool:
    return os.environ.get("KVSERVE_DISABLE_CPU_KERNEL", "") not in ("", "0")


def load(name: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The library of csrc/`name` with each entry point's argument types set (all return void),
    or None (with a logged warning) when it cannot be built."""
    lib = build(name)
    if lib is None:
        return None
    for entry, argtypes in signatures.items():
        fn = getattr(lib, entry)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


@lru_cache(maxsize=None)
def build(name: str) -> ctypes.CDLL | None:
    """The compiled library for csrc/`name`, or None (with a logged warning) when it cannot be built."""
    if kernels_disabled():
        return None
    source = CSRC / name
    # every file of csrc/: headers, and kernel sources that another source includes (llama_layer.cpp)
    text = source.read_bytes() + b"".join(f.read_bytes() for f in sorted(CSRC.iterdir()) if f.suffix in (".h", ".cpp"))
    digest = hashlib.sha256(text + " ".join(flags()).encode() + cpu_signature().encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{digest}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with startup.phase(f"building the C++ kernel {source.name} for this CPU", first_run_only=True), \
                    tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built = Path(tmp) / library.name
                subprocess.run(["g++", *flags(), "-o", str(built), str(source)], check=True, capture_output=True, text=True)
                os.replace(built, library)  # atomic: concurrent builders never load a half-written file
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("the C++ kernel %s could not be built (%s); using torch instead", source.name, detail.strip()[:500])
        return None
