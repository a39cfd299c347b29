"""Evaluation: typed results measured on a named split."""

from cardkit.eval.robustness import RobustnessResult, evaluate_robustness

__all__ = ["RobustnessResult", "evaluate_robustness"]
