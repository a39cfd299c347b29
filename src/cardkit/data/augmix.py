"""AugMix (Hendrycks et al., 2020) for float image batches, vectorised over the batch.

Each sample mixes `width` chains of 1..3 (or `depth`) random operations with Dirichlet weights,
then mixes the result with the original image with a Beta-distributed weight. Only operations that
do not overlap the common corruption benchmarks are used. Operation magnitudes follow the paper's
mapping from severity to parameter, defined for 32 x 32 images; translations scale with the image
side. Deviations from the reference implementation: shears are about the image centre rather than
the top-left corner, equalize uses an exact step (see `equalize`), and intermediate results stay
in float rather than being rounded to 8 bits after every operation.

Per chain step the samples are grouped by their drawn operation and each group is transformed at
once; all affine operations of a step share one `grid_sample` with per-sample matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cardkit.errors import CardkitError

MAX_DEPTH = 3  # chains draw their depth from 1..MAX_DEPTH when depth = 0
MAX_LEVEL = 10.0  # severities and levels are on a 0..10 scale
MIXTURE_FLOOR = 1e-7  # clamp of the mixture distribution in the consistency loss


def _per_sample(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return param.to(x.device, x.dtype).view(-1, 1, 1, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit level (0..255, as floats) of each pixel."""
    return (x * 255).round()


def autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image linearly to span [0, 1]; flat channels stay as they are."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image over 256 levels.

    Level v maps to the share of pixels below v among those below the top level, as PIL does, but
    with an exact rather than integer-rounded step, so that images of fewer than 510 pixels are
    equalised too. Channels of one level stay as they are.
    """
    n, c, h, w = x.shape
    q = _quantise(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, q, torch.ones(1, 1, dtype=torch.long, device=x.device).expand_as(q))
    levels = torch.arange(256, device=x.device)
    top = hist.gather(1, torch.where(hist > 0, levels, 0).amax(1, keepdim=True))  # pixels at the top level
    step = (h * w - top).to(x.dtype) / 255
    table = torch.floor((hist.cumsum(1) - hist) / step.clamp_min(1e-12) + 0.5).clamp(max=255) / 255
    equalised = table.gather(1, q).view(n, c, h, w)
    return torch.where(step.view(n, c, 1, 1) > 0, equalised, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` (per sample, 1..8) of each 8-bit pixel level."""
    size = 2.0 ** (8 - _per_sample(bits, x))
    return torch.floor(_quantise(x) / size) * size / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above `threshold` (per sample; above 1 leaves the image as it is)."""
    return torch.where(x >= _per_sample(threshold, x), 1 - x, x)


def rotation(degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise rotation about the image centre, as output-to-input pixel matrices N x 2 x 3."""
    r = torch.deg2rad(degrees.double())
    cos, sin, zero = r.cos(), r.sin(), torch.zeros_like(r)
    return torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3)


def shear_x(factor: torch.Tensor) -> torch.Tensor:
    """Horizontal shear about the image centre: rows move by factor x their offset from the centre."""
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return torch.stack([one, -factor, zero, zero, one, zero], 1).view(-1, 2, 3).double()


def shear_y(factor: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return torch.stack([one, zero, zero, -factor, one, zero], 1).view(-1, 2, 3).double()


def translation_x(pixels: torch.Tensor) -> torch.Tensor:
    """Shift the content right by `pixels` (left when negative)."""
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, -pixels, zero, one, zero], 1).view(-1, 2, 3).double()


def translation_y(pixels: torch.Tensor) -> torch.Tensor:
    """Shift the content down by `pixels` (up when negative)."""
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, zero, zero, one, -pixels], 1).view(-1, 2, 3).double()


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample each image through its output-to-input matrix in pixel units about the centre
    (bilinear, black outside the image)."""
    _, _, h, w = x.shape
    # Pixel units to grid_sample's [-1, 1] units, per matrix entry.
    scale = torch.tensor([[1, h / w, 2 / w], [w / h, 1, 2 / h]], dtype=torch.float64)
    theta = (matrix.detach().cpu().double() * scale).to(x.device, x.dtype)
    # The sampling grid by broadcasting over pixel centres: affine_grid's batched product with
    # three-long rows is several times slower on the CPU.
    cols = ((2 * torch.arange(w, device=x.device, dtype=x.dtype) + 1) / w - 1)[:, None]
    rows = ((2 * torch.arange(h, device=x.device, dtype=x.dtype) + 1) / h - 1)[:, None, None]
    t = theta.transpose(1, 2)[:, :, None, None]  # N x 3 x 1 x 1 x 2: coefficient of col, row, 1
    grid = (rows * t[:, 1] + t[:, 2]) + cols * t[:, 0]  # one full-size pass
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _int_level(level: torch.Tensor, top: float) -> torch.Tensor:
    """The paper's integer parameter: level / 10 of `top`, truncated."""
    return torch.floor(level * top / MAX_LEVEL)


@dataclass(frozen=True)
class Op:
    """An AugMix operation. `param(level, sign, size)` maps per-sample levels (0..10), random signs
    (+-1) and the image size (H, W) to the operation's parameter; `apply(x, param)` transforms a
    batch. Affine operations give the output-to-input `matrix(param)` instead, applied by `warp`."""

    param: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    matrix: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return self.apply(x, param) if self.matrix is None else warp(x, self.matrix(param))


# The paper's operations, those that act on pixel values first: a step sorts its samples by op,
# which puts the affine ops next to each other for one joint resampling.
OPS: dict[str, Op] = {
    "autocontrast": Op(lambda level, sign, size: level, apply=autocontrast),
    "equalize": Op(lambda level, sign, size: level, apply=equalize),
    "posterize": Op(lambda level, sign, size: 4 - _int_level(level, 4), apply=posterize),
    "solarize": Op(lambda level, sign, size: (256 - _int_level(level, 256)) / 255, apply=solarize),
    "rotate": Op(lambda level, sign, size: sign * _int_level(level, 30), matrix=rotation),
    "shear_x": Op(lambda level, sign, size: sign * level * 0.3 / MAX_LEVEL, matrix=shear_x),
    "shear_y": Op(lambda level, sign, size: sign * level * 0.3 / MAX_LEVEL, matrix=shear_y),
    "translate_x": Op(lambda level, sign, size: sign * _int_level(level, size[1] / 3), matrix=translation_x),
    "translate_y": Op(lambda level, sign, size: sign * _int_level(level, size[0] / 3), matrix=translation_y),
}
_OP_LIST = list(OPS.values())
_FIRST_AFFINE = next(i for i, op in enumerate(_OP_LIST) if op.matrix is not None)
assert all(op.matrix is not None for op in _OP_LIST[_FIRST_AFFINE:])


def _gamma(alpha: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # torch.distributions cannot take a generator; the sampler they use can. The floor keeps
    # normalised draws finite when a tiny alpha underflows every draw to 0.
    draws = torch._standard_gamma(torch.full(shape, float(alpha), dtype=torch.float64), generator=generator)
    return draws.clamp_min(torch.finfo(torch.float64).tiny)


def _dirichlet(alpha: float, n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    g = _gamma(alpha, (n, k), generator)
    return g / g.sum(1, keepdim=True)


def _beta(alpha: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    g = _gamma(alpha, (2, n), generator)
    return g[0] / g.sum(0)


def _parameters(ops: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's parameter under its op, and its matrix where the op is affine (all steps at once)."""
    params = torch.zeros_like(levels)
    matrices = torch.zeros(*levels.shape, 2, 3, dtype=torch.float64)
    for i, op in enumerate(_OP_LIST):
        chosen = ops == i
        params[chosen] = op.param(levels[chosen], signs[chosen], size).double()
        if op.matrix is not None:
            matrices[chosen] = op.matrix(params[chosen])
    return params, matrices


def _step(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
          ops: torch.Tensor, params: torch.Tensor, matrices: torch.Tensor) -> None:
    """out[i] = op ops[i] with params[i] (or matrices[i]) applied to src[rows[i]]; op -1 leaves out[i].

    Samples are sorted by op, each pixel op transforms its group at once and one resampling does
    all affine ops. `out` may be `src` when `rows` is the identity, since the groups are disjoint.
    """
    order = torch.argsort(ops, stable=True)
    ends = torch.bincount(ops + 1, minlength=len(OPS) + 1).cumsum(0).tolist()  # ends[i + 1]: end of op i
    params, matrices = params[order], matrices[order]
    src_rows, dst = rows[order].to(src.device), order.to(out.device)  # one transfer each per step

    def run(start: int, end: int, fn: Callable[..., torch.Tensor], param: torch.Tensor) -> None:
        if end > start:
            out.index_copy_(0, dst[start:end], fn(src.index_select(0, src_rows[start:end]), param[start:end]))

    for i, op in enumerate(_OP_LIST[:_FIRST_AFFINE]):
        run(ends[i], ends[i + 1], op.apply, params)
    run(ends[_FIRST_AFFINE], ends[-1], warp, matrices)


@dataclass(frozen=True)
class AugMix:
    """AugMix of a float batch N x C x H x W in [0, 1], on the batch's device.

    Every sample draws its own chain weights, skip weight, chain depths, operations and levels
    (uniform in [0.1, severity)). Random numbers come from `generator`, which must be a CPU
    generator (None: torch's global one), and are drawn on the CPU, so a batch is augmented the
    same way on any device.
    """

    width: int = 3  # chains mixed
    depth: int = 0  # ops per chain; 0 = random 1..3 per chain, as in the paper
    severity: int = 3  # op magnitude, 1..10
    alpha: float = 1.0  # Dirichlet (chain weights) and Beta (skip mix) concentration

    def __post_init__(self) -> None:
        for name, low, high in (("width", 1, None), ("depth", 0, None), ("severity", 1, int(MAX_LEVEL))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                valid = f"an integer from {low} to {high}" if high else f"an integer >= {low}"
                raise CardkitError(f"AugMix {name}={value!r} is not valid; give {valid}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 < a < math.inf):
            raise CardkitError(f"AugMix alpha={a!r} is not valid; give a finite number > 0")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise CardkitError(f"AugMix needs a float batch N x C x H x W, got {x.dtype} of shape {tuple(x.shape)}")
        n, k = len(x), self.width
        weights, skip, ops, levels, signs = self._draw(n, generator)
        params, matrices = _parameters(ops, levels, signs, tuple(x.shape[2:]))
        # Chains are chain-major (chain j of sample i at j * n + i); the first step, which every
        # chain takes, reads the batch itself and later steps update the chains in place.
        chains = x.new_empty((k * n, *x.shape[1:]))
        positions = torch.arange(k * n)
        for s in range(len(ops)):
            src, rows = (x.detach(), positions % n) if s == 0 else (chains, positions)
            _step(src, rows, chains, ops[s], params[s], matrices[s])
        mix = torch.einsum("nk,kn...->n...", weights.to(x.device, x.dtype), chains.view(k, *x.shape))
        m = skip.to(x.device, x.dtype).view(n, 1, 1, 1)
        return ((1 - m) * x + m * mix).clamp(0, 1)

    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Chain weights (N x width), skip weights (N), and per step (rows) and chain (columns, as
        in the chains tensor) the op (-1 past the chain's depth), level and sign, all on the CPU."""
        k, steps = self.width, self.depth or MAX_DEPTH
        weights = _dirichlet(self.alpha, n, k, generator)
        skip = _beta(self.alpha, n, generator)
        depths = torch.randint(1, MAX_DEPTH + 1, (k * n,), generator=generator) if self.depth == 0 \
            else torch.full((k * n,), self.depth)
        ops = torch.randint(0, len(OPS), (steps, k * n), generator=generator)
        levels = 0.1 + (self.severity - 0.1) * torch.rand(steps, k * n, generator=generator, dtype=torch.float64)
        signs = torch.where(torch.rand(steps, k * n, generator=generator) < 0.5, -1.0, 1.0).double()
        ops[torch.arange(steps)[:, None] >= depths] = -1
        return weights, skip, ops, levels, signs


def jensen_shannon(*logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Jensen-Shannon divergence among the softmax distributions of the
    given logits (the AugMix consistency loss, with the paper's clamping of the mixture)."""
    if len(logits) < 2 or any(z.shape != logits[0].shape for z in logits):
        shapes = [tuple(z.shape) for z in logits]
        raise CardkitError(f"jensen_shannon needs two or more logits of one shape N x classes, got shapes {shapes}")
    probs = [F.softmax(z.float(), dim=1) for z in logits]
    log_mixture = (sum(probs) / len(probs)).clamp(MIXTURE_FLOOR, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)
