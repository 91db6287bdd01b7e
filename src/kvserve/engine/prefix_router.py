"""PrefixRouter: which data-parallel replica a new request goes to.

A replica that already holds a request's prefix in its KV cache computes only the rest, so the
router sends a request to the replica that served the longest prefix of it before — the idea of
SGLang's cache-aware router, whose approximate radix tree this is in the form of kvserve's own
prefix cache: the chain hash of each full block (`extend_chain_hashes`; one hash stands for the
whole prefix up to its block) maps to the replica last sent that prefix. It learns at routing
time, so two requests sharing a prefix that arrive together still meet on one replica. Where no
replica knows the prefix, or the one that does is far busier than the least loaded
(`balance_threshold` more requests), the least loaded replica takes it.
"""

from __future__ import annotations

from collections import OrderedDict

from kvserve.engine.block_manager import extend_chain_hashes


class PrefixRouter:
    def __init__(self, num_replicas: int, block_size: int, balance_threshold: int = 32, max_entries: int = 1 << 20) -> None:
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.balance_threshold = balance_threshold
        self.max_entries = max_entries
        self._owner: OrderedDict[int, int] = OrderedDict()  # block chain hash -> replica, least recently used first

    def route(self, token_ids: list[int], loads: list[int]) -> int:
        """The replica for a prompt, given each replica's load."""
        hashes: list[int] = []
        extend_chain_hashes(hashes, token_ids, self.block_size, (len(token_ids) - 1) // self.block_size)
        owner = None  # of the longest prefix sent before
        for h in hashes:
            replica = self._owner.get(h)
            if replica is None:
                break
            owner = replica
        least = min(range(self.num_replicas), key=lambda r: loads[r])
        chosen = owner if owner is not None and loads[owner] - loads[least] <= self.balance_threshold else least
        for h in hashes:
            self._owner[h] = chosen
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return chosen
