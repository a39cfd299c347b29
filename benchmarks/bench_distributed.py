"""Data-parallel PGD-AT training steps of cnn_large: 2 gloo processes of 1 thread each against 1
process with the same global batch, through cardkit's Trainer (the pipeline's training loop: DDP
around the objective step, sharded batches). The one process runs once with 1 thread and once
with 2 (all the cores, as cardkit's default threads give it).

Target: step time of 1 process / step time of 2 processes >= 1.6. The communication share is
1 - (step without the gradient all-reduce) / (step with it), both measured in the 2-process run
(DDP's `require_backward_grad_sync` off for the first); the loss/accuracy all-reduce of every step
stays in both. Step times are the intervals between consecutive optimizer steps after warm-up
steps; medians. Prints JSON.

    python benchmarks/bench_distributed.py [--model cnn_large] [--batch 128] [--steps 12] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cardkit.attacks import Threat
from cardkit.config import TrainStageConfig
from cardkit.data import BatchLoader
from cardkit.data.splits import ArrayDataset
from cardkit.distributed import world
from cardkit.eval import RobustnessResult
from cardkit.models import create_model
from cardkit.objectives import build_objective
from cardkit.train import Trainer, TrainState, build_optimizer

EPS, PGD_STEPS = 8 / 255, 10


def step_times(args, sync: bool = True, precision: str = "fp32", device: str = "cpu") -> list[float]:
    """Times of PGD-AT optimizer steps after `warmup`, through cardkit's Trainer, in this process
    (a rank, or the only one); CUDA steps are timed to their completion."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_channels=3, input_size=32).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    n = args.batch * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g))
    loader = BatchLoader(data, args.batch, shuffle=True, drop_last=True, shard=world(), device=device,
                         memory_format=torch.channels_last)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stage = TrainStageConfig(epochs=1, objective={"name": "pgd_at", "steps": PGD_STEPS})
    stamps = []
    trainer = Trainer(model, build_objective(stage.objective, Threat("linf", EPS)), stage, loader,
                      build_optimizer(model.parameters(), stage.optimizer), seed=0, stage_id=0,
                      evaluate=lambda net: RobustnessResult("val", 1, 0.0, None, "linf", EPS, "none"),
                      save=lambda *_: None, on_step=lambda *_: (synchronize(), stamps.append(time.perf_counter())),
                      precision=precision)
    if trainer.objective_step is not None and not sync:
        trainer.objective_step.require_backward_grad_sync = False  # what DDP's no_sync() sets
        trainer._check_ranks_agree = lambda epoch: None  # unsynced ranks drift apart, as they should
    trainer.fit(TrainState())
    return [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]


def worker(rank: int, size: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    synced = step_times(args, sync=True)
    unsynced = step_times(args, sync=False)
    if rank == 0:
        results.put((synced, unsynced))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn_large")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    single = step_times(args)
    torch.set_num_threads(args.cores)
    one = step_times(args)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(r, args.cores, port, args, results))
                 for port in [free_port()] for r in range(args.cores)]
    for p in processes:
        p.start()
    synced, unsynced = results.get()
    for p in processes:
        p.join()
    median = statistics.median
    print(json.dumps({
        "model": args.model, "global_batch": args.batch, "pgd_steps": PGD_STEPS, "cores": args.cores,
        "processes": args.cores, "threads_per_process": 1,
        "step_seconds_one_process_1_thread": round(median(single), 4),
        f"step_seconds_one_process_{args.cores}_threads": round(median(one), 4),
        "step_seconds_processes": round(median(synced), 4),
        "step_seconds_processes_without_gradient_allreduce": round(median(unsynced), 4),
        "speedup_over_1_thread": round(median(single) / median(synced), 3),
        f"speedup_over_{args.cores}_threads": round(median(one) / median(synced), 3),
        "communication_share": round(1 - median(unsynced) / median(synced), 4),
        "target_speedup": 1.6,
    }, indent=2))


if __name__ == "__main__":
    main()
