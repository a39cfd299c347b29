"""Randomized smoothing (Cohen et al. 2019): the smoothed classifier g(x) = argmax_c
P(f(x + N(0, sigma^2 I)) = c) is certifiably robust in L2 within sigma x inverse-normal-CDF(pA)."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import nn

from cardkit.distributed import gather_objects, owns
from cardkit.errors import CardkitError

ABSTAIN = -1


@dataclass(frozen=True)
class SmoothingResult:
    split: str
    samples: int
    sigma: float
    n0: int
    n: int
    alpha: float
    radii: list[float]
    certified_accuracy: list[float]  # at each radius: correct and certified with radius >= r
    abstain_rate: float
    mean_radius: float  # over correct, certified samples
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_smoothing(sigma: float, n0: int, n: int, alpha: float) -> None:
    if not sigma > 0:
        raise CardkitError(f"sigma={sigma} is not valid; the noise level must be > 0 (e.g. 0.25)")
    if not 0 < alpha < 1:
        raise CardkitError(f"alpha={alpha} is not valid; the failure probability must be in (0, 1), e.g. 0.001")
    if n0 < 1 or n < 1 or n0 > n:
        raise CardkitError(f"n0={n0}, n={n} are not valid; need 1 <= n0 <= n (selection samples "
                           f"n0, e.g. 100, estimation samples n, e.g. 10000)")


@torch.no_grad()
def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch: int,
                  classes: int) -> np.ndarray:
    """Class counts of f(x + noise) over `num` noise draws, evaluated `batch` at a time."""
    counts = torch.zeros(classes, dtype=torch.long, device=x.device)
    noise = _Noise(min(batch, num), x)
    remaining = num
    while remaining > 0:
        size = min(batch, remaining)
        noisy = noise.draw(size, sigma, x)
        counts += torch.bincount(model(noisy).argmax(1), minlength=classes)
        remaining -= size
    return counts.cpu().numpy()


class _Noise:
    """Fresh i.i.d. Gaussian noise in one reused buffer. On CPU, torch's generator is serial and
    as costly as inference of a small network, so the buffer is filled in one slice per thread,
    each slice from its own generator seeded from torch's (reproducible under torch.manual_seed)."""

    def __init__(self, batch: int, x: torch.Tensor):
        self.buffer = torch.empty(batch, *x.shape, dtype=x.dtype, device=x.device)
        parts = torch.get_num_threads() if x.device.type == "cpu" else 1
        seeds = torch.randint(2**62, (parts,)).tolist() if parts > 1 else []
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def draw(self, size: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
        """x + N(0, sigma^2 I) for `size` samples; each thread adds x to its own, cache-warm slice."""
        noisy = self.buffer[:size]
        if not self.generators:
            return noisy.normal_(0, sigma).add_(x)
        slices = noisy.tensor_split(len(self.generators))
        list(_pool(len(slices)).map(lambda part, generator: part.normal_(0, sigma, generator=generator).add_(x),
                                    slices, self.generators))
        return noisy


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="smoothing-noise")


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    return 0.0 if successes == 0 else float(beta_dist.ppf(alpha, successes, trials - successes + 1))


def certify(model, x, sigma, n0, n, alpha, batch, classes) -> tuple[int, float]:
    """CERTIFY: (class, L2 radius), or (ABSTAIN, 0)."""
    guess = int(sample_counts(model, x, sigma, n0, batch, classes).argmax())
    counts = sample_counts(model, x, sigma, n, batch, classes)
    p_lower = lower_confidence_bound(int(counts[guess]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return guess, float(sigma * norm.ppf(p_lower))


def predict(model, x, sigma, n, alpha, batch, classes) -> int:
    """PREDICT: the top class, or ABSTAIN when a two-sided binomial test cannot tell it from the
    runner-up at level alpha."""
    counts = sample_counts(model, x, sigma, n, batch, classes)
    top, runner_up = np.argsort(counts)[::-1][:2]
    if binomtest(int(counts[top]), int(counts[top] + counts[runner_up]), 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top)


def smoothed_accuracy(model: nn.Module, samples: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                      sigma: float, n0: int = 100, n: int = 10000, alpha: float = 0.001,
                      radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), batch: int = 1000,
                      classes: int = 10, split: str = "test", seed: int | None = None) -> SmoothingResult:
    """Certified accuracy of the smoothed classifier at each L2 radius.

    With `seed`, each point's noise comes from its own seed (seed, index), so a point certifies the
    same wherever it is evaluated; under torchrun the points go round-robin to the ranks and every
    rank returns the whole result."""
    check_smoothing(sigma, n0, n, alpha)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    mine = []
    try:
        index = 0
        for xs, ys in samples:
            for x, y in zip(xs, ys):
                if owns(index):
                    if seed is not None:
                        torch.manual_seed(seed * 1_000_003 + index)
                    mine.append((index, *certify(model, x, sigma, n0, n, alpha, batch, classes), int(y)))
                index += 1
    finally:
        model.train(was_training)
    outcomes = [(label, y, radius) for _, label, radius, y in sorted(o for part in gather_objects(mine) for o in part)]
    total = max(len(outcomes), 1)
    certified = [sum(1 for c, y, r in outcomes if c == y and r >= radius) / total for radius in radii]
    correct = [r for c, y, r in outcomes if c == y]
    return SmoothingResult(split=split, samples=len(outcomes), sigma=sigma, n0=n0, n=n, alpha=alpha,
                           radii=list(radii), certified_accuracy=certified,
                           abstain_rate=sum(1 for c, _, _ in outcomes if c == ABSTAIN) / total,
                           mean_radius=float(np.mean(correct)) if correct else 0.0,
                           seconds=time.perf_counter() - start)
