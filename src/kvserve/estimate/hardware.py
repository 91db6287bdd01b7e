"""Accelerator datasheet numbers, and a measurement of this machine.

Peak FLOP/s are dense (no 2:4 sparsity) tensor-core rates from the vendors'
datasheets (where a sheet quotes only "with sparsity", half of it); ``fp32`` is
plain IEEE FP32 (not TF32), which is what PyTorch uses for fp32 matmuls by
default. ``interconnect_bandwidth`` is the per-direction device-to-device
bandwidth that a ring all-reduce can use (NVLink, Infinity Fabric, or PCIe 4.0
x16 for cards without them). Memory sizes are the marketed "GB", which for these
cards are GiB (an A100-40GB has 40 × 2³⁰ bytes). The sheets, per entry:

- A100 40/80GB SXM: NVIDIA A100 Tensor Core GPU datasheet; H100 SXM: NVIDIA H100 datasheet;
  H200 SXM: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity,
  NVLink 900 GB/s); B200: NVIDIA HGX B200 datasheet, per GPU (1,440 GB and 64 TB/s for 8 GPUs,
  FP16/BF16 36 PFLOPS and FP8/INT8 72 with sparsity for 8; NVLink 5 1.8 TB/s) and GB200 NVL72's
  FP32 (5,760 TFLOPS for 72 GPUs); V100 SXM2, L4: their NVIDIA datasheets; L40S: NVIDIA L40S
  datasheet (48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS); RTX 4090: the Ada architecture whitepaper.
- A10G (AWS g5): AWS publishes no tensor rates; these are NVIDIA's A10 datasheet (the same GA102
  chip and memory: 24 GB GDDR6, 600 GB/s, FP32 31.2, BF16/FP16 125, INT8 250 TOPS).
- MI300X: AMD Instinct MI300X data sheet (192 GB HBM3, 5.3 TB/s, FP16/BF16 1,307.4 TFLOPS,
  INT8 2,614.9 TOPS, FP32 matrix 163.4 TFLOPS; Infinity Fabric 896 GB/s aggregate over 7 links,
  half of it per direction).
- xeon-8480 (a CPU, one socket): Intel Xeon Platinum 8480+ (56 cores, 2.0 GHz base, 8 channels of
  DDR5-4800 = 307.2 GB/s); FLOP/s from Intel's per-core, per-cycle rates (AMX: 1,024 BF16 and 2,048
  INT8 operations, AVX-512: 64 FP32) at the base clock; memory as installed, here 8 × 64 GiB.

``local`` is measured, not looked up: :func:`measure_local_hardware` times a
large reduction (memory read bandwidth) and matmuls (FLOP/s) with torch on all
threads, once, and caches the numbers in ``~/.cache/kvserve/hardware.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable

from kvserve.config import cpu_supports_bf16

GiB = 2**30
TB = 1e12


@dataclass(frozen=True)
class Hardware:
    """One device of a kind; a deployment uses ``num_devices`` of them.

    Bandwidths are bytes/s, ``peak_flops`` maps a dtype name to FLOP/s. For a
    measured machine, ``measured_at`` and ``fingerprint`` (CPU, threads, torch,
    host) say when and where the numbers were taken.
    """

    name: str
    description: str
    memory_bytes: int
    memory_bandwidth: float
    peak_flops: dict[str, float]
    interconnect_bandwidth: float | None
    measured_at: str | None = None
    notes: str = ""
    fingerprint: dict[str, str] = field(default_factory=dict)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; a ValueError names the dtypes this device has."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ValueError(
                f"dtype: {dtype!r} has no peak FLOP/s on hardware {self.name!r}; "
                f"allowed values are {', '.join(self.peak_flops)}"
            ) from None

    def to_dict(self) -> dict:
        return asdict(self)


def _gpu(name: str, description: str, memory_gib: int, bandwidth_tb: float,
         fp32: float, bf16: float | None, fp16: float, int8: float,
         interconnect_gb: float) -> Hardware:
    rates = (("fp32", fp32), ("bf16", bf16), ("fp16", fp16), ("int8", int8))
    flops = {dtype: tflops * TB for dtype, tflops in rates if tflops is not None}
    return Hardware(name, description, memory_gib * GiB, bandwidth_tb * TB, flops,
                    interconnect_gb * 1e9)


HARDWARE: dict[str, Hardware] = {
    h.name: h for h in (
        _gpu("a100-40gb", "NVIDIA A100 40GB SXM4 (HBM2, NVLink 3)", 40, 1.555,
             19.5, 312, 312, 624, 300),
        _gpu("a100-80gb", "NVIDIA A100 80GB SXM4 (HBM2e, NVLink 3)", 80, 2.039,
             19.5, 312, 312, 624, 300),
        _gpu("h100-80gb", "NVIDIA H100 80GB SXM5 (HBM3, NVLink 4)", 80, 3.35,
             67, 989.4, 989.4, 1978.9, 450),
        # Volta has no bf16, and its tensor cores no int8: int8 is the DP4A rate.
        _gpu("v100-32gb", "NVIDIA V100 32GB SXM2 (HBM2, NVLink 2)", 32, 0.9,
             15.7, None, 125, 62.8, 150),
        _gpu("l4", "NVIDIA L4 24GB (GDDR6, PCIe 4.0 x16)", 24, 0.3,
             30.3, 121, 121, 242, 32),
        # GeForce: fp16/bf16 with fp32 accumulation run at half the fp16-accumulate rate.
        _gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24GB (GDDR6X, PCIe 4.0 x16)", 24, 1.008,
             82.6, 165.2, 165.2, 660.6, 32),
        _gpu("h200", "NVIDIA H200 141GB SXM (HBM3e, NVLink 4)", 141, 4.8,
             67, 989.5, 989.5, 1979, 450),
        _gpu("b200", "NVIDIA B200 180GB (HGX B200: HBM3e, NVLink 5)", 180, 8.0,
             80, 2250, 2250, 4500, 900),
        _gpu("l40s", "NVIDIA L40S 48GB (GDDR6, PCIe 4.0 x16)", 48, 0.864,
             91.6, 362.05, 362.05, 733, 32),
        _gpu("a10g", "NVIDIA A10G 24GB (AWS g5; GDDR6, PCIe 4.0 x16; A10 datasheet rates)", 24, 0.6,
             31.2, 125, 125, 250, 32),
        _gpu("mi300x", "AMD Instinct MI300X 192GB (HBM3, Infinity Fabric)", 192, 5.3,
             163.4, 1307.4, 1307.4, 2614.9, 448),
        Hardware("xeon-8480", "Intel Xeon Platinum 8480+ (one socket: 56 cores, AMX, 8 x DDR5-4800, 512 GiB)",
                 512 * GiB, 307.2e9, {"fp32": 56 * 2.0e9 * 64, "bf16": 56 * 2.0e9 * 1024, "int8": 56 * 2.0e9 * 2048},
                 None),
    )
}
# Names people write that the table spells out
_HARDWARE_ALIASES = {"h100": "h100-80gb", "v100": "v100-32gb", "4090": "rtx-4090", "rtx4090": "rtx-4090"}


def _canonical(name: str) -> str:
    """Case, separators and a vendor's name do not matter: ``NVIDIA H200`` is ``h200``, ``MI300X`` is ``mi300x``."""
    key = re.sub(r"[-_\s]", "", name.strip().lower())
    return re.sub(r"^(nvidia|amd|intel)", "", key)


_BY_CANONICAL = {**{_canonical(name): name for name in HARDWARE},
                 **{_canonical(alias): name for alias, name in _HARDWARE_ALIASES.items()}}


def hardware_names() -> list[str]:
    return [*HARDWARE, "local"]


def get_hardware(name: str) -> Hardware:
    """A table entry, or ``local`` (measured once, then read from the cache)."""
    if name == "local":
        return measure_local_hardware()
    found = _BY_CANONICAL.get(_canonical(name))
    if found is None:
        raise ValueError(
            f"hardware: unknown name {name!r}; allowed values are {', '.join(hardware_names())}"
        )
    return HARDWARE[found]


def default_cache_path() -> Path:
    """KVSERVE_HARDWARE_CACHE if set (the test suite points it at a file of its own, so that floors measured
    under its load never reach the user's cache), else ``$XDG_CACHE_HOME/kvserve/hardware.json``."""
    explicit = os.environ.get("KVSERVE_HARDWARE_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kvserve" / "hardware.json"


def measure_local_hardware(force: bool = False, cache_path: str | Path | None = None) -> Hardware:
    """This machine's RAM, read bandwidth and fp32/bf16 matmul FLOP/s.

    The numbers are measured once (a couple of seconds) and cached as JSON; the
    cache is reused while the CPU model and torch thread count are unchanged.
    Pass ``force=True`` to measure again. Benchmarks report their results as a
    fraction of these numbers.
    """
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    fingerprint = _machine_fingerprint()
    if not force:
        cached = _read_cache(path, fingerprint)
        if cached is not None:
            return cached
    hardware = _measure(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(hardware.to_dict(), indent=2))
    tmp.replace(path)
    return hardware


# Bumped when the measurement changes, so that older cached numbers are measured again.
_METHOD = "4: matmuls timed as F.linear (x @ w.T, the models' layout); bf16 >= fp32"


def _machine_fingerprint() -> dict[str, str]:
    import torch

    return {
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "host": platform.node(),
        "method": _METHOD,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int:
    """MemTotal from /proc/meminfo (falls back to sysconf where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_cache(path: Path, fingerprint: dict[str, str]) -> Hardware | None:
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint:
            return None
        return Hardware(**data)
    except (OSError, ValueError, TypeError):
        return None


def _measure(fingerprint: dict[str, str]) -> Hardware:
    import torch
    from tqdm import tqdm

    steps: list[tuple[str, Callable[[], float]]] = [
        ("read bandwidth", _read_bandwidth),
        ("fp32 matmul", lambda: _matmul_flops(torch.float32)),
        ("bf16 matmul", lambda: _matmul_flops(torch.bfloat16)),
    ]
    results: dict[str, float] = {}
    with tqdm(steps, desc="measuring local hardware", unit="step", disable=None) as bar:
        for label, step in bar:
            bar.set_postfix_str(label)
            results[label] = step()
    bf16 = results["bf16 matmul"]
    notes = ("measured with torch: best of repeated tensor.sum() over 256 MiB, "
             "and square matmuls sized to take >= 20 ms")
    if results["fp32 matmul"] > bf16:
        # bf16 data can always be widened to fp32 and multiplied at the fp32 rate (kvserve's CPU kernels
        # do): that is the floor where torch's bf16 matmul is slower, emulated without bf16 instructions
        # or on vdpbf16ps, which some CPUs retire at half the FMA rate.
        notes += (f"; bf16 peak = the fp32 rate (bf16 widened to fp32); torch's bf16 matmul ran at "
                  f"{bf16 / 1e9:.1f} GFLOP/s{'' if cpu_supports_bf16() else ' (emulated: no native bf16 here)'}")
        bf16 = results["fp32 matmul"]
    return Hardware(
        name="local",
        description=f"this machine: {fingerprint['cpu']}, {fingerprint['threads']} torch threads",
        memory_bytes=total_ram_bytes(),
        memory_bandwidth=results["read bandwidth"],
        peak_flops={"fp32": results["fp32 matmul"], "bf16": bf16},
        interconnect_bandwidth=None,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
        fingerprint=fingerprint,
    )


def _best_rate(run: Callable[[], None], work: float, budget_s: float) -> float:
    """Best ``work / seconds`` over repeated runs within ``budget_s`` (after one warm-up)."""
    run()
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    while True:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            return work / best


def _read_bandwidth(num_bytes: int = 256 * 2**20, budget_s: float = 0.4) -> float:
    """Bytes/s of a full-tensor sum: far larger than any cache, so it reads from RAM."""
    import torch

    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    return _best_rate(lambda: data.sum(), num_bytes, budget_s)


def _matmul_flops(dtype, budget_s: float = 0.4, max_n: int = 2048) -> float:
    """FLOP/s of an ``n×n @ (n×n)ᵀ`` matmul, growing ``n`` until one takes >= 20 ms.

    Timed as ``F.linear``, the layout the models use: with a row-major right-hand
    side torch's CPU bf16 path is ~15x slower. Growing from small sizes keeps the
    measurement short where a dtype is slow (bf16 without native CPU support).
    """
    import torch
    import torch.nn.functional as F

    n = 64
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        F.linear(a, b)
        if time.perf_counter() - start >= 0.02 or n >= max_n:
            break
        n *= 2
    return _best_rate(lambda: F.linear(a, b), 2.0 * n**3, budget_s)
