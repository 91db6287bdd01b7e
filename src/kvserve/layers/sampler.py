"""Sampler: last-token logits of every sequence in the step -> next tokens, in one pass.

Every per-request setting becomes a column of a tensor, so one batch of
sequences with different temperatures, top-k/top-p/min-p and penalties is
sampled with a handful of tensor ops. Random draws use the exponential trick
(argmax p/q with q ~ Exp(1), equivalent to drawing from p); a seeded request
draws its q from its own generator, so its tokens do not depend on the batch.

Processing order: penalties, logit_bias, allowed_token_ids, forbidden tokens
(bad words, and stop tokens until min_tokens), the grammar masks of the rows
under a structured-output constraint (one call for all of them,
layers/token_bitmask.py), then temperature and the top-k/top-p/min-p filters. Reported logprobs are those of the raw model
distribution (log_softmax of the logits before any processing), as in vLLM.

Speculative decoding with a draft model: a row that verifies a proposal drawn from the draft's distribution q
chooses it or a resample by the rejection rule (layers/rejection_sampler.py); `return_probs` hands the draft
its own q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.layers import cpu_pointwise
from kvserve.layers.rejection_sampler import rejection_sample
from kvserve.layers.token_bitmask import apply_token_bitmask_
from kvserve.sampling_params import SamplingParams


@dataclass
class SamplingInputs:
    """One row per sequence that samples this step."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    token_ids: list[list[int]]  # prompt + output so far (for penalties)
    num_prompt_tokens: list[int]
    stop_ids_until_min_tokens: list[list[int]]  # ids to forbid while min_tokens is not reached
    banned_token_ids: list[list[int]] = field(default_factory=list)  # from bad_words; empty or one list per row
    full_logprobs: bool = False  # return every row's log_softmax (beam search scores all continuations)
    grammar_rows: list[int] = field(default_factory=list)  # rows under a grammar (structured output)
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_rows), vocab/32] int32: the tokens each row may take
    return_probs: bool = False  # return the distribution each row draws from (a draft model's q)
    # speculative decoding with a draft model: rows verifying a proposed token drawn from the draft's distribution
    # q (layers/rejection_sampler.py); their chosen token is the proposal if accepted, else a resample
    draft_rows: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [len(draft_rows), vocab] fp32


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each chosen token
    top_logprobs: list[tuple[list[int], list[float], int] | None]  # (top ids, top logprobs, rank of chosen)
    raw_logprobs: torch.Tensor | None = None  # [rows, vocab] log_softmax of the unprocessed logits, when asked for
    probs: torch.Tensor | None = None  # [rows, vocab] fp32 with return_probs: what each row drew from (one-hot if greedy)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs) -> SamplerOutput:
        num_rows, vocab = logits.shape
        params = inputs.params
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        processed = any(inputs.stop_ids_until_min_tokens) or any(inputs.banned_token_ids) or bool(inputs.grammar_rows) or any(
            p.needs_penalties or p.needs_token_masks for p in params
        )
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        # The chosen token's logprob needs only logsumexp; the full [rows, vocab] table (4x the
        # memory traffic at large batch) only when top logprobs or beam scores are wanted. Greedy rows
        # with neither take argmax and logsumexp from the logits as the model wrote them (bf16 at large
        # batch: a widened fp32 copy of [rows, vocab] would cost more than the two reductions).
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want or inputs.full_logprobs else None
        raw_argmax = log_normalizer = None
        if raw_logprobs is None:
            if cpu_pointwise.available(logits):
                raw_argmax, log_normalizer = cpu_pointwise.argmax_logsumexp(logits)  # one read, not two slow ones
            else:
                log_normalizer = torch.logsumexp(logits.float(), dim=-1)
        raw_logits = logits
        if processed or random_rows or raw_argmax is None:
            logits = logits.float()
            if processed and logits is raw_logits:
                logits = logits.clone()  # processing writes in place; logprobs score the raw logits

        if any(p.needs_penalties for p in params):
            logits = _apply_penalties(logits, inputs)
        if any(p.needs_token_masks for p in params):
            logits = _apply_bias_and_allowed(logits, params)
        forbidden = [(row, t) for row, ids in enumerate(inputs.stop_ids_until_min_tokens) for t in ids if t < vocab]
        forbidden += [(row, t) for row, ids in enumerate(inputs.banned_token_ids) for t in ids if t < vocab]
        if forbidden:
            rows, cols = zip(*forbidden)
            logits[list(rows), list(cols)] = float("-inf")
        if inputs.grammar_rows:
            apply_token_bitmask_(logits, inputs.grammar_bitmask, inputs.grammar_rows)

        chosen = raw_argmax if raw_argmax is not None and not processed else logits.argmax(dim=-1)
        probs = None
        if inputs.return_probs:
            probs = torch.zeros((num_rows, vocab), dtype=torch.float32)
            probs[torch.arange(num_rows), chosen] = 1.0
        if random_rows:
            idx = torch.tensor(random_rows)
            generators = [inputs.generators[i] for i in random_rows]
            random_probs = _probabilities(logits[idx], [params[i] for i in random_rows])
            exponentials = _exponentials(random_probs.shape, generators, self.generator)
            sampled = (random_probs / exponentials).argmax(dim=-1)
            # draft rows of greedy requests need nothing more: q is one-hot there, and the argmax is exact
            position = {row: j for j, row in enumerate(random_rows)}
            verified = [(position[row], k) for k, row in enumerate(inputs.draft_rows) if row in position]
            if verified:
                at = torch.tensor([j for j, _ in verified])
                sampled[at] = rejection_sample(
                    random_probs[at], exponentials[at], torch.tensor([inputs.draft_token_ids[k] for _, k in verified]),
                    inputs.draft_probs[[k for _, k in verified]], _uniforms([generators[j] for j, _ in verified], self.generator),
                )
            chosen[idx] = sampled
            if probs is not None:
                probs[idx] = random_probs.float()

        if raw_logprobs is not None:
            chosen_logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
        else:
            chosen_logprobs = raw_logits.gather(1, chosen[:, None]).squeeze(1).float() - log_normalizer
        top: list[tuple[list[int], list[float], int] | None] = [None] * num_rows
        if want:
            k = max(params[i].logprobs for i in want)
            rows = torch.tensor(want)
            sub = raw_logprobs[rows]
            top_vals, top_ids = sub.topk(max(k, 1), dim=-1)
            ranks = (sub > chosen_logprobs[rows, None]).sum(dim=-1) + 1
            for j, i in enumerate(want):
                kk = params[i].logprobs
                top[i] = (top_ids[j, :kk].tolist(), top_vals[j, :kk].tolist(), int(ranks[j]))
        return SamplerOutput(chosen.tolist(), chosen_logprobs.tolist(), top, raw_logprobs, probs)


def _apply_bias_and_allowed(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logit_bias adds to the logits (OpenAI); allowed_token_ids sets every other token to -inf."""
    vocab = logits.shape[1]
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    rows.append(row)
                    cols.append(token)
                    values.append(bias)
    if rows:
        logits = logits.index_put((torch.tensor(rows), torch.tensor(cols)), torch.tensor(values, dtype=logits.dtype), accumulate=True)
    limited = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
    if limited:
        allowed = torch.zeros((len(limited), vocab), dtype=torch.bool)
        pairs = [(j, t) for j, row in enumerate(limited) for t in params[row].allowed_token_ids if t < vocab]
        if pairs:
            j, t = zip(*pairs)
            allowed[list(j), list(t)] = True
        index = torch.tensor(limited)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def _apply_penalties(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """repetition_penalty as in transformers (prompt + output); presence/frequency as OpenAI (output only)."""
    num_rows, vocab = logits.shape
    max_len = max(len(t) for t in inputs.token_ids)
    padded = torch.full((num_rows, max_len), vocab, dtype=torch.long)
    is_output = torch.zeros((num_rows, max_len), dtype=torch.bool)
    for i, ids in enumerate(inputs.token_ids):
        padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        is_output[i, inputs.num_prompt_tokens[i] : len(ids)] = True
    output_counts = torch.zeros((num_rows, vocab + 1))
    output_counts.scatter_add_(1, padded, is_output.float())
    output_counts = output_counts[:, :vocab]
    seen = torch.zeros((num_rows, vocab + 1), dtype=torch.bool)
    seen.scatter_(1, padded, True)
    seen = seen[:, :vocab]

    rep = torch.tensor([p.repetition_penalty for p in inputs.params])[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([p.frequency_penalty for p in inputs.params])[:, None]
    presence = torch.tensor([p.presence_penalty for p in inputs.params])[:, None]
    return logits - freq * output_counts - presence * (output_counts > 0).float()


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from: temperature, top-k/top-p, min-p; normalized (a draft model's
    proposals are accepted by the ratio of two of these)."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if any(m > 0 for m in min_p):
        threshold = torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < threshold, torch.zeros_like(probs), probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _exponentials(shape: torch.Size, generators: list[torch.Generator | None], default: torch.Generator) -> torch.Tensor:
    """Exp(1) draws, a row per sample: argmax(p / q) over them is a draw from p. A seeded row draws from its own
    generator, so its token does not depend on the batch."""
    q = torch.empty(shape)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        q[unseeded] = torch.empty((len(unseeded), shape[1])).exponential_(generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            _draw_row(q[i], g)
    return q


def _uniforms(generators: list[torch.Generator | None], default: torch.Generator) -> torch.Tensor:
    """One U(0, 1) draw per row, from the row's own generator where it has one."""
    return torch.stack([torch.rand((), generator=g or default) for g in generators])


def _draw_row(q_row: torch.Tensor, generator: torch.Generator) -> None:
    """A seeded row's draw: one exponential per vocabulary entry, from the row's own generator, row by row (one
    call over several rows may consume the stream differently)."""
    q_row.exponential_(generator=generator)


def replay_seeded_draws(generator: torch.Generator, state: torch.Tensor, num_rows: int, vocab: int) -> None:
    """Set `generator` to where sampling `num_rows` rows of a `vocab`-wide (fp32) distribution leaves it from `state`
    (speculative decoding undoes the rows after the first rejected proposal this way). Greedy rows draw nothing."""
    generator.set_state(state)
    row = torch.empty(vocab, dtype=torch.float32)
    for _ in range(num_rows):
        _draw_row(row, generator)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([k if k > 0 else vocab for k in top_k])[:, None]
    ranks = torch.arange(vocab)[None, :]
    remove = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    remove |= before >= torch.tensor(top_p, dtype=probs.dtype)[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
