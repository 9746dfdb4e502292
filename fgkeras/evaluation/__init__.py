"""Retrieval evaluation: metrics (Recall@K, P@k, mAP@k, MAP@R), protocols, batch embedding, and
model selection on held-out classes during `fit` (`RetrievalEvaluation`)."""

from fgkeras.evaluation.callbacks import RetrievalEvaluation
from fgkeras.evaluation.embed import embed_dataset
from fgkeras.evaluation.handcrafted import colour_histograms, handcrafted_metrics, pixel_features
from fgkeras.evaluation.identity import few_shot, identity_preservation, knn_top_k
from fgkeras.evaluation.metrics import retrieval_metrics
from fgkeras.evaluation.protocols import closed_set, format_table, growing_inventory, open_set

__all__ = [
    "RetrievalEvaluation",
    "closed_set",
    "colour_histograms",
    "embed_dataset",
    "few_shot",
    "identity_preservation",
    "knn_top_k",
    "format_table",
    "growing_inventory",
    "handcrafted_metrics",
    "open_set",
    "pixel_features",
    "retrieval_metrics",
]
