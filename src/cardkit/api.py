"""The Python API: one verb per idea, on any `nn.Module`, registry-built or the user's own.

    import cardkit
    cardkit.fit(net, (x, y), cardkit.TradesConfig(beta=6), eps=0.1, epochs=10)
    pruned = cardkit.compress_(net, cardkit.HydraConfig(sparsity=0.99, scope="global"),
                               data=(x, y), objective=cardkit.TradesConfig(), eps=0.1, epochs=5)
    cardkit.fit(pruned.model, (x, y), cardkit.TradesConfig(), eps=0.1, group=pruned.group)
    cardkit.evaluate(pruned.model, (x_test, y_test), eps=0.1)
    cardkit.export(pruned.model, "net.card")
    again = cardkit.load_artifact("net.card", model=Net())

Data is given as an `(x, y)` pair of tensors (images N x ... in [0, 1] as float, or uint8 in
0-255; int labels), a `cardkit.data.ArrayDataset`, or an iterable of `(x, y)` batches such as a
torch DataLoader. Inputs are never normalized here: normalization belongs inside the model. Every
verb runs on the model's device. Methods, objectives and attacks are the config classes the YAML
pipeline uses (`HydraConfig`, `TradesConfig`, `PGDAttackConfig`, ...), so a config file and a
notebook say the same things the same way; the pipeline is these verbs plus run folders,
checkpoints and resume.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from pydantic import ValidationError
from torch import nn

from cardkit.attacks import AutoAttackConfig, PGDAttackConfig, Threat
from cardkit.certify import VerificationResult, verified_accuracy
from cardkit.certify.smoothing import SmoothingResult, smoothed_accuracy
from cardkit.compress import SizeReport, model_size
from cardkit.compress.artifact import save_artifact
from cardkit.config import OptimizerConfig, ScheduleConfig, TrainStageConfig
from cardkit.config_base import Section
from cardkit.corrupt import SEVERITIES, expand_names
from cardkit.corrupt.files import CorruptedSuite, GeneratedSuite
from cardkit.data import ArrayDataset, Augmentation, BatchLoader
from cardkit.errors import CardkitError
from cardkit.eval import RobustnessResult, evaluate_robustness
from cardkit.eval.corruption import CorruptionResult, evaluate_corruptions
from cardkit.objectives import OBJECTIVES, NaturalConfig, build_objective
from cardkit.objectives.augment import AugMixConfig, NoiseConfig, with_augmentation
from cardkit.prune import MaskGroup, PruneContext, prune_model
from cardkit.prune.masked import LayerFilter, layer_selection, prunable_layers
from cardkit.train import Trainer, TrainState, build_optimizer
from cardkit.train.trainer import PRECISIONS, derive_seed

Data = Union[tuple[torch.Tensor, torch.Tensor], ArrayDataset, Iterable]
"""(x, y) tensors, an ArrayDataset, or an iterable of (x, y) batches (e.g. a DataLoader)."""
EVAL_BATCH = 500  # points per forward when evaluating, as the pipeline's data.eval_batch_size


@dataclass
class Compressed:
    """What `compress_` returns. `model` is the compressed model (the one passed in, changed in
    place, except after structured pruning, which builds a smaller one). `group` holds its masks
    (a `MaskGroup`, or ATMC's group with the same interface; None for a structurally pruned
    model): fixed now, so `fit(model, data, group=group)` fine-tunes the kept weights and keeps
    the pruned ones at zero. `history` has the epoch rows of the method's own training (HYDRA's
    scores, GMP's schedule, ATMC's factors, lottery rounds), empty when it trained nothing."""

    model: nn.Module
    group: Optional[Any]
    history: list[dict] = field(default_factory=list)


def fit(model: nn.Module, data: Data, objective: Section | str | None = None, *, eps: float | None = None,
        norm: str = "linf", epochs: int = 1, batch_size: int = 128,
        optimizer: OptimizerConfig | dict | None = None, schedule: ScheduleConfig | dict | None = None,
        augment: AugMixConfig | NoiseConfig | None = None, crop_padding: int = 0, hflip: bool = False,
        grad_clip: float | None = None, group: Optional[MaskGroup] = None, validation: Data | None = None,
        eval_samples: int | None = 1000, eval_pgd_steps: int = 0, seed: int = 0,
        on_step: Callable[[int, int], None] | None = None, regularizer: Callable[[], torch.Tensor] | None = None,
        precision: str = "fp32", progress: bool = False) -> list[dict]:
    """Train `model` in place with a training objective; returns one row per epoch (loss,
    accuracy, learning rate, the per-epoch evaluation, seconds).

    `objective` is an objective config or its name (`NaturalConfig()` by default; `PGDATConfig`,
    `TradesConfig`, `IBPConfig`, `CrownIBPConfig`, `MixTrainConfig`, `GaussianConfig`); `eps` and
    `norm` are the threat of the objectives that attack or bound inputs, unless their config sets
    its own. `optimizer` and `schedule` default to SGD (lr 0.1, momentum 0.9, weight decay 5e-4)
    and a cosine schedule, per optimizer step. `augment` wraps the objective (AugMix, Gaussian
    noise); `crop_padding` and `hflip` are the random crop and flip of the pipeline's loader (a
    DataLoader augments by itself). With a mask `group` (from `compress_`), the pruned
    weights are zeroed after every optimizer step, so momentum and weight decay cannot revive
    them. Each epoch ends with clean accuracy (and PGD-`eval_pgd_steps` accuracy when > 0) on
    `validation` (row keys `val_accuracy`, `val_robust_accuracy`), by default on `eval_samples`
    training points (`train_sample_accuracy`, ...). `on_step(steps done, total
    steps)` runs after every optimizer step and `regularizer()` is added to the loss (a pruning
    schedule, ATMC's ADMM term). `precision` "bf16" or "fp16" runs the training steps under
    autocast (fp16 with a loss scaler); bounds and evaluation stay fp32. Runs are reproducible
    from `seed`. Each process trains on its own: data-parallel training is the pipeline's
    (`cardkit --nproc N run`, torchrun).
    """
    _check_model(model)
    if precision not in PRECISIONS:
        raise CardkitError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    objective, threat = _objective_and_threat(objective, eps, norm)
    stage = _config(TrainStageConfig, "fit", epochs=epochs, objective=objective, augment=augment,
                    optimizer=_section(optimizer, OptimizerConfig, "optimizer"),
                    schedule=_section(schedule, ScheduleConfig, "schedule"), grad_clip=grad_clip,
                    eval_samples=eval_samples, eval_pgd_steps=eval_pgd_steps)
    if eval_pgd_steps and threat.eps == 0:
        raise CardkitError(f"eval_pgd_steps={eval_pgd_steps} measures PGD accuracy each epoch but no eps is "
                           f"given; pass eps=, or eval_pgd_steps=0")
    device, memory_format = _device(model), _memory_format(model)
    loader = _training_batches(data, batch_size, device, memory_format, Augmentation(crop_padding, hflip))
    split = "val" if validation is not None else "train_sample"
    x_eval, y_eval = _evaluation_points(validation if validation is not None else data, eval_samples, seed)
    _check_forward(model, x_eval, y_eval, "validation" if validation is not None else "data")
    selection = [PGDAttackConfig(steps=eval_pgd_steps)] if eval_pgd_steps else []

    def evaluate_epoch(net: nn.Module) -> RobustnessResult:
        return evaluate_robustness(net, x_eval, y_eval, threat, selection, split=split, batch_size=EVAL_BATCH,
                                   seed=seed, checks=False)

    optim = build_optimizer(model.parameters(), stage.optimizer)
    if group is not None:
        group.enforce()
        optim.register_step_post_hook(lambda *_: group.enforce(refit=True))
    trainer = Trainer(model, with_augmentation(build_objective(objective, threat), augment), stage, loader, optim,
                      seed=seed, stage_id=0, evaluate=evaluate_epoch, save=lambda *_: None, progress=progress,
                      describe="fit", on_step=on_step, regularizer=regularizer, precision=precision)
    return trainer.fit(TrainState()).history


def compress_(model: nn.Module, method: Section, *, layers: LayerFilter | None = None,
              data: Data | None = None, rewind_state: dict[str, torch.Tensor] | None = None,
              **training) -> Compressed:
    """Compress `model` in place with a method config: `MagnitudeConfig`, `HydraConfig`,
    `EdgePopupConfig`, `BipropConfig`, `GMPConfig`, `LotteryConfig`, `SnipConfig` (each optionally
    with `quantize=QuantizeConfig(...)`), `AtmcConfig`, or a method a plugin registered.

    `layers(name, module) -> bool` picks the Conv2d / Linear layers to compress (default: all);
    the others stay dense float32. A method that trains (HYDRA, edge-popup and biprop scores,
    GMP's schedule, ATMC's factors, the lottery rounds) or scores weights on batches (SNIP) uses
    `data` with the keywords of `fit` in `training` (objective, eps, epochs, optimizer, ...),
    as the pipeline's prune stage does; without `data` it takes its
    starting point or the end of its schedule at once (HYDRA: the least-magnitude mask; GMP,
    lottery: the final sparsity in one shot; ATMC: its first projection, quantized). A method
    that rewinds to pretraining weights (lottery with `rewind: weights`) rewinds to
    `rewind_state`, the dense model's state dict after that epoch. Returns the compressed model
    with its masks fixed for fine-tuning (`Compressed`).
    """
    _check_model(model)
    accepted = set(inspect.signature(fit).parameters) - _OWN_TRAINING
    unknown = sorted(set(training) - accepted)
    if unknown:
        raise CardkitError(f"compress_ got unknown keyword {', '.join(map(repr, unknown))}; it takes layers, data, "
                           f"rewind_state and the keywords of cardkit.fit except {', '.join(sorted(_OWN_TRAINING))}")
    if data is None and training:
        raise CardkitError(f"compress_ got training keywords ({', '.join(sorted(training))}) but no data; pass "
                           f"data=(x, y) for the method to train on, or drop them")
    _check_layers(model, method, layers)
    epochs = sorted(getattr(method, "kept_pretrain_epochs", ()))
    if epochs and data is not None and rewind_state is None:
        raise CardkitError(f"{method.label} rewinds to the weights after pretraining epoch {epochs[0]}: pass "
                           f"rewind_state= (the dense model's state_dict then)")
    context = _prune_context(model, data, training) if data is not None else None
    with layer_selection(layers):
        setup = prune_model(model, method, context)
    stage = _PruneStage(setup, data, None if rewind_state is None else _rewind_state(model, rewind_state), training)
    stage.execute()
    compressed, group = setup.model, setup.group
    if setup.finish is not None:  # e.g. a structural rebuild from the trained scores: no masks
        compressed = setup.finish()
        group = group if compressed is setup.model else None
    if group is not None:
        _fix_masks(compressed, group)
    return Compressed(compressed, group, stage.history)


@dataclass
class _PruneStage:
    """The prune stage in memory, as the pipeline runs it in run folders: the method's scores,
    weights or factors train on the data, or the method runs its own parts (lottery rounds)
    through this object as a `cardkit.prune.PruneStage`; without data nothing trains."""

    setup: Any
    data: Optional[Data]
    rewind_state: Optional[dict]
    training: dict
    history: list[dict] = field(default_factory=list)

    def execute(self) -> None:
        setup = self.setup
        if setup.run_stage is not None:
            setup.run_stage(self)
        elif setup.trains and self.data is not None:
            self.history += fit(setup.model, self.data, on_step=setup.after_step, regularizer=setup.regularizer,
                                **self.training)
        elif setup.trains and setup.after_step is not None:
            setup.after_step(1, 1)  # the schedule's last step: GMP's final sparsity, ATMC's quantization

    def pretrain_state(self, epoch: int) -> Optional[dict[str, torch.Tensor]]:
        return self.rewind_state

    def train(self, part: str, start: str, offset: int) -> None:
        # The model is in memory in the state the `start` part left it.
        if self.data is not None:
            seed = self.training.get("seed", 0) + offset
            self.history += fit(self.setup.model, self.data, group=self.setup.group,
                                **{**self.training, "seed": seed})

    def save(self, part: str, make_model: Callable[[], nn.Module], trained: bool) -> None:
        make_model()


def _prune_context(model: nn.Module, data: Data, training: dict) -> PruneContext:
    """What a method's start may use: the training batches and objective `fit` would use, epoch
    after epoch."""
    objective, threat = _objective_and_threat(training.get("objective"), training.get("eps"),
                                              training.get("norm", "linf"))
    seed = training.get("seed", 0)

    def batches() -> Iterator:  # the loader is built at the first batch a method asks for
        loader = _training_batches(data, training.get("batch_size", 128), _device(model), _memory_format(model),
                                   Augmentation(training.get("crop_padding", 0), training.get("hflip", False)))
        for epoch in itertools.count():
            yield from loader.epoch(derive_seed(seed, epoch))

    return PruneContext(model=model, batches=batches(),
                        objective=with_augmentation(build_objective(objective, threat), training.get("augment")),
                        threat=threat, seed=seed)


_OWN_TRAINING = {"data", "group", "on_step", "regularizer", "model"}  # compress_ sets these itself


def evaluate(model: nn.Module, data: Data, *, eps: float, norm: str = "linf",
             attacks: Sequence[Section] | None = None, batch_size: int = EVAL_BATCH, seed: int = 0,
             checks: bool = True) -> RobustnessResult:
    """Clean accuracy, then each attack in order on the points every earlier one failed on
    (default: PGD-50 then AutoAttack standard), in the `norm` ball of radius `eps`. `checks`
    runs the sanity checks for gradient masking (logged as warnings, returned as flags)."""
    _check_model(model)
    x, y = _points(data, "data")
    _check_forward(model, x, y, "data")
    attacks = [PGDAttackConfig(), AutoAttackConfig()] if attacks is None else list(attacks)
    return evaluate_robustness(model, x, y, _threat_of(eps, norm), attacks, batch_size=batch_size, seed=seed,
                               checks=checks)


def certified_accuracy(model: nn.Module, data: Data, *, method: str = "ibp", eps: float | None = None,
                       sigma: float | None = None, n0: int = 100, n: int = 10000, alpha: float = 0.001,
                       radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), batch_size: int = EVAL_BATCH,
                       seed: int = 0) -> VerificationResult | SmoothingResult:
    """Certified accuracy. `method` "ibp", "crown_ibp" or "crown": the fraction of points whose
    every margin is proven positive over the Linf ball of radius `eps` (a `VerificationResult`);
    IBP bounds any model torch.fx can trace, CROWN sequential ones (any model whose traced graph
    is one chain of layers). `method="smoothing"`: certified L2 accuracy at `radii` of the model
    smoothed with Gaussian noise `sigma` (Cohen et al.; n0 selection and n estimation samples,
    failure probability alpha; a `SmoothingResult`), seeded by `seed`."""
    _check_model(model)
    x, y = _points(data, "data")
    classes = _check_forward(model, x, y, "data")
    device = _device(model)
    if method == "smoothing":
        if sigma is None:
            raise CardkitError("certified_accuracy(method='smoothing') needs sigma=, the noise level (e.g. 0.25)")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return smoothed_accuracy(model, _batches(x, y, batch_size, device), sigma=sigma, n0=n0, n=n,
                                     alpha=alpha, radii=radii, classes=classes)
    if eps is None or not eps >= 0:
        raise CardkitError(f"certified_accuracy(method={method!r}) needs eps= >= 0, the Linf radius to verify; got {eps!r}")
    return verified_accuracy(model, _batches(x, y, batch_size, device), eps, method)


def corruption_accuracy(model: nn.Module, data: Data, *, corruptions: Sequence[str] = ("benchmark",),
                        severities: Sequence[int] = SEVERITIES, seed: int = 0, batch_size: int = EVAL_BATCH,
                        baseline: CorruptionResult | None = None, suite: str | Path | None = None) -> CorruptionResult:
    """Accuracy under common corruptions (CIFAR-10-C's, generated from `data` with `seed`, or read
    from the official `.npy` files in the folder `suite`) per corruption and severity, and their
    mean; with a `baseline` result, CE, mCE and relative mCE. `corruptions` names them, or
    "benchmark" (the 15), "extras" (the 4), "all"; `data` is the clean split. The corruptions work
    on 8-bit images: float inputs are rounded to multiples of 1/255 first."""
    _check_model(model)
    x, y = _points(data, "data")
    _check_forward(model, x, y, "data")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise CardkitError(f"corruptions apply to images N x C x H x W with 1 or 3 channels; got {tuple(x.shape)}")
    images = x if x.dtype == torch.uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)
    clean = ArrayDataset(images.cpu().contiguous(), y.cpu())
    if suite is not None:
        corrupted, source = CorruptedSuite(suite), str(suite)
    else:
        corrupted, source = GeneratedSuite(clean, seed), f"generated from {len(y)} images (seed {seed})"
    was_training = model.training
    model.eval()
    try:
        return evaluate_corruptions(
            {"model": model}, corrupted, source=source,
            names=expand_names(list(corruptions)), severities=list(severities), clean=clean,
            batch_size=batch_size, device=_device(model), memory_format=_memory_format(model),
            baselines={"model": baseline} if baseline is not None else None)["model"]
    finally:
        model.train(was_training)


def size(model: nn.Module) -> SizeReport:
    """The accounted compressed size, tensor by tensor (kept values x bits, their positions,
    scales or codebooks, every other tensor as float32) and the ratio to the dense fp32 model:
    the bytes `export` writes, within a few kilobytes of headers and padding."""
    _check_model(model)
    return model_size(model)


def export(model: nn.Module, path: str | Path) -> int:
    """Write the compressed `.card` file (safetensors with a JSON header, never a pickle);
    returns its bytes. A registry model loads back from the file alone; any other model loads
    into a fresh instance: `load_artifact(path, model=MyNet())`."""
    _check_model(model)
    return save_artifact(model, path)


# ---------------------------------------------------------------------------------------------
# Compression steps


def _check_layers(model: nn.Module, method: Section, layers: LayerFilter | None) -> None:
    structured = getattr(method, "scope", None) == "structured"
    if layers is not None and not callable(layers):
        raise CardkitError(f"layers={layers!r} is not a filter; give a function (name, module) -> bool, e.g. "
                           f"lambda name, m: name != 'fc'")
    if structured and (layers is not None or not isinstance(getattr(model, "arch", None), dict)):
        raise CardkitError("scope 'structured' rebuilds registry models (create_model) and picks its layers itself; "
                           "use scope 'layer' or 'global' for this model or layer filter")
    if not structured and not any(True for _ in prunable_layers(model, layers)):
        found = [name for name, _ in prunable_layers(model)]
        has = f"its Conv2d / Linear layers are {', '.join(found[:5])}" if found else "it has no Conv2d or Linear layer"
        raise CardkitError(f"{getattr(method, 'name', type(method).__name__)}: no layer of {type(model).__name__} "
                           f"to compress ({has}); change the layers= filter or the model")


def _rewind_state(model: nn.Module, state) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or not isinstance(v, torch.Tensor)
             or v.shape != own[k].shape] if isinstance(state, dict) else ["not a dict"]
    if wrong:
        raise CardkitError(f"rewind_state does not fit {type(model).__name__} ({', '.join(map(str, wrong[:3]))}); "
                           f"give a state dict of this model from before compression")
    return state


def _fix_masks(model: nn.Module, group) -> None:
    """Masks as they stand, fixed; the weights (not the scores) train from now on and the pruned
    ones are zero: the state a pruned checkpoint is fine-tuned from (see restore_masks)."""
    group.refresh()
    for p in model.parameters():
        p.requires_grad_(True)
    group.restored()
    group.enforce()


# ---------------------------------------------------------------------------------------------
# Arguments


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise CardkitError(f"expected an nn.Module as the model, got {type(model).__name__}")


def _objective_and_threat(objective: Section | str | None, eps: float | None, norm: str) -> tuple[Section, Threat]:
    """The objective config (by default natural training) and the threat it attacks or bounds."""
    if objective is None:
        objective = NaturalConfig()
    elif isinstance(objective, str):
        objective = OBJECTIVES.config(objective)
    else:
        OBJECTIVES.handler(objective)  # an unregistered config type fails here, in one line
    if eps is None and "eps" in type(objective).model_fields and objective.eps is None:
        raise CardkitError(f"the {objective.name} objective needs eps: pass eps= (e.g. eps=0.1) or set it on "
                           f"the config ({type(objective).__name__}(eps=...))")
    return objective, _threat_of(0.0 if eps is None else eps, norm)


def _threat_of(eps: float, norm: str) -> Threat:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise CardkitError(f"eps={eps!r} is not a number; give the radius in input units ([0, 1]), e.g. 8/255")
    try:
        return Threat(norm, float(eps))
    except ValueError as err:
        raise CardkitError(f"{err}; e.g. norm='linf', eps=0.1") from None


def _section(value, cls: type[Section], what: str) -> Section:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return _config(cls, what, **value)
    raise CardkitError(f"{what}={value!r} is invalid; give a {cls.__name__} or a dict of its fields")


def _config(cls: type[Section], what: str, **fields) -> Section:
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CardkitError(f"{what}: {where}={first.get('input')!r} is invalid ({first['msg']})") from None


# ---------------------------------------------------------------------------------------------
# Data


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last batches for a model whose convolutions are channels_last (no copy per step)."""
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pair(batch, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, ArrayDataset):
        return batch.images, batch.labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    raise CardkitError(f"{what} must be (x, y) tensors, an ArrayDataset or batches of (x, y) (a DataLoader); "
                       f"got {type(batch).__name__}")


def _is_stream(data) -> bool:
    return not isinstance(data, (ArrayDataset, tuple, list, torch.Tensor)) and isinstance(data, Iterable)


def _points(data: Data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `data` as checked (x, y) tensors; batches are concatenated on the CPU."""
    if _is_stream(data):
        batches = [_pair(batch, what) for batch in data]
        if not batches:
            raise CardkitError(f"{what} holds no batches")
        x, y = torch.cat([b[0].cpu() for b in batches]), torch.cat([b[1].cpu() for b in batches])
    else:
        x, y = _pair(data, what)
    return _checked(x, y, what)


def _checked(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2 or len(x) == 0:
        raise CardkitError(f"{what}: x has shape {tuple(x.shape)}; give a batch of inputs N x ... (N >= 1), "
                           f"e.g. N x C x H x W images")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise CardkitError(f"{what}: y is {y.dtype} of shape {tuple(y.shape)} for {len(x)} inputs; give one integer "
                           f"class label per input")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise CardkitError(f"{what}: x is {x.dtype}; give float images in [0, 1] or uint8 in 0-255")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise CardkitError(f"{what}: x has values in [{low:.3g}, {high:.3g}]; inputs are images in [0, 1] "
                               f"(normalization belongs inside the model)")
    return x, y.long()


def _check_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, what: str) -> int:
    """One forward pass on two points: the model must take this data and return N x classes
    scores covering the labels. Returns the number of classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(_as_float(x[:2].to(_device(model))))
    except RuntimeError as err:
        raise CardkitError(f"{type(model).__name__} cannot take {what} of shape {tuple(x.shape[1:])} per input "
                           f"({str(err).splitlines()[0]}); give inputs shaped as the model expects") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != min(2, len(x)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CardkitError(f"{type(model).__name__} returns {shape} for 2 inputs; it must return one row of class "
                           f"scores (logits) per input")
    if int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        raise CardkitError(f"{what}: labels run from {int(y.min())} to {int(y.max())} but {type(model).__name__} "
                           f"scores {out.shape[1]} classes (0..{out.shape[1] - 1})")
    return out.shape[1]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> Iterator:
    for start in range(0, len(y), batch_size):
        yield _as_float(x[start:start + batch_size].to(device)), y[start:start + batch_size].to(device)


def _evaluation_points(data: Data, samples: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of `samples` points (all when None), as the pipeline's per-epoch evaluation;
    of a stream of batches, its first `samples` points."""
    if _is_stream(data):
        taken, count = [], 0
        for batch in data:
            taken.append(_pair(batch, "data"))
            count += len(taken[-1][1])
            if samples is not None and count >= samples:
                break
        return _points(taken, "data") if len(taken) > 1 else _checked(*taken[0], "data")
    x, y = _points(data, "data")
    if samples is None or samples >= len(y):
        return x, y
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
    return x[index.to(x.device)], y[index.to(y.device)]


def _training_batches(data: Data, batch_size: int, device: torch.device, memory_format: torch.memory_format,
                      augmentation: Augmentation = Augmentation()):
    """The trainer's loader: seeded, shuffled (and cropped or flipped) batches on the model's
    device (uint8 images through the pipeline's own BatchLoader), or the user's DataLoader as it is."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CardkitError(f"batch_size={batch_size!r} is not valid; give an integer >= 1")
    if _is_stream(data):
        if augmentation.active:
            raise CardkitError("crop_padding and hflip augment (x, y) tensors; a DataLoader augments by itself "
                               "(its dataset's transform): drop them, or give the tensors")
        return _StreamBatches(data, device, memory_format)
    x, y = _points(data, "data")
    drop_last = len(y) > batch_size
    if augmentation.active and x.dim() != 4:
        raise CardkitError(f"crop_padding and hflip apply to images N x C x H x W; the inputs are {tuple(x.shape)}")
    if x.dtype == torch.uint8 and x.dim() == 4:
        return BatchLoader(ArrayDataset(x, y), batch_size, shuffle=True, augmentation=augmentation, device=device,
                           drop_last=drop_last, memory_format=memory_format)
    return _TensorBatches(x, y, batch_size, device, memory_format, drop_last, augmentation)


class _TensorBatches:
    """Float inputs in memory: an epoch's order and augmentation depend only on its seed, as in
    BatchLoader."""

    def __init__(self, x, y, batch_size, device, memory_format, drop_last, augmentation: Augmentation):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.memory_format, self.drop_last = batch_size, memory_format, drop_last
        self.augmentation = augmentation

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, seed: int | None = None, start_batch: int = 0) -> Iterator:
        seed = int(torch.randint(0, 2**62, (1,))) if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.y), generator=generator).to(self.y.device)
        batch_seeds = torch.randint(0, 2**62, (len(self),), generator=generator).tolist()
        for k in range(start_batch, len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            x = self.augmentation(self.x[index].float(), torch.Generator().manual_seed(batch_seeds[k]))
            yield x.contiguous(memory_format=self._format()), self.y[index]

    def _format(self) -> torch.memory_format:
        return self.memory_format if self.x.dim() == 4 else torch.contiguous_format


class _StreamBatches:
    """The user's iterable of (x, y) batches (a DataLoader shuffles and augments by itself; its
    random draws follow the trainer's per-epoch seed of torch's generator)."""

    def __init__(self, batches: Iterable, device: torch.device, memory_format: torch.memory_format):
        try:
            self.length = len(batches)
        except TypeError:
            raise CardkitError(f"training data of type {type(batches).__name__} has no len(); give a DataLoader "
                               f"or (x, y) tensors") from None
        self.batches, self.device, self.memory_format = batches, device, memory_format

    def __len__(self) -> int:
        return self.length

    def epoch(self, seed: int | None = None, start_batch: int = 0) -> Iterator:
        for k, batch in enumerate(self.batches):
            if k >= start_batch:
                x, y = _checked(*_pair(batch, "data"), "data")
                x = _as_float(x.to(self.device))
                yield x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x, y.to(self.device)
