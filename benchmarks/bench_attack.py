"""PGD and PGD-AT cost against plain forward+backward passes, measured in one run.

Targets: a PGD-k attack costs at most 1.15 x k forward+backward passes of the batch, and a PGD-AT
training step (k = 10) at most 1.15 x (k + 1). Also compares channels_last and torch.compile
against the default for a natural training step. Prints JSON.

    python benchmarks/bench_attack.py [--model cnn_small] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cardkit.attacks import Threat, pgd
from cardkit.models import create_model
from cardkit.objectives import PGDATConfig, build_objective


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over repeats."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fwd_bwd(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def train_step(model, optimizer, objective, x, y):
    loss = objective(model, x, y)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure(name: str, batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device).train()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    threat = Threat("linf", 8 / 255)
    t_pass = timed(lambda: fwd_bwd(model, x, y), repeats)
    t_attack = timed(lambda: pgd(model, x, y, threat, steps=steps), repeats)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    objective = build_objective(PGDATConfig(steps=steps), threat)
    t_at = timed(lambda: train_step(model, optimizer, objective, x, y), repeats)
    return {
        "model": name, "batch": batch, "steps": steps, "device": str(device),
        "fwd_bwd_s": t_pass, "pgd_s": t_attack, "pgd_at_step_s": t_at,
        "pgd_over_k_passes": t_attack / (steps * t_pass),
        "pgd_at_over_k_plus_1_passes": t_at / ((steps + 1) * t_pass),
        "targets": {"pgd_over_k_passes": 1.15, "pgd_at_over_k_plus_1_passes": 1.15},
    }


def layout_and_compile(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    """Natural training step: default vs channels_last vs torch.compile."""
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    natural = lambda model, x, y: {"loss": F.cross_entropy(model(x), y)}  # noqa: E731
    results = {}
    for variant in ("default", "channels_last", "compile"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device).train()
        inputs = x
        if variant == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runner = model
        if variant == "compile":
            runner = torch.compile(model)
            start = time.perf_counter()
            train_step(runner, optimizer, natural, inputs, y)
            results["compile_warmup_s"] = time.perf_counter() - start
        results[f"{variant}_step_s"] = timed(lambda: train_step(runner, optimizer, natural, inputs, y), repeats)
    base = results["default_step_s"]
    results["channels_last_speedup"] = base / results["channels_last_step_s"]
    results["compile_speedup"] = base / results["compile_step_s"]
    return {"model": name, "batch": batch, "device": str(device), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn_small", "cnn_large", "resnet18"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the layout/compile comparison")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "pgd": [measure(m, args.batch, args.repeats, args.steps, device) for m in args.models]}
    if not args.no_compile:
        report["layout_and_compile"] = [layout_and_compile(m, args.batch, args.repeats, device)
                                        for m in args.models]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
