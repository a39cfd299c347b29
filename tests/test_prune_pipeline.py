"""The prune and finetune stages in the pipeline: variants, resume, reload, and HYDRA vs LWM."""

import json

import pytest
import torch

from cardkit.config import validate_config
from cardkit.engine import evaluate_checkpoint, run_pipeline
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.engine.pipeline import model_from_checkpoint
from cardkit.errors import CardkitError
from cardkit.prune import masked_layers
from cardkit.train import Trainer

METHODS = ("[{name: magnitude, sparsity: 0.8}, {name: hydra, sparsity: 0.8}, "
           "{name: biprop, sparsity: 0.5}, {name: magnitude, sparsity: 0.5, scope: structured}]")


def digits_config(tmp_path, **extra):
    overrides = {"name": "p", "output_dir": str(tmp_path), "data.train_size": 300, "data.val_size": 100,
                 "data.batch_size": 50, "pipeline": "[pretrain, prune, finetune, evaluate]",
                 "pretrain.epochs": 4, "pretrain.optimizer.name": "adam", "pretrain.optimizer.lr": 0.01,
                 "prune.methods": METHODS, "prune.epochs": 2, "prune.objective.name": "pgd_at",
                 "prune.objective.steps": 2, "finetune.epochs": 2, "finetune.objective.name": "pgd_at",
                 "finetune.objective.steps": 2, "finetune.optimizer.lr": 0.01, "evaluate.attacks": "[{name: pgd, steps: 3}]",
                 **extra}
    return validate_config({}, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    config = digits_config(tmp_path_factory.mktemp("pruned"))
    return config, run_pipeline(config)


def test_every_variant_is_evaluated_with_its_sparsity(pruned_run):
    config, result = pruned_run
    by_variant = {e.variant: e for e in result.evaluations}
    assert list(by_variant) == ["dense", "magnitude-0.8", "hydra-0.8", "biprop-0.5", "magnitude-0.5-structured"]
    assert by_variant["dense"].model["sparsity"] == 0
    for name in ("magnitude-0.8", "hydra-0.8"):
        assert by_variant[name].model["sparsity"] == pytest.approx(0.8, abs=1e-3)
        metrics = json.loads((config.run_dir / name / "evaluate" / "metrics.json").read_text())
        for layer in metrics["layers"]:
            assert layer["kept"] == round(0.2 * layer["weights"])
    # cnn_small on 1 x 8 x 8: conv 1->16 (4x4), conv 16->32 (4x4), linear 128->100, linear 100->10,
    # with biases; the structured variant keeps half the channels of every hidden layer (8, 16, 50)
    dense, structured = by_variant["dense"].model, by_variant["magnitude-0.5-structured"].model
    assert dense["parameters"] == (16 * 16 + 16) + (32 * 16 * 16 + 32) + (100 * 128 + 100) + (10 * 100 + 10) == 22406
    assert structured["parameters"] == (8 * 16 + 8) + (16 * 8 * 16 + 16) + (50 * 64 + 50) + (10 * 50 + 10) == 5960
    # float32, plus the normalization's mean and std
    assert dense["size_bytes"] == 4 * (22406 + 2) and structured["size_bytes"] == 4 * (5960 + 2)


def test_finetuned_variants_keep_their_masks_and_reload_from_checkpoints(pruned_run):
    config, _ = pruned_run
    for variant in ("magnitude-0.8", "hydra-0.8"):
        prune = model_from_checkpoint(load_checkpoint(config.run_dir / variant / "prune" / "checkpoints"))
        tuned = model_from_checkpoint(load_checkpoint(config.run_dir / variant / "finetune" / "checkpoints"))
        for a, b in zip(masked_layers(prune), masked_layers(tuned)):
            assert torch.equal(a.mask, b.mask)
            assert (b.weight[b.mask == 0] == 0).all()
    again = evaluate_checkpoint(config.run_dir / "hydra-0.8")
    stored = json.loads((config.run_dir / "hydra-0.8" / "evaluate" / "metrics.json").read_text())
    assert again.evaluations[0].variant == "hydra-0.8"
    # the same weights on the same points: the same accuracies, exactly
    assert again.evaluations[0].robustness.clean_accuracy == stored["robustness"]["clean_accuracy"]
    assert again.evaluations[0].robustness.robust_accuracy == stored["robustness"]["robust_accuracy"]
    structured = model_from_checkpoint(
        load_checkpoint(config.run_dir / "magnitude-0.5-structured" / "finetune" / "checkpoints"))
    assert "structured" in structured.arch and not masked_layers(structured)


def test_a_killed_prune_stage_resumes_to_the_same_variant(tmp_path, monkeypatch, pruned_run):
    reference_config, _ = pruned_run
    config = digits_config(tmp_path, **{"prune.checkpoint_every": 2})
    original, calls = Trainer._step, {"n": 0}

    def step(self, *args):
        calls["n"] += 1
        if calls["n"] == 24 + 12 + 3:  # pretrain 4 x 6 steps, magnitude's finetune 2 x 6, HYDRA's prune
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config)
    killed = load_checkpoint(config.run_dir / "hydra-0.8" / "prune" / "checkpoints")
    assert killed.meta["state"] == {**killed.meta["state"], "epoch": 0, "batch": 2}
    monkeypatch.undo()
    run_pipeline(config)
    for stage in ("prune", "finetune"):
        ours = load_checkpoint(config.run_dir / "hydra-0.8" / stage / "checkpoints").model_state()
        theirs = load_checkpoint(reference_config.run_dir / "hydra-0.8" / stage / "checkpoints").model_state()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), stage


def test_changed_prune_settings_are_refused_for_an_existing_variant(pruned_run):
    config, _ = pruned_run
    changed = validate_config(config.model_dump(mode="json"), ["finetune.epochs=5"])
    with pytest.raises(CardkitError, match="hydra-0.8|magnitude-0.8"):
        run_pipeline(changed)


def test_folders_written_before_a_key_existed_resume_at_its_default(pruned_run, monkeypatch):
    """A config key added to cardkit later (here pgd_at's clean_weight and a method's quantize)
    compares at its default, so upgrading cardkit does not orphan existing run folders; a folder
    that recorded another value for it is still refused."""
    import yaml

    config, result = pruned_run
    saved = config.run_dir / "config.yaml"
    variant = config.run_dir / "hydra-0.8" / "variant.yaml"
    originals = saved.read_text(), variant.read_text()
    assert config.prune.objective.clean_weight == 0.0  # the default the missing key compares at
    try:
        old = yaml.safe_load(originals[0])
        del old["prune"]["objective"]["clean_weight"], old["prune"]["methods"][1]["quantize"]
        saved.write_text(yaml.safe_dump(old))
        old_variant = yaml.safe_load(originals[1])
        del old_variant["method"]["quantize"], old_variant["prune"]["objective"]["clean_weight"]
        variant.write_text(yaml.safe_dump(old_variant))
        with monkeypatch.context() as patch:  # everything is complete: nothing trains again
            patch.setattr(Trainer, "_step", lambda *a: pytest.fail("a complete stage trained again"))
            resumed = run_pipeline(config)
        assert [e.variant for e in resumed.evaluations] == [e.variant for e in result.evaluations]
        for ours, theirs in zip(resumed.evaluations, result.evaluations):
            assert ours.robustness.clean_accuracy == theirs.robustness.clean_accuracy, ours.variant
        old_variant["prune"]["objective"]["clean_weight"] = 0.5  # another value than the config's
        variant.write_text(yaml.safe_dump(old_variant))
        with pytest.raises(CardkitError, match=r"hydra-0\.8.*clean_weight"):
            run_pipeline(config)
    finally:
        saved.write_text(originals[0])
        variant.write_text(originals[1])


@pytest.mark.slow
def test_hydra_beats_lwm_at_99_percent_on_mnist(tmp_path, shared_data):
    """HYDRA's headline claim, at CPU scale: with the same fine-tuning budget, masks chosen by
    scores trained under the PGD loss keep more PGD accuracy than least-weight-magnitude ones."""
    overrides = {
        "name": "mnist99", "output_dir": str(tmp_path), "pipeline": "[pretrain, prune, finetune, evaluate]",
        "threat.eps": 0.1, "data.name": "mnist", "data.data_dir": str(shared_data), "data.download": "false",
        "data.train_size": 4000, "data.val_size": 500, "data.test_size": 1000, "data.batch_size": 100,
        "pretrain.epochs": 4, "pretrain.objective": "{name: pgd_at, steps: 5, eps_warmup_epochs: 1}",
        "pretrain.optimizer": "{name: adam, lr: 0.002, weight_decay: 0}",
        "prune.methods": "[{name: magnitude, sparsity: 0.99, scope: global}, {name: hydra, sparsity: 0.99, scope: global}]",
        "prune.epochs": 3, "prune.objective": "{name: pgd_at, steps: 5}",
        "prune.optimizer": "{name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}",
        "finetune.epochs": 3, "finetune.objective": "{name: pgd_at, steps: 5}",
        "finetune.optimizer": "{name: adam, lr: 0.001, weight_decay: 0}",
        "evaluate.checkpoint": "last", "evaluate.attacks": "[{name: pgd, steps: 10}]",
    }
    config = validate_config({}, [f"{k}={v}" for k, v in overrides.items()])
    result = {e.variant: e.robustness for e in run_pipeline(config).evaluations}
    lwm, hydra = result["magnitude-0.99-global"], result["hydra-0.99-global"]
    assert hydra.robust_accuracy > lwm.robust_accuracy, (hydra, lwm)


def test_lottery_rewinds_kept_weights_to_the_early_epoch_and_reaches_its_sparsity(tmp_path):
    config = digits_config(tmp_path, **{
        "prune.methods": "[{name: lottery, sparsity: 0.9, rounds: 3, rewind_epoch: 2}, "
                         "{name: lottery, sparsity: 0.75, rounds: 2, rewind: lr}]",
        "finetune.epochs": 1})
    result = run_pipeline(config)
    early = load_checkpoint(config.run_dir / "pretrain" / "checkpoints", "epoch-2").model_state()
    prune_dir = config.run_dir / "lottery-0.9" / "prune"
    for round, folder in enumerate([prune_dir / "round-1", prune_dir / "round-2", prune_dir], start=1):
        ticket = load_checkpoint(folder / "checkpoints").model_state()
        for name, mask in ((k, v) for k, v in ticket.items() if k.endswith(".mask")):
            weight = name.removesuffix(".mask") + ".weight"
            kept = mask.bool()
            assert torch.equal(ticket[weight][kept], early[weight][kept])
            assert (ticket[weight][~kept] == 0).all()
            assert int(kept.sum()) == round_count(mask.numel(), 1 - 0.1 ** (round / 3))
    sparsity = {e.variant: e.model["sparsity"] for e in result.evaluations}
    assert sparsity["lottery-0.9"] == pytest.approx(0.9, abs=1e-3)
    assert sparsity["lottery-0.75"] == pytest.approx(0.75, abs=1e-3)
    # Learning-rate rewinding keeps the trained weights: they differ from every early weight.
    lrr = load_checkpoint(config.run_dir / "lottery-0.75" / "prune" / "checkpoints").model_state()
    key = next(k for k in lrr if k.endswith(".weight") and k.removesuffix(".weight") + ".mask" in lrr)
    assert not torch.equal(lrr[key][lrr[key] != 0], early[key][lrr[key] != 0])


def round_count(n, sparsity):
    return round((1 - sparsity) * n)


def test_lottery_without_a_kept_rewind_epoch_is_a_clear_error(pruned_run):
    from cardkit.engine import prune_checkpoint
    from cardkit.prune import LotteryConfig

    config, _ = pruned_run
    with pytest.raises(CardkitError, match="kept no checkpoint of epoch 1.*rewind: lr"):
        prune_checkpoint(config.run_dir, LotteryConfig(sparsity=0.5))


def test_a_checkpoint_of_another_architecture_is_a_clear_error(pruned_run):
    from cardkit.engine.pipeline import load_model_state
    from cardkit.models import create_model

    config, _ = pruned_run
    checkpoint = load_checkpoint(config.run_dir / "pretrain" / "checkpoints")
    with pytest.raises(CardkitError, match="holds a cnn_small model that does not fit the cnn_large"):
        load_model_state(create_model("cnn_large", 10, 1, 8), checkpoint)


def test_certify_a_pruned_variant_and_verify_in_the_evaluate_stage(pruned_run, capsys):
    from cardkit.cli import main

    config, _ = pruned_run
    results = {}
    for method in ("ibp", "crown_ibp", "crown"):
        assert main(["certify", "--checkpoint", str(config.run_dir / "hydra-0.8"), "--method", method,
                     "--eps", "0.01", "--samples", "60"]) == 0
        stored = json.loads((config.run_dir / "hydra-0.8" / "certify" / f"{method}.json").read_text())
        results[method] = stored["verification"]
        assert results[method]["samples"] == 60
        assert results[method]["verified_accuracy"] <= results[method]["clean_accuracy"]
    assert results["ibp"]["verified_accuracy"] <= results["crown"]["verified_accuracy"]
    assert "crown" in capsys.readouterr().out
    assert main(["certify", "--checkpoint", str(config.run_dir / "hydra-0.8"), "--method", "smoothing",
                 "--sigma", "0.25", "--n0", "10", "--n", "200", "--samples", "5"]) == 0
    captured = capsys.readouterr()
    assert "not trained with Gaussian noise" in captured.err and "cert acc r=0.25" in captured.out
    smoothing = json.loads((config.run_dir / "hydra-0.8" / "certify" / "smoothing.json").read_text())
    assert smoothing["verification"]["samples"] == 5
    verifying = validate_config(config.model_dump(mode="json"),
                                ["evaluate.verify=[ibp, crown]", "evaluate.verify_eps=0.01",
                                 "prune.methods=[{name: magnitude, sparsity: 0.8}]"])
    result = run_pipeline(verifying)
    for evaluation in result.evaluations:
        assert [v.method for v in evaluation.verified] == ["ibp", "crown"]
    stored = json.loads((config.run_dir / "magnitude-0.8" / "evaluate" / "metrics.json").read_text())
    assert [v["method"] for v in stored["verified"]] == ["ibp", "crown"]
