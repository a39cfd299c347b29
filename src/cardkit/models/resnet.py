"""CIFAR-style residual networks: ResNet-18 and its pre-activation variant."""

from collections import OrderedDict

import torch
from torch import nn

from cardkit.models._common import kaiming_init, positive_int
from cardkit.models.normalize import Normalize
from cardkit.models.registry import register_model


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus shortcut, then ReLU (He et al. 2015). ``shortcut`` is None for the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + shortcut)


class PreActBlock(nn.Module):
    """BN-ReLU-Conv twice plus shortcut (He et al. 2016, identity mappings), optional dropout between the convs.

    A projection shortcut reads the pre-activated input, as in the original;
    ``shortcut`` is None for the identity and ``dropout`` None when disabled.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = conv1x1(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv2(out) + shortcut


def residual_net(
    preact: bool, num_classes, in_channels, mean, std, stem_channels, widths, depths, strides, **block_kw
) -> nn.Sequential:
    """normalize -> 3x3 stem -> residual stages -> global average pool -> linear.

    Pre-activation nets leave the stem un-activated and add a final BN-ReLU
    instead, since each block activates its own input.
    """
    block = PreActBlock if preact else BasicBlock
    layers = [("normalize", Normalize(mean, std)), ("conv1", conv3x3(in_channels, stem_channels))]
    if not preact:
        layers += [("bn1", nn.BatchNorm2d(stem_channels)), ("relu1", nn.ReLU())]
    channels = stem_channels
    for i, (planes, blocks, stride) in enumerate(zip(widths, depths, strides), 1):
        stage = [block(channels if j == 0 else planes, planes, stride if j == 0 else 1, **block_kw) for j in range(blocks)]
        layers.append((f"layer{i}", nn.Sequential(*stage)))
        channels = planes
    if preact:
        layers += [("bn_out", nn.BatchNorm2d(channels)), ("relu_out", nn.ReLU())]
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(channels, num_classes))]
    return kaiming_init(nn.Sequential(OrderedDict(layers)))


@register_model
def resnet18(num_classes, in_channels, input_size, mean, std, width=64):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool; ``width`` is the first stage's channels."""
    positive_int(width, "width", "resnet18")
    widths = [width, 2 * width, 4 * width, 8 * width]
    return residual_net(False, num_classes, in_channels, mean, std, width, widths, [2, 2, 2, 2], [1, 2, 2, 2])


@register_model
def preact_resnet18(num_classes, in_channels, input_size, mean, std, width=64):
    """Pre-activation ResNet-18 for small images; ``width`` is the first stage's channels."""
    positive_int(width, "width", "preact_resnet18")
    widths = [width, 2 * width, 4 * width, 8 * width]
    return residual_net(True, num_classes, in_channels, mean, std, width, widths, [2, 2, 2, 2], [1, 2, 2, 2])
