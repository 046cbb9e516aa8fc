"""Evaluation metrics (retrieval recall@k and ranks)."""

from vlkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_ranks

__all__ = ["RetrievalMetrics", "retrieval_metrics", "retrieval_ranks"]
