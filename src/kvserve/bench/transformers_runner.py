"""Hugging Face `transformers` as a peer: `generate` with static batches and left padding.

The model gets the weights kvserve loaded, in kvserve's dtype:

- a Hugging Face directory: ``from_pretrained`` on the same directory;
- a ``.gguf`` file: kvserve's own GGUF reader dequantizes the same tensors into a
  model built from the same config (transformers' GGUF path needs `accelerate`);
- ``load_format="dummy"``: random weights of the same shapes (the values differ
  from kvserve's, which does not change the timing);
- ``--hf-model DIR`` overrides all of these.

Static batching is what `generate` offers: each batch of ``batch_size`` prompts
runs until its longest request is done, on padded inputs. Only the tokens each
request asked for are counted.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from kvserve.bench.runner import BatchRun, StreamTiming
from kvserve.bench.workload import Workload
from kvserve.engine.llm_engine import LLMEngine
from kvserve.models.gguf_loader import is_gguf, iter_gguf_tensors


def load_transformers_model(engine: LLMEngine, hf_model: str | None = None) -> tuple[Any, str]:
    """A transformers causal LM with the weights and dtype of ``engine``, and a line saying where they came from."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    dtype = engine.config.torch_dtype
    if hf_model is not None:
        model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=dtype)
        source = f"from_pretrained({hf_model!r})"
    elif engine.config.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(engine.hf_config, dtype=dtype)
        source = "random weights of the same shapes (kvserve ran load_format=dummy)"
    elif is_gguf(engine.model_path):
        model = AutoModelForCausalLM.from_config(engine.hf_config, dtype=dtype)
        _load_gguf_weights(model, engine.model_path, dtype)
        source = f"the same GGUF tensors, dequantized to {str(dtype).removeprefix('torch.')} by kvserve's loader"
    else:
        model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=dtype)
        source = f"from_pretrained({engine.model_path!r})"
    return model.eval(), source


def _load_gguf_weights(model: Any, path: str, dtype: torch.dtype) -> None:
    missing, unexpected = model.load_state_dict(dict(iter_gguf_tensors(path, dtype)), strict=False)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    really_missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if really_missing or unexpected:
        raise ValueError(f"GGUF {path}: tensors missing for transformers: {really_missing}; "
                         f"unexpected: {unexpected}")


class TransformersRunner:
    name = "transformers"

    def __init__(self, model: Any, batch_size: int, weights: str) -> None:
        if batch_size < 1:
            raise ValueError(f"hf_batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.weights = weights
        config = model.generation_config
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        # generate() fills unset values of a passed GenerationConfig from the model's
        # own, so EOS is switched off on the model's config: every request runs to its length.
        config.eos_token_id = None
        config.pad_token_id = self.pad_token_id

    def settings(self) -> dict[str, Any]:
        import transformers

        return {
            "version": transformers.__version__,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "batching": f"static batches of {self.batch_size}, left padding",
            "hf_batch_size": self.batch_size,
            "weights": self.weights,
        }

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, streamer: Any = None) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, streamer=streamer)
        new = out[:, width:]
        if new.shape[1] != max_new_tokens:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens instead of {max_new_tokens}")
        return new

    def generate(self, workload: Workload, progress: bool) -> BatchRun:
        requests = workload.requests
        outputs: list[list[int]] = []
        start = time.perf_counter()
        starts = range(0, len(requests), self.batch_size)
        for first in tqdm(starts, desc="transformers batches", unit="batch", disable=not progress, dynamic_ncols=True):
            batch = requests[first:first + self.batch_size]
            new = self._generate([r.prompt_token_ids for r in batch], max(r.output_len for r in batch))
            outputs.extend(new[row, :r.output_len].tolist() for row, r in enumerate(batch))
        return BatchRun(time.perf_counter() - start, outputs)

    def stream(self, prompt_token_ids: list[int], max_tokens: int) -> StreamTiming:
        streamer = _TimingStreamer()
        streamer.timing.start = time.perf_counter()
        self._generate([list(prompt_token_ids)], max_tokens, streamer)
        return streamer.timing


class _TimingStreamer:
    """A `generate` streamer that timestamps tokens. The first `put` is the prompt itself, not a token."""

    def __init__(self) -> None:
        self.timing = StreamTiming(start=0.0)
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self.timing.token_times.append(now)
            self.timing.token_ids.append(int(token))

    def end(self) -> None:
        pass
