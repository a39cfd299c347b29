"""ONNX export (optional extra `cardkit[onnx]`): the model a `.card` file loads as, for runtimes
that read ONNX. ONNX convolutions take dense float32 weights, so this file is for portability,
not size: the `.card` file is the compressed one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cardkit.errors import CardkitError
from cardkit.fileio import output_file

INSTALL = "ONNX export needs the onnx extra: pip install 'cardkit[onnx]' (onnx and onnxruntime)"


def save_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> int:
    """Write `model` (a plain, loaded model) as ONNX with a dynamic batch axis; returns the bytes."""
    _require("onnx")
    path = output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: never a half-written file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter needs no onnxscript; torch flags it as legacy
            torch.onnx.export(model.eval(), (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def onnx_outputs(path: str | Path, images: torch.Tensor) -> np.ndarray:
    """The logits onnxruntime computes for `images` (CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.detach().cpu().numpy()})[0]


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise CardkitError(INSTALL) from None
