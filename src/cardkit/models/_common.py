"""Argument checks and layer helpers shared by the architectures."""

import itertools

from torch import nn

from cardkit.errors import CardkitError


def positive_int(value, name: str, model: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise a CardkitError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CardkitError(f"{model}: {name}={value!r} is invalid; it must be an integer >= 1")
    return value


def positive_number(value, name: str, model: str) -> float:
    """Return ``value`` if it is a number > 0, else raise a CardkitError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CardkitError(f"{model}: {name}={value!r} is invalid; it must be a number > 0")
    return value


def scaled(channels: int, width: float) -> int:
    """Channel count after a width multiplier; never below one channel."""
    return max(1, round(channels * width))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def spatial_size_after(input_size: int, convs, model: str) -> int:
    """Side length after ``convs`` (a list of (kernel, stride, padding)); rejects inputs they shrink to nothing."""

    def run(size):
        for kernel, stride, padding in convs:
            size = conv_output_size(size, kernel, stride, padding)
        return size

    size = run(input_size)
    if size < 1:
        smallest = next(s for s in itertools.count(1) if run(s) >= 1)
        raise CardkitError(
            f"{model}: input_size={input_size} is too small, its strided convolutions shrink it to nothing; "
            f"use input_size >= {smallest}"
        )
    return size


def kaiming_init(model: nn.Module) -> nn.Module:
    """He initialization for ReLU networks; BatchNorm starts as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
