"""Wide residual networks (Zagoruyko & Komodakis 2016), the usual adversarial-training backbones."""

from cardkit.errors import CardkitError
from cardkit.models._common import positive_int
from cardkit.models.registry import register_model
from cardkit.models.resnet import residual_net


@register_model
def wrn(num_classes, in_channels, input_size, mean, std, depth=28, width=10, dropout=0.0):
    """WRN-``depth``-``width``: three stages of (depth - 4) / 6 pre-activation blocks with 16k, 32k, 64k channels."""
    positive_int(depth, "depth", "wrn")
    positive_int(width, "width", "wrn")
    if depth < 10 or (depth - 4) % 6:
        raise CardkitError(
            f"wrn: depth={depth} is invalid; a wide ResNet has depth 6n+4 with n >= 1 (e.g. 10, 16, 22, 28, 34, 40)"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CardkitError(f"wrn: dropout={dropout!r} is invalid; it must be a number in [0, 1)")
    blocks = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    return residual_net(
        True, num_classes, in_channels, mean, std, 16, widths, [blocks] * 3, [1, 2, 2], dropout=float(dropout)
    )


@register_model
def wrn_28_4(num_classes, in_channels, input_size, mean, std, dropout=0.0):
    return wrn(num_classes, in_channels, input_size, mean, std, depth=28, width=4, dropout=dropout)


@register_model
def wrn_28_10(num_classes, in_channels, input_size, mean, std, dropout=0.0):
    return wrn(num_classes, in_channels, input_size, mean, std, depth=28, width=10, dropout=dropout)


@register_model
def wrn_34_10(num_classes, in_channels, input_size, mean, std, dropout=0.0):
    return wrn(num_classes, in_channels, input_size, mean, std, depth=34, width=10, dropout=dropout)
