"""Mixed precision on CUDA: a bf16 PGD-AT training step of resnet18 against the fp32 step, and the
samples/s of PGD-AT steps of resnet18 and wrn_28_4 at batch 128 and 512 in fp32 and bf16, through
cardkit's Trainer (`precision:`; PGD-10 inside the step, channels_last). Medians of the step
intervals after warm-up steps. Prints JSON; on a machine without CUDA it says so and runs the
smallest case on the CPU, so the script itself stays tested.

    python benchmarks/bench_precision.py [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from types import SimpleNamespace

import torch

from bench_distributed import step_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cases = [(m, b) for m in ("resnet18", "wrn_28_4") for b in (128, 512)] if cuda else [("cnn_small", 16)]
    steps, warmup = (args.steps, args.warmup) if cuda else (2, 1)
    rows = []
    for model, batch in cases:
        row = {"model": model, "batch": batch}
        for precision in ("fp32", "bf16"):
            times = step_times(SimpleNamespace(model=model, batch=batch, steps=steps, warmup=warmup),
                               precision=precision, device=device)
            row[f"{precision}_step_seconds"] = round(statistics.median(times), 4)
            row[f"{precision}_samples_per_second"] = round(batch / statistics.median(times), 1)
        row["bf16_step_over_fp32_step"] = round(row["bf16_step_seconds"] / row["fp32_step_seconds"], 3)
        rows.append(row)
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA here: a smoke run)",
                      "pgd_steps": 10, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
