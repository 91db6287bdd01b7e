"""GPT-2: learned absolute positions, LayerNorm, tanh-GELU MLP, fused c_attn.

HF stores GPT-2's projections as `Conv1D` (weight [in, out]); `conv1d_weights`
tells the loader to transpose them into our `Linear` layout.

Tensor parallel as Llama: c_attn's q, k and v each split by heads and c_fc by
columns (column-parallel), both c_proj row-parallel; the tied wte/LM head split
by vocabulary. Pipeline parallel: the first stage embeds (wte + wpe), the last
applies ln_f and the head; stages hand over `hidden`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvserve.attention.attention_sinks import StreamingWindow
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata
from kvserve.distributed.parallel_state import SINGLE, ParallelContext, kv_heads_per_rank
from kvserve.layers.activation import gelu_new
from kvserve.layers.attention import Attention
from kvserve.layers.embedding import Embedding
from kvserve.layers.linear import MergedLinear, ParallelLMHead, RowParallelLinear, column_parallel
from kvserve.layers.missing_layer import MissingLayer


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.num_heads, _ = kv_heads_per_rank(config.n_head, config.n_head, parallel.tp_size)
        self.head_dim = config.n_embd // config.n_head
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        size = self.num_heads * self.head_dim
        start = parallel.tp_rank * size
        self.c_attn = MergedLinear(config.n_embd, [size] * 3, True, [start] * 3, [config.n_embd] * 3, parts_in_checkpoint=False)
        self.c_proj = RowParallelLinear(config.n_embd, config.n_embd, True, parallel, "n_embd")
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        out = self.attn(q, k, v, kv_cache, meta)
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext) -> None:
        super().__init__()
        act = getattr(config, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not supported for GPT-2; supported: gelu_new")
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = column_parallel(config.n_embd, inner, True, parallel, "the MLP size (n_inner)")
        self.c_proj = RowParallelLinear(inner, config.n_embd, True, parallel, "the MLP size (n_inner)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, parallel)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, parallel)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        first, last = parallel.is_first_stage, parallel.is_last_stage
        self.wte = Embedding(config.vocab_size, config.n_embd, parallel) if first else MissingLayer()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if first else MissingLayer()
        self.own_layers = parallel.layers(config.n_layer)
        self.h = nn.ModuleList(
            GPT2Block(config, i, parallel) if i in self.own_layers else MissingLayer() for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if last else MissingLayer()
        self.streaming: StreamingWindow | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata,
        intermediate: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.parallel.is_first_stage:
            if self.streaming is not None:  # learned positions: a token takes its position within the cache
                positions = self.streaming.cache_positions(positions).clamp(max=self.wpe.num_embeddings - 1)
            x = self.wte(input_ids) + self.wpe(positions)
        else:
            x = intermediate["hidden"]
        for i, kv_cache in zip(self.own_layers, kv_caches):
            x = self.h[i](x, kv_cache, meta)
        return self.ln_f(x) if self.parallel.is_last_stage else {"hidden": x}


class GPT2LMHeadModel(nn.Module):
    packed_modules_mapping: dict[str, tuple[str, int]] = {}
    conv1d_weights = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    intermediate_names = ("hidden",)
    tied = True  # GPT-2 always ties

    def __init__(self, config: Any, max_positions: int, parallel: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, parallel)
        self.lm_head = ParallelLMHead(config.n_embd, config.vocab_size, parallel) if parallel.is_last_stage else MissingLayer()
        if parallel.is_first_stage and parallel.is_last_stage:
            self.lm_head.weight = self.transformer.wte.weight
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None, intermediate: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Final hidden states of every token, or of `output_rows` only (a middle stage: its `hidden`)."""
        hidden = self.transformer(input_ids, positions, kv_caches, meta, intermediate)
        return hidden if output_rows is None or isinstance(hidden, dict) else hidden[output_rows]

    def use_streaming(self, streaming: StreamingWindow) -> None:
        """Attention sinks and a window on every layer (attention/attention_sinks.py). GPT-2's positions are
        learned and added at the input, so a token is computed at its position within the cache (capped at
        n_positions - 1) and its keys keep it: the sinks are scored by the query as it is."""
        self.transformer.streaming = streaming
        for block in self.transformer.h:
            if isinstance(block, GPT2Block):
                block.attn.attn.use_streaming(streaming)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (every rank's vocabulary slice gathered)."""
        return self.lm_head.logits(hidden)
