"""Randomized smoothing: analytic radii, abstention on ties, batched noise, input checks."""

import pytest
import torch
from scipy.stats import norm
from torch import nn

from cardkit.certify.smoothing import (ABSTAIN, certify, check_smoothing, lower_confidence_bound,
                                       predict, sample_counts, smoothed_accuracy)
from cardkit.errors import CardkitError


class Threshold(nn.Module):
    """Class 0 when the first pixel (clean value 0) plus noise is below t, else class 1:
    P(class 0) = Phi(t / sigma) exactly."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        first = x.flatten(1)[:, 0]
        return torch.stack([(first < self.t).float(), (first >= self.t).float()], 1)


@pytest.mark.parametrize("t,sigma", [(0.5, 0.5), (0.2, 0.25), (1.0, 0.5)])
def test_certified_radius_approaches_the_analytic_one(t, sigma):
    torch.manual_seed(0)
    label, radius = certify(Threshold(t), torch.zeros(1, 3, 3), sigma, 100, 200_000, 0.001, 20_000, 2)
    p = norm.cdf(t / sigma)
    analytic = sigma * norm.ppf(p)  # = t
    assert label == 0
    assert radius <= analytic + 1e-9  # a lower confidence bound never overshoots (w.h.p.)
    assert radius == pytest.approx(analytic, abs=0.03)


def test_ties_abstain_in_predict_and_certify():
    torch.manual_seed(0)
    tie = Threshold(0.0)  # P(class 0) = 1/2
    x = torch.zeros(1, 3, 3)
    assert predict(tie, x, 0.25, 10_000, 0.001, 5_000, 2) == ABSTAIN
    assert certify(tie, x, 0.25, 100, 10_000, 0.001, 5_000, 2) == (ABSTAIN, 0.0)
    assert predict(Threshold(1.0), x, 0.25, 10_000, 0.001, 5_000, 2) == 0


def test_noise_is_counted_in_batches_and_bounds_are_valid():
    torch.manual_seed(0)
    counts = sample_counts(Threshold(0.0), torch.zeros(1, 2, 2), 0.3, 2_345, 1_000, 2)
    assert counts.sum() == 2_345 and abs(counts[0] / 2_345 - 0.5) < 0.05
    assert lower_confidence_bound(0, 100, 0.01) == 0.0
    assert 0.9 < lower_confidence_bound(990, 1000, 0.001) < 0.99


def test_certified_accuracy_decreases_with_radius():
    torch.manual_seed(0)
    xs = torch.zeros(4, 1, 3, 3)
    ys = torch.tensor([0, 0, 1, 0])
    result = smoothed_accuracy(Threshold(0.4), [(xs, ys)], sigma=0.5, n0=50, n=2_000, batch=1_000,
                               classes=2, radii=[0.0, 0.2, 10.0])
    assert result.samples == 4
    assert result.certified_accuracy[0] == pytest.approx(0.75)  # the class-1 point is wrong
    assert result.certified_accuracy[0] >= result.certified_accuracy[1] >= result.certified_accuracy[2] == 0


@pytest.mark.parametrize("args,match", [
    ((0.0, 10, 100, 0.01), "sigma"), ((-1, 10, 100, 0.01), "sigma"), ((0.25, 200, 100, 0.01), "n0"),
    ((0.25, 10, 100, 0.0), "alpha"), ((0.25, 10, 100, 1.0), "alpha"),
])
def test_bad_smoothing_parameters(args, match):
    with pytest.raises(CardkitError, match=match):
        check_smoothing(*args)


def test_noise_is_fresh_gaussian_in_every_batch_and_reproducible():
    from cardkit.certify.smoothing import _Noise

    x = torch.linspace(0, 1, 12).view(3, 2, 2)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        noise = _Noise(5_000, x)
        draws.append([(noise.draw(5_000, 0.5, x) - x).clone() for _ in range(3)])
    first = torch.stack(draws[0])  # batches x samples x C x H x W
    assert torch.equal(first, torch.stack(draws[1]))  # same seed, same noise
    assert abs(first.mean().item()) < 0.01 and abs(first.std().item() - 0.5) < 0.01
    flat = first.flatten(0, 1).flatten(1)  # no sample repeats, no pixel correlates with another
    assert len(torch.unique(flat, dim=0)) == len(flat)
    assert torch.corrcoef(flat.T).fill_diagonal_(0).abs().max() < 0.05
