"""The corruption suite on CIFAR-10: every corruption at every severity on the 10,000 test images.

Target: the 15 benchmark corruptions x 5 severities in at most 3 minutes on 2 cores, within 4 GB
(peak resident memory). Uses 10,000 real CIFAR-10 images (data_batch_5, the held-out split of
../shared/data) when they are found (--data-dir), else random images of the same shape. Prints JSON with the seconds per corruption (all 5 severities).

    python benchmarks/bench_corruptions.py [--data-dir ../shared/data] [--images 10000] [--extras]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from cardkit.corrupt import BENCHMARK, EXTRAS, SEVERITIES, corrupt
from cardkit.data import load_dataset
from cardkit.errors import CardkitError


def cifar_test_images(data_dir: Path, n: int) -> tuple[np.ndarray, str]:
    try:
        batch = "cifar-10-batches-bin/data_batch_5.bin"
        test = load_dataset("cifar10", data_dir, download=False, train_files=[batch], test_files=[batch]).test
        return test.images[:n].permute(0, 2, 3, 1).contiguous().numpy(), "cifar10 data_batch_5"
    except CardkitError:
        return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--extras", action="store_true", help="also time the 4 held-out corruptions")
    args = parser.parse_args()
    images, source = cifar_test_images(Path(args.data_dir), args.images)
    names = BENCHMARK + (EXTRAS if args.extras else ())
    seconds = {}
    for name in names:
        start = time.perf_counter()
        for severity in SEVERITIES:
            corrupt(images, name, severity, seed=0)
        seconds[name] = time.perf_counter() - start
    benchmark_total = sum(seconds[n] for n in BENCHMARK)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({
        "images": len(images), "source": source, "threads": torch.get_num_threads(),
        "seconds_per_corruption": {k: round(v, 2) for k, v in seconds.items()},
        "benchmark_total_seconds": round(benchmark_total, 1), "target_seconds": 180,
        "peak_rss_gb": round(peak_gb, 2), "target_gb": 4.0,
        "meets_target": benchmark_total <= 180 and peak_gb <= 4.0}, indent=1))


if __name__ == "__main__":
    main()
