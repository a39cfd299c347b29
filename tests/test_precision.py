"""Mixed precision (`precision: bf16 | fp16`) and the pieces of data-parallel training that need no
second process: the training forward runs under autocast, bounds and evaluation stay fp32, fp16's
loss scale survives a resume, and SyncBatchNorm layers turn back into the model's own classes."""

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.api import fit
from cardkit.attacks import Threat
from cardkit.certify.ibp import ibp_margin_bounds
from cardkit.config import TrainStageConfig, validate_config
from cardkit.data import BatchLoader
from cardkit.data.splits import ArrayDataset
from cardkit.eval import RobustnessResult
from cardkit.objectives import IBPConfig, build_objective
from cardkit.train import build_optimizer
from cardkit.train.trainer import Trainer, TrainState, batchnorm_classes, restore_batchnorm


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 4, 4, generator=g)
    return x, (x.flatten(1)[:, :3].argmax(1))


def test_bf16_training_runs_the_forward_in_bf16_and_evaluates_in_fp32():
    model, seen = small_net(), []
    model[1].register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
    rows = fit(model, data(), "natural", epochs=1, batch_size=32, precision="bf16", eval_samples=32)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert rows[0]["train_loss"] > 0


def test_bf16_training_lands_near_fp32_training():
    full, half = small_net(), small_net()
    fit(full, data(), "natural", epochs=3, batch_size=16)
    fit(half, data(), "natural", epochs=3, batch_size=16, precision="bf16")
    # bf16 keeps 8 bits of mantissa: the same run, within a few parts in a hundred
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(full.parameters(), half.parameters()))
    assert 0 < diff < 0.05


def test_certified_losses_bound_in_fp32_under_autocast():
    model = small_net().eval()
    x, y = data(8)
    objective = build_objective(IBPConfig(kappa=0.0, warmup_epochs=0, ramp_epochs=0), Threat("linf", 0.05))
    objective.set_progress(1.0)
    worst_logits = torch.cat([torch.zeros(8, 1), -ibp_margin_bounds(model, x, y, 0.05).lower], 1)
    exact = F.cross_entropy(worst_logits, torch.zeros(8, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        robust = objective(model, x, y)["robust_loss"]
    assert robust.dtype == torch.float32
    assert torch.equal(robust, exact)


def test_fp16_loss_scale_is_saved_and_restored():
    model, saved = small_net(), []
    x, y = data()
    loader = BatchLoader(ArrayDataset((x * 255).to(torch.uint8), y), 16)
    stage = TrainStageConfig(epochs=1, objective={"name": "natural"})
    evaluate = lambda net: RobustnessResult("val", 1, 1.0, None, "linf", 0.0, "none")  # noqa: E731
    trainer = Trainer(model, build_objective(stage.objective, Threat("linf", 0.0)), stage, loader,
                      build_optimizer(model.parameters(), stage.optimizer), seed=0, stage_id=0,
                      evaluate=evaluate, save=lambda state, row, best: saved.append(dict(state.scaler)),
                      precision="fp16")
    trainer.fit(TrainState())
    assert saved and saved[-1]["scale"] == trainer.scaler.get_scale() > 0
    again = Trainer(model, build_objective(stage.objective, Threat("linf", 0.0)), stage, loader,
                    build_optimizer(model.parameters(), stage.optimizer), seed=0, stage_id=0,
                    evaluate=evaluate, save=lambda *_: None, precision="fp16")
    state = TrainState(epoch=1, scaler={**saved[-1], "scale": 1024.0})
    again.fit(state)
    assert again.scaler.get_scale() == 1024.0


def test_sync_batchnorm_layers_turn_back_into_the_model_s_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    model(torch.rand(4, 1, 4, 4))  # running statistics away from their initial values
    classes = batchnorm_classes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm) and isinstance(converted[4], nn.SyncBatchNorm)
    restore_batchnorm(converted, classes)
    assert type(converted[1]) is nn.BatchNorm2d and type(converted[4]) is nn.BatchNorm1d
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())


def test_precision_is_a_checked_config_key():
    assert validate_config({"precision": "bf16"}).precision == "bf16"
    try:
        validate_config({"precision": "fp8"})
    except Exception as error:  # one line naming the key
        assert "precision" in str(error)
    else:
        raise AssertionError("fp8 was accepted")
