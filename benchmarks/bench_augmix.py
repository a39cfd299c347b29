"""Cost of AugMix against a natural training step of the same batch.

Target: AugMix (width 3, random depth 1..3, severity 3) on a 128 x 3 x 32 x 32 batch costs well under
one natural training step of cnn_small (at most 0.5 x). Prints JSON.

    python benchmarks/bench_augmix.py [--batch 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench_attack import timed, train_step
from cardkit.data.augmix import AugMix
from cardkit.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model = create_model("cnn_small", 10, 3, 32).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    natural = lambda model, x, y: {"loss": F.cross_entropy(model(x), y)}  # noqa: E731
    augmix, generator = AugMix(), torch.Generator().manual_seed(0)
    t = timed({"natural": lambda: train_step(model, optimizer, natural, x, y),
               "augmix": lambda: augmix(x, generator)}, args.repeats)
    print(json.dumps({
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "batch": args.batch, "natural_step_s": t["natural"], "augmix_s": t["augmix"],
        "augmix_over_natural": t["augmix"] / t["natural"], "target": 0.5}, indent=2))


if __name__ == "__main__":
    main()
