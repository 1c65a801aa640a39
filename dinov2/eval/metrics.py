"""Classification metrics for the evaluation protocols, computed from confusion matrices.

Every value equals its ``sklearn.metrics`` counterpart (``accuracy_score``,
``balanced_accuracy_score``, ``f1_score(average="weighted")``,
``precision_recall_fscore_support``, ``roc_auc_score``) with ``zero_division=0``;
the tests pin that. Spreads across folds are population standard deviations
(``numpy.std`` with ``ddof=0``, as in DinoBloom's external-test script; its cross-validation script logged
the mean over folds only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUMMARY_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "weighted_f1")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the ``num_classes`` x ``num_classes`` count matrix (rows: true class, columns: prediction)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes}): {np.unique(values).tolist()}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Divide elementwise, giving 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Return per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def summary_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Return accuracy, balanced accuracy and support-weighted F1 of one confusion matrix."""
    total = cm.sum()
    if total == 0:
        raise ValueError("cannot score an empty prediction set")
    scores = per_class_scores(cm)
    support = scores["support"]
    present = support > 0
    return {
        "accuracy": float(np.trace(cm) / total),
        # sklearn averages recall over the classes that occur in y_true only.
        "balanced_accuracy": float(scores["recall"][present].mean()),
        "weighted_f1": float((scores["f1"] * support).sum() / support.sum()),
    }


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic, ties counted as one half."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = 0.5 * (start + end + 1)
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """AUROC: binary uses the positive-class (index 1) probability; multi-class is macro one-vs-rest.

    In the multi-class case the average runs over the classes present in ``y_true``
    (a class absent from a test fold has no ROC curve); ``nan`` when fewer than two
    classes are present.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != y_true.shape[0]:
        raise ValueError(f"probabilities must be (n_samples, n_classes), got {probabilities.shape}")
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return _binary_auroc(y_true == 1, probabilities[:, 1])
    present = np.unique(y_true)
    if present.size < 2:
        return float("nan")
    return float(np.mean([_binary_auroc(y_true == c, probabilities[:, c]) for c in present]))


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population standard deviation (ddof=0) of per-fold values."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=0))}
