"""Evaluation: typed results measured on a named split."""

from cardkit.eval.robustness import RobustnessResult, StageResult, evaluate_robustness

__all__ = ["RobustnessResult", "StageResult", "evaluate_robustness"]
