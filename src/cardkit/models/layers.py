"""The layers that hold a model's weights: every Conv2d and Linear. Pruning masks or factorizes
them, compression stores them, and both find them here."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from torch import nn

LayerFilter = Callable[[str, nn.Module], bool]
"""Picks layers by (module name, module): e.g. `lambda name, m: not name.startswith("head")`."""


def prunable_layers(model: nn.Module, layers: Optional[LayerFilter] = None) -> Iterator[tuple[str, nn.Module]]:
    """Every Conv2d and Linear (masked or not), in module order; with `layers`, those it accepts."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and (layers is None or layers(name, module)):
            yield name, module
