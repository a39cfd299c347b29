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
# The paper-scale models (ResNet-18, VGG16, WRN-28-4) take 30-120 s each on one CPU thread.
PARAMS = [pytest.param(p, marks=[pytest.mark.slow] if p.parent != CONFIGS else [], id=str(p.relative_to(CONFIGS)))
          for p in RUNS]


def test_a_dry_run_keeps_every_stage_and_method_and_cuts_the_work():
    config = load_config(CONFIGS / "atmc.yaml")
    dry = dry_run_config(config)
    assert dry.name == "atmc-dry-run" and dry.pipeline == config.pipeline
    assert [m.label for m in dry.prune.methods] == [m.label for m in config.prune.methods]
    assert dry.data.train_size == STEPS * dry.data.batch_size and dry.data.batch_size <= 4
    assert all(getattr(dry, stage).epochs == 1 for stage in ("pretrain", "prune", "finetune"))
    assert dry.pretrain.objective.steps == 2 and dry.pretrain.objective.eps_warmup_epochs == 3
    assert dry.evaluate.samples == POINTS and [a.label for a in dry.evaluate.attacks] == ["pgd-1"]


@pytest.mark.parametrize("path", PARAMS)
def test_every_shipped_config_runs_its_first_steps(path, shared_data, tmp_path, capsys):
    # The paper-scale configs read the full official CIFAR-10 download; ../shared/data has its
    # training batches and the first 1,000 test images.
    data = [] if path.parent == CONFIGS else [
        "--set", f"data.data_dir={shared_data}",
        "--set", "data.test_files=[cifar-10-test-1k/test_batch_first1000.bin]"]
    config = load_config(path, data[1::2])
    assert main(["-q", "run", str(path), "--dry-run", "--no-progress",
                 "--set", f"output_dir={tmp_path}", *data]) == 0
    run = tmp_path / f"{config.name}-dry-run"
    assert not (tmp_path / config.name).exists()
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["evaluate"]["samples"] == POINTS
    folders = ([run] if "pretrain" in config.pipeline else []) + [run / m.label for m in config.prune.methods]
    for folder in folders:
        result = json.loads((folder / "evaluate" / "metrics.json").read_text())
        assert result["robustness"]["samples"] == POINTS, folder


def test_the_paper_deck_names_the_cards_of_the_paper_card_configs():
    from cardkit.engine.deck import load_deck_config

    deck = load_deck_config(CONFIGS / "paper" / "deck.yaml")
    names = {load_config(path).name: [m.label for m in load_config(path).prune.methods]
             for path in CONFIGS.glob("paper/cards-*.yaml")}
    expected = {f"runs/{run}/{label}" for run, labels in names.items() for label in labels}
    assert {card.checkpoint for card in deck.cards} == expected and len(deck.cards) == 6
