"""cardkit import: published state-dict layouts onto registry models, HYDRA's masks, the errors.

The published files are written key by key from the module names of the published code (TRADES /
RobustBench WideResNet, Rice et al.'s PreActResNet-18, kuangliu's ResNet-18, HYDRA's subnet layers
and MNIST CNN), with random weights and BatchNorm statistics. The reference outputs come from a
functional forward written from the published code, which reads the file's own tensors.
"""

import argparse
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F

from cardkit.cli import main
from cardkit.data import load_dataset
from cardkit.engine import prune_checkpoint
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.engine.importer import import_checkpoint
from cardkit.engine.pipeline import model_from_checkpoint
from cardkit.errors import CardkitError
from cardkit.prune import HydraConfig

X = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # digits-sized inputs


class Published:
    """A state dict in a published layout, one module at a time (HYDRA's subnet layers add popup_scores)."""

    def __init__(self, seed: int = 0, hydra: bool = False):
        self.g = torch.Generator().manual_seed(seed)
        self.hydra = hydra
        self.state: dict[str, torch.Tensor] = {}

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def conv(self, name, out, inp, k, bias=False):
        self.state[f"{name}.weight"] = self._randn(out, inp, k, k) * (2 / (inp * k * k)) ** 0.5
        if bias:
            self.state[f"{name}.bias"] = 0.1 * self._randn(out)
        if self.hydra:
            self.state[f"{name}.popup_scores"] = self._randn(out, inp, k, k)

    def linear(self, name, out, inp):
        self.state[f"{name}.weight"] = self._randn(out, inp) / inp ** 0.5
        self.state[f"{name}.bias"] = 0.1 * self._randn(out)
        if self.hydra:
            self.state[f"{name}.popup_scores"] = self._randn(out, inp)

    def bn(self, name, c):
        self.state.update({f"{name}.weight": 1 + 0.2 * self._randn(c), f"{name}.bias": 0.2 * self._randn(c),
                           f"{name}.running_mean": 0.2 * self._randn(c),
                           f"{name}.running_var": 0.5 + torch.rand(c, generator=self.g),
                           f"{name}.num_batches_tracked": torch.tensor(123)})


def bn(x, s, name):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False, eps=1e-5)


def head(x, s, name):
    return F.linear(x.mean((2, 3)), s[f"{name}.weight"], s[f"{name}.bias"])


# TRADES / RobustBench / HYDRA WideResNet: NetworkBlock(layer=Sequential(BasicBlock)), convShortcut.
def wrn_stages(width):
    return [("block1", 16, 16 * width, 1), ("block2", 16 * width, 32 * width, 2),
            ("block3", 32 * width, 64 * width, 2)]


def wrn_state(width=2, hydra=False, sub_block1=True, seed=0):
    p = Published(seed, hydra)
    p.conv("conv1", 16, 1, 3)
    stages = wrn_stages(width) + ([("sub_block1", 16, 16 * width, 1)] if sub_block1 else [])
    for block, cin, cout, _ in stages:  # depth 10: one BasicBlock per NetworkBlock
        prefix = f"{block}.layer.0"
        p.bn(f"{prefix}.bn1", cin)
        p.conv(f"{prefix}.conv1", cout, cin, 3)
        p.bn(f"{prefix}.bn2", cout)
        p.conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            p.conv(f"{prefix}.convShortcut", cout, cin, 1)
    p.bn("bn1", 64 * width)
    p.linear("fc", 10, 64 * width)
    return p.state


def wrn_forward(s, x, width=2):
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for block, cin, cout, stride in wrn_stages(width):
        prefix = f"{block}.layer.0"
        act = F.relu(bn(out, s, f"{prefix}.bn1"))
        h = F.conv2d(act, s[f"{prefix}.conv1.weight"], stride=stride, padding=1)
        h = F.conv2d(F.relu(bn(h, s, f"{prefix}.bn2")), s[f"{prefix}.conv2.weight"], padding=1)
        out = h + (F.conv2d(act, s[f"{prefix}.convShortcut.weight"], stride=stride) if cin != cout else out)
    return head(F.relu(bn(out, s, "bn1")), s, "fc")


# Residual nets of 4 stages of 2 blocks, widths w, 2w, 4w, 8w (width 64 in the published code).
def stages(width):
    return [(f"layer{i}.{j}", (width * 2 ** (i - 2) if i > 1 else width) if j == 0 else width * 2 ** (i - 1),
             width * 2 ** (i - 1), (1 if i == 1 else 2) if j == 0 else 1) for i in range(1, 5) for j in range(2)]


# Rice et al. 2020 PreActResNet-18 (RobustBench's PreActBlockV2 with bn_before_fc).
def preact_state(width=4):
    p = Published(1)
    p.conv("conv1", width, 1, 3)
    for prefix, cin, cout, stride in stages(width):
        p.bn(f"{prefix}.bn1", cin)
        p.conv(f"{prefix}.conv1", cout, cin, 3)
        p.bn(f"{prefix}.bn2", cout)
        p.conv(f"{prefix}.conv2", cout, cout, 3)
        if stride != 1 or cin != cout:
            p.conv(f"{prefix}.shortcut.0", cout, cin, 1)
    p.bn("bn", 8 * width)
    p.linear("linear", 10, 8 * width)
    return p.state


def preact_forward(s, x, width=4):
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for prefix, cin, cout, stride in stages(width):
        act = F.relu(bn(out, s, f"{prefix}.bn1"))
        shortcut = F.conv2d(act, s[f"{prefix}.shortcut.0.weight"], stride=stride) \
            if f"{prefix}.shortcut.0.weight" in s else out
        h = F.conv2d(act, s[f"{prefix}.conv1.weight"], stride=stride, padding=1)
        out = F.conv2d(F.relu(bn(h, s, f"{prefix}.bn2")), s[f"{prefix}.conv2.weight"], padding=1) + shortcut
    return head(F.relu(bn(out, s, "bn")), s, "linear")


# kuangliu/pytorch-cifar ResNet-18, as RobustBench and HYDRA have it.
def resnet_state(width=4):
    p = Published(2)
    p.conv("conv1", width, 1, 3)
    p.bn("bn1", width)
    for prefix, cin, cout, stride in stages(width):
        p.conv(f"{prefix}.conv1", cout, cin, 3)
        p.bn(f"{prefix}.bn1", cout)
        p.conv(f"{prefix}.conv2", cout, cout, 3)
        p.bn(f"{prefix}.bn2", cout)
        if stride != 1 or cin != cout:
            p.conv(f"{prefix}.shortcut.0", cout, cin, 1)
            p.bn(f"{prefix}.shortcut.1", cout)
    p.linear("linear", 10, 8 * width)
    return p.state


def resnet_forward(s, x, width=4):
    out = F.relu(bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    for prefix, cin, cout, stride in stages(width):
        h = F.relu(bn(F.conv2d(out, s[f"{prefix}.conv1.weight"], stride=stride, padding=1), s, f"{prefix}.bn1"))
        h = bn(F.conv2d(h, s[f"{prefix}.conv2.weight"], padding=1), s, f"{prefix}.bn2")
        shortcut = bn(F.conv2d(out, s[f"{prefix}.shortcut.0.weight"], stride=stride), s, f"{prefix}.shortcut.1") \
            if f"{prefix}.shortcut.0.weight" in s else out
        out = F.relu(h + shortcut)
    return head(out, s, "linear")


# HYDRA's mnist_model, an nn.Sequential: conv 0, conv 2, linear 5, linear 7 (here for 8x8 digits).
def sequential_state(hydra=False, seed=3):
    p = Published(seed, hydra)
    p.conv("0", 16, 1, 4, bias=True)
    p.conv("2", 32, 16, 4, bias=True)
    p.linear("5", 100, 32 * 2 * 2)
    p.linear("7", 10, 100)
    return p.state


def sequential_forward(s, x):
    h = F.relu(F.conv2d(x, s["0.weight"], s["0.bias"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, s["2.weight"], s["2.bias"], stride=2, padding=1))
    h = F.relu(F.linear(h.flatten(1), s["5.weight"], s["5.bias"]))
    return F.linear(h, s["7.weight"], s["7.bias"])


def subnet_weights(state, k):
    """The weights HYDRA's SubnetConv / SubnetLinear compute with: weight x GetSubnet(|popup_scores|, k),
    where GetSubnet sorts the scores and zeroes the first int((1 - k) n)."""
    out = dict(state)
    for key, scores in state.items():
        if key.endswith(".popup_scores"):
            flat = scores.abs().flatten()
            adj = torch.ones_like(flat)
            adj[flat.sort().indices[:int((1 - k) * flat.numel())]] = 0
            weight = key.replace("popup_scores", "weight")
            out[weight] = state[weight] * adj.view_as(scores)
    return out


def import_(tmp_path, state, model, kwargs=None, name="run", wrap=lambda s: s, **options):
    file = tmp_path / f"{name}.pth"
    torch.save(wrap(state), file)
    overrides = [f"model.kwargs={json.dumps(kwargs)}"] if kwargs else []
    return import_checkpoint(file, model=model, dataset="digits", name=name, output_dir=tmp_path / "runs",
                             overrides=overrides, check_samples=options.pop("check_samples", 0), **options)


def imported_model(result):
    return model_from_checkpoint(load_checkpoint(result.checkpoint)).eval()


CASES = {  # layout: (model, kwargs, published state, published forward, how the file holds it)
    "wrn": ("wrn", {"depth": 10, "width": 2}, wrn_state, wrn_forward,
            lambda s: {"epoch": 100, "state_dict": {f"module.{k}": v for k, v in s.items()}}),
    "preact_resnet": ("preact_resnet18", {"width": 4}, preact_state, preact_forward, lambda s: s),
    "resnet": ("resnet18", {"width": 4}, resnet_state, resnet_forward, lambda s: {"net": s}),
    "sequential": ("cnn_small", None, sequential_state, sequential_forward,
                   lambda s: {"model": {f"model.{k}": v for k, v in s.items()}}),
}


@pytest.mark.parametrize("layout", CASES)
def test_published_layouts_import_with_the_published_forward(tmp_path, layout):
    model, kwargs, make_state, forward, wrap = CASES[layout]
    state = make_state()
    result = import_(tmp_path, state, model, kwargs, wrap=wrap)
    assert (result.layout, result.variant, result.normalization) == (layout, "dense", "none")
    assert result.checkpoint.parent == tmp_path / "runs" / "run" / "pretrain" / "checkpoints"
    with torch.no_grad():
        torch.testing.assert_close(imported_model(result)(X), forward(state, X), rtol=1e-5, atol=1e-5)


def test_the_files_own_mu_and_sigma_become_the_models_normalization(tmp_path):
    state = {**wrn_state(), "mu": torch.tensor([0.3]).view(1, 1, 1, 1), "sigma": torch.tensor([0.2]).view(1, 1, 1, 1)}
    result = import_(tmp_path, state, "wrn", {"depth": 10, "width": 2})
    assert result.normalization == "checkpoint"
    model = imported_model(result)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3])
    assert model.arch["mean"] == pytest.approx([0.3]) and model.arch["std"] == pytest.approx([0.2])
    with torch.no_grad():
        torch.testing.assert_close(model(X), wrn_forward(state, (X - 0.3) / 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,mean,std,source", [
    ({}, 0.0, 1.0, "none"),
    ({"mean": [0.5], "std": [0.25]}, 0.5, 0.25, "given"),
    ({"normalize": "dataset"}, None, None, "dataset"),
])
def test_the_normalization_is_an_explicit_choice(tmp_path, options, mean, std, source):
    result = import_(tmp_path, sequential_state(), "cnn_small", **options)
    model = imported_model(result)
    if source == "dataset":
        info = load_dataset("digits").info
        mean, std = info.mean[0], info.std[0]
    assert result.normalization == source
    assert model.normalize.mean.item() == pytest.approx(mean) and model.normalize.std.item() == pytest.approx(std)
    with torch.no_grad():
        torch.testing.assert_close(model(X), sequential_forward(sequential_state(), (X - mean) / std))


def test_hydra_wrn_keeps_the_top_k_scores_of_every_layer_as_hydra_does(tmp_path):
    state = wrn_state(hydra=True)  # with sub_block1, which HYDRA's WideResNet builds and never runs
    checkpoint = {"epoch": 20, "arch": "wrn_28_4", "state_dict": state, "best_prec1": torch.tensor(51.2),
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    result = import_(tmp_path, state, "wrn", {"depth": 10, "width": 2}, wrap=lambda s: checkpoint, sparsity=0.9)
    assert (result.layout, result.variant) == ("wrn", "hydra-0.9")
    assert result.checkpoint.parent == tmp_path / "runs" / "run" / "hydra-0.9" / "prune" / "checkpoints"
    stored = load_checkpoint(result.checkpoint)
    assert stored.meta["parent"] is None and stored.meta["imported"]["hydra_k"] == pytest.approx(0.1)
    saved = stored.model_state()
    # conv1 has 16 x 1 x 3 x 3 = 144 weights: HYDRA removes int(0.9 x 144) = 129 and keeps 15
    # (a rounded count would keep 14).
    assert saved["conv1.mask"].sum() == 15 and torch.equal(saved["conv1.scores"], state["conv1.popup_scores"])
    reference = subnet_weights(state, k=0.1)
    names = {"conv1": "conv1", "layer2.0.shortcut": "block2.layer.0.convShortcut", "fc": "fc",
             "layer3.0.conv2": "block3.layer.0.conv2"}
    for ours, theirs in names.items():
        expected = (reference[f"{theirs}.weight"] != 0).float()
        assert torch.equal(saved[f"{ours}.mask"], expected), ours
    with torch.no_grad():
        torch.testing.assert_close(imported_model(result)(X), wrn_forward(reference, X), rtol=1e-5, atol=1e-5)


def test_hydra_masks_of_a_hand_made_case_and_the_dense_parent(tmp_path):
    state = sequential_state(hydra=True)
    n = state["7.popup_scores"].numel()  # 1000 weights of the last layer
    signs = torch.ones(n)
    signs[::2] = -1
    state["7.popup_scores"] = (torch.arange(n, dtype=torch.float32) * signs).view(10, 100)  # |score| = index
    dense = import_(tmp_path, sequential_state(seed=4), "cnn_small")  # the run's pre-trained model
    result = import_(tmp_path, state, "cnn_small", sparsity=0.75)
    saved = load_checkpoint(result.checkpoint)
    mask = saved.model_state()["fc2.mask"].flatten()
    assert mask[:750].sum() == 0 and mask[750:].sum() == 250  # the 250 largest |scores|: indices 750-999
    assert saved.meta["parent"] == str(dense.checkpoint.relative_to(tmp_path / "runs" / "run"))
    with torch.no_grad():
        torch.testing.assert_close(imported_model(result)(X), sequential_forward(subnet_weights(state, 0.25), X))


def test_cardkit_prune_fine_tunes_an_imported_hydra_variant_under_its_masks(tmp_path):
    import_(tmp_path, sequential_state(seed=4), "cnn_small")
    hydra = import_(tmp_path, sequential_state(hydra=True), "cnn_small", sparsity=0.9)
    imported = load_checkpoint(hydra.checkpoint).model_state()
    result = prune_checkpoint(tmp_path / "runs" / "run", HydraConfig(sparsity=0.9),
                              ["finetune.epochs=1", "evaluate.attacks=[{name: pgd, steps: 1}]"])
    # The imported prune stage counts as finished: nothing trains there, the fine-tuning runs.
    assert result.history["hydra-0.9/prune"] == [] and len(result.history["hydra-0.9/finetune"]) == 1
    tuned = load_checkpoint(tmp_path / "runs" / "run" / "hydra-0.9" / "finetune" / "checkpoints").model_state()
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert torch.equal(tuned[f"{layer}.mask"], imported[f"{layer}.mask"])
    # HYDRA keeps 256 - int(0.9 x 256) = 26, 820, 1280 and 100 weights (a rounded count keeps 819 of conv2's 8192).
    metrics = json.loads((tmp_path / "runs" / "run" / "hydra-0.9" / "evaluate" / "metrics.json").read_text())
    assert [layer["kept"] for layer in metrics["layers"]] == [26, 820, 1280, 100]


def test_hydra_files_need_their_sparsity_and_sparsity_0_imports_them_dense(tmp_path):
    state = sequential_state(hydra=True)
    with pytest.raises(CardkitError, match=r"HYDRA checkpoint .* give --sparsity S"):
        import_(tmp_path, state, "cnn_small")
    result = import_(tmp_path, state, "cnn_small", sparsity=0)
    assert result.variant == "dense"
    with torch.no_grad():
        torch.testing.assert_close(imported_model(result)(X), sequential_forward(state, X))
    with pytest.raises(CardkitError, match="applies to HYDRA checkpoints"):
        import_(tmp_path, sequential_state(), "cnn_small", name="plain", sparsity=0.5)
    partial = {k: v for k, v in state.items() if k != "0.popup_scores"}
    with pytest.raises(CardkitError, match=r"popup_scores for 3 of the model's 4 .* 1 \(conv1\)"):
        import_(tmp_path, partial, "cnn_small", name="partial", sparsity=0.5)


def test_a_mismatch_names_the_missing_and_unexpected_keys_in_one_line(tmp_path, capsys):
    state = wrn_state()
    del state["bn1.running_var"]
    state["classifier.weight"], state["classifier.bias"] = state.pop("fc.weight"), state.pop("fc.bias")
    with pytest.raises(CardkitError) as error:
        import_(tmp_path, state, "wrn", {"depth": 10, "width": 2})
    message = str(error.value)
    assert "\n" not in message
    assert "closest of the layouts cardkit, wrn, preact_resnet, resnet, sequential (wrn)" in message
    assert "3 (bn_out.running_var, fc.weight, fc.bias) of the model's keys missing" in message
    assert "2 (classifier.weight, classifier.bias) of the file's keys unknown" in message
    # The same file on the command line: one line, exit code 2, the first keys and a count.
    assert main(["import", str(tmp_path / "run.pth"), "--model", "resnet18", "--data", "digits",
                 "--output-dir", str(tmp_path / "runs"), "--set", "model.kwargs={width: 4}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and " more)" in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_other_shapes_are_refused_naming_a_tensor(tmp_path):
    with pytest.raises(CardkitError, match=r"other shapes than in wrn\(depth=10, width=2, dropout=0.0\).* "
                                           r"e.g. layer1.0.conv1.weight is \(48, 16, 3, 3\) in the file, "
                                           r"\(32, 16, 3, 3\) in the model"):
        import_(tmp_path, wrn_state(width=3), "wrn", {"depth": 10, "width": 2})


def test_files_that_need_pickle_or_hold_no_state_dict_are_refused(tmp_path):
    file = tmp_path / "args.pth.tar"
    torch.save({"state_dict": sequential_state(), "args": argparse.Namespace(k=0.1)}, file)
    with pytest.raises(CardkitError, match=r"holds a argparse.Namespace besides tensors.*weights_only"):
        import_checkpoint(file, model="cnn_small", dataset="digits", output_dir=tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(CardkitError, match="cannot be read as a torch.save file"):
        import_checkpoint(tmp_path / "garbage.pt", model="cnn_small", dataset="digits", output_dir=tmp_path)
    torch.save({"epoch": 3, "arch": "wrn_28_4"}, tmp_path / "meta.pt")
    with pytest.raises(CardkitError, match=r"holds no state dict: 2 of its 2 entries are not tensors \('epoch' \(int\)"):
        import_checkpoint(tmp_path / "meta.pt", model="cnn_small", dataset="digits", output_dir=tmp_path)
    with pytest.raises(CardkitError, match="does not exist"):
        import_checkpoint(tmp_path / "nope.pt", model="cnn_small", dataset="digits", output_dir=tmp_path)
    # A zip archive with compressed entries, which torch.save never writes.
    torch.save(sequential_state(), tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    with pytest.raises(CardkitError, match="compressed or oversized entries"):
        import_checkpoint(tmp_path / "deflated.pt", model="cnn_small", dataset="digits", output_dir=tmp_path)


def test_legacy_files_and_bare_state_dicts_import(tmp_path):
    file = tmp_path / "legacy.pth.tar"
    torch.save(sequential_state(), file, _use_new_zipfile_serialization=False)  # PyTorch before 1.6
    result = import_checkpoint(file, model="cnn_small", dataset="digits", output_dir=tmp_path, check_samples=0)
    assert result.run_dir == tmp_path / "legacy"  # named after the file
    with torch.no_grad():
        torch.testing.assert_close(imported_model(result)(X), sequential_forward(sequential_state(), X))
    with pytest.raises(CardkitError, match="holds a pretrain checkpoint already"):
        import_checkpoint(file, model="cnn_small", dataset="digits", output_dir=tmp_path)


def published_mnist_model(seed=0):
    """HYDRA's mnist_model for 8x8 inputs, trained briefly on digits so that accuracy means something."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, 2, 1),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(128, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10))
    train = load_dataset("digits").train
    x, y = train.images.float() / 255, train.labels
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for step in range(60):
        batch = torch.randint(len(y), (128,))
        optimizer.zero_grad()
        F.cross_entropy(net(x[batch]), y[batch]).backward()
        optimizer.step()
    return net.eval()


def test_cli_import_then_evaluate_prune_size_export_and_certify(tmp_path, capsys):
    net = published_mnist_model()
    file = tmp_path / "mnist_model.pth"
    torch.save({"state_dict": net.state_dict()}, file)
    test = load_dataset("digits").test
    with torch.no_grad():
        accuracy = (net(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.8
    runs = tmp_path / "runs"
    assert main(["import", str(file), "--model", "cnn_small", "--data", "digits", "--name", "hydra-mnist",
                 "--output-dir", str(runs), "--set", "evaluate.attacks=[{name: pgd, steps: 1}]"]) == 0
    out = capsys.readouterr().out
    assert "(sequential layout, input normalization: none) as dense model" in out
    assert f"clean accuracy {accuracy:.4f} on 360 test images" in out
    run = runs / "hydra-mnist"
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["robustness"]["clean_accuracy"] == pytest.approx(accuracy)
    assert main(["prune", "--checkpoint", str(run), "--method", "hydra", "--sparsity", "0.9", "--set",
                 "prune.epochs=1", "--set", "finetune.epochs=1", "--no-progress"]) == 0
    variant = json.loads((run / "hydra-0.9" / "evaluate" / "metrics.json").read_text())
    assert variant["model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    capsys.readouterr()
    assert main(["size", "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 4 * sum(t.numel() for t in net.state_dict().values()) + 8
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model.card")]) == 0
    assert "outputs differ by at most 0" in capsys.readouterr().out
    assert main(["certify", "--checkpoint", str(run), "--method", "ibp", "--samples", "20"]) == 0
