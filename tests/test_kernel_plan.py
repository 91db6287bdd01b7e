"""install_kernels decides every fast path once, and its KernelPlan says what it installed."""

from __future__ import annotations

import logging

import pytest
import torch

from kvserve import LLM, native
from kvserve.attention import cpu as cpu_attention
from kvserve.layers.attention import Attention
from kvserve.layers.linear import Linear
from kvserve.models import llama_cpu_layer
from kvserve.models.kernel_plan import KernelPlan
from kvserve.models.llama import LlamaDecoderLayer

pytestmark = pytest.mark.skipif(llama_cpu_layer.load() is None, reason="the C++ kernels could not be built here")


def _load(path, **kwargs) -> tuple[KernelPlan, torch.nn.Module]:
    model = LLM(str(path), dtype="float32", kv_cache_memory_bytes=8 << 20, **kwargs).llm_engine.executor.worker.model
    return model.kernel_plan, model


def test_the_plan_matches_the_modules_and_is_logged(tiny_model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="kvserve.models.loader"):
        plan, model = _load(tiny_model_dirs["mistral"])
    modules = list(model.modules())
    attentions = [m for m in modules if isinstance(m, Attention)]
    linears = [m for m in modules if isinstance(m, Linear)]
    layers = [m for m in modules if isinstance(m, LlamaDecoderLayer)]
    assert plan.attention_backend == "cpu" and all(isinstance(m.backend, cpu_attention.CpuBackend) for m in attentions)
    assert plan.attention_layers == len(attentions) == len(layers) > 0
    assert plan.linear_kernels == plan.linears == len(linears) and all(m.kernel is not None for m in linears)
    assert plan.linear_max_rows == 48  # fp32: MKL beyond
    assert plan.one_call_layers == plan.decoder_layers == len(layers) and plan.one_call_max_rows == 48
    assert plan.isa == native.compiled_isa(native.build("linear.cpp")) and plan.march == native.march()
    assert plan.dtype == torch.float32 and plan.device == "cpu"
    assert f"kernel plan: {plan.describe()}" in caplog.messages
    assert plan.describe() == (
        f"attention: cpu ({len(layers)} layers); linear: C++ kernel for up to 48 rows, torch above in "
        f"{len(linears)}/{len(linears)} layers; one call: {len(layers)}/{len(layers)} layers for steps of <= 48 tokens; "
        f"float32 on cpu; KV cache: float32; C++ kernels: {plan.isa} (-march={plan.march})"
    )


def test_the_plan_without_fast_paths(tiny_model_dirs):
    plan, _ = _load(tiny_model_dirs["mistral"], attention_backend="reference", linear_backend="torch")
    assert (plan.attention_backend, plan.linear_kernels, plan.one_call_layers, plan.isa) == ("reference", 0, 0, None)
    assert plan.describe_linear() == "torch" and plan.describe_one_call() == "none (modules)"
    assert plan.describe().endswith("no C++ kernels")
    plan, _ = _load(tiny_model_dirs["mistral"], linear_backend="torch")  # the one-call layer needs the linear kernel
    assert (plan.attention_backend, plan.one_call_layers) == ("cpu", 0) and plan.isa is not None
    plan, _ = _load(tiny_model_dirs["gpt2"])  # no Llama decoder layers
    assert plan.decoder_layers == 0 and plan.describe_one_call() == "none (modules)" and plan.linear_kernels > 0
