"""Load Llama-family GGUF files (llama.cpp's format): config, tokenizer and weights.

The file is read with the `gguf` package. `transformers` builds the config and the
tokenizer from the GGUF metadata; this module checks the architecture first, fills
in what transformers leaves out and corrects the pre-tokenizer where transformers'
conversion tokenizes differently from llama.cpp. Weights are renamed to Hugging Face
parameter names and put back into Hugging Face's layout, so that the model code never
sees GGUF names. A tensor in a block format the CPU kernels read (`packed_formats`)
stays in its blocks (a `PackedWeight`); the others are dequantized one tensor at a
time with `gguf.quants.dequantize`. The projections that kvserve merges (q/k/v,
gate/up) stay packed only if all of their tensors can.

transformers parses the whole file again for the config and again for the tokenizer
(~3-4 s each for SmolLM2's 49k-token vocabulary), so the converted config and
tokenizer are kept under the kvserve cache folder, keyed by the file, the
transformers and tokenizers versions and this module's source: a later start loads
them in well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kvserve import native, startup
from kvserve.layers.packed_weight import PackedWeight

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# `general.architecture` -> the Hugging Face class the model is equivalent to.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# llama.cpp's converter stores the q/k rows of these architectures in the interleaved
# RoPE layout; the others (qwen2: NeoX RoPE) keep Hugging Face's half-split layout.
_INTERLEAVED_ROPE_ARCHITECTURES = frozenset({"llama"})

_T = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset({
    _T.F32, _T.F16, _T.BF16,
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
})

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# `tokenizer.ggml.pre` values whose llama.cpp split is "\p{N}" (one digit per chunk)
# followed by the GPT-2 regex. transformers has no entry for them and falls back to
# the GPT-2 regex alone, which groups whitespace with a following digit differently.
_DIGITS_THEN_GPT2_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_GPT2_PRE = frozenset({"gpt2", "default"})


def is_gguf(path: str) -> bool:
    """Whether `path` names a GGUF file: an existing file with the GGUF magic, or a `.gguf` path.

    A missing `.gguf` path counts as GGUF so that the loaders report it as a missing
    file instead of the caller mistaking it for a hub id.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    return path.lower().endswith(".gguf") and not os.path.isdir(path)


def load_gguf_config(path: str) -> PretrainedConfig:
    """The Hugging Face config of a GGUF model, built by transformers from the file's metadata."""
    reader = _reader(path)
    arch = _architecture(reader, path)

    def convert() -> PretrainedConfig:
        with _isolated_folder(path) as (folder, name):
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        config.architectures = [SUPPORTED_ARCHITECTURES[arch]]
        config.tie_word_embeddings = "output.weight" not in _tensor_names(reader)
        config.rms_norm_eps = _shortest_float32(config.rms_norm_eps)
        return config

    return _converted(path, "config", convert, AutoConfig.from_pretrained)


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer described by a GGUF's metadata, chat template included.

    transformers converts the vocabulary, merges, special tokens and chat template;
    the pre-tokenizer is then made to match llama.cpp's for `tokenizer.ggml.pre`.
    """
    reader = _reader(path)
    arch = _architecture(reader, path)

    def convert() -> PreTrainedTokenizerBase:
        with _isolated_folder(path) as (folder, name):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _match_llama_cpp_pre_tokenizer(tokenizer, _field(reader, "tokenizer.ggml.pre", "default"), path)
        context_length = _field(reader, f"{arch}.context_length")
        if context_length is not None:
            tokenizer.model_max_length = int(context_length)
        return tokenizer

    return _converted(path, "tokenizer", convert, AutoTokenizer.from_pretrained)


def _converted(path: str, kind: str, convert: Callable, load: Callable):
    """`convert()`'s config or tokenizer for the GGUF at `path`, saved with `save_pretrained` in the
    cache on first use and loaded from there afterwards. Where the cache cannot be written the
    conversion is simply redone next time."""
    folder = _conversion_folder(path) / kind
    if folder.is_dir():
        try:
            return load(str(folder))
        except (OSError, ValueError) as exc:
            logger.warning("replacing the unreadable cached %s conversion of %s (%s)", kind, path, exc)
            shutil.rmtree(folder, ignore_errors=True)
    with startup.phase(f"converting the GGUF metadata of {os.path.basename(path)} to a transformers {kind}",
                       first_run_only=True):
        result = convert()
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder.parent)
        result.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a concurrent reader sees all of it or none
    except OSError as exc:
        logger.debug("could not cache the %s conversion of %s: %s", kind, path, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _conversion_folder(path: str) -> Path:
    """Where the conversions of this GGUF file by this kvserve and these libraries are kept."""
    real_path = os.path.realpath(path)
    stat = os.stat(real_path)
    key = "\0".join([
        real_path, str(stat.st_mtime_ns), str(stat.st_size), transformers.__version__, tokenizers.__version__,
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    ])
    return native.cache_dir() / "gguf-meta" / hashlib.sha256(key.encode()).hexdigest()[:16]


def iter_gguf_tensors(
    path: str, dtype: torch.dtype, packed_formats: frozenset[int] = frozenset()
) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """`(hf_name, tensor)` for every tensor of a GGUF model, lazily: dequantized to `dtype`, or, for
    weights in one of `packed_formats` (GGML type ids), kept in their blocks as a `PackedWeight`.

    Names and shapes are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...);
    q/k rows are permuted back from llama.cpp's interleaved RoPE layout. Tensors are
    dequantized one at a time, so memory beyond the model is a few copies of one tensor.
    The file is checked (architecture, quantization types) when this is called, not
    when the first tensor is drawn.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype, got {dtype}")
    reader = _reader(path)
    arch = _architecture(reader, path)
    _check_tensor_types(reader, path)
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    packed = _tensors_kept_packed(reader, packed_formats)
    return _generate_tensors(reader, path, dtype, arch in _INTERLEAVED_ROPE_ARCHITECTURES, n_heads, n_kv_heads, packed)


def num_tensors(path: str) -> int:
    """How many tensors the GGUF file holds (for the loading progress bar)."""
    return len(_reader(path).tensors)


def packed_summary(path: str, packed_formats: frozenset[int]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes kept packed by format, bytes dequantized by source type) of a GGUF's tensors, for the log."""
    reader = _reader(path)
    packed = _tensors_kept_packed(reader, packed_formats)
    kept: dict[str, int] = {}
    widened: dict[str, int] = {}
    for tensor in reader.tensors:
        target = kept if tensor.name in packed else widened
        target[tensor.tensor_type.name] = target.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
    return kept, widened


# the GGUF tensors that kvserve holds as one merged weight
_MERGED = ({"attn_q", "attn_k", "attn_v"}, {"ffn_gate", "ffn_up"})


def _tensors_kept_packed(reader: GGUFReader, formats: frozenset[int]) -> set[str]:
    """Names of the 2-D weights in `formats`, dropping a merged projection unless all its tensors are."""
    candidates = {t.name for t in reader.tensors if int(t.tensor_type) in formats and len(t.shape) == 2 and t.name.endswith(".weight")}
    kept = set(candidates)
    for tensor in reader.tensors:
        match = _LAYER_TENSOR.fullmatch(tensor.name)
        if match is None:
            continue
        layer, module, kind = match.groups()
        group = next((g for g in _MERGED if module in g), None)
        if group is not None and kind == "weight" and not all(f"blk.{layer}.{m}.weight" in candidates for m in group):
            kept.discard(tensor.name)
    return kept


def _generate_tensors(reader: GGUFReader, path: str, dtype: torch.dtype, unpermute: bool, n_heads: int, n_kv_heads: int,
                      packed: set[str]) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    for tensor in reader.tensors:
        hf_name, module = _hf_name(tensor.name, path)
        heads = n_heads if module == "attn_q" else n_kv_heads
        if tensor.name in packed:
            rows = int(tensor.shape[1])
            weight = PackedWeight(int(tensor.tensor_type), torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(rows, -1),
                                  int(tensor.shape[0]))
            if unpermute and module in ("attn_q", "attn_k"):
                weight = weight.rows(interleaved_to_half_split(torch.arange(rows), heads))
            yield hf_name, weight
            continue
        weight = _dequantize(tensor, dtype)
        if unpermute and module in ("attn_q", "attn_k"):
            weight = interleaved_to_half_split(weight, heads)
        yield hf_name, weight


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, row `2k + p` moves to `p * head_dim/2 + k`.

    llama.cpp rotates pairs of adjacent dims (2k, 2k+1); Hugging Face's `rotate_half`
    pairs dim k with k + head_dim/2. Works on weights (rows, in) and biases (rows,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _reader(path: str) -> GGUFReader:
    """A GGUFReader for `path`, shared by the loaders (parsing the metadata takes seconds)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    stat = os.stat(path)
    return _cached_reader(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(real_path: str, mtime_ns: int, size: int) -> GGUFReader:
    return GGUFReader(real_path)


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: GGUFReader, path: str) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {tensor.name for tensor in reader.tensors}


def _check_tensor_types(reader: GGUFReader, path: str) -> None:
    """Fail before any work if a tensor uses a quantization we do not load."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                f"which is not supported; supported: {supported}"
            )


def _hf_name(gguf_name: str, path: str) -> tuple[str, str]:
    """(Hugging Face parameter name, GGUF module kind) for a GGUF tensor name."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name], gguf_name
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_MODULES:
        raise ValueError(f"{path}: GGUF tensor {gguf_name!r} has no Hugging Face equivalent here")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_MODULES[module]}.{kind}", module


def _dequantize(tensor, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of `dtype` in torch's dimension order."""
    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # F32 tensors come back as read-only views of the memory-mapped file: copy those.
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values).reshape(shape).to(dtype)


@contextlib.contextmanager
def _isolated_folder(path: str) -> Iterator[tuple[str, str]]:
    """(folder, file name) from which transformers sees only the GGUF.

    Given the GGUF's own folder, transformers also reads a `tokenizer_config.json` or
    `tokenizer.json` lying next to it, so the result would not come from the GGUF
    alone. A private folder holding a symlink avoids that; without symlinks
    (some Windows setups) the file's own folder is used.
    """
    real_path = os.path.realpath(path)
    name = os.path.basename(real_path)
    with tempfile.TemporaryDirectory(prefix="kvserve-gguf-") as tmp:
        try:
            os.symlink(real_path, os.path.join(tmp, name))
        except OSError:
            yield os.path.dirname(real_path), name
        else:
            yield tmp, name


def _match_llama_cpp_pre_tokenizer(tokenizer: PreTrainedTokenizerBase, pre: str, path: str) -> None:
    """Make the pre-tokenizer split text the way llama.cpp does for `tokenizer.ggml.pre`."""
    backend = tokenizer.backend_tokenizer
    if pre in _DIGITS_THEN_GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre not in _GPT2_PRE and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        logger.warning(
            "%s: pre-tokenizer %r is not known to transformers or kvserve; using GPT-2's split, "
            "token ids may differ from llama.cpp's", path, pre,
        )


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 as `value` (9.999999747e-06 -> 1e-05).

    GGUF stores hyperparameters like rms_norm_eps as float32; this gives back the value
    the original Hugging Face config had.
    """
    return float(str(np.float32(value)))
