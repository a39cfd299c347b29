"""The engine: the only part of cardkit that touches the file system."""

from cardkit.engine.importer import ImportResult, import_checkpoint
from cardkit.engine.pipeline import (Evaluation, RunResult, certify_checkpoint, evaluate_checkpoint,
                                     fourier_checkpoint, prune_checkpoint, read_results, run_pipeline)

__all__ = ["Evaluation", "ImportResult", "RunResult", "certify_checkpoint", "evaluate_checkpoint", "fourier_checkpoint",
           "import_checkpoint", "prune_checkpoint", "read_results", "run_pipeline"]
