"""DraftRunner: a draft model's proposals, made inside the target's step by the model runner.

The draft's KV cache has the target's blocks: the same block tables and slots in tensors of its own (the
draft's layers and heads), so the scheduler's block manager allocates, shares (prefix cache, copy-on-write)
and frees both at once, and the engine sizes its blocks for the bytes of both. A block's draft KV is written
in the same step as its target KV: each step the draft first runs over the step's own tokens (prompt chunks
and decodes, not yet the proposals), which keeps its cache level with the target's and gives, at each
speculating sequence's last token, the first proposal; then k - 1 one-token passes over the speculating
sequences draft the rest. The last proposal's KV is not written by them: when the target accepts it, the
next step's first pass writes it too (the sequence's `draft_lag`).

A proposal is drawn from q, the draft's distribution under the request's own sampling settings (greedy: its
argmax), and verified against the target's by the rejection rule (layers/rejection_sampler.py), so the
draft's quality changes how many proposals are accepted, never what the output's distribution is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata
from kvserve.engine.runner_state import RunnerSequence
from kvserve.layers.sampler import SamplerOutput
from kvserve.models.loader import load_hf_config, resolve_model_path
from kvserve.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

# (seqs, counts, drafts, starts) -> (input ids, positions, metadata): the model runner's flat batch
Prepare = Callable[[list[RunnerSequence], list[int], list[list[int]] | None, list[int] | None],
                   tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]
# (logits, [(seq, tokens proposed before this row)]) -> each row's draw and the distribution it drew from
Sample = Callable[[torch.Tensor, list[tuple[RunnerSequence, list[int]]]], SamplerOutput]


def draft_model_config(config: SpeculativeConfig | None) -> tuple[str, Any] | None:
    """(path, Hugging Face config) of the draft model, when speculation uses one."""
    if config is None or config.model is None:
        return None
    path = resolve_model_path(config.model)
    return path, load_hf_config(path)


def check_draft_model(target: Any, draft: Any) -> None:
    """Refuse a draft whose vocabulary cannot be the target's; say so where they differ only in size (padding)."""
    if draft.vocab_size != target.vocab_size:
        ratio = min(draft.vocab_size, target.vocab_size) / max(draft.vocab_size, target.vocab_size)
        if ratio < 0.95:
            raise ValueError(
                f"speculative_config.model must use the target's tokenizer: its vocabulary has {draft.vocab_size} "
                f"tokens, the target's {target.vocab_size}")
        logger.warning("the draft model's vocabulary has %d entries, the target's %d (padding): ids past the smaller "
                       "one are never proposed", draft.vocab_size, target.vocab_size)


class DraftRunner:
    def __init__(self, model: nn.Module, kv_caches: list[KVCache], vocab_size: int) -> None:
        """`vocab_size`: the target's; the draft's logits are cut or padded (with -inf) to it."""
        self.model = model
        self.kv_caches = kv_caches
        self.vocab_size = vocab_size

    def propose(
        self, seqs: list[RunnerSequence], counts: list[int], num_proposals: list[int], prepare: Prepare, sample: Sample,
    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """The step's sequences (`counts[i]` tokens each, of which the last `num_proposals[i]` are slots for
        proposals): the tokens proposed for each and the distributions q they were drawn from ([k, vocab])."""
        lagging = [1 if s.draft_lag >= 0 and s.draft_lag == s.num_computed_tokens - 1 else 0 for s in seqs]
        starts = [s.num_computed_tokens - lag for s, lag in zip(seqs, lagging)]
        own = [n - k + lag for n, k, lag in zip(counts, num_proposals, lagging)]
        order = sorted(range(len(seqs)), key=lambda i: own[i] != 1)  # one-token rows first, as decodes
        input_ids, positions, meta = prepare([seqs[i] for i in order], [own[i] for i in order], None, [starts[i] for i in order])
        qsl = meta.query_start_loc_cpu
        speculating = [(j, i) for j, i in enumerate(order) if num_proposals[i]]
        drafts: list[list[int]] = [[] for _ in seqs]
        if not speculating:  # the pass only writes the cache (its last layer computes one row)
            self.model(input_ids, positions, self.kv_caches, meta, torch.tensor([0], device=input_ids.device))
            return drafts, [None] * len(seqs)
        logits = self._logits(input_ids, positions, meta, [qsl[j + 1] - 1 for j, _ in speculating])
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for _, i in speculating]
        for step in range(max(num_proposals, default=0)):
            if step:  # feed each active sequence its previous proposal, at the position after its last token
                active = [i for i in active if num_proposals[i] > step]
                input_ids, positions, meta = prepare(
                    [seqs[i] for i in active], [1] * len(active), [[drafts[i][-1]] for i in active],
                    [seqs[i].num_computed_tokens + step for i in active],
                )
                logits = self._logits(input_ids, positions, meta, None)
            out = sample(logits, [(seqs[i], drafts[i]) for i in active])
            for r, i in enumerate(active):
                drafts[i].append(out.token_ids[r])
                probs[i].append(out.probs[r])
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows: list[int] | None) -> torch.Tensor:
        """The draft's logits at flat rows `rows` (None: every row), over the target's vocabulary."""
        output_rows = None if rows is None or len(rows) == len(input_ids) else torch.tensor(rows, device=input_ids.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, output_rows)
        logits = self.model.compute_logits(hidden)
        vocab = logits.shape[-1]
        if vocab > self.vocab_size:
            return logits[:, : self.vocab_size]
        if vocab < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - vocab), value=float("-inf"))
        return logits
