"""The stage pipeline: pretrain -> evaluate, each stage resumable from its own checkpoints.

Layout of a run folder (`output_dir/name/`):
    config.yaml                     the resolved config
    <stage>/checkpoints/            last.json, best.json and checkpoint folders
    <stage>/metrics.jsonl           one row per epoch
    evaluate/metrics.json           the typed evaluation results
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from cardkit.attacks import Threat
from cardkit.config import RunConfig, TRAIN_STAGES, dump_config, validate_config
from cardkit.data import ArrayDataset, Augmentation, BatchLoader, DatasetSplits, load_dataset
from cardkit.engine.checkpoint import (Checkpoint, has_checkpoint, load_checkpoint,
                                       save_checkpoint, write_json_atomic)
from cardkit.errors import CardkitError
from cardkit.eval import RobustnessResult, evaluate_robustness
from cardkit.models import create_model
from cardkit.objectives import build_objective
from cardkit.train import Trainer, TrainState, build_optimizer
from cardkit.train.trainer import derive_seed

log = logging.getLogger(__name__)
INIT_SEED = 7919  # a fixed stream of the run seed for weight initialisation
# Keys that may change between runs of one run folder: they do not change what a stage computes.
RESUME_SAFE_KEYS = ("pipeline", "evaluate", "device", "data.data_dir", "data.download",
                    "data.eval_batch_size")


@dataclass
class RunResult:
    run_dir: Path
    dataset: str
    model_summary: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[dict]] = field(default_factory=dict)
    evaluation: Optional[RobustnessResult] = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CardkitError(f"device '{name}' requested but CUDA is not available here; "
                           f"use device: auto or cpu")
    return torch.device(name)


def run_pipeline(config: RunConfig, *, restart: bool = False, progress: bool = False) -> RunResult:
    run_dir = config.run_dir
    device = resolve_device(config.device)
    _check_run_dir(run_dir, config, restart)
    splits = load_data(config)  # before the run folder is written: a data error leaves nothing behind
    _write_config(run_dir, config)
    torch.manual_seed(derive_seed(config.seed, INIT_SEED))
    model = build_model(config, splits).to(device)
    result = RunResult(run_dir, config.data.name, model_summary=summarize_model(model))
    last_train_stage = None
    for stage_id, stage in enumerate(config.pipeline):
        if stage in TRAIN_STAGES:
            history = _train_stage(config, stage, stage_id, model, splits, device, progress)
            result.history[stage] = history
            last_train_stage = stage
        else:
            if last_train_stage is None:
                raise CardkitError("the evaluate stage needs a training stage before it in the "
                                   f"pipeline, got {config.pipeline}; or use `cardkit evaluate --checkpoint DIR`")
            folder = run_dir / last_train_stage / "checkpoints"
            checkpoint = load_checkpoint(folder, config.evaluate.checkpoint)
            model.load_state_dict(checkpoint.model_state())
            result.evaluation = _evaluate(config, model, splits, device, run_dir, checkpoint)
    return result


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), *, pointer: str = "last") -> RunResult:
    """Evaluate a saved model with the config stored beside it (overrides apply to it)."""
    checkpoint = _find_checkpoint(Path(path), pointer)
    config = validate_config(checkpoint.meta["config"], list(overrides))
    device = resolve_device(config.device)
    splits = load_data(config)
    model = model_from_checkpoint(checkpoint).to(device)
    run_dir = checkpoint.path.parents[2]
    result = RunResult(run_dir, config.data.name, model_summary=summarize_model(model))
    result.evaluation = _evaluate(config, model, splits, device, run_dir, checkpoint)
    return result


def read_results(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The evaluation results of finished runs, one dict per run, for a report table."""
    rows = []
    for run_dir in map(Path, run_dirs):
        file = run_dir / "evaluate" / "metrics.json"
        if not file.is_file():
            raise CardkitError(f"no evaluation results in '{run_dir}' (expected {file}); run "
                               f"`cardkit run CONFIG` or `cardkit evaluate --checkpoint {run_dir}` first")
        rows.append({"run": run_dir.name, **json.loads(file.read_text())})
    return rows


def load_data(config: RunConfig) -> DatasetSplits:
    data = config.data
    return load_dataset(data.name, data.data_dir, download=data.download, seed=config.seed,
                        train_size=data.train_size, val_size=data.val_size, test_size=data.test_size,
                        train_files=data.train_files, val_files=data.val_files,
                        test_files=data.test_files)


def build_model(config: RunConfig, splits: DatasetSplits) -> nn.Module:
    info = splits.info
    model = create_model(config.model.name, num_classes=info.num_classes,
                         in_channels=info.in_channels, input_size=info.input_size,
                         mean=info.mean, std=info.std, **config.model.kwargs)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the architecture recorded in the checkpoint, then load its weights."""
    arch = checkpoint.meta["arch"]
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                         input_size=arch["input_size"], mean=arch["mean"], std=arch["std"],
                         **arch.get("kwargs", {}))
    model.load_state_dict(checkpoint.model_state())
    return model


def summarize_model(model: nn.Module) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"name": model.arch["name"], "parameters": params, "size_bytes": size}


def _train_stage(config, stage, stage_id, model, splits, device, progress) -> list[dict]:
    stage_config = getattr(config, stage)
    folder = config.run_dir / stage
    checkpoints = folder / "checkpoints"
    optimizer = build_optimizer(model.parameters(), stage_config.optimizer)
    state = TrainState()
    if has_checkpoint(checkpoints):
        checkpoint = load_checkpoint(checkpoints)
        model.load_state_dict(checkpoint.model_state())
        optimizer.load_state_dict(checkpoint.optimizer_state())
        state = TrainState(**checkpoint.meta["state"], rng=checkpoint.rng_state())
        log.info("%s: resuming at epoch %d, batch %d from %s", stage, state.epoch + 1, state.batch,
                 checkpoint.path)
    history = _read_history(folder / "metrics.jsonl", state.epoch)
    if state.epoch >= stage_config.epochs:
        log.info("%s: already complete (%d epochs)", stage, state.epoch)
        return history
    augmentation = Augmentation(crop_padding=config.data.crop_padding, hflip=config.data.hflip)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    loader = BatchLoader(splits.train, config.data.batch_size, shuffle=True, augmentation=augmentation,
                         device=device, drop_last=len(splits.train) > config.data.batch_size,
                         memory_format=memory_format)
    eval_split = "val" if splits.val is not None else "test"
    eval_data = _subset(getattr(splits, eval_split), stage_config.eval_samples, config.seed)
    eval_loader = BatchLoader(eval_data, config.data.eval_batch_size, device=device)
    threat = Threat(config.threat.norm, config.threat.eps)

    def evaluate(net):
        return evaluate_robustness(net, eval_loader.epoch(), threat, steps=stage_config.eval_pgd_steps,
                                   split=eval_split)

    def save(state: TrainState, row: dict | None, is_best: bool):
        if row is not None:
            _append_jsonl(folder / "metrics.jsonl", row)
        meta = {"stage": stage, "state": state.to_meta(), "arch": model.arch,
                "config": config.model_dump(mode="json"), "metrics": row}
        save_checkpoint(checkpoints, model_state=model.state_dict(), meta=meta,
                        optimizer_state=optimizer.state_dict(), rng=state.rng,
                        pointers=("last", "best") if is_best else ("last",))

    forward_model = torch.compile(model) if config.model.compile else model
    trainer = Trainer(model, build_objective(stage_config.objective, threat), stage_config, loader,
                      optimizer, seed=config.seed, stage_id=stage_id, evaluate=evaluate, save=save,
                      forward_model=forward_model, progress=progress, describe=stage)
    state.history = history
    return trainer.fit(state).history


def _evaluate(config, model, splits, device, run_dir, checkpoint) -> RobustnessResult:
    ev = config.evaluate
    split = getattr(splits, ev.split)
    data = _subset(split, ev.samples, config.seed)
    loader = BatchLoader(data, config.data.eval_batch_size, device=device)
    threat = Threat(ev.attack.norm or config.threat.norm,
                    config.threat.eps if ev.attack.eps is None else ev.attack.eps)
    torch.manual_seed(config.seed)
    result = evaluate_robustness(model, loader.epoch(), threat, steps=ev.attack.steps,
                                 restarts=ev.attack.restarts, step_size=ev.attack.step_size,
                                 split=ev.split)
    write_json_atomic(run_dir / "evaluate" / "metrics.json", {
        "checkpoint": str(checkpoint.path), "dataset": config.data.name,
        "model": summarize_model(model), "robustness": result.to_dict()})
    return result


def _subset(data: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    if n is None or n >= len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:n]
    return ArrayDataset(data.images[index], data.labels[index])


def _check_run_dir(run_dir: Path, config: RunConfig, restart: bool) -> None:
    """Refuse to resume a run folder whose training-relevant config differs."""
    saved = run_dir / "config.yaml"
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text())
        changed = [k for k in _changed_keys(previous, config.model_dump(mode="json"))
                   if not any(k == safe or k.startswith(safe + ".") for safe in RESUME_SAFE_KEYS)]
        if changed:
            raise CardkitError(
                f"'{run_dir}' holds a run with a different config ({', '.join(changed[:3])} changed); "
                f"pass --restart to start it over, or choose another name with --set name=NEW")


def _write_config(run_dir: Path, config: RunConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(dump_config(config))
    tmp.replace(run_dir / "config.yaml")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _find_checkpoint(path: Path, pointer: str) -> Checkpoint:
    """Accept a checkpoint folder, a stage's checkpoints folder, a stage folder or a run folder."""
    if not path.exists():
        raise CardkitError(f"checkpoint path '{path}' does not exist; give a run folder such as runs/quickstart")
    candidates = [path, path / "checkpoints"]
    config_file = path / "config.yaml"
    if config_file.is_file():  # a run folder: its last training stage
        pipeline = yaml.safe_load(config_file.read_text()).get("pipeline", [])
        stages = [s for s in pipeline if s in TRAIN_STAGES]
        candidates += [path / s / "checkpoints" for s in reversed(stages)]
    for candidate in candidates:
        if (candidate / "meta.json").is_file() or has_checkpoint(candidate, pointer):
            return load_checkpoint(candidate, pointer)
    raise CardkitError(f"no checkpoint found in '{path}'; give a run folder (runs/NAME), a stage's "
                       f"checkpoints folder or a checkpoint folder")


def _read_history(path: Path, epochs_done: int) -> list[dict]:
    """Rows of completed epochs; rows past the checkpoint (written before a kill) are dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    rows = [r for r in rows if r.get("epoch", 0) <= epochs_done]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
