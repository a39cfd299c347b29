"""Interval bounds contain the outputs of every sampled perturbation, corners included."""

import pytest
import torch
from torch import nn

from cardkit.certify import ibp_bounds, ibp_margin_bounds
from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.prune import method_config, prune_model


def perturbations(x, eps, samples, seed=0):
    """Uniform points and corners of the eps-ball, clipped to [0, 1] like the bounds' input set."""
    g = torch.Generator().manual_seed(seed)
    uniform = (torch.rand(samples, *x.shape, generator=g) * 2 - 1) * eps
    corners = (torch.randint(0, 2, (samples, *x.shape), generator=g) * 2 - 1) * eps
    return torch.cat([(x + uniform).clamp(0, 1), (x + corners).clamp(0, 1)])


def randomise_batchnorm(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(0, 1, generator=g)  # negative scales too
            m.bias.data.normal_(0, 0.5, generator=g)


@pytest.mark.parametrize("name,shape,method", [
    ("cnn_small", (1, 8, 8), None), ("cnn_large", (1, 8, 8), None), ("vgg16_bn", (1, 8, 8), None),
    ("cnn_small", (3, 32, 32), None),
    ("cnn_small", (1, 28, 28), {"name": "hydra", "sparsity": 0.8}),
    ("cnn_large", (1, 8, 8), {"name": "biprop", "sparsity": 0.5}),
    ("cnn_small", (1, 8, 8), {"name": "magnitude", "sparsity": 0.9}),
    ("resnet18", (1, 8, 8), None), ("preact_resnet18", (1, 8, 8), {"name": "hydra", "sparsity": 0.5}),
    ("wrn_28_4", (1, 8, 8), None),
])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.05])
def test_ibp_bounds_contain_every_sampled_output(name, shape, method, eps):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1],
                         mean=[0.4] * shape[0], std=[0.3] * shape[0])
    if method:
        prune_model(model, method_config(**method))
    randomise_batchnorm(model)
    model.eval()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        logits = ibp_bounds(model, x, eps)
        margins = ibp_margin_bounds(model, x, y, eps)
        points = perturbations(x, eps, 200)  # S x N x C x H x W
        outputs = model(points.flatten(0, 1)).view(len(points), len(x), -1)
    assert (outputs >= logits.lower - 1e-4).all() and (outputs <= logits.upper + 1e-4).all()
    true = outputs.gather(2, y.view(1, -1, 1).expand(len(points), -1, 1))
    keep = ~torch.nn.functional.one_hot(y, 10).bool()
    sampled_margins = (true - outputs)[:, keep].view(len(points), len(x), 9)
    assert (sampled_margins >= margins.lower - 1e-4).all()
    assert (sampled_margins <= margins.upper + 1e-4).all()
    # The margin specification is at least as tight as differencing logit bounds.
    naive = logits.lower.gather(1, y.view(-1, 1)) - logits.upper
    assert (margins.lower >= naive[keep].view(len(x), 9) - 1e-4).all()


def test_unsupported_layer_and_training_batchnorm_are_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with pytest.raises(CardkitError, match=r"'2' \(Sigmoid\).*supported: .*ReLU"):
        ibp_bounds(model, torch.rand(1, 1, 2, 2), 0.1)
    vgg = create_model("vgg16_bn", 10, 1, 8).train()
    with pytest.raises(CardkitError, match="BatchNorm2d.*eval mode"):
        ibp_bounds(vgg, torch.rand(1, 1, 8, 8), 0.1)
    resnet = create_model("resnet18", 10, 1, 8).eval()
    with pytest.raises(CardkitError, match=r"CROWN does not support layer '.*' \(BasicBlock\)"):
        crown_margin_bounds(resnet, torch.rand(1, 1, 8, 8), torch.tensor([0]), 0.1)


from cardkit.certify import crown_bounds, crown_margin_bounds  # noqa: E402


@pytest.mark.parametrize("name,shape,method", [
    ("cnn_small", (1, 8, 8), None), ("cnn_large", (1, 8, 8), None),
    ("cnn_small", (1, 28, 28), {"name": "hydra", "sparsity": 0.8}),
    ("cnn_small", (1, 8, 8), {"name": "biprop", "sparsity": 0.5}),
])
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("eps", [0.0, 0.02])
def test_crown_bounds_contain_every_sampled_output_and_beat_ibp(name, shape, method, intermediate, eps):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1],
                         mean=[0.4] * shape[0], std=[0.3] * shape[0])
    if method:
        prune_model(model, method_config(**method))
    model.eval()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    with torch.no_grad():
        margins = crown_margin_bounds(model, x, y, eps, intermediate)
        logits = crown_bounds(model, x, eps, intermediate)
        points = perturbations(x, eps, 200)
        outputs = model(points.flatten(0, 1)).view(len(points), len(x), -1)
    assert (outputs >= logits.lower - 1e-4).all() and (outputs <= logits.upper + 1e-4).all()
    true = outputs.gather(2, y.view(1, -1, 1).expand(len(points), -1, 1))
    keep = ~torch.nn.functional.one_hot(y, 10).bool()
    assert ((true - outputs)[:, keep].view(len(points), 2, 9) >= margins - 1e-4).all()
    if intermediate == "crown":
        ibp = ibp_margin_bounds(model, x, y, eps).lower
        assert margins.mean() >= ibp.mean() - 1e-5


def test_crown_is_tighter_than_ibp_on_a_trained_network():
    import torch.nn.functional as F
    from cardkit.data import BatchLoader, load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 8, mean=data.info.mean, std=data.info.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for x, y in BatchLoader(data.train, 64, shuffle=True).epoch(0):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    x, y = data.test.images[:50].float() / 255, data.test.labels[:50]
    with torch.no_grad():
        crown = crown_margin_bounds(model, x, y, 0.01)
        crown_ibp = crown_margin_bounds(model, x, y, 0.01, "ibp")
        ibp = ibp_margin_bounds(model, x, y, 0.01).lower
    assert crown.mean() > crown_ibp.mean() > ibp.mean()
    assert (crown >= ibp - 1e-5).float().mean() > 0.9


def test_bounds_enclose_the_exact_optimum_of_a_tiny_network():
    """min of a margin over the input box, solved exactly as a mixed-integer program."""
    import numpy as np
    from scipy.optimize import LinearConstraint, milp

    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y, eps = torch.rand(1, 1, 1, 3), torch.tensor([0]), 0.2
    with torch.no_grad():
        pre = ibp_bounds(net[:2], x, eps)
        crown = crown_margin_bounds(net, x, y, eps)
        ibp = ibp_margin_bounds(net, x, y, eps).lower
    w1, b1 = net[1].weight.detach().double().numpy(), net[1].bias.detach().double().numpy()
    w2, b2 = net[3].weight.detach().double().numpy(), net[3].bias.detach().double().numpy()
    l, u = pre.lower[0].double().numpy(), pre.upper[0].double().numpy()
    box_l = (x.flatten() - eps).clamp(0, 1).double().numpy()
    box_u = (x.flatten() + eps).clamp(0, 1).double().numpy()
    for j, target in enumerate([1, 2]):
        c = w2[0] - w2[target]  # variables: x (3), h (6), a (6)
        objective = np.concatenate([np.zeros(3), c, np.zeros(6)])
        rows, lo, hi = [], [], []
        for i in range(6):
            e = np.zeros(15)
            e[:3], e[3 + i] = -w1[i], 1.0  # h - w x >= b
            rows.append(e); lo.append(b1[i]); hi.append(np.inf)
            e = np.zeros(15)
            e[:3], e[3 + i], e[9 + i] = -w1[i], 1.0, -l[i]  # h - w x - l a <= b - l
            rows.append(e); lo.append(-np.inf); hi.append(b1[i] - l[i])
            e = np.zeros(15)
            e[3 + i], e[9 + i] = 1.0, -max(u[i], 0)  # h <= u a
            rows.append(e); lo.append(-np.inf); hi.append(0.0)
        bounds = list(zip(box_l, box_u)) + [(0, max(ui, 0)) for ui in u] + [(0, 1)] * 6
        from scipy.optimize import Bounds as Box
        result = milp(objective, constraints=LinearConstraint(np.array(rows), lo, hi),
                      integrality=np.r_[np.zeros(9), np.ones(6)],
                      bounds=Box([b[0] for b in bounds], [b[1] for b in bounds]))
        assert result.success
        exact = result.fun + b2[0] - b2[target]
        assert crown[0, j].item() <= exact + 1e-5
        assert ibp[0, j].item() <= crown[0, j].item() + 1e-5


def test_crown_ibp_shares_one_ibp_pass_with_the_same_results():
    from cardkit.certify.crown import crown_ibp_margin_bounds

    torch.manual_seed(0)
    model = create_model("cnn_large", 10, 1, 8).eval()
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 5, 9])
    with torch.no_grad():
        crown, ibp = crown_ibp_margin_bounds(model, x, y, 0.02)
        assert torch.allclose(crown, crown_margin_bounds(model, x, y, 0.02, "ibp"), atol=1e-5)
        assert torch.allclose(ibp, ibp_margin_bounds(model, x, y, 0.02).lower, atol=1e-5)


@pytest.mark.parametrize("name,shape", [("cnn_small", (3, 32, 32)), ("cnn_small", (1, 9, 9)),
                                        ("cnn_large", (2, 11, 11)), ("mlp", (1, 8, 8))])
def test_closed_form_first_layer_matches_back_substitution_to_the_input(name, shape):
    """The first layer's bound A f(centre) - |A L| radius (space-to-depth for strided convolutions)
    equals substituting back through every layer to the input box, bounds and gradients alike."""
    from cardkit.certify.crown import _margin_spec, _prepare

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    else:
        model = create_model(name, 10, shape[0], shape[1], mean=[0.4] * shape[0], std=[0.3] * shape[0])
    model.eval()
    x, y = torch.rand(3, *shape), torch.tensor([1, 5, 9])
    results = []
    for closed_form in (True, False):
        net = _prepare(model, x, 0.03, "ibp")
        assert net.first is not None
        if not closed_form:
            net.first = None
        bound = net.backward(len(net.layers), _margin_spec(y, 10))
        results.append((bound, torch.autograd.grad(bound.sum(), list(model.parameters()))))
    (closed, closed_grads), (full, full_grads) = results
    assert torch.allclose(closed, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(closed_grads, full_grads):  # float32 sums of large terms: relative to the largest
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-6


def test_hand_written_gradients_match_finite_differences():
    from cardkit.certify.crown import _ConvBoxBound, _Dot, _ReluBack

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    channels_last = lambda *shape: rand(*shape).detach().contiguous(memory_format=torch.channels_last)  # noqa: E731
    coeffs = channels_last(6, 4, 3, 3).view(2, 3, 4, 3, 3).requires_grad_()  # as transposed convolutions leave them
    lower = (torch.rand(2, 1, 4, 3, 3, generator=g) > 0.5).double()
    assert torch.autograd.gradcheck(_ReluBack.apply, (coeffs, lower, rand(2, 1, 4, 3, 3), rand(2, 1, 4, 3, 3)),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(_Dot.apply, (rand(2, 3, 5), rand(2, 5)), fast_mode=True)
    flat = channels_last(6, 4, 3, 3).requires_grad_()
    radius = (torch.rand(2, 2, 5, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w, m, r: _ConvBoxBound.apply(f, w, m, r, (2, 2), (1, 1), (0, 0)),
                                    (flat, rand(4, 2, 3, 3), rand(2, 4, 3, 3), radius), fast_mode=True)
