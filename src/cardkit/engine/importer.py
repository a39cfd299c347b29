"""Published PyTorch state dicts as cardkit run folders (`cardkit import`).

A file written by `torch.save` (`.pt`, `.pth`, `.pth.tar`) is read with `torch.load(weights_only=True)`:
tensors and plain containers only, never unpickled code. Its state dict (found under `state_dict`,
`model_state_dict`, `model` or `net`, with `module.` / `model.` / `_orig_mod.` prefixes stripped) is
mapped onto a registry model and written as a run folder that every command accepts:

- a dense file becomes the run's pretrain checkpoint (`NAME/pretrain/checkpoints`, pointers last and
  best), a finished stage, so that `cardkit prune --checkpoint runs/NAME` prunes it;
- a HYDRA file (each Conv2d / Linear holds `weight` and `popup_scores`, and HYDRA's `k` is the
  fraction kept) with its sparsity S = 1 - k becomes the variant `NAME/hydra-S`, stored as that
  variant's finished prune stage. In every layer its mask keeps the weights HYDRA's forward keeps:
  of n weights, the top n - int((1 - k) n) by |popup_scores|. The file's unmasked weights are not
  written as a dense model: after HYDRA's fine-tuning they are neither the pre-trained model nor a
  trained dense one (the kept weights trained under the mask, the pruned ones did not). The
  variant's parent is the run's pretrain checkpoint when the run already holds one (import HYDRA's
  pre-trained checkpoint under the same name first), else none.

Key names follow a layout, found from the keys unless named:

    cardkit        cardkit's own module names
    wrn            RobustBench / TRADES / HYDRA WideResNet: block1.layer.0.bn1, convShortcut, bn1, fc
                   (HYDRA's and some RobustBench files' sub_block1 is never run by the forward: dropped)
    preact_resnet  RobustBench PreActResNet-18 of Rice et al. 2020: layer1.0.shortcut.0, bn, linear
    resnet         ResNet-18 of kuangliu/pytorch-cifar, RobustBench and HYDRA: linear
    sequential     a numbered nn.Sequential (HYDRA's MNIST CNNs): 0, 2, 5, 7 onto the model's layers

Input normalization: every cardkit model normalizes inside (`model.normalize`). By default it takes
the file's own `mu` / `sigma` (or `mean` / `std`) buffers, else none: inputs in [0, 1] as
RobustBench models take them. `normalize="dataset"` uses the dataset's statistics, `"none"` the
identity, and explicit `mean` / `std` any values.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from cardkit.attacks import Threat
from cardkit.config import RunConfig, load_config
from cardkit.data import DatasetSplits
from cardkit.engine.checkpoint import archive_as_saved, has_checkpoint, load_checkpoint, save_checkpoint
from cardkit.engine.pipeline import (_check_same_run, _check_variant, _checkpoint_meta, _subset, _write_config,
                                     load_data, model_from_checkpoint, prepare_process)
from cardkit.engine.rundir import check_run_folder, claim_run_folder, run_lock
from cardkit.errors import CardkitError
from cardkit.eval import evaluate_robustness
from cardkit.fileio import file_digest
from cardkit.models import create_model
from cardkit.objectives.augment import stage_domain
from cardkit.prune import HydraConfig, prunable_layers, prune_model
from cardkit.prune.masked import top_k_mask
from cardkit.train import TrainState, build_optimizer

log = logging.getLogger(__name__)

CONTAINERS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel, wrapper modules, torch.compile
NORMALIZATION_KEYS = (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std"))
SCORES = "popup_scores"
NORMALIZE = ("auto", "dataset", "none")
# (pattern, replacement) applied in order to every key; None drops the entry.
_RULES: dict[str, tuple[tuple[str, Optional[str]], ...]] = {
    "cardkit": (),
    "wrn": ((r"^sub_block1\.", None),
            (r"^block(\d+)\.layer\.(\d+)\.convShortcut\.", r"layer\1.\2.shortcut."),
            (r"^block(\d+)\.layer\.", r"layer\1."),
            (r"^bn1\.", "bn_out.")),
    "preact_resnet": ((r"^(layer\d+\.\d+\.shortcut)\.0\.", r"\1."), (r"^bn\.", "bn_out."), (r"^linear\.", "fc.")),
    "resnet": ((r"^linear\.", "fc."),),
}
LAYOUTS = (*_RULES, "sequential")
_SHOWN = 3  # keys named in a mismatch message, of each kind


@dataclass(frozen=True)
class ImportResult:
    run_dir: Path
    checkpoint: Path  # the checkpoint folder written
    variant: str  # "dense" or the HYDRA variant's label, e.g. hydra-0.99
    layout: str
    normalization: str  # where mean / std came from: checkpoint, dataset, given or none
    clean_accuracy: Optional[float]  # on `samples` test images, None when not checked
    samples: int


@dataclass
class _Mapped:
    """A file's entries under one layout: cardkit names, HYDRA scores and what does not fit."""

    layout: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> popup_scores
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model's names
    unexpected: list[str] = field(default_factory=list)  # the file's names


def import_checkpoint(path: str | Path, *, model: str, dataset: str, name: str | None = None,
                      output_dir: str | Path = "runs", overrides: Sequence[str] = (), layout: str = "auto",
                      sparsity: float | None = None, normalize: str = "auto",
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      check_samples: int = 500) -> ImportResult:
    """Write the state dict in `path` as a run folder `output_dir/name` for the registry `model` on
    `dataset` (`overrides`: `key=value` config settings of the run, as `--set` takes them). A HYDRA
    file needs `sparsity`, the fraction HYDRA removed (1 - its k); 0 imports it dense. Afterwards
    the written model's clean accuracy is measured on `check_samples` test images (0: skipped)."""
    if isinstance(check_samples, bool) or not isinstance(check_samples, int) or check_samples < 0:
        raise CardkitError(f"--check-samples given {check_samples!r}; give a number of test images >= 0 (0: skip)")
    path = Path(path)
    state = read_state_dict(path)
    config = load_config(None, [f"name={json.dumps(name or run_name(path))}",
                                f"output_dir={json.dumps(str(output_dir))}", f"data.name={json.dumps(dataset)}",
                                f"model.name={json.dumps(model)}", *overrides])
    splits = load_data(config)
    info = splits.info
    own = pop_normalization(state)
    (mean, std), source = _normalization(normalize, mean, std, own, (list(info.mean), list(info.std)))
    net = create_model(config.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                       input_size=info.input_size, mean=mean, std=std, **config.model.kwargs)
    mapped = map_state(state, net, layout, path)
    load_weights(net, mapped)
    method = _hydra_method(sparsity, mapped, net, path)
    record = {"file": str(path.resolve()), "sha256": file_digest(path, "sha256"), "layout": mapped.layout,
              "normalization": source}
    if method is None:
        checkpoint = _write_dense(config, net, record)
    else:
        checkpoint = _write_hydra(config, net, method, mapped.scores, record)
    accuracy, samples = _clean_accuracy(checkpoint, config, splits, check_samples) if check_samples else (None, 0)
    return ImportResult(config.run_dir, checkpoint, method.label if method else "dense", mapped.layout, source,
                        accuracy, samples)


def run_name(path: Path) -> str:
    """The file's name without its extensions: model_best.pth.tar -> model_best."""
    name = path.name
    for suffix in (".tar", ".pth", ".pt", ".ckpt"):
        name = name.removesuffix(suffix)
    return name or path.name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a torch.save file holds, from inside its container, without prefixes."""
    found = _load_file(path)
    while isinstance(found, dict) and not _all_tensors(found):
        key = next((k for k in CONTAINERS if isinstance(found.get(k), dict)), None)
        if key is None:
            break
        found = found[key]
    if not isinstance(found, dict) or not found or not _all_tensors(found):
        raise CardkitError(f"'{path}' holds no state dict: {_describe_content(found)}; expected a mapping of "
                           f"parameter names to tensors, alone or under one of {', '.join(CONTAINERS)}")
    return {_strip_prefixes(key): tensor for key, tensor in found.items()}


def _load_file(path: Path):
    if not path.is_file():
        raise CardkitError(f"checkpoint file '{path}' does not exist; give a file written by torch.save "
                           f"(.pt, .pth, .pth.tar)")
    if zipfile.is_zipfile(path):  # else the legacy format (PyTorch before 1.6), read by torch as it is
        try:
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise CardkitError(f"'{path}' is a damaged zip archive ({err}); download it again") from None
        if not archive_as_saved(entries, path.stat().st_size):
            raise CardkitError(f"'{path}' holds compressed or oversized entries, which torch.save never "
                               f"writes; the file is corrupt or was edited")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # an object of a class: only unpickling builds it
        if found:
            raise CardkitError(f"'{path}' holds a {found.group(1)} besides tensors, which only unpickling (running "
                               f"code the file names) could load, and cardkit reads files with torch.load("
                               f"weights_only=True) only; if you trust the file, save its state dict alone: torch."
                               f"save(torch.load(FILE, weights_only=False)['state_dict'], 'plain.pt')") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise _unreadable(path, reason.group(1) if reason else str(err)) from None
    except Exception as err:  # torch raises many types for files it cannot parse
        raise _unreadable(path, f"{type(err).__name__}: {str(err)}") from None


def _unreadable(path: Path, reason: str) -> CardkitError:
    reason = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
    return CardkitError(f"'{path}' cannot be read as a torch.save file ({reason[:120]}); give a .pt / .pth / "
                        f".pth.tar file written by torch.save")


def _all_tensors(mapping: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _describe_content(found) -> str:
    if not isinstance(found, dict):
        return f"it holds a {type(found).__name__}"
    if not found:
        return "it is empty"
    odd = [k for k, v in found.items() if not isinstance(v, torch.Tensor)]
    shown = ", ".join(f"{k!r} ({type(found[k]).__name__})" for k in odd[:_SHOWN])
    return f"{len(odd)} of its {len(found)} entries are not tensors ({shown}{', ...' if len(odd) > _SHOWN else ''})"


def _strip_prefixes(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def pop_normalization(state: dict[str, torch.Tensor]) -> tuple[list[float], list[float]] | None:
    """Remove and return the file's own input mean / std (RobustBench's `mu` / `sigma` buffers)."""
    for mean_key, std_key in NORMALIZATION_KEYS:
        if mean_key in state and std_key in state:
            return state.pop(mean_key).flatten().tolist(), state.pop(std_key).flatten().tolist()
    return None


def _normalization(normalize: str, mean, std, own, data) -> tuple[tuple, str]:
    """(mean, std) for the model's first layer and where they come from; None is the identity."""
    if (mean is None) != (std is None):
        raise CardkitError("give both --mean and --std (one number per input channel each), or neither")
    if normalize not in NORMALIZE:
        raise CardkitError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZE)}; auto takes the file's "
                           f"own mean / std if it has them, else none")
    if mean is not None and normalize != "auto":
        raise CardkitError(f"--mean / --std and --normalize {normalize} both set the input normalization; give one")
    if mean is not None:
        chosen, source = ([float(m) for m in mean], [float(s) for s in std]), "given"
    elif normalize == "dataset":
        chosen, source = data, "dataset"
    elif normalize == "auto" and own is not None:
        chosen, source = own, "checkpoint"
    else:
        chosen, source = (None, None), "none"
    if own is not None and chosen != own:
        log.warning("the file's own input normalization (mean %s, std %s) is replaced by %s", own[0], own[1],
                    "the identity" if chosen[0] is None else f"mean {chosen[0]}, std {chosen[1]}")
    return chosen, source


def map_state(state: dict[str, torch.Tensor], model: nn.Module, layout: str, path: Path) -> _Mapped:
    """The file's entries under cardkit's names: under `layout`, or under the first layout that
    fits the model's keys exactly. A misfit names the missing and unexpected keys in one line."""
    if layout != "auto" and layout not in LAYOUTS:
        raise CardkitError(f"unknown layout {layout!r}; valid: auto, {', '.join(LAYOUTS)}")
    target = [k for k in model.state_dict() if not k.startswith("normalize.")]
    layers = {name for name, _ in prunable_layers(model)}
    fits = [_apply_layout(state, name, target, layers) for name in (LAYOUTS if layout == "auto" else (layout,))]
    best = min(fits, key=lambda f: len(f.missing) + len(f.unexpected))  # the first of equals
    if best.missing or best.unexpected:
        raise CardkitError(_misfit(path, model, best, layout == "auto"))
    _check_shapes(path, model, best)
    if best.dropped:
        log.info("dropped %d entries the forward never uses (%s, ...)", len(best.dropped), best.dropped[0])
    return best


def _apply_layout(state: dict, layout: str, target: list[str], layers: set[str]) -> _Mapped:
    names = _sequential_names(list(state), target) if layout == "sequential" else \
        {key: _rename(key, _RULES[layout]) for key in state}
    wanted = set(target)
    mapped = _Mapped(layout)
    for key, new in names.items():
        layer = new.removesuffix(f".{SCORES}") if new is not None else None
        if new is None:
            mapped.dropped.append(key)
        elif layer != new and layer in layers and layer not in mapped.scores:
            mapped.scores[layer] = state[key]
        elif new in wanted and new not in mapped.weights:
            mapped.weights[new] = state[key]
        else:
            mapped.unexpected.append(key)
    # Old files lack BatchNorm's step counter, which no eval-mode forward reads: filled with 0.
    mapped.missing = [k for k in target if k not in mapped.weights and not k.endswith(".num_batches_tracked")]
    return mapped


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            if replacement is None:
                return None
            key = re.sub(pattern, replacement, key)
    return key


def _sequential_names(keys: list[str], target: list[str]) -> dict[str, str]:
    """Numbered modules (0.weight, 2.weight, 5.weight, ...) onto the model's modules that hold
    state, in order; any other key keeps its name."""
    module = lambda key: key.rsplit(".", 1)[0]  # noqa: E731
    numbered = sorted({module(k) for k in keys if module(k).isdigit()}, key=int)
    onto = dict(zip(numbered, dict.fromkeys(module(k) for k in target)))
    return {k: f"{onto[module(k)]}.{k.rsplit('.', 1)[1]}" if module(k) in onto else k for k in keys}


def _misfit(path: Path, model: nn.Module, mapped: _Mapped, searched: bool) -> str:
    how = (f"under the closest of the layouts {', '.join(LAYOUTS)} ({mapped.layout})" if searched
           else f"under the {mapped.layout} layout")
    return (f"'{path}' does not fit {_describe_model(model)} {how}: {_listed(mapped.missing)} of the model's "
            f"keys missing from the file, {_listed(mapped.unexpected)} of the file's keys unknown to the model; "
            f"check --model and model.kwargs (--set model.kwargs={{width: 16}}), or name the layout with --layout")


def _listed(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)} ({', '.join(keys[:_SHOWN])}{more})"


def _describe_model(model: nn.Module) -> str:
    arch = model.arch
    options = ", ".join(f"{k}={v}" for k, v in arch["kwargs"].items())
    return (f"{arch['name']}({options}) for {arch['in_channels']}x{arch['input_size']}x{arch['input_size']} "
            f"inputs and {arch['num_classes']} classes")


def _check_shapes(path: Path, model: nn.Module, mapped: _Mapped) -> None:
    expected = model.state_dict()
    found = {**mapped.weights, **{f"{layer}.{SCORES}": t for layer, t in mapped.scores.items()}}
    wanted = lambda key: expected[key.replace(f".{SCORES}", ".weight")]  # noqa: E731
    wrong = [k for k, t in found.items() if tuple(t.shape) != tuple(wanted(k).shape)]
    if wrong:
        first = wrong[0]
        raise CardkitError(f"'{path}': {len(wrong)} of its tensors have other shapes than in "
                           f"{_describe_model(model)}, e.g. {first} is {tuple(found[first].shape)} in the file, "
                           f"{tuple(wanted(first).shape)} in the model; check --model, model.kwargs (--set "
                           f"model.kwargs={{width: 16}}) and that --data has the file's classes and channels")


def load_weights(model: nn.Module, mapped: _Mapped) -> None:
    """Load the mapped tensors (in the model's dtypes); normalization stays as the model was built."""
    state = model.state_dict()
    full = {k: mapped.weights[k].to(v.dtype) if k in mapped.weights else v for k, v in state.items()}
    for key in state:
        if key.endswith(".num_batches_tracked") and key not in mapped.weights:
            full[key] = torch.zeros_like(state[key])
    model.load_state_dict(full)


def _hydra_method(sparsity: float | None, mapped: _Mapped, model: nn.Module, path: Path) -> HydraConfig | None:
    """The HYDRA variant a file with popup_scores becomes, or None for a dense import."""
    layers = [name for name, _ in prunable_layers(model)]
    if not mapped.scores:
        if sparsity is not None:
            raise CardkitError(f"--sparsity applies to HYDRA checkpoints, whose layers hold {SCORES}; '{path}' "
                               f"holds none: import it without --sparsity, then prune it with `cardkit prune`")
        return None
    lacking = [name for name in layers if name not in mapped.scores]
    if lacking:
        raise CardkitError(f"'{path}' holds {SCORES} for {len(mapped.scores)} of the model's {len(layers)} "
                           f"Conv2d / Linear layers, none for {_listed(lacking)}; a HYDRA model has them in "
                           f"every layer")
    if sparsity is None:
        raise CardkitError(f"'{path}' is a HYDRA checkpoint (its layers hold {SCORES}): give --sparsity S, the "
                           f"fraction of weights HYDRA removed, 1 - its k (k 0.01 is --sparsity 0.99), or "
                           f"--sparsity 0 for a model pre-trained with k 1")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise CardkitError(f"--sparsity given {sparsity!r}: the fraction of weights removed must be in [0, 1) "
                           f"(HYDRA's k is 1 - sparsity)")
    if sparsity == 0:
        log.info("k = 1 keeps every weight: the %s are dropped and the model imported dense", SCORES)
        return None
    return HydraConfig(sparsity=sparsity)


def hydra_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """HYDRA's mask of one layer: with k = 1 - sparsity the fraction kept, the int((1 - k) n)
    weights of least |popup_scores| removed, as HYDRA's forward counts them."""
    k = 1 - sparsity
    return top_k_mask(scores.abs(), scores.numel() - int((1 - k) * scores.numel()))


def _write_dense(config: RunConfig, model: nn.Module, record: dict) -> Path:
    optimizer = build_optimizer(model.parameters(), config.pretrain.optimizer)
    return _write(config, config.run_dir, "pretrain", model, optimizer.state_dict(), {"imported": record})


def _write_hydra(config: RunConfig, model: nn.Module, method: HydraConfig, scores: dict[str, torch.Tensor],
                 record: dict) -> Path:
    """The variant's prune stage as cardkit's HYDRA leaves it: the file's weights (unmasked), its
    popup_scores as the scores and HYDRA's masks."""
    prune_model(model, method)
    optimizer = build_optimizer(model.parameters(), config.prune.optimizer)  # what resuming the stage loads
    with torch.no_grad():
        for name, layer in prunable_layers(model):
            layer.scores.copy_(scores[name])
            layer.mask.copy_(hydra_mask(scores[name], method.sparsity))
    meta = {"pruning": method.model_dump(mode="json"), "parent": _parent(config),
            "imported": {**record, "hydra_k": 1 - method.sparsity}}
    return _write(config, config.run_dir / method.label, "prune", model, optimizer.state_dict(), meta, method)


def _parent(config: RunConfig) -> str | None:
    """The run's pretrain checkpoint that its variants start from, if it has one."""
    folder, pointer = config.run_dir / "pretrain" / "checkpoints", config.prune.start_from or config.evaluate.checkpoint
    if not has_checkpoint(folder, pointer):
        return None
    return str(load_checkpoint(folder, pointer).path.relative_to(config.run_dir))


def _write(config: RunConfig, folder: Path, stage: str, model: nn.Module, optimizer_state: dict, meta: dict,
           method: HydraConfig | None = None) -> Path:
    """One checkpoint of a finished `stage` in `folder` (the run's or a variant's), refused if the
    stage has one already. Its epoch count is the config's, so that resuming the run skips it."""
    run_dir, checkpoints = config.run_dir, folder / stage / "checkpoints"
    check_run_folder(run_dir)
    _check_same_run(run_dir, config)
    if has_checkpoint(checkpoints):
        raise CardkitError(f"'{folder}' holds a {stage} checkpoint already; import under another --name, or "
                           f"delete '{checkpoints}' to replace it")
    with run_lock(run_dir):
        claim_run_folder(run_dir)
        _write_config(run_dir, config)
        if method is not None:
            _check_variant(folder, config, method)
        stage_config = getattr(config, stage)
        state = TrainState(epoch=stage_config.epochs)
        return save_checkpoint(checkpoints, model_state=model.state_dict(),
                               meta=_checkpoint_meta(stage, state, model, config, None,
                                                     {**meta, "domain": stage_domain(stage_config)}),
                               optimizer_state=optimizer_state, pointers=("last", "best"))


def _clean_accuracy(checkpoint: Path, config: RunConfig, splits: DatasetSplits, samples: int) -> tuple[float, int]:
    """Clean accuracy of the model as the folder now holds it, on a seeded subset of the test split."""
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(prepare_process(config))
    data = _subset(splits.test, samples, config.seed)
    result = evaluate_robustness(model, data.images, data.labels, Threat(config.threat.norm, config.threat.eps),
                                 (), split="test", batch_size=config.data.eval_batch_size, seed=config.seed,
                                 checks=False)
    chance = 1 / splits.info.num_classes
    if result.clean_accuracy < 1.5 * chance:
        log.warning("clean accuracy %.4f on %d test images is near chance (%.2f): check the input normalization "
                    "(--normalize, --mean / --std), --data and --layout", result.clean_accuracy, len(data), chance)
    return result.clean_accuracy, len(data)
