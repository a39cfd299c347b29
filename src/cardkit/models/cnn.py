"""Small plain CNNs used throughout the certified-training and pruning literature."""

from collections import OrderedDict

from torch import nn

from cardkit.models._common import positive_number, scaled, spatial_size_after
from cardkit.models.normalize import Normalize
from cardkit.models.registry import register_model


@register_model
def cnn_small(num_classes, in_channels, input_size, mean, std, width=1):
    """Conv16-Conv32-FC100 network (CROWN-IBP / HYDRA "small"); ``width`` scales every hidden layer."""
    positive_number(width, "width", "cnn_small")
    convs = [(scaled(16, width), 4, 2, 1), (scaled(32, width), 4, 2, 1)]
    return _conv_mlp("cnn_small", convs, [scaled(100, width)], num_classes, in_channels, input_size, mean, std)


@register_model
def cnn_large(num_classes, in_channels, input_size, mean, std, width=1):
    """Conv32-Conv32-Conv64-Conv64-FC512-FC512 network (CROWN-IBP "large"); ``width`` scales every hidden layer."""
    positive_number(width, "width", "cnn_large")
    c32, c64 = scaled(32, width), scaled(64, width)
    convs = [(c32, 3, 1, 1), (c32, 4, 2, 1), (c64, 3, 1, 1), (c64, 4, 2, 1)]
    hidden = [scaled(512, width)] * 2
    return _conv_mlp("cnn_large", convs, hidden, num_classes, in_channels, input_size, mean, std)


def _conv_mlp(model, convs, hidden, num_classes, in_channels, input_size, mean, std) -> nn.Sequential:
    """normalize -> (conv, relu)* -> flatten -> (linear, relu)* -> linear; ``convs`` holds (out, kernel, stride, padding)."""
    side = spatial_size_after(input_size, [c[1:] for c in convs], model)
    layers = [("normalize", Normalize(mean, std))]
    channels = in_channels
    for i, (out, kernel, stride, padding) in enumerate(convs, 1):
        layers.append((f"conv{i}", nn.Conv2d(channels, out, kernel, stride=stride, padding=padding)))
        layers.append((f"relu{i}", nn.ReLU()))
        channels = out
    layers.append(("flatten", nn.Flatten()))
    features = channels * side * side
    for i, out in enumerate(hidden, 1):
        layers.append((f"fc{i}", nn.Linear(features, out)))
        layers.append((f"relu{len(convs) + i}", nn.ReLU()))
        features = out
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(layers))
