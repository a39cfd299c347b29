"""Compression accounting (and, with it, the compressed file formats)."""

from cardkit.compress.size import LayerSize, SizeReport, model_size

__all__ = ["LayerSize", "SizeReport", "model_size"]
