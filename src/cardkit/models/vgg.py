"""VGG with BatchNorm, adapted to small images."""

from collections import OrderedDict

from torch import nn

from cardkit.models._common import kaiming_init, positive_int
from cardkit.models.normalize import Normalize
from cardkit.models.registry import register_model

# Channel multiples of the base width; "M" is a 2x2 max-pool.
_VGG16 = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


@register_model
def vgg16_bn(num_classes, in_channels, input_size, mean, std, width=64):
    """VGG-16-BN for CIFAR-sized inputs with a single linear classifier; ``width`` is the first block's channels."""
    positive_int(width, "width", "vgg16_bn")
    features, channels = _vgg_features(_VGG16, width, in_channels, input_size)
    model = nn.Sequential(
        OrderedDict(
            normalize=Normalize(mean, std),
            features=features,
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(channels, num_classes),
        )
    )
    return kaiming_init(model)


def _vgg_features(cfg, width, in_channels, input_size) -> tuple[nn.Sequential, int]:
    """Conv-BN-ReLU stack; a max-pool is dropped once the map is 1x1 so 8x8 inputs still fit."""
    layers = []
    channels, side = in_channels, input_size
    for item in cfg:
        if item == "M":
            if side > 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        out = item * width
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers), channels
