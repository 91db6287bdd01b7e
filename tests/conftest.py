"""Shared fixtures: tiny random models built by transformers, real checkpoints from ../shared/models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Triton kernels decide at definition whether they are interpreted; set it before any test module
# (or a library such as transformers) can import triton, so test order never matters. No test here
# runs a GPU kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Floors measured while the suite runs are measured under its load: they go to a file of this run's own
# (servers and CLIs that tests start inherit it), never to the user's ~/.cache/kvserve/hardware.json,
# which benchmarks divide by.
os.environ["KVSERVE_HARDWARE_CACHE"] = str(Path(tempfile.mkdtemp(prefix="kvserve-tests-")) / "hardware.json")

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K"
SMOLLM2 = SHARED_MODELS / "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = SMOLLM2 / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = REPO.parent / "shared" / "tools" / "convert_models.py"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# name -> (architecture, config kwargs)
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama-gqa7-tied": ("llama", dict(hidden_size=448, num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-mha-hd80": ("llama", dict(hidden_size=160, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-headdim-llama3rope": (
        "llama",
        dict(
            hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ),
    "llama-linear-rope": (
        "llama",
        dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ),
    "mistral": ("mistral", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("qwen2", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1)),
    # sliding windows shorter than most prompts: every layer (Mistral), and the upper layer only (Qwen2's
    # max_window_layers: layer 0 attends fully)
    "mistral-sliding": ("mistral", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=24)),
    "qwen2-sliding-upper": ("qwen2", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
                                          sliding_window=24, max_window_layers=1)),
    "qwen3": ("qwen3", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "gpt2": ("gpt2", dict(n_embd=128, n_head=4, n_layer=2, n_positions=512)),
}


def _tokenizer():
    from kvserve.estimate.dummy_model import tiny_tokenizer

    return tiny_tokenizer()


def make_tiny_model(directory: Path, arch: str, overrides: dict, seed: int = 0) -> Path:
    """Save a random transformers model with a 512-token BPE tokenizer to `directory`."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=1)
    if arch == "gpt2":
        config = transformers.GPT2Config(**common, **overrides)
        model = transformers.GPT2LMHeadModel(config)
    else:
        cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                   "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
        model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                     "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[arch]
        base = dict(intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-6)
        base.update(overrides)
        config = cfg_cls(**common, **base)
        model = model_cls(config)
    with torch.no_grad():  # larger weights: sharper distributions, fewer near-ties in greedy decoding
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if "embed" in name or "wte" in name or "wpe" in name else 0.05)
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def no_block_leaks(request):
    """In a test module with an `llm` fixture (an LLM), every test leaves no request and no held KV block."""
    if "llm" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("llm").llm_engine
    before = engine.stats().num_free_blocks
    yield
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == before


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(root / name, arch, kw) for name, (arch, kw) in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama-gqa7-tied"]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny tied llama with a chat template added (its tokenizer ships without one)."""
    from transformers import AutoTokenizer

    out = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("chat-llama") / "model")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (the real checkpoints live in ../shared/models)")
    return STORIES


@pytest.fixture(scope="session")
def chat_model_dir(stories_dir: Path, tmp_path_factory) -> Path:
    """stories260K with a chat template added (it ships without one)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("stories-chat")
    for f in stories_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF to an fp32 safetensors directory (about 15 s)."""
    if not SMOLLM2_GGUF.is_file() or not CONVERTER.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} or {CONVERTER} is absent")
    out = tmp_path_factory.mktemp("smollm2-hf")
    subprocess.run(
        [sys.executable, str(CONVERTER), "gguf", "--gguf", str(SMOLLM2_GGUF), "--out", str(out), "--dtype", "float32"],
        check=True, capture_output=True,
    )
    return out
