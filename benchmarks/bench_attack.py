"""PGD and PGD-AT cost against plain forward+backward passes, measured in one run.

Targets: a PGD-k attack costs at most 1.15 x k forward+backward passes of the batch, also with
best-iterate tracking (best=True, as evaluation runs it: one more forward pass to score the final
iterate, and a per-sample comparison each step), and a PGD-AT training step (k = 10) at most
1.15 x (k + 1). Two passes are measured: the training pass (loss.backward() into the weights) and
the attack's own pass (the gradient with respect to the input only, which skips weight gradients
but adds the first layer's input gradient). The attack's
overhead is judged against the pass it must run; both ratios are printed. Also compares
channels_last and torch.compile against the default for a natural training step. Prints JSON.

    python benchmarks/bench_attack.py [--models cnn_small] [--batch 128] [--repeats 5] [--threads 1]
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


def timed(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each fn, measured in interleaved rounds so that machine noise
    affects every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def fwd_bwd(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)


def train_step(model, optimizer, objective, x, y):
    loss = objective(model, x, y)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure(name: str, batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    # The memory layout the engine uses by default (model.channels_last: true).
    model = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    threat = Threat("linf", 8 / 255)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    objective = build_objective(PGDATConfig(steps=steps), threat)
    # Baselines run k passes over k different inputs, as PGD does (a pass repeated on one input
    # finds its data in cache and would understate the cost).
    inputs = [(x + 0.01 * torch.randn_like(x)).clamp(0, 1) for _ in range(steps)]  # keeps the layout
    t = timed({"pass": lambda: [fwd_bwd(model, xi, y) for xi in inputs],
               "input": lambda: [input_grad(model, xi, y) for xi in inputs],
               "attack": lambda: pgd(model, x, y, threat, steps=steps),
               "attack_best": lambda: pgd(model, x, y, threat, steps=steps, best=True),
               "attack_best_dlr": lambda: pgd(model, x, y, threat, steps=steps, best=True, loss="dlr"),
               "at": lambda: train_step(model, optimizer, objective, x, y)}, repeats)
    t_pass, t_input = t["pass"] / steps, t["input"] / steps
    t_attack, t_at = t["attack"], t["at"]
    t_best, t_best_dlr = t["attack_best"], t["attack_best_dlr"]
    return {
        "model": name, "batch": batch, "steps": steps, "device": str(device),
        "train_pass_s": t_pass, "input_grad_pass_s": t_input, "pgd_s": t_attack,
        "pgd_best_s": t_best, "pgd_best_dlr_s": t_best_dlr, "pgd_at_step_s": t_at,
        # judged: against the passes each phase must run
        "pgd_over_k_input_passes": t_attack / (steps * t_input),
        "pgd_best_over_k_input_passes": t_best / (steps * t_input),
        "pgd_best_dlr_over_k_input_passes": t_best_dlr / (steps * t_input),
        "pgd_best_over_pgd": t_best / t_attack,  # the cost of tracking alone (k + 1 forwards: ~1 + 1/3k)
        "pgd_at_over_k_input_plus_1_train_passes": t_at / (steps * t_input + t_pass),
        # for reference: against training passes only
        "pgd_over_k_train_passes": t_attack / (steps * t_pass),
        "pgd_at_over_k_plus_1_train_passes": t_at / ((steps + 1) * t_pass),
        "target": 1.15,
    }


def layout_and_compile(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    """Natural training step: default vs channels_last vs torch.compile."""
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    natural = lambda model, x, y: {"loss": F.cross_entropy(model(x), y)}  # noqa: E731
    results, steps = {}, {}
    for variant in ("default", "channels_last", "compile"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=3, input_size=32).to(device).train()
        inputs = x
        if variant == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runner = torch.compile(model) if variant == "compile" else model
        steps[variant] = (lambda r, o, i: lambda: train_step(r, o, natural, i, y))(runner, optimizer, inputs)
        if variant == "compile":
            start = time.perf_counter()
            steps[variant]()
            results["compile_warmup_s"] = time.perf_counter() - start
    results.update({f"{k}_step_s": v for k, v in timed(steps, repeats).items()})
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
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's own choice, reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip the layout/compile comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "pgd": [measure(m, args.batch, args.repeats, args.steps, device) for m in args.models]}
    if not args.no_compile:
        report["layout_and_compile"] = [layout_and_compile(m, args.batch, args.repeats, device)
                                        for m in args.models]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
