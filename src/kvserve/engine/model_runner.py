"""ModelRunner: owns the model and the KV cache; turns a SchedulerOutput into one forward.

It keeps its own copy of every sequence it runs (`RunnerState`), brought up to
date from each output. `prepare` flattens the step's sequences (decodes first,
then prefill chunks, no padding) into input ids, positions, cache slots and
block tables, with numpy doing the per-token arithmetic. `execute` runs the
forward and samples one token for every sequence whose computed tokens reach
its end this step.

Proposed tokens (speculative decoding) ride in the same forward: prompt-lookup
proposals come with the SchedulerOutput; with a draft model the runner first
lets it fill the proposal slots the scheduler allocated (spec_decode/draft_runner.py).

A sequence about to fork (n>1) samples once per output: its logits row is
repeated for each output that splits off it, and each row draws with that
output's generator. A beam samples nothing; its log_softmax row goes back to
the beam search. Requests with `prompt_logprobs` get logits for every prompt
position they compute, chunk by chunk.

Nothing is kept from a step that raises (seeded generators are rewound), nor
from a probe (`SchedulerOutput.probe`), so the engine can re-run parts of a
failed step to find the request that broke it.

On several ranks every runner takes the same output and runs its shard: a
pipeline stage before the last receives the previous stage's hidden states
(`recv_tensors`), runs its layers and sends them on, and returns nothing; the
last stage's tensor-parallel ranks compute the logits together (the LM head's
all-gather), and only its output rank samples.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kvserve import huge_pages
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.kv_quant import SCALE_DTYPE, bytes_per_head_token, cache_dtype, is_quantized
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.sliding_window import block_window, layer_windows
from kvserve.distributed.communication import recv_tensors, send_tensors
from kvserve.distributed.parallel_state import SINGLE, ParallelContext, kv_heads_per_rank
from kvserve.engine.runner_output import ModelRunnerOutput, PromptLogprobs
from kvserve.engine.runner_state import RunnerSequence, RunnerState, seeded_generator
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.layers.sampler import Sampler, SamplerOutput, SamplingInputs, replay_seeded_draws
from kvserve.spec_decode.draft_runner import DraftRunner

logger = logging.getLogger(__name__)


def hidden_size_of(hf_config: Any) -> int:
    return getattr(hf_config, "hidden_size", None) or hf_config.n_embd


def kv_cache_shape(hf_config: Any, parallel: ParallelContext = SINGLE) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the KV cache one rank holds: its stage's layers, its share of the heads."""
    layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer
    heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_head
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden_size_of(hf_config) // heads
    _, local_kv_heads = kv_heads_per_rank(heads, kv_heads, parallel.tp_size)
    return len(parallel.layers(layers)), local_kv_heads, head_dim


def kv_bytes_per_token(hf_config: Any, dtype: torch.dtype, kv_cache_dtype: str = "auto", parallel: ParallelContext = SINGLE) -> int:
    """Bytes of KV cache per token on one rank: K and V of its layers and kv heads, in `dtype` (the model's)
    or, for an int8 / fp8 cache, 1 byte per value plus a 4-byte scale per row."""
    layers, kv_heads, head_dim = kv_cache_shape(hf_config, parallel)
    return 2 * layers * kv_heads * bytes_per_head_token(kv_cache_dtype, dtype, head_dim)


_PROMPT_LOGITS_ROWS = 256  # prompt positions turned into vocab-sized logits at once


def kv_cache_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache tensor, on a CPU advised for 2 MB pages before its first touch (huge_pages.py): decode
    attention reads blocks scattered over gigabytes, and with 4 KB pages nearly every block costs a TLB
    miss (a W1-sized decode step's attention: 3-4% faster, docs/PERFORMANCE.md)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    tensor = torch.empty(shape, dtype=dtype)
    huge_pages.advise(tensor)
    return tensor.zero_()


def allocate_kv_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str,
    device: torch.device,
) -> KVCache:
    """One layer's zeroed cache: K and V in `dtype`, or int8 / fp8 values with their fp32 scales."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    values = cache_dtype(kv_cache_dtype, dtype)
    key, value = kv_cache_tensor(shape, values, device), kv_cache_tensor(shape, values, device)
    if not is_quantized(kv_cache_dtype):
        return KVCache(key, value)
    scales = (num_blocks, kv_heads, block_size)
    return KVCache(key, value, kv_cache_tensor(scales, SCALE_DTYPE, device), kv_cache_tensor(scales, SCALE_DTYPE, device))


class ModelRunner:
    def __init__(
        self, model: nn.Module, hf_config: Any, num_blocks: int, block_size: int, dtype: torch.dtype, device: str,
        seed: int, eos_token_ids: set[int], kv_cache_dtype: str = "auto", parallel: ParallelContext = SINGLE,
        draft_model: nn.Module | None = None, draft_hf_config: Any = None,
    ) -> None:
        """`draft_model` (speculative decoding, method draft_model): proposes tokens in each step with a KV cache
        of its own over the same blocks (spec_decode/draft_runner.py)."""
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = hidden_size_of(hf_config)
        self.eos_token_ids = eos_token_ids
        self.parallel = parallel
        layers, kv_heads, head_dim = kv_cache_shape(hf_config, parallel)
        self.kv_caches = [
            allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, kv_cache_dtype, self.device)
            for _ in range(layers)
        ]
        self.drafter = None
        if draft_model is not None:
            layers, kv_heads, head_dim = kv_cache_shape(draft_hf_config)
            caches = [allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, kv_cache_dtype, self.device)
                      for _ in range(layers)]
            self.drafter = DraftRunner(draft_model, caches, hf_config.vocab_size, block_window(layer_windows(hf_config)))
        self.sampler = Sampler(seed)
        self.state = RunnerState(block_size)

    # ---- batch preparation ------------------------------------------------------

    def prepare(
        self, seqs: list[RunnerSequence], counts: list[int], drafts: list[list[int]] | None = None,
        starts: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """`counts[i]` tokens of sequence i from position `starts[i]` (default: its computed count), of which
        the last `len(drafts[i])` are proposed tokens that follow its own in this step."""
        bs = self.block_size
        num_seqs = len(seqs)
        counts_np = np.asarray(counts, dtype=np.int64)
        if starts is None:
            starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
        else:
            starts = np.asarray(starts, dtype=np.int64)
        seq_lens = starts + counts_np
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts_np, out=qsl[1:])
        total = int(qsl[-1])

        tokens: list[int] = []
        for i, (seq, start, n) in enumerate(zip(seqs, starts.tolist(), counts)):
            draft = drafts[i] if drafts else ()
            tokens.extend(seq.token_ids[start : start + n - len(draft)])
            tokens.extend(draft)
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
            query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.from_numpy(seq_lens).to(dev),
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
        for cache in self.kv_caches + (self.drafter.kv_caches if self.drafter is not None else []):
            for tensor in cache.tensors():  # K and V, and their scales in an int8 / fp8 cache
                tensor[dst] = tensor[src]

    # ---- one step ---------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self.copy_blocks(output.block_copies)  # first: a copy must never be lost to a later failure
        self.state.apply(output)
        if output.is_empty():
            return ModelRunnerOutput()
        scheduled = [(self.state.seqs[seq_id], n) for seq_id, n in output.num_scheduled_tokens.items()]
        scheduled.sort(key=lambda item: item[1] != 1)  # decodes first
        seqs = [seq for seq, _ in scheduled]
        counts = [n for _, n in scheduled]
        if self.drafter is None:
            drafts = [output.spec_token_ids.get(seq.seq_id, []) for seq in seqs]
            return self._run(output, seqs, counts, drafts, [None] * len(seqs))
        # the draft model samples from the sequences' generators before the target does: rewind them from here
        generators = list({id(s.generator): s.generator for s in seqs if s.generator is not None}.values())
        states = {id(g): g.get_state() for g in generators}
        try:
            drafts, draft_probs = self.drafter.propose(
                seqs, counts, [output.num_draft_tokens.get(seq.seq_id, 0) for seq in seqs], self.prepare, self._draft_sample)
            result = self._run(output, seqs, counts, drafts, draft_probs)
        except BaseException:
            _rewind(generators, states)
            raise
        if output.probe:
            _rewind(generators, states)
            return result
        for seq, draft in zip(seqs, drafts):  # the draft wrote the KV of the sequence's last token and its proposals
            if draft:  # but the last; the target keeps those it accepted
                accepted = len(result.sampled.get(seq.seq_id, ())) - 1
                seq.num_draft_computed = seq.num_computed_tokens + 1 + min(accepted, len(draft) - 1)
        return result

    def _run(
        self, output: SchedulerOutput, seqs: list[RunnerSequence], counts: list[int], drafts: list[list[int]],
        draft_probs: list[torch.Tensor | None],
    ) -> ModelRunnerOutput:
        """The target's forward over the step, proposals `drafts` included (drawn from `draft_probs` by a draft
        model, or None), and its samples."""
        input_ids, positions, meta = self.prepare(seqs, counts, drafts if any(drafts) else None)
        qsl = meta.query_start_loc_cpu
        wanted = self._prompt_logprob_rows(seqs, counts, qsl)
        sample_rows = [i for i, (s, n, d) in enumerate(zip(seqs, counts, drafts)) if s.num_computed_tokens + n - len(d) == len(s.token_ids)]
        # a sequence with proposals samples at its own last token and after each proposal (they are verified)
        last_rows = [row for i in sample_rows for row in range(qsl[i + 1] - 1 - len(drafts[i]), qsl[i + 1])]
        # the token rows whose hidden states are used: the last layer computes only those (a prefill
        # chunk of 2,048 tokens may need 8)
        needed = sorted(set(last_rows).union(*(range(r, r + m) for _, r, _, m in wanted)))
        output_rows = torch.tensor(needed, dtype=torch.long, device=self.device) if len(needed) < qsl[-1] else None
        hidden = self._forward(input_ids, positions, meta, output_rows)
        if hidden is None:  # a pipeline stage before the last: its hidden states went on to the next
            return ModelRunnerOutput()

        def hidden_rows(rows: torch.Tensor) -> torch.Tensor:
            return hidden[rows if output_rows is None else torch.searchsorted(output_rows, rows)]

        result = ModelRunnerOutput(prompt_logprobs=self._prompt_logprobs(hidden_rows, wanted))
        forks: dict[int, torch.Generator | None] = {}
        if sample_rows:
            logits = self.model.compute_logits(hidden_rows(torch.tensor(last_rows, device=self.device)))
            if self.parallel.is_output_rank:
                self._sample(logits, [(seqs[i], drafts[i], draft_probs[i]) for i in sample_rows], forks, output.probe,
                             result, output.grammar_seq_ids, output.grammar_bitmask)
        if not output.probe:  # the step stands: keep what it changed in the runner's own state
            for seq, _, _, m in wanted:
                seq.num_prompt_logprobs += m
            for i in sample_rows:
                seqs[i].fork_seeds = []
            self.state.fork_generators.update(forks)
        return result

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, output_rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """This rank's layers over the step: the final hidden states on the last stage, else None (sent on)."""
        parallel = self.parallel
        intermediate = None
        if not parallel.is_first_stage:
            shapes = {name: (len(input_ids), self.hidden_size) for name in self.model.intermediate_names}
            intermediate = recv_tensors(shapes, self.dtype, self.device, parallel)
        out = self.model(input_ids, positions, self.kv_caches, meta, output_rows, intermediate)
        if parallel.is_last_stage:
            return out
        send_tensors(out, parallel)
        return None

    def _draft_sample(self, logits: torch.Tensor, rows: list[tuple[RunnerSequence, list[int]]]) -> SamplerOutput:
        """A draft model's draws, each row as its sequence samples after `history`, with the distributions q."""
        inputs = self._sampling_inputs([(seq.seq_id, seq, seq.generator, history) for seq, history in rows])
        inputs.return_probs = True
        return self.sampler(logits.cpu() if logits.device.type != "cpu" else logits, inputs)

    def _sample(
        self, logits: torch.Tensor, sampling: list[tuple[RunnerSequence, list[int], torch.Tensor | None]],
        forks: dict[int, torch.Generator | None],
        probe: bool, result: ModelRunnerOutput, grammar_seq_ids: list[int], grammar_bitmask: torch.Tensor | None,
    ) -> None:
        """Sample a token for each sequence (and each output splitting off it), or hand a beam its log_softmax;
        sequences in `grammar_seq_ids` sample only the tokens their `grammar_bitmask` row allows.

        A sequence with proposals d (speculative decoding) has a logits row after its last token and after each
        proposal; every row samples as a plain decode would at that point, and the proposals are accepted while
        each equals the token sampled before it: the first token that differs (or the one after the last
        proposal) ends the step. That is exact for any proposal (the emitted tokens are always the target's own
        samples; with n-gram proposals, q one-hot, it is the rejection rule), and greedy output is unchanged. A
        seeded generator is set back to where it would be after the emitted tokens alone, so a seeded request
        gives the same tokens with or without speculation. A draft model's proposals come with the distributions
        q they were drawn from: their rows choose by the rejection rule (the proposal, or a resample from
        max(p - q, 0)), and the same accept-while-equal reading applies. Seeded generators are rewound if
        sampling raises, or after a probe."""
        rows: list[tuple[int, RunnerSequence, torch.Generator | None, list[int]]] = []  # (seq_id, state, generator, history)
        row_source: list[int] = []  # the logits row of each row
        first_rows: list[int] = []
        logits_row = 0
        draft_rows: list[int] = []
        draft_token_ids: list[int] = []
        draft_probs: list[torch.Tensor] = []
        for seq, draft, q in sampling:
            first_rows.append(len(rows))
            if q is not None and not seq.params.greedy:  # (greedy: q is one-hot, and the argmax rule is exact)
                draft_rows += range(len(rows), len(rows) + len(draft))
                draft_token_ids += draft
                draft_probs.append(q)
            for i in range(len(draft) + 1):
                rows.append((seq.seq_id, seq, seq.generator, draft[:i]))
                row_source.append(logits_row + i)
            for child_id, seed in seq.fork_seeds:  # outputs split off at the first sample, which has no proposals
                forks[child_id] = seeded_generator(seed)
                rows.append((child_id, seq, forks[child_id], []))
                row_source.append(logits_row)
            logits_row += len(draft) + 1
        if len(rows) > logits.shape[0]:
            logits = logits[torch.tensor(row_source, device=logits.device)]
        inputs = self._sampling_inputs(rows)
        if grammar_seq_ids:  # an output splitting off a sequence shares its mask: neither has sampled yet
            # (a constrained sequence never has proposals: one row each)
            mask_row = {seq_id: i for i, seq_id in enumerate(grammar_seq_ids)}
            constrained = [(j, mask_row[seq.seq_id]) for j, (_, seq, _, _) in enumerate(rows) if seq.seq_id in mask_row]
            inputs.grammar_rows = [j for j, _ in constrained]
            inputs.grammar_bitmask = grammar_bitmask[[i for _, i in constrained]]
        if draft_rows:
            inputs.draft_rows, inputs.draft_token_ids, inputs.draft_probs = draft_rows, draft_token_ids, torch.cat(draft_probs)
        generators = list({id(g): g for _, _, g, _ in rows if g is not None}.values())  # a sequence's rows share one
        states = {id(g): g.get_state() for g in generators}
        try:
            out = self.sampler(logits.cpu() if logits.device.type != "cpu" else logits, inputs)
        except BaseException:
            _rewind(generators, states)
            raise
        if probe:
            _rewind(generators, states)

        def emit(seq_id: int, emitted: range) -> None:
            result.sampled[seq_id] = [out.token_ids[r] for r in emitted]
            result.logprobs[seq_id] = [out.logprobs[r] for r in emitted]
            if any(out.top_logprobs[r] is not None for r in emitted):
                result.top_logprobs[seq_id] = [out.top_logprobs[r] for r in emitted]

        for (seq, draft, q), row in zip(sampling, first_rows):
            if seq.is_beam:
                result.beam_logprobs[seq.seq_id] = out.raw_logprobs[row]
                continue
            accepted = 0
            while accepted < len(draft) and out.token_ids[row + accepted] == draft[accepted]:
                accepted += 1
            emit(seq.seq_id, range(row, row + accepted + 1))
            if accepted < len(draft) and q is None and seq.generator is not None and not seq.params.greedy and not probe:
                replay_seeded_draws(seq.generator, states[id(seq.generator)], accepted + 1, logits.shape[1])
            for c, (child_id, _) in enumerate(seq.fork_seeds):
                emit(child_id, range(row + len(draft) + 1 + c, row + len(draft) + 2 + c))

    @staticmethod
    def _prompt_logprob_rows(seqs: list[RunnerSequence], counts: list[int], qsl: list[int]) -> list[tuple[RunnerSequence, int, int, int]]:
        """(seq, first flat row, first position, number of positions) of the prompt positions whose
        logprobs this step records.

        Position p's logits score prompt token p + 1. Positions arrive chunk by
        chunk and each is recorded once (`num_prompt_logprobs` counts them, the first token's empty entry included).
        """
        wanted: list[tuple[RunnerSequence, int, int, int]] = []
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if not seq.needs_prompt_logprobs:
                continue
            start = seq.num_computed_tokens
            first = max(start, seq.num_prompt_logprobs - 1)
            end = min(start + n, seq.num_prompt_tokens - 1)
            if end > first:
                wanted.append((seq, qsl[i] + first - start, first, end - first))
        return wanted

    def _prompt_logprobs(
        self, hidden_rows: Callable[[torch.Tensor], torch.Tensor], wanted: list[tuple[RunnerSequence, int, int, int]]
    ) -> dict[int, PromptLogprobs]:
        """Logprobs of the prompt positions in `wanted`; `hidden_rows` gives the final hidden states of flat token rows."""
        if not wanted:
            return {}
        flat_rows = torch.cat([torch.arange(r, r + m) for _, r, _, m in wanted]).to(self.device)
        targets = torch.tensor([t for seq, _, p, m in wanted for t in seq.token_ids[p + 1 : p + 1 + m]])
        k = max(seq.params.prompt_logprobs for seq, *_ in wanted)
        chosen, ranks, top_vals, top_ids = [], [], [], []
        for lo in range(0, len(flat_rows), _PROMPT_LOGITS_ROWS):
            logprobs = torch.log_softmax(self.model.compute_logits(hidden_rows(flat_rows[lo : lo + _PROMPT_LOGITS_ROWS])).cpu().float(), dim=-1)
            target = targets[lo : lo + _PROMPT_LOGITS_ROWS, None]
            value = logprobs.gather(1, target)
            chosen.append(value[:, 0])
            ranks.append((logprobs > value).sum(dim=-1) + 1)
            top = logprobs.topk(max(k, 1), dim=-1)
            top_vals.append(top.values)
            top_ids.append(top.indices)
        chosen_all, ranks_all = torch.cat(chosen).tolist(), torch.cat(ranks).tolist()
        vals_all, ids_all = torch.cat(top_vals).tolist(), torch.cat(top_ids).tolist()
        result: dict[int, PromptLogprobs] = {}
        lo = 0
        for seq, _, p, m in wanted:
            kk = seq.params.prompt_logprobs
            sl = slice(lo, lo + m)
            result[seq.seq_id] = PromptLogprobs(
                seq.token_ids[p + 1 : p + 1 + m], chosen_all[sl], ranks_all[sl],
                [ids[:kk] for ids in ids_all[sl]], [vals[:kk] for vals in vals_all[sl]],
            )
            lo += m
        return result

    def _sampling_inputs(self, rows: list[tuple[int, RunnerSequence, torch.Generator | None, list[int]]]) -> SamplingInputs:
        """One row per sample: an output splitting off a sequence samples with that sequence's history and its
        own generator; a row after proposals samples as if they were already the sequence's tokens."""
        seqs = [seq for _, seq, _, _ in rows]
        histories = [h for _, _, _, h in rows]
        needs_history = any(s.params.needs_penalties for s in seqs)
        banned = [_banned_by_bad_words(s, h) for s, h in zip(seqs, histories)] if any(s.bad_words_token_ids for s in seqs) else []
        stop_ids: list[list[int]] = []
        for s, h in zip(seqs, histories):
            p = s.params
            if s.num_output_tokens + len(h) < p.min_tokens and p.structured_outputs is None:  # a grammar decides when it ends
                stop_ids.append(list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_token_ids)))
            else:
                stop_ids.append([])
        return SamplingInputs(
            params=[s.params for s in seqs],
            generators=[g for _, _, g, _ in rows],
            token_ids=[s.token_ids + h for s, h in zip(seqs, histories)] if needs_history else [[] for _ in seqs],
            num_prompt_tokens=[s.num_prompt_tokens for s in seqs],
            stop_ids_until_min_tokens=stop_ids,
            banned_token_ids=banned,
            full_logprobs=any(s.is_beam for s in seqs),
        )


def _rewind(generators: list[torch.Generator], states: dict[int, torch.Tensor]) -> None:
    for generator in generators:
        generator.set_state(states[id(generator)])


def _banned_by_bad_words(seq: RunnerSequence, extra: list[int] | None = None) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far (vLLM's rule), followed by `extra`
    (proposed tokens before a verification row)."""
    output = seq.output_token_ids + (extra or [])
    banned = []
    for word in seq.bad_words_token_ids:
        prefix = word[:-1]
        if len(prefix) <= len(output) and (not prefix or output[len(output) - len(prefix) :] == prefix):
            banned.append(word[-1])
    return banned
