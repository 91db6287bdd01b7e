"""Tensor and pipeline parallel: the same greedy tokens as one rank (and so as transformers), on every
executor, with every scheduling feature on; ranks that die end the engine instead of hanging it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from kvserve.distributed.parallel_state import kv_head_start, kv_heads_per_rank, partition_layers, rank_layout
from kvserve.engine.llm_engine import EngineDeadError
from oracle import PROMPT_LENGTHS, assert_greedy_matches, hf_greedy, kvserve_greedy, random_prompts

NEW_TOKENS = 24
PROMPTS = random_prompts(PROMPT_LENGTHS)
STEP_TIMEOUT = 300  # seconds any one multi-process test may take (a first run may build the C++ kernels)


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dirs):
    cache = {}

    def get(name: str) -> list:
        if name not in cache:
            cache[name] = hf_greedy(tiny_model_dirs[name], PROMPTS, NEW_TOKENS)
        return cache[name]

    return get


@contextmanager
def parallel_llm(model: Path | str, **kwargs):
    llm = LLM(str(model), dtype="float32", **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.shutdown()


# ---- the split itself (no processes) ------------------------------------------------------------------

def test_layer_partition_and_kv_head_sharing() -> None:
    assert partition_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert partition_layers(4, 2, [1, 3]) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="pp_layer_partition must be 2 positive layer counts summing to 4"):
        partition_layers(4, 2, [2, 3])
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\) must be <= the number of layers \(2\)"):
        partition_layers(2, 3)
    assert kv_heads_per_rank(9, 3, 3) == (3, 1)
    assert kv_heads_per_rank(4, 1, 2) == (2, 1)  # fewer KV heads than ranks: replicated
    assert [kv_head_start(2, r, 4) for r in range(4)] == [0, 0, 1, 1]  # ranks 0-1 use head 0, ranks 2-3 head 1
    assert [kv_head_start(8, r, 4) for r in range(4)] == [0, 2, 4, 6]
    layout = rank_layout(4, 2, 2)
    assert [(c.tp_rank, c.pp_rank, c.prev_rank, c.next_rank) for c in layout] == [
        (0, 0, None, 2), (1, 0, None, 3), (0, 1, 0, None), (1, 1, 1, None)]
    assert [c.is_output_rank for c in layout] == [False, False, True, False]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=2), r"attention heads \(7\) must be divisible by tensor_parallel_size \(2\)"),
    (dict(tensor_parallel_size=3), r"attention heads \(7\) must be divisible by tensor_parallel_size \(3\)"),
    (dict(pipeline_parallel_size=3), r"pipeline_parallel_size \(3\) must be <= the number of layers \(2\)"),
    (dict(pipeline_parallel_size=2, pp_layer_partition=[2, 1]), "pp_layer_partition must be 2 positive"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer in"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "'uni' runs one rank"),
    (dict(distributed_executor_backend="ray"), "distributed_executor_backend must be one of"),
])
def test_bad_splits_are_refused_before_any_process_starts(tiny_llama: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 22, **kwargs)


def test_external_launcher_needs_torchrun(tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="runs under torchrun"):
        LLM(str(tiny_model_dirs["qwen2"]), dtype="float32", kv_cache_memory_bytes=1 << 22, tensor_parallel_size=2,
            distributed_executor_backend="external_launcher")


# ---- equality with one rank and with transformers ----------------------------------------------------

FEATURES = dict(block_size=4, max_num_batched_tokens=24, enable_prefix_caching=True)
BLOCKS = 80  # per scheduler: a pipeline of pp stages has pp virtual engines, each scheduling 80 of the blocks


@pytest.mark.parametrize("name, tp, pp", [
    ("qwen2", 2, 1),  # 1 KV head on 2 ranks: replicated; q/k/v biases
    ("gpt2", 2, 1),  # fused c_attn split by heads, tied vocabulary-parallel head
    ("qwen3", 2, 1),  # q/k norms, head_dim 64 != hidden / heads
    ("llama-gqa7-tied", 1, 2),  # tied head on the last stage, loaded from the embedding's tensor
    ("gpt2", 1, 2),
    ("llama-mha-hd80", 2, 2),  # 4 ranks: tp groups inside each stage
])
def test_parallel_greedy_matches_transformers_with_every_feature(name, tp, pp, tiny_model_dirs, hf_reference) -> None:
    """Chunked prefill (24-token budget), prefix caching (the repeated prompts hit) and preemption (80 blocks per scheduler
    of 4 tokens do not hold every sequence) all on, as in the single-rank equality suite; pipelines with their
    micro-batches (virtual engines) in flight together."""
    with parallel_llm(tiny_model_dirs[name], tensor_parallel_size=tp, pipeline_parallel_size=pp,
                      num_gpu_blocks_override=BLOCKS * pp, **FEATURES) as llm:
        engine = llm.llm_engine
        ours = kvserve_greedy(llm, PROMPTS + PROMPTS[-3:], NEW_TOKENS)
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        ref = hf_reference(name)
        assert assert_greedy_matches(ours, ref + ref[-3:]) >= len(ours) - 1
        assert stats.num_free_blocks == BLOCKS * pp
        engine.step()  # an empty step carries the last finished ids to the ranks
        assert all(info.num_sequences == 0 for info in engine.rank_infos())  # every rank forgot them


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-mha-hd80", "llama-headdim-llama3rope", "llama-linear-rope", "mistral"])
def test_tensor_parallel_other_architectures(name, tiny_model_dirs, hf_reference) -> None:
    with parallel_llm(tiny_model_dirs[name], tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22) as llm:
        assert_greedy_matches(kvserve_greedy(llm, PROMPTS, NEW_TOKENS), hf_reference(name))


def test_seeded_sampling_is_the_same_on_two_ranks(tiny_model_dirs) -> None:
    model = tiny_model_dirs["qwen3"]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=16, ignore_eos=True) for s in range(4)]
    one = LLM(str(model), dtype="float32", kv_cache_memory_bytes=1 << 22)
    expected = [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=PROMPTS[:4], sampling_params=params, use_tqdm=False)]
    with parallel_llm(model, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:4], sampling_params=params, use_tqdm=False)]
        assert got == expected
        engine = llm.llm_engine  # an abort frees the blocks, and every rank forgets the request
        free = engine.stats().num_free_blocks
        engine.add_request("aborted", PROMPTS[6], SamplingParams(max_tokens=100))
        engine.step()
        engine.step()
        engine.abort_request("aborted")
        engine.step()
        assert engine.stats().num_free_blocks == free
        assert [info.num_sequences for info in engine.rank_infos()] == [0, 0]


def test_each_rank_holds_its_share_of_weights_and_kv(tiny_model_dirs) -> None:
    """Per rank: the decoder's weights / tp (embedding and head split by vocabulary, norms replicated), and a
    KV cache of its heads only, exactly what the engine's arithmetic said (part 6 of the issue)."""
    model = tiny_model_dirs["llama-mha-hd80"]  # 2 heads, 2 KV heads, hidden 160, untied head
    one = LLM(str(model), dtype="float32", num_gpu_blocks_override=64)
    whole = one.llm_engine.executor.info()
    with parallel_llm(model, tensor_parallel_size=2, num_gpu_blocks_override=64) as llm:
        engine = llm.llm_engine
        infos = engine.rank_infos()
        per_rank_kv = 64 * engine.config.block_size * engine.kv_bytes_per_token()
        assert [info.kv_cache_bytes for info in infos] == [per_rank_kv] * 2 == [whole.kv_cache_bytes // 2] * 2
        norms = 2 * 2 * 160 + 160  # two RMSNorm weights per layer and the final one, on both ranks
        assert sum(info.num_parameters for info in infos) == whole.num_parameters + norms


# ---- executors ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate_command(model: Path, *extra: str) -> list[str]:
    return ["-m", "kvserve.entrypoints.cli", "generate", "A B C D E F", "--model", str(model), "--dtype", "float32",
            "--kv-cache-memory-bytes", str(1 << 22), "--max-tokens", "12", "--temperature", "0", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def test_external_launcher_under_torchrun_matches_one_rank(tiny_model_dirs) -> None:
    model = tiny_model_dirs["qwen2"]
    one = subprocess.run([sys.executable, *_generate_command(model)], capture_output=True, text=True, timeout=STEP_TIMEOUT, env=_env())
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # it picks a free port
    two = subprocess.run([*torchrun, *_generate_command(model, "-tp", "2", "--distributed-executor-backend", "external_launcher")],
                         capture_output=True, text=True, timeout=STEP_TIMEOUT, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout, (one.stdout, two.stdout, two.stderr[-3000:])  # rank 0 alone printed, the same text


def test_two_torchrun_nodes_on_loopback(tiny_model_dirs) -> None:
    """Two launchers, one rank each, meeting at a c10d rendezvous: pipeline stages on two 'machines'."""
    model = tiny_model_dirs["llama-mha-hd80"]
    one = subprocess.run([sys.executable, *_generate_command(model)], capture_output=True, text=True, timeout=STEP_TIMEOUT, env=_env())
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "kvserve-test",
             *_generate_command(model, "-pp", "2", "--distributed-executor-backend", "external_launcher")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )
        for rank in range(2)
    ]
    try:
        results = [node.communicate(timeout=STEP_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    texts = [out for out, _ in results if out.strip()]
    assert texts == [one.stdout], (one.stdout, results)


def test_a_killed_rank_ends_the_engine_without_hanging(tiny_model_dirs) -> None:
    with parallel_llm(tiny_model_dirs["qwen2"], tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22) as llm:
        engine = llm.llm_engine
        engine.add_request("r", PROMPTS[5], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        os.kill(engine.executor.processes[1].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="a rank of the model is gone"):
            for _ in range(100):
                engine.step()
        assert time.monotonic() - started < 30


# ---- data parallel ------------------------------------------------------------------------------------

def test_data_parallel_routes_by_prefix_and_spreads_load(tiny_model_dirs, hf_reference) -> None:
    with parallel_llm(tiny_model_dirs["qwen2"], data_parallel_size=2, kv_cache_memory_bytes=1 << 22) as llm:
        engine = llm.llm_engine
        assert assert_greedy_matches(kvserve_greedy(llm, PROMPTS, NEW_TOKENS), hf_reference("qwen2")) >= len(PROMPTS) - 1
        # four requests at once: two per replica
        for i in range(4):
            engine.add_request(f"spread-{i}", PROMPTS[4 + i % 4][:30] + [i + 2], SamplingParams(max_tokens=4))
        assert sorted(engine.replica_of.values()) == [0, 0, 1, 1]
        while engine.has_unfinished_requests():
            engine.step()
        # a long prefix served by replica 0; replica 0 then busy, so least-loaded routing would pick 1;
        # the router sends the next request with that prefix to replica 0 anyway, where it hits the cache
        shared = PROMPTS[-1][:96]
        llm.generate(prompt_token_ids=[shared + [7]], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
        owner = engine.router.route(shared + [9], [0, 0])
        engine.add_request("busy", PROMPTS[3], SamplingParams(max_tokens=200, ignore_eos=True))
        assert engine.replica_of["busy"] == owner
        hits_before = engine.stats().replicas[owner].prefix_cache_hits
        engine.add_request("again", shared + [8], SamplingParams(max_tokens=2))
        assert engine.replica_of["again"] == owner
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats().replicas[owner].prefix_cache_hits - hits_before >= 80
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks == sum(r.num_blocks for r in stats.replicas)


# ---- the server -----------------------------------------------------------------------------------------

def _worker_pids(server_pid: int) -> list[int]:
    """The spawned rank processes of a server (its children running multiprocessing's spawn main, not the resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    pids = []
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            pids.append(int(pid))
    return pids


def test_server_with_two_ranks_serves_aborts_and_dies_cleanly(tiny_model_dirs, tmp_path) -> None:
    import httpx
    import openai

    from server_utils import ServeProcess

    model = tiny_model_dirs["qwen2"]
    server = ServeProcess(["--model", str(model), "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 22),
                           "--tensor-parallel-size", "2"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)
        one = LLM(str(model), dtype="float32", kv_cache_memory_bytes=1 << 22)
        expected = one.generate(["A B C D"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        got = client.completions.create(model=client.models.list().data[0].id, prompt="A B C D", max_tokens=10,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected[0].outputs[0].text
        # a client that goes away mid-stream: the request is aborted and its blocks come back
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "A", "max_tokens": 400, "ignore_eos": True, "stream": True}) as response:
            next(response.iter_lines())
        server.wait_idle()
        pids = _worker_pids(server.pid)
        assert len(pids) == 2
        os.kill(pids[1], signal.SIGKILL)
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "A", "max_tokens": 5}, timeout=60)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
        assert server.proc.wait(30) == 1
    finally:
        server.stop()


# ---- real checkpoints ------------------------------------------------------------------------------------

def test_stories260k_on_two_ranks_matches_transformers(stories_dir) -> None:
    prompts = random_prompts([5, 40, 100], vocab=512, seed=3)
    with parallel_llm(stories_dir, tensor_parallel_size=2, kv_cache_memory_bytes=8 << 20, block_size=4,
                      max_num_batched_tokens=32) as llm:
        ours = kvserve_greedy(llm, prompts, 32)
    assert assert_greedy_matches(ours, hf_greedy(stories_dir, prompts, 32)) >= len(prompts) - 1


def test_smollm2_on_three_ranks_matches_one(smollm2_hf_dir) -> None:
    """9 heads and 3 KV heads: 3 and 1 per rank; the tied 49,152-token head split by vocabulary."""
    prompts = random_prompts([6, 30], vocab=49152, seed=4)
    one = LLM(str(smollm2_hf_dir), dtype="float32", kv_cache_memory_bytes=16 << 20)
    expected = kvserve_greedy(one, prompts, 12)
    del one
    with parallel_llm(smollm2_hf_dir, tensor_parallel_size=3, kv_cache_memory_bytes=16 << 20) as llm:
        got = kvserve_greedy(llm, prompts, 12)
    assert assert_greedy_matches(got, expected) == len(prompts)


def test_attention_sinks_on_two_ranks_match_one(tiny_model_dirs) -> None:
    """StreamingLLM (a 32-token window, 4 sinks) 150 tokens on: each rank's heads slide the same way."""
    model = tiny_model_dirs["qwen3"]
    kwargs = dict(kv_cache_memory_bytes=1 << 22, sliding_window=32, attention_sinks=4)
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    one = LLM(str(model), dtype="float32", **kwargs)
    expected = [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=PROMPTS[2:4], sampling_params=params, use_tqdm=False)]
    with parallel_llm(model, tensor_parallel_size=2, **kwargs) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[2:4], sampling_params=params, use_tqdm=False)]
    assert got == expected
