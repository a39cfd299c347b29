"""The Python API on models no registry knows: every verb on a user-defined CNN with BatchNorm,
checked against values computed independently (sorted weight magnitudes, a hand-written SGD step,
closed-form robust sets, hand-computed interval bounds, a constant classifier's accuracies and
smoothing radius), round trips through the .card file, and the one-line errors."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cardkit
from cardkit.certify import ibp_bounds, ibp_margin_bounds
from cardkit.errors import CardkitError
from cardkit.prune import MaskedLayer
from test_evaluation import linear_problem, smallest_perturbation

ROOT = Path(__file__).resolve().parents[1]


class UserNet(nn.Module):
    """Not in the registry: no `arch`, no `normalize`."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 16, 3, stride=2, padding=1)
        self.fc1, self.head = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(F.relu(self.fc1(torch.flatten(x, 1))))


def user_net() -> UserNet:
    torch.manual_seed(0)
    net = UserNet()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so loading them matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


def digits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def not_head(name, module):
    return name != "head"


# ---------------------------------------------------------------------------------------------
# compress_ and the layer filter


def test_magnitude_keeps_exactly_the_largest_weights_of_the_filtered_layers_only():
    net = user_net()
    before = {name: m.weight.detach().clone() for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    pruned = cardkit.compress_(net, cardkit.MagnitudeConfig(sparsity=0.9), layers=not_head)
    assert pruned.model is net and [type(m).__name__ for m in pruned.group.layers] == \
        ["MaskedConv2d", "MaskedConv2d", "MaskedLinear"]
    for name in ("conv1", "conv2", "fc1"):
        weight, original = net.get_submodule(name).weight.detach(), before[name].flatten()
        k = round(0.1 * original.numel())
        largest = set(original.abs().sort(descending=True).indices[:k].tolist())
        assert set(weight.flatten().nonzero().flatten().tolist()) == largest
        assert torch.equal(weight.flatten()[list(largest)], original[list(largest)])
    assert type(net.head) is nn.Linear and torch.equal(net.head.weight, before["head"])
    report = cardkit.size(net)
    assert [t.kept for t in report.tensors] == [7, 115, 819, 320]  # 10% of 72, 1152, 8192; all of 320


def test_global_magnitude_over_the_convolutions_picked_by_type():
    net = user_net()
    convs = [m.weight.detach().abs().flatten() for m in (net.conv1, net.conv2)]
    threshold = torch.cat(convs).sort(descending=True).values[round(0.2 * sum(map(len, convs))) - 1]
    cardkit.compress_(net, cardkit.MagnitudeConfig(sparsity=0.8, scope="global"),
                      layers=lambda name, module: isinstance(module, nn.Conv2d))
    for module, original in zip((net.conv1, net.conv2), convs):
        assert torch.equal(module.weight.detach().flatten() != 0, original >= threshold)
    assert not isinstance(net.fc1, MaskedLayer) and not isinstance(net.head, MaskedLayer)


def test_atmc_factorizes_only_the_filtered_layers():
    net = user_net()
    pruned = cardkit.compress_(net, cardkit.AtmcConfig(sparsity=0.9, bits=4), layers=not_head)
    assert [type(net.get_submodule(n)).__name__ for n in ("conv1", "conv2", "fc1", "head")] == \
        ["AtmcConv2d", "AtmcConv2d", "AtmcLinear", "Linear"]
    kept = sum(int(layer.factor(f)[1].sum()) for layer in pruned.group.layers for f in ("u", "v", "c"))
    assert kept == round(0.1 * sum(net.get_submodule(n).weight.numel() for n in ("conv1", "conv2", "fc1")))


def test_lottery_without_data_is_one_shot_magnitude_at_the_final_sparsity():
    lottery, magnitude = user_net(), user_net()
    cardkit.compress_(lottery, cardkit.LotteryConfig(sparsity=0.9, rounds=3, rewind="lr"))
    cardkit.compress_(magnitude, cardkit.MagnitudeConfig(sparsity=0.9))
    for a, b in zip(lottery.modules(), magnitude.modules()):
        if isinstance(a, MaskedLayer):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_snip_scores_the_filtered_layers_on_the_data_it_is_given():
    net, data = user_net(), digits(64)
    pruned = cardkit.compress_(net, cardkit.SnipConfig(sparsity=0.9), layers=not_head, data=data,
                               objective=cardkit.PGDATConfig(steps=2), eps=0.05, batch_size=32)
    assert [int(layer.mask.sum()) for layer in pruned.group.layers] == [7, 115, 819]
    assert type(net.head) is nn.Linear and pruned.history == []


def test_hydra_trains_scores_under_trades_and_fine_tuning_keeps_the_mask():
    net, data = user_net(), digits(64)
    pruned = cardkit.compress_(net, cardkit.HydraConfig(sparsity=0.95, scope="global"), data=data,
                               objective=cardkit.TradesConfig(steps=2), eps=0.05, epochs=2, batch_size=32)
    assert len(pruned.history) == 2 and pruned.history[-1]["step"] == 2 * 2
    total = sum(layer.mask.numel() for layer in pruned.group.layers)
    masks = [layer.mask.clone() for layer in pruned.group.layers]
    assert sum(int(m.sum()) for m in masks) == round(0.05 * total)
    history = cardkit.fit(net, data, cardkit.TradesConfig(steps=2), eps=0.05, epochs=1, batch_size=32,
                          group=pruned.group)
    assert history[0]["train_loss"] > 0
    for layer, mask in zip(pruned.group.layers, masks):
        assert torch.equal(layer.mask, mask) and torch.equal(layer.weight * (1 - mask), torch.zeros_like(mask))
        assert layer.weight.requires_grad and not layer.scores.requires_grad


# ---------------------------------------------------------------------------------------------
# export and load_artifact


ROUND_TRIPS = {
    "dense": None,
    "magnitude-8bit": cardkit.MagnitudeConfig(sparsity=0.9, quantize={"bits": 8}),
    "magnitude-4bit-per-channel": cardkit.MagnitudeConfig(sparsity=0.8, quantize={"bits": 4, "per_channel": True}),
    "hydra": cardkit.HydraConfig(sparsity=0.9, scope="global"),
    "hydra-3bit-kmeans": cardkit.HydraConfig(sparsity=0.9, quantize={"bits": 3, "scheme": "kmeans"}),
    "edge_popup": cardkit.EdgePopupConfig(sparsity=0.7),
    "biprop": cardkit.BipropConfig(sparsity=0.8),
    "gmp": cardkit.GMPConfig(sparsity=0.9),
    "atmc": cardkit.AtmcConfig(sparsity=0.9, bits=4),
}


@pytest.mark.parametrize("method", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_export_then_load_into_a_fresh_instance_gives_bitwise_the_outputs(tmp_path, method):
    net = user_net()
    if method is not None:
        net = cardkit.compress_(net, method, layers=not_head if method.name == "hydra" else None).model
    net.eval()
    written = cardkit.export(net, tmp_path / "net.card")
    assert cardkit.size(net).bytes <= written <= cardkit.size(net).bytes + 4096
    fresh = UserNet()
    loaded = cardkit.load_artifact(tmp_path / "net.card", model=fresh)
    assert loaded is fresh and not loaded.training
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert not any(isinstance(m, MaskedLayer) for m in loaded.modules())


def test_a_registry_model_loads_from_the_file_alone_or_into_an_instance(tmp_path):
    from cardkit.models import create_model

    model = create_model("cnn_small", 10, 1, 8)
    cardkit.compress_(model, cardkit.MagnitudeConfig(sparsity=0.5))
    cardkit.export(model.eval(), tmp_path / "m.card")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(cardkit.load_artifact(tmp_path / "m.card")(x), expected)
        assert torch.equal(cardkit.load_artifact(tmp_path / "m.card", model=create_model("cnn_small", 10, 1, 8))(x),
                           expected)


def test_loading_into_the_wrong_architecture_is_one_line_error(tmp_path):
    cardkit.export(user_net(), tmp_path / "net.card")
    with pytest.raises(CardkitError, match=r"user-defined model \(test_api.UserNet\).*model=MyNet\(\)"):
        cardkit.load_artifact(tmp_path / "net.card")
    with pytest.raises(CardkitError, match=r"conv1.weight is \(8, 1, 3, 3\) in the file but \(4, 1, 3, 3\) in the "
                                           r"given UserNet; the file holds a test_api.UserNet: pass a freshly built"):
        cardkit.load_artifact(tmp_path / "net.card", model=UserNet(width=4))
    with pytest.raises(CardkitError, match=r"stores no weight for layer 1 of the given Sequential"):
        cardkit.load_artifact(tmp_path / "net.card", model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    masked = cardkit.compress_(UserNet(), cardkit.MagnitudeConfig(sparsity=0.5)).model
    with pytest.raises(CardkitError, match="pruned or factorized already; pass a freshly built instance"):
        cardkit.load_artifact(tmp_path / "net.card", model=masked)


# ---------------------------------------------------------------------------------------------
# fit


@pytest.mark.parametrize("as_loader", [False, True], ids=["tensors", "dataloader"])
def test_one_fit_step_is_the_hand_computed_sgd_step(as_loader):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = digits(32)
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    loss = F.cross_entropy(F.linear(x.flatten(1), start[0], start[1]), y)
    grads = torch.autograd.grad(loss, start)
    data = DataLoader(TensorDataset(x, y), batch_size=32) if as_loader else (x, y)
    history = cardkit.fit(model, data, epochs=1, batch_size=32, optimizer={"lr": 0.5, "momentum": 0.0,
                          "weight_decay": 0.0}, schedule={"name": "constant"})
    for p, p0, g in zip(model.parameters(), start, grads):
        assert torch.allclose(p, p0 - 0.5 * g, atol=1e-6, rtol=0)
    assert history[0]["step"] == 1 and history[0]["train_loss"] == pytest.approx(float(loss.detach()), abs=1e-5)


def test_fit_is_the_pipelines_training_stage(tmp_path):
    """The same masked PGD-AT fine-tuning epoch through `fit` and through the pipeline's stage
    (which also writes checkpoints) ends at bitwise the same weights."""
    from cardkit.config import validate_config
    from cardkit.data import ArrayDataset, DatasetInfo, DatasetSplits
    from cardkit.engine.pipeline import _Run, _train_stage
    from cardkit.models import create_model

    g = torch.Generator().manual_seed(0)
    train = ArrayDataset(torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (96,), generator=g))
    info = DatasetInfo("synthetic", 10, 1, 8, (0.0,), (1.0,), tuple("0123456789"))
    optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    config = validate_config({
        "name": "run", "output_dir": str(tmp_path), "device": "cpu", "seed": 3, "threat": {"eps": 0.1},
        "data": {"name": "digits", "batch_size": 32, "crop_padding": 1, "hflip": True},
        "model": {"name": "cnn_small", "channels_last": False}, "pipeline": ["pretrain", "prune", "finetune"],
        "prune": {"methods": [{"name": "magnitude", "sparsity": 0.9}]},
        "finetune": {"epochs": 2, "objective": {"name": "pgd_at", "steps": 2}, "optimizer": optimizer,
                     "eval_samples": 20}})
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("cnn_small", 10, 1, 8)
        models.append((model, cardkit.compress_(model, cardkit.MagnitudeConfig(sparsity=0.9)).group))
    (api, api_group), (pipe, pipe_group) = models
    cardkit.fit(api, train, cardkit.PGDATConfig(steps=2), eps=0.1, epochs=2, batch_size=32, optimizer=optimizer,
                crop_padding=1, hflip=True, group=api_group, seed=3, eval_samples=20)
    run = _Run(config, DatasetSplits(info, train, None, train), torch.device("cpu"), progress=False)
    _train_stage(run, "finetune", tmp_path / "run" / "finetune", pipe, stage_id=0, group=pipe_group)
    for (name, a), b in zip(api.state_dict().items(), pipe.state_dict().values()):
        assert torch.equal(a, b), name


def test_float_batches_have_the_order_crops_and_flips_of_the_pipelines_loader():
    from cardkit.api import _training_batches
    from cardkit.data import Augmentation

    images, labels = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (50,))
    augmentation = Augmentation(crop_padding=2, hflip=True)
    pipeline = _training_batches((images, labels), 16, torch.device("cpu"), torch.contiguous_format, augmentation)
    floats = _training_batches((images.float() / 255, labels), 16, torch.device("cpu"), torch.contiguous_format,
                               augmentation)
    assert type(pipeline).__name__ == "BatchLoader" and len(pipeline) == len(floats) == 3
    for (xa, ya), (xb, yb) in zip(pipeline.epoch(7), floats.epoch(7)):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-7, rtol=0)
    with pytest.raises(CardkitError, match="a DataLoader augments by itself"):
        cardkit.fit(user_net(), DataLoader(TensorDataset(*digits())), hflip=True)


# ---------------------------------------------------------------------------------------------
# evaluate, certified_accuracy, corruption_accuracy


class PlainLinear(nn.Module):
    """test_evaluation's linear classifier without a Normalize layer."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_evaluate_finds_exactly_the_closed_form_vulnerable_points_of_a_linear_model():
    model, x, y = linear_problem(n=200)
    model = PlainLinear(model.fc)
    eps = 0.02
    distance = smallest_perturbation(model, x, y, "linf")
    attacks = [cardkit.PGDAttackConfig(steps=50), cardkit.PGDAttackConfig(steps=50, targeted=9, loss="cw")]
    result = cardkit.evaluate(model, (x, y), eps=eps, attacks=attacks, batch_size=128)
    robust = round(result.robust_accuracy * len(y))
    assert result.clean_accuracy == 1.0
    assert int((distance > eps * 1.02).sum()) <= robust <= int((distance >= eps * 0.98).sum())
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    again = cardkit.evaluate(model, loader, eps=eps, attacks=attacks, batch_size=128)
    assert again.robust_accuracy == result.robust_accuracy


class HandNet(nn.Module):
    """x (2) -> relu(W1 x + b1) -> W2 h + b2, with `skip`: + 0.5 x (a graph, not a chain)."""

    def __init__(self, skip: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.skip = nn.Linear(2, 2), nn.Linear(2, 2), skip
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
            self.fc1.bias.copy_(torch.tensor([0.0, -1.0]))
            self.fc2.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
            self.fc2.bias.copy_(torch.tensor([-0.2, 0.0]))

    def forward(self, x):
        out = self.fc2(F.relu(self.fc1(x)))
        return out + 0.5 * x if self.skip else out


POINTS = torch.tensor([[0.5, 0.25], [0.2, 0.6]]), torch.tensor([0, 1])


def test_ibp_on_a_hand_computed_net():
    # Point 1, eps 0.05: fc1 gives [0.15, 0.35] and [0.1, 0.4], both ReLUs stay active; the
    # folded margin 2 h1 - 0.2 is at least 0.1. At eps 0.1 it is 2 (0.25 - 0.2) - 0.2 = -0.1.
    # Point 2: h1 = 0 over both balls, so its margin -2 h1 + 0.2 is 0.2.
    x, y = POINTS
    net = HandNet()
    lower = ibp_margin_bounds(net, x, y, 0.05).lower.flatten()
    assert torch.allclose(lower, torch.tensor([0.1, 0.2]), atol=1e-6)
    assert torch.allclose(ibp_margin_bounds(net, x, y, 0.1).lower.flatten(), torch.tensor([-0.1, 0.2]), atol=1e-6)
    assert cardkit.certified_accuracy(net, (x, y), method="ibp", eps=0.05).verified_accuracy == 1.0
    result = cardkit.certified_accuracy(net, (x, y), method="ibp", eps=0.1)
    assert (result.clean_accuracy, result.verified_accuracy) == (1.0, 0.5)
    # CROWN through the traced chain: both ReLUs of point 1 are stable, so its bound is exact.
    assert cardkit.certified_accuracy(net, (x, y), method="crown", eps=0.1).verified_accuracy == 0.5
    # With the skip, the graph is bounded node by node: out0 = h1 + h2 - 0.2 + 0.5 x1 and
    # out1 = -h1 + h2 + 0.5 x2 over the box of point 1.
    bounds = ibp_bounds(HandNet(skip=True), x[:1], 0.05)
    assert torch.allclose(bounds.lower, torch.tensor([[0.275, -0.15]]), atol=1e-6)
    assert torch.allclose(bounds.upper, torch.tensor([[0.825, 0.4]]), atol=1e-6)


def test_ibp_bounds_of_the_user_cnn_contain_sampled_outputs_and_are_exact_at_eps_zero():
    net = cardkit.compress_(user_net(), cardkit.MagnitudeConfig(sparsity=0.5)).model.eval()
    x = torch.rand(4, 1, 8, 8) * 0.8 + 0.1
    with torch.no_grad():
        exact = ibp_bounds(net, x, 0.0)
        assert torch.allclose(exact.lower, net(x), atol=1e-5) and torch.allclose(exact.upper, net(x), atol=1e-5)
        bounds = ibp_bounds(net, x, 0.05)
        for _ in range(20):
            out = net((x + 0.05 * (2 * torch.rand_like(x) - 1)).clamp(0, 1))
            assert bool((bounds.lower <= out + 1e-5).all() and (out <= bounds.upper + 1e-5).all())


def test_bounds_refuse_what_they_cannot_bound_in_one_line():
    class Squares(HandNet):
        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h * h)

    with pytest.raises(CardkitError, match=r"interval bounds do not support the operation 'mul' \(node mul of "
                                           r"Squares\); supported operations: .*x \* constant"):
        ibp_margin_bounds(Squares(), *POINTS, 0.1)
    with pytest.raises(CardkitError, match="CROWN bounds networks that are one chain of layers, and the traced graph "
                                           "of HandNet is not"):
        cardkit.certified_accuracy(HandNet(skip=True), POINTS, method="crown", eps=0.1)


def test_ibp_needs_a_traceable_model():
    class Branchy(HandNet):
        def forward(self, x):
            return self.fc2(x) if x.sum() > 0 else self.fc1(x)

    with pytest.raises(CardkitError, match="bounds need a model that torch.fx can trace; tracing Branchy failed"):
        cardkit.certified_accuracy(Branchy(), POINTS, method="ibp", eps=0.1)


class Constant(nn.Module):
    """Predicts class 0 for every image."""

    def __init__(self, inputs: int = 2):
        super().__init__()
        self.fc = nn.Linear(inputs, 10)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(F.one_hot(torch.tensor(0), 10).float())

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_smoothing_radius_of_a_constant_classifier_is_the_clopper_pearson_one():
    x, y = torch.rand(3, 2), torch.zeros(3, dtype=torch.long)
    result = cardkit.certified_accuracy(Constant(), (x, y), method="smoothing", sigma=0.5, n0=10, n=200,
                                        alpha=0.01, radii=(0.0, 1.0, 2.0))
    radius = 0.5 * norm.ppf(0.01 ** (1 / 200))  # every one of the n draws votes for class 0
    assert result.mean_radius == pytest.approx(radius, rel=1e-9)
    assert result.certified_accuracy == [1.0, float(radius >= 1.0), 0.0]


def test_corruption_accuracy_of_a_constant_classifier_is_its_share_of_labels():
    x, y = digits(20)
    y[:7] = 0
    y[7:] = 1 + y[7:] % 9
    result = cardkit.corruption_accuracy(Constant(64), (x, y), corruptions=["gaussian_noise", "contrast"],
                                         severities=[1, 5])
    assert result.accuracy == {"gaussian_noise": [0.35, 0.35], "contrast": [0.35, 0.35]}
    assert result.clean_accuracy == 0.35 and result.mean_accuracy == pytest.approx(0.35)


def test_corruption_accuracy_reads_an_official_layout_folder_as_it_generates_it(tmp_path):
    from cardkit.corrupt.files import write_suite
    from cardkit.data import ArrayDataset

    images, labels = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (12,))
    write_suite(ArrayDataset(images, labels), tmp_path / "suite", names=["shot_noise", "pixelate"], seed=3)
    net = user_net().eval()
    settings = dict(corruptions=["shot_noise", "pixelate"], severities=[2, 4])
    read = cardkit.corruption_accuracy(net, (images, labels), suite=tmp_path / "suite", **settings)
    generated = cardkit.corruption_accuracy(net, (images, labels), seed=3, **settings)
    assert read.accuracy == generated.accuracy and read.source == str(tmp_path / "suite")


def test_size_counts_every_float_tensor_of_the_dense_user_model():
    net = user_net()
    floats = sum(t.numel() for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
    report = cardkit.size(net)
    assert report.dense_bits == 32 * floats and report.compression_ratio == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# one-line errors


@pytest.mark.parametrize("data,message", [
    ((torch.rand(4, 64), torch.zeros(4, dtype=torch.long)), r"UserNet cannot take data of shape \(64,\) per input"),
    ((torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long)), r"one integer class label per input"),
    ((torch.rand(4, 1, 8, 8) * 2, torch.zeros(4, dtype=torch.long)), r"values in \[.*\]; inputs are images in \[0, 1\]"),
    ((torch.rand(4, 1, 8, 8), torch.full((4,), 12)), r"labels run from 12 to 12 but UserNet scores 10 classes"),
    ([torch.rand(4, 1, 8, 8)], r"must be \(x, y\) tensors"),
], ids=["shape", "labels", "range", "classes", "not-a-pair"])
def test_wrong_data_is_one_line_error(data, message):
    with pytest.raises(CardkitError, match=message):
        cardkit.evaluate(user_net(), data, eps=0.1, attacks=[])


def test_compress_errors_name_the_problem():
    with pytest.raises(CardkitError, match=r"no layer of UserNet to compress \(its Conv2d / Linear layers are conv1, "
                                           r"conv2, fc1, head\); change the layers= filter"):
        cardkit.compress_(user_net(), cardkit.MagnitudeConfig(sparsity=0.5), layers=lambda name, module: False)
    with pytest.raises(CardkitError, match="no layer of Sequential to compress .it has no Conv2d or Linear layer"):
        cardkit.compress_(nn.Sequential(nn.Flatten()), cardkit.MagnitudeConfig(sparsity=0.5))
    with pytest.raises(CardkitError, match="scope 'structured' rebuilds registry models"):
        cardkit.compress_(user_net(), cardkit.MagnitudeConfig(sparsity=0.5, scope="structured"))
    with pytest.raises(CardkitError, match="unknown keyword 'epoch'"):
        cardkit.compress_(user_net(), cardkit.HydraConfig(sparsity=0.5), data=digits(), epoch=3)
    with pytest.raises(CardkitError, match="rewinds to the weights after pretraining epoch 1: pass rewind_state="):
        cardkit.compress_(user_net(), cardkit.LotteryConfig(sparsity=0.5), data=digits())
    with pytest.raises(CardkitError, match="the trades objective needs eps: pass eps="):
        cardkit.fit(user_net(), digits(), cardkit.TradesConfig())


def test_import_cardkit_exports_the_api_without_importing_torch():
    code = ("import sys, cardkit; assert 'torch' not in sys.modules; "
            "assert all(callable(getattr(cardkit, name)) for name in cardkit.__all__); print(len(cardkit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(cardkit.__all__) >= 25


# ---------------------------------------------------------------------------------------------
# the README's example


@pytest.mark.slow
def test_the_bring_your_own_model_example(tmp_path):
    spec = importlib.util.spec_from_file_location("bring_your_own_model", ROOT / "examples" / "bring_your_own_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    numbers = example.main(tmp_path / "net.card", test_points=120)  # AutoAttack on all 360 takes 80 s
    assert numbers["kept_weights"] == round(0.01 * numbers["weights"])  # HYDRA at 99%, one global budget
    assert numbers["loaded_outputs_equal"]
    stages = list(numbers["stages"].values())
    assert list(numbers["stages"]) == ["pgd-20", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert numbers["clean"] >= stages[0] >= stages[-1] == numbers["robust"]
    assert numbers["dense_clean"] > 0.9 and numbers["clean"] > 0.6 and numbers["robust"] > 0.3
    assert numbers["file_bytes"] < numbers["dense_bytes"] / 40
    # The clean accuracy, recomputed from the file by a plain argmax over those test images.
    from cardkit.data import load_dataset

    test = load_dataset("digits", seed=0).test
    x, y = test.images[:120].float() / 255, test.labels[:120]
    loaded = cardkit.load_artifact(tmp_path / "net.card", model=example.Net())
    with torch.no_grad():
        correct = int((loaded(x).argmax(1) == y).sum())
    assert correct / 120 == numbers["clean"]
