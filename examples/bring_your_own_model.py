"""Bring your own model: a CNN that cardkit's registry does not know, adversarially trained with
TRADES, pruned to 99% sparsity with HYDRA under TRADES, fine-tuned under its mask, evaluated with
PGD then AutoAttack, exported as a .card file and loaded back into a fresh instance, with
bitwise the same outputs. Digits data (bundled with scikit-learn); about two minutes on one
thread, most of it AutoAttack.

    python examples/bring_your_own_model.py [--out net.card] [--test-points N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cardkit
from cardkit.data import load_dataset


class Net(nn.Module):
    """Two conv + BatchNorm blocks and two linear layers, for 8 x 8 grey images in [0, 1]."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def main(out: str | Path, test_points: int | None = None) -> dict:
    """Train, prune, evaluate (on the first `test_points` test images, default all), export."""
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)  # 1,437 training and 360 test images
    test = (data.test.images[:test_points], data.test.labels[:test_points])
    trades, eps = cardkit.TradesConfig(beta=6.0, steps=5), 0.1
    net = Net()
    cardkit.fit(net, data.train, trades, eps=eps, epochs=10, optimizer=cardkit.OptimizerConfig(lr=0.05))
    dense = cardkit.evaluate(net, test, eps=eps, attacks=[cardkit.PGDAttackConfig(steps=20)])

    hydra = cardkit.HydraConfig(sparsity=0.99, scope="global")  # scores trained under TRADES
    pruned = cardkit.compress_(net, hydra, data=data.train, objective=trades, eps=eps, epochs=5)
    cardkit.fit(pruned.model, data.train, trades, eps=eps, epochs=5, group=pruned.group,
                  optimizer=cardkit.OptimizerConfig(lr=0.01))
    attacks = [cardkit.PGDAttackConfig(steps=20), cardkit.AutoAttackConfig(version="standard")]
    result = cardkit.evaluate(pruned.model, test, eps=eps, attacks=attacks)

    written = cardkit.export(pruned.model, out)
    loaded = cardkit.load_artifact(out, model=Net())  # a fresh instance; nothing is unpickled
    x = test[0].float() / 255
    with torch.no_grad():
        same = torch.equal(loaded(x), pruned.model.eval()(x))
    return {"dense_clean": dense.clean_accuracy, "dense_pgd": dense.robust_accuracy,
            "clean": result.clean_accuracy, "robust": result.robust_accuracy,
            "stages": {s.attack: s.robust_accuracy for s in result.stages},
            "kept_weights": sum(int(layer.mask.sum()) for layer in pruned.group.layers),
            "weights": sum(layer.mask.numel() for layer in pruned.group.layers),
            "file_bytes": written, "dense_bytes": cardkit.size(pruned.model).dense_bits // 8,
            "loaded_outputs_equal": same}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the .card file (default: a temporary folder)")
    parser.add_argument("--test-points", type=int, help="evaluate on the first N test images (default: all 360)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(main(args.out or Path(folder) / "net.card", args.test_points), indent=2))
