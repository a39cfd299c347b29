"""Reference values: numbers computed by hand or by an independent implementation, compared
exactly, so that a plausible wrong implementation (a shifted table, a wrong confidence level, a
missing term) fails rather than only a broken one."""

import math
import statistics

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from cardkit.certify import crown_bounds, crown_margin_bounds, ibp_bounds, ibp_margin_bounds
from cardkit.certify.smoothing import ABSTAIN, certify, lower_confidence_bound
from cardkit.compress import model_size
from cardkit.compress.quantize import QuantSpec, quantize_kmeans
from cardkit.prune.atmc import FACTORS, AtmcConfig, AtmcGroup, to_atmc
from cardkit.prune.masked import add_masks

# --- randomized smoothing ----------------------------------------------------------------------

GRID_N = [1, 2, 10, 100, 1000, 100_000]
GRID_ALPHA = [0.5, 0.05, 0.001, 1e-6]


def _successes(n):
    return sorted({0, 1, n // 3, n // 2, n - 1, n})


@pytest.mark.parametrize("alpha", GRID_ALPHA)
@pytest.mark.parametrize("n", GRID_N)
def test_clopper_pearson_lower_bound_is_the_beta_quantile(n, alpha):
    for k in _successes(n):
        bound = lower_confidence_bound(k, n, alpha)
        if k == 0:
            # No success: the bound is 0 (beta.ppf(alpha, 0, n + 1) is undefined).
            assert bound == 0.0
            continue
        # Catches a shifted parameterisation (beta(k + 1, n - k), the upper bound's) and a
        # two-sided level (alpha / 2): each moves the bound by far more than 1e-12.
        assert bound == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=0, abs=1e-12)
        # Independently of the beta quantile: exactly alpha of Bin(n, bound) reaches k.
        assert binom.sf(k - 1, n, bound) == pytest.approx(alpha, rel=1e-6)
        if k == n:  # closed form: P(all n succeed) = p^n = alpha
            assert bound == pytest.approx(alpha ** (1 / n), rel=0, abs=1e-12)


class Scripted(nn.Module):
    """Classifies the i-th noisy input it is ever given (over all calls, batches in order) as
    `labels[i]`, and keeps every input, so a test knows which draws went where."""

    def __init__(self, labels, classes=3):
        super().__init__()
        self.labels, self.classes, self.seen = torch.as_tensor(labels), classes, []

    def forward(self, x):
        start = sum(len(s) for s in self.seen)
        self.seen.append(x.detach().flatten(1).clone())
        labels = self.labels[start:start + len(x)]
        assert len(labels) == len(x), "more noise draws than n0 + n"
        return nn.functional.one_hot(labels, self.classes).float()


@pytest.mark.parametrize("batch", [7, 1000])
def test_certify_selects_on_n0_draws_and_estimates_on_n_other_draws(batch):
    n0, n, k, sigma, alpha = 20, 300, 290, 0.5, 0.001
    # Selection draws all say class 2; estimation draws say 2 exactly k times out of n, then 1.
    labels = [2] * n0 + [2] * k + [1] * (n - k)
    model = Scripted(labels)
    label, radius = certify(model, torch.zeros(1, 2, 2), sigma, n0, n, alpha, batch, 3)
    seen = torch.cat(model.seen)
    # Exactly n0 + n draws, every one a fresh noise sample (none reused between the two stages).
    assert len(seen) == n0 + n and len(torch.unique(seen, dim=0)) == n0 + n
    assert label == 2
    # The estimate counts only the n estimation draws: pooling the selection draws would give
    # lcb(k + n0, n + n0), reusing them would give lcb(n0, n0); both are larger.
    p_lower = beta.ppf(alpha, k, n - k + 1)
    assert radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert radius == pytest.approx(sigma * statistics.NormalDist().inv_cdf(p_lower), rel=1e-9)
    pooled = sigma * norm.ppf(beta.ppf(alpha, k + n0, n + n0 - k - n0 + 1))
    assert abs(radius - pooled) > 1e-3


def test_certify_guesses_from_the_selection_draws_only():
    n0, n = 10, 200
    # Selection says class 1; estimation says class 0 every time. Cohen et al.'s CERTIFY keeps
    # the guess from the selection draws, so the estimation counts of class 1 are 0: abstain.
    # (Picking the top class of the estimation draws would certify class 0.)
    model = Scripted([1] * n0 + [0] * n)
    assert certify(model, torch.zeros(1, 2, 2), 0.25, n0, n, 0.01, 64, 3) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 1.0])
@pytest.mark.parametrize("k,n,alpha", [(1000, 1000, 0.001), (600, 1000, 0.001), (9_990, 10_000, 0.05)])
def test_certified_radius_is_sigma_times_the_inverse_normal_of_the_bound(sigma, k, n, alpha):
    model = Scripted([0] * 5 + [0] * k + [1] * (n - k), classes=2)
    label, radius = certify(model, torch.zeros(1, 1, 1), sigma, 5, n, alpha, 4096, 2)
    p_lower = beta.ppf(alpha, k, n - k + 1)
    assert label == 0 and p_lower > 0.5
    # Catches sigma / 2 (the two-class form without pB) and Phi^-1 of the point estimate k / n.
    assert radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert radius == pytest.approx(sigma * statistics.NormalDist().inv_cdf(p_lower), rel=1e-9)
    assert radius < sigma * norm.ppf(min(k / n, 1 - 1e-16))


def test_a_bound_below_one_half_abstains():
    # 520 of 1000 at alpha 0.001: the bound is about 0.47 < 1/2, so no radius.
    assert beta.ppf(0.001, 520, 481) < 0.5
    model = Scripted([0] * 5 + [0] * 520 + [1] * 480, classes=2)
    assert certify(model, torch.zeros(1, 1, 1), 0.25, 5, 1000, 0.001, 1000, 2) == (ABSTAIN, 0.0)


# --- size accounting ---------------------------------------------------------------------------


def _pruned_quantized_model(scheme_a):
    """Linear(8, 4) masked and uniform-quantized, Linear(4, 2) masked with a 2-bit k-means
    codebook, Linear(2, 3) plain with zeros in its weight (counted as removed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    a, b = add_masks(model, layers=lambda name, module: name in ("0", "2"))
    with torch.no_grad():
        a.mask.zero_()
        a.mask.view(-1)[[0, 1, 2, 3, 16, 17, 18, 19]] = 1
        a.weight.mul_(a.mask)
        b.mask.copy_(torch.tensor([[1.0, 0, 1, 0], [1, 0, 1, 0]]))
        b.weight.copy_(torch.tensor([[0.5, 9, -1, 9], [0.5, 9, -1, 9]]) * b.mask)
        model[4].weight.copy_(torch.tensor([[1.0, 0], [0, 2], [0, 0]]))
    bits, per_channel = scheme_a
    a.set_quantizer(QuantSpec("uniform", bits, per_channel))
    b.set_quantizer(QuantSpec("kmeans", 2))
    return model


@pytest.mark.parametrize("scheme_a,values_a,tables_a", [
    ((4, False), 8 * 4, 32),  # 8 kept x 4 bits; one float32 scale
    ((4, True), 8 * 4, 4 * 32),  # one scale per output channel (4)
    ((8, False), 8 * 8, 32),
    ((1, False), 8 * 1, 32),  # 1-bit uniform is binary: a sign bit each, one alpha
])
def test_size_of_a_hand_built_pruned_and_quantized_model_bit_for_bit(scheme_a, values_a, tables_a):
    report = model_size(_pruned_quantized_model(scheme_a))
    # Layer 0 (32 weights) keeps flat positions 0-3 and 16-19: gaps 1,1,1,1,13,1,1,1. At width 1
    # every gap g takes g entries (g - 1 escapes): 8 + 12 = 20 bits; width 2 takes (8 + 4) x 2 = 24,
    # width 3 (8 + 1) x 3 = 27, width 4 can no longer beat 20; the bitmap takes 32. So 20 bits.
    positions_a = 20
    # Layer 2 (8 weights) keeps 0, 2, 4, 6 (values 0.5, -1, 0.5, -1): gaps 1,2,2,2 at width 1 are
    # 1 + 2 + 2 + 2 = 7 bits < 8 for the bitmap. k-means converges to {0, -1, -0.25, 0.5} (the
    # empty cell keeps its centre); two centres are in use, so 1-bit codes and 2 float32 centres.
    values_b, positions_b, tables_b = 4 * 1, 7, 2 * 32
    # Layer 4 (6 weights, float) has nonzeros at 0 and 3: gaps 1,3 at width 1: 1 + 3 = 4 bits < 6.
    values_c, positions_c = 2 * 32, 4
    biases = 32 * (4 + 2 + 3)
    expected = [("0.weight", 8, values_a, positions_a, tables_a), ("2.weight", 4, values_b, positions_b, tables_b),
                ("4.weight", 2, values_c, positions_c, 0)]
    assert [(t.name, t.kept, t.values, t.positions, t.tables) for t in report.tensors] == expected
    # A missing term (positions, tables or the float32 biases) or a value charged at 32 bits
    # instead of its code width changes this total.
    total = values_a + positions_a + tables_a + values_b + positions_b + tables_b + values_c + positions_c + biases
    assert report.other_bits == biases and report.bits == total
    assert report.bytes == math.ceil(total / 8)
    assert report.dense_bits == 32 * (32 + 8 + 6 + 9)  # every weight and bias as float32
    assert report.compression_ratio == report.dense_bits / total


def test_size_of_a_hand_built_atmc_layer_bit_for_bit():
    model = nn.Sequential(nn.Linear(4, 4))
    (layer,) = to_atmc(model, rank=0.25, bits=2)  # rank 1: U 4x1, V 1x4, C 4x4; 4-entry codebooks
    factors = {  # codebook, values (each a centre), mask
        "u": ([0.0, 1, -1, 2], [1.0, 0, -1, 1], [1.0, 0, 1, 1]),
        "v": ([0.0, 0.5, 0.25, -0.5], [0.5, 0.25, -0.5, 0.5], [1.0] * 4),
        "c": ([0.0, 3, -3, 7], [3.0] + [0.0] * 14 + [-3.0], [1.0] + [0.0] * 14 + [1.0]),
    }
    with torch.no_grad():
        for name, (codebook, values, mask) in factors.items():
            theta, kept, table = layer.factor(name)
            table.copy_(torch.tensor(codebook))
            theta.copy_(torch.tensor(values).view_as(theta))
            kept.copy_(torch.tensor(mask).view_as(kept))
        layer.hard.fill_(True)
    report = model_size(model)
    # U: 3 kept, centres 1 and -1 in use -> 1-bit codes, 2 centres; positions 1,0,1,1: gaps 1,2,1
    #    cost 4 bits at width 1, a tie with the 4-bit bitmap, which wins ties.
    # V: all 4 kept (dense, no positions), centres 0.5, 0.25, -0.5 in use -> 2-bit codes, 3 centres.
    # C: 2 of 16 kept (positions 0 and 15, gaps 1 and 15): width 4 needs 2 entries = 8 bits
    #    (width 1: 16, width 2: 12, width 3: 12; the bitmap: 16); centres 3, -3 -> 1 bit, 2 centres.
    expected = [("0.u", 3, 3 * 1, 4, "bitmap", 2 * 32), ("0.v", 4, 4 * 2, 0, "dense", 3 * 32),
                ("0.c", 2, 2 * 1, 8, "gaps", 2 * 32)]
    assert [(t.name, t.kept, t.values, t.positions, t.position_format, t.tables)
            for t in report.tensors] == expected
    # Catches counting every codebook entry (4 x 32 per factor), full 2-bit codes, the dense
    # U V + C weight instead of the factors, or a dropped bias.
    total = (3 + 4 + 64) + (8 + 0 + 96) + (2 + 8 + 64) + 32 * 4
    assert report.bits == total == 377
    assert report.dense_bits == 32 * (16 + 4)


# --- interval and CROWN bounds on a hand-computed 2-2-2 ReLU network --------------------------


def _two_two_two():
    """h = W1 x + b1, r = relu(h), logits = W2 r + b2, with
    W1 = [[1, 1], [1, -1]], b1 = [-1/2, -1/4], W2 = [[2, -1], [1, 1]], b2 = [1/4, 0]."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-0.5, -0.25]))
        net[2].weight.copy_(torch.tensor([[2.0, -1.0], [1.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.25, 0.0]))
    return net


# The input box: x = (1/2, 1/2) with eps 1/2 is [0, 1]^2; eps 3/4 reaches [-1/4, 5/4]^2, which the
# bounds clip to [0, 1]^2, so both give the same numbers (an unclipped box would not).
#
# IBP. h1 = x1 + x2 - 1/2 in [-1/2, 3/2], h2 = x1 - x2 - 1/4 in [-5/4, 3/4];
#      r1 in [0, 3/2], r2 in [0, 3/4].
#      logit0 = 2 r1 - r2 + 1/4 in [0 - 3/4 + 1/4, 3 - 0 + 1/4] = [-1/2, 13/4];
#      logit1 = r1 + r2 in [0, 9/4].
#      margin (y = 0) m = logit0 - logit1 = r1 - 2 r2 + 1/4, through the last layer at once:
#      centre 3/4 - 3/4 + 1/4 = 1/4, radius 1 x 3/4 + 2 x 3/8 = 3/2: m in [-5/4, 7/4]
#      (differencing the logit bounds would give -1/2 - 9/4 = -11/4).
# CROWN. Both ReLUs are unstable. Upper lines: r <= u / (u - l) (h - l):
#      r1 <= 3/4 h1 + 3/8, r2 <= 3/8 h2 + 15/32. Lower lines: slope 1 when u > -l (r1 >= h1),
#      else 0 (r2 >= 0).
#      m >= h1 - 2 (3/8 h2 + 15/32) + 1/4 = 1/4 x1 + 7/4 x2 - 1       -> min -1 at (0, 0)
#      logit0 >= 2 h1 - (3/8 h2 + 15/32) + 1/4 = 13/8 x1 + 19/8 x2 - 9/8 -> min -9/8
#      logit0 <= 2 (3/4 h1 + 3/8) - 0 + 1/4 = 3/2 x1 + 3/2 x2 + 1/4     -> max 13/4
#      logit1 >= h1 + 0 = x1 + x2 - 1/2                                  -> min -1/2
#      logit1 <= (3/4 h1 + 3/8) + (3/8 h2 + 15/32) = 9/8 x1 + 3/8 x2 + 3/8 -> max 15/8
# The exact minimum of m over the box is -3/4 (at (1, 0)): IBP -5/4 < CROWN -1 < -3/4.
IBP_LOGITS = ([-0.5, 0.0], [3.25, 2.25])
IBP_MARGIN = (-1.25, 1.75)
CROWN_MARGIN = -1.0
CROWN_LOGITS = ([-1.125, -0.5], [3.25, 1.875])


@pytest.mark.parametrize("eps", [0.5, 0.75])
def test_ibp_values_of_the_hand_computed_network(eps):
    net, x, y = _two_two_two(), torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    with torch.no_grad():
        logits = ibp_bounds(net, x, eps)
        margin = ibp_margin_bounds(net, x, y, eps)
    assert logits.lower.tolist() == [IBP_LOGITS[0]] and logits.upper.tolist() == [IBP_LOGITS[1]]
    # The margin folded into the last layer (-5/4), not the difference of logit bounds (-11/4).
    assert (margin.lower.item(), margin.upper.item()) == IBP_MARGIN


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("eps", [0.5, 0.75])
def test_crown_values_of_the_hand_computed_network(eps, intermediate):
    net, x, y = _two_two_two(), torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    with torch.no_grad():
        margin = crown_margin_bounds(net, x, y, eps, intermediate)
        logits = crown_bounds(net, x, eps, intermediate)
    # The exact value, not only a sound one: IBP's relaxation (-5/4), a lower line of slope 0 for
    # r1 (-5/4), the chord u / (u - l) as r1's lower line (-7/8), or r2's upper line without its
    # intercept (-1/16) all miss -1.
    assert margin.item() == pytest.approx(CROWN_MARGIN, abs=1e-6)
    assert logits.lower[0].tolist() == pytest.approx(CROWN_LOGITS[0], abs=1e-6)
    assert logits.upper[0].tolist() == pytest.approx(CROWN_LOGITS[1], abs=1e-6)
    # Sound: below the exact minimum -3/4 of the margin over the box, found on a fine grid.
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 101), torch.linspace(0, 1, 101),
                                      indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        out = net(grid)
    assert (out[:, 0] - out[:, 1]).min().item() == pytest.approx(-0.75, abs=1e-6)


# --- ATMC projection and k-means codebooks -----------------------------------------------------


def test_atmc_projection_keeps_exactly_the_global_top_k_over_all_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = to_atmc(model, rank=0.5, bits=2)
    entries = [layer.factor(name)[:2] for layer in layers for name in FACTORS]  # (theta, mask)
    sizes = [theta.numel() for theta, _ in entries]
    n = sum(sizes)
    # Distinct magnitudes 1..n shuffled over every factor of both layers, signs alternating: the
    # k largest are exactly the entries whose magnitude exceeds n - k.
    magnitudes = torch.randperm(n).float() + 1
    signed = magnitudes * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    group = AtmcGroup(model, layers, AtmcConfig(sparsity=0.5, bits=2), dense_bits=0)
    for k in (0, 1, 7, n // 2, n - 1, n):
        with torch.no_grad():
            for (theta, _), part in zip(entries, signed.split(sizes)):
                theta.copy_(part.view_as(theta))
        group.project(k)
        masks = torch.cat([mask.reshape(-1) for _, mask in entries])
        values = torch.cat([theta.detach().reshape(-1) for theta, _ in entries])
        # Catches a top-k per layer or per factor, and a projection by signed value.
        assert torch.equal(masks.bool(), magnitudes > n - k)
        assert torch.equal(values, torch.where(magnitudes > n - k, signed, 0))


def test_one_dimensional_kmeans_converges_to_the_known_centres():
    # Three tight clusters around -1, 2 and 5. The free centres start at the middles of three
    # equal cells of [-1.1, 5.2]: -0.05, 2.05, 4.15; the first Lloyd step moves them to the
    # cluster means -1, 2, 5 (the zero centre, fixed, gets no values), the second changes nothing.
    values = torch.tensor([-1.1, -1.0, -0.9, 1.9, 2.0, 2.1, 4.8, 5.0, 5.2])
    q = quantize_kmeans(values, bits=2, iterations=20)
    assert q.codebook.tolist() == pytest.approx([0.0, -1.0, 2.0, 5.0], abs=1e-6)
    assert q.codes.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    # An off-by-one initial grid (cells at i / (size - 1) instead of the middles) or a zero centre
    # that moves would end elsewhere: e.g. with the fixed zero, 0.1 and -0.1 go to centre 0.
    with_zero = torch.cat([values, torch.tensor([0.1, -0.1])])
    q = quantize_kmeans(with_zero, bits=2, iterations=20)
    assert q.codebook.tolist() == pytest.approx([0.0, -1.0, 2.0, 5.0], abs=1e-6)
    assert q.values[-2:].tolist() == [0.0, 0.0]


def test_kmeans_centres_are_the_means_of_their_cells_on_an_uneven_set():
    # Values 1, 2, 3, 10, 11 and 100 with 2 bits: zero plus three free centres starting at
    # 1 + 99 x (1/6, 1/2, 5/6) = 17.5, 50.5, 83.5. Step 1 (midpoints 8.75, 34, 67): the fixed
    # zero takes 1, 2, 3; 17.5 -> mean(10, 11) = 10.5; 50.5 gets nothing and stays; 83.5 -> 100.
    # Step 2 (midpoints 5.25, 30.5, 75.25) assigns the same cells: a fixed point. Catches a zero
    # centre that moves (to 2), an empty cell dropped or reset, and cells split at the centres.
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 100.0])
    q = quantize_kmeans(values, bits=2, iterations=20)
    assert q.codebook.tolist() == pytest.approx([0.0, 10.5, 50.5, 100.0], abs=1e-5)
    assert q.values.tolist() == pytest.approx([0.0, 0.0, 0.0, 10.5, 10.5, 100.0], abs=1e-5)
