"""The layer names certify/ibp.py reports as supported (they appear in its refusals)."""

from cardkit.certify.ibp import supported_layers


def test_supported_layers_are_named_exactly():
    assert supported_layers() == ["AdaptiveAvgPool2d", "AvgPool2d", "BasicBlock", "BatchNorm2d (eval)", "Conv2d",
                                  "Dropout", "Flatten", "Identity", "Linear", "MaxPool2d", "Normalize",
                                  "PreActBlock", "ReLU", "Sequential"]
