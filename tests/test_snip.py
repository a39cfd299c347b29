"""SNIP: the saliency against autograd on a copy of the network, exact top-k masks, robust SNIP
under PGD-AT, and `cardkit prune --method snip` on a digits run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cardkit.prune.snip as snip_module
from cardkit.attacks import Threat
from cardkit.cli import main
from cardkit.config import validate_config
from cardkit.engine import run_pipeline
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.errors import CardkitError
from cardkit.objectives import NaturalConfig, PGDATConfig, build_objective
from cardkit.prune import PruneContext, kept_count, prune_model
from cardkit.prune.snip import SnipConfig

THREAT = Threat("linf", 0.1)


def tiny(norm=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3)] + ([nn.BatchNorm2d(3)] if norm else []) + [nn.ReLU(), nn.Flatten(), nn.Linear(108, 4)]
    return nn.Sequential(*layers)


def batches(n=2, size=16):
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(size, 1, 8, 8, generator=generator), torch.randint(0, 4, (size,), generator=generator))
            for _ in range(n)]


def weights(net):
    return [m.weight for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]


def hand_saliency(net, data, loss_of):
    """|dL/dw x w| on a copy: L the mean over the batches of `loss_of(copy, x, y)`."""
    reference = copy.deepcopy(net)
    loss = sum(loss_of(reference, x, y) for x, y in data) / len(data)
    return [(g * w).abs() for g, w in zip(torch.autograd.grad(loss, weights(reference)), weights(reference))]


def context(net, data, objective, seed=0):
    return PruneContext(net, iter(data), build_objective(objective, THREAT), THREAT, seed)


@pytest.mark.parametrize("scope, count", [("layer", 1), ("global", 2)])
def test_masks_keep_the_top_k_of_the_hand_computed_connection_sensitivity(scope, count):
    net, data = tiny(), batches(count)
    dense = [w.detach().clone() for w in weights(net)]
    expected = hand_saliency(net, data, lambda model, x, y: F.cross_entropy(model(x), y))
    group = prune_model(net, SnipConfig(sparsity=0.75, scope=scope, batches=count),
                        context(net, data + batches(1), NaturalConfig())).group  # a further batch goes unused
    for layer, saliency in zip(group.layers, expected):
        assert torch.allclose(layer.scores, saliency, rtol=1e-5, atol=1e-9)
    flat = torch.cat([s.flatten() for s in expected])
    if scope == "layer":
        for layer, saliency in zip(group.layers, expected):
            kept = layer.mask.bool()
            assert int(kept.sum()) == kept_count(saliency.numel(), 0.75)
            assert saliency[kept].min() >= saliency[~kept].max()
    else:
        kept = torch.cat([layer.mask.bool().flatten() for layer in group.layers])
        assert int(kept.sum()) == kept_count(flat.numel(), 0.75)
        assert flat[kept].min() >= flat[~kept].max()
    for layer, before in zip(group.layers, dense):
        assert torch.equal(layer.weight, before * layer.mask)  # one shot: the weights keep their values


def test_robust_snip_scores_the_pgd_at_loss_and_leaves_the_model_as_it_was():
    net, data = tiny(norm=True), batches(1)
    net.eval()
    statistics = [b.clone() for b in net[1].buffers()]  # batch norm's
    objective = PGDATConfig(steps=3)

    def pgd_loss(model, x, y):  # the same attack, seeded as SNIP seeds it, on the copy
        torch.manual_seed(7)
        model.train()
        return build_objective(objective, THREAT)(model, x, y)["loss"]

    expected = hand_saliency(net, data, pgd_loss)
    clean = hand_saliency(net, data, lambda model, x, y: F.cross_entropy(model.train()(x), y))
    random_state = torch.get_rng_state()
    group = prune_model(net, SnipConfig(sparsity=0.5), context(net, data, objective, seed=7)).group
    for layer, saliency, natural in zip(group.layers, expected, clean):
        assert torch.allclose(layer.scores, saliency, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(layer.scores, natural, rtol=1e-3)  # the attack changed the loss
    assert not net.training and torch.equal(torch.get_rng_state(), random_state)
    assert all(torch.equal(a, b) for a, b in zip(statistics, net[1].buffers()))


def test_snip_without_data_is_a_one_line_error():
    with pytest.raises(CardkitError, match="snip scores the weights on training batches: pass a context") as err:
        prune_model(tiny(), SnipConfig(sparsity=0.5))
    assert "\n" not in str(err.value)
    with pytest.raises(CardkitError, match="gave no training batch"):
        prune_model(tiny(), SnipConfig(sparsity=0.5), context(tiny(), [], NaturalConfig()))


def digits_run(tmp_path):
    overrides = {"name": "s", "output_dir": str(tmp_path), "data.train_size": 300, "data.val_size": 100,
                 "data.batch_size": 50, "pipeline": "[pretrain]", "pretrain.epochs": 2,
                 "pretrain.optimizer.name": "adam", "pretrain.optimizer.lr": 0.01,
                 "prune.objective": "{name: pgd_at, steps: 2}", "finetune.epochs": 1,
                 "finetune.objective": "{name: pgd_at, steps: 2}", "evaluate.attacks": "[{name: pgd, steps: 3}]"}
    config = validate_config({}, [f"{k}={v}" for k, v in overrides.items()])
    run_pipeline(config)
    return config.run_dir


def test_cardkit_prune_with_snip_on_a_digits_run(tmp_path, capsys, monkeypatch):
    run_dir = digits_run(tmp_path)
    args = ["prune", "--checkpoint", str(run_dir), "--method", "snip", "--sparsity", "0.9", "--scope", "global",
            "--no-progress"]
    assert main(args) == 0
    assert "snip-0.9-global" in capsys.readouterr().out
    folder = run_dir / "snip-0.9-global"
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    layers = metrics["layers"]
    assert sum(layer["kept"] for layer in layers) == kept_count(sum(layer["weights"] for layer in layers), 0.9)
    pruned = load_checkpoint(folder / "prune" / "checkpoints").model_state()
    tuned = load_checkpoint(folder / "finetune" / "checkpoints").model_state()
    dense = load_checkpoint(run_dir / "pretrain" / "checkpoints").model_state()
    masks = [k for k in pruned if k.endswith(".mask")]
    assert masks and all(torch.equal(pruned[k], tuned[k]) for k in masks)
    for key in masks:
        weight, kept = key.removesuffix(".mask") + ".weight", pruned[key].bool()
        assert torch.equal(pruned[weight][kept], dense[weight][kept]) and (tuned[weight][~kept] == 0).all()
    # Not the magnitude mask: the gradient matters.
    magnitude = torch.cat([dense[k.removesuffix(".mask") + ".weight"].abs().flatten() for k in masks])
    chosen = torch.cat([pruned[k].flatten() for k in masks]).bool()
    assert not torch.equal(chosen, magnitude >= magnitude.topk(int(chosen.sum())).values.min())
    # Running it again resumes the finished variant: the saliency is not computed again.
    monkeypatch.setattr(snip_module, "connection_sensitivity", None)
    assert main(args) == 0
