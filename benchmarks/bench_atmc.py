"""An ATMC training step against the dense PGD-AT step it wraps, measured in one run.

Both run the same objective (PGD-AT, k = 10) on the same model and batch. The ATMC step adds the
factorized forward (U V + C computed once per step and reused by the attack's forwards), the ADMM
penalty, the projection onto the current masks after the step (pruned entries back to zero) and,
amortised, the schedule's events: a global top-k projection every `prune_interval` steps and an
ADMM k-means update every `quant_interval` steps (the defaults, 50 each). The three
parts are timed interleaved (median of repeats); the amortised step is
step + projection / prune_interval + admm / quant_interval. Target: at most 1.25 x the dense step.
Also timed: a fine-tuning step after ATMC (the factors quantized for good, the gradient passed
straight through, pruned entries zeroed after the step). Prints JSON.

    python benchmarks/bench_atmc.py [--models cnn_small cnn_large] [--batch 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attack import timed, train_step  # noqa: E402

from cardkit.attacks import Threat  # noqa: E402
from cardkit.models import create_model  # noqa: E402
from cardkit.objectives import PGDATConfig, build_objective  # noqa: E402
from cardkit.prune import prune_model  # noqa: E402
from cardkit.prune.atmc import AtmcConfig  # noqa: E402

TARGET = 1.25


def measure(name: str, batch: int, repeats: int, steps: int, config: AtmcConfig, device: torch.device) -> dict:
    torch.manual_seed(0)
    dense = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device).train()
    dense = dense.to(memory_format=torch.channels_last)  # the engine's default layout
    net = copy.deepcopy(dense)
    setup = prune_model(net, config)
    group = setup.group
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    objective = build_objective(PGDATConfig(steps=steps), Threat("linf", 8 / 255))
    regularized = lambda model, x, y: {"loss": objective(model, x, y)["loss"] + setup.regularizer()}  # noqa: E731
    # Fine-tuning after ATMC: hard-quantized factors behind fixed codebooks and masks.
    tuned = copy.deepcopy(dense)
    tuned_group = prune_model(tuned, config).group
    tuned_group.finish()
    tuned_group.restored()
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (dense, net, tuned)}

    def tuned_step():
        train_step(tuned, optimizers[tuned], objective, x, y)
        tuned_group.enforce()

    t = timed({"dense": lambda: train_step(dense, optimizers[dense], objective, x, y),
               "atmc": lambda: (train_step(net, optimizers[net], regularized, x, y), group.enforce()),
               "projection": lambda: group.project(group.budget),
               "admm": group.admm_update,
               "finetune": tuned_step}, repeats)
    amortised = t["atmc"] + t["projection"] / config.prune_interval + t["admm"] / config.quant_interval
    return {"model": name, "batch": batch, "steps": steps, "device": str(device),
            "budget": group.budget, "factor_entries": sum(p.numel() for p, *_ in group.factors()),
            "dense_step_s": t["dense"], "atmc_step_s": t["atmc"], "projection_s": t["projection"],
            "admm_update_s": t["admm"], "atmc_amortised_step_s": amortised,
            "ratio": amortised / t["dense"], "finetune_step_s": t["finetune"],
            "finetune_ratio": t["finetune"] / t["dense"], "target": TARGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn_small", "cnn_large"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AtmcConfig(sparsity=args.sparsity, bits=args.bits)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "config": config.model_dump(),
              "atmc": [measure(m, args.batch, args.repeats, args.steps, config, device) for m in args.models]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
