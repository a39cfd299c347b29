"""Verified accuracy: the fraction of points whose every margin lower bound is positive."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from cardkit.certify.crown import crown_margin_bounds
from cardkit.certify.ibp import _layers, ibp_margin_bounds
from cardkit.distributed import all_sum, owns
from cardkit.registry import Registry

BoundMethod = str  # a name of BOUNDS
MarginBound = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]
BOUNDS: Registry[MarginBound] = Registry("bound method")
"""Linf bound methods: `(model, x, y, eps) -> lower bounds of the margins y - j` (N x classes-1)."""


def _ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Interval bound propagation (Gowal et al. 2018)."""
    return ibp_margin_bounds(model, x, y, eps).lower


def _crown_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """CROWN back-substitution on IBP's intermediate bounds (Zhang et al. 2020)."""
    return crown_margin_bounds(model, x, y, eps, "ibp")


def _crown(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Full CROWN (Zhang et al. 2018): every layer's bounds by back-substitution."""
    return crown_margin_bounds(model, x, y, eps, "crown")


for _name, _bound in (("ibp", _ibp), ("crown_ibp", _crown_ibp), ("crown", _crown)):
    BOUNDS.register(_name, _bound)


_COEFFICIENT_BUDGET = 1 << 25  # floats held by CROWN's linear coefficients at once (128 MiB)


@dataclass(frozen=True)
class VerificationResult:
    split: str
    samples: int
    method: str
    norm: str
    eps: float
    clean_accuracy: float
    verified_accuracy: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        method: BoundMethod) -> torch.Tensor:
    return BOUNDS.lookup(method)(model, x, y, eps)


def verified_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      eps: float, method: BoundMethod = "crown", split: str = "test") -> VerificationResult:
    """Clean accuracy and Linf verified accuracy; only correctly classified points are bounded.
    The model is evaluated in eval mode and its mode restored afterwards. Under torchrun the
    batches go round-robin to the ranks and the counts are summed: every rank returns the total."""
    BOUNDS.canonical(method)  # an unknown method fails before any work
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    clean = verified = total = 0
    try:
        with torch.no_grad():
            for number, (x, y) in enumerate(batches):
                if not owns(number):
                    continue
                correct = model(x).argmax(1) == y
                clean += int(correct.sum())
                total += len(y)
                x, y = x[correct], y[correct]
                size = _chunk_size(model, x, method)
                for chunk in range(0, len(y), size):
                    part = slice(chunk, chunk + size)
                    lower = margin_lower_bounds(model, x[part], y[part], eps, method)
                    verified += int((lower > 0).all(1).sum())
    finally:
        model.train(was_training)
    clean, verified, total = (int(c) for c in all_sum(torch.tensor([clean, verified, total], dtype=torch.float64)))
    return VerificationResult(split=split, samples=total, method=method, norm="linf", eps=eps,
                              clean_accuracy=clean / max(total, 1),
                              verified_accuracy=verified / max(total, 1),
                              seconds=time.perf_counter() - start)


def _chunk_size(model: nn.Module, x: torch.Tensor, method: BoundMethod) -> int:
    """Samples per CROWN call, so that one neuron-by-input coefficient tensor fits the budget."""
    if method != "crown" or len(x) == 0:
        return max(len(x), 1)
    largest, out = 0, x[:1]
    for _, layer in _layers(model):
        out = layer(out)
        largest = max(largest, out[0].numel())
    return max(1, _COEFFICIENT_BUDGET // (largest * x[0].numel()))
