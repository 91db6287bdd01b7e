"""vLLM's `--generation-config`: the sampling defaults a model's creator put in its generation_config.json.

"auto" (the default, as in vLLM) reads the model's own file, "vllm" ignores it, and a
folder reads that folder's generation_config.json. The fields vLLM takes are taken:
temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
max_tokens). They are defaults only: whatever a request, `SamplingParams` or a command
line flag sets wins. A model without the file (a GGUF, most test models) has none.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from kvserve.sampling_params import SamplingParams

logger = logging.getLogger("kvserve")

# generation_config.json's name -> SamplingParams' name
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(setting: str, model_path: str) -> dict[str, Any]:
    """The SamplingParams keywords `setting` (auto, vllm or a folder) gives for the model at `model_path`."""
    if setting == "vllm":
        return {}
    folder = model_path if setting == "auto" else setting
    file = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(file):
        if setting == "auto":
            return {}
        raise ValueError(f"generation_config must be auto, vllm or a folder holding a generation_config.json, "
                         f"got {setting!r} (no {file})")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"generation_config: cannot read {file}: {exc}") from None
    defaults = {ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"generation_config: {file} holds a value kvserve cannot sample with: {exc}") from None
    if defaults:
        logger.info("sampling defaults from %s: %s (--generation-config vllm ignores them)", file,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults
