"""Speculative decoding with a draft model: a smaller model proposes, the target verifies, the output is the target's.

The drafts here are the tiny targets cut to their first layer (or the target itself, which is always right
when greedy): greedy output is identical token for token on every tiny architecture with chunked prefill,
preemption and prefix caching at work; the rejection rule gives the target's distribution (checked on the rule
itself over many rows, and end to end against transformers by chi-square); the draft's KV blocks are the
target's, so none leaks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import SMOLLM2_GGUF, TINY_MODELS
from kvserve import LLM, SamplingParams
from spec_decode_utils import PROMPTS, assert_pairs_fit, assert_pool_back, exact_pairs, generate
from kvserve.config import EngineConfig
from kvserve.layers.rejection_sampler import rejection_sample
from kvserve.spec_decode.config import SpeculativeConfig



def truncated_draft(target: Path, directory: Path, num_layers: int = 1) -> Path:
    """The target's first `num_layers` layers with its embedding, final norm and head: a draft sharing its tokenizer."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True)
    config = json.loads((target / "config.json").read_text())
    config["n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"] = num_layers
    for key in ("layer_types", "sliding_window_layers"):  # per-layer lists, cut to the layers kept
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(target / "model.safetensors")
    layer = re.compile(r"\.(?:layers|h)\.(\d+)\.")
    save_file({k: v for k, v in weights.items() if not (m := layer.search(k)) or int(m.group(1)) < num_layers},
              directory / "model.safetensors", metadata={"format": "pt"})
    for f in target.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, directory / f.name)
    return directory


def noisy_draft(target: Path, directory: Path, noise: float = 0.1) -> Path:
    """The target with noise added to its matrices (a relative `noise` of their spread): a draft of the same
    shape that agrees with the target often, not always, on every architecture (a random one-layer cut of a
    random two-layer model may agree on nothing)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(target, directory)
    gen = torch.Generator().manual_seed(1)
    weights = load_file(target / "model.safetensors")
    for name, w in weights.items():
        if w.dim() == 2:
            weights[name] = w + noise * w.std() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="session")
def drafts(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """A one-layer cut of each tiny model (a draft with a smaller cache than the target's)."""
    root = tmp_path_factory.mktemp("drafts")
    return {name: truncated_draft(path, root / name) for name, path in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def noisy_drafts(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("noisy-drafts")
    return {name: noisy_draft(path, root / name) for name, path in tiny_model_dirs.items()}


def _spec(draft: Path, **kwargs) -> dict:
    # max_batch_size 8: these tests batch their prompts (the default, 1, speculates for single streams only)
    return {"model": str(draft), "num_speculative_tokens": 3, "max_batch_size": 8, **kwargs}




# ---- the rejection rule ---------------------------------------------------------------------------


def test_rejection_rule_gives_the_target_distribution():
    """200,000 rows over a vocabulary of 6: proposals drawn from q, judged against p, land on p (chi-square),
    for a q that misses some of p's tokens and puts mass where p has none."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    q = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    rows = 200_000
    draft = torch.multinomial(q, rows, replacement=True, generator=gen)
    exponentials = torch.empty(rows, 6).exponential_(generator=gen)
    uniforms = torch.rand(rows, generator=gen)
    tokens = rejection_sample(p.expand(rows, 6), exponentials, draft, q.expand(rows, 6), uniforms)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[4:].sum() == 0
    expected = p[:4].double() * rows
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom
    accepted = (tokens == draft).double().mean()
    assert accepted == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.01)  # the acceptance rate sum min(p, q)


# ---- the config -----------------------------------------------------------------------------------


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="needs ../shared/models")
def test_a_gguf_cut_to_its_first_layers_is_a_draft(tmp_path):
    """kvserve.bench.gguf_truncate keeps the first layers' blocks byte for byte and says so in block_count."""
    from gguf import GGUFReader

    from kvserve.bench.gguf_truncate import truncate_gguf

    cut = truncate_gguf(str(SMOLLM2_GGUF), str(tmp_path / "draft.gguf"), 2)
    source, draft = GGUFReader(str(SMOLLM2_GGUF)), GGUFReader(cut)
    assert int(draft.fields["llama.block_count"].parts[-1][0]) == 2
    kept = {t.name: t for t in source.tensors if not t.name.startswith("blk.") or t.name.split(".")[1] in ("0", "1")}
    assert sorted(t.name for t in draft.tensors) == sorted(kept)
    assert all(bytes(t.data) == bytes(kept[t.name].data) and t.tensor_type == kept[t.name].tensor_type for t in draft.tensors)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
        truncate_gguf(str(SMOLLM2_GGUF), str(tmp_path / "x.gguf"), 31)


def test_config_takes_vllm_draft_model_json(drafts, tiny_llama):
    config = SpeculativeConfig.parse({"model": "some/draft", "num_speculative_tokens": 4})
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "some/draft", 4)
    with pytest.raises(ValueError, match="speculative_config.model must be a model path when method is draft_model"):
        SpeculativeConfig.parse({"method": "draft_model"})
    with pytest.raises(ValueError, match="speculative_config.model .* unset for ngram"):
        SpeculativeConfig.parse({"method": "ngram", "model": "x"})
    with pytest.raises(ValueError, match="draft model.* runs on one rank"):
        EngineConfig(speculative_config={"model": "x"}, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="must use the target's tokenizer"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 22, speculative_config=_spec(SMOLLM2_GGUF))


def test_draft_cache_takes_its_share_of_the_blocks(drafts, tiny_llama):
    """Blocks hold the target's and the draft's KV: the same bytes hold fewer blocks than without a draft."""
    base = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 22)
    spec = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 22, speculative_config=_spec(drafts["llama-gqa7-tied"]))
    target_bytes, both = base.llm_engine.kv_bytes_per_token(), spec.llm_engine.kv_bytes_per_token()
    assert both == target_bytes * 3 // 2  # the draft has one of the target's two layers
    assert spec.llm_engine.stats().num_blocks == base.llm_engine.stats().num_blocks * target_bytes // both
    runner = spec.llm_engine.executor.worker.runner
    assert len(runner.drafter.kv_caches) == 1 and runner.drafter.kv_caches[0].key.shape == runner.kv_caches[0].key.shape


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_greedy_identical_on_every_architecture(arch, tiny_model_dirs, noisy_drafts):
    """Chunks of 32 tokens (a prompt spans steps), a pool of 12 blocks for 4 sequences of ~70 tokens
    (preemptions), and shared prompts (prefix-cache hits); the draft is the target with noise, so proposals
    are accepted and rejected."""
    prompts = PROMPTS + [PROMPTS[0] + [1, 2]]
    common = dict(dtype="float32", kv_cache_memory_bytes=1 << 23, max_num_batched_tokens=32, num_gpu_blocks_override=12)
    base = LLM(str(tiny_model_dirs[arch]), **common)
    spec = LLM(str(tiny_model_dirs[arch]), speculative_config=_spec(noisy_drafts[arch]), **common)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = generate(base, params, prompts)
    got = generate(spec, params, prompts)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert_pool_back(spec)


@pytest.mark.parametrize("max_batch_size", [2, 8])
def test_a_draft_that_is_always_right_stays_right(tiny_llama, max_batch_size):
    """The target as its own draft accepts every greedy proposal if and only if the draft's KV cache is right at
    every step: through chunked prefill, preemptions of speculating sequences (max_batch_size 8: a resumed
    sequence's draft KV is recomputed where its blocks changed), prefix-cache hits (never trusted: the draft
    recomputes them) and steps without speculation (max_batch_size 2 with 5 sequences: the draft catches up
    once the batch has shrunk). Logprobs and penalties are the target's own."""
    prompts = PROMPTS + [PROMPTS[0] + [1, 2]]
    common = dict(dtype="float32", kv_cache_memory_bytes=1 << 23, max_num_batched_tokens=32, num_gpu_blocks_override=12)
    base = LLM(str(tiny_llama), **common)
    spec = LLM(str(tiny_llama), speculative_config=_spec(tiny_llama, max_batch_size=max_batch_size), **common)
    drafted = []
    forward = spec.llm_engine.executor.worker.runner.drafter.model.forward
    spec.llm_engine.executor.worker.runner.drafter.model.forward = lambda *a, **k: drafted.append(len(a[0])) or forward(*a, **k)
    for extra in (dict(logprobs=3), dict(repetition_penalty=1.3, presence_penalty=0.4)):
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, **extra) for m in (24, 32, 40, 48, 56)]
        expected, got = base.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False), \
            spec.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for e, g in zip(expected, got):
            assert g.outputs[0].token_ids == e.outputs[0].token_ids
            assert g.outputs[0].cumulative_logprob == pytest.approx(e.outputs[0].cumulative_logprob, abs=1e-3)
            if e.outputs[0].logprobs is not None:
                assert [sorted(entry) for entry in g.outputs[0].logprobs] == [sorted(entry) for entry in e.outputs[0].logprobs]
    stats = spec.llm_engine.stats()
    assert stats.spec_decode.num_accepted_tokens == stats.spec_decode.num_draft_tokens > 0
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert max(drafted) > 16  # a catch-up over many tokens (after a prefill, or steps without speculation)
    # a pass per proposal at most: none in the steps without speculation (there are many with max_batch_size 2)
    assert len(drafted) <= stats.spec_decode.num_draft_tokens
    assert_pool_back(spec)


def test_stops_max_tokens_and_seeds(tiny_llama, drafts):
    """Stops inside an accepted run end the output where plain decoding does; a seeded sampled request gives
    the same tokens every time (its draws, the draft's included, come from its own generator), and n > 1
    outputs speculate on their own."""
    common = dict(dtype="float32", kv_cache_memory_bytes=1 << 23)
    base = LLM(str(tiny_llama), **common)
    spec = LLM(str(tiny_llama), speculative_config=_spec(drafts["llama-gqa7-tied"]), **common)
    free = generate(base, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stop_token, stop_text = free[0].outputs[0].token_ids[17], free[0].outputs[0].text[40:43]
    for params in (SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_token]),
                   SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_text], ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)):
        for e, g in zip(generate(base, params), generate(spec, params)):
            eo, go = e.outputs[0], g.outputs[0]
            assert (go.token_ids, go.text, go.finish_reason, go.stop_reason) == (eo.token_ids, eo.text, eo.finish_reason, eo.stop_reason)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, n=2, max_tokens=25, ignore_eos=True, frequency_penalty=0.3)
    first, second = generate(spec, seeded), generate(spec, seeded)
    assert [[o.token_ids for o in r.outputs] for r in first] == [[o.token_ids for o in r.outputs] for r in second]
    assert all(len(o.token_ids) == 25 for r in first for o in r.outputs)
    stats = spec.llm_engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_pool_back(spec)


def test_sampled_tokens_have_the_target_distribution(tiny_llama, drafts):
    """Unseeded sampling (top_k 4) 1,200 times, max_tokens 3: the second token is always verified against the
    one-layer draft's proposal (the draft's top 4 differ from the target's, so there are rejections and
    resamples). The pairs' counts fit the exact distribution from transformers (chi-square, p > 0.001)."""
    prompt = torch.randperm(512, generator=torch.Generator().manual_seed(0)).tolist()[:480]
    expected = exact_pairs(tiny_llama, prompt)
    spec = LLM(str(tiny_llama), dtype="float32", max_num_seqs=400, kv_cache_memory_bytes=1 << 25,
               speculative_config=_spec(drafts["llama-gqa7-tied"], max_batch_size=1024, min_acceptance_rate=0.0))
    n = 1200
    outs = spec.generate([{"prompt_token_ids": prompt}] * n, SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True),
                         use_tqdm=False)
    stats = spec.llm_engine.stats().spec_decode
    assert stats.num_drafts >= n * 0.99 and 0.1 < stats.acceptance_rate < 0.9
    assert_pairs_fit(outs, expected)
    assert_pool_back(spec)


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="needs ../shared/models")
def test_default_model_with_its_own_blocks_as_draft():
    """The default model dequantized to fp32, with its own Q4_1 blocks (int8 activations) as the draft: most
    proposals are accepted, not all, and greedy output equals the same engine without proposals."""
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    messages = [[{"role": "user", "content": "Repeat this code exactly:\n\n" + text}],
                [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]]
    params = SamplingParams(temperature=0.0, max_tokens=60)
    spec = LLM(dtype="float32", quantization="none", kv_cache_memory_bytes=1 << 26,
               speculative_config=_spec(SMOLLM2_GGUF, quantization="auto"))
    got = [o.outputs[0].token_ids for o in spec.chat(messages, params, use_tqdm=False)]
    stats = spec.llm_engine.stats().spec_decode
    assert 0.5 < stats.acceptance_rate < 1
    spec.llm_engine.scheduler.speculator = None  # the same engine without proposals (one load, not two)
    assert [o.outputs[0].token_ids for o in spec.chat(messages, params, use_tqdm=False)] == got
    assert_pool_back(spec)


def test_a_request_failing_mid_step_ends_alone_and_the_others_draw_the_same(tiny_llama, monkeypatch):
    """A request whose verification raises (after the draft drew proposals for every sequence in the step)
    ends alone; the others, seeded ones included, give the tokens they give without it: the probes that found
    it rewound every generator to where it stood before the draft drew."""
    from kvserve.layers.sampler import Sampler

    poison_seed = 666
    spec = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 23,
               speculative_config=_spec(tiny_llama, max_batch_size=16))
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=None if i % 2 else 10 + i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    clean = spec.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sample = Sampler.__call__

    def poisoned(self, logits, inputs):
        if inputs.draft_rows and any(p.seed == poison_seed for p in inputs.params):  # the target verifying proposals
            raise RuntimeError("this row cannot be sampled")
        return sample(self, logits, inputs)

    monkeypatch.setattr(Sampler, "__call__", poisoned)
    poison = SamplingParams(temperature=1.0, seed=poison_seed, max_tokens=12, ignore_eos=True)
    outs = spec.generate([{"prompt_token_ids": p} for p in prompts[:3] + [[3, 4, 5, 3, 4]] + prompts[3:]],
                         params[:3] + [poison] + params[3:], use_tqdm=False)
    failed = outs.pop(3)
    assert failed.error is not None and "this row cannot be sampled" in failed.error
    assert [o.error for o in outs] == [None] * len(outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in clean]
    assert spec.llm_engine.stats().spec_decode.num_accepted_tokens > 0
    assert_pool_back(spec)
