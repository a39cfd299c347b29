"""Cost of a PGD-AT training step of a masked model against the same step of the dense model.

Target: at most 1.10 x the dense step, for HYDRA's score phase (scores train through the
straight-through estimator, weights frozen) and for the fine-tune phase (weights train under a
frozen mask). Masks are computed once per optimizer step and reused by the attack's forwards; a
frozen mask is baked into the weights. Prints JSON.

    python benchmarks/bench_masked.py [--models cnn_small cnn_large] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_attack import timed, train_step
from cardkit.attacks import Threat
from cardkit.models import create_model
from cardkit.objectives import PGDATConfig, build_objective
from cardkit.prune import HydraConfig, MagnitudeConfig, prune_model


def variant(name: str, phase: str, device: torch.device):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    hook = None
    if phase == "score":
        prune_model(model, HydraConfig(sparsity=0.99))
    elif phase == "finetune":  # a frozen mask, baked into the weights, which train
        hook = prune_model(model, MagnitudeConfig(sparsity=0.99)).group.enforce
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    if hook is not None:
        optimizer.register_step_post_hook(lambda *_: hook())
    return model, optimizer


def measure(name: str, batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    objective = build_objective(PGDATConfig(steps=steps), Threat("linf", 8 / 255))
    fns = {}
    for phase in ("dense", "score", "finetune"):
        model, optimizer = variant(name, phase, device)
        fns[phase] = (lambda m, o: lambda: train_step(m, o, objective, x, y))(model, optimizer)
    t = timed(fns, repeats)
    return {"model": name, "batch": batch, "pgd_steps": steps, "device": str(device),
            **{f"{k}_step_s": v for k, v in t.items()},
            "score_phase_over_dense": t["score"] / t["dense"],
            "finetune_phase_over_dense": t["finetune"] / t["dense"], "target": 1.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn_small", "cnn_large"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "results": [measure(m, args.batch, args.repeats, args.steps, device)
                                  for m in args.models]}, indent=2))


if __name__ == "__main__":
    main()
