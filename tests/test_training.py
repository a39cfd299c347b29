"""Trainer, schedules, checkpoints and resume: a killed run ends with the same weights."""

import json
import math

import pytest
import torch

from cardkit.config import ScheduleConfig, validate_config
from cardkit.engine import evaluate_checkpoint, run_pipeline
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.errors import CardkitError, TrainingDiverged
from cardkit.train import Trainer, learning_rate
from cardkit.train import trainer as trainer_module


def small_config(tmp_path, **extra):
    overrides = {"name": "t", "output_dir": str(tmp_path), "data.train_size": 300, "data.val_size": 100,
                 "data.batch_size": 50, "pretrain.epochs": 10, "pretrain.objective.name": "pgd_at",
                 "pretrain.objective.steps": 2, "pretrain.eval_pgd_steps": 2, "pretrain.optimizer.name": "adam", "pretrain.optimizer.lr": 0.01,
                 "pretrain.schedule.warmup_epochs": 1, "data.crop_padding": 1, "evaluate.attacks": "[{name: pgd, steps: 5}]",
                 "threat.eps": 0.1, **extra}
    return validate_config({}, [f"{k}={v}" for k, v in overrides.items()])


def timeless(result):
    """A robustness result without its timings."""
    data = result.to_dict()
    del data["seconds"]
    for stage in data["stages"]:
        del stage["seconds"]
    return data


def final_weights(run_dir):
    return load_checkpoint(run_dir / "pretrain" / "checkpoints").model_state()


class Killed(Exception):
    pass


def kill_at_step(monkeypatch, at_step):
    original = Trainer._step
    calls = {"n": 0}

    def step(self, *args):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference")
    config = small_config(path)
    result = run_pipeline(config)
    return config, result, final_weights(config.run_dir)


# (11, 5) resumes from the mid-epoch checkpoint at step 10 (epoch 2, batch 4).
@pytest.mark.parametrize("kill_step,checkpoint_every", [(8, 0), (14, 0), (8, 5), (13, 3), (11, 5)])
def test_killed_run_resumes_to_identical_weights(tmp_path, monkeypatch, reference,
                                                 kill_step, checkpoint_every):
    # 6 steps per epoch: kills land mid-epoch, with and without mid-epoch checkpoints.
    config = small_config(tmp_path, **{"pretrain.checkpoint_every": checkpoint_every})
    _, ref_result, ref_weights = reference
    kill_at_step(monkeypatch, kill_step)
    with pytest.raises(Killed):
        run_pipeline(config)
    monkeypatch.undo()
    result = run_pipeline(config)
    weights = final_weights(config.run_dir)
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    ours, theirs = result.evaluations[0].robustness, ref_result.evaluations[0].robustness
    assert timeless(ours) == timeless(theirs)
    rows = [json.loads(line) for line in (config.run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    # A resumed epoch's training loss and accuracy average all of its batches, as uninterrupted.
    ref_rows = [json.loads(line) for line in (reference[0].run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    untimed = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [untimed(r) for r in rows] == [untimed(r) for r in ref_rows]


def test_outputs_and_pgd_below_clean(reference):
    config, _, _ = reference
    run_dir = config.run_dir
    assert (run_dir / "config.yaml").is_file()
    assert validate_config(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())) == config
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    ev = metrics["robustness"]
    assert ev["samples"] == 360 and ev["split"] == "test"
    assert ev["clean_accuracy"] > 0.5, "a few epochs of PGD-AT on digits should learn something"
    assert ev["robust_accuracy"] < ev["clean_accuracy"]
    checkpoint = load_checkpoint(run_dir / "pretrain" / "checkpoints")
    optimizer_state = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
    assert "state" in optimizer_state and optimizer_state["state"]
    again = evaluate_checkpoint(run_dir).evaluations[0].robustness
    # the same weights on the same points: the same counts, not nearly the same
    assert again.clean_accuracy == ev["clean_accuracy"]
    assert again.robust_accuracy == ev["robust_accuracy"]


def test_rerun_of_finished_run_is_a_no_op_and_changed_config_is_refused(reference):
    config, result, weights = reference
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Trainer, "_step", lambda *a: pytest.fail("a finished run trained again"))
    try:
        again = run_pipeline(config)
    finally:
        monkeypatch.undo()
    assert again.history["pretrain"] == result.history["pretrain"]
    assert timeless(again.evaluations[0].robustness) == timeless(result.evaluations[0].robustness)
    rerun_weights = final_weights(config.run_dir)
    assert all(torch.equal(rerun_weights[k], weights[k]) for k in weights)
    changed = config.model_copy(update={"seed": 1})
    with pytest.raises(CardkitError, match="different config.*seed.*--restart"):
        run_pipeline(changed)
    # Evaluation settings and the stage list may change: the trained stage is reused.
    evaluated = validate_config(config.model_dump(), ["evaluate.attacks=[{name: pgd, steps: 3}]", "pipeline=[pretrain, evaluate]"])
    assert [s.attack for s in run_pipeline(evaluated).evaluations[0].robustness.stages] == ["pgd-3"]


@pytest.mark.parametrize("at_step,where,kept", [
    (9, "epoch 2, step 3", "the last good checkpoint is kept"),
    (3, "epoch 1, step 3", "no checkpoint of this stage was written yet"),
])
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                                           at_step, where, kept):
    config = small_config(tmp_path)
    original = Trainer._step
    calls = {"n": 0}

    def step(self, x, y, epoch, state, totals):
        calls["n"] += 1
        if calls["n"] == at_step:
            cls = type(self.objective)
            original_call = cls.__call__
            monkeypatch.setattr(cls, "__call__",
                                lambda o, *a: {**original_call(o, *a), "loss": torch.tensor(float("nan"))})
        return original(self, x, y, epoch, state, totals)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at {where} \(lr .*\); {kept}:"):
        run_pipeline(config)
    if at_step < 6:
        assert not (config.run_dir / "pretrain" / "checkpoints").exists()
        return
    kept = load_checkpoint(config.run_dir / "pretrain" / "checkpoints")
    assert kept.meta["state"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in kept.model_state().values() if t.is_floating_point())


def test_damaged_checkpoints_give_clear_errors(tmp_path, reference):
    config, _, _ = reference
    checkpoint = load_checkpoint(config.run_dir / "pretrain" / "checkpoints")
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint.path, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CardkitError, match="truncated"):
        load_checkpoint(copy)
    data = bytearray(checkpoint.path.joinpath("model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CardkitError, match="sha256"):
        load_checkpoint(copy)
    (copy / "meta.json").write_text('{"format": "cardkit-checkpoint", "vers')
    with pytest.raises(CardkitError, match="not valid JSON"):
        load_checkpoint(copy)
    with pytest.raises(CardkitError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_learning_rate_schedules():
    cosine = ScheduleConfig(name="cosine", warmup_epochs=1)
    lrs = [learning_rate(s, 10, 5, 0.1, cosine) for s in range(50)]
    # linear warm-up over the first epoch's 10 steps, then half a cosine over the other 40
    expected = [0.1 * (s + 1) / 10 for s in range(10)] + [
        0.05 * (1 + math.cos(math.pi * (s - 10) / 40)) for s in range(10, 50)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 39 / 40)))  # 1.54e-4, not 0
    floor = ScheduleConfig(name="cosine", min_lr=0.01)
    assert [learning_rate(s, 10, 5, 0.1, floor) for s in (0, 25, 49)] == pytest.approx(
        [0.1, 0.01 + 0.045 * (1 + math.cos(math.pi * 25 / 50)), 0.01 + 0.045 * (1 + math.cos(math.pi * 49 / 50))])
    step = ScheduleConfig(name="step", milestones=[2, 4], gamma=0.1)
    assert [learning_rate(s, 10, 5, 1.0, step) for s in (0, 19, 20, 39, 40)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01])
    constant = ScheduleConfig(name="constant", warmup_epochs=0.5)
    assert [learning_rate(s, 10, 2, 0.2, constant) for s in (0, 4, 5, 19)] == pytest.approx(
        [0.04, 0.2, 0.2, 0.2])



_ORIGINAL_STEP = Trainer._step

# 6 steps per epoch, 60 in all, the first 6 warming up (cosine after). (kill step, checkpoint_every)
# -> the mid-epoch checkpoint the run resumes from: (completed epochs, batch, step).
MID_EPOCH = {
    (6, 5): (0, 5, 5),  # the last warm-up step, one batch before the first epoch ends
    (11, 5): (1, 4, 10),  # in the cosine phase
    (23, 7): (3, 3, 21),  # a later epoch, after two earlier mid-epoch checkpoints
}


@pytest.mark.parametrize("kill_step,every", sorted(MID_EPOCH))
def test_a_mid_epoch_checkpoint_restores_the_random_state(tmp_path, monkeypatch, reference, kill_step, every):
    """PGD-AT's random start draws from torch's global generator at every step (the crops draw from
    the loader's per-batch seeds) and the schedule is a function of the step: resuming mid-epoch
    must restore the generator's state to reach the uninterrupted run's weights bitwise."""
    epoch, batch, step = MID_EPOCH[kill_step, every]
    config = small_config(tmp_path, **{"pretrain.checkpoint_every": every})
    restored = []
    original_restore = trainer_module.set_rng_state
    monkeypatch.setattr(trainer_module, "set_rng_state",
                        lambda state: (restored.append(state), original_restore(state)))
    kill_at_step(monkeypatch, kill_step)
    with pytest.raises(Killed):
        run_pipeline(config)
    assert restored == []  # a fresh run seeds each epoch; nothing is restored
    checkpoint = load_checkpoint(config.run_dir / "pretrain" / "checkpoints")
    state = checkpoint.meta["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (epoch, batch, step)
    saved_rng = checkpoint.rng_state()
    assert saved_rng is not None
    steps = {"n": 0}

    def counted(self, *args):
        steps["n"] += 1
        return _ORIGINAL_STEP(self, *args)

    monkeypatch.setattr(Trainer, "_step", counted)
    run_pipeline(config)
    assert steps["n"] == 60 - step  # resumed from the mid-epoch checkpoint, not an epoch's start
    assert len(restored) == 1 and torch.equal(restored[0]["cpu"], saved_rng["cpu"])
    _, _, ref_weights = reference
    weights = final_weights(config.run_dir)
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]), key


def test_resuming_mid_epoch_without_the_random_state_gives_other_weights(tmp_path, monkeypatch, reference):
    """The check above can fail: with the restore made a no-op, the resumed epoch's random starts
    differ from the uninterrupted run's, and so do the final weights."""
    config = small_config(tmp_path, **{"pretrain.checkpoint_every": 5})
    kill_at_step(monkeypatch, 11)
    with pytest.raises(Killed):
        run_pipeline(config)
    monkeypatch.undo()
    monkeypatch.setattr(trainer_module, "set_rng_state", lambda state: None)
    run_pipeline(config)
    _, _, ref_weights = reference
    weights = final_weights(config.run_dir)
    assert not all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
