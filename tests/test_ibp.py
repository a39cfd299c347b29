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
