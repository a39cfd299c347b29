"""CROWN (Zhang et al. 2018): linear bounds propagated backward from the specification.

Every affine layer (Linear, Conv2d, Normalize, eval BatchNorm2d, Flatten, pooling by averaging,
masked and binary layers) passes the linear coefficients back: in closed form for the common
layers, through a vector-Jacobian product for the rest; each ReLU is replaced by linear lower and upper lines between its
pre-activation bounds (the lower line's slope is 1 when u > -l, else 0). Pre-activation bounds come
from IBP (`intermediate="ibp"`: CROWN-IBP, Zhang et al. 2020) or from CROWN itself, intersected
with IBP's (`intermediate="crown"`: tighter, one backward pass per neuron of each layer).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.certify.ibp import (Bounds, _layers, _margin_spec, _propagate, _weight, input_bounds,
                                 margins_through)
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


def crown_ibp_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CROWN-IBP, IBP) lower margin bounds from one shared IBP pass, for CROWN-IBP training."""
    net = _prepare(model, x, eps, "ibp")
    crown = net.backward(len(net.layers), _margin_spec(y, net.shapes[-1][0]))
    last_name, last = net.layers[-1]
    if not isinstance(last, nn.Linear):
        raise CardkitError(f"margin bounds need a Linear last layer, got '{last_name}' ({type(last).__name__})")
    return crown, margins_through(last, net.penultimate, y).lower


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
        self.penultimate: Bounds | None = None  # IBP bounds on the last layer's input

    def neuron_bounds(self, end: int) -> Bounds:
        """CROWN bounds of every neuron of the output of layers[:end]."""
        n, shape = len(self.box.lower), self.shapes[end]
        size = math.prod(shape)
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
        n, s = coeffs.shape[:2]
        coeffs = coeffs.reshape(n, s, -1)
        centre = ((self.box.upper + self.box.lower) / 2).reshape(n, -1, 1)
        radius = ((self.box.upper - self.box.lower) / 2).reshape(n, -1, 1)
        lower = torch.bmm(coeffs, centre) - torch.bmm(coeffs.abs(), radius)
        return lower.squeeze(2) + bias


def _prepare(model, x, eps, intermediate) -> _Network:
    layers = list(_layers(model))
    for name, layer in layers:
        if not isinstance(layer, _AFFINE + (nn.ReLU,)):
            supported = sorted({cls.__name__ for cls in _AFFINE} | {"ReLU", "Sequential"})
            raise CardkitError(f"CROWN does not support layer '{name}' ({type(layer).__name__}); "
                               f"supported: {', '.join(supported)}; use IBP bounds for other networks")
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
    for index, (name, layer) in enumerate(layers[:-1]):  # the last layer's output is not needed
        if isinstance(layer, nn.ReLU):
            if intermediate == "crown":
                ibp = _intersect(ibp, net.neuron_bounds(index))
            net.relu_bounds[index] = ibp
        ibp = _propagate(name, layer, ibp)
    net.penultimate = ibp
    return net


def _intersect(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def _relu_back(coeffs, bias, bounds: Bounds):
    """Positive coefficients take the lower line, negative ones the upper line (with its
    intercept); written with few passes over the large N x S x neurons tensor."""
    l, u = bounds.lower, bounds.upper
    unstable = (l < 0) & (u > 0)
    active = (l >= 0).to(coeffs.dtype)
    upper_slope = torch.where(unstable, u / (u - l).clamp_min(1e-12), active)
    upper_intercept = torch.where(unstable, -l * upper_slope, torch.zeros_like(l))
    lower_slope = torch.where(unstable, (u > -l).to(coeffs.dtype), active)
    n, s = coeffs.shape[:2]
    positive = coeffs.clamp(min=0)
    new = coeffs * upper_slope.unsqueeze(1) + positive * (lower_slope - upper_slope).unsqueeze(1)
    negative = (coeffs - positive).reshape(n, s, -1)
    bias = bias + torch.bmm(negative, upper_intercept.reshape(n, -1, 1)).squeeze(2)
    return new, bias


def _affine_back(layer, coeffs, bias, in_shape):
    """f(x) = L x + c: coefficients A become A L, and the bias gains A . c. The common layers have
    closed forms (plain differentiable ops, cheap to train through); others go through a
    vector-Jacobian product."""
    n, s = coeffs.shape[:2]
    flat = coeffs.reshape(n * s, *coeffs.shape[2:])
    if isinstance(layer, nn.Linear):
        weight = _weight(layer)
        if layer.bias is not None:
            bias = bias + (coeffs @ layer.bias)
        return coeffs @ weight, bias
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1) \
            and isinstance(layer.padding, tuple):
        back = _conv_back(layer, flat, in_shape)
        if layer.bias is not None:
            bias = bias + (coeffs.sum((3, 4)) @ layer.bias)
        return back.view(n, s, *in_shape), bias
    if isinstance(layer, (Normalize, nn.BatchNorm2d)):
        scale, shift = _channel_affine(layer)
        bias = bias + (coeffs * shift.unsqueeze(0)).flatten(2).sum(2)
        return coeffs * scale.unsqueeze(0), bias
    if isinstance(layer, nn.Flatten):
        return coeffs.reshape(n, s, *in_shape), bias
    return _vjp_back(layer, coeffs, bias, in_shape)


def _conv_back(layer: nn.Conv2d, flat: torch.Tensor, in_shape) -> torch.Tensor:
    """A L for a convolution: a transposed convolution with the output padding that restores the
    input's size."""
    sizes = []
    for dim, size in enumerate(in_shape[1:]):
        out = flat.shape[2 + dim]
        stride, pad, kernel = layer.stride[dim], layer.padding[dim], layer.kernel_size[dim]
        sizes.append(size - ((out - 1) * stride - 2 * pad + kernel))
    # channels_last runs the transposed convolution 2-3x faster on CPU (oneDNN).
    flat = flat.contiguous(memory_format=torch.channels_last)
    return F.conv_transpose2d(flat, _weight(layer), stride=layer.stride, padding=layer.padding,
                              output_padding=tuple(sizes)).contiguous()


def _channel_affine(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift, shaped (1, C, 1, 1)."""
    if isinstance(layer, Normalize):
        return 1 / layer.std, -layer.mean / layer.std
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _vjp_back(layer, coeffs, bias, in_shape):
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
