"""Augmentation around any objective: what the wrapped objective sees, the JSD term, domains, and
the config errors of augmentation and corruption settings."""

import pytest
import torch
import torch.nn.functional as F

from cardkit.config import validate_config
from cardkit.data.augmix import jensen_shannon
from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.objectives import GaussianConfig, Objective, PGDATConfig
from cardkit.objectives.augment import AugMixConfig, Augmented, NoiseConfig, stage_domain


class Recording(Objective):
    def __init__(self):
        self.seen, self.progress = [], None

    def __call__(self, model, x, y):
        self.seen.append(x)
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def set_progress(self, epoch):
        self.progress = epoch


def batch():
    torch.manual_seed(0)
    return create_model("cnn_small", 10, 1, 8), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))


def test_noise_augmentation_feeds_noisy_clipped_inputs_to_the_objective():
    model, x, y = batch()
    inner = Recording()
    Augmented(inner, NoiseConfig(sigma=0.5))(model, x, y)
    seen = inner.seen[0]
    assert seen.shape == x.shape and not torch.equal(seen, x)
    assert seen.min() >= 0 and seen.max() <= 1


def test_augmix_without_jsd_trains_on_augmented_inputs_and_passes_progress_on():
    model, x, y = batch()
    inner = Recording()
    objective = Augmented(inner, AugMixConfig(jsd=False))
    objective(model, x, y)
    objective.set_progress(2.5)
    assert not torch.equal(inner.seen[0], x) and inner.progress == 2.5


def test_augmix_with_jsd_adds_the_consistency_of_two_views_to_the_clean_loss():
    model, x, y = batch()
    inner = Recording()
    torch.manual_seed(1)
    out = Augmented(inner, AugMixConfig(jsd_weight=12.0))(model, x, y)
    assert torch.equal(inner.seen[0], x)  # the wrapped objective sees the clean batch
    clean = F.cross_entropy(model(x), y)
    assert out["consistency_loss"] > 0
    torch.testing.assert_close(out["loss"], clean + 12.0 * out["consistency_loss"])
    out["loss"].backward()  # the consistency term trains the model too
    assert all(p.grad is not None for p in model.parameters())


def test_jensen_shannon_of_identical_predictions_is_zero():
    logits = torch.randn(4, 10)
    assert float(jensen_shannon(logits, logits, logits)) == pytest.approx(0, abs=1e-6)


def test_stage_domains():
    plain = validate_config({}).pretrain
    assert stage_domain(plain) == {"name": "clean"}
    smoothing = validate_config({"pretrain": {"objective": GaussianConfig(sigma=0.5).model_dump()}}).pretrain
    assert stage_domain(smoothing) == {"name": "gaussian", "sigma": 0.5}
    augmented = validate_config({"pretrain": {"objective": PGDATConfig().model_dump(),
                                              "augment": {"name": "augmix", "severity": 5}}}).pretrain
    assert stage_domain(augmented)["name"] == "augmix" and stage_domain(augmented)["severity"] == 5


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.augment={name: augmx}"], "pretrain.augment.name: unknown augmentation 'augmx'; valid: augmix, gaussian; did you mean 'augmix'?"),
    (["pretrain.augment={name: augmix, sevrity: 3}"], "unknown config key 'pretrain.augment.sevrity'; did you mean 'severity'?"),
    (["pretrain.augment={name: gaussian, sigma: 0}"], "pretrain.augment.sigma: given 0"),
    (["evaluate.corruption.names=[fgo]"], "unknown corruption 'fgo'"),
    (["evaluate.corruption.severities=[0, 6]"], "from 1 to 5"),
])
def test_augmentation_and_corruption_config_errors(overrides, message):
    with pytest.raises(CardkitError) as err:
        validate_config({}, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_corruption_groups_expand_in_the_config():
    config = validate_config({}, ["evaluate.corruption.names=[benchmark, spatter]"])
    assert len(config.evaluate.corruption.names) == 16 and config.evaluate.corruption.names[-1] == "spatter"
