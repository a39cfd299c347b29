"""Throughput of smoothing certification (noisy samples per second) against plain batched
inference of the same number of inputs. Target: at least 0.8 x. Prints JSON.

    python benchmarks/bench_smoothing.py [--model cnn_small] [--n 10000]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_attack import timed
from cardkit.certify.smoothing import sample_counts
from cardkit.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, 10, 3, 32).to(device).eval()
    x = torch.rand(3, 32, 32, device=device)
    batches = [torch.rand(args.batch, 3, 32, 32, device=device) for _ in range(args.n // args.batch)]

    def plain():
        with torch.no_grad():
            for batch in batches:
                model(batch).argmax(1)

    t = timed({"plain": plain, "smoothing": lambda: sample_counts(model, x, 0.25, args.n, args.batch, 10)},
              args.repeats, warmup=1)
    print(json.dumps({"model": args.model, "device": str(device), "n": args.n, "batch": args.batch,
                      "plain_samples_per_s": args.n / t["plain"],
                      "smoothing_samples_per_s": args.n / t["smoothing"],
                      "smoothing_over_plain_throughput": t["plain"] / t["smoothing"], "target": 0.8},
                     indent=2))


if __name__ == "__main__":
    main()
