"""Fourier heat maps: basis images, symmetric and centred maps, signs, determinism, PNG output."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from cardkit.errors import CardkitError
from cardkit.eval.fourier import FourierHeatMap, fourier_basis, fourier_heat_map, save_heat_map


class MeanThreshold(nn.Module):
    """Class 1 when the image mean exceeds 0.5: it sees only the zero frequency."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)


class Constant(nn.Module):
    """Always class 0, whatever the input."""

    def forward(self, x):
        return torch.tensor([1.0, 0.0]).expand(len(x), 2)


class Recorder(nn.Module):
    """Keeps every input it sees and whether it ran in train mode."""

    def __init__(self):
        super().__init__()
        self.inputs, self.modes = [], []

    def forward(self, x):
        self.inputs.append(x.clone())
        self.modes.append(self.training)
        return torch.zeros(len(x), 2)


def linear_model(shape=(3, 8, 8), classes=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], classes))


def partner(a, b, height, width):
    """Cell of (-i, -j) in the centred map, for the cell (a, b) of (i, j)."""
    i, j = a - height // 2, b - width // 2
    return (-i + height // 2) % height, (-j + width // 2) % width


@pytest.mark.parametrize("height,width", [(8, 8), (7, 6)])
def test_basis_images_are_real_unit_norm_and_pair_symmetric(height, width):
    for i in range(height):
        for j in range(width):
            u = fourier_basis(height, width, i, j)
            assert u.shape == (height, width) and u.dtype == torch.float32
            assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
            assert torch.equal(u, fourier_basis(height, width, -i, -j))
            spectrum = torch.fft.fft2(u.double())
            support = {tuple(k) for k in spectrum.abs().gt(1e-4).nonzero().tolist()}
            assert support == {(i, j), (-i % height, -j % width)}


@pytest.mark.parametrize("height,width", [(8, 8), (7, 6)])
def test_map_is_symmetric_under_negated_frequency(height, width):
    x = torch.rand(16, 3, height, width)
    model = linear_model((3, height, width))
    result = fourier_heat_map(model, x, torch.randint(0, 4, (16,)), 2.0)
    assert len(result.error) == height and all(len(row) == width for row in result.error)
    for a in range(height):
        for b in range(width):
            c, d = partner(a, b, height, width)
            assert result.error[a][b] == result.error[c][d]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_mean_model_fails_only_at_the_zero_frequency(device):
    x = 0.3 + 0.3 * torch.rand(64, 1, 8, 8)  # far enough from 0 and 1 that no basis noise is clipped
    y = (x.mean((1, 2, 3)) > 0.5).long()
    result = fourier_heat_map(MeanThreshold(), x.to(device), y.to(device), 1.0,
                              generator=torch.Generator().manual_seed(0))
    error = torch.tensor(result.error)
    assert result.clean_error == 0.0
    assert 0.2 < error[4, 4] < 0.8  # the mean moves by +-1/8 and flips about half the labels
    error[4, 4] = 0
    assert error.abs().max() == 0


def test_constant_model_has_the_same_error_everywhere():
    y = torch.tensor([0, 1, 0, 0] * 4)
    result = fourier_heat_map(Constant(), torch.rand(16, 3, 8, 8), y, 5.0)
    assert result.clean_error == 0.25
    assert all(e == 0.25 for row in result.error for e in row)


def test_tiny_eps_gives_the_clean_error_everywhere():
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    result = fourier_heat_map(linear_model(), x, y, 1e-9)
    assert all(e == result.clean_error for row in result.error for e in row)


def test_inputs_move_by_eps_along_one_basis_image_with_a_sign_per_channel():
    x = 0.3 + 0.3 * torch.rand(2, 3, 8, 8)
    model = Recorder().train()
    fourier_heat_map(model, x, torch.zeros(2, dtype=torch.long), 0.25, batch_size=7)
    assert model.training and model.modes and not any(model.modes)
    clean, noisy = model.inputs[0], torch.cat(model.inputs[1:])
    assert torch.equal(clean, x) and len(noisy) == 34 * 2  # 34 frequency pairs in 8 x 8
    delta = noisy - x.repeat(34, 1, 1, 1)
    norms = delta.flatten(2).norm(dim=2)
    assert torch.allclose(norms, torch.full_like(norms, 0.25), atol=1e-5)
    signs = torch.sign((delta * delta[:, :1]).sum((2, 3)))
    assert torch.allclose(delta, signs[:, :, None, None] * delta[:, :1], atol=1e-6)
    assert (signs == -1).any() and (signs == 1).any()


def test_perturbed_inputs_are_clipped_to_the_unit_interval():
    model = Recorder()
    fourier_heat_map(model, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 8.0)
    noisy = torch.cat(model.inputs[1:])
    assert noisy.min() == 0 and noisy.max() == 1


def test_seeded_generator_is_deterministic_and_independent_of_batch_size():
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    model = linear_model()
    runs = [fourier_heat_map(model, x, y, 3.0, batch_size=b, generator=torch.Generator().manual_seed(1))
            for b in (500, 13, 16)]
    assert runs[0].error == runs[1].error == runs[2].error


def test_result_serialises_and_saves_a_readable_png(tmp_path):
    result = fourier_heat_map(linear_model(), torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,)), 2.0)
    assert isinstance(result, FourierHeatMap) and result.samples == 8 and result.seconds >= 0
    assert json.loads(json.dumps(result.to_dict()))["error"] == result.error
    path = tmp_path / "heat.png"
    save_heat_map(result, path, title="linear, eps 2")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize("eps,x,match", [
    (0.0, torch.rand(2, 3, 8, 8), "eps"),
    (-1.0, torch.rand(2, 3, 8, 8), "eps"),
    (float("nan"), torch.rand(2, 3, 8, 8), "eps"),
    (1.0, torch.rand(0, 3, 8, 8), "non-empty"),
])
def test_bad_inputs_are_rejected(eps, x, match):
    with pytest.raises(CardkitError, match=match):
        fourier_heat_map(linear_model(), x, torch.zeros(len(x), dtype=torch.long), eps)
