"""ModelRunner: owns the model and the KV cache; turns a scheduled batch into one forward.

`prepare` flattens the step's sequences (decodes first, then prefill chunks, no
padding) into input ids, positions, cache slots and block tables, with numpy
doing the per-token arithmetic. `execute` runs the forward and samples one token
for every sequence whose computed tokens reach its end this step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kvserve.attention.metadata import AttentionMetadata
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.engine.sequence import Sequence
from kvserve.layers.sampler import Sampler, SamplerOutput, SamplingInputs

logger = logging.getLogger(__name__)


def kv_cache_shape(hf_config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a model's KV cache."""
    layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer
    heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_head
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    hidden = getattr(hf_config, "hidden_size", None) or hf_config.n_embd
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def kv_bytes_per_token(hf_config: Any, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_cache_shape(hf_config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepResult:
    sampled: dict[int, int]  # seq_id -> new token
    sampler_output: SamplerOutput | None
    sampled_seqs: list[Sequence]


class ModelRunner:
    def __init__(self, model: nn.Module, hf_config: Any, num_blocks: int, block_size: int, dtype: torch.dtype, device: str, seed: int, eos_token_ids: set[int]) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.eos_token_ids = eos_token_ids
        layers, kv_heads, head_dim = kv_cache_shape(hf_config)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(layers)
        ]
        self.sampler = Sampler(seed)

    # ---- batch preparation ------------------------------------------------------

    def prepare(self, seqs: list[Sequence], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        num_seqs = len(seqs)
        counts_np = np.asarray(counts, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
        seq_lens = starts + counts_np
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts_np, out=qsl[1:])
        total = int(qsl[-1])

        tokens: list[int] = []
        for seq, start, n in zip(seqs, starts.tolist(), counts):
            tokens.extend(seq.token_ids[start : start + n])
        seq_index = np.repeat(np.arange(num_seqs), counts_np)
        positions = np.arange(total) - qsl[:-1][seq_index] + starts[seq_index]

        max_blocks = max(len(s.block_table) for s in seqs)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        slots = tables[seq_index, positions // bs] * bs + positions % bs

        num_decodes = 0
        while num_decodes < num_seqs and counts[num_decodes] == 1:
            num_decodes += 1
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            num_decodes=num_decodes,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=bs,
        )
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        return input_ids, torch.from_numpy(positions).to(dev), meta

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    # ---- one step ---------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        self.copy_blocks(batch.block_copies)
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta = self.prepare(seqs, counts)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed_tokens + n == len(s)]
        if not sample_rows:
            return StepResult({}, None, [])
        last_token = torch.tensor([meta.query_start_loc_cpu[i + 1] - 1 for i in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden[last_token])
        sampled_seqs = [seqs[i] for i in sample_rows]
        inputs = self._sampling_inputs(sampled_seqs)
        out = self.sampler(logits.cpu() if logits.device.type != "cpu" else logits, inputs)
        sampled = {s.seq_id: t for s, t in zip(sampled_seqs, out.token_ids)}
        return StepResult(sampled, out, sampled_seqs)

    def _sampling_inputs(self, seqs: list[Sequence]) -> SamplingInputs:
        needs_history = any(s.params.needs_penalties for s in seqs)
        stop_ids: list[list[int]] = []
        for s in seqs:
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                stop_ids.append(list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_token_ids)))
            else:
                stop_ids.append([])
        return SamplingInputs(
            params=[s.params for s in seqs],
            generators=[s.generator for s in seqs],
            token_ids=[s.token_ids for s in seqs] if needs_history else [[] for _ in seqs],
            num_prompt_tokens=[s.num_prompt_tokens for s in seqs],
            stop_ids_until_min_tokens=stop_ids,
        )
