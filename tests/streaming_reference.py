"""The StreamingLLM oracle: a Llama decoded one token at a time over an explicit sink + window cache.

It keeps every token's un-rotated K and V per layer and, at each step, builds the paper's cache
outright: the first `sinks` tokens and the last `window` (the new token included), rotated to their
positions *within that cache* (0, 1, ...), the query at the last one, and plain softmax attention
over it. Nothing is shared with kvserve but the weights, read from transformers' own modules.
"""

from __future__ import annotations

from pathlib import Path

import torch


def streaming_greedy(model_dir: Path | str, prompt: list[int], new_tokens: int, sinks: int, window: int
                     ) -> tuple[list[int], list[list[int]]]:
    """Greedy continuation of `prompt` (new tokens, top-2 ids at each step) by a Llama-family model whose
    every layer attends to its first `sinks` and last `window` tokens, at positions within that cache."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    layers = model.model.layers
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer, per token: [kv_heads, head_dim], un-rotated
    values: list[list[torch.Tensor]] = [[] for _ in layers]
    tokens, top2 = list(prompt), []
    with torch.no_grad():
        for i in range(len(prompt) + new_tokens - 1):
            kept = [j for j in range(i + 1) if j < sinks or j > i - window]
            positions = torch.arange(len(kept))[None]
            x = model.model.embed_tokens(torch.tensor([[tokens[i]]]))
            for layer, layer_keys, layer_values in zip(layers, keys, values):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(1, 1, heads, head_dim).transpose(1, 2)
                layer_keys.append(attn.k_proj(h).view(kv_heads, head_dim))
                layer_values.append(attn.v_proj(h).view(kv_heads, head_dim))
                k = torch.stack([layer_keys[j] for j in kept], dim=1)[None]  # [1, kv_heads, n, head_dim]
                v = torch.stack([layer_values[j] for j in kept], dim=1)[None]
                cos, sin = model.model.rotary_emb(v, positions)
                q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
                k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
                out = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1) @ v
                x = x + attn.o_proj(out.transpose(1, 2).reshape(1, 1, heads * head_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i >= len(prompt) - 1:
                logits = model.lm_head(model.model.norm(x))[0, -1]
                top2.append(logits.topk(2).indices.tolist())
                tokens.append(top2[-1][0])
    return tokens[len(prompt):], top2
