"""Weights (and the KV cache) on 2 MB pages: moved, not changed, and advised where the kernel allows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvserve import LLM, huge_pages
from kvserve.engine.model_runner import kv_cache_tensor


def advised_bytes_of(t: torch.Tensor) -> tuple[int, int]:
    """(bytes of the whole 2 MB pages inside `t`'s memory, bytes of those that the process advised for huge
    pages: mappings whose VmFlags in /proc/self/smaps carry "hg"). Whether the kernel then finds free 2 MB
    pages (AnonHugePages) depends on the host's fragmentation at that moment; the advice is ours."""
    start = -(-t.data_ptr() // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // huge_pages.HUGE_PAGE * huge_pages.HUGE_PAGE
    advised, lo, hi = 0, 0, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
        elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            advised += max(0, min(hi, end) - max(lo, start))
    return max(0, end - start), advised


def test_placed_tensors_keep_their_values_and_sharing_and_start_on_cache_lines():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(100, 7, generator=gen).bfloat16()
    a, b = SimpleNamespace(w=shared), SimpleNamespace(w=shared)  # two holders of one tensor (a tied weight)
    c = SimpleNamespace(blocks=torch.randint(0, 256, (33, 34), dtype=torch.uint8, generator=gen))
    d = SimpleNamespace(w=torch.randn(5, generator=gen))
    before = [shared.clone(), c.blocks.clone(), d.w.clone()]
    moved = huge_pages.place_on_huge_pages([(a, "w"), (b, "w"), (c, "blocks"), (d, "w")])
    assert a.w is b.w and a.w.data_ptr() != shared.data_ptr()
    for got, want in zip([a.w, c.blocks, d.w], before):
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)
    assert a.w.data_ptr() % huge_pages.HUGE_PAGE == 0  # the first tensor starts the 2 MB-aligned arena
    assert all(t.data_ptr() % 64 == 0 for t in (a.w, c.blocks, d.w))
    assert moved == 1408 + 1152 + 64  # each rounded up to whole cache lines
    assert huge_pages.place_on_huge_pages([]) == 0


def test_placed_tensors_are_advised_for_2mb_pages():
    if not huge_pages.available():
        pytest.skip("no transparent huge pages here")
    holder = SimpleNamespace(w=torch.ones(48 << 20, dtype=torch.uint8))  # whole 2 MB pages to back
    huge_pages.place_on_huge_pages([(holder, "w")])
    assert bool(holder.w.eq(1).all())
    whole, advised = advised_bytes_of(holder.w)
    assert whole >= 46 << 20 and advised == whole


def test_a_cpu_model_keeps_every_weight_in_one_arena(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=8 << 20)
    if not huge_pages.available():
        pytest.skip("no transparent huge pages here: weights stay where they were loaded")
    model = llm.llm_engine.executor.worker.model
    storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
    assert len(storages) == 1
    out = llm.generate(["Hello, my name is"], use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) > 0


def test_kv_cache_memory_is_zeroed_and_advised_for_huge_pages():
    shape = (1024, 16, 16, 64)  # 64 MB of fp32: past glibc's largest mmap threshold (32 MB), so fresh memory
    cache = kv_cache_tensor(shape, torch.float32, torch.device("cpu"))
    assert cache.shape == shape and cache.is_contiguous() and not cache.any()
    if not huge_pages.available():
        pytest.skip("no transparent huge pages here")
    whole, advised = advised_bytes_of(cache)
    assert whole >= 62 << 20 and advised == whole  # every whole 2 MB page of the cache advised
