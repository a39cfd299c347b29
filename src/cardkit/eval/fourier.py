"""Fourier heat maps (Yin et al. 2019, "A Fourier Perspective on Model Robustness in Computer Vision").

For each frequency (i, j) of an H x W image the input is perturbed along the unit-norm real Fourier
basis image U_ij: x' = clip(x + r * eps * U_ij, 0, 1), with a random sign r per sample and channel.
The heat map holds the error rate at every frequency, zero frequency at the centre (fftshift order).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cardkit.errors import CardkitError

@dataclass(frozen=True)
class FourierHeatMap:
    eps: float
    samples: int
    clean_error: float
    error: list[list[float]]  # H x W, zero frequency at the centre
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def fourier_basis(height: int, width: int, i: int, j: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real basis image U_ij (H x W, unit L2 norm); its spectrum is nonzero only at (i, j) and (-i, -j)."""
    return _bases(torch.tensor([[i, j]], device=device), height, width, dtype)[0]


def fourier_heat_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                     batch_size: int = 500, generator: torch.Generator | None = None) -> FourierHeatMap:
    """Error rate of `model` on (x, y) under Fourier-basis noise of L2 norm `eps` at every frequency.

    x is N x C x H x W in [0, 1] on the model's device. Signs come from `generator` (a CPU generator;
    None: torch's global one). The model is evaluated in eval mode and its mode is restored afterwards.
    """
    _check(x, y, eps, batch_size)
    height, width = x.shape[-2:]
    freqs = _half_spectrum(height, width)
    # All signs are drawn up front so the map does not depend on batch_size.
    signs = torch.randint(0, 2, (len(freqs), len(x), x.shape[1]), generator=generator, dtype=torch.int8)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            clean_error = _wrong(model, x, y, batch_size).double().mean().item()
            wrong = _wrong_per_frequency(model, x, y, eps, freqs.to(x.device), signs, batch_size)
    finally:
        model.train(was_training)
    rates = wrong.cpu().double() / len(x)
    return FourierHeatMap(eps=float(eps), samples=len(x), clean_error=clean_error,
                          error=_centred_map(freqs, rates, height, width).tolist(),
                          seconds=time.perf_counter() - start)


def save_heat_map(result: FourierHeatMap, path: str | Path, title: str = "") -> None:
    """Writes the heat map as a PNG (matplotlib, Agg backend, colour bar, frequency axes)."""
    # Imported here so that evaluation alone does not load matplotlib; the figure has its own Agg
    # canvas, which leaves pyplot's global backend and state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = len(result.error), len(result.error[0])
    # Pixel centres sit on the signed frequencies: -H//2 .. H - H//2 - 1.
    extent = (-(width // 2) - 0.5, width - width // 2 - 0.5, height - height // 2 - 0.5, -(height // 2) - 0.5)
    figure = Figure(figsize=(4.8, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(result.error, cmap="viridis", vmin=0.0, vmax=1.0, extent=extent,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label="error rate")
    axes.set_xlabel("horizontal frequency")
    axes.set_ylabel("vertical frequency")
    axes.set_title(title or f"Fourier heat map, eps = {result.eps:g}")
    figure.tight_layout()
    figure.savefig(Path(path), format="png", dpi=120)


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise CardkitError(f"Fourier heat map: eps must be a finite number > 0, got {eps!r}")
    if x.dim() != 4 or len(x) == 0:
        raise CardkitError(f"Fourier heat map: x must be a non-empty N x C x H x W batch, got shape {tuple(x.shape)}")
    if y.shape != (len(x),):
        raise CardkitError(f"Fourier heat map: y must hold one label per input ({len(x)}), got shape {tuple(y.shape)}")
    if batch_size < 1:
        raise CardkitError(f"Fourier heat map: batch_size must be >= 1, got {batch_size}")


def _half_spectrum(height: int, width: int) -> torch.Tensor:
    """One (i, j) of each pair {(i, j), (-i, -j)} (indices mod H, W), as a K x 2 tensor."""
    pairs = {min((i, j), (-i % height, -j % width)) for i in range(height) for j in range(width)}
    return torch.tensor(sorted(pairs))


def _bases(freqs: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """K x H x W unit-norm basis images cos(2 pi (i h / H + j w / W)) for the K x 2 frequencies."""
    h = torch.arange(height, device=freqs.device)
    w = torch.arange(width, device=freqs.device)
    i, j = freqs[:, 0, None, None], freqs[:, 1, None, None]
    # The phase in units of 1 / (H W), folded onto [0, H W / 2] (cos is even): exact integers make
    # U_ij and U_{-i,-j} bit-identical.
    phase = (i * h[:, None] * width + j * w * height) % (height * width)
    phase = torch.minimum(phase, height * width - phase)
    basis = torch.cos(phase.double() * (2 * math.pi / (height * width)))
    return (basis / basis.flatten(1).norm(dim=1)[:, None, None]).to(dtype)


def _wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[k:k + batch_size]).argmax(1) != y[k:k + batch_size]
                      for k in range(0, len(x), batch_size)])


def _wrong_per_frequency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                         freqs: torch.Tensor, signs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Misclassified count per frequency; each batch spans consecutive (frequency, sample) pairs,
    so small sample sets still fill a batch with several frequencies."""
    n, (height, width) = len(x), x.shape[-2:]
    flat_signs = signs.flatten(0, 1)
    wrong = torch.zeros(len(freqs), dtype=torch.long, device=x.device)
    for start in range(0, len(flat_signs), batch_size):
        stop = min(start + batch_size, len(flat_signs))
        index = torch.arange(start, stop, device=x.device)
        f, s = index // n, index % n
        first = start // n
        basis = _bases(freqs[first:(stop - 1) // n + 1], height, width, x.dtype)[f - first]
        r = flat_signs[start:stop].to(x.device, x.dtype) * 2 - 1
        noisy = (x[s] + eps * r[:, :, None, None] * basis[:, None]).clamp(0, 1)
        wrong.index_add_(0, f, (model(noisy).argmax(1) != y[s]).long())
    return wrong


def _centred_map(freqs: torch.Tensor, rates: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """H x W map with both (i, j) and (-i, -j) filled, shifted so frequency 0 sits at (H // 2, W // 2)."""
    grid = torch.empty(height, width, dtype=rates.dtype)
    i, j = freqs[:, 0], freqs[:, 1]
    for fi, fj in ((i, j), (-i % height, -j % width)):
        grid[(fi + height // 2) % height, (fj + width // 2) % width] = rates
    return grid
