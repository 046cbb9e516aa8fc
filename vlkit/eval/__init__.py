"""Evaluation of trained models (retrieval, zero-shot classification, linear probe) and its HTML report."""

from vlkit.eval.evaluate import TASKS, EvalResult, evaluate

__all__ = ["TASKS", "EvalResult", "evaluate"]
