"""kvserve's own weight quantization at load (`--quantization int8|int4`), for any checkpoint.

int8: per-output-channel symmetric: each row's scale is max|w| / 127 and q = round(w / scale)
in [-127, 127]. int4: groups of 32, 64 or 128 weights along the input with a scale and a zero:
w ~ s q + m, q in [0, 15], s = (max - min) / 15, m = min (the zero point kept as a float
offset, m = -s z). Scales and offsets are fp16; each is rounded to fp16 before the weights are
quantized with it, so the stored numbers are exactly the scheme's.

The result is laid out in the GGUF blocks the CPU kernels already read (layers/cpu_quant.py):
int8 rows as Q8_0 blocks (the row's scale repeated in each block of 32), int4 groups as Q4_1
blocks (a group of 64 or 128 repeats its scale and offset over its 2 or 4 blocks). The bytes
per weight are the kernels' (8.5 and 5 bits) whatever the group size; the group size sets the
accuracy, as it does for AWQ/GPTQ checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from kvserve.layers.linear import Linear
from kvserve.layers.packed_weight import PackedWeight

Q8_0, Q4_1 = int(GGMLQuantizationType.Q8_0), int(GGMLQuantizationType.Q4_1)
INT4_GROUP_SIZES = (32, 64, 128)
_BLOCK = 32


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8: each value as little-endian fp16 bytes."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def quantize_int8(weight: torch.Tensor) -> PackedWeight:
    """Per-output-channel symmetric int8 of a [N, K] weight (K a multiple of 32), as Q8_0 blocks."""
    n, k = weight.shape
    if k % _BLOCK:
        raise ValueError(f"int8 quantization needs the input size to be a multiple of {_BLOCK}, got {k}")
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(torch.float16).float()  # [N], exactly the stored fp16
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(w * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
    blocks = torch.cat([
        _fp16_bytes(scale)[:, None, :].expand(n, k // _BLOCK, 2),
        q.view(torch.uint8).reshape(n, k // _BLOCK, _BLOCK),
    ], dim=2)
    return PackedWeight(Q8_0, blocks.reshape(n, -1).contiguous(), k)


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> PackedWeight:
    """Asymmetric int4 in groups of `group_size` along the input of a [N, K] weight (K a multiple of 32),
    as Q4_1 blocks. Where K is not a multiple of the group (576 = 4 x 128 + 64), the last group is shorter."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    n, k = weight.shape
    if k % _BLOCK:
        raise ValueError(f"int4 quantization needs the input size to be a multiple of {_BLOCK}, got {k}")
    groups = -(-k // group_size)
    padding = groups * group_size - k  # a shorter last group: padded with values that change neither extreme
    w = weight.float()
    low = F.pad(w, (0, padding), value=float("inf")).reshape(n, groups, group_size).amin(dim=2)
    high = F.pad(w, (0, padding), value=float("-inf")).reshape(n, groups, group_size).amax(dim=2)
    scale = ((high - low) / 15).to(torch.float16).float()
    offset = low.to(torch.float16).float()
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    per_weight = torch.arange(k) // group_size  # each weight's group
    q = torch.round((w - offset[:, per_weight]) * inverse[:, per_weight]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k // _BLOCK, _BLOCK)
    nibbles = q[..., : _BLOCK // 2] | (q[..., _BLOCK // 2:] << 4)  # GGML: weight j low, weight j + 16 high
    per_block = per_weight[::_BLOCK]  # each block's group
    blocks = torch.cat([_fp16_bytes(scale)[:, per_block], _fp16_bytes(offset)[:, per_block], nibbles], dim=2)
    return PackedWeight(Q4_1, blocks.reshape(n, -1).contiguous(), k)


def quantize_linears(model: nn.Module, method: str, group_size: int = 32) -> tuple[int, int, int, int]:
    """Quantize every Linear of the decoder layers in place (`method` int8 or int4); the LM head and the
    embedding keep the model's dtype, as AWQ/GPTQ checkpoints keep them. Linears whose weight already
    stays in GGUF blocks, or whose input size is not a multiple of 32, are left as they are.
    Returns (layers quantized, their dense bytes, their packed bytes, layers left dense)."""
    if method not in ("int8", "int4"):
        raise ValueError(f"quantization method must be int8 or int4, got {method!r}")
    count = dense_bytes = packed_bytes = skipped = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name.endswith("lm_head") or module.quantized is not None:
            continue
        if module.in_features % _BLOCK:
            skipped += 1
            continue
        weight = module.weight.data
        packed = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group_size)
        dense_bytes += weight.numel() * weight.element_size()
        module.load_packed(packed)
        packed_bytes += packed.nbytes
        count += 1
    return count, dense_bytes, packed_bytes, skipped
