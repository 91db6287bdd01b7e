"""Block manager invariants under random operation sequences (hypothesis), and its unit behaviour."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.engine.block_manager import PLACEHOLDER_BLOCK, BlockManager
from kvserve.engine.sequence import Sequence
from kvserve.sampling_params import SamplingParams


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=None))


def _check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    owners = Counter(b for s in live for b in bm.held_blocks(s.seq_id))
    for s in live:  # with a sliding window, exactly the blocks behind the next query's window are dropped
        table, held = bm.block_table(s.seq_id), bm.held_blocks(s.seq_id)
        window = bm.sliding_window
        behind = 0 if window is None else min(len(table), max(0, s.num_computed_tokens - window + 1) // bm.block_size)
        assert len(table) - len(held) == behind and table[:behind] == [PLACEHOLDER_BLOCK] * behind
    for block in bm.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == owners.get(block.block_id, 0), f"block {block.block_id}: ref {block.ref_count} vs {owners.get(block.block_id, 0)} owners"
        assert (block.ref_count == 0) == (block.block_id in bm.free_queue)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h
    assert bm.num_free_blocks == bm.num_blocks - len(owners)
    assert bm.num_cached_free_blocks == sum(1 for b in bm.free_queue if bm.blocks[b].hash is not None)


def _prefill(bm: BlockManager, seq: Sequence) -> bool:
    """Schedule the whole uncomputed part of `seq` like the scheduler does, then mark it computed."""
    first = not bm.block_table(seq.seq_id)
    cached = bm.cached_prefix(seq) if first else []
    n = len(seq) - seq.num_computed_tokens - len(cached) * bm.block_size
    if not bm.allocate(seq, n, cached if first else None):
        return False
    seq.num_computed_tokens = len(seq)
    bm.register_full_blocks(seq)
    bm.drop_outside_window(seq)
    return True


ops = st.lists(
    st.tuples(st.sampled_from(["add", "append", "fork", "free"]), st.integers(0, 10_000), st.integers(1, 40)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 16]), num_blocks=st.integers(1, 40), caching=st.booleans(),
       window=st.sampled_from([None, 1, 3, 8, 40]))
def test_random_operations_keep_invariants(ops, block_size, num_blocks, caching, window):
    bm = BlockManager(num_blocks, block_size, caching, window)
    live: list[Sequence] = []
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8] * 4, [9, 9, 9, 9] * 8]
    for op, pick, size in ops:
        if op == "add" or not live:
            tokens = (prefixes[pick % 2] + [pick % 50] * size)[: max(1, size + pick % 17)]
            seq = _seq(tokens)
            if _prefill(bm, seq):
                live.append(seq)
        elif op == "append":
            seq = live[pick % len(live)]
            seq.append_token(pick % 50)
            if not _prefill(bm, seq):
                seq.token_ids.pop()
        elif op == "fork":
            parent = live[pick % len(live)]
            child = _seq(list(parent.token_ids))
            bm.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            live.append(child)
        else:
            bm.free(live.pop(pick % len(live)).seq_id)
        _check_invariants(bm, live)
        assert not bm.pending_copies or all(src != dst for src, dst in bm.pending_copies)
        bm.take_pending_copies()
    for seq in live:
        bm.free(seq.seq_id)
    _check_invariants(bm, [])
    assert bm.num_free_blocks == num_blocks


def test_prefix_cache_reuses_full_blocks_and_leaves_last_token():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    assert _prefill(bm, a)
    b = _seq(list(range(8)) + [99])
    cached = bm.cached_prefix(b)
    assert cached == bm.block_table(a.seq_id)[:2]
    c = _seq(list(range(8)))  # exactly two full blocks: the last token must still be computed
    assert bm.cached_prefix(c) == bm.block_table(a.seq_id)[:1]


def test_cached_blocks_survive_free_and_are_evicted_lru():
    bm = BlockManager(4, 2)
    a = _seq([1, 2, 3, 4, 5])
    assert _prefill(bm, a)
    bm.free(a.seq_id)
    assert bm.num_free_blocks == 4
    assert len(bm.cached) == 2 and bm.num_cached_free_blocks == 2
    b = _seq([1, 2, 3, 4, 7])
    assert len(bm.cached_prefix(b)) == 2
    # fill the pool with unrelated tokens: cached blocks get evicted, never handed out twice
    c = _seq([8] * 8)
    assert _prefill(bm, c)
    assert bm.cached_prefix(b) == []


def test_fork_then_write_copies_the_partial_block():
    bm = BlockManager(6, 4)
    parent = _seq([1, 2, 3, 4, 5, 6])  # one full block + a half-full one
    assert _prefill(bm, parent)
    child = _seq(list(parent.token_ids))
    bm.fork(parent.seq_id, child.seq_id)
    child.num_computed_tokens = parent.num_computed_tokens
    parent_table, child_table = bm.block_table(parent.seq_id), bm.block_table(child.seq_id)
    assert all(bm.blocks[b].ref_count == 2 for b in parent_table)
    child.append_token(7)
    assert bm.allocate(child, 1)
    assert child_table[0] == parent_table[0]
    assert child_table[1] != parent_table[1]
    assert bm.take_pending_copies() == [(parent_table[1], child_table[1])]
    bm.free(parent.seq_id)
    bm.free(child.seq_id)
    assert bm.num_free_blocks == 6


def test_allocate_failure_changes_nothing():
    bm = BlockManager(2, 4)
    seq = _seq(list(range(12)))
    assert not bm.allocate(seq, 12)
    assert bm.block_table(seq.seq_id) == [] and bm.num_free_blocks == 2


def test_sliding_window_drops_the_blocks_behind_the_next_querys_window():
    bm = BlockManager(10, 4, sliding_window=6)
    seq = _seq(list(range(20)))
    assert _prefill(bm, seq)  # the next query, at position 20, sees keys 15..20: blocks 3 and 4 (and a new one)
    table = bm.block_table(seq.seq_id)
    assert table[:3] == [PLACEHOLDER_BLOCK] * 3 and len(bm.held_blocks(seq.seq_id)) == 2
    assert bm.num_free_blocks == 8
    for token in range(20, 40):  # decoding: never more than 3 blocks held
        seq.append_token(token)
        assert _prefill(bm, seq)
        assert len(bm.held_blocks(seq.seq_id)) <= 3
    bm.free(seq.seq_id)
    assert bm.num_free_blocks == 10


def test_cached_blocks_behind_the_window_stay_shareable_but_are_not_taken():
    """A dropped block keeps its hash (its K/V are its prefix's); a later prompt with that prefix counts it as
    a hit, and takes only the cached blocks its first new token's window reaches."""
    bm = BlockManager(10, 4, sliding_window=6)
    a = _seq(list(range(20)))
    assert _prefill(bm, a)
    assert bm.num_cached_free_blocks == 3  # blocks 0-2, dropped, still cached
    b = _seq(list(range(20)) + [99])
    cached = bm.cached_prefix(b)
    assert len(cached) == 5
    assert bm.allocate(b, 1, cached)
    assert bm.prefix_cache_hits == 20
    assert bm.block_table(b.seq_id)[:3] == [PLACEHOLDER_BLOCK] * 3
    assert bm.held_blocks(b.seq_id)[:2] == cached[3:]
    assert bm.num_cached_free_blocks == 3  # the blocks behind the window were not revived
