"""Bounds through any network torch.fx can trace, not only nested Sequentials.

The model is traced once into a graph whose leaves are its layers (modules without children, and
the registry's residual blocks). A graph that is one chain of layers (each node feeding only the
next, as in `x = F.relu(self.conv(x)); x = torch.flatten(x, 1); return self.fc(x)`) becomes a layer
list, which IBP and CROWN bound exactly as a Sequential. Any other graph (skip connections,
concatenations) is bounded by interval propagation node by node: a layer node by IBP's rule for
that layer, a function or method node by one rule per operation, listed in `OPERATIONS`.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from cardkit.certify.ibp import Bounds, _propagate, margins_through
from cardkit.errors import CardkitError
from cardkit.models.resnet import BasicBlock, PreActBlock

# Nondecreasing in every bounded argument: the lower bound maps to the lower, the upper to the upper.
_MONOTONE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.hardtanh, F.elu, torch.sigmoid,
                       torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                       torch.flatten, torch.reshape, torch.cat, torch.stack, torch.squeeze, torch.unsqueeze,
                       torch.transpose, torch.permute, torch.sum, torch.mean, torch.clamp, operator.getitem}
_MONOTONE_METHODS = {"relu", "sigmoid", "tanh", "flatten", "view", "reshape", "permute", "transpose",
                     "contiguous", "squeeze", "unsqueeze", "sum", "mean", "clamp", "expand", "repeat"}
_SHAPE_METHODS = {"size", "dim", "numel"}  # of a bounded tensor: the same for its lower and upper bound
# Interval arithmetic, keyed by function (call_function) or method name (call_method).
_ARITHMETIC = {operator.add: "add", torch.add: "add", "add": "add", operator.sub: "sub", torch.sub: "sub",
               "sub": "sub", operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.truediv: "div",
               torch.div: "div", "div": "div", operator.neg: "neg", torch.neg: "neg", "neg": "neg"}
OPERATIONS = sorted({f.__name__ for f in _MONOTONE_FUNCTIONS} | _MONOTONE_METHODS
                    | {"linear", "conv2d", "x + y", "x - y", "x * constant", "x / constant", "-x"})


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (BasicBlock, PreActBlock)) or next(m.children(), None) is None


@dataclass
class _Traced:
    graph: fx.Graph
    chain: Optional[list[tuple[str, nn.Module]]]  # the layers, when the graph is one chain


_TRACES: "weakref.WeakKeyDictionary[nn.Module, _Traced]" = weakref.WeakKeyDictionary()


def is_container(model: nn.Module) -> bool:
    """A model other than a Sequential or a single layer: bounded through its traced graph."""
    return not isinstance(model, (nn.Sequential, BasicBlock, PreActBlock)) and next(model.children(), None) is not None


def traced(model: nn.Module) -> _Traced:
    """The model's graph, traced once per model (layers swapped in place, e.g. for masked ones,
    keep their names, so the graph stays valid)."""
    found = _TRACES.get(model)
    if found is None:
        try:
            graph = _Tracer().trace(model)
        except Exception as err:  # tracing runs the user's forward on proxies: it can fail in any way
            raise CardkitError(f"bounds need a model that torch.fx can trace; tracing {type(model).__name__} "
                               f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               f"write its forward without data-dependent control flow") from None
        found = _TRACES[model] = _Traced(graph, _chain(graph, model))
    return found


def chain_layers(model: nn.Module) -> Optional[list[tuple[str, nn.Module]]]:
    """The model's layers in order when its graph is one chain, else None."""
    return traced(model).chain


def _chain(graph: fx.Graph, model: nn.Module) -> Optional[list[tuple[str, nn.Module]]]:
    nodes = [n for n in graph.nodes if not _is_shape_query(n)]
    if not nodes or nodes[0].op != "placeholder" or nodes[-1].op != "output" or \
            sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    layers, current = [], nodes[0]
    for node in nodes[1:-1]:
        users = [u for u in current.users if not _is_shape_query(u)]
        layer = _as_layer(node, current, model)
        if users != [node] or layer is None:
            return None
        layers.append((node.target if node.op == "call_module" else node.name, layer))
        current = node
    return layers if nodes[-1].args == (current,) else None


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
        (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)) or \
        (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
         and _is_shape_query(node.args[0]))


def _as_layer(node: fx.Node, current: fx.Node, model: nn.Module) -> Optional[nn.Module]:
    """The layer a chain node applies to `current`: a module, or ReLU / Flatten written as functions."""
    if node.op == "call_module" and node.args == (current,) and not node.kwargs:
        return model.get_submodule(node.target)
    if node.args[:1] != (current,):
        return None
    rest = node.args[1:]
    if (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
            (node.op == "call_method" and node.target == "relu"):
        return nn.ReLU() if not rest else None
    flatten = (node.op == "call_function" and node.target is torch.flatten) or \
        (node.op == "call_method" and node.target == "flatten")
    if flatten and rest == (1,) and not node.kwargs:
        return nn.Flatten()
    if node.op == "call_method" and node.target in ("view", "reshape") and len(rest) == 2 and rest[1] == -1 \
            and isinstance(rest[0], fx.Node) and _batch_size_of(rest[0], current):
        return nn.Flatten()
    return None


def _batch_size_of(node: fx.Node, current: fx.Node) -> bool:
    """x.size(0) or x.shape[0] of `current`."""
    if node.op == "call_method" and node.target == "size":
        return node.args == (current, 0)
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 \
        and isinstance(node.args[0], fx.Node) and node.args[0].args == (current, "shape")


def graph_bounds(model: nn.Module, bounds: Bounds) -> Bounds:
    """Interval bounds on the model's output for inputs within `bounds`."""
    return _Interpreter(model).run(bounds)


def graph_margin_bounds(model: nn.Module, bounds: Bounds, y: torch.Tensor) -> Bounds:
    """Bounds on logit[y] - logit[j] for j != y (N x (K - 1)). A last Linear layer is folded into
    the margin specification (tighter); otherwise the margins come from the logits' bounds."""
    interpreter = _Interpreter(model)
    last = interpreter.last_linear()
    if last is not None:
        return margins_through(last[1], interpreter.run(bounds, stop=last[0]), y)
    logits = interpreter.run(bounds)
    classes = logits.lower.shape[1]
    keep = ~F.one_hot(y, classes).bool()
    true_lower, true_upper = logits.lower.gather(1, y[:, None]), logits.upper.gather(1, y[:, None])
    return Bounds((true_lower - logits.upper)[keep].view(len(y), classes - 1),
                  (true_upper - logits.lower)[keep].view(len(y), classes - 1))


class _Interpreter:
    def __init__(self, model: nn.Module):
        self.model, self.graph = model, traced(model).graph
        self.name = type(model).__name__

    def last_linear(self) -> Optional[tuple[fx.Node, nn.Linear]]:
        """The node of a Linear layer whose output is the model's output, and nothing else's."""
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        last = output.args[0]
        if isinstance(last, fx.Node) and last.op == "call_module" and len(last.users) == 1 and \
                len(last.args) == 1 and not last.kwargs:
            module = self.model.get_submodule(last.target)
            if isinstance(module, nn.Linear):
                return last, module
        return None

    def run(self, bounds: Bounds, stop: Optional[fx.Node] = None) -> Bounds:
        """Bounds on the output (or on the input of node `stop`)."""
        env: dict[fx.Node, Any] = {}
        placeholders = 0
        for node in self.graph.nodes:
            if node is stop:
                return self._bounded(env[node.args[0]], node)
            if node.op == "placeholder":
                placeholders += 1
                if placeholders > 1:
                    raise CardkitError(f"bounds need a model with one input; {self.name}.forward takes more")
                env[node] = bounds
            elif node.op == "output":
                return self._bounded(fx.node.map_arg(node.args[0], env.__getitem__), node)
            else:
                env[node] = self._step(node, env)
        raise CardkitError(f"{self.name}'s traced graph has no output")

    def _bounded(self, value, node: fx.Node) -> Bounds:
        if not isinstance(value, Bounds):
            raise CardkitError(f"bounds need {self.name} to return one tensor computed from its input; "
                               f"{node.name} is a {type(value).__name__}")
        return value

    def _step(self, node: fx.Node, env: dict) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "get_attr":
            return _attribute(self.model, node.target)
        if not _any_bounds((args, kwargs)):
            fn = getattr(args[0], node.target) if node.op == "call_method" else \
                self.model.get_submodule(node.target) if node.op == "call_module" else node.target
            return fn(*(args[1:] if node.op == "call_method" else args), **kwargs)
        if node.op == "call_module":
            if len(args) != 1 or kwargs or not isinstance(args[0], Bounds):
                raise self._unsupported(node, "a layer called with more than its input")
            return _propagate(node.target, self.model.get_submodule(node.target), args[0])
        return self._operation(node, args, kwargs)

    def _operation(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        target, method = node.target, node.op == "call_method"
        if (method and target in _SHAPE_METHODS) or target is getattr:
            return _apply(target, method, _lower(args), _lower(kwargs))
        if (method and target in _MONOTONE_METHODS) or (not method and target in _MONOTONE_FUNCTIONS):
            if target is F.leaky_relu and _slope(args, kwargs) < 0:
                raise self._unsupported(node, "leaky_relu with a negative slope")
            return Bounds(_apply(target, method, _lower(args), _lower(kwargs)),
                          _apply(target, method, _upper(args), _upper(kwargs)))
        if not method and target in (F.linear, F.conv2d) and isinstance(args[0], Bounds):
            if _any_bounds((args[1:], kwargs)):
                raise self._unsupported(node, f"{target.__name__} with bounded weights")
            return _affine(target, args, kwargs)
        kind = _ARITHMETIC.get(target)
        if kind is None or kwargs:
            raise self._unsupported(node)
        if kind == "neg" and len(args) == 1:
            return _negate(args[0])
        a, b = args if len(args) == 2 else (None, None)
        if kind == "add" and b is not None:
            return _add(a, b)
        if kind == "sub" and b is not None:
            return _add(a, _negate(b))
        if kind == "mul" and b is not None and not (isinstance(a, Bounds) and isinstance(b, Bounds)):
            return _scale(a, b) if isinstance(a, Bounds) else _scale(b, a)
        if kind == "div" and isinstance(a, Bounds) and b is not None and not isinstance(b, Bounds):
            return _scale(a, 1 / b)
        raise self._unsupported(node)

    def _unsupported(self, node: fx.Node, what: str | None = None) -> CardkitError:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return CardkitError(f"interval bounds do not support {what or 'the operation ' + repr(target)} "
                            f"(node {node.name} of {self.name}); supported operations: {', '.join(OPERATIONS)}, "
                            f"and the layers of cardkit.certify.supported_layers()")


def _attribute(model: nn.Module, target: str):
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _any_bounds(value) -> bool:
    if isinstance(value, Bounds):
        return True
    if isinstance(value, (tuple, list)):
        return any(_any_bounds(v) for v in value)
    if isinstance(value, dict):
        return any(_any_bounds(v) for v in value.values())
    return False


def _pick(value, side: str):
    if isinstance(value, Bounds):
        return getattr(value, side)
    if isinstance(value, (tuple, list)):
        return type(value)(_pick(v, side) for v in value)
    if isinstance(value, dict):
        return {k: _pick(v, side) for k, v in value.items()}
    return value


def _lower(value):
    return _pick(value, "lower")


def _upper(value):
    return _pick(value, "upper")


def _apply(target, method: bool, args, kwargs):
    return getattr(args[0], target)(*args[1:], **kwargs) if method else target(*args, **kwargs)


def _slope(args, kwargs) -> float:
    return float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))


def _negate(value):
    return Bounds(-value.upper, -value.lower) if isinstance(value, Bounds) else -value


def _add(a, b) -> Bounds:
    if isinstance(a, Bounds) and isinstance(b, Bounds):
        return Bounds(a.lower + b.lower, a.upper + b.upper)
    bounds, constant = (a, b) if isinstance(a, Bounds) else (b, a)
    return Bounds(bounds.lower + constant, bounds.upper + constant)


def _scale(bounds: Bounds, constant) -> Bounds:
    low, high = bounds.lower * constant, bounds.upper * constant
    return Bounds(torch.minimum(low, high), torch.maximum(low, high))


def _affine(target, args: tuple, kwargs: dict) -> Bounds:
    """F.linear / F.conv2d with constant weights: the centre through W, the radius through |W|."""
    bounds, weight, *rest = args
    kwargs = dict(kwargs)
    bias = rest[0] if rest else kwargs.pop("bias", None)
    centre, radius = (bounds.upper + bounds.lower) / 2, (bounds.upper - bounds.lower) / 2
    mid = target(centre, weight, bias, *rest[1:], **kwargs)
    spread = target(radius, weight.abs(), None, *rest[1:], **kwargs)
    return Bounds(mid - spread, mid + spread)
