"""CARD-Decks: fixed gating averages the cards; adaptive gating routes a batch to the card whose
training domain is spectrally closest; incompatible decks are refused."""

import pytest
import torch
from sklearn.datasets import load_digits

from cardkit.deck import Card, CardDeck, domain_key, reference_spectrum
from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.objectives.augment import AugMixConfig, NoiseConfig, augmenter

AUGMIX = AugMixConfig().model_dump(mode="json")
NOISE = NoiseConfig(sigma=0.1).model_dump(mode="json")
CLEAN = {"name": "clean"}


def digits() -> torch.Tensor:
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    return images[:, None]  # N x 1 x 8 x 8 in [0, 1]


def card(name, domain, classes=10, size=8, seed=0):
    torch.manual_seed(seed)
    return Card(name, create_model("cnn_small", classes, 1, size).eval(), domain, 100, 1000)


def spectra_for(images, domains):
    spectra = {}
    for domain in domains:
        torch.manual_seed(1)
        transform = None if domain["name"] == "clean" else augmenter(
            AugMixConfig(**domain) if domain["name"] == "augmix" else NoiseConfig(**domain))
        spectra[domain_key(domain)] = reference_spectrum(images.split(200), transform)
    return spectra


def test_fixed_deck_is_the_average_of_its_cards():
    cards = [card("a", CLEAN, seed=1), card("b", NOISE, seed=2), card("c", AUGMIX, seed=3)]
    deck = CardDeck(cards, gating="fixed")
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        expected = sum(c.model(x).softmax(1) for c in cards) / 3
    torch.testing.assert_close(deck(x), expected)
    assert deck.select(x) == [0, 1, 2]


def test_adaptive_gating_routes_noise_to_the_gaussian_card_and_augmix_to_the_augmix_card():
    images = digits()
    train, test = images[:1000], images[1000:1300]
    cards = [card("clean", CLEAN), card("noise", NOISE), card("augmix", AUGMIX)]
    deck = CardDeck(cards, spectra_for(train, [CLEAN, NOISE, AUGMIX]), gating="adaptive", k=1)
    torch.manual_seed(5)
    noisy = (test + 0.1 * torch.randn_like(test)).clamp(0, 1)
    shifted = augmenter(AugMixConfig())(test)
    assert deck.select(noisy) == [1]
    assert deck.select(shifted) == [2]
    assert deck.select(test) == [0]
    # k cards: the closest first; the answer averages exactly those cards.
    deck.configure("adaptive", 2, "l2")
    chosen = deck.select(noisy)
    assert chosen[0] == 1 and len(chosen) == 2
    with torch.no_grad():
        expected = sum(cards[i].model(noisy).softmax(1) for i in chosen) / 2
    torch.testing.assert_close(deck(noisy), expected)


def test_deck_memory_sums_its_cards():
    deck = CardDeck([card("a", CLEAN), card("b", NOISE)])
    assert deck.memory() == {"cards": 2, "deck_bytes": 200, "dense_model_bytes": 1000}


def test_cards_that_disagree_on_classes_or_input_are_refused():
    with pytest.raises(CardkitError, match="disagree on"):
        CardDeck([card("a", CLEAN), card("b", CLEAN, classes=5)])
    with pytest.raises(CardkitError, match="disagree on"):
        CardDeck([card("a", CLEAN), card("b", CLEAN, size=28)])


def test_adaptive_gating_needs_every_cards_domain():
    spectra = {"clean": torch.zeros(1, 8, 8)}
    with pytest.raises(CardkitError, match="card 'b' has no recorded training domain"):
        CardDeck([card("a", CLEAN), card("b", None)], spectra, gating="adaptive")
    with pytest.raises(CardkitError, match="no reference spectrum for domain 'gaussian"):
        CardDeck([card("a", CLEAN), card("b", NOISE)], spectra, gating="adaptive")
    CardDeck([card("a", CLEAN), card("b", None)], gating="fixed")  # fixed gating needs no domain


@pytest.mark.parametrize("kwargs, message", [
    ({"gating": "soft"}, "gating 'soft'"), ({"k": 3}, "k=3"), ({"distance": "kl"}, "distance 'kl'")])
def test_bad_gating_settings(kwargs, message):
    with pytest.raises(CardkitError, match=message):
        CardDeck([card("a", CLEAN), card("b", CLEAN)], **kwargs)


def test_domain_keys_name_what_changes_the_images():
    assert domain_key(CLEAN) == "clean"
    assert domain_key(NOISE) == "gaussian(sigma=0.1)"
    assert domain_key({**AUGMIX, "jsd": False}) == domain_key(AUGMIX)  # the loss does not change images
    assert domain_key(None) is None


def test_deck_config_errors_are_one_line(tmp_path):
    from cardkit.engine.deck import load_deck_config

    config = tmp_path / "deck.yaml"
    config.write_text("cards: [{checkpoint: runs/a, domain: {name: augmx}}]\n")
    with pytest.raises(CardkitError, match=r"cards.0.domain.name: unknown domain 'augmx'; valid: augmix, gaussian, clean"):
        load_deck_config(config)
    config.write_text("cards: [{checkpoint: runs/a}]\ngatng: fixed\n")
    with pytest.raises(CardkitError, match=r"unknown config key 'gatng'; did you mean 'gating'\?"):
        load_deck_config(config)
