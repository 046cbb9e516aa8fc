"""Evaluation metrics: retrieval recall@k and ranks, classification accuracy and confusion."""

from vlkit.metrics.classification import ClassificationMetrics, classification_metrics, confusion_matrix, topk_accuracy
from vlkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_ranks

__all__ = ["ClassificationMetrics", "RetrievalMetrics", "classification_metrics", "confusion_matrix",
           "retrieval_metrics", "retrieval_ranks", "topk_accuracy"]
