"""Prompt-lookup (n-gram) proposals: what followed the last earlier occurrence of the sequence's suffix.

For n from `max_n` down to `min_n`, the sequence's last n tokens are looked for earlier in the sequence
(prompt and output); at the latest earlier match, the up to k tokens that followed it are the proposal
(transformers' prompt lookup and vLLM's ngram proposer do the same). The search is one vectorized
comparison per n over the sequence, never a Python loop over its tokens.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` proposed next tokens (empty when no suffix of length min_n..max_n occurred before)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # windows starting at 0 .. length - n - 1: every earlier occurrence, the suffix itself excluded
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []
