"""DraftRunner: a draft model's proposals, made inside the target's step by the model runner.

The draft's KV cache has the target's blocks: the same block tables and slots in tensors of its own (the
draft's layers and heads), so the scheduler's block manager allocates, shares and frees both at once, and
the engine sizes its blocks for the bytes of both. The draft runs only for the sequences that speculate in
a step: first over the tokens its cache lacks up to the sequence's last one (after a proposal accepted last
step, one or two; after steps without speculation, a prompt's worth, as a prefill), which gives the first
proposal, then k - 1 one-token passes for the rest. So a step without speculation (a batch too large, a
sequence pausing after rejections) costs nothing here. The runner keeps how far each sequence's draft KV
goes (`num_draft_computed`); a sequence never trusts draft KV it did not write (a prefix-cache hit is
recomputed by the draft), and a sequence resumed in other blocks starts again where its blocks changed.

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
    def __init__(self, model: nn.Module, kv_caches: list[KVCache], vocab_size: int, window: int | None) -> None:
        """`vocab_size`: the target's; the draft's logits are cut or padded (with -inf) to it. `window`: the
        target's sliding window when every layer has one (its blocks behind it are released, so the draft
        never catches up further back than it)."""
        self.model = model
        self.kv_caches = kv_caches
        self.vocab_size = vocab_size
        self.window = window

    def propose(
        self, seqs: list[RunnerSequence], counts: list[int], num_proposals: list[int], prepare: Prepare, sample: Sample,
    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """The step's sequences (`counts[i]` tokens each, of which the last `num_proposals[i]` are slots for
        proposals): the tokens proposed for each and the distributions q they were drawn from ([k, vocab])."""
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(num_proposals) if k]
        if not active:
            return drafts, [None] * len(seqs)
        ends = {i: seqs[i].num_computed_tokens + counts[i] - num_proposals[i] for i in active}  # after the last token
        starts = {i: self._catch_up_from(seqs[i]) for i in active}
        active.sort(key=lambda i: ends[i] - starts[i] != 1)  # one-token rows first, as decodes
        input_ids, positions, meta = prepare(
            [seqs[i] for i in active], [ends[i] - starts[i] for i in active], None, [starts[i] for i in active])
        logits = self._logits(input_ids, positions, meta, [end - 1 for end in meta.query_start_loc_cpu[1:]])
        for step in range(max(num_proposals)):
            if step:  # feed each active sequence its previous proposal, at the position after its last token
                active = [i for i in active if num_proposals[i] > step]
                input_ids, positions, meta = prepare(
                    [seqs[i] for i in active], [1] * len(active), [[drafts[i][-1]] for i in active],
                    [ends[i] - 1 + step for i in active],
                )
                logits = self._logits(input_ids, positions, meta, None)
            out = sample(logits, [(seqs[i], drafts[i]) for i in active])
            for r, i in enumerate(active):
                drafts[i].append(out.token_ids[r])
                probs[i].append(out.probs[r])
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _catch_up_from(self, seq: RunnerSequence) -> int:
        """The first position the draft computes for `seq` this step: where its draft KV ends, or the start
        of the window of the sequence's last token when every layer has one (earlier blocks are released)."""
        start = seq.num_draft_computed
        if self.window is not None:
            start = max(start, seq.num_computed_tokens - self.window + 1)
        return min(start, seq.num_computed_tokens)

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
