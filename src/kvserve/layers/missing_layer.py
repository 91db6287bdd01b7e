"""MissingLayer: the place of a module another pipeline stage holds (vLLM's PPMissingLayer).

A stage builds the whole model's module tree with its own layers filled in and the others
empty, so that parameter names keep the checkpoint's numbering and the loader can tell a
tensor of another stage (skipped) from one the model does not know (warned about).
"""

from __future__ import annotations

from torch import nn


class MissingLayer(nn.Module):
    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("this module lives on another pipeline stage")
