"""The model an estimate is about, as the user names it: a directory, a ``config.json`` or a preset."""

from __future__ import annotations

from pathlib import Path

from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.presets import get_preset


def load_model_shape(
    *, model: str | Path | None = None, config: str | Path | None = None,
    preset: str | None = None,
) -> ModelShape:
    """Resolve exactly one of a model directory, a config.json path or a preset name."""
    given = [(k, v) for k, v in (("model", model), ("config", config), ("preset", preset))
             if v is not None]
    if len(given) != 1:
        raise ValueError(
            "model/config/preset: give exactly one of model (a directory), "
            f"config (a config.json path) or preset (a name); got {len(given)}"
        )
    if model is not None:
        return ModelShape.from_model_dir(model)
    if config is not None:
        return ModelShape.from_config_file(config)
    return get_preset(str(preset))
