"""`cardkit run CONFIG --dry-run`: every shipped config (the paper-scale ones under configs/paper/
too) runs each of its stages and methods for a few steps, in its own NAME-dry-run folder."""

import json
from pathlib import Path

import pytest
import yaml

from cardkit.cli import main
from cardkit.config import load_config
from cardkit.engine.dryrun import POINTS, STEPS, dry_run_config

CONFIGS = Path(__file__).parents[1] / "configs"
RUNS = sorted(p for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("paper/*.yaml")] if p.stem != "deck")


def test_a_dry_run_keeps_every_stage_and_method_and_cuts_the_work():
    config = load_config(CONFIGS / "atmc.yaml")
    dry = dry_run_config(config)
    assert dry.name == "atmc-dry-run" and dry.pipeline == config.pipeline
    assert [m.label for m in dry.prune.methods] == [m.label for m in config.prune.methods]
    assert dry.data.train_size == STEPS * dry.data.batch_size and dry.data.batch_size <= 8
    assert all(getattr(dry, stage).epochs == 1 for stage in ("pretrain", "prune", "finetune"))
    assert dry.pretrain.objective.steps == 2 and dry.pretrain.objective.eps_warmup_epochs == 3
    assert dry.evaluate.samples == POINTS and [a.label for a in dry.evaluate.attacks] == ["pgd-1"]


@pytest.mark.parametrize("path", RUNS, ids=[str(p.relative_to(CONFIGS)) for p in RUNS])
def test_every_shipped_config_runs_its_first_steps(path, shared_data, tmp_path, capsys):
    config = load_config(path)
    assert main(["-q", "run", str(path), "--dry-run", "--no-progress",
                 "--set", f"output_dir={tmp_path}"]) == 0
    run = tmp_path / f"{config.name}-dry-run"
    assert not (tmp_path / config.name).exists()
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["evaluate"]["samples"] == POINTS
    folders = ([run] if "pretrain" in config.pipeline else []) + [run / m.label for m in config.prune.methods]
    for folder in folders:
        result = json.loads((folder / "evaluate" / "metrics.json").read_text())
        assert result["robustness"]["samples"] == POINTS, folder
