"""A dry run: the config's every stage and method for a few steps on a few images, to check that a
long run (a paper-scale config meant for a GPU) validates, finds its data and runs, in minutes on
a CPU. It writes to its own run folder (NAME-dry-run), never into the real run's."""

from __future__ import annotations

from cardkit.config import TRAIN_STAGES, RunConfig, validate_config

BATCH = 4  # images per step
STEPS = 2  # optimizer steps per stage (per epoch of one)
POINTS = 8  # evaluation points


def dry_run_config(config: RunConfig) -> RunConfig:
    """`config` cut down: one epoch of STEPS steps per stage, attacks of one or two steps, the
    evaluation on POINTS images with PGD-1 (AutoAttack's stages cost minutes per point on a CPU
    for a large model), and the corruptions at severity 1 of the first one."""
    raw = config.model_dump(mode="json")
    raw["name"] = f"{config.name}-dry-run"
    data = raw["data"]
    data["batch_size"] = min(data["batch_size"], BATCH)
    data["eval_batch_size"] = min(data["eval_batch_size"], POINTS)
    data["train_size"] = STEPS * data["batch_size"]
    data["test_size"] = POINTS
    if data["val_size"]:
        data["val_size"] = POINTS
    for stage in TRAIN_STAGES:
        section = raw[stage]
        section.update(epochs=1, eval_samples=POINTS, checkpoint_every=0,
                       eval_pgd_steps=min(section["eval_pgd_steps"], 1))
        _fewer_steps(section["objective"])
    for method in raw["prune"]["methods"]:
        for key in ("rounds",):
            if key in method:
                method[key] = min(method[key], 2)
        for key in ("end_step", "start_step", "rewind_epoch"):
            if method.get(key):
                method[key] = 1
    evaluate = raw["evaluate"]
    evaluate.update(samples=POINTS, attacks=[{"name": "pgd", "steps": 1}])
    corruption = evaluate["corruption"]
    if corruption["names"]:  # no baseline: the dry run has no baseline run to compare with
        corruption.update(names=corruption["names"][:1], severities=[1], baseline=None)
    return validate_config(raw)


def _fewer_steps(objective: dict) -> None:
    """An attacking objective with at most two attack steps (its eps schedule as configured)."""
    if "steps" in objective:
        objective["steps"] = min(objective["steps"], 2)
