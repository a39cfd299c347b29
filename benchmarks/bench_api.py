"""A masked PGD-AT training step through the public API (`cardkit.fit` with a mask group from
`cardkit.compress_`) against the same step through the pipeline (`_train_stage` of the finetune
stage, which also writes checkpoints and metrics at the epoch's end), on the same model,
data, objective and optimizer.

Target: API step / pipeline step <= 1.02. Step times are the intervals between consecutive
optimizer steps inside an epoch (the end-of-epoch evaluation and checkpoint fall outside them),
from epochs run alternately by the two paths in the same process; the ratios are of the medians
over all steps, of the fastest steps, and the median over epoch pairs of each pair's ratio of
medians. Prints JSON.

    python benchmarks/bench_api.py [--model cnn_small] [--size 28] [--batches 10] [--repeats 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cardkit
from cardkit.config import validate_config
from cardkit.data import ArrayDataset, DatasetInfo, DatasetSplits
from cardkit.engine.pipeline import _Run, _train_stage
from cardkit.models import create_model
from cardkit.prune import MagnitudeConfig, prune_model

EPS, PGD_STEPS, LR = 0.1, 10, 0.01


def masked_model(name: str, size: int, channels: int):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels, input_size=size).train()
    return model, prune_model(model, MagnitudeConfig(sparsity=0.99)).group


class Steps:
    """on_step callback: the intervals between consecutive optimizer steps, epoch by epoch."""

    def __init__(self):
        self.epochs: list[list[float]] = []
        self.last = None

    def start_epoch(self):
        self.epochs.append([])
        self.last = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.epochs[-1].append(now - self.last)
        self.last = now

    @property
    def intervals(self) -> list[float]:
        return [t for epoch in self.epochs for t in epoch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10, help="optimizer steps per epoch")
    parser.add_argument("--repeats", type=int, default=12, help="epochs per path")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    images = torch.randint(0, 256, (n, args.channels, args.size, args.size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    train = ArrayDataset(images, labels)
    info = DatasetInfo(name="synthetic", num_classes=10, in_channels=args.channels, input_size=args.size,
                       mean=(0.0,) * args.channels, std=(1.0,) * args.channels,
                       class_names=tuple(map(str, range(10))))
    splits = DatasetSplits(info, train, None, ArrayDataset(images[:100], labels[:100]))
    optimizer = {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 5e-4}
    objective = {"name": "pgd_at", "steps": PGD_STEPS}

    api_model, api_group = masked_model(args.model, args.size, args.channels)
    api_model.to(device)
    pipe_model, pipe_group = masked_model(args.model, args.size, args.channels)
    pipe_model.to(device)
    timings = {"api": Steps(), "pipeline": Steps()}
    with tempfile.TemporaryDirectory() as folder:
        config = validate_config({
            "name": "bench", "output_dir": folder, "device": str(device), "threat": {"norm": "linf", "eps": EPS},
            "data": {"name": "digits", "batch_size": args.batch},
            "model": {"name": args.model, "channels_last": False},
            "pipeline": ["pretrain", "prune", "finetune"],
            "prune": {"methods": [{"name": "magnitude", "sparsity": 0.99}]},
            "finetune": {"epochs": 1, "objective": objective, "optimizer": optimizer, "eval_samples": 100}})
        run = _Run(config, splits, device, progress=False)

        def api_epoch():
            cardkit.fit(api_model, train, cardkit.PGDATConfig(steps=PGD_STEPS), eps=EPS, epochs=1,
                        batch_size=args.batch, optimizer=optimizer, group=api_group, eval_samples=100,
                        on_step=timings["api"])

        def pipeline_epoch(repeat: int):
            _train_stage(run, "finetune", Path(folder) / "bench" / f"finetune-{repeat}", pipe_model,
                         stage_id=0, group=pipe_group, on_step=timings["pipeline"])

        for repeat in range(args.repeats):  # alternate which path goes first
            runs = [("api", api_epoch), ("pipeline", lambda: pipeline_epoch(repeat))]
            for name, epoch in runs if repeat % 2 == 0 else runs[::-1]:
                timings[name].start_epoch()
                epoch()
    median = {name: statistics.median(t.intervals) for name, t in timings.items()}
    fastest = {name: min(t.intervals) for name, t in timings.items()}
    # Each API epoch against the pipeline epoch run next to it: slow drifts of the machine's
    # load cancel in the ratio.
    paired = [statistics.median(a) / statistics.median(b)
              for a, b in zip(timings["api"].epochs, timings["pipeline"].epochs)]
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "model": args.model,
        "input": [args.channels, args.size, args.size], "batch": args.batch, "pgd_steps": PGD_STEPS,
        "sparsity": 0.99, "steps_timed": {name: len(t.intervals) for name, t in timings.items()},
        "median_step_s": median, "fastest_step_s": fastest,
        "api_over_pipeline_median": median["api"] / median["pipeline"],
        "api_over_pipeline_paired_median": statistics.median(paired),
        "api_over_pipeline_fastest": fastest["api"] / fastest["pipeline"], "target": 1.02}, indent=2))


if __name__ == "__main__":
    main()
