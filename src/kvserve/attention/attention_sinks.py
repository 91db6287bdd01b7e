"""StreamingLLM attention sinks: every layer attends to the first S tokens and to the last W.

The paper (Xiao et al., "Efficient Streaming Language Models with Attention Sinks") keeps a cache of
the first S tokens (the "sinks", which soak up softmax mass) and a window of the W most recent ones,
and gives positions *within that cache*: sink j is at position j, the window's keys follow at
S, S + 1, ..., and the query is the cache's last entry, at min(i, S + W - 1) for text position i.

How kvserve computes exactly that without ever re-rotating a key:

- K is stored rotated by its *text* position, as without sinks. RoPE scores depend only on the
  difference of the two positions, and between two window tokens no token was evicted, so their
  distance in the cache is their distance in the text: a query rotated by its text position scores
  the window keys exactly as the paper's cache does. The window is the ordinary sliding-window
  attention every backend already runs (keys i - W < j <= i).
- Sink j sits at cache position j, so it must be scored at distance min(i, S + W - 1) - j: a second
  copy of the query, rotated by its cache position instead (`q_sink`), scores the sinks that are not
  already in the window (j < min(S, i - W + 1)). There are at most S of them: a few dot products.
- The two parts are softmax pieces over disjoint keys: the backend returns the window's
  log-sum-exp with its output, and `merge` weighs both by their mass, exactly as one softmax would.

Nothing in the cache depends on when the window moved, so every token's K/V is a function of the
tokens before it alone: blocks stay prefix-cacheable, copy-on-write forks share them, and a
preempted sequence recomputed from scratch gets the very cache it had. The alternatives cost more:
re-rotating the window's keys whenever a block drops rewrites W keys per layer every block_size
tokens, rounds them again in bf16 / int8 / fp8 every time (the error grows with the stream), and
breaks sharing (a re-rotated block no longer matches its prefix hash); storing keys un-rotated means
rotating every key inside every attention kernel on every step. See docs/STREAMING.md.

Models without rotary positions: GPT-2's learned positions enter at the embedding, so a token there
takes its cache position min(i, S + W - 1) (capped at the table) when it is computed, and `q_sink`
is the query itself (GPT2LMHeadModel.use_streaming).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.attention.kv_quant import dequantize
from kvserve.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class StreamingWindow:
    """The cache every layer keeps: the first `sinks` tokens and the last `window`."""

    sinks: int
    window: int

    @property
    def cache_len(self) -> int:
        return self.sinks + self.window

    def cache_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Each token's position within the sink + window cache (the query's, when it is computed)."""
        return positions.clamp(max=self.cache_len - 1)


def query_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence and the text position of every query row of the flat batch."""
    lens, starts = meta.seq_lens, meta.query_start_loc[:-1]
    q_lens = meta.query_start_loc[1:] - starts
    seq_of_row = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), q_lens)
    row = torch.arange(len(seq_of_row), device=lens.device)
    return seq_of_row, row - starts[seq_of_row] + (lens - q_lens)[seq_of_row]


def sink_attention(
    q_sink: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    streaming: StreamingWindow, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of each query over the sinks outside its window: (out [T, Hq, D] fp32, log-sum-exp
    [T, Hq] fp32, -inf where it sees none), or None when no query of the step sees one yet."""
    sinks, window = streaming.sinks, streaming.window
    if sinks == 0 or max(meta.seq_lens_cpu) - 1 < window:
        return None
    bs = meta.block_size
    tables = meta.block_tables[:, : -(-sinks // bs)]
    keys, values = k_cache[tables], v_cache[tables]  # [seqs, sink blocks, block_size, Hkv, D]
    if k_scale is not None:
        keys = dequantize(keys, k_scale[tables].transpose(-1, -2), torch.float32)
        values = dequantize(values, v_scale[tables].transpose(-1, -2), torch.float32)
    seq_of_row, positions = query_rows(meta)
    keys = keys.flatten(1, 2)[:, :sinks].permute(0, 2, 3, 1).float()[seq_of_row]  # [T, Hkv, D, S]
    values = values.flatten(1, 2)[:, :sinks].transpose(1, 2).float()[seq_of_row]  # [T, Hkv, S, D]
    tokens, heads, dim = q_sink.shape
    kv_heads = keys.shape[1]
    scores = (q_sink.float().view(tokens, kv_heads, heads // kv_heads, dim) @ keys) * scale  # [T, Hkv, group, S]
    outside = torch.arange(sinks, device=keys.device) < (positions - window + 1)[:, None]  # [T, S]
    scores = scores.masked_fill(~outside[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [T, Hkv, group]
    out = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None]) @ values
    return out.reshape(tokens, heads, dim), lse.reshape(tokens, heads)


def merge(out: torch.Tensor, lse: torch.Tensor, sink_out: torch.Tensor, sink_lse: torch.Tensor) -> torch.Tensor:
    """One softmax over the window's keys and the sinks': each part weighed by its share of the mass.
    out: [T, Hq, D] in the model's dtype, lse [T, Hq] fp32 (the window's); the sinks' from `sink_attention`."""
    total = torch.logaddexp(lse, sink_lse)
    merged = out.float() * torch.exp(lse - total)[..., None] + sink_out * torch.exp(sink_lse - total)[..., None]
    return merged.to(out.dtype)
