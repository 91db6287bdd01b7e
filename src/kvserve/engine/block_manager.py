"""BlockManager: the pool of fixed-size KV blocks, shared by ref count.

A sequence's K/V live in the blocks of its block table; token position p is in
block `block_table[p // block_size]` at offset `p % block_size`. Blocks are
handed out on demand, one at a time, as a sequence grows: nothing is reserved
for a request's maximum length.

Prefix caching: once a block is full, it gets a chain hash
`hash((parent_hash, its token ids))` that identifies the whole prefix up to and
including it. A later sequence whose prompt starts with the same tokens takes
the same physical blocks (ref count + 1) instead of recomputing them. A block
whose ref count drops to 0 keeps its hash and content and sits in the free
queue in LRU order; it is only wiped when the pool hands it out again.

Copy-on-write: blocks can be shared by `fork` (several outputs of one prompt).
Before a sequence writes into a block that someone else also references, it
gets a private copy; the copy is recorded in `pending_copies` and carried out
by the model runner before the next forward.

Sliding window: when every layer of the model attends only to its last W keys
(`sliding_window`, attention/sliding_window.py), a block whose tokens all lie
before the next query's window will never be read again. `drop_outside_window`
releases it as the sequence advances, and its table entry becomes
`PLACEHOLDER_BLOCK`, so positions keep their index (token p stays in entry
p // block_size) while a sequence holds about W / block_size + 1 blocks however
long it grows. A dropped block that was cached keeps its hash: its K/V are those
of its prefix whatever follows, so a later prompt may still share it. Cached
prefix blocks already behind the window when a sequence starts are not taken at
all. With attention sinks (attention/attention_sinks.py) the first
`ceil(attention_sinks / block_size)` blocks, which hold the sinks, are kept: the
dropped entries are those between them and the window.

The block manager is the one writer of block tables (`block_table(seq_id)`),
of the chain hashes it memoizes per sequence, and of its own counters. It reads
a sequence's tokens and computed count, and never writes them: `allocate`
with cached blocks leaves advancing the count to the scheduler.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

from kvserve.engine.sequence import Sequence
from kvserve.engine.snapshot import DROPPED, BlockPoolState

# The table entry of a block dropped behind the sliding window: any valid id does, since no attention
# backend uses keys outside a layer's window (the reference gathers and masks them), and 0 always exists.
PLACEHOLDER_BLOCK = 0


def extend_chain_hashes(hashes: list[int], token_ids: list[int], block_size: int, num_full_blocks: int) -> None:
    """Append to `hashes` the chain hashes of `token_ids`' blocks until it has `num_full_blocks`: block i's
    hash is hash((hash of block i-1, its tokens)), so it stands for the whole prefix up to its end."""
    while len(hashes) < num_full_blocks:
        i = len(hashes)
        parent = hashes[-1] if hashes else None
        hashes.append(hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, sliding_window: int | None = None,
        attention_sinks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if attention_sinks < 0 or (attention_sinks and sliding_window is None):
            raise ValueError(f"attention_sinks must be >= 0, and 0 without a sliding_window, got {attention_sinks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # every layer's keys lie within the last this many: older blocks are dropped
        self.sink_blocks = -(-attention_sinks // block_size)  # the first blocks, holding the sinks: never dropped
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the runner
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found
        self.num_cached_free_blocks = 0  # free blocks still holding a cached prefix (reusable until evicted)
        self._tables: dict[int, list[int]] = {}  # seq_id -> block ids, in token order
        self._hashes: dict[int, list[int]] = {}  # seq_id -> chain hashes of its full blocks, in order
        self._dropped: dict[int, int] = {}  # seq_id -> how many table entries after the sink blocks are placeholders

    # ---- pool -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, seq_id: int) -> list[int]:
        """The block ids of a sequence, in token order (empty if it holds none), `PLACEHOLDER_BLOCK` for
        those dropped behind the sliding window. Read it, do not change it."""
        return self._tables.get(seq_id, [])

    def held_blocks(self, seq_id: int) -> list[int]:
        """The blocks a sequence holds a reference to: its table without the dropped entries."""
        table, dropped = self.block_table(seq_id), self._dropped.get(seq_id, 0)
        return table[: self.sink_blocks] + table[self.sink_blocks + dropped :] if dropped else table

    def display_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block table with `DROPPED` for the entries released behind the sliding window."""
        table, dropped = self.block_table(seq_id), self._dropped.get(seq_id, 0)
        if not dropped:
            return list(table)
        return table[: self.sink_blocks] + [DROPPED] * dropped + table[self.sink_blocks + dropped :]

    def pool_state(self) -> BlockPoolState:
        """Every block's ref count and cached flag, in one vectorized pass: a block's ref count is the number of
        tables holding it, so it is counted from the held tables, not read block by block."""
        held = itertools.chain.from_iterable(self.held_blocks(seq_id) for seq_id in self._tables)
        refs = np.bincount(np.fromiter(held, dtype=np.int64), minlength=self.num_blocks)
        cached = np.zeros(self.num_blocks, dtype=bool)
        cached[np.fromiter(self.cached.values(), dtype=np.int64, count=len(self.cached))] = True
        return BlockPoolState(refs, cached)

    def _first_window_block(self, position: int) -> int:
        """The table index of the first block a query at `position` reads (0 without a sliding window)."""
        if self.sliding_window is None:
            return 0
        return max(0, position - self.sliding_window + 1) // self.block_size

    def _take_free(self) -> Block:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self.num_cached_free_blocks -= 1
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = None
        block.ref_count = 1
        return block

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} ref count went negative"
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            self.num_cached_free_blocks += block.hash is not None

    # ---- hashing ----------------------------------------------------------------

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chain hashes of the first `num_full_blocks` blocks of `seq` (memoized while it holds blocks or waits)."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        extend_chain_hashes(hashes, seq.token_ids, self.block_size, num_full_blocks)
        return hashes[:num_full_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`'s tokens.

        At least one token is always left uncomputed so the model produces the
        logits for the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        num_full = (len(seq.token_ids) - 1) // bs
        found: list[int] = []
        for i, h in enumerate(self._block_hashes(seq, num_full)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            found.append(block_id)
        return found

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the blocks that `seq` has completely computed findable by their hash."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = self.block_table(seq.seq_id)
        num_full = min(seq.num_computed_tokens // bs, len(table))
        hashes = self._block_hashes(seq, num_full)
        kept = min(self.sink_blocks, num_full)
        for i in (*range(kept), *range(kept + self._dropped.get(seq.seq_id, 0), num_full)):
            h = hashes[i]
            block = self.blocks[table[i]]
            if block.hash is not None:
                continue
            if h in self.cached:
                continue  # an identical block is already cached; this one stays private
            block.hash = h
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.cached[h] = block.block_id

    # ---- allocation -------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more K/V entries after the computed ones.

        `cached_blocks` (from `cached_prefix`) are given at a sequence's first
        schedule (a list, maybe empty: that lookup is what the prefix-cache
        counters count); they go first in its table and the new tokens follow
        them. The caller then counts them as computed. Cached blocks already
        behind the first new token's sliding window (sink blocks excepted) are
        not taken: their entries are placeholders. Returns False, changing
        nothing, when the pool is too small right now.
        """
        bs = self.block_size
        table = self._tables.setdefault(seq.seq_id, [])
        found = cached_blocks or []
        start = seq.num_computed_tokens + len(found) * bs
        end = start + num_new_tokens
        num_needed = -(-end // bs) - len(table) - len(found)
        behind = min(self._first_window_block(start), len(found)) if found else 0
        kept = min(self.sink_blocks, behind)  # sink blocks before the window are taken all the same
        reused = found[:kept] + found[behind:]
        cow = [i for i in range(start // bs, len(table)) if self.blocks[table[i]].ref_count > 1]
        revived = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        if max(num_needed, 0) + len(cow) + revived > self.num_free_blocks:
            if not table:
                del self._tables[seq.seq_id]
            return False

        if cached_blocks is not None:
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += len(found) * bs
        for block_id in reused:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
                self.num_cached_free_blocks -= 1
            block.ref_count += 1
        table.extend(found[:kept])
        if behind > kept:
            table.extend([PLACEHOLDER_BLOCK] * (behind - kept))
            self._dropped[seq.seq_id] = behind - kept
        table.extend(found[behind:])
        for i in cow:
            old = table[i]
            new = self._take_free()
            if i * bs < seq.num_computed_tokens:
                self.pending_copies.append((old, new.block_id))
            self._release(old)
            table[i] = new.block_id
        for _ in range(max(num_needed, 0)):
            table.append(self._take_free().block_id)
        return True

    def drop_outside_window(self, seq: Sequence) -> None:
        """Release the blocks of `seq` that lie wholly before the window of its next query (at position
        `num_computed_tokens`), sink blocks excepted: no layer reads them again. Nothing happens without a
        sliding window."""
        table = self._tables.get(seq.seq_id)
        if self.sliding_window is None or not table:
            return
        start = self.sink_blocks + self._dropped.get(seq.seq_id, 0)
        behind = min(self._first_window_block(seq.num_computed_tokens), len(table))
        if behind <= start:
            return
        for i in range(start, behind):
            self._release(table[i])
        table[start:behind] = [PLACEHOLDER_BLOCK] * (behind - start)
        self._dropped[seq.seq_id] = behind - self.sink_blocks

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past the one holding `seq`'s last computed token: slots allocated for proposed
        tokens that were rejected (speculative decoding). They are its newest blocks, held by it alone."""
        table = self._tables.get(seq.seq_id)
        if not table:
            return
        keep = -(-seq.num_computed_tokens // self.block_size)
        for block_id in reversed(table[keep:]):
            self._release(block_id)
        del table[keep:]

    def free(self, seq_id: int) -> None:
        """Drop a sequence's references. Tail blocks are freed first so they are evicted first."""
        for block_id in reversed(self.held_blocks(seq_id)):
            self._release(block_id)
        self._tables.pop(seq_id, None)
        self._dropped.pop(seq_id, None)
        self._hashes.pop(seq_id, None)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Let the child share every block of the parent (copy-on-write on the first write)."""
        for block_id in self.held_blocks(parent_id):
            self.blocks[block_id].ref_count += 1
        self._tables[child_id] = list(self.block_table(parent_id))
        if parent_id in self._dropped:
            self._dropped[child_id] = self._dropped[parent_id]
        if parent_id in self._hashes:
            self._hashes[child_id] = list(self._hashes[parent_id])

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
