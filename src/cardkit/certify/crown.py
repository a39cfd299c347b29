"""CROWN (Zhang et al. 2018): linear bounds propagated backward from the specification.

Every affine layer (Linear, Conv2d, Normalize, eval BatchNorm2d, Flatten, pooling by averaging,
masked and binary layers) passes the linear coefficients back: in closed form for the common
layers, through a vector-Jacobian product for the rest; each ReLU is replaced by linear lower and
upper lines between its pre-activation bounds (the lower line's slope is 1 when u > -l, else 0).
The first Linear or Conv2d layer is bounded over its input box directly (A f(centre) - |A L|
radius), which equals substituting back to the input when only exact layers precede it
(Normalize, eval BatchNorm2d, Flatten). Pre-activation bounds come
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
_EXACT = (Normalize, nn.BatchNorm2d, nn.Flatten, nn.Identity)  # IBP bounds these exactly


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
    """Leaf layers, the shape of each layer's input (and of the output, last), the input box, the
    linear relaxation of every ReLU by layer index, and where back-substitution stops: the first
    Linear or Conv2d layer (`first`, with the IBP box of its input), when only layers that IBP
    bounds exactly (per-element affine maps, reshapes) come before it."""

    def __init__(self, layers, shapes, box):
        self.layers, self.shapes, self.box = layers, shapes, box
        self.relaxations: dict[int, _Relaxation] = {}
        self.penultimate: Bounds | None = None  # IBP bounds on the last layer's input
        self.first, self.first_box = None, None

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
        stop = self.first if self.first is not None and self.first < end else None
        for index in reversed(range(0 if stop is None else stop + 1, end)):
            layer = self.layers[index][1]
            if isinstance(layer, nn.ReLU):
                coeffs, bias = self.relaxations[index].back(coeffs, bias)
            else:
                coeffs, bias = _affine_back(layer, coeffs, bias, self.shapes[index])
        if stop is None:
            centre = (self.box.upper + self.box.lower) / 2
            radius = (self.box.upper - self.box.lower) / 2
            return bias + _dot(coeffs, centre) - _dot(coeffs.abs(), radius)
        return bias + _first_layer_bound(self.layers[stop][1], coeffs, self.first_box)


def _prepare(model, x, eps, intermediate) -> _Network:
    layers = list(_layers(model))
    for name, layer in layers:
        if not name and next(layer.children(), None) is not None:  # a model whose graph is not a chain
            raise CardkitError(f"CROWN bounds networks that are one chain of layers, and the traced graph of "
                               f"{type(layer).__name__} is not (a skip connection, or an operation between "
                               f"layers other than relu and flatten); use IBP bounds for it")
        if not isinstance(layer, _AFFINE + (nn.ReLU,)):
            supported = sorted({cls.__name__ for cls in _AFFINE} | {"ReLU", "Sequential"})
            raise CardkitError(f"CROWN does not support layer '{name}' ({type(layer).__name__}); "
                               f"supported: {', '.join(supported)}; use IBP bounds for other networks")
        if isinstance(layer, nn.BatchNorm2d) and layer.training:
            raise CardkitError(f"layer '{name}' (BatchNorm2d) is in training mode; bounds need "
                               f"the model in eval mode (model.eval())")
    if layers and isinstance(layers[-1][1], nn.ReLU):  # its relaxation needs bounds CROWN never forms
        raise CardkitError(f"CROWN bounds the outputs of an affine last layer, and '{layers[-1][0]}' is a ReLU; "
                           f"bound the logits before it (drop the final ReLU), or use IBP bounds")
    with torch.no_grad():
        shapes, out = [], x[:1]
        for _, layer in layers:
            shapes.append(tuple(out.shape[1:]))
            out = layer(out)
        shapes.append(tuple(out.shape[1:]))
    net = _Network(layers, shapes, input_bounds(x, eps))
    lead = next((i for i, (_, layer) in enumerate(layers) if not isinstance(layer, _EXACT)), None)
    if lead is not None and (isinstance(layers[lead][1], nn.Linear) or _plain_conv(layers[lead][1])):
        net.first = lead
    ibp = net.box
    for index, (name, layer) in enumerate(layers[:-1]):  # the last layer's output is not needed
        if index == net.first:
            net.first_box = ibp
        if isinstance(layer, nn.ReLU):
            if intermediate == "crown":
                ibp = _intersect(ibp, net.neuron_bounds(index))
            net.relaxations[index] = _Relaxation(ibp)
        ibp = _propagate(name, layer, ibp)
    if net.first == len(layers) - 1:
        net.first_box = ibp
    net.penultimate = ibp
    return net


def _intersect(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def _plain_conv(layer) -> bool:
    """A convolution whose back-substitution is a transposed convolution."""
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1) \
        and isinstance(layer.padding, tuple) and layer.padding_mode == "zeros"


def _channels_last(coeffs: torch.Tensor) -> bool:
    """Whether N x S x C x H x W coefficients are stored channel-innermost (as the transposed
    convolutions return them)."""
    return coeffs.dim() == 5 and coeffs.stride(2) == 1 and coeffs.shape[2] > 1


def _flat(coeffs: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """N x S x neurons view of N x S x ... coefficients, neurons in memory order (or in the order of
    `channels_last` coefficients)."""
    if _channels_last(coeffs) if channels_last is None else channels_last:
        coeffs = coeffs.permute(0, 1, 3, 4, 2)
    return coeffs.reshape(*coeffs.shape[:2], -1)


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _flat: flat shaped and laid out like `like` (its first two sizes aside)."""
    if _channels_last(like):
        channels, height, width = like.shape[2:]
        return flat.view(*flat.shape[:2], height, width, channels).permute(0, 1, 4, 2, 3)
    return flat.view(*flat.shape[:2], *like.shape[2:])


def _dot(coeffs: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """sum_i coeffs[n, s, i] vec[n, i] (N x S), for N x S x ... coefficients and N x ... vec."""
    vec = vec.unsqueeze(1)
    if _channels_last(coeffs):
        vec = vec.permute(0, 1, 3, 4, 2)
    return _Dot.apply(_flat(coeffs), vec.reshape(len(vec), -1))


def _bmm_dot(flat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Batched A vec as vec^T A^T, which MKL runs ~5x faster."""
    return torch.bmm(vec.unsqueeze(1), flat.transpose(1, 2)).squeeze(1)


class _Dot(torch.autograd.Function):
    """_bmm_dot whose gradient for A comes out in A's memory order, so that adding it to A's other
    gradients stays a contiguous pass."""

    @staticmethod
    def forward(ctx, flat, vec):
        ctx.save_for_backward(flat, vec)
        return _bmm_dot(flat, vec)

    @staticmethod
    def backward(ctx, grad):
        flat, vec = ctx.saved_tensors
        grad_flat = grad.unsqueeze(2) * vec.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_vec = torch.bmm(grad.unsqueeze(1), flat).squeeze(1) if ctx.needs_input_grad[1] else None
        return grad_flat, grad_vec


class _Relaxation:
    """Lines below and above a ReLU between its pre-activation bounds l and u. Upper: slope
    u / (u - l) through (l, 0) when unstable, the ReLU itself when stable. Lower: slope 1 when
    u > -l, else 0 (the smaller area). Positive coefficients take the lower line, negative ones the
    upper line with its intercept."""

    def __init__(self, bounds: Bounds):
        high, low = bounds.upper.clamp(min=0), bounds.lower.clamp(max=0)
        self.upper = high / (high - low).clamp_min(1e-12)  # 1 when always active, 0 when inactive
        self.intercept = -low * self.upper
        self.lower = (bounds.upper + bounds.lower > 0).to(bounds.lower.dtype)
        self._laid_out: dict[bool, tuple[torch.Tensor, ...]] = {}

    def back(self, coeffs, bias):
        new, constant = _ReluBack.apply(coeffs, *self.laid_out(_channels_last(coeffs)))
        return new, bias + constant

    def laid_out(self, channels_last: bool):
        """Lower slope, upper slope and intercept as N x 1 x neurons, laid out like the
        coefficients (mixed layouts make elementwise ops several times slower)."""
        if channels_last not in self._laid_out:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self._laid_out[channels_last] = tuple(t.contiguous(memory_format=layout).unsqueeze(1)
                                                  for t in (self.lower, self.upper, self.intercept))
        return self._laid_out[channels_last]


class _ReluBack(torch.autograd.Function):
    """A ReLU relaxation applied to coefficients A: positive entries (zero included) take the
    lower slope, negative ones the upper slope and add A x intercept to the bias. Written out with
    few passes over A and no boolean masks (torch.where, as in clamp's gradient, runs ~20x slower
    than arithmetic on CPU)."""

    @staticmethod
    def forward(ctx, coeffs, lower, upper, intercept):
        negative = coeffs.clamp(max=0)
        ctx.save_for_backward(negative, lower, upper, intercept)
        new = (coeffs * lower).addcmul_(negative, upper - lower)
        return new, _bmm_dot(_flat(negative), _flat(intercept, _channels_last(negative)).squeeze(1))

    @staticmethod
    def backward(ctx, grad_new, grad_constant):
        negative, lower, upper, intercept = ctx.saved_tensors
        if grad_new.stride() != negative.stride():
            grad_new = torch.empty_like(negative).copy_(grad_new)
        grad_constant = grad_constant.view(*grad_constant.shape, *[1] * (negative.dim() - 2))
        # -(the negative entries' gradient beyond the lower slope's), kept where sign(negative) = -1.
        below = (grad_new * (lower - upper)).addcmul_(grad_constant, intercept, value=-1)
        grad = torch.sign(negative).mul_(below).addcmul_(grad_new, lower)
        grad_upper = torch.mul(grad_new, negative, out=below).sum(1, keepdim=True)
        grad_intercept = _unflat(torch.bmm(grad_constant.view(len(negative), 1, -1), _flat(negative)), negative)
        return grad, None, grad_upper, grad_intercept


def _affine_back(layer, coeffs, bias, in_shape):
    """f(x) = L x + c: coefficients A become A L, and the bias gains A . c. The common layers have
    closed forms (plain differentiable ops, cheap to train through); others go through a
    vector-Jacobian product."""
    n, s = coeffs.shape[:2]
    if isinstance(layer, nn.Linear):
        if layer.bias is not None:
            bias = bias + (coeffs @ layer.bias)
        return coeffs @ _weight(layer), bias
    if _plain_conv(layer):
        if layer.bias is not None:
            bias = bias + (coeffs.sum((3, 4)) @ layer.bias)
        return _conv_back(layer, coeffs.reshape(n * s, *coeffs.shape[2:]), in_shape).view(n, s, *in_shape), bias
    if isinstance(layer, (Normalize, nn.BatchNorm2d)):
        scale, shift = _channel_affine(layer)
        bias = bias + (coeffs * shift.unsqueeze(0)).sum(tuple(range(2, coeffs.dim())))
        return coeffs * scale.unsqueeze(0), bias
    if isinstance(layer, nn.Flatten):
        return coeffs.reshape(n, s, *in_shape), bias
    return _vjp_back(layer, coeffs, bias, in_shape)


def _conv_back(layer: nn.Conv2d, flat: torch.Tensor, in_shape) -> torch.Tensor:
    """A L for a convolution: a transposed convolution with the output padding that restores the
    input's size, in channels_last (2-3x faster on CPU with oneDNN)."""
    flat = flat.contiguous(memory_format=torch.channels_last)
    return F.conv_transpose2d(flat, _weight(layer), stride=layer.stride, padding=layer.padding,
                              output_padding=_output_padding(layer, flat.shape[2:], in_shape[1:]))


def _output_padding(layer: nn.Conv2d, out_size, in_size) -> tuple[int, ...]:
    return tuple(size - ((out - 1) * stride - 2 * pad + kernel) for size, out, stride, pad, kernel
                 in zip(in_size, out_size, layer.stride, layer.padding, layer.kernel_size))


def _first_layer_bound(layer, coeffs, box: Bounds) -> torch.Tensor:
    """min of A f(x) over the box for the first affine layer f(x) = L x + c: A f(centre) - |A L| radius.
    A f(centre) costs one forward of the batch instead of a back-substitution."""
    centre, radius = (box.upper + box.lower) / 2, (box.upper - box.lower) / 2
    if isinstance(layer, nn.Linear):
        mid = F.linear(centre, _weight(layer), layer.bias)
        return _dot(coeffs, mid) - _dot((coeffs @ _weight(layer)).abs(), radius)
    mid = layer._conv_forward(centre, _weight(layer), layer.bias)
    n, s = coeffs.shape[:2]
    flat = coeffs.reshape(n * s, *coeffs.shape[2:]).contiguous(memory_format=torch.channels_last)
    if layer.stride[0] == layer.stride[1] > 1:
        weight, radius = _space_to_depth(layer, flat.shape[2:], radius)
        conv = ((1, 1), (0, 0), (0, 0))
    else:
        weight = _weight(layer)
        conv = (layer.stride, layer.padding, _output_padding(layer, flat.shape[2:], radius.shape[2:]))
    return _ConvBoxBound.apply(flat, weight, mid, radius.contiguous(memory_format=torch.channels_last), *conv)


def _space_to_depth(layer: nn.Conv2d, out_size, radius: torch.Tensor):
    """A strided convolution as a stride-1 one over the input in space-to-depth form (each stride x
    stride block of pixels as channels), whose transpose oneDNN runs several times faster: its
    weight, and the radius in that form (zero on the padding)."""
    weight, stride = _weight(layer), layer.stride[0]
    out_channels, channels = weight.shape[:2]
    taps = [math.ceil(k / stride) for k in layer.kernel_size]
    weight = F.pad(weight, (0, taps[1] * stride - weight.shape[3], 0, taps[0] * stride - weight.shape[2]))
    weight = weight.view(out_channels, channels, taps[0], stride, taps[1], stride).permute(0, 1, 3, 5, 2, 4)
    weight = weight.reshape(out_channels, channels * stride * stride, *taps)
    blocks = [out + tap - 1 for out, tap in zip(out_size, taps)]
    (pad_h, pad_w), (height, width) = layer.padding, radius.shape[2:]
    radius = F.pad(radius, (pad_w, blocks[1] * stride - width - pad_w, pad_h, blocks[0] * stride - height - pad_h))
    return weight, F.pixel_unshuffle(radius, stride)


class _ConvBoxBound(torch.autograd.Function):
    """A mid - |A L| radius with A L the transposed convolution of A (NS x C x H x W, channels_last):
    one allocation per direction for the large A L, where autograd's abs and products take several."""

    @staticmethod
    def forward(ctx, flat, weight, mid, radius, stride, padding, output_padding):
        back = F.conv_transpose2d(flat, weight, stride=stride, padding=padding, output_padding=output_padding)
        ctx.save_for_backward(flat, weight, mid, radius, back)
        ctx.conv = (stride, padding, output_padding)
        n = len(mid)
        return _bmm_dot(_rows(flat, n), _rows(mid, n)[:, 0]) - _bmm_dot(_rows(back.abs(), n), _rows(radius, n)[:, 0])

    @staticmethod
    def backward(ctx, grad):
        flat, weight, mid, radius, back = ctx.saved_tensors
        n, s = grad.shape
        grad_back = back.sign()
        grad_back.view(n, s, *back.shape[1:]).mul_(radius.unsqueeze(1)).mul_(-grad.view(n, s, 1, 1, 1))
        stride, padding, output_padding = ctx.conv
        grad_flat, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_back, flat, weight, None, stride, padding, (1, 1), True, output_padding, 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_flat is not None:
            grad_flat.view(n, s, *flat.shape[1:]).addcmul_(grad.view(n, s, 1, 1, 1), mid.unsqueeze(1))
        rows = grad.unsqueeze(1)
        grad_mid = _unrows(torch.bmm(rows, _rows(flat, n)), mid) if ctx.needs_input_grad[2] else None
        grad_radius = -_unrows(torch.bmm(rows, _rows(back.abs(), n)), radius) if ctx.needs_input_grad[3] else None
        return grad_flat, grad_weight, grad_mid, grad_radius, None, None, None


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(N S) x C x H x W as N x S x (H W C), channel innermost (a view for channels_last)."""
    return t.permute(0, 2, 3, 1).reshape(n, -1, t[0].numel())


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N x 1 x (H W C) back to N x C x H x W."""
    channels, height, width = like.shape[1:]
    return rows.view(len(like), height, width, channels).permute(0, 3, 1, 2)


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
