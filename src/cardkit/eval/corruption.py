"""Accuracy under common corruptions: per corruption and severity, the mean, and the corruption
errors (CE, mCE, relative mCE; Hendrycks & Dietterich 2019) against a baseline model's results."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from cardkit.corrupt import BENCHMARK, SEVERITIES
from cardkit.data import ArrayDataset, BatchLoader
from cardkit.distributed import gather_objects, owns
from cardkit.errors import CardkitError

Classifier = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of images in [0, 1] to class scores (a model's logits, a deck's probabilities)."""


class Suite(Protocol):
    size: int

    def check(self, names: Sequence[str]) -> None: ...

    def load(self, name: str, severity: int) -> ArrayDataset: ...


@dataclass(frozen=True)
class CorruptionResult:
    source: str
    samples: int  # images per corruption and severity
    clean_accuracy: Optional[float]
    severities: list[int]
    accuracy: dict[str, list[float]]  # per corruption, one entry per severity
    mean_accuracy: float  # over the benchmark corruptions evaluated (all, when only extras were)
    baseline: Optional[str] = None
    corruption_error: Optional[dict[str, float]] = None  # CE per corruption, against the baseline
    mce: Optional[float] = None
    relative_mce: Optional[float] = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["heatmap"] = {"rows": list(self.accuracy), "columns": self.severities,
                          "values": list(self.accuracy.values()), "quantity": "accuracy"}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CorruptionResult":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**fields)
        except TypeError as err:
            raise CardkitError(f"not a corruption result ({err}); give the corruption.json of an evaluation") from None


def accuracy_on(classify: Classifier, dataset: ArrayDataset, batch_size: int, device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format) -> float:
    loader = BatchLoader(dataset, batch_size, device=device, memory_format=memory_format)
    correct = 0
    with torch.no_grad():
        for x, y in loader.epoch(0):
            correct += int((classify(x).argmax(1) == y).sum())
    return correct / len(dataset)


def evaluate_corruptions(classifiers: dict[str, Classifier], suite: Suite, *, source: str,
                         names: Sequence[str], severities: Sequence[int] = SEVERITIES,
                         clean: ArrayDataset | None = None, batch_size: int = 500,
                         device: torch.device | str = "cpu",
                         memory_format: torch.memory_format = torch.contiguous_format,
                         baselines: dict[str, CorruptionResult] | None = None) -> dict[str, CorruptionResult]:
    """Accuracy of each classifier on each corruption and severity of `suite`. Every corrupted set
    is loaded (or generated) once and shared by all classifiers. Under torchrun the (corruption,
    severity) sets go round-robin to the ranks and every rank returns the whole table."""
    suite.check(names)
    device = torch.device(device)
    seconds = dict.fromkeys(classifiers, 0.0)

    def run(data: ArrayDataset) -> dict[str, float]:
        out = {}
        for label, classify in classifiers.items():
            start = time.perf_counter()
            out[label] = accuracy_on(classify, data, batch_size, device, memory_format)
            seconds[label] += time.perf_counter() - start
        return out

    sets = [(n, s) for n in names for s in severities]
    mine = {key: run(suite.load(*key)) for number, key in enumerate(sets) if owns(number)}
    table = {key: value for part in gather_objects(mine) for key, value in part.items()}
    clean_accuracy = run(clean) if clean is not None else dict.fromkeys(classifiers)
    results = {}
    for label in classifiers:
        accuracy = {n: [table[n, s][label] for s in severities] for n in names}
        result = CorruptionResult(source=source, samples=suite.size, clean_accuracy=clean_accuracy[label],
                                  severities=list(severities), accuracy=accuracy,
                                  mean_accuracy=_mean(accuracy), seconds=seconds[label])
        baseline = (baselines or {}).get(label)
        results[label] = with_baseline(result, baseline) if baseline is not None else result
    return results


def with_baseline(result: CorruptionResult, baseline: CorruptionResult, label: str = "") -> CorruptionResult:
    """CE_c = sum_s E(c, s) / sum_s E_base(c, s); relative CE subtracts each model's clean error
    first; mCE and relative mCE average them over the benchmark corruptions both results share."""
    shared = [n for n in result.accuracy if n in baseline.accuracy]
    if not shared or result.severities != baseline.severities:
        raise CardkitError(f"the baseline{' ' + label if label else ''} was evaluated on other corruptions "
                           f"or severities ({', '.join(baseline.accuracy)}; {baseline.severities}); "
                           f"evaluate it on the same ones")
    ce = {n: _error_sum(result.accuracy[n]) / max(_error_sum(baseline.accuracy[n]), 1e-12) for n in shared}
    relative = None
    if result.clean_accuracy is not None and baseline.clean_accuracy is not None:
        rel = {n: _relative(result.accuracy[n], result.clean_accuracy)
               / max(_relative(baseline.accuracy[n], baseline.clean_accuracy), 1e-12) for n in shared}
        relative = _mean_over_benchmark(rel)
    return _replace(result, baseline=label or baseline.source, corruption_error=ce,
                    mce=_mean_over_benchmark(ce), relative_mce=relative)


def _error_sum(accuracies: list[float]) -> float:
    return sum(1 - a for a in accuracies)


def _relative(accuracies: list[float], clean: float) -> float:
    return sum((1 - a) - (1 - clean) for a in accuracies)


def _mean(accuracy: dict[str, list[float]]) -> float:
    return _mean_over_benchmark({n: float(np.mean(a)) for n, a in accuracy.items()})


def _mean_over_benchmark(values: dict[str, float]) -> float:
    """The benchmark's mean leaves the held-out extras out, unless only extras were evaluated."""
    chosen = [v for n, v in values.items() if n in BENCHMARK] or list(values.values())
    return float(np.mean(chosen))


def _replace(result: CorruptionResult, **changes) -> CorruptionResult:
    return CorruptionResult(**{**asdict(result), **changes})
