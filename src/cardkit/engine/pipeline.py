"""The stage pipeline: pretrain -> prune -> finetune -> evaluate, each stage resumable on its own.

The dense model goes through `pretrain`; every method listed under `prune.methods` is one variant
that starts from the same pretrained weights and goes through `prune` and `finetune` in its own
folder. `evaluate` measures the dense model and every variant. The prune stage is the method's:
the pipeline calls its hooks (`cardkit.prune.PruneSetup`) and never names a method.

Layout of a run folder (`output_dir/name/`):
    config.yaml                          the resolved config
    pretrain/checkpoints/, metrics.jsonl the dense model
    evaluate/metrics.json                the dense model's evaluation
    <method>-<sparsity>/                 one folder per pruning variant, e.g. hydra-0.9/
        variant.yaml                     what the variant's stages were run with
        prune/, finetune/                checkpoints/ and metrics.jsonl of each stage (prune/ also holds
                                         the parts of a method's own stage, e.g. lottery's round-r/, train-r/)
        rebuild/                         the model a method's step after the prune stage made (structured)
        evaluate/metrics.json
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml
from torch import nn

from cardkit.attacks import PGDAttackConfig, Threat
from cardkit.config import (STAGES, TRAIN_STAGES, PruneStageConfig, RunConfig, TrainStageConfig, dump_config,
                            validate_config)
from cardkit.compress import SizeReport, model_size
from cardkit.config_base import Section
from cardkit.data import ArrayDataset, Augmentation, BatchLoader, DatasetSplits, load_dataset
from cardkit.distributed import barrier, gather_objects, init_from_env, is_main, on_main, world
from cardkit.engine.evalstate import evaluation_key, load_state, save_state
from cardkit.engine.threads import set_threads
from cardkit.engine.rundir import check_run_folder, claim_run_folder, clear_run_folder, run_lock
from cardkit.engine.checkpoint import (Checkpoint, has_checkpoint, load_checkpoint, record_result,
                                       save_checkpoint, write_json_atomic)
from cardkit.errors import CardkitError
from cardkit.certify import VerificationResult, verified_accuracy
from cardkit.certify.smoothing import check_smoothing, smoothed_accuracy
from cardkit.corrupt.files import CorruptedSuite, GeneratedSuite
from cardkit.eval import RobustnessResult, evaluate_robustness
from cardkit.eval.corruption import CorruptionResult, evaluate_corruptions
from cardkit.eval.fourier import FourierHeatMap, fourier_heat_map, save_heat_map
from cardkit.models import create_model, model_from_arch
from cardkit.models.bounded import base_arch
from cardkit.objectives import Objective, build_objective
from cardkit.objectives.augment import stage_domain, with_augmentation
from cardkit.prune import (MaskGroup, PruneContext, PruneSetup, method_config, prune_model, restore_masks,
                           restore_method, sparsity_report, thin_layers)
from cardkit.train import Trainer, TrainState, build_optimizer
from cardkit.train.trainer import derive_seed

log = logging.getLogger(__name__)
INIT_SEED = 7919  # a fixed stream of the run seed for weight initialisation
# Keys that may change between runs of one run folder: they do not change what the dense stages
# compute. prune and finetune settings are checked per variant (variant.yaml).
RESUME_SAFE_KEYS = ("pipeline", "evaluate", "device", "threads", "data.data_dir", "data.download",
                    "data.eval_batch_size", "prune", "finetune")


@dataclass
class Evaluation:
    variant: str
    model: dict[str, Any]
    robustness: RobustnessResult
    verified: list[VerificationResult] = field(default_factory=list)
    corruption: Optional[CorruptionResult] = None


@dataclass
class RunResult:
    run_dir: Path
    dataset: str
    history: dict[str, list[dict]] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)


@dataclass
class _Run:
    """What every stage of one run needs."""

    config: RunConfig
    splits: DatasetSplits
    device: torch.device
    progress: bool

    def fresh_model(self) -> nn.Module:
        torch.manual_seed(derive_seed(self.config.seed, INIT_SEED))
        return build_model(self.config, self.splits).to(self.device)


def prepare_process(config: RunConfig) -> torch.device:
    """Set this process's threads (`threads`), join torchrun's process group when there is one,
    and return this process's device (`device`) for a config."""
    set_threads(config.threads)
    device = init_from_env(resolve_device(config.device))
    if world().size > config.data.batch_size:
        raise CardkitError(f"{world().size} processes share a global batch of {config.data.batch_size}; "
                           f"set data.batch_size to at least the number of processes")
    if config.sync_bn and world().size > 1 and device.type != "cuda":
        raise CardkitError("sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); set sync_bn: false "
                           "on the CPU")
    if config.precision != "fp32" and device.type == "cpu":
        log.warning("precision %s on the CPU: autocast runs there, but is slower than fp32 on most CPUs",
                    config.precision)
    return device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CardkitError(f"device '{name}' requested but CUDA is not available here; "
                           f"use device: auto or cpu")
    return torch.device(name)


def run_pipeline(config: RunConfig, *, restart: bool = False, progress: bool = False,
                 evaluate_dense: bool = True) -> RunResult:
    run_dir = config.run_dir
    device = prepare_process(config)
    on_main(lambda: check_run_folder(run_dir))  # a folder of other files is refused before anything is touched
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]  # what the lock creates
    with _locked(run_dir):
        try:
            on_main(lambda: _prepare_folder(run_dir, config, restart))
            splits = load_data_once(config)  # before the run is written: a data error leaves nothing behind
        except BaseException:
            if missing and is_main():
                shutil.rmtree(missing[-1], ignore_errors=True)
            raise
        on_main(lambda: (claim_run_folder(run_dir), _write_config(run_dir, config)))
        return _run_stages(_Run(config, splits, device, progress and is_main()), evaluate_dense)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's run lock, held by rank 0 for all the ranks (by the one process without torchrun)."""
    with ExitStack() as stack:
        on_main(lambda: stack.enter_context(run_lock(folder)))
        yield


def _prepare_folder(run_dir: Path, config: RunConfig, restart: bool) -> None:
    if restart:
        clear_run_folder(run_dir)
    _check_same_run(run_dir, config)


def _run_stages(run: _Run, evaluate_dense: bool) -> RunResult:
    config, run_dir = run.config, run.config.run_dir
    result = RunResult(run_dir, config.data.name)
    stages = config.pipeline
    if "pretrain" in stages:
        model = run.fresh_model()
        kept = set().union(*(m.kept_pretrain_epochs for m in config.prune.methods))  # e.g. rewind points
        result.history["pretrain"] = _train_stage(run, "pretrain", run_dir / "pretrain", model, stage_id=0,
                                                  keep_epochs=kept)
        if "evaluate" in stages and evaluate_dense:
            checkpoint = load_checkpoint(run_dir / "pretrain" / "checkpoints", config.evaluate.checkpoint)
            load_model_state(model, checkpoint)
            result.evaluations.append(_evaluate(run, "dense", model, run_dir, checkpoint))
    if "prune" in stages:
        for index, method in enumerate(config.prune.methods):
            _run_variant(run, method, index, result)
    return result


def _run_variant(run: _Run, method: Section, index: int, result: RunResult) -> None:
    """prune -> finetune -> evaluate for one pruning method, from the pretrained weights."""
    config, folder = run.config, run.config.run_dir / method.label
    _check_variant(folder, config, method)
    stage_id = lambda stage: STAGES.index(stage) + 100 * (index + 1)  # noqa: E731

    model = run.fresh_model()
    # The dense model the report shows is the one every variant starts from.
    parent = load_checkpoint(config.run_dir / "pretrain" / "checkpoints",
                             config.prune.start_from or config.evaluate.checkpoint)
    load_model_state(model, parent)
    if _has_checkpoints(folder / "prune"):  # the method started before: its checkpoints hold its state
        setup = restore_method(model, method)
    else:
        setup = prune_model(model, method, _prune_context(run, model, stage_id("prune")))
        _warn_thin_layers(method, setup)
    meta = {"pruning": method.model_dump(mode="json"), "parent": str(parent.path.relative_to(config.run_dir))}
    stage = _PruneStage(run, method.label, folder / "prune", setup, meta, stage_id("prune"), result)
    stage.execute()
    source = "prune"
    if setup.finish is not None:  # e.g. a structural rebuild, from the trained scores
        source = "rebuild"
        _save_one_shot(folder / source, setup.finish, config, meta, trained_in="prune")
    last_stage = source
    if "finetune" in config.pipeline:
        start = load_checkpoint(folder / source / "checkpoints")
        model, group = _model_for(start, run)
        result.history[f"{method.label}/finetune"] = _train_stage(
            run, "finetune", folder / "finetune", model, stage_id=stage_id("finetune"), meta=meta,
            group=group)
        last_stage = "finetune"
    if "evaluate" in config.pipeline:
        pointer = config.evaluate.checkpoint if last_stage == "finetune" else "last"
        checkpoint = load_checkpoint(folder / last_stage / "checkpoints", pointer)
        model = model_from_checkpoint(checkpoint).to(run.device)
        result.evaluations.append(_evaluate(run, method.label, model, folder, checkpoint))


def _has_checkpoints(folder: Path) -> bool:
    """Whether any stage under `folder` saved a checkpoint (a pointer names it)."""
    return any(pointer.parent.name == "checkpoints" for pointer in folder.rglob("last.json"))


def _prune_context(run: _Run, model: nn.Module, stage_id: int) -> PruneContext:
    """What a method's start may use: the prune stage's training batches and objective."""
    config = run.config
    seed = derive_seed(config.seed, stage_id, 0, 2)
    return PruneContext(model=model, batches=_training_batches(run, seed),
                        objective=_objective(config, "prune"), threat=_threat(config), seed=seed,
                        stage=config.prune)


@dataclass
class _PruneStage:
    """The prune stage of one variant: the pipeline's (the method's scores or weights train in
    prune/, or a one-shot mask is saved there) unless the method runs it (`PruneSetup.run_stage`,
    which drives this object as a `cardkit.prune.PruneStage`)."""

    run: _Run
    label: str
    folder: Path  # <variant>/prune
    setup: PruneSetup
    meta: dict
    stage_id: int
    result: RunResult

    def execute(self) -> None:
        setup = self.setup
        if setup.run_stage is not None:
            setup.run_stage(self)
        elif setup.trains:
            refresh = setup.group.refresh if setup.group is not None else None  # saved masks match saved scores
            self.result.history[f"{self.label}/prune"] = _train_stage(
                self.run, "prune", self.folder, setup.model, stage_id=self.stage_id, meta=self.meta,
                before_save=refresh, on_step=setup.after_step, regularizer=setup.regularizer)
        else:
            self.save("", lambda: setup.model, trained=False)

    def pretrain_state(self, epoch: int) -> Optional[dict[str, torch.Tensor]]:
        folder, pointer = self.run.config.run_dir / "pretrain" / "checkpoints", f"epoch-{epoch}"
        return load_checkpoint(folder, pointer).model_state() if has_checkpoint(folder, pointer) else None

    def train(self, part: str, start: str, offset: int) -> None:
        start_from = load_checkpoint(self.folder / start / "checkpoints")
        self.result.history[f"{self.label}/prune/{part}"] = _train_stage(
            self.run, "prune", self.folder / part, self.setup.model, stage_id=self.stage_id + offset,
            meta=self.meta, start=start_from, group=self.setup.group)

    def save(self, part: str, make_model: Callable[[], nn.Module], trained: bool) -> None:
        _save_one_shot(self.folder / part, make_model, self.run.config, self.meta,
                       trained_in="prune" if trained else "pretrain")


def _warn_thin_layers(method: Section, setup) -> None:
    thin = thin_layers(setup.model, setup.group) if setup.group is not None else []
    if thin:
        listed = ", ".join(f"{name} keeps {kept} weights for {outputs} outputs" for name, kept, outputs in thin[:3])
        log.warning("%s: %s%s; the same sparsity in every layer starves the small ones: scope: global "
                    "(--scope global) lets the budget move between layers", method.label, listed,
                    f" (and {len(thin) - 3} more)" if len(thin) > 3 else "")


def prune_checkpoint(path: str | Path, method: Section, overrides: list[str] = (), *,
                     finetune: bool = True, progress: bool = False) -> RunResult:
    """Prune the dense model of a run folder with one method (then fine-tune and evaluate it),
    with the config stored in the run (overrides apply to it)."""
    checkpoint = _find_checkpoint(Path(path), "last")
    if checkpoint.meta.get("pruning"):
        raise CardkitError(f"checkpoint '{checkpoint.path}' is already pruned "
                           f"({method_config(**checkpoint.meta['pruning']).label}); give the run folder "
                           f"or its pretrain checkpoint")
    if checkpoint.meta.get("stage") != "pretrain":
        raise CardkitError(f"checkpoint '{checkpoint.path}' is not a pretrain checkpoint; give a run folder")
    stages = ["pretrain", "prune"] + (["finetune"] if finetune else []) + ["evaluate"]
    methods = json.dumps([method.model_dump(mode="json")])
    config = validate_config(checkpoint.meta["config"],
                             list(overrides) + [f"pipeline={stages}", f"prune.methods={methods}"])
    run_dir = checkpoint.path.parents[2]
    if run_dir.resolve() != config.run_dir.resolve():  # a moved run folder: follow it
        config = validate_config(config.model_dump(mode="json"),
                                 [f"output_dir={run_dir.parent}", f"name={run_dir.name}"])
    return run_pipeline(config, progress=progress, evaluate_dense=False)


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), *, pointer: str | None = None) -> RunResult:
    """Evaluate a saved model with the config stored beside it (overrides apply to it); `pointer`
    picks the last or best checkpoint of a stage, by default the config's evaluate.checkpoint."""
    checkpoint = _find_checkpoint(Path(path), pointer or "last")
    config = validate_config(checkpoint.meta["config"], list(overrides))
    if pointer is None and config.evaluate.checkpoint != "last":
        checkpoint = _find_checkpoint(Path(path), config.evaluate.checkpoint)
    device = prepare_process(config)
    run = _Run(config, load_data_once(config), device, progress=False)
    model = model_from_checkpoint(checkpoint).to(device)
    folder = checkpoint.path.parents[2]  # <folder>/<stage>/checkpoints/<checkpoint>
    pruning = checkpoint.meta.get("pruning")
    variant = method_config(**pruning).label if pruning else "dense"
    result = RunResult(folder, config.data.name)
    with _locked(folder):
        result.evaluations.append(_evaluate(run, variant, model, folder, checkpoint))
    return result


def read_results(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The evaluation results under run folders (the dense model's and every variant's)."""
    rows = []
    for run_dir in map(Path, run_dirs):
        files = sorted({*run_dir.glob("evaluate/metrics.json"), *run_dir.glob("*/evaluate/metrics.json")},
                       key=lambda f: (f.parent.parent != run_dir, str(f)))
        if not files:
            raise CardkitError(f"no evaluation results in '{run_dir}' (expected "
                               f"{run_dir / 'evaluate' / 'metrics.json'}); run `cardkit run CONFIG` or "
                               f"`cardkit evaluate --checkpoint {run_dir}` first")
        run = run_dir.name if (run_dir / "config.yaml").is_file() else run_dir.parent.name
        rows += [{"run": run, **json.loads(file.read_text())} for file in files]
    return rows


def load_data_once(config: RunConfig) -> DatasetSplits:
    """The config's data, read (and downloaded, when missing) by rank 0 before the other ranks read
    the same files."""
    splits = on_main(lambda: load_data(config))
    return splits if splits is not None else load_data(config)


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
    """Rebuild the architecture recorded in the checkpoint (masked if it was pruned, smaller if
    it was pruned structurally), then load its weights."""
    return _model_for(checkpoint)[0]


def _model_for(checkpoint: Checkpoint, run: _Run | None = None) -> tuple[nn.Module, MaskGroup | None]:
    model, pruning = model_from_arch(checkpoint.meta["arch"]), checkpoint.meta.get("pruning")
    group = restore_masks(model, method_config(**pruning)) if pruning else None
    if run is not None:
        model = model.to(run.device)
        if run.config.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
    load_model_state(model, checkpoint)
    if group is not None:
        group.enforce()  # score-trained checkpoints keep dense weights: bake the masks in
    return model, group


def load_model_state(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's weights; an architecture mismatch is a user error that names both."""
    try:
        model.load_state_dict(checkpoint.model_state())
    except RuntimeError as err:
        built, saved = getattr(model, "arch", {}).get("name"), checkpoint.meta.get("arch", {}).get("name")
        detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CardkitError(f"checkpoint '{checkpoint.path}' holds a {saved} model that does not fit the "
                           f"{built} model the config builds ({detail}); use the config the checkpoint "
                           f"was trained with") from None


def summarize_model(model: nn.Module, size: SizeReport | None = None) -> dict[str, Any]:
    """Parameters, sparsity and the accounted compressed size (see cardkit.compress.size)."""
    params = sum(p.numel() for name, p in model.named_parameters() if not name.endswith(".scores"))
    report = sparsity_report(model)
    size = size or model_size(model)
    if "structured" in model.arch:  # sparsity against the dense architecture it was cut from
        base = model_from_arch(base_arch(model.arch))
        dense = sparsity_report(base)["prunable_weights"]
        report["sparsity"] = 1 - report["kept_weights"] / dense
    return {"name": model.arch["name"], "parameters": params, "sparsity": report["sparsity"],
            "kept_parameters": report["kept_parameters"], "size_bytes": size.bytes,
            "dense_bytes": math.ceil(size.dense_bits / 8), "compression_ratio": size.compression_ratio}


def _train_stage(run: _Run, stage: str, folder: Path, model: nn.Module, *, stage_id: int,
                 meta: dict | None = None, start: Checkpoint | None = None,
                 group: MaskGroup | None = None,
                 before_save: Callable[[], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 regularizer: Callable[[], torch.Tensor] | None = None,
                 keep_epochs: set[int] = frozenset()) -> list[dict]:
    """Train `model` for one stage in `folder`, resuming from its own checkpoint if there is one,
    else starting from `start`. With a frozen mask `group`, pruned weights are zeroed after every
    optimizer step so that momentum and weight decay cannot revive them."""
    config = run.config
    stage_config = getattr(config, stage)
    _warn_objective_switch(config, stage)
    checkpoints = folder / "checkpoints"
    own = load_checkpoint(checkpoints) if has_checkpoint(checkpoints) else None
    if own is None and start is not None:
        load_model_state(model, start)
    if group is not None:
        group.enforce()
    optimizer = build_optimizer(model.parameters(), stage_config.optimizer)
    if group is not None:
        optimizer.register_step_post_hook(lambda *_: group.enforce(refit=True))
    state = TrainState()
    if own is not None:
        load_model_state(model, own)
        optimizer.load_state_dict(own.optimizer_state())
        state = TrainState(**own.meta["state"], rng=_rank_rng(own))
        log.info("%s: resuming at epoch %d, batch %d from %s", stage, state.epoch + 1, state.batch, own.path)
    history = _read_history(folder / "metrics.jsonl", state.epoch)
    if state.epoch >= stage_config.epochs:
        log.info("%s: already complete (%d epochs)", folder.relative_to(config.run_dir), state.epoch)
        return history
    loader = _train_loader(run)
    eval_split = "val" if run.splits.val is not None else "test"
    eval_data = _subset(getattr(run.splits, eval_split), stage_config.eval_samples, config.seed)
    threat = _threat(config)

    selection = [PGDAttackConfig(steps=stage_config.eval_pgd_steps)] if stage_config.eval_pgd_steps else []

    def evaluate(net):
        return evaluate_robustness(net, eval_data.images, eval_data.labels, threat, selection,
                                   split=eval_split, batch_size=config.data.eval_batch_size,
                                   seed=config.seed, checks=False)

    def save(state: TrainState, row: dict | None, is_best: bool):
        if before_save is not None:
            before_save()
        rng = _ranked_rng(state.rng)  # every rank's random state, for a mid-epoch resume
        if not is_main():
            return
        if row is not None:
            _append_jsonl(folder / "metrics.jsonl", row)
        pointers = ["last"] + ["best"] * is_best
        if row is not None and state.epoch in keep_epochs:  # e.g. a lottery ticket's rewind point
            pointers.append(f"epoch-{state.epoch}")
        save_checkpoint(checkpoints, model_state=model.state_dict(),
                        meta=_checkpoint_meta(stage, state, model, config, row,
                                              {**(meta or {}), "domain": stage_domain(stage_config)}),
                        optimizer_state=optimizer.state_dict(), rng=rng, pointers=tuple(pointers))

    forward_model = torch.compile(model) if config.model.compile else model
    describe = str(folder.relative_to(config.run_dir))
    trainer = Trainer(model, _objective(config, stage), stage_config, loader,
                      optimizer, seed=config.seed, stage_id=stage_id, evaluate=evaluate, save=save,
                      forward_model=forward_model, progress=run.progress, describe=describe,
                      on_step=on_step, regularizer=regularizer, precision=config.precision,
                      sync_bn=config.sync_bn)
    state.history = history
    history = trainer.fit(state).history
    barrier()  # the other ranks read what rank 0 wrote only once it is there
    return history


def _rank_rng(checkpoint: Checkpoint) -> Optional[dict[str, torch.Tensor]]:
    """This rank's random state from a mid-epoch checkpoint (None at an epoch boundary). A run
    resumes with another number of processes only from an epoch boundary."""
    saved, here = checkpoint.meta["state"].get("world_size", 1), world()
    rng = checkpoint.rng_state()
    if saved != here.size:
        if checkpoint.meta["state"].get("batch"):
            raise CardkitError(f"{checkpoint.path} was saved mid-epoch by {saved} process(es) and this run "
                               f"has {here.size}; resume it with {saved} (cardkit --nproc {saved} ..., or "
                               f"torchrun --nproc-per-node {saved} -m cardkit ...)")
        log.warning("resuming a stage trained on %d process(es) with %d: the data order and global batch "
                    "stay the same, the attack noise of each process does not", saved, here.size)
    if rng is None or saved == 1:
        return rng
    prefix = f"rank{here.rank}/"
    return {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}


def _ranked_rng(rng: Optional[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    """The ranks' random states in one dict ('rank1/cpu', ...) on rank 0; one process's as it is."""
    if rng is None or world().size == 1:
        return rng
    return {f"rank{r}/{k}": v for r, state in enumerate(gather_objects(rng)) for k, v in state.items()}


def _train_loader(run: _Run, shard: bool = True) -> BatchLoader:
    """The training batches of every stage: shuffled and augmented, in the model's memory format;
    under torchrun each rank's share of them (`shard`)."""
    config = run.config
    augmentation = Augmentation(crop_padding=config.data.crop_padding, hflip=config.data.hflip)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    return BatchLoader(run.splits.train, config.data.batch_size, shuffle=True, augmentation=augmentation,
                       device=run.device, drop_last=len(run.splits.train) > config.data.batch_size,
                       memory_format=memory_format, shard=world() if shard else None)


def _training_batches(run: _Run, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, epoch after epoch, in an order that `seed` fixes (the loader is built at
    the first batch asked for). Every rank sees the whole batches: a method's start (a saliency, a
    projection) must come out the same on all of them."""
    loader = _train_loader(run, shard=False)
    for epoch in itertools.count():
        yield from loader.epoch(derive_seed(seed, epoch))


def _objective(config: RunConfig, stage: str) -> Objective:
    stage_config = getattr(config, stage)
    return with_augmentation(build_objective(stage_config.objective, _threat(config)), stage_config.augment)


def _threat(config: RunConfig) -> Threat:
    return Threat(config.threat.norm, config.threat.eps)


def _warn_objective_switch(config: RunConfig, stage: str) -> None:
    """Robust pruning keeps the pretraining objective; a switch to natural training is stated."""
    pretrained, objective = config.pretrain.objective.name, getattr(config, stage).objective.name
    if stage != "pretrain" and objective == "natural" and pretrained != "natural":
        log.warning("%s: trains with the natural objective, but the model was pretrained with %s; "
                    "robust pruning keeps the pretraining objective: remove %s.objective to inherit "
                    "it", stage, pretrained, stage)


def _save_one_shot(folder: Path, make_model: Callable[[], nn.Module], config: RunConfig,
                   meta: dict, trained_in: str = "pretrain") -> None:
    """A stage that trains nothing (one-shot pruning, a structural rebuild): one checkpoint,
    whose domain is that of the stage that last trained the weights."""
    on_main(lambda: _write_one_shot(folder, make_model, config, meta, trained_in))


def _write_one_shot(folder: Path, make_model: Callable[[], nn.Module], config: RunConfig,
                    meta: dict, trained_in: str) -> None:
    checkpoints = folder / "checkpoints"
    if has_checkpoint(checkpoints):
        return
    model = make_model()
    save_checkpoint(checkpoints, model_state=model.state_dict(),
                    meta=_checkpoint_meta(folder.name, TrainState(), model, config, None,
                                          {**meta, "domain": stage_domain(getattr(config, trained_in))}),
                    pointers=("last", "best"))


def _checkpoint_meta(stage: str, state: TrainState, model: nn.Module, config: RunConfig,
                     row: dict | None, extra: dict | None) -> dict:
    return {"stage": stage, "state": state.to_meta(), "arch": model.arch,
            "config": config.model_dump(mode="json"), "metrics": row, **(extra or {})}


def _evaluate(run: _Run, variant: str, model: nn.Module, folder: Path,
              checkpoint: Checkpoint) -> Evaluation:
    config = run.config
    ev = config.evaluate
    data = _subset(getattr(run.splits, ev.split), ev.samples, config.seed)
    loader = BatchLoader(data, config.data.eval_batch_size, device=run.device)
    threat = _threat(config)
    state_file = folder / "evaluate" / "attack-state.safetensors"
    key = evaluation_key({"checkpoint": str(checkpoint.path), "split": ev.split, "samples": len(data),
                          "seed": config.seed, "threat": [threat.norm, threat.eps],
                          "attacks": [a.model_dump(mode="json") for a in ev.attacks]})
    result = evaluate_robustness(model, data.images, data.labels, threat, ev.attacks, split=ev.split,
                                 batch_size=config.data.eval_batch_size, seed=config.seed,
                                 resume=load_state(state_file, key),
                                 save=lambda state: save_state(state_file, key, state))
    on_main(lambda: state_file.unlink(missing_ok=True))
    verified = [verified_accuracy(model, loader.epoch(), _verify_eps(config), method, ev.split)
                for method in ev.verify]
    corruption = _evaluate_corruptions(run, model, data) if ev.corruption.names else None
    size = model_size(model)
    summary = summarize_model(model, size)
    metrics = {
        "variant": variant, "checkpoint": str(checkpoint.path), "dataset": config.data.name,
        "model": summary, "pruning": checkpoint.meta.get("pruning"), "domain": checkpoint.meta.get("domain"),
        "robustness": result.to_dict(), "verified": [v.to_dict() for v in verified],
        "corruption": corruption_summary(corruption), "layers": sparsity_report(model)["layers"],
        "size": size.to_dict()}

    def write() -> None:
        if corruption is not None:
            record_result(folder / "evaluate" / "corruption.json", corruption.to_dict())
        record_result(folder / "evaluate" / "metrics.json", metrics)

    on_main(write)
    return Evaluation(variant, summary, result, verified, corruption)


def _evaluate_corruptions(run: _Run, model: nn.Module, clean: ArrayDataset) -> CorruptionResult:
    """Accuracy under the configured corruptions: of the official files when `suite` names a
    folder, else generated from the evaluation images."""
    settings, config = run.config.evaluate.corruption, run.config
    if settings.suite:
        suite, source = CorruptedSuite(settings.suite), settings.suite
    else:
        suite = GeneratedSuite(clean, settings.seed)
        source = f"generated from the {config.evaluate.split} split ({len(clean)} images, seed {settings.seed})"
    baseline = {"model": read_corruption_result(settings.baseline)} if settings.baseline else None
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()
    try:
        return evaluate_corruptions({"model": model}, suite, source=source, names=settings.names,
                                    severities=settings.severities, clean=clean,
                                    batch_size=config.data.eval_batch_size, device=run.device,
                                    memory_format=memory_format, baselines=baseline)["model"]
    finally:
        model.train(was_training)


def read_corruption_result(path: str | Path) -> CorruptionResult:
    """A saved corruption result: a corruption.json, or a run or variant folder holding one."""
    path = Path(path)
    file = path if path.is_file() else path / "evaluate" / "corruption.json"
    if not file.is_file():
        raise CardkitError(f"no corruption results at '{path}' (expected a corruption.json or "
                           f"{file}); evaluate the baseline with evaluate.corruption.names set first")
    try:
        return CorruptionResult.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError:
        raise CardkitError(f"'{file}' is not valid JSON (truncated?); evaluate the baseline again") from None


def corruption_summary(result: CorruptionResult | None) -> dict | None:
    if result is None:
        return None
    return {"mean_accuracy": result.mean_accuracy, "mce": result.mce, "relative_mce": result.relative_mce,
            "corruptions": len(result.accuracy), "severities": result.severities, "source": result.source}


def _verify_eps(config: RunConfig) -> float:
    if config.evaluate.verify_eps is not None:
        return config.evaluate.verify_eps
    if config.threat.norm != "linf":
        raise CardkitError("evaluate.verify bounds Linf balls but the threat is l2; set "
                           "evaluate.verify_eps to the Linf radius to verify")
    return config.threat.eps


def certify_checkpoint(path: str | Path, method: str, overrides: list[str] = (), *,
                       pointer: str = "last", smoothing: dict | None = None):
    """Verified accuracy of a saved model under IBP, CROWN-IBP or CROWN bounds, or certified L2
    accuracy of its Gaussian-smoothed version (`smoothing`: sigma, n0, n, alpha, radii), written
    to <folder>/certify/<method>.json beside the model's run or variant folder."""
    checkpoint = _find_checkpoint(Path(path), pointer)
    config = validate_config(checkpoint.meta["config"], list(overrides))
    device = prepare_process(config)
    splits = load_data_once(config)
    model = model_from_checkpoint(checkpoint).to(device)
    data = _subset(getattr(splits, config.evaluate.split), config.evaluate.samples, config.seed)
    loader = BatchLoader(data, config.data.eval_batch_size, device=device)
    if method == "smoothing":
        check_smoothing(**{k: smoothing[k] for k in ("sigma", "n0", "n", "alpha")})
        trained = {getattr(config, stage).objective.name for stage in TRAIN_STAGES}
        if "gaussian" not in trained:
            log.warning("this model was not trained with Gaussian noise (objective: gaussian); its "
                        "smoothed classifier will certify little")
        result = smoothed_accuracy(model, loader.epoch(), split=config.evaluate.split,
                                   classes=splits.info.num_classes, seed=config.seed, **smoothing)
    else:
        result = verified_accuracy(model, loader.epoch(), _verify_eps(config), method, config.evaluate.split)
    folder = checkpoint.path.parents[2]
    with _locked(folder):
        on_main(lambda: write_json_atomic(folder / "certify" / f"{method}.json",
                                          {"checkpoint": str(checkpoint.path), "dataset": config.data.name,
                                           "model": summarize_model(model), "verification": result.to_dict()}))
    return folder, result


def fourier_checkpoint(path: str | Path, *, eps: float, samples: int, seed: int = 0,
                       overrides: list[str] = (), pointer: str = "last") -> tuple[Path, FourierHeatMap]:
    """Fourier heat map of a saved model on `samples` test images, written as PNG and JSON to
    <folder>/fourier/ beside the model's run or variant folder."""
    checkpoint = _find_checkpoint(Path(path), pointer)
    config = validate_config(checkpoint.meta["config"], list(overrides))
    device = prepare_process(config)
    model = model_from_checkpoint(checkpoint).to(device)
    data = _subset(load_data(config).test, samples, seed)
    x, y = data.images.to(device).float().div_(255), data.labels.to(device)
    result = fourier_heat_map(model, x, y, eps, batch_size=config.data.eval_batch_size,
                              generator=torch.Generator().manual_seed(seed))
    out = checkpoint.path.parents[2] / "fourier"

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "heatmap.json", {"checkpoint": str(checkpoint.path), **result.to_dict()})
        save_heat_map(result, out / "heatmap.png", title=f"{config.name}: error under Fourier noise, eps {eps:g}")

    on_main(write)
    return out.parent, result


def _subset(data: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    if n is None or n >= len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:n]
    return ArrayDataset(data.images[index], data.labels[index])


def _check_same_run(run_dir: Path, config: RunConfig) -> None:
    """Refuse to resume a run folder whose training-relevant config differs."""
    _check_same(run_dir / "config.yaml", config.model_dump(mode="json"), RESUME_SAFE_KEYS, run_dir,
                upgrade=lambda saved: validate_config(saved).model_dump(mode="json"))


def _check_variant(folder: Path, config: RunConfig, method: Section) -> None:
    """A variant folder resumes only with the prune and finetune settings it was started with."""
    settings = {"method": method.model_dump(mode="json"),
                "prune": config.prune.model_dump(mode="json", exclude={"methods"}),
                "finetune": config.finetune.model_dump(mode="json")}
    if "finetune" not in config.pipeline:
        settings.pop("finetune")
    _check_same(folder / "variant.yaml", settings, (), folder, ignore_missing=("finetune",),
                upgrade=_upgrade_variant)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "variant.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def _upgrade_variant(saved: dict) -> dict:
    """A saved variant.yaml with the defaults of keys added since it was written."""
    upgraded = dict(saved)
    if "method" in saved:
        upgraded["method"] = method_config(**saved["method"]).model_dump(mode="json")
    for stage, section in (("prune", PruneStageConfig), ("finetune", TrainStageConfig)):
        if stage in saved:
            upgraded[stage] = section.model_validate(saved[stage]).model_dump(mode="json", exclude={"methods"})
    return upgraded


def _check_same(saved: Path, current: dict, safe: tuple[str, ...], folder: Path,
                ignore_missing: tuple[str, ...] = (), upgrade: Callable[[dict], dict] | None = None) -> None:
    """Refuse a changed config. The saved one is first re-validated (`upgrade`), so keys added
    to cardkit since it was written compare at their defaults."""
    if not saved.is_file():
        return
    previous = yaml.safe_load(saved.read_text()) or {}
    if upgrade is not None:
        try:
            previous = upgrade(previous)
        except (CardkitError, ValueError):
            pass  # a saved config this version no longer accepts: compare it as written
    for key in ignore_missing:
        if key not in current or key not in previous:
            previous.pop(key, None)
            current = {k: v for k, v in current.items() if k != key}
    changed = [k for k in _changed_keys(previous, current)
               if not any(k == s or k.startswith(s + ".") for s in safe)]
    if changed:
        raise CardkitError(
            f"'{folder}' holds a run with a different config ({', '.join(changed[:3])} changed); "
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
    """Accept a checkpoint folder, a stage's checkpoints folder, a stage folder, a variant folder
    or a run folder (its dense model)."""
    if not path.exists():
        raise CardkitError(f"checkpoint path '{path}' does not exist; give a run folder such as runs/quickstart")
    candidates = [path, path / "checkpoints"]
    candidates += [path / stage / "checkpoints" for stage in ("finetune", "rebuild", "prune", "pretrain")]
    for candidate in candidates:
        if (candidate / "meta.json").is_file() or has_checkpoint(candidate, pointer):
            return load_checkpoint(candidate, pointer)
    raise CardkitError(f"no checkpoint found in '{path}'; give a run folder (runs/NAME), a variant "
                       f"folder (runs/NAME/hydra-0.9), a stage's checkpoints folder or a checkpoint folder")


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
    kept = [r for r in rows if r.get("epoch", 0) <= epochs_done]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text() and is_main():  # replaced whole, so a kill now cannot lose the earlier rows
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return kept


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
