"""A pruning method defined in this file (its config class and its handler, nothing else) runs
through prune_model, `cardkit prune`, checkpoint restore and the compressed file like a built-in:
a new method is one file plus its registration."""

import json
from typing import Literal

import torch
from pydantic import NonNegativeInt

import cardkit
from cardkit.cli import main
from cardkit.compress.artifact import save_artifact
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.engine.pipeline import model_from_checkpoint
from cardkit.prune import PruneSetup, SparsityConfig, kept_count, masked_layers, prune_model, register_method
from cardkit.prune.methods import frozen_group, set_masks
from test_prune import data, model
from test_snip import digits_run

STARTS = []  # the starts that ran: restoring a checkpoint must not run one


# --- the method -------------------------------------------------------------------------------------
class SeededRandomConfig(SparsityConfig):
    """Random pruning: keeps the weights with the largest seeded uniform scores."""

    name: Literal["seeded_random"] = "seeded_random"
    seed: NonNegativeInt = 0


@register_method(SeededRandomConfig)
def seeded_random(model, config):
    group = frozen_group(model, config.sparsity, config.scope)

    def start(context):
        STARTS.append(config)
        generator = torch.Generator().manual_seed(config.seed)
        set_masks(group, [torch.rand(layer.weight.shape, generator=generator).to(layer.weight.device)
                          for layer in group.layers])

    return PruneSetup(model, group, trains=False, start=start)
# ------------------------------------------------------------------------------------------------------


def expected_masks(shapes, sparsity, seed):
    """The top round((1 - sparsity) n) of each layer's scores, drawn independently."""
    generator, masks = torch.Generator().manual_seed(seed), []
    for shape in shapes:
        scores = torch.rand(shape, generator=generator).flatten()
        mask = torch.zeros_like(scores)
        mask[scores.argsort(descending=True)[:kept_count(scores.numel(), sparsity)]] = 1
        masks.append(mask.view(shape))
    return masks


def test_prune_model_applies_the_new_method():
    net = model()
    dense = [m.weight.detach().clone() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    setup = prune_model(net, SeededRandomConfig(sparsity=0.7, seed=3))
    masks = expected_masks([w.shape for w in dense], 0.7, 3)
    for layer, mask, weight in zip(setup.group.layers, masks, dense):
        assert torch.equal(layer.mask, mask) and torch.equal(layer.weight, weight * mask)


def test_the_new_method_runs_through_the_pipeline_restore_and_the_compressed_file(tmp_path, capsys):
    run_dir = digits_run(tmp_path)
    STARTS.clear()
    assert main(["prune", "--checkpoint", str(run_dir), "--method", "seeded_random", "--sparsity", "0.7",
                 "--no-progress"]) == 0
    assert "seeded_random-0.7" in capsys.readouterr().out and len(STARTS) == 1
    folder = run_dir / "seeded_random-0.7"
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    assert metrics["pruning"] == {"name": "seeded_random", "sparsity": 0.7, "scope": "layer", "quantize": None,
                                  "seed": 0}
    assert all(layer["kept"] == kept_count(layer["weights"], 0.7) for layer in metrics["layers"])
    tuned = model_from_checkpoint(load_checkpoint(folder / "finetune" / "checkpoints")).eval()
    assert len(STARTS) == 1  # restored from the checkpoint's state, not started again
    layers = masked_layers(tuned)
    for layer, mask in zip(layers, expected_masks([layer.weight.shape for layer in layers], 0.7, 0)):
        assert torch.equal(layer.mask, mask) and (layer.weight[mask == 0] == 0).all()
    save_artifact(tuned, tmp_path / "random.card")
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(cardkit.load_artifact(tmp_path / "random.card")(x), tuned(x))
