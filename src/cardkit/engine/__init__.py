"""The engine: the only part of cardkit that touches the file system."""

from cardkit.engine.pipeline import (Evaluation, certify_checkpoint, RunResult, evaluate_checkpoint, prune_checkpoint,
                                     read_results, run_pipeline)

__all__ = ["Evaluation", "certify_checkpoint", "RunResult", "evaluate_checkpoint", "prune_checkpoint", "read_results", "run_pipeline"]
