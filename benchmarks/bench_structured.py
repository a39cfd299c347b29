"""CPU inference time of dense models against their structurally pruned (rebuilt) versions.

Target: removing 75% of the output channels of every prunable layer (layer scope) makes inference
at least 2.5x faster for cnn_large and vgg16_bn. resnet18 loses channels only inside its residual
blocks (the other convs feed additions), so it is reported but not held to the target. Dense and
rebuilt forwards alternate, so a drifting machine load hits both alike; the median is reported.
Each model is timed with one CPU thread (stable on a shared machine) and with torch's default
thread count. Prints JSON.

    python benchmarks/bench_structured.py [--repeats 15] [--batch 128] [--threads 1 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cardkit.models import create_model
from cardkit.prune.structured import channel_masks, rebuild

MODELS = ("cnn_large", "vgg16_bn", "resnet18")
TARGET = 2.5


def forward_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@torch.no_grad()
def compare(name: str, sparsity: float, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = create_model(name, num_classes=10, in_channels=3, input_size=32).eval()
    smaller = rebuild(dense, channel_masks(dense, sparsity)).eval()
    x = torch.rand(batch, 3, 32, 32)
    for model in (dense, smaller):  # warm-up: allocator and kernel selection
        forward_seconds(model, x)
    times = {"dense": [], "rebuilt": []}
    for _ in range(repeats):
        times["dense"].append(forward_seconds(dense, x))
        times["rebuilt"].append(forward_seconds(smaller, x))
    dense_s, rebuilt_s = (statistics.median(times[k]) for k in ("dense", "rebuilt"))
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, smaller)]
    return {"model": name, "dense_ms": round(1e3 * dense_s, 2), "rebuilt_ms": round(1e3 * rebuilt_s, 2),
            "speedup": round(dense_s / rebuilt_s, 2), "dense_params": params[0], "rebuilt_params": params[1],
            "pruned_layers": len(smaller.arch["structured"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        results += [{"threads": threads, **compare(name, args.sparsity, args.batch, args.repeats)}
                    for name in args.models]
    held = [r for r in results if r["model"] != "resnet18"]
    print(json.dumps({"device": "cpu", "batch": args.batch, "sparsity": args.sparsity, "scope": "layer",
                      "repeats": args.repeats, "target_speedup": TARGET,
                      "meets_target": all(r["speedup"] >= TARGET for r in held), "results": results}, indent=2))


if __name__ == "__main__":
    main()
