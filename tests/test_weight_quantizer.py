"""kvserve's own int8 / int4 weight quantization at load (layers/weight_quantizer.py).

The stored numbers are checked against the scheme (per-row symmetric int8; int4 groups with a
scale and an offset) through two independent readers of the blocks, gguf.quants and our C++
dequantizer; a tiny model quantized at load is proven against its dequantized twin (the same
weights as dense numbers): they differ only where the block kernels round the activations to
int8 blocks of 32 (relative error <= 1/254 per block; decode rows, and prefill chunks the one-call
layer takes). On these tiny random models that moves the prompt logprobs by 0.02-0.03 on average
(the int8 weights themselves move them by 0.03, int4 by 0.3), and the greedy tokens agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file, save_file

from kvserve import LLM, SamplingParams
from kvserve.layers import cpu_quant
from kvserve.layers.weight_quantizer import quantize_int4, quantize_int8
from oracle import random_prompts

pytestmark = pytest.mark.skipif(cpu_quant.load() is None, reason="the quantized-linear C++ kernel could not be built here")


def _weight(n: int = 37, k: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3] = 0.0  # an all-zero row: scale 0, no division by it
    w[5, :64] += 0.4  # an outlier group
    return w


def _read(packed, fmt: GGMLQuantizationType) -> torch.Tensor:
    ours = cpu_quant.dequantize(packed.blocks, packed.format, packed.in_features)
    theirs = quants.dequantize(packed.blocks.numpy(), fmt).reshape(packed.out_features, packed.in_features)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)).float())
    return ours


def test_int8_is_per_channel_symmetric() -> None:
    w = _weight()
    packed = quantize_int8(w)
    assert packed.format_name == "Q8_0" and packed.nbytes == w.shape[0] * w.shape[1] // 32 * 34
    back = _read(packed, GGMLQuantizationType.Q8_0)
    scale = (w.abs().amax(dim=1) / 127).half().float()
    q = back / torch.where(scale > 0, scale, 1)[:, None]
    assert torch.equal(q, q.round()) and q.abs().max() <= 127  # integers on one scale per row
    assert torch.all((w - back).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(back[3], torch.zeros_like(back[3]))


@pytest.mark.parametrize("group,k", [(32, 256), (64, 256), (128, 256), (128, 576), (64, 96)])
def test_int4_groups_have_a_scale_and_zero(group: int, k: int) -> None:
    w = _weight(k=k)
    packed = quantize_int4(w, group)
    assert packed.format_name == "Q4_1" and packed.nbytes == w.shape[0] * k // 32 * 20
    back = _read(packed, GGMLQuantizationType.Q4_1)
    for start in range(0, k, group):  # the last group is shorter where k is not a multiple of it
        part, restored = w[:, start:start + group], back[:, start:start + group]
        low, high = part.amin(dim=1, keepdim=True), part.amax(dim=1, keepdim=True)
        scale, offset = ((high - low) / 15).half().float(), low.half().float()
        q = (restored - offset) / torch.where(scale > 0, scale, 1)
        assert torch.allclose(q, q.round(), atol=1e-3) and q.round().min() >= 0 and q.round().max() <= 15
        # half a step, plus what the fp16 rounding of the offset and scale moved the top of the range
        bound = scale / 2 + (low - offset).abs() + 15 * (scale - (high - low) / 15).abs() + 1e-6
        assert torch.all((part - restored).abs() <= bound)
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128"):
        quantize_int4(w, 16)


def _dequantized_twin(source: Path, target: Path, method: str, group: int) -> Path:
    """`source` with its decoder linear weights replaced by their quantized-then-dequantized values."""
    target.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    for name, tensor in tensors.items():
        if (".layers." in name or ".h." in name) and name.endswith("weight") and tensor.dim() == 2:
            conv1d = ".h." in name  # GPT-2 stores its projections [in, out]
            weight = tensor.t() if conv1d else tensor
            packed = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group)
            weight = cpu_quant.dequantize(packed.blocks, packed.format, packed.in_features).to(tensor.dtype)
            tensors[name] = weight.t().contiguous() if conv1d else weight
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("method,group,model", [("int8", 32, "llama-gqa7-tied"), ("int4", 64, "llama-gqa7-tied"),
                                                ("int4", 128, "qwen2"), ("int8", 32, "gpt2")])
def test_quantized_model_equals_its_dequantized_twin(tiny_model_dirs, tmp_path, method, group, model) -> None:
    source = tiny_model_dirs[model]
    twin = _dequantized_twin(source, tmp_path / "twin", method, group)
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=8 << 20)
    quantized = LLM(str(source), quantization=method, quantization_group_size=group, **kwargs)
    plan = quantized.llm_engine.worker_info.kernel_plan
    assert plan.packed_linears == plan.linears - 1  # all but the LM head
    assert plan.packed_formats == (("Q8_0",) if method == "int8" else ("Q4_1",))
    dense = LLM(str(twin), quantization="none", **kwargs)

    prompts = random_prompts([5, 17, 40], seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=0, ignore_eos=True)
    ours = quantized.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    theirs = dense.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
    diff = torch.tensor([next(iter(x.values())).logprob - next(iter(y.values())).logprob
                         for a, b in zip(ours, theirs) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.2


def test_quantization_is_refused_where_it_cannot_run(tiny_llama) -> None:
    with pytest.raises(ValueError, match="quantization_group_size"):
        LLM(str(tiny_llama), quantization="int4", quantization_group_size=48)
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama), quantization="int3")
