"""The registries stay open: a module imported after cardkit (a config's `plugins:`) registers a
dataset, an objective, an attack or a model factory, and configs, the pipeline and the CLI accept
them with the same one-line errors as the built-ins."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cardkit.attacks import ATTACKS, Threat
from cardkit.cli import main
from cardkit.config import load_config
from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.objectives import OBJECTIVES, build_objective
from cardkit.registry import Registry

PLUGIN = "cardkit_test_plugin"
PLUGIN_SOURCE = '''
"""A dataset, an objective, an attack and a model factory that cardkit does not ship."""
from typing import Literal

import numpy as np
import torch.nn.functional as F
from torch import nn

from cardkit.attacks.registry import AttackSettings, AttackStage, register_attack
from cardkit.config_base import Section
from cardkit.data.registry import DatasetInfo, RawSplits, register_dataset
from cardkit.objectives import Objective, register_objective


def _images(n, seed):
    """Class 0: every pixel 40; class 1: every pixel 200 (plus a little noise): separable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pixels = np.where(labels[:, None], 200, 40) + rng.integers(-10, 11, (n, 16))
    return pixels.reshape(n, 1, 4, 4).astype(np.uint8), labels.astype(np.int64)


@register_dataset("twotone")
def twotone(request):
    info = DatasetInfo("twotone", 2, 1, 4, (0.5,), (0.25,), ("dark", "light"))
    return RawSplits(info, train=_images(200, 0), test=_images(60, 1))


class ScaledCEConfig(Section):
    """Cross-entropy times `scale`."""

    name: Literal["scaled_ce"] = "scaled_ce"
    scale: float = 2.0


class ScaledCE(Objective):
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, model, x, y):
        logits = model(x)
        return {"loss": self.scale * F.cross_entropy(logits, y), "logits": logits}


@register_objective(ScaledCEConfig)
def scaled_ce(config, threat):
    return ScaledCE(config.scale)


class IdentityConfig(AttackSettings):
    """Returns the clean points: robust accuracy after it is the clean accuracy."""

    name: Literal["identity"] = "identity"


@register_attack(IdentityConfig)
def identity(config, model, threat, seed):
    return [AttackStage("identity", lambda x, y: x.clone())]


def mlp(num_classes, in_channels, input_size, hidden=16):
    """A plain torch model: no cardkit layer, no normalization of its own."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size ** 2, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def not_a_model(num_classes):
    return "model"
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def plugin_config(tmp_path, **extra) -> dict:
    config = {"name": "plugged", "output_dir": str(tmp_path / "runs"), "plugins": [PLUGIN],
              "threat": {"norm": "linf", "eps": 0.05},
              "data": {"name": "twotone", "batch_size": 50, "eval_batch_size": 60},
              "model": {"name": f"{PLUGIN}:mlp", "kwargs": {"hidden": 8}, "channels_last": False},
              "pretrain": {"epochs": 4, "objective": {"name": "scaled_ce", "scale": 3.0},
                           "optimizer": {"name": "adam", "lr": 0.05, "weight_decay": 0}, "eval_samples": 60},
              "evaluate": {"attacks": [{"name": "identity"}, {"name": "pgd", "steps": 5}]}}
    config.update(extra)
    return config


def write(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- the registry helper ---------------------------------------------------------------------------


def test_registry_keeps_order_refuses_duplicates_and_suggests_close_names():
    registry = Registry("widget", normalize=str.lower)
    registry.register("Alpha", 1)
    registry.register("beta", 2)
    assert registry.names() == ["alpha", "beta"] and registry.lookup("ALPHA") == 1 and "Beta" in registry
    with pytest.raises(CardkitError, match="widget 'alpha' is already registered"):
        registry.register("alpha", 3)
    with pytest.raises(CardkitError, match=r"^unknown widget 'alpah'; did you mean 'alpha'\? valid: alpha, beta$"):
        registry.lookup("alpah")
    ordered = Registry("widget", order=lambda name: -len(name))
    for name in ("a", "ccc", "bb"):
        ordered.register(name, name)
    assert ordered.names() == ["ccc", "bb", "a"]


def test_a_builtin_name_cannot_be_registered_again():
    from cardkit.objectives import NaturalConfig

    with pytest.raises(CardkitError, match="objective 'natural' is already registered"):
        OBJECTIVES.register(NaturalConfig)(lambda config, threat: None)


# --- plugins in configs -----------------------------------------------------------------------------


def test_a_plugin_registers_after_import_and_the_config_accepts_its_entries(tmp_path, plugin):
    config = load_config(write(tmp_path, plugin_config(tmp_path)))
    assert type(config.pretrain.objective).__name__ == "ScaledCEConfig" and config.pretrain.objective.scale == 3.0
    assert config.prune.objective.scale == 3.0  # later stages inherit it like a built-in objective
    assert [a.name for a in config.evaluate.attacks] == ["identity", "pgd"]
    assert "scaled_ce" in OBJECTIVES.names() and "identity" in ATTACKS.names()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    loss = build_objective(config.pretrain.objective, Threat("linf", 0.1))(model, x, y)["loss"]
    assert torch.allclose(loss, 3.0 * torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("change, expected", [
    ({"pretrain": {"objective": {"name": "scaled_c"}}},
     "pretrain.objective.name: unknown objective 'scaled_c'; valid: natural, pgd_at, trades, ibp, crown_ibp, "
     "mixtrain, gaussian, scaled_ce; did you mean 'scaled_ce'?"),
    ({"pretrain": {"objective": {"name": "scaled_ce", "scael": 2}}}, "unknown config key 'pretrain.objective.scael'"),
    ({"evaluate": {"attacks": [{"name": "identiy"}]}}, "did you mean 'identity'?"),
    ({"data": {"name": "twotones"}}, "did you mean 'twotone'?"),
    ({"plugins": ["no_such_plugin_module"]}, "plugins: cannot import 'no_such_plugin_module'"),
    ({"plugins": "cardkit_test_plugin"}, "plugins: given 'cardkit_test_plugin'; give a list"),
    ({"model": {"name": f"{PLUGIN}:nope"}}, f"module '{PLUGIN}' has no function 'nope'"),
    ({"model": {"name": "no_such_package.models:net"}}, "cannot import 'no_such_package.models'"),
])
def test_plugin_entries_get_the_builtins_one_line_errors(tmp_path, plugin, change, expected):
    config = plugin_config(tmp_path)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(CardkitError) as info:
        load_config(write(tmp_path, config))
    message = str(info.value)
    assert "\n" not in message and expected in message, message


def test_a_user_factory_gets_the_data_values_it_names_and_records_its_path(plugin):
    model = create_model(f"{PLUGIN}:mlp", num_classes=3, in_channels=1, input_size=4, hidden=5)
    assert [tuple(p.shape) for p in model.parameters()] == [(5, 16), (5,), (3, 5), (3,)]
    assert model.arch["name"] == f"{PLUGIN}:mlp" and model.arch["kwargs"] == {"hidden": 5}
    rebuilt = create_model(**model.arch)
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [(5, 16), (5,), (3, 5), (3,)]
    with pytest.raises(CardkitError, match="returned str; it must return an nn.Module"):
        create_model(f"{PLUGIN}:not_a_model", num_classes=2)
    with pytest.raises(CardkitError, match="got unknown keyword 'depth'"):
        create_model(f"{PLUGIN}:mlp", depth=3)


def test_the_pipeline_trains_and_evaluates_plugin_entries_and_a_later_process_reimports_them(
        tmp_path, plugin, capsys):
    path = write(tmp_path, plugin_config(tmp_path))
    assert main(["run", str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "plugged"
    robustness = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["robustness"]
    assert robustness["samples"] == 60 and robustness["clean_accuracy"] == 1.0  # separable by a wide margin
    stages = {s["attack"]: s["robust_accuracy"] for s in robustness["stages"]}
    assert stages["identity"] == robustness["clean_accuracy"]  # the identity attack fools no point
    assert robustness["robust_accuracy"] == stages["pgd-5"] <= stages["identity"]
    # A new process knows nothing of the plugin until the run's stored config imports it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "cardkit", "evaluate", "--checkpoint", str(run_dir),
                           "--attack", "identity"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    again = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["robustness"]
    assert again["attack"].startswith("identity") and again["robust_accuracy"] == 1.0


def test_the_cli_lists_each_registry_and_a_plugin_flag_adds_its_entries(plugin, capsys):
    from cardkit.cli import LISTINGS

    for kind in LISTINGS:
        assert main([kind]) == 0
        names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        assert len(names) == len(set(names)) >= 2, (kind, names)
    assert main(["methods"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split(maxsplit=1)
    assert first == ["magnitude", "One-shot least-weight-magnitude pruning (LWM; Sehwag et al. 2019 with "
                                  "robust fine-tuning)"]
    assert main(["--plugin", PLUGIN, "objectives"]) == 0
    lines = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    assert ["scaled_ce", "Cross-entropy times `scale`"] in lines
    assert main(["--plugin", "no_such_plugin_module", "objectives"]) == 2
    assert "cannot import 'no_such_plugin_module'" in capsys.readouterr().err


def test_prune_help_names_every_method(capsys):
    from cardkit.prune.methods import METHODS

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"pruning method: {', '.join(METHODS.names())}" in help_text


def test_an_unknown_bound_method_is_one_line_before_any_work(capsys, tmp_path):
    assert main(["certify", "--checkpoint", str(tmp_path), "--method", "crwn"]) == 2
    assert "unknown bound method 'crwn'; did you mean 'crown'" in capsys.readouterr().err


def test_a_record_cannot_call_a_function_that_is_no_model_factory(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    with pytest.raises(CardkitError, match="'shutil:rmtree' does not take num_classes"):
        create_model("shutil:rmtree", path=str(victim))
    assert victim.is_dir()


def test_a_card_file_of_a_user_factory_loads_only_into_a_given_instance(tmp_path, plugin):
    from cardkit import export, load_artifact

    model = create_model(f"{PLUGIN}:mlp", num_classes=2, in_channels=1, input_size=4).eval()
    export(model, tmp_path / "mlp.card")
    with pytest.raises(CardkitError, match=r"holds a user-defined model \(cardkit_test_plugin:mlp\).*model="):
        load_artifact(tmp_path / "mlp.card")
    fresh = create_model(f"{PLUGIN}:mlp", num_classes=2, in_channels=1, input_size=4)
    loaded = load_artifact(tmp_path / "mlp.card", model=fresh)
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(loaded(x), model(x))
