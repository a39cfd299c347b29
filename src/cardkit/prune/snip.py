"""SNIP (Lee et al., ICLR 2019): single-shot pruning by connection sensitivity.

A weight's saliency is |dL/dw x w|, the first-order change of the loss when the weight is removed,
at the dense weights before any training under the mask. L is the prune stage's objective (plain
cross-entropy, or the PGD-AT loss for robust SNIP) averaged over `batches` training batches. The
`sparsity` fraction of the least salient weights is removed at once, per layer or globally; the
weights then train under the fixed mask (the finetune stage).
"""

from __future__ import annotations

import itertools
from typing import Literal, Optional

import torch
from pydantic import PositiveInt
from torch import nn

from cardkit.errors import CardkitError
from cardkit.prune.masked import MaskedLayer
from cardkit.prune.methods import (PruneContext, PruneSetup, SparsityConfig, frozen_group, register_method,
                                   set_masks)


class SnipConfig(SparsityConfig):
    """SNIP (Lee et al. 2019): one-shot masks at the connection sensitivity |dL/dw x w| of the
    stage's loss on a few training batches (robust SNIP under PGD-AT)."""

    name: Literal["snip"] = "snip"
    batches: PositiveInt = 1  # training batches the loss is averaged over


@register_method(SnipConfig)
def snip(model: nn.Module, config: SnipConfig) -> PruneSetup:
    group = frozen_group(model, config.sparsity, config.scope)

    def start(context: Optional[PruneContext]) -> None:
        if context is None:
            raise CardkitError("snip scores the weights on training batches: pass a context to prune_model, "
                               "PruneContext(model, batches=iter([(x, y)]), objective=...)")
        set_masks(group, connection_sensitivity(model, group.layers, context, config.batches))

    return PruneSetup(model, group, trains=False, start=start)


def connection_sensitivity(model: nn.Module, layers: list[MaskedLayer], context: PruneContext,
                           batches: int) -> list[torch.Tensor]:
    """|dL/dw x w| for the weight of each layer, L the objective's loss averaged over the next
    `batches` batches of the context (or as many as it has left), computed in training mode with
    the context's seed for the objective's random draws (a PGD start). The model's buffers
    (batch-norm statistics), mode, gradient flags and the global random state are as they were."""
    weights = [layer.weight for layer in layers]
    sums = [torch.zeros_like(w) for w in weights]
    buffers = [b.detach().clone() for b in model.buffers()]
    flags, was_training = [w.requires_grad for w in weights], model.training
    device = weights[0].device
    drawn = 0
    try:
        model.train()
        for w in weights:
            w.requires_grad_(True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(context.seed)
            for x, y in itertools.islice(context.batches, batches):
                loss = context.objective(model, x, y)["loss"]
                for total, grad in zip(sums, torch.autograd.grad(loss, weights)):
                    total.add_(grad)
                drawn += 1
    finally:
        model.train(was_training)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    if drawn == 0:
        raise CardkitError("snip: the context gave no training batch; give it at least one (x, y) batch")
    return [(total / drawn * w.detach()).abs() for total, w in zip(sums, weights)]
