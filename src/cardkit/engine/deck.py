"""Building, saving and evaluating CARD-Decks.

A deck folder holds `deck.json` (the cards' checkpoints, domains and sizes, the gating) and
`spectra.safetensors` (one reference log-amplitude spectrum per training domain, and of clean
images). Cards stay in their run folders; the deck refers to them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cardkit.compress import model_size
from cardkit.config import DataConfig, RunConfig, _read_yaml, folder_name, validate_config, validate_section
from cardkit.config_base import Section
from cardkit.corrupt import SEVERITIES, expand_names
from cardkit.corrupt.files import CorruptedSuite, GeneratedSuite
from cardkit.data import BatchLoader
from cardkit.deck import DISTANCES, GATINGS, Card, CardDeck, domain_key, reference_spectrum
from cardkit.engine.checkpoint import record_result, write_json_atomic
from cardkit.engine.rundir import check_run_folder, claim_run_folder, run_lock
from cardkit.engine.pipeline import _find_checkpoint, _subset, load_data, model_from_checkpoint, resolve_device
from cardkit.distributed import launched_size
from cardkit.engine.threads import set_threads
from cardkit.errors import CardkitError
from cardkit.eval.corruption import evaluate_corruptions
from cardkit.objectives.augment import CLEAN, DomainConfig, augmenter, domain_config
from cardkit.train.trainer import derive_seed

log = logging.getLogger(__name__)
FORMAT, VERSION = "cardkit-deck", 1
SPECTRA = "spectra.safetensors"


class DeckCardConfig(Section):
    checkpoint: str  # a run or variant folder, e.g. runs/card-augmix/edge_popup-0.95
    name: Optional[str] = None  # default: the folder's name
    domain: Optional[DomainConfig] = None  # default: the domain recorded in the checkpoint


class DeckConfig(Section):
    name: str = Field("deck", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    seed: NonNegativeInt = 0
    cards: list[DeckCardConfig] = Field(min_length=1)
    gating: Literal[GATINGS] = "adaptive"
    k: PositiveInt = 1
    distance: Literal[tuple(DISTANCES)] = "l2"
    spectrum_samples: PositiveInt = 2000  # training images per reference spectrum
    data: Optional[DataConfig] = None  # default: the first card's data

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return folder_name(name)

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / self.name


def load_deck_config(path: str | Path) -> DeckConfig:
    return validate_section(DeckConfig, _read_yaml(Path(path)))


def build_deck(config: DeckConfig) -> Path:
    """Load the cards, compute each domain's reference spectrum, write the deck folder."""
    if launched_size() > 1:
        raise CardkitError("deck build trains nothing and runs in one process: start it without torchrun "
                           "(the cards train data-parallel with cardkit --nproc N run CARD_CONFIG)")
    set_threads(None)
    device = resolve_device(config.device)
    check_run_folder(config.folder)
    cards, run_config = _load_cards(config, device)
    if config.data is not None:
        run_config = validate_config({**run_config.model_dump(mode="json"), "data": config.data.model_dump(mode="json")})
    splits = load_data(run_config)
    images = _subset(splits.train, config.spectrum_samples, config.seed)
    loader = BatchLoader(images, run_config.data.eval_batch_size, device=device)
    domains = {domain_key(c.domain): c.domain for c in cards if c.domain is not None}
    domains.setdefault(CLEAN, {"name": CLEAN})
    spectra = {}
    for index, (key, domain) in enumerate(sorted(domains.items())):
        torch.manual_seed(derive_seed(config.seed, index))
        transform = None if domain["name"] == CLEAN else augmenter(domain_config(domain))
        spectra[key] = reference_spectrum((x for x, _ in loader.epoch(0)), transform).cpu()
    deck = CardDeck(cards, spectra, gating=config.gating, k=config.k, distance=config.distance)
    folder = config.folder
    with run_lock(folder):
        claim_run_folder(folder)
        partial = folder / (SPECTRA + ".partial")
        save_file({k: v.contiguous() for k, v in spectra.items()}, str(partial))
        partial.replace(folder / SPECTRA)
        write_json_atomic(folder / "deck.json", {
            "format": FORMAT, "version": VERSION, "config": config.model_dump(mode="json"),
            "data": run_config.data.model_dump(mode="json"), "memory": deck.memory(),
            "cards": [{"name": c.name, "checkpoint": card.checkpoint, "domain": c.domain,
                       "size_bytes": c.size_bytes} for c, card in zip(cards, config.cards)]})
    return folder


def _load_cards(config: DeckConfig, device: torch.device) -> tuple[list[Card], RunConfig]:
    cards, first_config = [], None
    for card in config.cards:
        checkpoint = _find_checkpoint(Path(card.checkpoint), "last")
        model = model_from_checkpoint(checkpoint).to(device).eval()
        domain = card.domain.model_dump(mode="json") if card.domain is not None else checkpoint.meta.get("domain")
        size = model_size(model)
        cards.append(Card(card.name or Path(card.checkpoint).name, model, domain, size.bytes,
                          size.dense_bits // 8))
        first_config = first_config or validate_config(checkpoint.meta["config"])
    return cards, first_config


def load_deck(folder: str | Path, device: torch.device | str = "cpu") -> tuple[CardDeck, dict]:
    """The deck saved in `folder` and its deck.json."""
    folder = Path(folder)
    meta = _read_meta(folder)
    try:
        spectra = load_file(str(folder / SPECTRA))
    except (OSError, SafetensorError) as err:
        raise CardkitError(f"deck '{folder}': {SPECTRA} is missing or unreadable ({err}); rebuild it with "
                           f"`cardkit deck build CONFIG`") from None
    config = DeckConfig.model_validate(meta["config"])
    cards, _ = _load_cards(config, torch.device(device))
    return CardDeck(cards, spectra, gating=config.gating, k=config.k, distance=config.distance), meta


def _read_meta(folder: Path) -> dict:
    path = folder / "deck.json"
    if not path.is_file():
        raise CardkitError(f"no deck in '{folder}' (expected deck.json); build one with `cardkit deck build CONFIG`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CardkitError(f"'{path}' is not valid JSON (truncated?); rebuild the deck") from None
    if meta.get("format") != FORMAT:
        raise CardkitError(f"'{path}' is not a cardkit deck")
    if meta.get("version", 0) > VERSION:
        raise CardkitError(f"deck '{folder}' has format version {meta['version']}, newer than this cardkit "
                           f"reads ({VERSION}); upgrade cardkit")
    return meta


def evaluate_deck(folder: str | Path, *, gating: Optional[str] = None, k: Optional[int] = None,
                  distance: Optional[str] = None, names: list[str] = ("benchmark",),
                  severities: list[int] = SEVERITIES, samples: Optional[int] = None,
                  suite: Optional[str] = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Clean and corruption accuracy of the deck and of each card alone, on the same images;
    written to <deck>/evaluate/metrics.json."""
    folder = Path(folder)
    device = resolve_device(device)
    deck, meta = load_deck(folder, device)
    deck.configure(gating or deck.gating, k or deck.k, distance or deck.distance)
    run_config = validate_config({"data": meta["data"]})
    test = _subset(load_data(run_config).test, samples, seed)
    source = str(suite) if suite else f"generated from the test split ({len(test)} images, seed {seed})"
    corrupted = CorruptedSuite(suite) if suite else GeneratedSuite(test, seed)
    classifiers = {"deck": deck, **{c.name: c.model for c in deck.cards}}  # cards load in eval mode
    batch = run_config.data.eval_batch_size
    results = evaluate_corruptions(classifiers, corrupted, source=source, names=expand_names(names),
                                   severities=list(severities), clean=test, batch_size=batch, device=device)
    report = {"deck": str(folder), "gating": deck.gating, "k": deck.k, "distance": deck.distance,
              "memory": deck.memory(), "results": {label: r.to_dict() for label, r in results.items()}}
    record_result(folder / "evaluate" / "metrics.json", report)
    return report
