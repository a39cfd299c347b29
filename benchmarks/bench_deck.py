"""Cost of adaptive (spectral) gating against fixed gating of the same CARD-Deck.

Target: adaptive gating adds at most 5% to the deck's inference time over fixed gating. The fair
comparison runs the same cards (adaptive with k = all cards): the difference is the gate itself
(one FFT of a sample of the batch and a distance per domain), also timed alone. Adaptive gating
with k = 1 is reported too: it runs one card instead of all. Prints JSON.

    python benchmarks/bench_deck.py [--repeats 15] [--cards 3] [--batch 500]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_attack import timed
from cardkit.deck import Card, CardDeck, domain_key, reference_spectrum
from cardkit.models import create_model
from cardkit.objectives.augment import AugMixConfig, NoiseConfig, augmenter

DOMAINS = [{"name": "clean"}, NoiseConfig(sigma=0.1).model_dump(mode="json"),
           AugMixConfig().model_dump(mode="json")]


def build_deck(cards: int, device: torch.device, model: str) -> CardDeck:
    torch.manual_seed(0)
    images = torch.rand(1000, 3, 32, 32, device=device)
    spectra = {}
    for domain in DOMAINS:
        config = None if domain["name"] == "clean" else (
            AugMixConfig(**domain) if domain["name"] == "augmix" else NoiseConfig(**domain))
        spectra[domain_key(domain)] = reference_spectrum(images.split(250), config and augmenter(config))
    deck_cards = [Card(f"card{i}", create_model(model, 10, 3, 32).to(device).eval(),
                       DOMAINS[i % len(DOMAINS)], 0, 0) for i in range(cards)]
    return CardDeck(deck_cards, spectra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cards", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--model", default="cnn_small")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deck = build_deck(args.cards, device, args.model)
    x = torch.rand(args.batch, 3, 32, 32, device=device)

    def predict(gating: str, k: int):
        def fn():
            deck.configure(gating, k, "l2")
            deck(x)
        return fn

    def gate():
        deck.configure("adaptive", args.cards, "l2")
        deck.select(x)

    times = timed({"fixed": predict("fixed", 1), "adaptive_all": predict("adaptive", args.cards),
                   "adaptive_k1": predict("adaptive", 1), "gate": gate}, args.repeats)
    # The gate is the whole difference between the two; timed alone it is not drowned in the
    # run-to-run noise of three forward passes.
    overhead = times["gate"] / times["fixed"]
    print(json.dumps({
        "torch": torch.__version__, "device": str(device), "model": args.model, "cards": args.cards,
        "batch": args.batch, "seconds": times,
        "gate_over_fixed": overhead, "target_overhead": 0.05, "meets_target": overhead <= 0.05,
        "adaptive_all_over_fixed": times["adaptive_all"] / times["fixed"],
        "adaptive_k1_vs_fixed": times["adaptive_k1"] / times["fixed"]}, indent=1))


if __name__ == "__main__":
    main()
