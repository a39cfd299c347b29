"""Size accounting and compressed files of saved models (`cardkit size`, `cardkit export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from cardkit.compress.artifact import load_artifact, save_artifact
from cardkit.compress.size import SizeReport, model_size
from cardkit.engine.pipeline import _find_checkpoint, model_from_checkpoint
from cardkit.errors import CardkitError
from cardkit.fileio import output_file

FORMATS = ("card", "onnx")


def size_checkpoint(path: str | Path, pointer: str = "last") -> tuple[Path, SizeReport]:
    """The accounted size of a saved model, tensor by tensor."""
    checkpoint = _find_checkpoint(Path(path), pointer)
    return checkpoint.path, model_size(model_from_checkpoint(checkpoint).eval())


def export_checkpoint(path: str | Path, out: str | Path, fmt: str = "card", pointer: str = "last", *,
                      overwrite: bool = False) -> dict:
    """Write a saved model as a compressed `.card` file (or ONNX), load it back and compare the
    outputs on a random batch; returns the file's bytes, the accounted size and that difference.
    An existing `out` is refused unless `overwrite` (results are never silently overwritten); a
    folder, or a path below a file, is refused before any work is done."""
    if fmt not in FORMATS:
        raise CardkitError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = output_file(Path(out), overwrite=overwrite, option="--out")
    checkpoint = _find_checkpoint(Path(path), pointer)
    model = model_from_checkpoint(checkpoint).eval()
    size = model_size(model)
    arch = model.arch
    x = torch.rand(8, arch["in_channels"], arch["input_size"], arch["input_size"],
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    if fmt == "onnx":
        from cardkit.compress.onnx import onnx_outputs, save_onnx

        written = save_onnx(load_artifact_of(model, out), x, out)
        outputs = torch.from_numpy(onnx_outputs(out, x))
    else:
        written = save_artifact(model, out)
        with torch.no_grad():
            outputs = load_artifact(out, max_bytes=None)(x)  # the model just written, already in memory
    return {"checkpoint": str(checkpoint.path), "out": str(out), "format": fmt, "bytes": written,
            "accounted_bytes": size.bytes, "dense_bytes": size.dense_bits // 8,
            "compression_ratio": size.dense_bits / 8 / written,
            "max_abs_difference": float((outputs - expected).abs().max())}


def load_artifact_of(model: torch.nn.Module, out: str | Path) -> torch.nn.Module:
    """The plain model a `.card` file of `model` loads as (what an ONNX export is traced from)."""
    tmp = Path(out).with_name(f".{Path(out).name}.card.tmp")
    try:
        save_artifact(model, tmp)
        return load_artifact(tmp, max_bytes=None)
    finally:
        tmp.unlink(missing_ok=True)
