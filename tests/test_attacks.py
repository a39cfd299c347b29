import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cardkit.attacks import Threat, cw_loss, dlr_loss, pgd


def tiny_net(seed=0, in_features=3 * 6 * 6, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, classes))


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    # Push some pixels to the box edges so projection onto [0,1] matters.
    x[:, 0] = (x[:, 0] > 0.5).float()
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 8 / 255), ("l2", 0.5), ("l2", 2.0)])
@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("loss,targeted,best", [("ce", 0, False), ("ce", 0, True), ("dlr", 2, True),
                                                ("cw", 3, False)])
def test_pgd_stays_in_ball_and_box(norm, eps, random_start, restarts, loss, targeted, best):
    model, (x, y) = tiny_net(), batch()
    x_adv = pgd(model, x, y, Threat(norm, eps), steps=7, restarts=restarts, random_start=random_start,
                loss=loss, targeted=targeted, best=best)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_increases_loss_and_random_start_moves():
    model, (x, y) = tiny_net(), batch()
    threat = Threat("linf", 0.1)
    clean_loss = F.cross_entropy(model(x), y)
    adv_loss = F.cross_entropy(model(pgd(model, x, y, threat, steps=10)), y)
    assert adv_loss > clean_loss + 0.05
    # One step of size ~0 leaves only the random start: it must have moved the input.
    start_only = pgd(model, x, y, threat, steps=1, step_size=1e-12)
    assert (start_only - x).abs().amax() > 0.05
    no_start = pgd(model, x, y, threat, steps=1, step_size=1e-12, random_start=False)
    assert (no_start - x).abs().amax() < 1e-6


# --- Linear classifiers: the smallest adversarial perturbation is known in closed form -------------
#
# For logits z = W x + b and a point of class y, class j overtakes y under a perturbation delta iff
# (w_j - w_y) . delta > z_y - z_j, so the smallest Linf (L2) perturbation that does so has size
# (z_y - z_j) / ||w_y - w_j||_1 (_2), and the smallest one that misclassifies is the minimum over j.
# This holds inside [0,1] as long as the ball around each point stays inside the box, which every
# data set below checks. PGD must fool every point closer than eps (up to a small tolerance for
# the finite number of steps) and, being confined to the ball, none farther.

EPS = {"linf": 0.05, "l2": 0.2}
NEAR = 1e-4  # points within eps (1 + NEAR) are too close to the boundary to call robust in float32


def linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer).requires_grad_(False)


def pair_distances(model, x, norm):
    """(labels, d) with d[i, j] the smallest perturbation making j overtake point i's class (inf
    for j = y)."""
    layer = model[1]
    with torch.no_grad():
        z = model(x)
        y = z.argmax(1)
        gaps = z.gather(1, y[:, None]) - z
        diff = layer.weight[y][:, None, :] - layer.weight[None, :, :]
        d = gaps / diff.norm(p=1 if norm == "linf" else 2, dim=2)
        return y, d.scatter(1, y[:, None], float("inf"))


def check_box_does_not_bind(x, eps):
    # |delta_k| <= eps in both norms, so the ball stays in [0,1] when every coordinate does +- eps.
    assert x.min() - eps > 0 and x.max() + eps < 1


def along(x, direction, shift):
    """Move each point along `direction` (one per feature) by `shift` (one per point)."""
    return x + shift.view(-1, *[1] * (x.dim() - 1)) * direction.view(1, *x.shape[1:])


def assert_exactly_vulnerable_fooled(model, x, y, x_adv, dist, eps, tol):
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    vulnerable, robust = dist < eps * (1 - tol), dist > eps * (1 + NEAR)
    # Not vacuous: many points on each side, and some close to eps on each side.
    assert vulnerable.sum() >= 30 and robust.sum() >= 30
    assert (vulnerable & (dist > eps * 0.9)).sum() >= 3 and (robust & (dist < eps * 1.1)).sum() >= 3
    missed = (dist[vulnerable & ~fooled] / eps).tolist()
    assert not missed, f"PGD missed points at distance {missed} x eps"
    wrong = (dist[robust & fooled] / eps).tolist()
    assert not wrong, f"points at distance {wrong} x eps were fooled: the attack left the ball"
    return fooled


def binary_data(norm, n=400, features=(2, 4, 4), seed=0):
    """A two-class linear model and points of both classes at distances 0.5-1.5 eps."""
    g = torch.Generator().manual_seed(seed)
    d = features[0] * features[1] * features[2]
    weight = torch.randn(2, d, generator=g)
    u = weight[0] - weight[1]
    bias = torch.tensor([-0.5 * u.sum().item(), 0.0])  # the boundary passes through x = 0.5
    model = linear(weight, bias)
    direction = u.sign() if norm == "linf" else u / u.norm()
    dual = u.norm(p=1 if norm == "linf" else 2)
    x = 0.5 + 0.1 * (torch.rand(n, *features, generator=g) - 0.5)
    side = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    target = side * EPS[norm] * (0.5 + torch.rand(n, generator=g))  # signed distance, + for class 0
    with torch.no_grad():
        z = model(x)
        now = (z[:, 0] - z[:, 1]) / dual
    return model, along(x, direction, target - now)


def collinear_data(norm, n=400, features=(2, 4, 4), seed=0):
    """Three classes along one direction v: class 2 | class 0 | class 1 (logits 0, v.(x - 1/2) - c,
    -v.(x - 1/2) - c), class 0 a slab 3 eps wide; points spread over 6 eps across it."""
    g = torch.Generator().manual_seed(seed)
    d = features[0] * features[1] * features[2]
    v = torch.randn(d, generator=g)
    dual = v.norm(p=1 if norm == "linf" else 2)
    c = 1.5 * EPS[norm] * dual
    weight = torch.stack([torch.zeros(d), v, -v])
    bias = torch.stack([torch.tensor(0.0), -0.5 * v.sum() - c, 0.5 * v.sum() - c])
    model = linear(weight, bias)
    direction = v.sign() if norm == "linf" else v / v.norm()
    x = 0.5 + 0.1 * (torch.rand(n, *features, generator=g) - 0.5)
    position = EPS[norm] * (6 * torch.rand(n, generator=g) - 3)  # along v, in distance units
    now = (x.flatten(1) - 0.5) @ v / dual
    return model, along(x, direction, position - now)


def blocks_data(n=600, classes=4, block=8, scales=None, level=0.3, seed=0):
    """Classes with weights on disjoint blocks of features (class j: scale_j x random signs on
    block j). For Linf the corner eps (sign(w_t) on t's block, -sign(w_y) on y's block) is the
    best perturbation towards every t at once, and with equal scales the highest wrong logit is the
    closest boundary."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.ones(classes) if scales is None else torch.tensor(scales, dtype=torch.float)
    signs = torch.where(torch.rand(classes, block, generator=g) < 0.5, 1.0, -1.0)
    weight = torch.block_diag(*(scales[:, None] * signs).unbind())  # (classes, classes x block)
    model = linear(weight, -0.5 * weight.sum(1))
    offset = level * (2 * torch.rand(n, classes, 1, generator=g) - 1)
    x = 0.5 + offset * signs + 0.02 * (torch.rand(n, classes, block, generator=g) - 0.5)
    return model, x.view(n, 1, classes, block)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("best", [False, True])
def test_binary_linear_pgd_fools_exactly_the_points_within_eps(norm, loss, random_start, best):
    model, x = binary_data(norm)
    eps = EPS[norm]
    check_box_does_not_bind(x, eps)
    y, d = pair_distances(model, x, norm)
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, Threat(norm, eps), steps=10, loss=loss, random_start=random_start, best=best)
    # Linf sign steps reach the best corner exactly; an L2 random start leaves a component across
    # the gradient that 2.5 eps of steps shrinks to about a quarter of eps (cos ~ 0.96).
    tol = 0.06 if norm == "l2" and random_start else 1e-3
    assert_exactly_vulnerable_fooled(model, x, y, x_adv, d.amin(1), eps, tol)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "cw"])
def test_three_class_linear_pgd_fools_exactly_the_points_within_eps(norm, loss):
    model, x = collinear_data(norm)
    eps = EPS[norm]
    check_box_does_not_bind(x, eps)
    y, d = pair_distances(model, x, norm)
    assert set(y.tolist()) == {0, 1, 2}
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, Threat(norm, eps), steps=10, loss=loss, best=True)
    tol = 0.06 if norm == "l2" else 1e-3
    assert_exactly_vulnerable_fooled(model, x, y, x_adv, d.amin(1), eps, tol)


@pytest.mark.parametrize("loss", ["ce", "dlr", "cw"])
@pytest.mark.parametrize("best", [False, True])
def test_four_class_linear_linf_pgd_fools_exactly_the_points_within_eps(loss, best):
    model, x = blocks_data()
    eps = EPS["linf"]
    check_box_does_not_bind(x, eps)
    y, d = pair_distances(model, x, "linf")
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, Threat("linf", eps), steps=10, loss=loss, best=best)
    assert_exactly_vulnerable_fooled(model, x, y, x_adv, d.amin(1), eps, 1e-3)


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("linf", "cw"), ("linf", "dlr"), ("l2", "cw")])
@pytest.mark.parametrize("targeted", [1, 2, 3, 9])
def test_targeted_pgd_reaches_the_targets_within_eps_in_order(norm, loss, targeted):
    """Unequal class scales: the highest wrong logit is often not the closest boundary, so each
    number of targets fools a different set of points, exactly those within eps of one of their
    first n targets, and each lands on the first such target (later runs skip fooled points)."""
    if loss == "dlr" and targeted > 2:
        pytest.skip("targeted DLR is exact here only for the two highest wrong classes")
    # L2 distances on these blocks are about 4 times the Linf ones: half the spread, half the eps.
    model, x = blocks_data(scales=[1.0, 2.0, 3.0, 4.0], level=0.3 if norm == "linf" else 0.15, seed=1)
    eps = EPS[norm] if norm == "linf" else EPS[norm] / 2
    check_box_does_not_bind(x, eps)
    y, d = pair_distances(model, x, norm)
    with torch.no_grad():
        order = model(x).scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :3]
    n = min(targeted, 3)
    d_targets = d.gather(1, order[:, :n])  # distances to the first n targets, in attack order
    run = dict(steps=20, loss=loss, targeted=targeted, best=True)
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, Threat(norm, eps), **run)
    tol = 0.06 if norm == "l2" else 1e-3
    fooled = assert_exactly_vulnerable_fooled(model, x, y, x_adv, d_targets.amin(1), eps, tol)
    # Without a random start (which may itself land on another class) the runs move only towards
    # their target: each point lands on the first target within reach, where no earlier target is
    # too close to eps to call.
    x_adv = pgd(model, x, y, Threat(norm, eps), random_start=False, **run)
    tol = 1e-3
    assert_exactly_vulnerable_fooled(model, x, y, x_adv, d_targets.amin(1), eps, tol)
    reach = d_targets < eps * (1 - tol)
    unclear = (d_targets >= eps * (1 - tol)) & (d_targets <= eps * (1 + NEAR))
    first = reach.float().argmax(1)
    clear = reach.any(1) & ~(unclear & (torch.arange(n) < first[:, None])).any(1)
    with torch.no_grad():
        landed = model(x_adv).argmax(1)
    assert clear.sum() >= 30
    assert torch.equal(landed[clear], order[clear, first[clear]])
    if n > 1:
        # Not the same as one target: some points are reached only through a later one.
        assert (fooled & (d_targets[:, 0] > eps * (1 + NEAR))).sum() >= 5


def test_untargeted_linf_pgd_misses_points_that_only_targets_reach():
    """The blocks model with unequal scales: untargeted CW follows the highest wrong logit, so it
    is not exact there; the targeted runs over every wrong class are. A sanity check that the
    exactness tests above are not trivially passed by any attack."""
    model, x = blocks_data(scales=[1.0, 2.0, 3.0, 4.0], seed=1)
    eps = EPS["linf"]
    y, d = pair_distances(model, x, "linf")
    torch.manual_seed(0)
    plain = model(pgd(model, x, y, Threat("linf", eps), steps=20, loss="cw", best=True)).argmax(1) != y
    targeted = model(pgd(model, x, y, Threat("linf", eps), steps=20, loss="cw", targeted=3,
                         best=True)).argmax(1) != y
    vulnerable = d.amin(1) < eps * (1 - 1e-3)
    assert torch.equal(targeted, vulnerable | (targeted & (d.amin(1) <= eps * (1 + NEAR))))
    assert (vulnerable & ~plain).sum() >= 1


# --- Best iterate ---------------------------------------------------------------------------------


class Bump(nn.Module):
    """One input feature; class 1 wins only within `width` of 0.55 (logits 0 and
    scale x (1 - ((x - 0.55) / width)^2)): a step larger than the bump jumps over it."""

    def __init__(self, width, scale=1.0):
        super().__init__()
        self.width, self.scale = width, scale

    def forward(self, x):
        h = self.scale * (1 - ((x[:, 0] - 0.55) / self.width) ** 2)
        return torch.stack([torch.zeros_like(h), h], 1)


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("width,fooled", [(0.03, True), (0.005, False)])
def test_best_iterate_is_kept_when_the_last_step_overshoots(loss, width, fooled):
    # Sign steps of 0.03 from 0.50 toward the bump's centre visit 0.53, 0.56, 0.53: the best
    # iterate is 0.56 (the largest margin when the bump is wide enough to be reached at all, and
    # the highest loss when it is not), while the last is 0.53 (inside the bump but with a smaller
    # margin, or outside it).
    model = Bump(width, scale=1.0 if fooled else 0.05)
    x, y = torch.tensor([[0.50]]), torch.tensor([0])
    threat = Threat("linf", 0.1)
    run = dict(steps=3, step_size=0.03, random_start=False, loss=loss)
    kept = pgd(model, x, y, threat, best=True, **run)
    last = pgd(model, x, y, threat, best=False, **run)
    assert kept.item() == pytest.approx(0.56, abs=1e-6)
    assert last.item() == pytest.approx(0.53, abs=1e-6)
    with torch.no_grad():
        assert bool(model(kept).argmax(1) == 1) == fooled
        if fooled:  # first found (0.53) is fooled too, but 0.56 has the larger margin
            assert model(kept)[0, 1] > model(torch.tensor([[0.53]]))[0, 1] + 0.3
        else:
            assert not bool(model(last).argmax(1) == 1)


def test_best_iterate_scores_the_final_iterate():
    # Two steps from 0.50: 0.53 then 0.56; only the final iterate is inside the narrow bump.
    model = Bump(0.015)
    x, y = torch.tensor([[0.50]]), torch.tensor([0])
    kept = pgd(model, x, y, Threat("linf", 0.1), steps=2, step_size=0.03, random_start=False, best=True)
    assert kept.item() == pytest.approx(0.56, abs=1e-6)


def test_best_iterate_fools_every_point_the_last_iterate_fools():
    model, (x, y) = tiny_net(), batch(n=256)
    threat = Threat("linf", 0.03)
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(5)
    last = model(pgd(model, x, y, threat, steps=5, step_size=0.05)).argmax(1) != y
    torch.manual_seed(5)  # the same random starts and so the same trajectories
    kept = model(pgd(model, x, y, threat, steps=5, step_size=0.05, best=True)).argmax(1) != y
    assert (kept | ~last).all()
    assert kept.sum() > last.sum()  # a step size that overshoots: earlier iterates fool more


# --- Restarts -------------------------------------------------------------------------------------


class Recording(nn.Module):
    """Records the batch size and train/eval mode of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes, self.modes = inner, [], []

    def forward(self, x):
        self.sizes.append(len(x))
        self.modes.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("best", [False, True])
def test_restarts_run_only_on_unfooled_points_and_keep_every_success(best):
    """A step too small to move: only the random start can fool, each time with chance ~0.38."""
    g = torch.Generator().manual_seed(0)
    n, d, eps = 300, 32, 0.05
    weight = torch.randn(2, d, generator=g)
    u = weight[0] - weight[1]
    model = linear(weight, torch.zeros(2))
    x = 0.5 + 0.1 * (torch.rand(n, 2, 4, 4, generator=g) - 0.5)
    # Margin u.x = 0.3 sd of u.delta for delta uniform in the ball.
    margin = 0.3 * eps * u.norm() / 3 ** 0.5
    x = along(x, u.sign(), (margin - x.flatten(1) @ u) / u.norm(p=1))
    y = torch.zeros(n, dtype=torch.long)
    threat = Threat("linf", eps)

    def attack(restarts, recorder=None):
        torch.manual_seed(3)
        adv = pgd(recorder or model, x, y, threat, steps=1, step_size=1e-12, restarts=restarts, best=best)
        with torch.no_grad():
            return model(adv).argmax(1) != y

    fooled = [attack(r) for r in range(1, 9)]
    assert 0.25 < fooled[0].float().mean() < 0.5
    assert fooled[-1].float().mean() > 0.95
    for fewer, more in zip(fooled, fooled[1:]):
        assert (more | ~fewer).all()  # a later restart never undoes an earlier success
    # Restart r + 1 runs on exactly the points that the first r restarts left unfooled.
    recorder = Recording(model)
    attack(8, recorder)
    assert recorder.sizes[::2] == [n] + [int((~f).sum()) for f in fooled[:-1]]


class Inputs(nn.Module):
    """Records every input the model is run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_best_iterate_restarts_keep_the_highest_margin_of_unfooled_points():
    """The bump is out of reach: every restart fails, and the kept input is, per point, the one of
    all the inputs the attack tried whose margin (class 1's logit minus class 0's) is highest; the
    steps are too small to move, so those are the random starts."""
    bump = Bump(0.005, scale=0.05)
    x = torch.linspace(0.30, 0.40, 50)[:, None]
    y = torch.zeros(50, dtype=torch.long)
    run = dict(steps=1, step_size=1e-12, best=True, loss="cw")
    torch.manual_seed(0)
    one = pgd(bump, x, y, Threat("linf", 0.1), restarts=1, **run)
    recorder = Inputs(bump)
    torch.manual_seed(0)
    many = pgd(recorder, x, y, Threat("linf", 0.1), restarts=6, **run)
    # two forwards per restart (the start, then the final iterate), on all 50 points each time
    assert [len(t) for t in recorder.seen] == [50] * 12
    tried = torch.stack(recorder.seen)  # (12, 50, 1)
    with torch.no_grad():
        margins = torch.stack([bump(t)[:, 1] - bump(t)[:, 0] for t in tried])
    best = margins.argmax(0)
    expected = tried[best, torch.arange(50)]
    assert torch.equal(many, expected)
    assert torch.equal(one, tried[:2][margins[:2].argmax(0), torch.arange(50)])  # the same first start
    # the later restarts matter: about 5 / 6 of the points keep one of them
    assert 30 <= int((best >= 2).sum()) < 50
    assert (many - x).abs().max() <= 0.1 + 1e-6


# --- Losses ---------------------------------------------------------------------------------------


def test_dlr_and_cw_values_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 3)
    y = torch.tensor([0, 2, 1])
    # sorted: 3, 2, 1, 0 -> z_pi1 - z_pi3 = 2; -(z_y - max_{j != y} z_j) / 2
    assert dlr_loss(z, y).tolist() == pytest.approx([-(3 - 2) / 2, -(2 - 3) / 2, -(1 - 3) / 2])
    assert cw_loss(z, y).tolist() == pytest.approx([2 - 3, 3 - 2, 3 - 1])
    # targeted, y = 0: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - z_t) / 2.5
    y0, t = torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    assert dlr_loss(z, y0, t).tolist() == pytest.approx([-2 / 2.5, -1 / 2.5, -3 / 2.5])
    assert cw_loss(z, y0, t).tolist() == pytest.approx([1 - 3, 2 - 3, 0 - 3])
    # DLR ignores shifts and positive scales of the logits; CW scales with them.
    assert dlr_loss(4 * z - 7, y).tolist() == pytest.approx(dlr_loss(z, y).tolist())
    assert cw_loss(4 * z - 7, y).tolist() == pytest.approx((4 * cw_loss(z, y)).tolist())
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(z[:, :2], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr_loss(z[:, :3], y0, t.clamp(max=2))


# --- Contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("best,targeted", [(False, 0), (True, 2)])
def test_pgd_runs_in_the_callers_mode_and_leaves_parameter_grads_alone(training, best, targeted):
    model = Recording(tiny_net())
    model.train(training)
    pgd(model, *batch(), Threat("l2", 1.0), steps=2, restarts=2, best=best, targeted=targeted)
    assert model.training == training and set(model.modes) == {training}
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("best", [False, True])
def test_pgd_under_no_grad_still_attacks(best):
    model, (x, y) = tiny_net(), batch()
    torch.manual_seed(0)
    expected = pgd(model, x, y, Threat("linf", 0.1), steps=3, best=best, targeted=1)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(pgd(model, x, y, Threat("linf", 0.1), steps=3, best=best, targeted=1), expected)


def test_zero_eps_returns_input():
    model, (x, y) = tiny_net(), batch()
    assert torch.equal(pgd(model, x, y, Threat("linf", 0.0), steps=5), x)


def test_threat_and_pgd_reject_bad_values():
    with pytest.raises(ValueError):
        Threat("l0", 0.1)
    with pytest.raises(ValueError):
        Threat("linf", -0.1)
    model, (x, y) = tiny_net(), batch()
    with pytest.raises(ValueError, match="linf and l2"):
        pgd(model, x, y, Threat("l1", 1.0), steps=1)  # no silent L2 steps on an L1 ball
    threat = Threat("linf", 0.1)
    for bad in [dict(steps=0), dict(steps=1, restarts=0), dict(steps=1, loss="hinge"),
                dict(steps=1, targeted=-1), dict(steps=1, targeted=1.5),
                dict(steps=1, loss="dlr", loss_fn=lambda z, y: z.sum(1))]:
        with pytest.raises(ValueError):
            pgd(model, x, y, threat, **bad)
    with pytest.raises(ValueError, match="class labels"):
        pgd(model, x, F.one_hot(y, 4).float(), threat, steps=1, best=True)
    with pytest.raises(ValueError, match="at least 3 classes"):
        pgd(tiny_net(classes=2), x, y % 2, threat, steps=1, loss="dlr")


def test_pgd_at_eps_ramp_up_grows_linearly():
    from cardkit.objectives import PGDATConfig, build_objective

    model, (x, y) = tiny_net(), batch()
    objective = build_objective(PGDATConfig(eps=0.2, steps=3, eps_warmup_epochs=2), Threat("linf", 0.1))
    for epoch, expected in [(0.0, 0.0), (0.5, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.2)]:
        objective.set_progress(epoch)
        delta = (objective(model, x, y)["x_adv"] - x).abs().amax()
        assert delta <= expected + 1e-6
        assert delta >= 0.9 * expected


def test_pgd_at_trains_on_the_last_iterate():
    """Adversarial training keeps Madry's last iterate: its inputs are pgd's with best=False."""
    from cardkit.objectives import PGDATConfig, build_objective

    model, (x, y) = tiny_net(), batch()
    objective = build_objective(PGDATConfig(steps=3), Threat("linf", 0.1))
    torch.manual_seed(0)
    trained_on = objective(model, x, y)["x_adv"]
    torch.manual_seed(0)
    assert torch.equal(trained_on, pgd(model, x, y, Threat("linf", 0.1), steps=3, best=False))
