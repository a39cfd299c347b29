"""Compression: quantizers, size accounting and the compressed model file."""

from cardkit.compress.size import SizeReport, TensorSize, model_size

__all__ = ["SizeReport", "TensorSize", "model_size"]
