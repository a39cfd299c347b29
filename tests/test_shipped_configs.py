"""Every config in configs/ validates and, read from any folder, finds the data it names."""

from pathlib import Path

import pytest

from cardkit.config import load_config
from cardkit.engine.deck import load_deck_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
RUNS = [path for path in CONFIGS if path.stem != "deck"]


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_a_shipped_config_validates_and_finds_its_data(path, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    if config.data.name == "digits":
        return
    data_dir = Path(config.data.data_dir)
    assert data_dir == shared_data.resolve()
    files = [name for key in ("train_files", "val_files", "test_files")
             for name in getattr(config.data, key) or ()]
    assert all((data_dir / name).is_file() for name in files) if files else (data_dir / config.data.name).is_dir()


def test_the_deck_config_validates():
    assert [card.name for card in load_deck_config(CONFIGS[0].parent / "deck.yaml").cards] == \
        ["clean", "augmix", "noise"]


def test_the_shipped_configs_evaluate_with_autoattack_after_pgd():
    for path in RUNS:
        attacks = [attack.name for attack in load_config(path).evaluate.attacks]
        assert attacks[-1] == "autoattack" and "pgd" in attacks, (path.name, attacks)
