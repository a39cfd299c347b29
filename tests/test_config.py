import pytest

from cardkit.config import dump_config, load_config, validate_config
from cardkit.errors import CardkitError
from cardkit.objectives import PGDATConfig, TradesConfig


def error_of(raw=None, overrides=()):
    with pytest.raises(CardkitError) as info:
        validate_config(raw or {}, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = load_config(None)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_fraction_eps_and_overrides_are_type_checked():
    config = validate_config({"threat": {"eps": "8/255"}},
                             ["pretrain.objective.name=trades", "pretrain.objective.beta=3",
                              "pretrain.epochs=7", "data.hflip=true", "model.kwargs={width: 2}"])
    assert config.threat.eps == pytest.approx(8 / 255)
    assert isinstance(config.pretrain.objective, TradesConfig)
    assert config.pretrain.objective.beta == 3
    assert config.pretrain.epochs == 7 and config.data.hflip is True
    assert config.model.kwargs == {"width": 2}
    config = validate_config({}, ["pretrain.objective.name=pgd_at", "pretrain.objective.eps=2/255"])
    assert isinstance(config.pretrain.objective, PGDATConfig)
    assert config.pretrain.objective.eps == pytest.approx(2 / 255)


@pytest.mark.parametrize("raw,overrides,expected", [
    ({"pretrain": {"epochz": 3}}, [], ["pretrain.epochz", "epochs"]),
    ({"modle": {}}, [], ["modle", "model"]),
    ({}, ["threat.eps=-0.1"], ["threat.eps", "-0.1", "greater than or equal to 0"]),
    ({}, ["pretrain.objective.name=pgd_at", "pretrain.objective.steps=0"],
     ["pretrain.objective.steps", "0", "greater than 0"]),
    ({}, ["pretrain.epochs=many"], ["pretrain.epochs", "many", "integer"]),
    ({}, ["pretrain.objective.name=pgd"], ["unknown objective 'pgd'", "pgd_at", "trades"]),
    ({}, ["pretrain.objective.beta=2"], ["pretrain.objective.beta", "valid keys here: name"]),
    ({}, ["threat.norm=l1"], ["threat.norm", "'l1'", "linf", "l2"]),
    ({}, ["threat.eps=1/0"], ["threat.eps", "divides by zero"]),
    ({}, ["nosuch.key=1"], ["nosuch", "not a config section"]),
    ({}, ["pretrain"], ["--set expects section.key=value"]),
    ({}, ["evaluate.split=val"], ["no validation split"]),
    ({}, ["pipeline=[pretrain, finetune]"], ["keeps the masks of a prune stage", "add prune"]),
    ({}, ["pipeline=[pretrain, prune]"], ["needs at least one method"]),
    ({}, ["prune.methods=[{name: hydra, sparsity: 1.0}]"], ["prune.methods.0.sparsity", "less than 1"]),
    ({}, ["prune.methods=[{name: hydra, sparsity: -0.5}]"], ["prune.methods.0.sparsity", "greater than or equal"]),
    ({}, ["prune.methods=[{name: hydar, sparsity: 0.5}]"], ["unknown pruning method 'hydar'", "did you mean 'hydra'"]),
    ({}, ["prune.methods=[{name: biprop, sparsity: 0.5, scope: structured}]"], ["magnitude and hydra"]),
    ({}, ["pipeline=[prune, pretrain]"], ["order"]),
    ({}, ["threat.norm=l2", "evaluate.verify=[crown]"], ["verify_eps"]),
    ({}, ["evaluate.verify=[crwn]"], ["evaluate.verify.0", "'crown'"]),
    ({}, ["pretrain.objective={name: gaussian, sigma: 0}"], ["pretrain.objective.sigma", "greater than 0"]),
])
def test_bad_values_give_one_line_naming_key_value_and_valid(raw, overrides, expected):
    message = error_of(raw, overrides)
    for part in expected:
        assert part in message, (part, message)


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(CardkitError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n  - x: {")
    with pytest.raises(CardkitError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string")
    with pytest.raises(CardkitError, match="mapping"):
        load_config(scalar)
