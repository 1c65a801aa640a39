"""Attention-based multiple-instance learning over frozen cell features: patient-level evaluation."""

from dinov2.eval.mil.data import Bag, BagSet, bags_from_csv, bags_from_paths
from dinov2.eval.mil.model import AttentionMIL, GatedAttention
from dinov2.eval.mil.train import MILConfig, cross_validate, predict_bags, train_fold

__all__ = [
    "AttentionMIL",
    "Bag",
    "BagSet",
    "GatedAttention",
    "MILConfig",
    "bags_from_csv",
    "bags_from_paths",
    "cross_validate",
    "predict_bags",
    "train_fold",
]
