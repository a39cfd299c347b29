"""CARD-Decks (Diffenderfer et al. 2021): an ensemble of compact models, gated by spectra.

`fixed` gating averages the softmax of every card. `adaptive` gating compares the Fourier amplitude
spectrum of the test batch with a reference spectrum of each card's training domain (the
batch-averaged |FFT| of that domain's augmented training images) and averages only the k cards
whose domains are spectrally closest: a batch with sensor noise goes to the cards trained on noise,
a batch shifted like AugMix goes to the AugMix cards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

import torch
from torch import nn

from cardkit.errors import CardkitError

Gating = Literal["fixed", "adaptive"]
GATINGS = ("fixed", "adaptive")
_FLOOR = 1e-6  # keeps log-amplitudes finite for frequencies a domain never excites

DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l2": lambda a, b: (a - b).flatten(-3).norm(dim=-1),
    "l1": lambda a, b: (a - b).flatten(-3).abs().sum(-1),
    "cosine": lambda a, b: 1 - torch.cosine_similarity(a.flatten(-3), b.flatten(-3), dim=-1),
}
"""Distances between log-amplitude spectra (C x H x W; leading dimensions broadcast)."""


GATE_SAMPLES = 64  # images of a test batch that estimate its spectrum: the gate stays cheap


def amplitude_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of |FFT2| per channel (C x H x (W // 2 + 1)): images are real, so the
    other half of the spectrum mirrors this one and would add nothing to a distance."""
    return torch.fft.rfft2(x.float()).abs().sum(0)


def log_spectrum(amplitude_mean: torch.Tensor) -> torch.Tensor:
    return amplitude_mean.clamp_min(_FLOOR).log()


def reference_spectrum(batches: Iterable[torch.Tensor],
                       transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Log of the mean |FFT| of the (transformed) images of `batches`."""
    total, count = None, 0
    with torch.no_grad():
        for x in batches:
            x = transform(x) if transform is not None else x
            total = amplitude_sum(x) if total is None else total + amplitude_sum(x)
            count += len(x)
    if not count:
        raise CardkitError("a reference spectrum needs at least one image")
    return log_spectrum(total / count)


def domain_key(domain: Optional[dict]) -> Optional[str]:
    """A readable key of a training domain, from the parameters that change the images:
    'clean', 'augmix(alpha=1.0, depth=0, severity=3, width=3)', 'gaussian(sigma=0.1)'."""
    if domain is None:
        return None
    params = {k: v for k, v in domain.items() if k not in ("name", "jsd", "jsd_weight")}
    inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{domain['name']}({inner})" if inner else domain["name"]


@dataclass
class Card:
    name: str
    model: nn.Module
    domain: Optional[dict]  # the augmentation it was trained with; None: not recorded
    size_bytes: int  # compressed size (see cardkit.compress)
    dense_bytes: int  # the same architecture, dense float32

    @property
    def key(self) -> Optional[str]:
        return domain_key(self.domain)

    @property
    def signature(self) -> tuple:
        arch = getattr(self.model, "arch", {})
        return arch.get("num_classes"), arch.get("in_channels"), arch.get("input_size")


class CardDeck:
    """Class probabilities of a deck of cards; call it like a model (it returns probabilities).

    Adaptive gating estimates a batch's spectrum from a strided sample of GATE_SAMPLES to twice as
    many of its images, so the gate costs a small fraction of one card's forward pass.
    """

    def __init__(self, cards: list[Card], spectra: dict[str, torch.Tensor] | None = None, *,
                 gating: Gating = "fixed", k: int = 1, distance: str = "l2"):
        if not cards:
            raise CardkitError("a deck needs at least one card")
        _check_compatible(cards)
        self.cards, self.spectra = cards, dict(spectra or {})
        self.configure(gating, k, distance)

    def configure(self, gating: Gating, k: int, distance: str) -> None:
        if gating not in GATINGS:
            raise CardkitError(f"gating {gating!r} is not valid; use one of {', '.join(GATINGS)}")
        if distance not in DISTANCES:
            raise CardkitError(f"distance {distance!r} is not valid; use one of {', '.join(DISTANCES)}")
        if not 1 <= k <= len(self.cards):
            raise CardkitError(f"k={k} is not valid; the deck has {len(self.cards)} cards, give 1..{len(self.cards)}")
        if gating == "adaptive":
            self._check_domains()
        self.gating, self.k, self.distance = gating, k, distance
        if gating == "adaptive":  # one stacked reference per card, so the gate is one vector op
            self._references = torch.stack([self.spectra[c.key] for c in self.cards])

    def _check_domains(self) -> None:
        for card in self.cards:
            if card.key is None:
                raise CardkitError(f"card '{card.name}' has no recorded training domain, so adaptive "
                                   f"gating cannot place it; give its domain in the deck config "
                                   f"(e.g. domain: {{name: augmix}}) or use gating: fixed")
            if card.key not in self.spectra:
                raise CardkitError(f"the deck has no reference spectrum for domain '{card.key}' of card "
                                   f"'{card.name}'; rebuild the deck with `cardkit deck build`")

    def select(self, x: torch.Tensor) -> list[int]:
        """Indices of the cards that answer for batch `x`."""
        if self.gating == "fixed":
            return list(range(len(self.cards)))
        with torch.no_grad():
            sample = x[:: max(1, len(x) // GATE_SAMPLES)]  # strided: a sorted batch is still covered
            spectrum = log_spectrum(amplitude_sum(sample) / len(sample))
            references = self._references.to(spectrum.device)
            distances = DISTANCES[self.distance](references, spectrum)
        return distances.argsort(stable=True)[: self.k].tolist()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self.select(x)
        with torch.no_grad():
            return sum(_probabilities(self.cards[i].model, x) for i in chosen) / len(chosen)

    def memory(self) -> dict:
        """Bytes of the deck (its compressed cards) beside one dense model of the same architecture."""
        return {"cards": len(self.cards), "deck_bytes": sum(c.size_bytes for c in self.cards),
                "dense_model_bytes": self.cards[0].dense_bytes}


def _probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x).softmax(1)
    finally:
        model.train(was_training)


def _check_compatible(cards: list[Card]) -> None:
    first = cards[0]
    for card in cards[1:]:
        if card.signature != first.signature:
            raise CardkitError(f"cards '{first.name}' and '{card.name}' disagree on (classes, channels, "
                               f"input size): {first.signature} vs {card.signature}; a deck's cards must "
                               f"classify the same inputs into the same classes")
