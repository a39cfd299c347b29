"""Data loading cost against a natural training step of cnn_small on CIFAR-10.

Target: loading a batch (uint8 -> float on the device, random crop with padding 4, horizontal flip)
costs at most 5% of a natural training step (both in the channels_last layout the engine uses). Both are timed inside the same training loop, batch by
batch. Reads CIFAR-10 from ../shared/data (or --data-dir). Prints JSON.

    python benchmarks/bench_data.py [--batches 100] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cardkit.data import Augmentation, BatchLoader, load_dataset
from cardkit.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(SHARED))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--model", default="cnn_small")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    start = time.perf_counter()
    splits = load_dataset("cifar10", args.data_dir, download=False,
                          train_files=[f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 5)],
                          val_files=["cifar-10-batches-bin/data_batch_5.bin"],
                          test_files=["cifar-10-test-1k/test_batch_first1000.bin"])
    load_seconds = time.perf_counter() - start
    info = splits.info
    # The engine's default layout (model.channels_last: true), for the model and the batches.
    model = create_model(args.model, info.num_classes, info.in_channels, info.input_size,
                         mean=info.mean, std=info.std).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = BatchLoader(splits.train, args.batch, shuffle=True, device=device, drop_last=True,
                         augmentation=Augmentation(crop_padding=4, hflip=True),
                         memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    loading = stepping = 0.0
    batches = iter(loader.epoch(seed=0))
    for index in range(args.batches + 5):
        t0 = time.perf_counter()
        x, y = next(batches)
        sync()
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        t2 = time.perf_counter()
        if index >= 5:  # warm-up batches excluded
            loading += t1 - t0
            stepping += t2 - t1
    print(json.dumps({
        "dataset": "cifar10 (data_batch_1-4)", "train_images": len(splits.train), "model": args.model,
        "batch": args.batch, "batches": args.batches, "device": str(device),
        "dataset_load_s": load_seconds,
        "loading_per_batch_ms": 1000 * loading / args.batches,
        "train_step_per_batch_ms": 1000 * stepping / args.batches,
        "loading_over_step": loading / stepping, "target": 0.05,
    }, indent=2))


if __name__ == "__main__":
    main()
