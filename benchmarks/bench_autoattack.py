"""cardkit's AutoAttack (split into stages, per-point flags, resume state) against calling the
official pyautoattack directly on the same model and points. Prints JSON; the ratio is of timings
taken in the same run, interleaved."""

from __future__ import annotations

import argparse
import json
import time

import torch

from cardkit.attacks import AutoAttackConfig, Threat
from cardkit.eval import evaluate_robustness
from cardkit.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", default=["apgd-ce", "apgd-t"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pyautoattack import AutoAttack

    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.rand(args.points, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correct, so every point is attacked
    eps, config = 0.1, AutoAttackConfig(version="custom", attacks=args.attacks)
    saved = []

    def ours():
        evaluate_robustness(model, x, y, Threat("linf", eps), [config], batch_size=500,
                            checks=False, save=saved.append)

    def direct():
        runner = AutoAttack(model, eps=eps, norm="Linf", version="custom", attacks=args.attacks, seed=0)
        runner.verbose = False
        runner.run_standard_evaluation(x, y, batch_size=500)

    times = {"cardkit": [], "pyautoattack": []}
    for _ in range(args.repeats):
        for name, fn in (("cardkit", ours), ("pyautoattack", direct)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(json.dumps({"points": args.points, "attacks": args.attacks, "threads": args.threads,
                      "seconds": times, "ratio_of_fastest": best["cardkit"] / best["pyautoattack"],
                      "ratio_of_medians": median["cardkit"] / median["pyautoattack"], "target": 1.05},
                     indent=1))


if __name__ == "__main__":
    main()
