"""``kvserve estimate --plot FILE.png``: the two pictures people ask for, drawn from the same formulas as the table.

Left: how many sequences fit in the KV cache at once, against their length, for each
hardware. Right: the decode roofline, one step's floor against the batch size, with
its two floors (weights + KV read at the memory bandwidth; 2·P + attention FLOPs per
sequence at peak compute) and the knee where compute takes over; past the dotted line
the batch no longer fits the KV cache. Where KV reads grow faster than compute (long
contexts), there is no knee: decode stays memory-bound at every batch. It lives with
the benchmarks because matplotlib comes with their ``bench`` extra.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402

from kvserve.estimate.hardware import Hardware
from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.roofline import EstimateParams, estimate


def context_lengths(longest: int, first: int = 256) -> list[int]:
    """Powers of two from `first` up to `longest`, and `longest` itself."""
    lengths = [first << i for i in range(max(0, int(math.log2(max(longest, first) / first))) + 1)]
    return sorted({*(n for n in lengths if n < longest), longest})


def batch_sizes(largest: int = 4096) -> list[int]:
    """About 12 batch sizes per decade, from 1 to `largest`."""
    steps = int(12 * math.log10(largest)) + 1
    return sorted({round(largest ** (i / (steps - 1))) for i in range(steps)})


def plot_estimates(shape: ModelShape, hardware: list[Hardware], params: EstimateParams, path: str | Path) -> None:
    """Draw both panels for `shape` on each of `hardware` (as `params` deploys it) into the PNG at `path`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = context_lengths(shape.max_position_embeddings)
    devices = f"{params.num_devices} × " if params.num_devices > 1 else ""
    for i, hw in enumerate(hardware):
        color = colors[i % len(colors)]
        points = [(n, estimate(shape, hw, replace(params, input_len=n, output_len=0)).max_concurrent_sequences)
                  for n in lengths]
        points = [(n, c) for n, c in points if c > 0]
        if points:
            left.plot(*zip(*points), marker="o", markersize=3, color=color, label=f"{devices}{hw.name}")
        _roofline(right, shape, hw, params, color, f"{devices}{hw.name}", label_offset=-12 - 10 * (i % 3))
    left.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="sequences in the KV cache at once",
             title=f"max concurrency ({params.memory_fraction:g} of memory, weights first)")
    left.axhline(1, color="gray", linewidth=0.5)
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    context = params.input_len + params.output_len / 2
    right.set(xscale="log", yscale="log", xlabel="batch (sequences decoded together)", ylabel="decode step floor (ms)",
              title=f"decode roofline at a mean context of {context:,.0f} tokens")
    right.set_ylim(bottom=min(line.get_ydata().min() for line in right.get_lines() if line.get_linewidth() == 2) / 3)
    right.grid(True, which="both", alpha=0.3)
    styles = [Line2D([], [], color="black", linewidth=2, label="step floor"),
              Line2D([], [], color="black", linestyle="--", linewidth=1, label="memory: weights + KV reads"),
              Line2D([], [], color="black", linestyle="-.", linewidth=1, label="compute: 2·P + attention"),
              Line2D([], [], color="black", marker="o", linestyle="", label="knee: batch where compute takes over"),
              Line2D([], [], color="black", linestyle=(0, (1, 3)), linewidth=1, label="the KV cache is full")]
    right.legend(handles=[*right.get_legend_handles_labels()[0], *styles], fontsize=7, ncol=2)
    first = estimate(shape, hardware[0], params)
    fig.suptitle(f"{shape.name} ({first.num_params / 1e9:.2f}B parameters, {first.weights_dtype} weights, "
                 f"{first.kv_dtype} KV cache) — kvserve estimate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roofline(ax: Any, shape: ModelShape, hw: Hardware, params: EstimateParams, color: str, label: str,
              label_offset: int) -> None:
    """Step floor (solid), memory floor (dashed), compute floor (dash-dot), the knee (a dot) and where the
    batch stops fitting the KV cache (a dotted vertical line) for one hardware."""
    batches = batch_sizes()
    floors = [estimate(shape, hw, replace(params, batch=b)).decode for b in batches]
    ms = 1e3
    ax.plot(batches, [f.seconds * ms for f in floors], color=color, linewidth=2, label=label)
    ax.plot(batches, [f.memory_s * ms for f in floors], color=color, linestyle="--", linewidth=1)
    ax.plot(batches, [f.compute_s * ms for f in floors], color=color, linestyle="-.", linewidth=1)
    base = estimate(shape, hw, params)
    knee = base.crossover_batch
    if math.isfinite(knee) and batches[0] <= knee <= batches[-1]:
        at_knee = estimate(shape, hw, replace(params, batch=max(1, round(knee)))).decode
        ax.plot([knee], [at_knee.memory_s * ms], marker="o", color=color, markersize=7)
        ax.annotate(f"{knee:,.0f}", (knee, at_knee.memory_s * ms), textcoords="offset points", xytext=(6, label_offset),
                    fontsize=8, color=color)
    if 1 <= base.max_concurrent_sequences <= batches[-1]:
        ax.axvline(base.max_concurrent_sequences, color=color, linestyle=(0, (1, 3)), linewidth=1)
