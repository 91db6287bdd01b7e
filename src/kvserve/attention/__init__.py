"""Attention backends over the paged KV cache. All give the same results; `reference` is the oracle."""

from kvserve.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
