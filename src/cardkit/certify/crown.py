"""CROWN (Zhang et al. 2018): linear bounds propagated backward from the specification.

Every affine layer (Linear, Conv2d, Normalize, eval BatchNorm2d, Flatten, AvgPool2d, masked and
binary layers) passes the linear coefficients back through its vector-Jacobian product, one code
path for all of them; each ReLU is replaced by linear lower and upper lines between its
pre-activation bounds (the lower line's slope is 1 when u > -l, else 0). Pre-activation bounds come
from IBP (`intermediate="ibp"`: CROWN-IBP, Zhang et al. 2020) or from CROWN itself, intersected
with IBP's (`intermediate="crown"`: tighter, one backward pass per neuron of each layer).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cardkit.certify.ibp import (Bounds, _layers, _margin_spec, _propagate, input_bounds,
                                 supported_layers)
from cardkit.errors import CardkitError
from cardkit.models import Normalize

_AFFINE = (nn.Linear, nn.Conv2d, Normalize, nn.BatchNorm2d, nn.Flatten, nn.AvgPool2d,
           nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)


def crown_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        intermediate: Literal["ibp", "crown"] = "crown") -> torch.Tensor:
    """Lower bounds on logit[y] - logit[j] for every j != y (N x (K - 1)) over the Linf eps-ball
    around x within [0, 1]. A sample is verified when all are positive."""
    net = _prepare(model, x, eps, intermediate)
    return net.backward(len(net.layers), _margin_spec(y, net.shapes[-1][0]))


def crown_bounds(model: nn.Module, x: torch.Tensor, eps: float,
                 intermediate: Literal["ibp", "crown"] = "crown") -> Bounds:
    """Lower and upper bounds on every logit."""
    net = _prepare(model, x, eps, intermediate)
    eye = torch.eye(net.shapes[-1][0], device=x.device).expand(len(x), -1, -1)
    return Bounds(net.backward(len(net.layers), eye), -net.backward(len(net.layers), -eye))


class _Network:
    """Leaf layers, the shape of each layer's input (and of the output, last), the input box and
    the pre-activation bounds of every ReLU, by layer index."""

    def __init__(self, layers, shapes, box):
        self.layers, self.shapes, self.box = layers, shapes, box
        self.relu_bounds: dict[int, Bounds] = {}

    def neuron_bounds(self, end: int) -> Bounds:
        """CROWN bounds of every neuron of the output of layers[:end]."""
        n, shape = len(self.box.lower), self.shapes[end]
        size = int(torch.tensor(shape).prod())
        eye = torch.eye(size, device=self.box.lower.device).expand(n, -1, -1).reshape(n, size, *shape)
        lower, upper = self.backward(end, eye), -self.backward(end, -eye)
        return Bounds(lower.view(n, *shape), upper.view(n, *shape))

    def backward(self, end: int, spec: torch.Tensor) -> torch.Tensor:
        """Lower bound (N x S) of spec . f(x) over the input box, with f = layers[:end]."""
        n, s = spec.shape[:2]
        coeffs, bias = spec, torch.zeros(n, s, device=spec.device, dtype=spec.dtype)
        for index in reversed(range(end)):
            layer = self.layers[index][1]
            if isinstance(layer, nn.ReLU):
                coeffs, bias = _relu_back(coeffs, bias, self.relu_bounds[index])
            else:
                coeffs, bias = _affine_back(layer, coeffs, bias, self.shapes[index])
        positive, negative = coeffs.clamp(min=0), coeffs.clamp(max=0)
        box = self.box
        lower = (positive * box.lower.unsqueeze(1) + negative * box.upper.unsqueeze(1)).flatten(2).sum(2)
        return lower + bias


def _prepare(model, x, eps, intermediate) -> _Network:
    layers = list(_layers(model))
    for name, layer in layers:
        if not isinstance(layer, _AFFINE + (nn.ReLU,)):
            raise CardkitError(f"CROWN does not support layer '{name}' ({type(layer).__name__}); "
                               f"supported: {', '.join(sorted(set(supported_layers()) - {'MaxPool2d'}))}")
        if isinstance(layer, nn.BatchNorm2d) and layer.training:
            raise CardkitError(f"layer '{name}' (BatchNorm2d) is in training mode; bounds need "
                               f"the model in eval mode (model.eval())")
    with torch.no_grad():
        shapes, out = [], x[:1]
        for _, layer in layers:
            shapes.append(tuple(out.shape[1:]))
            out = layer(out)
        shapes.append(tuple(out.shape[1:]))
    net = _Network(layers, shapes, input_bounds(x, eps))
    ibp = net.box
    for index, (name, layer) in enumerate(layers):
        if isinstance(layer, nn.ReLU):
            if intermediate == "crown":
                ibp = _intersect(ibp, net.neuron_bounds(index))
            net.relu_bounds[index] = ibp
        ibp = _propagate(name, layer, ibp)
    return net


def _intersect(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def _relu_back(coeffs, bias, bounds: Bounds):
    l, u = bounds.lower.unsqueeze(1), bounds.upper.unsqueeze(1)
    unstable = (l < 0) & (u > 0)
    upper_slope = torch.where(unstable, u / (u - l).clamp_min(1e-12), (l >= 0).to(coeffs.dtype))
    upper_intercept = torch.where(unstable, -l * upper_slope, torch.zeros_like(l))
    lower_slope = torch.where(unstable, (u > -l).to(coeffs.dtype), (l >= 0).to(coeffs.dtype))
    positive, negative = coeffs.clamp(min=0), coeffs.clamp(max=0)
    bias = bias + (negative * upper_intercept).flatten(2).sum(2)
    return positive * lower_slope + negative * upper_slope, bias


def _affine_back(layer, coeffs, bias, in_shape):
    """f(x) = L x + c: coefficients A become A L (a vector-Jacobian product), bias gains A . c."""
    differentiable = torch.is_grad_enabled()
    n, s = coeffs.shape[:2]
    flat = coeffs.reshape(n * s, *coeffs.shape[2:])
    with torch.enable_grad():
        zero = torch.zeros(n * s, *in_shape, device=coeffs.device, dtype=coeffs.dtype, requires_grad=True)
        constant = layer(zero)
        # While training (grad enabled outside), keep the graph so the bound is differentiable.
        (back,) = torch.autograd.grad(constant, zero, grad_outputs=flat, create_graph=differentiable)
    if not differentiable:
        constant = constant.detach()
    bias = bias + (flat * constant).flatten(1).sum(1).view(n, s)
    return back.view(n, s, *in_shape), bias
