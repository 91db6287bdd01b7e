"""Find a model, read its config, build it and fill it with weights.

Sources: a Hugging Face directory (`*.safetensors`, sharded with
`model.safetensors.index.json`, or `pytorch_model.bin`), a hub id (through
`huggingface_hub`'s cache), a `.gguf` file, or `load_format="dummy"` (random
weights of the real shapes, for benchmarks). Errors name the file or tensor.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kvserve import huge_pages, startup
from kvserve.distributed.parallel_state import SINGLE, ParallelContext
from kvserve.layers import cpu_quant
from kvserve.layers.embedding import Embedding
from kvserve.layers.linear import Linear, default_weight_loader
from kvserve.layers.missing_layer import MissingLayer
from kvserve.layers.packed_weight import PackedWeight
from kvserve.layers.weight_quantizer import quantize_linears
from kvserve.attention.attention_sinks import StreamingWindow
from kvserve.models.kernel_plan import install_kernels
from kvserve.models.registry import model_class_for

logger = logging.getLogger(__name__)

WeightIterator = Iterator[tuple[str, str, torch.Tensor]]  # (source file, tensor name, tensor)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def is_gguf_file(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def resolve_model_path(model: str | None, revision: str | None = None) -> str:
    """A local directory or .gguf file for `model` (None means the built-in default model)."""
    if model is None:
        from kvserve.models.default_model import default_model_path

        return default_model_path()
    if os.path.exists(model):
        return model
    if model.count("/") > 1 or model.startswith((".", "/")):
        raise ValueError(f"model {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
        try:
            return snapshot_download(model, revision=revision, local_files_only=True, allow_patterns=patterns)
        except Exception:
            return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise ValueError(
            f"model {model!r} is not a local path and not in the local Hugging Face cache, "
            f"and downloading it failed ({type(exc).__name__}: {exc}). Offline, download it first or pass a directory."
        ) from exc


def load_hf_config(path: str) -> Any:
    if is_gguf_file(path):
        from kvserve.models.gguf_loader import load_gguf_config

        return load_gguf_config(path)
    from transformers import AutoConfig

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    refuse_remote_code(config_file)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from exc


def refuse_remote_code(config_file: str) -> None:
    """Refuse a model whose config only its own Python code can read, as transformers decides it: `auto_map`
    names an AutoConfig class and `model_type` is not one transformers knows. kvserve runs only its built-in
    architectures, so `trust_remote_code` cannot help; a known model_type beside an auto_map loads as usual."""
    from transformers import CONFIG_MAPPING

    with open(config_file) as f:
        config = json.load(f)
    remote = config.get("auto_map", {}).get("AutoConfig") if isinstance(config.get("auto_map"), dict) else None
    if remote and config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(
            f"{config_file} needs the model's own code (auto_map names {remote}, and model_type "
            f"{config.get('model_type')!r} is not one transformers knows); kvserve runs only its built-in "
            "architectures and never runs a model's code, so trust_remote_code cannot help"
        )


def load_model(
    path: str,
    hf_config: Any,
    dtype: torch.dtype,
    device: str,
    load_format: str,
    max_positions: int,
    attention_backend: str = "auto",
    linear_backend: str = "auto",
    quantization: str = "auto",
    quantization_group_size: int = 32,
    kv_cache_dtype: str = "auto",
    parallel: ParallelContext = SINGLE,
    streaming: StreamingWindow | None = None,
) -> nn.Module:
    """The model with its weights and fast paths; what `install_kernels` chose is logged and kept as
    `model.kernel_plan`. `quantization="auto"` keeps a GGUF's weights in the block formats the CPU
    kernels read (`cpu_quant.SUPPORTED_FORMATS`); "none" dequantizes every tensor to `dtype`;
    "int8" and "int4" load the weights in `dtype` (a GGUF dequantized) and quantize the decoder's
    linear layers (layers/weight_quantizer.py). `kv_cache_dtype` is the format of the KV cache the
    model will be given (attention/kv_quant.py). `parallel` says which shard to build and load: this
    rank's heads and MLP columns, and its pipeline stage's layers. `streaming`: attention sinks and a
    window on every layer (attention/attention_sinks.py), set before the kernels are chosen."""
    cls = model_class_for(hf_config)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(hf_config, max_positions, parallel)
        finally:
            torch.set_default_dtype(old)
    model.eval()
    if load_format == "dummy":
        _init_dummy_weights(model)
    else:
        formats = packed_formats(path, device, quantization, parallel.tp_size)
        first_rank = parallel.tp_rank == 0 and parallel.pp_rank == 0
        load_weights(model, startup.progress(iter_checkpoint(path, dtype, formats), num_checkpoint_tensors(path),
                                             "Loading weights", "tensor", show=first_rank))
    if quantization in ("int8", "int4"):
        _quantize_at_load(model, device, quantization, quantization_group_size)
    if torch.device(device).type == "cpu" and huge_pages.available():
        _place_weights_on_huge_pages(model)
    if streaming is not None:
        model.use_streaming(streaming)
    plan = install_kernels(
        model, dtype, torch.device(device).type, attention_backend, linear_backend, kv_cache_dtype, parallel.tp_size,
    )
    logger.info("kernel plan: %s", plan.describe())
    model.kernel_plan = plan
    return model


def _quantize_at_load(model: nn.Module, device: str, method: str, group_size: int) -> None:
    if torch.device(device).type != "cpu" or cpu_quant.load() is None:
        where = f"on {device}" if torch.device(device).type != "cpu" else "here: the CPU block kernels did not build"
        raise ValueError(f"quantization={method!r} needs the CPU block kernels, which are not available {where}; "
                         "use quantization auto or none")
    count, dense, packed, skipped = quantize_linears(model, method, group_size)
    group = f" in groups of {group_size}" if method == "int4" else " per output channel"
    left = f"; {skipped} left in the model dtype (input size not a multiple of 32)" if skipped else ""
    logger.info("weights: %d linear layers quantized to %s%s at load: %.1f MiB -> %.1f MiB (LM head and embedding "
                "kept in the model dtype)%s", count, method, group, dense / 2**20, packed / 2**20, left)


def _place_weights_on_huge_pages(model: nn.Module) -> None:
    """Every weight, dense or in GGUF blocks, moved onto 2 MB pages (huge_pages.py: a decode step streams
    them all). Before `install_kernels`: the one-call layers keep pointers to them."""
    holders: list[tuple[object, str]] = [(p, "data") for p in model.parameters() if p.numel() and p.is_contiguous()]
    for module in model.modules():
        if isinstance(module, Linear) and module.quantized is not None:
            holders += [(packed, "blocks") for _, packed in module.quantized.parts]
        elif isinstance(module, Embedding) and module.packed is not None:
            holders.append((module.packed, "blocks"))
    with startup.phase("placing the weights on 2 MB pages"):
        moved = huge_pages.place_on_huge_pages(holders)
    logger.info("weights: %.1f MiB placed on 2 MB pages (a decode step streams them all)", moved / 2**20)


def packed_formats(path: str, device: str, quantization: str, tp_size: int = 1) -> frozenset[int]:
    """The GGUF block formats to keep packed for this model (none for a non-GGUF, "none", no CPU kernel, or
    tensor parallel, whose shards cut blocks), with a log line saying what stays packed and what is
    dequantized, and why."""
    if not is_gguf_file(path):
        return frozenset()
    from kvserve.models.gguf_loader import packed_summary

    formats = frozenset(cpu_quant.SUPPORTED_FORMATS)
    reason = ""
    if quantization != "auto":
        formats, reason = frozenset(), f"quantization={quantization}"
    elif torch.device(device).type != "cpu":
        formats, reason = frozenset(), f"no block kernels on {device}"
    elif tp_size > 1:
        formats, reason = frozenset(), f"tensor_parallel_size {tp_size}: shards are cut from dense weights"
    elif cpu_quant.load() is None:
        formats, reason = frozenset(), "the block kernels did not build"
    kept, widened = packed_summary(path, formats)

    def sizes(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(counts.items())) or "nothing"

    logger.info("weights: kept in GGUF blocks: %s; dequantized at load: %s%s", sizes(kept), sizes(widened),
                f" ({reason})" if reason else "")
    return formats


def iter_checkpoint(path: str, dtype: torch.dtype, packed: frozenset[int] = frozenset()) -> WeightIterator:
    if is_gguf_file(path):
        from kvserve.models.gguf_loader import iter_gguf_tensors

        for name, tensor in iter_gguf_tensors(path, dtype, packed):
            yield path, name, tensor
        return
    files = _checkpoint_files(path)
    for file in files:
        if file.endswith(".safetensors"):
            yield from _iter_safetensors(file)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"cannot read weight file {file}: {exc}") from exc
            for name, tensor in state.items():
                yield file, name, tensor


def num_checkpoint_tensors(path: str) -> int | None:
    """How many tensors `iter_checkpoint` yields, read from the file headers (None for pickled .bin files,
    which would have to be read whole to count them)."""
    if is_gguf_file(path):
        from kvserve.models.gguf_loader import num_tensors

        return num_tensors(path)
    from safetensors import safe_open

    total = 0
    for file in _checkpoint_files(path):
        if not file.endswith(".safetensors"):
            return None
        try:
            with safe_open(file, framework="pt") as f:
                total += len(f.keys())
        except Exception:
            return None  # iter_checkpoint names the unreadable file
    return total


def _checkpoint_files(path: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise ValueError(f"weight file {missing[0]} listed in {index} is missing")
            return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return [bin_file]
    raise ValueError(f"no weights in {path}: expected *.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _iter_safetensors(file: str) -> WeightIterator:
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt")
    except Exception as exc:
        raise ValueError(f"cannot read weight file {file} (truncated or corrupt?): {exc}") from exc
    with handle as f:
        for name in f.keys():
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:
                raise ValueError(f"cannot read tensor {name} from {file} (truncated or corrupt?): {exc}") from exc
            yield file, name, tensor


def load_weights(model: nn.Module, weights: WeightIterator) -> None:
    """Copy checkpoint tensors into `model` (each parameter's `weight_loader` takes its rank's slice),
    checking that every parameter gets exactly its shape. Tensors of modules another pipeline stage
    holds are skipped; a last stage without the embedding loads a tied LM head from the embedding's tensor."""
    params = dict(model.named_parameters())
    merged: dict[str, tuple[str, int]] = getattr(model, "packed_modules_mapping", {})
    conv1d: tuple[str, ...] = getattr(model, "conv1d_weights", ())
    tied = getattr(model, "tied", False)
    elsewhere = tuple(name + "." for name, module in model.named_modules() if isinstance(module, MissingLayer))
    embedding = "transformer.wte.weight" if hasattr(model, "transformer") else "model.embed_tokens.weight"
    needs_prefix = hasattr(model, "transformer")
    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    for source, name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if needs_prefix and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if tied and name == embedding and "lm_head.weight" in params and embedding not in params:
            name = "lm_head.weight"  # a last pipeline stage: the tied head is the embedding's table
        if name.startswith(elsewhere):
            continue
        target, shard = name, None
        for hf_part, (our_part, shard_id) in merged.items():
            if f".{hf_part}." in name:
                target, shard = name.replace(f".{hf_part}.", f".{our_part}."), shard_id
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        if name.endswith(conv1d) and tensor.dim() == 2:
            tensor = tensor.t()
        try:
            if isinstance(tensor, PackedWeight):  # kept in GGUF blocks: the module holds them
                model.get_submodule(target.rsplit(".", 1)[0]).load_packed(tensor, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
        except ValueError as exc:
            raise ValueError(f"tensor {name} in {source}: {exc}") from exc
        loaded.add((target, shard))
    finish_loading = getattr(model, "finish_loading", None)
    if finish_loading is not None:
        finish_loading()
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use: %s", len(unexpected), unexpected[:8])
    missing = []
    for name, param in params.items():
        parts = getattr(param, "num_checkpoint_parts", None)
        shards = range(parts) if parts else [None]
        missing += [f"{name}[shard {s}]" if s is not None else name for s in shards if (name, s) not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def _init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
        elif param.dim() == 1:
            param.data.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=generator) * 0.02
            param.data.copy_(values)
