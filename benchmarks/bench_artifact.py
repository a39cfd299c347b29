"""Compressed file size against the accounted size and against the dense fp32 state_dict.

Targets: the `.card` file is at most 1.10 x the accounted size; a 99%-sparse 8-bit cnn_large
and a 95%-sparse biprop cnn_large are at most 1/150 of the dense fp32 state_dict's bytes (the
dense model saved with safetensors). Every file is loaded back and its outputs compared with the
model's. Prints JSON.

    python benchmarks/bench_artifact.py [--model cnn_large]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as save_state

from cardkit.compress import model_size
from cardkit.compress.artifact import load_artifact, save_artifact
from cardkit.models import create_model
from cardkit.prune import method_config, prune_model

VARIANTS = {
    "magnitude-0.99-8bit": ("magnitude", {"sparsity": 0.99, "quantize": {"bits": 8}}),
    "magnitude-0.99-8bit-global": ("magnitude", {"sparsity": 0.99, "scope": "global", "quantize": {"bits": 8}}),
    "magnitude-0.99-4bit-kmeans": ("magnitude", {"sparsity": 0.99, "quantize": {"bits": 4, "scheme": "kmeans"}}),
    "biprop-0.95": ("biprop", {"sparsity": 0.95}),
    "biprop-0.99": ("biprop", {"sparsity": 0.99}),
    "hydra-0.9-8bit-per-channel": ("hydra", {"sparsity": 0.9, "quantize": {"bits": 8, "per_channel": True}}),
    "magnitude-0.9-float32": ("magnitude", {"sparsity": 0.9}),
}


def measure(name: str, method: str, settings: dict, model_name: str, folder: Path) -> dict:
    torch.manual_seed(0)
    dense = create_model(model_name, 10, 3, 32)
    dense_bytes = len(save_state(dense.state_dict()))
    model = prune_model(dense, method_config(method, **settings)).model.eval()
    accounted = model_size(model).bytes
    start = time.perf_counter()
    written = save_artifact(model, folder / f"{name}.card")
    saved = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_artifact(folder / f"{name}.card")
    load_seconds = time.perf_counter() - start
    x = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        exact = torch.equal(loaded(x), model(x))
    return {"variant": name, "artifact_bytes": written, "accounted_bytes": accounted,
            "artifact_over_accounted": written / accounted, "dense_state_dict_bytes": dense_bytes,
            "dense_over_artifact": dense_bytes / written, "outputs_equal": exact,
            "save_seconds": round(saved, 3), "load_seconds": round(load_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_large")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, method, settings, args.model, Path(tmp)) for name, (method, settings) in VARIANTS.items()]
    targets = {
        "artifact_over_accounted_max": max(r["artifact_over_accounted"] for r in rows),
        "dense_over_artifact_magnitude_0.99_8bit": rows[0]["dense_over_artifact"],
        "dense_over_artifact_biprop_0.95": rows[3]["dense_over_artifact"],
        "all_outputs_equal": all(r["outputs_equal"] for r in rows),
    }
    print(json.dumps({"model": args.model, "targets": targets, "variants": rows}, indent=1))


if __name__ == "__main__":
    main()
