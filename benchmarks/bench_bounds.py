"""Cost of certified training steps against a natural training step of the same model.

Targets: an IBP step at most 3 x a natural step (batch 128); a CROWN-IBP step of cnn_small at most
10 x; a CROWN-IBP step of cnn_large at batch 64 within 4 GB (peak resident memory growth, CPU).
Prints JSON.

    python benchmarks/bench_bounds.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.nn.functional as F

from bench_attack import timed, train_step
from cardkit.attacks import Threat
from cardkit.models import create_model
from cardkit.objectives import CrownIBPConfig, IBPConfig, build_objective

THREAT = Threat("linf", 8 / 255)


def steps_for(name: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    natural = lambda model, x, y: {"loss": F.cross_entropy(model(x), y)}  # noqa: E731
    fns = {}
    for label, objective in (("natural", natural), ("ibp", build_objective(IBPConfig(), THREAT)),
                             ("crown_ibp", build_objective(CrownIBPConfig(beta_start=1, beta_end=1), THREAT))):
        model = create_model(name, 10, 3, 32).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        fns[label] = (lambda m, o, f: lambda: train_step(m, o, f, x, y))(model, optimizer, objective)
    return fns


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"torch": torch.__version__, "device": str(device), "results": []}
    # Memory first: peak resident memory only grows, so later timings would hide it.
    before = peak_rss_gb()
    fn = steps_for("cnn_large", 64, device)["crown_ibp"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn()
    memory = {"peak_rss_gb": peak_rss_gb(), "rss_growth_gb": peak_rss_gb() - before}
    if device.type == "cuda":
        memory["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    report["crown_ibp_cnn_large_batch64_memory"] = {**memory, "target_gb": 4.0}
    for name in ("cnn_small", "cnn_large"):
        t = timed(steps_for(name, 128, device), args.repeats)
        report["results"].append({
            "model": name, "batch": 128, **{f"{k}_step_s": v for k, v in t.items()},
            "ibp_over_natural": t["ibp"] / t["natural"], "crown_ibp_over_natural": t["crown_ibp"] / t["natural"],
            "targets": {"ibp_over_natural": 3.0, "crown_ibp_over_natural (cnn_small)": 10.0}})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
