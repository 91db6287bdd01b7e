"""The Llama family: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

One implementation with three switches read from the HF config, and each layer's
sliding window where the config has one (attention/sliding_window.py); parameter names
match Hugging Face's, except that q/k/v and gate/up are stored merged
(`packed_modules_mapping` tells the loader where each HF tensor goes).

Built for one rank (`ParallelContext`): its attention heads and share of the MLP
(tensor parallel: column-parallel qkv and gate/up, row-parallel o and down), and
its stage's layers (pipeline parallel: the first stage embeds, the last one norms
and computes logits; a middle stage takes and returns `hidden` and `residual`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from kvserve.attention.attention_sinks import StreamingWindow
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.sliding_window import layer_windows
from kvserve.distributed.parallel_state import SINGLE, ParallelContext, kv_head_start, kv_heads_per_rank
from kvserve.layers.attention import Attention
from kvserve.layers.embedding import Embedding
from kvserve.layers.linear import MergedLinear, ParallelLMHead, RowParallelLinear
from kvserve.layers.missing_layer import MissingLayer
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding


class OneCallLayer(Protocol):
    """A decoder layer as one native call, for the steps it `accepts` (models/llama_cpu_layer.py)."""

    def accepts(self, x: torch.Tensor, positions: torch.Tensor) -> bool: ...

    def __call__(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self, config: Any, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool, sliding_window: int | None,
        parallel: ParallelContext,
    ) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.num_heads, self.num_kv_heads = kv_heads_per_rank(total_heads, total_kv_heads, parallel.tp_size)
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        q_start = parallel.tp_rank * self.q_size
        kv_start = kv_head_start(total_kv_heads, parallel.tp_rank, parallel.tp_size) * self.head_dim
        total_q, total_kv = total_heads * self.head_dim, total_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], qkv_bias, [q_start, kv_start, kv_start],
            [total_q, total_kv, total_kv],
        )
        self.o_proj = RowParallelLinear(total_q, config.hidden_size, o_bias, parallel, "the attention output size")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over every token (all of them write K/V); the output projection only for `rows` when given."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        streaming = self.attn.streaming
        # with attention sinks the sinks are scored by the query at its position within the cache
        q_sink = self.rotary.rotate(streaming.cache_positions(positions), q) if streaming and streaming.sinks else None
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta, q_sink).view(-1, self.q_size)
        return self.o_proj(out if rows is None else out[rows])


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported for {config.architectures}; supported: silu")
        bias = getattr(config, "mlp_bias", False)
        inner = config.intermediate_size
        start, size = parallel.shard(inner, "intermediate_size")
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias, [start, start], [inner, inner])
        self.down_proj = RowParallelLinear(inner, config.hidden_size, bias, parallel, "intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_and_mul(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool, sliding_window: int | None = None,
        parallel: ParallelContext = SINGLE,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, qkv_bias, o_bias, qk_norm, sliding_window, parallel)
        self.mlp = LlamaMLP(config, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cpu_layer: OneCallLayer | None = None  # installed by models/kernel_plan.py where every piece runs in C++

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer for every token; with `rows`, only those rows of the output (after attention, which needs all)."""
        cpu_layer = self.cpu_layer
        if cpu_layer is not None and cpu_layer.accepts(x, positions):
            x, residual = cpu_layer(positions, x, residual, kv_cache, meta)
            return (x, residual) if rows is None else (x[rows], residual[rows])
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, rows)
        if rows is not None:
            residual = residual[rows]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, max_positions: int, qkv_bias: bool, o_bias: bool, qk_norm: bool, parallel: ParallelContext,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, parallel) if parallel.is_first_stage else MissingLayer()
        rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.own_layers = parallel.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary, qkv_bias, o_bias, qk_norm, window, parallel) if i in self.own_layers else MissingLayer()
            for i, window in enumerate(layer_windows(config))
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage else MissingLayer()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None, intermediate: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Final hidden states of every token, or of `output_rows` only: then the last layer's output
        projection and MLP run for those rows alone (prefill chunks need logits for a few). A stage
        before the last returns `hidden` and `residual` for the next one, which passes them as `intermediate`."""
        if self.parallel.is_first_stage:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate["hidden"], intermediate["residual"]
        last = len(self.layers) - 1
        for i, kv_cache in zip(self.own_layers, kv_caches):
            x, residual = self.layers[i](positions, x, residual, kv_cache, meta, output_rows if i == last else None)
        if not self.parallel.is_last_stage:
            return {"hidden": x, "residual": residual}
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False
    qk_norm = False
    intermediate_names = ("hidden", "residual")  # what a pipeline stage hands the next

    def __init__(self, config: Any, max_positions: int, parallel: ParallelContext = SINGLE) -> None:
        super().__init__()
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = self.qkv_bias or attention_bias
        self.config = config
        self.model = LlamaModel(config, max_positions, qkv_bias, attention_bias, self.qk_norm, parallel)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, parallel) if parallel.is_last_stage else MissingLayer()
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied and parallel.is_first_stage and parallel.is_last_stage:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_streaming(self, streaming: StreamingWindow) -> None:
        """Attention sinks and a window on every layer (attention/attention_sinks.py). Keys keep their text
        positions, which may pass the rotary table; queries score the sinks from their cache positions."""
        for layer in self.model.layers:
            if isinstance(layer, LlamaDecoderLayer):
                layer.self_attn.attn.use_streaming(streaming)
                layer.self_attn.rotary.unbounded = True

    def finish_loading(self) -> None:
        """A tied LM head multiplies on the embedding's table: on its GGUF blocks when the table kept them."""
        packed = getattr(self.model.embed_tokens, "packed", None)
        if self.tied and packed is not None and isinstance(self.lm_head, ParallelLMHead):
            self.lm_head.load_packed(packed)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None, intermediate: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.model(input_ids, positions, kv_caches, meta, output_rows, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (every rank's vocabulary slice gathered); the sampler widens them
        only where it needs fp32."""
        return self.lm_head.logits(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
