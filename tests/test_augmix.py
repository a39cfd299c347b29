import math

import pytest
import torch

from cardkit.data.augmix import OPS, AugMix, jensen_shannon
from cardkit.errors import CardkitError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, c: int, side: int) -> torch.Tensor:
    """Images with spatial structure, so that an augmented copy stays correlated with them."""
    grid = torch.linspace(0, 1, side)
    base = 0.5 + 0.4 * torch.sin(3 * grid[:, None] + 2 * grid[None, :] + torch.arange(n * c).view(-1, 1, 1))
    return base.view(n, c, side, side)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,side", [(1, 28), (3, 32), (3, 8)])
def test_output_shape_range_dtype_device(device, c, side):
    x = torch.rand(6, c, side, side, device=device)
    y = AugMix()(x, seeded())
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


def test_seeded_generator_is_deterministic_and_seed_dependent():
    x = torch.rand(8, 3, 32, 32)
    aug = AugMix(severity=5)
    assert torch.equal(aug(x, seeded(1)), aug(x, seeded(1)))
    assert not torch.equal(aug(x, seeded(1)), aug(x, seeded(2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_result_on_cuda():
    x = torch.rand(8, 3, 32, 32)
    # Same draws; resampling may differ in the last bits, which can move a pixel across a level of
    # a later posterize or equalize, so compare on average.
    assert (AugMix()(x.cuda(), seeded()).cpu() - AugMix()(x, seeded())).abs().mean() < 1e-3


def test_mixed_output_differs_but_stays_correlated():
    x = smooth_images(16, 3, 32)
    y = AugMix()(x, seeded())
    assert (y - x).abs().amax((1, 2, 3)).min() > 0.01  # every sample changed
    corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
    assert corr > 0.5


def test_samples_draw_their_own_augmentation():
    x = smooth_images(1, 3, 32).expand(8, -1, -1, -1)
    y = AugMix()(x, seeded())
    assert all(not torch.allclose(y[0], y[i]) for i in range(1, 8))


@pytest.mark.parametrize("depth,severity", [(1, 1), (3, 10)])
def test_fixed_depth_and_extreme_severity(depth, severity):
    x = torch.rand(4, 1, 8, 8)
    y = AugMix(width=1, depth=depth, severity=severity, alpha=0.5)(x, seeded())
    assert y.shape == x.shape and y.isfinite().all()


@pytest.mark.parametrize("field,value", [("width", 0), ("depth", -1), ("severity", 0), ("severity", 11),
                                         ("alpha", 0.0), ("alpha", float("nan")), ("width", 2.0)])
def test_invalid_fields_raise(field, value):
    with pytest.raises(CardkitError, match=field):
        AugMix(**{field: value})


def test_ops_table_has_only_the_non_overlapping_ops():
    assert sorted(OPS) == sorted(["autocontrast", "equalize", "posterize", "rotate", "solarize",
                                  "shear_x", "shear_y", "translate_x", "translate_y"])


@pytest.mark.parametrize("side", [8, 28, 32])
def test_parameters_follow_the_papers_magnitudes(side):
    level = torch.linspace(0.1, 9.99, 100)
    sign = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    param = {name: op.param(level, sign, (side, side)) for name, op in OPS.items()}
    assert set(param["posterize"].tolist()) == {1.0, 2.0, 3.0, 4.0}
    assert param["rotate"].abs().max() == 29 and param["shear_x"].abs().max() <= 0.3
    assert 0 < param["solarize"].min() and param["solarize"].max() <= 1
    assert param["translate_y"].abs().max() == int(9.99 * side / 30)  # a third of the side at level 10
    assert (param["rotate"] * sign >= 0).all() and (param["translate_x"] * sign >= 0).all()


def per_sample(value: float, n: int = 2) -> torch.Tensor:
    return torch.full((n,), float(value))


@pytest.mark.parametrize("c", [1, 3])
def test_autocontrast_stretches_each_channel(c):
    x = 0.4 + 0.2 * torch.rand(2, c, 4, 4)
    y = OPS["autocontrast"](x, per_sample(0))
    assert torch.allclose(y.amin((2, 3)), torch.zeros(2, c)) and torch.allclose(y.amax((2, 3)), torch.ones(2, c))
    flat = torch.full((1, c, 4, 4), 0.3)
    assert torch.equal(OPS["autocontrast"](flat, per_sample(0, 1)), flat)


def test_equalize_flattens_the_histogram():
    # 64 pixels crowded into four low levels, 16 of each: equalised they spread over [0, 1].
    x = (torch.arange(64) // 16).float().view(1, 1, 8, 8) / 255
    y = OPS["equalize"](x, per_sample(0, 1))
    assert torch.equal(y.unique(), torch.tensor([0.0, 85, 170, 255]) / 255)
    assert torch.equal(OPS["equalize"](torch.full((1, 3, 8, 8), 0.5), per_sample(0, 1)), torch.full((1, 3, 8, 8), 0.5))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_posterize_leaves_at_most_2_to_the_bits_levels(bits):
    x = torch.rand(2, 3, 16, 16)
    y = OPS["posterize"](x, per_sample(bits))
    assert len(y.unique()) <= 2**bits
    assert (y <= x + 0.5 / 255).all() and (x - y < 2 ** (8 - bits) / 255).all()


def test_solarize_inverts_above_the_threshold():
    x = torch.linspace(0, 1, 16).view(1, 1, 4, 4).repeat(2, 3, 1, 1)
    y = OPS["solarize"](x, torch.tensor([0.5, 1.1]))
    assert torch.equal(y[0], torch.where(x[0] >= 0.5, 1 - x[0], x[0]))
    assert torch.equal(y[1], x[1])


@pytest.mark.parametrize("c", [1, 3])
def test_translate_shifts_content(c):
    x = torch.rand(2, c, 8, 8)
    right = OPS["translate_x"](x, per_sample(2))
    torch.testing.assert_close(right[..., 2:], x[..., :-2])
    assert (right[..., :2] == 0).all()
    up = OPS["translate_y"](x, per_sample(-3))
    torch.testing.assert_close(up[..., :-3, :], x[..., 3:, :])


def test_rotate_90_degrees_equals_rot90():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(OPS["rotate"](x, per_sample(90)), torch.rot90(x, 1, (2, 3)))
    torch.testing.assert_close(OPS["rotate"](x, per_sample(0)), x)


def test_shear_moves_rows_by_their_offset_from_the_centre():
    x = torch.rand(1, 1, 9, 9)
    y = OPS["shear_x"](x, per_sample(0.25, 1))  # rows 4 apart from the centre move by 1 pixel
    torch.testing.assert_close(y[0, 0, 4], x[0, 0, 4])
    torch.testing.assert_close(y[0, 0, 8, 1:], x[0, 0, 8, :-1])
    torch.testing.assert_close(y[0, 0, 0, :-1], x[0, 0, 0, 1:])
    torch.testing.assert_close(OPS["shear_y"](x, per_sample(0.25, 1)).mT, OPS["shear_x"](x.mT, per_sample(0.25, 1)))


def test_jensen_shannon():
    a, b, c = torch.randn(3, 5, 10)
    assert jensen_shannon(a, a, a).abs() < 1e-6
    js = jensen_shannon(a, b, c)
    assert js > 0
    torch.testing.assert_close(jensen_shannon(b, c, a), js)
    torch.testing.assert_close(jensen_shannon(a, b), jensen_shannon(b, a))
    certain = 100 * torch.eye(3)  # three disjoint, nearly certain distributions
    disjoint = jensen_shannon(certain[[0]], certain[[1]], certain[[2]])
    assert disjoint <= math.log(3) + 1e-6 and disjoint > math.log(3) - 1e-3
    with pytest.raises(CardkitError):
        jensen_shannon(a)
