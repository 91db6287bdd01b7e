"""The C++ kernels' AVX2 and portable paths, built on purpose on a CPU that would pick AVX-512.

Each kernel has an AVX-512 path, an AVX2 path and a plain C++ one; the machine a test runs on
compiles only the best it has (-march=native). Here the kernel tests run again in a fresh
process with KVSERVE_MARCH set (kvserve/native.py), so every path is checked against the same
references wherever the suite runs.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve import native
from kvserve.config import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_attention.py", "tests/test_kv_quant_attention.py", "tests/test_linear_kernel.py",
                "tests/test_pointwise_kernels.py",
                "tests/test_llama_cpu_layer.py", "tests/test_quant_kernels.py"]
LOADS = ("from kvserve import native; from kvserve.attention import cpu; "
         "from kvserve.layers import cpu_linear, cpu_pointwise, cpu_quant, token_bitmask; from kvserve.models import llama_cpu_layer; "
         "assert all(m.load() is not None for m in (cpu, cpu_linear, cpu_pointwise, cpu_quant, token_bitmask, llama_cpu_layer)); "
         "print(native.compiled_isa(llama_cpu_layer.load()))")

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None, reason="needs g++ on x86-64"),
    pytest.mark.skipif(native.kernels_disabled(), reason="KVSERVE_DISABLE_CPU_KERNEL is set"),
]


@pytest.mark.parametrize("march, isa", [("x86-64-v3", "avx2"), ("x86-64", "portable")], ids=["avx2", "portable"])
def test_kernels_built_for_an_older_cpu(march: str, isa: str, tmp_path: Path) -> None:
    if march == "x86-64-v3" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    env = {**os.environ, "KVSERVE_MARCH": march, "KVSERVE_CACHE_DIR": str(tmp_path)}
    built = subprocess.run([sys.executable, "-c", LOADS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]  # every kernel builds and loads (the tests would skip otherwise)
    assert built.stdout.strip() == isa  # what the kernel plan reports
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]


def test_kernels_build_for_this_cpu() -> None:
    """With g++ present every kernel must build (-march=native): the kernel tests skip, rather than
    fail, where a library is missing, so a broken build would otherwise pass unnoticed."""
    built = subprocess.run([sys.executable, "-c", LOADS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
