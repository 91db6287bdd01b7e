"""llama.cpp as a peer, through `llama-cpp-python` when it is importable.

kvserve does not depend on it: the comparison is skipped, with the reason
printed, when the package is missing or there is no GGUF of the same weights.
llama.cpp runs GGUF files only, so the weights come from ``--gguf FILE`` or, when
kvserve itself was given a ``.gguf``, from that file. A quantized GGUF (the
default model is Q4_1) would make llama.cpp compute at another precision than
kvserve, which dequantizes it to its dtype; so without ``--gguf``, when the
file's matrices are not stored in kvserve's dtype, llama.cpp gets the same file
dequantized to that dtype (`kvserve.bench.gguf_export`, written once and cached).
The report names the GGUF's tensor types and where it came from.

`llama-cpp-python`'s Python API runs one sequence at a time, so the throughput
workload runs its requests one after another; `llama-server` with parallel slots
is the peer ``llama-server`` (`kvserve.bench.llama_server_runner`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from kvserve.bench import gguf_export
from kvserve.bench.runner import BatchRun, StreamTiming
from kvserve.bench.workload import Workload
from kvserve.models.gguf_loader import is_gguf

INSTALL_HINT = "`pip install llama-cpp-python` builds it, compiling llama.cpp in a few minutes"


def llama_cpp_skip_reason(gguf_path: str | None, kvserve_model_path: str) -> str | None:
    """Why the llama.cpp comparison cannot run, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    return gguf_skip_reason(gguf_path, kvserve_model_path)


def gguf_skip_reason(gguf_path: str | None, kvserve_model_path: str) -> str | None:
    """Why there is no GGUF for a llama.cpp peer (``--gguf`` or kvserve's own model), or None when there is."""
    path = gguf_path or (kvserve_model_path if is_gguf(kvserve_model_path) else None)
    if path is None:
        return (f"kvserve ran {kvserve_model_path}, which is not a GGUF file, and no --gguf was given; "
                "make one of the same weights with llama.cpp's convert_hf_to_gguf.py --outtype f32|bf16")
    if not os.path.isfile(path):
        return f"GGUF file {path} does not exist"
    if not is_gguf(path):
        return f"{path} is not a GGUF file"
    return None


def gguf_tensor_types(path: str) -> str:
    """The quantization types of a GGUF's matrices, most common first: ``Q4_1 ×210, Q8_0 ×1``."""
    return _describe(gguf_export.matrix_types(path))


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in counts.most_common())


@dataclass(frozen=True)
class PeerGguf:
    """The GGUF a llama.cpp peer runs, and, when kvserve made it, how."""

    path: str
    source: str | None = None


def peer_gguf(gguf_path: str | None, kvserve_model_path: str, dtype: Any) -> PeerGguf:
    """The GGUF for llama.cpp at kvserve's precision; prints what it did when it exported one.

    ``--gguf`` is used as given. Otherwise kvserve's own GGUF, when its matrices are
    stored in kvserve's ``dtype``; when they are not (a quantized file), that file
    dequantized to ``dtype`` (exported once into the kvserve cache, then reused).
    """
    if gguf_path is not None:
        return PeerGguf(gguf_path)
    types = gguf_export.matrix_types(kvserve_model_path)
    try:
        target = gguf_export.export_type(dtype).name
    except ValueError as exc:
        print(f"llama.cpp runs {kvserve_model_path} as it is ({_describe(types)}): {exc}")
        return PeerGguf(kvserve_model_path)
    if set(types) == {target}:
        return PeerGguf(kvserve_model_path)
    started = time.perf_counter()
    path, created = gguf_export.exported_gguf(kvserve_model_path, dtype)
    done = f"wrote it in {time.perf_counter() - started:.0f} s" if created else "cached"
    print(f"llama.cpp: {kvserve_model_path} stores its matrices as {_describe(types)} and kvserve runs "
          f"{gguf_export.export_type(dtype).name}; llama.cpp runs the same tensors dequantized to {target}: "
          f"{path} ({done})")
    return PeerGguf(path, f"{kvserve_model_path} ({_describe(types)}) dequantized to {target} "
                          f"by kvserve.bench.gguf_export")


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, llama: Any, gguf_path: str, tensor_types: str, version: str,
                 gguf_source: str | None = None) -> None:
        self.llama = llama
        self.gguf_path = gguf_path
        self.tensor_types = tensor_types
        self.version = version
        self.gguf_source = gguf_source

    @classmethod
    def load(cls, gguf_path: str, context_len: int, num_threads: int,
             gguf_source: str | None = None) -> LlamaCppRunner:
        import llama_cpp

        llama = llama_cpp.Llama(model_path=gguf_path, n_ctx=context_len, n_threads=num_threads,
                                n_threads_batch=num_threads, verbose=False)
        return cls(llama, gguf_path, gguf_tensor_types(gguf_path), getattr(llama_cpp, "__version__", "unknown"),
                   gguf_source)

    def settings(self) -> dict[str, Any]:
        settings = {
            "version": f"llama-cpp-python {self.version}",
            "gguf": self.gguf_path,
            "gguf_tensor_types": self.tensor_types,
            "batching": "one request at a time (llama-cpp-python's API has no parallel sequences)",
        }
        if self.gguf_source is not None:
            settings["gguf_source"] = self.gguf_source
        return settings

    def _tokens(self, prompt_token_ids: list[int], max_tokens: int, timing: StreamTiming) -> StreamTiming:
        # generate() never stops on EOS by itself: it yields greedy tokens until we stop asking.
        for token in self.llama.generate(list(prompt_token_ids), temp=0.0, repeat_penalty=1.0, reset=True):
            timing.token_times.append(time.perf_counter())
            timing.token_ids.append(int(token))
            if len(timing.token_ids) == max_tokens:
                break
        return timing

    def generate(self, workload: Workload, progress: bool) -> BatchRun:
        outputs = []
        start = time.perf_counter()
        for request in tqdm(workload.requests, desc="llama.cpp requests", unit="req", disable=not progress,
                            dynamic_ncols=True):
            timing = self._tokens(request.prompt_token_ids, request.output_len, StreamTiming(time.perf_counter()))
            outputs.append(timing.token_ids)
        return BatchRun(time.perf_counter() - start, outputs)

    def stream(self, prompt_token_ids: list[int], max_tokens: int) -> StreamTiming:
        return self._tokens(prompt_token_ids, max_tokens, StreamTiming(time.perf_counter()))
