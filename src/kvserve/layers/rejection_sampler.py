"""Rejection sampling: the output distribution of speculative decoding equals the target's, whatever proposed.

A proposal d drawn from the draft's distribution q is accepted with probability min(1, p(d) / q(d)), where p is
the target's distribution at that position; on rejection the token is drawn from the leftover mass,
max(p - q, 0) normalized. Together: P(token = t) = min(p(t), q(t)) + (1 - sum min(p, q)) * (p(t) - q(t))+ /
sum (p - q)+ = p(t) (Leviathan et al. 2023, Chen et al. 2023). A rejection also ends the run of proposals: the
sampler after it would condition on a token that is not there.

Everything is one tensor expression over the rows that verify a proposal; the resample reuses the row's Exp(1)
draws (argmax(r / E) is a draw from r), which nothing else of that row uses once its proposal is judged.
"""

from __future__ import annotations

import torch


def rejection_sample(
    probs: torch.Tensor, exponentials: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Per row: the proposal `draft_token_ids[i]` if accepted, else a token from max(p - q, 0).

    probs, draft_probs: [rows, vocab] normalized p and q; exponentials: [rows, vocab] Exp(1) draws; uniforms:
    [rows] U(0, 1) draws, independent of them."""
    rows = torch.arange(len(draft_token_ids))
    p = probs[rows, draft_token_ids]
    q = draft_probs[rows, draft_token_ids]
    accept = uniforms * q <= p  # q(d) > 0: d was drawn from q
    residual = (probs - draft_probs).clamp_min_(0)
    # where p <= q everywhere (equal up to rounding) a rejection has probability ~0; draw from p then
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, probs, residual)
    resampled = (residual / exponentials).argmax(dim=-1)
    return torch.where(accept, draft_token_ids, resampled)
