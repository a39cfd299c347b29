"""The layer names certify/ibp.py reports as supported (they appear in its refusals)."""

from cardkit.certify.ibp import supported_layers


def test_supported_layers_are_named_exactly():
    assert supported_layers() == ["AdaptiveAvgPool2d", "AvgPool2d", "BasicBlock", "BatchNorm2d (eval)", "Conv2d",
                                  "Dropout", "Flatten", "Identity", "Linear", "MaxPool2d", "Normalize",
                                  "PreActBlock", "ReLU", "Sequential"]


# --- randomized smoothing: the result of smoothed_accuracy, predict's test, parameter limits -----

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import binom, norm  # noqa: E402
from torch import nn  # noqa: E402

from cardkit.certify.smoothing import (ABSTAIN, _Noise, certify, check_smoothing, lower_confidence_bound,  # noqa: E402
                                       predict, smoothed_accuracy)
from cardkit.errors import CardkitError  # noqa: E402


class Steps(nn.Module):
    """Class 0 below 1/2, class 1 in [1/2, 3/2), class 2 above, of the first pixel; records the
    size of every batch it is given."""

    def __init__(self, classes=3):
        super().__init__()
        self.classes, self.batches = classes, []

    def forward(self, x):
        self.batches.append(len(x))
        first = x.flatten(1)[:, 0]
        label = (first >= 0.5).long() + (first >= 1.5).long()
        return nn.functional.one_hot(label, self.classes).float()


def _points(*firsts):
    xs = torch.zeros(len(firsts), 1, 2, 2)
    xs[:, 0, 0, 0] = torch.tensor(firsts)
    return xs


def test_smoothed_accuracy_counts_certified_wrong_and_abstaining_points_exactly():
    sigma, n, alpha = 1e-4, 1000, 0.001
    # With sigma 1e-4 every draw of a point at 0 or 2 has its class: n of n, whose bound is
    # alpha^(1/n) in closed form, and radius sigma x Phi^-1(alpha^(1/n)). A point at 1/2 is a coin
    # flip between classes 0 and 1: its bound is below 1/2 and it abstains.
    radius = sigma * norm.ppf(lower_confidence_bound(n, n, alpha))
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    xs, ys = _points(0.0, 2.0, 2.0, 0.5), torch.tensor([0, 2, 1, 0])  # correct, correct, wrong, abstains
    torch.manual_seed(0)
    result = smoothed_accuracy(Steps(), [(xs[:2], ys[:2]), (xs[2:], ys[2:])], sigma=sigma, n0=10, n=n,
                               alpha=alpha, radii=[0.0, radius, 2 * radius], batch=400, classes=3, split="val")
    # Two of four correct and certified up to their radius inclusive, none beyond it.
    assert result.certified_accuracy == [0.5, 0.5, 0.0]
    assert result.abstain_rate == 0.25 and result.samples == 4
    assert result.mean_radius == pytest.approx(radius, rel=1e-12)  # over the correct points only
    assert (result.split, result.sigma, result.n0, result.n, result.alpha, result.radii) == \
        ("val", sigma, 10, n, alpha, [0.0, radius, 2 * radius])
    assert 0 <= result.seconds < 60
    # One correct point is all of the accuracy; one wrong point leaves a mean radius of 0.
    one = smoothed_accuracy(Steps(), [(xs[:1], ys[:1])], sigma=sigma, n0=10, n=n, radii=[0.0], classes=3)
    assert one.certified_accuracy == [1.0] and one.abstain_rate == 0.0
    wrong = smoothed_accuracy(Steps(), [(xs[2:3], ys[2:3])], sigma=sigma, n0=10, n=n, radii=[0.0], classes=3)
    assert wrong.certified_accuracy == [0.0] and wrong.mean_radius == 0.0


def test_smoothed_accuracy_defaults_are_cohen_et_al_s():
    # n0 = 100 selection draws, n = 10,000 estimation draws, alpha = 0.001, in batches of 1000.
    model = Steps(classes=10)
    result = smoothed_accuracy(model, [(_points(0.0), torch.tensor([0]))], sigma=1e-4)
    assert model.batches == [100] + [1000] * 10
    assert (result.n0, result.n, result.alpha, result.split) == (100, 10_000, 0.001, "test")
    assert result.radii == [0.0, 0.25, 0.5, 0.75, 1.0]


class Coin(nn.Module):
    """Class 0 when the first pixel's noise is below t (probability Phi(t / sigma)), else 1."""

    def __init__(self, t=0.25):
        super().__init__()
        self.t = t

    def forward(self, x):
        first = x.flatten(1)[:, 0]
        return torch.stack([(first < self.t).float(), (first >= self.t).float()], 1)


def test_smoothed_accuracy_with_a_seed_draws_each_point_from_its_own_seed():
    # Point i's noise comes from seed (seed x 1,000,003 + i), whatever else is evaluated: the
    # mean radius equals that of certify run point by point under those seeds.
    sigma, n0, n, alpha, seed = 0.25, 20, 500, 0.01, 7
    xs, ys = _points(0.0, 0.0, 0.0), torch.tensor([0, 0, 0])
    radii = []
    for i in range(3):
        torch.manual_seed(seed * 1_000_003 + i)
        label, radius = certify(Coin(), xs[i], sigma, n0, n, alpha, 1000, 2)
        assert label == 0
        radii.append(radius)
    assert len(set(radii)) == 3  # three different noise streams
    torch.manual_seed(123)  # the global state does not matter with a seed
    result = smoothed_accuracy(Coin(), [(xs, ys)], sigma=sigma, n0=n0, n=n, alpha=alpha, radii=[0.0],
                               classes=2, seed=seed)
    assert result.mean_radius == pytest.approx(float(np.mean(radii)), rel=1e-12)


def test_predict_abstains_exactly_when_the_two_sided_binomial_p_value_exceeds_alpha():
    # Three classes; the draws give class 1 60 times, class 2 40 times, class 0 never. The
    # two-sided p-value of 60 of 100 at 1/2 is 2 P(X >= 60) = 0.0569 (X ~ Bin(100, 1/2)).
    p_value = 2 * binom.sf(59, 100, 0.5)
    assert p_value == pytest.approx(0.056888, abs=1e-6)

    class Fixed(nn.Module):
        def forward(self, x):
            labels = torch.tensor([1] * 60 + [2] * 40)[: len(x)]
            return nn.functional.one_hot(labels, 3).float()

    x = torch.zeros(1, 1, 1)
    assert predict(Fixed(), x, 0.25, 100, 0.05, 100, 3) == ABSTAIN  # p > alpha
    assert predict(Fixed(), x, 0.25, 100, 0.06, 100, 3) == 1  # p < alpha: the top class


def test_smoothing_parameter_limits_are_inclusive_where_valid():
    check_smoothing(0.25, 1, 1, 0.001)  # one selection and one estimation draw
    check_smoothing(0.25, 100, 100, 0.5)  # n0 = n
    for n0, n in [(0, 100), (0, 0), (101, 100), (1, 0)]:
        with pytest.raises(CardkitError, match=rf"^n0={n0}, n={n} are not valid; need 1 <= n0 <= n"):
            check_smoothing(0.25, n0, n, 0.001)


def test_noise_keeps_the_input_dtype():
    x = torch.zeros(2, 2, dtype=torch.float64)
    assert _Noise(3, x).draw(3, 0.5, x).dtype == torch.float64


# --- CROWN through eval BatchNorm2d, its default intermediate bounds, partial gradients ----------

from cardkit.certify import crown_bounds, crown_margin_bounds, ibp_bounds  # noqa: E402
from cardkit.certify.crown import _ConvBoxBound, crown_ibp_margin_bounds  # noqa: E402


def _conv_bn_net(batchnorm=True):
    """Conv2d(1, 3, 2) on 5x5 inputs, an eval BatchNorm2d(3) with a large eps, ReLU, Linear(48, 3)."""
    g = torch.Generator().manual_seed(0)
    conv, fc = nn.Conv2d(1, 3, 2), nn.Linear(48, 3)
    bn = nn.BatchNorm2d(3, eps=0.5)
    with torch.no_grad():
        for p in (*conv.parameters(), *fc.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        bn.weight.copy_(torch.tensor([2.0, -0.5, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.1, 0.05]))
        bn.running_mean.copy_(torch.tensor([0.2, -0.3, 0.1]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 3.5]))
    return nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), fc).eval()


def _folded(net):
    """The same network with the BatchNorm folded into the convolution by hand:
    y = gamma (z - mean) / sqrt(var + eps) + beta, so W' = s W, b' = s (b - mean) + beta with
    s = gamma / sqrt(var + eps)."""
    conv, bn, fc = net[0], net[1], net[4]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(1, 3, 2)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * s.view(-1, 1, 1, 1))
        folded.bias.copy_(s * (conv.bias - bn.running_mean) + bn.bias)
    return nn.Sequential(folded, nn.ReLU(), nn.Flatten(), fc).eval()


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_crown_through_eval_batchnorm_equals_the_folded_network(intermediate):
    # An eval BatchNorm is a per-channel affine map: every bound equals that of the network with
    # the map folded into the convolution (intervals through a diagonal scale are exact).
    net = _conv_bn_net()
    x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    with torch.no_grad():
        folded = _folded(net)
        assert torch.allclose(net(x), folded(x), atol=1e-5)
        for a, b in [(crown_bounds(net, x, 0.1, intermediate), crown_bounds(folded, x, 0.1, intermediate)),
                     (ibp_bounds(net, x, 0.1), ibp_bounds(folded, x, 0.1))]:
            assert torch.allclose(a.lower, b.lower, atol=1e-4) and torch.allclose(a.upper, b.upper, atol=1e-4)
        assert torch.allclose(crown_margin_bounds(net, x, y, 0.1, intermediate),
                              crown_margin_bounds(folded, x, y, 0.1, intermediate), atol=1e-4)


def _three_layer_net():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def test_crown_bounds_default_to_full_crown_intermediates():
    # With a hidden layer after the first, CROWN's own intermediate bounds are tighter than IBP's,
    # so the two settings differ, and the default is full CROWN.
    net, x = _three_layer_net(), torch.full((1, 3), 0.5)
    with torch.no_grad():
        full, ibp = crown_bounds(net, x, 0.3, "crown"), crown_bounds(net, x, 0.3, "ibp")
        default = crown_bounds(net, x, 0.3)
    assert (full.lower > ibp.lower + 1e-3).any()
    assert torch.equal(default.lower, full.lower) and torch.equal(default.upper, full.upper)
    # CROWN-IBP's pair is CROWN on IBP intermediates, whatever crown_margin_bounds defaults to.
    y = torch.tensor([1])
    with torch.no_grad():
        crown_ibp, _ = crown_ibp_margin_bounds(net, x, y, 0.3)
        assert torch.equal(crown_ibp, crown_margin_bounds(net, x, y, 0.3, "ibp"))


def test_crown_ibp_names_a_last_layer_that_is_not_linear():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Flatten()).eval()
    with pytest.raises(CardkitError, match=r"^margin bounds need a Linear last layer, got '3' \(Flatten\)$"):
        crown_ibp_margin_bounds(net, torch.zeros(1, 2), torch.tensor([0]), 0.1)


def test_box_bound_gradients_when_only_some_inputs_need_them():
    # Frozen weights with trainable coefficients, and the reverse: each gradient still matches
    # finite differences.
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    flat = rand(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    weight, mid = rand(4, 2, 3, 3), rand(2, 4, 3, 3)
    radius = torch.rand(2, 2, 5, 5, generator=g, dtype=torch.float64) + 0.1
    bound = lambda f, w, m, r: _ConvBoxBound.apply(f, w, m, r, (2, 2), (1, 1), (0, 0))  # noqa: E731
    assert torch.autograd.gradcheck(lambda f: bound(f, weight, mid, radius), (flat.requires_grad_(),), fast_mode=True)
    assert torch.autograd.gradcheck(lambda w: bound(flat.detach(), w, mid, radius), (weight.requires_grad_(),),
                                    fast_mode=True)


# --- verified accuracy on a network whose bounds are exact; CROWN through pooling and dropout ---

from cardkit.certify.verify import verified_accuracy  # noqa: E402


@pytest.mark.parametrize("method", ["ibp", "crown_ibp", "crown"])
def test_verified_accuracy_by_hand_on_the_identity_logits(method):
    # logits = x, so the margin of class 0 over the Linf ball of radius 1/4 is at least
    # (x0 - 1/4) - (x1 + 1/4), exactly, for every method. Points, in two batches:
    #   (1, 0) y 0: margin >= 1/2, verified;  (3/4, 1/4) y 0: margin >= 0, correct but not verified
    #   (1/4, 3/4) y 0: misclassified;        (0, 1) y 1: margin >= 1/2, verified.
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
    xs = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    ys = torch.tensor([0, 0, 0, 1])
    net.train()
    result = verified_accuracy(net, [(xs[:2], ys[:2]), (xs[2:], ys[2:])], 0.25, method, split="val")
    assert (result.clean_accuracy, result.verified_accuracy, result.samples) == (0.75, 0.5, 4)
    assert (result.split, result.method, result.norm, result.eps) == ("val", method, "linf", 0.25)
    assert net.training  # the mode is restored
    assert verified_accuracy(net, [], 0.25, method).verified_accuracy == 0.0


def test_crown_through_average_pooling_and_dropout_equals_the_pooling_as_a_convolution():
    # AvgPool2d(2) is the stride-2 convolution with weight 1/4 on each channel's own 2x2 window,
    # and an eval Dropout the identity: the bounds are those of that network.
    g = torch.Generator().manual_seed(0)
    conv, fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(8, 3)
    with torch.no_grad():
        for p in (*conv.parameters(), *fc.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    pool = nn.Conv2d(2, 2, 2, stride=2, bias=False)
    with torch.no_grad():
        pool.weight.zero_()
        pool.weight[0, 0] = pool.weight[1, 1] = 0.25
    pooled = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), nn.Dropout(0.5), nn.Flatten(), fc).eval()
    as_conv = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), fc).eval()
    x = torch.rand(2, 1, 4, 4, generator=g)
    with torch.no_grad():
        for intermediate in ("ibp", "crown"):
            a, b = crown_bounds(pooled, x, 0.1, intermediate), crown_bounds(as_conv, x, 0.1, intermediate)
            assert torch.allclose(a.lower, b.lower, atol=1e-5) and torch.allclose(a.upper, b.upper, atol=1e-5)


def test_a_relu_with_symmetric_bounds_takes_the_zero_lower_line():
    # relu(2x - 1) over x in [0, 1]: the pre-activation is in [-1, 1], where both lower lines have
    # the same area; slope 0 is the documented choice, and gives the exact minimum 0 (slope 1
    # would give -1).
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).eval()
    with torch.no_grad():
        net[0].weight.fill_(2.0), net[0].bias.fill_(-1.0), net[2].weight.fill_(1.0), net[2].bias.zero_()
    with torch.no_grad():
        bounds = crown_bounds(net, torch.tensor([[0.5]]), 0.5, "ibp")
    assert bounds.lower.item() == 0.0 and bounds.upper.item() == 1.0


def _as_dense(conv, in_shape):
    """A convolution as the Linear layer of its Jacobian on the flattened input (plus its bias)."""
    size = math.prod(in_shape)
    with torch.no_grad():
        basis = torch.eye(size).view(size, *in_shape)
        columns = conv._conv_forward(basis, conv.weight, None).flatten(1)  # column i = L e_i
        out = conv(torch.zeros(1, *in_shape)).flatten(1)
        dense = nn.Linear(size, columns.shape[1])
        dense.weight.copy_(columns.T)
        dense.bias.copy_(out[0])
    return dense, tuple(conv(torch.zeros(1, *in_shape)).shape[1:])


@pytest.mark.parametrize("first_stride", [2, (2, 1)])
def test_crown_on_non_square_convolutions_equals_their_dense_matrices(first_stride):
    # Non-square inputs, kernels and strides, so that no height can stand in for a width: CROWN
    # through the convolutions gives the bounds of the same network written with dense matrices.
    g = torch.Generator().manual_seed(0)
    conv1 = nn.Conv2d(1, 2, (3, 2), stride=first_stride, padding=(1, 0))
    conv2 = nn.Conv2d(2, 2, (2, 3), stride=1, padding=(0, 1))
    with torch.no_grad():
        for p in (*conv1.parameters(), *conv2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    in_shape = (1, 7, 6)
    dense1, mid_shape = _as_dense(conv1, in_shape)
    dense2, out_shape = _as_dense(conv2, mid_shape)
    fc = nn.Linear(math.prod(out_shape), 3)
    conv_net = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.Flatten(), fc).eval()
    dense_net = nn.Sequential(nn.Flatten(), dense1, nn.ReLU(), dense2, nn.ReLU(), fc).eval()
    x = torch.rand(2, *in_shape, generator=g)
    with torch.no_grad():
        assert torch.allclose(conv_net(x), dense_net(x), atol=1e-5)
        for intermediate in ("ibp", "crown"):
            a, b = crown_bounds(conv_net, x, 0.05, intermediate), crown_bounds(dense_net, x, 0.05, intermediate)
            assert torch.allclose(a.lower, b.lower, atol=1e-4) and torch.allclose(a.upper, b.upper, atol=1e-4)


def test_noise_drawn_by_several_threads_is_gaussian_around_x_and_reproducible():
    # With more than one intra-op thread the buffer is filled slice by slice, each slice from its
    # own generator; the result is still x + N(0, sigma^2), and the same under the same seed.
    threads = torch.get_num_threads()
    x = torch.linspace(0, 1, 4).view(1, 2, 2)
    try:
        torch.set_num_threads(3)
        draws = []
        for _ in range(2):
            torch.manual_seed(0)
            noise = _Noise(6000, x)
            assert len(noise.generators) == 3
            draws.append(noise.draw(6000, 0.5, x).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    noise = draws[0] - x
    # 24,000 draws: the standard error of the mean is 0.0032 and that of the std 0.0023.
    assert abs(noise.mean().item()) < 0.012 and abs(noise.std().item() - 0.5) < 0.01
    thirds = noise.tensor_split(3)
    assert not torch.equal(thirds[0], thirds[1]) and not torch.equal(thirds[1], thirds[2])


def test_crown_on_a_network_ending_in_a_relu_is_refused_in_one_line():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(CardkitError, match="'2' is a ReLU; bound the logits before it"):
        crown_bounds(net, torch.rand(2, 1, 2, 2), 0.1)
