"""Loading a pruned checkpoint: the time `model_from_checkpoint` takes, and the SVD and k-means
calls it makes.

The checkpoint is the one an ATMC prune stage leaves for fine-tuning: cnn_large (32x32x3) with a
`size_ratio` budget (which the start meets by a secant search over trial projections and
k-means fits), after the stage's last step (factors hard-quantized). Loading it should rebuild
the factorized layers and take masks, factors, codebooks and budget from the saved state: no SVD,
no k-means. Reported: the median of `--repeats` loads, the part of it spent reading and checking
the files (`load_checkpoint` and the tensors), the calls counted during the loads, and that the
loaded model computes what the saved one does. Prints JSON.

    python benchmarks/bench_checkpoint_load.py [--size-ratio 0.0049] [--bits 8] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cardkit.compress.quantize as quantize_module
import cardkit.prune.atmc as atmc_module
import cardkit.prune.masked as masked_module
from cardkit.engine.checkpoint import load_checkpoint, save_checkpoint
from cardkit.engine.pipeline import model_from_checkpoint
from cardkit.models import create_model
from cardkit.prune import prune_model
from cardkit.prune.atmc import FACTORS, AtmcConfig, AtmcLayer
from cardkit.train import TrainState


class Counted:
    """Counts the calls of a function while it replaces the module attributes that name it."""

    def __init__(self, modules, name: str):
        self.modules, self.name, self.calls = modules, name, 0
        self.original = getattr(modules[0], name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)

    def __enter__(self):
        for module in self.modules:
            if hasattr(module, self.name):
                setattr(module, self.name, self)
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            if getattr(module, self.name, None) is self:
                setattr(module, self.name, self.original)


def pruned_checkpoint(folder: Path, config: AtmcConfig) -> tuple[torch.nn.Module, float]:
    """An ATMC cnn_large after its prune stage's last step, saved as the pipeline saves it."""
    torch.manual_seed(0)
    model = create_model("cnn_large", num_classes=10, in_channels=3, input_size=32)
    start = time.perf_counter()
    setup = prune_model(model, config)
    setup.after_step(1, 1)  # the stage's last step: final projection, hard quantization
    seconds = time.perf_counter() - start
    meta = {"stage": "prune", "state": TrainState().to_meta(), "arch": model.arch,
            "pruning": config.model_dump(mode="json")}
    save_checkpoint(folder, model_state=model.state_dict(), meta=meta, pointers=("last",))
    return model.eval(), seconds


def kept_fraction(model: torch.nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, AtmcLayer)]
    kept = sum(int(layer.factor(name)[1].sum()) for layer in layers for name in FACTORS)
    return kept / sum(layer.weight.numel() for layer in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-ratio", type=float, default=0.0049)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = AtmcConfig(size_ratio=args.size_ratio, bits=args.bits)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        saved, prune_seconds = pruned_checkpoint(folder, config)
        read, total = [], []
        with Counted([torch.linalg], "svd") as svd, \
                Counted([quantize_module, atmc_module, masked_module], "quantize_kmeans") as kmeans:
            for _ in range(args.repeats):
                start = time.perf_counter()
                checkpoint = load_checkpoint(folder)
                checkpoint.model_state()
                read.append(time.perf_counter() - start)
                start = time.perf_counter()
                loaded = model_from_checkpoint(load_checkpoint(folder))
                total.append(time.perf_counter() - start)
            calls = {"svd": svd.calls, "kmeans": kmeans.calls}
        x = torch.rand(8, 3, 32, 32)
        with torch.no_grad():
            same = torch.equal(loaded.eval()(x), saved(x))
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "config": config.model_dump(),
        "model": "cnn_large", "sparsity": round(1 - kept_fraction(saved), 5),
        "prune_start_s": round(prune_seconds, 3), "repeats": args.repeats,
        "load_s": round(statistics.median(total), 4), "read_s": round(statistics.median(read), 4),
        "calls_per_load": {k: v / args.repeats for k, v in calls.items()},
        "outputs_equal": same}, indent=2))


if __name__ == "__main__":
    main()
