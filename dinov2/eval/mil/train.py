"""Training and patient-level cross-validation of the attention MIL model.

Recipe (after SCEMILA and CLAM): SGD with Nesterov momentum 0.9, lr 1e-3, a cosine
schedule over at most 150 epochs, early stopping when the validation loss has not improved
for 20 epochs (the best model is kept). Patients are split by ``StratifiedKFold`` (default
5); inside each fold a stratified share of the training patients is held out for early
stopping and the fold's held-out patients are the test set, so every patient is tested
once. Seeded; on CPU a run is bit-for-bit repeatable. DinoBloom's published MIL script
(``wbc_mil.py``) differs: a non-gated tanh attention per class, Adam at lr 1e-3 for 150
epochs with batch 1, and 4-fold train/validation splits around a fixed test set.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dinov2.eval import metrics, protocol
from dinov2.eval.mil.data import Bag, BagSet, check_bags, collate
from dinov2.eval.mil.model import AttentionMIL

logger = logging.getLogger(__name__)


@dataclass
class MILConfig:
    """Model and optimisation settings of the MIL evaluation."""

    hidden_dim: int = field(default=512, metadata={"help": "width of the cell-feature projection"})
    attention_dim: int = field(default=256, metadata={"help": "width of the gated attention's hidden layer"})
    dropout: float = field(default=0.25, metadata={"help": "dropout after the projection and in the attention"})
    lr: float = field(default=1e-3, metadata={"help": "SGD learning rate (Nesterov), cosine schedule to 0"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    epochs: int = field(default=150, metadata={"help": "most epochs per fold"})
    patience: int = field(default=20, metadata={"help": "early stopping: epochs without a lower validation loss"})
    batch_size: int = field(default=1, metadata={"help": "bags per optimiser step"})
    n_splits: int = field(default=5, metadata={"help": "folds of the stratified k-fold over patients"})
    val_fraction: float = field(
        default=0.2,
        metadata={"help": "share of each fold's training patients kept for early stopping (not with "
                          "--test-patients, where each fold's held-out part of the other patients is its validation "
                          "set)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the folds, the initialisation and the bag order"})

    def __post_init__(self) -> None:
        at_least_one = ("hidden_dim", "attention_dim", "epochs", "patience", "batch_size")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


@dataclass
class FoldRun:
    """A trained fold model and how its training went."""

    model: AttentionMIL
    best_epoch: int
    epochs_run: int
    best_val_loss: float


def _batches(bags: Sequence[Bag], batch_size: int, generator: torch.Generator) -> list[list[Bag]]:
    """Bags shuffled with ``generator`` and grouped into training batches."""
    ordered = [bags[i] for i in torch.randperm(len(bags), generator=generator).tolist()]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


#: Padded cells (bags x their longest bag) in one evaluation batch: a bag of thousands of cells is not padded into
#: 31 others' rows (at 1024 features, 65,536 cells are 256 MB).
EVAL_CELL_BUDGET = 65_536


def _evaluation_batches(bags: Sequence[Bag], batch_size: int) -> list[list[int]]:
    """Positions of ``bags`` in batches of similar sizes: at most ``batch_size`` bags, and at most
    ``EVAL_CELL_BUDGET`` padded cells unless one bag alone has more."""
    order = sorted(range(len(bags)), key=lambda i: bags[i].features.shape[0])
    batches: list[list[int]] = []
    for i in order:
        longest = bags[i].features.shape[0]  # (in size order: the new bag is the batch's longest)
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * longest <= EVAL_CELL_BUDGET:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def predict_bags(
    model: AttentionMIL, bags: Sequence[Bag], device: torch.device | str = "cpu", batch_size: int = 32
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n_bags, C) and each bag's attention weights over its cells, in the order of ``bags``."""
    model.eval()
    probabilities: list[np.ndarray] = [np.empty(0)] * len(bags)
    attention: list[np.ndarray] = [np.empty(0)] * len(bags)
    for positions in _evaluation_batches(bags, batch_size):
        batch = [bags[i] for i in positions]
        x, mask, _ = collate(batch, device)
        logits, weights = model(x, mask)
        batch_probabilities = torch.softmax(logits, dim=1).cpu().numpy()
        for row, i in enumerate(positions):
            probabilities[i] = batch_probabilities[row]
            attention[i] = weights[row, : bags[i].features.shape[0]].cpu().numpy()
    return np.stack(probabilities).astype(np.float64), attention


@torch.no_grad()
def _mean_loss(model: AttentionMIL, bags: Sequence[Bag], device: torch.device | str) -> float:
    """Mean cross-entropy of the model over bags, in eval mode."""
    model.eval()
    total = 0.0
    for positions in _evaluation_batches(bags, 32):
        x, mask, labels = collate([bags[i] for i in positions], device)
        logits, _ = model(x, mask)
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return total / len(bags)


def train_fold(
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    num_classes: int,
    config: MILConfig,
    seed: int,
    device: torch.device | str = "cpu",
) -> FoldRun:
    """Train one model with SGD-Nesterov and a cosine schedule; keep the state of lowest validation loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    in_dim = train_bags[0].features.shape[1]
    model = AttentionMIL(in_dim, num_classes, config.hidden_dim, config.attention_dim, config.dropout).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    best_loss, best_epoch, best_state = math.inf, -1, copy.deepcopy(model.state_dict())
    epoch = 0
    for epoch in range(config.epochs):
        model.train()
        for batch in _batches(train_bags, config.batch_size, generator):
            x, mask, labels = collate(batch, device)
            logits, _ = model(x, mask)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_loss = _mean_loss(model, val_bags, device)
        if not math.isfinite(val_loss):  # a NaN never compares lower: the untrained model would be kept
            raise FloatingPointError(
                f"the validation loss is {val_loss} after epoch {epoch + 1}: training diverged (try a lower --lr)"
            )
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    return FoldRun(model, best_epoch, epoch + 1, best_loss)


def _validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) positions within a fold's training patients."""
    from sklearn.model_selection import train_test_split

    num_classes = np.unique(labels).size
    n_val = max(num_classes, int(round(fraction * labels.size)))
    counts = np.bincount(labels)
    problem = (
        f"cannot hold out a stratified validation set from {labels.size} training patients "
        f"(patients per class: {counts.tolist()})"
    )
    if counts[counts > 0].min() < 2 or labels.size - n_val < num_classes:
        raise ValueError(f"{problem}; use fewer folds or more patients")
    positions = np.arange(labels.size)
    train, val = train_test_split(positions, test_size=n_val, stratify=labels, random_state=seed)
    if np.bincount(labels[train], minlength=counts.size)[counts > 0].min() == 0:  # a class held out entirely
        raise ValueError(f"{problem} that leaves every class a patient to train on; lower --val-fraction "
                         f"({fraction})")  # fmt: skip
    return np.sort(train), np.sort(val)


#: One fold: the positions of the patients it trains on, those that select its epoch, and those it tests on.
FoldPlan = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def cross_validation_plan(labels: np.ndarray, config: MILConfig) -> FoldPlan:
    """Stratified k-fold over all patients; each fold holds out ``val_fraction`` of its training patients."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=config.n_splits, shuffle=True, random_state=config.seed)
    plan = []
    for fold, (train_index, test_index) in enumerate(splitter.split(np.zeros(labels.size), labels)):
        fit, val = _validation_split(labels[train_index], config.val_fraction, config.seed + fold)
        plan.append((train_index[fit], train_index[val], test_index))
    return plan


def fixed_test_plan(labels: np.ndarray, test_index: np.ndarray, config: MILConfig) -> FoldPlan:
    """The given test patients for every fold; stratified k-fold over the others gives each fold's training and
    validation patients (DeepAPL's discovery/validation protocol, and DinoBloom's fixed test set)."""
    from sklearn.model_selection import StratifiedKFold

    rest = np.setdiff1d(np.arange(labels.size), test_index)
    splitter = StratifiedKFold(n_splits=config.n_splits, shuffle=True, random_state=config.seed)
    return [(rest[fit], rest[val], test_index) for fit, val in splitter.split(np.zeros(rest.size), labels[rest])]


def patient_positions(bag_set: BagSet, patients: Sequence[str], source: str) -> np.ndarray:
    """Positions of ``patients`` in ``bag_set``; a name without a bag is an error that names it."""
    if not patients:
        raise ValueError(f"{source}: no test patients listed")
    position = {bag.patient: i for i, bag in enumerate(bag_set.bags)}
    unknown = sorted(set(patients) - position.keys())
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} test patients have no bag, e.g. {unknown[:3]}")
    return np.array(sorted(position[p] for p in set(patients)))


def _checked_plan(bag_set: BagSet, config: MILConfig, source: str, test_index: np.ndarray | None) -> FoldPlan:
    """The folds of :func:`cross_validate`, once the bags it trains on are checked (:func:`check_bags`)."""
    labels = bag_set.labels
    if test_index is None:
        check_bags(bag_set, config.n_splits, source)
        return cross_validation_plan(labels, config)
    training = np.setdiff1d(np.arange(labels.size), test_index)
    check_bags(BagSet([bag_set.bags[i] for i in training], bag_set.class_names), config.n_splits, source)
    return fixed_test_plan(labels, test_index, config)


def _attention_records(
    bags: Sequence[Bag], probabilities: np.ndarray, attention: Sequence[np.ndarray], class_names: Sequence[str],
    fold: int,
) -> list[dict[str, Any]]:
    """One record per tested patient: label, prediction, probabilities and every cell, highest attention first."""
    records = []
    for bag, prob, weights in zip(bags, probabilities, attention):
        ranked = np.argsort(-weights, kind="stable")
        records.append(
            {
                "patient": bag.patient,
                "label": class_names[bag.label],
                "prediction": class_names[int(prob.argmax())],
                "fold": fold,
                "probabilities": dict(zip(class_names, prob.tolist())),
                "cells": [{"path": bag.paths[i], "attention": float(weights[i])} for i in ranked],
            }
        )
    return records


def _ensemble_scores(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Summary scores and AUROC of the fold models' mean probabilities on the fixed test patients, with their
    ``per_class`` scores and ``confusion_matrix``."""
    scores = protocol.score_folds([labels], [probabilities.argmax(axis=1)], class_names, [0])
    return {
        **{name: scores[name]["mean"] for name in metrics.SUMMARY_METRICS},
        "auroc": metrics.auroc(labels, probabilities),
        "per_class": scores["per_class"],
        "confusion_matrix": scores["confusion_matrix"],
    }


def cross_validate(
    bag_set: BagSet,
    config: MILConfig,
    device: torch.device | str = "cpu",
    source: str = "bags",
    progress: bool = False,
    test_index: np.ndarray | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """Patient-level k-fold CV; returns the ``abmil`` results, per-patient attention records, probabilities.

    The probabilities are (patients, classes): each patient's from the fold model that tested it. With
    ``test_index`` (positions of a fixed test set) every fold's model is tested on those patients and trained on
    the others; the scores are then the mean over the fold models, a test patient's probabilities the mean of
    theirs, and other patients' rows are NaN. The per-class scores and the confusion matrix are then those of the
    mean probabilities' predictions, whose summary scores are in ``ensemble``.
    """
    labels = bag_set.labels
    folds = _checked_plan(bag_set, config, source, test_index)
    num_classes = len(bag_set.class_names)
    truths, preds, n_train, fold_extra, records = [], [], [], [], []
    probability_sums = np.zeros((labels.size, num_classes))
    times_tested = np.zeros(labels.size)
    for fold, (fit, val, test) in enumerate(tqdm(folds, desc="MIL folds", disable=not progress)):
        try:
            run = train_fold(
                [bag_set.bags[i] for i in fit],
                [bag_set.bags[i] for i in val],
                num_classes,
                config,
                seed=config.seed + fold,
                device=device,
            )
        except FloatingPointError as err:
            raise FloatingPointError(f"MIL fold {fold}: {err}") from None
        test_bags = [bag_set.bags[i] for i in test]
        probabilities, attention = predict_bags(run.model, test_bags, device)
        fold_pred = probabilities.argmax(axis=1)
        probability_sums[test] += probabilities
        times_tested[test] += 1
        truths.append(labels[test])
        preds.append(fold_pred)
        n_train.append(fit.size)
        fold_extra.append(
            {
                "auroc": metrics.auroc(labels[test], probabilities),
                "n_val": int(val.size),
                "best_epoch": run.best_epoch + 1,
                "epochs_run": run.epochs_run,
                "best_val_loss": run.best_val_loss,
            }
        )
        records.extend(_attention_records(test_bags, probabilities, attention, bag_set.class_names, fold))
        fold_scores = metrics.summary_from_confusion(metrics.confusion_matrix(labels[test], fold_pred, num_classes))
        logger.info("fold %d: balanced accuracy %.4f, AUROC %.4f (best epoch %d of %d)", fold,
                    fold_scores["balanced_accuracy"], fold_extra[-1]["auroc"], run.best_epoch + 1, run.epochs_run)
    with np.errstate(invalid="ignore"):  # patients no fold tested: 0 / 0, NaN
        mean_probabilities = probability_sums / times_tested[:, None]
    result = protocol.score_folds(truths, preds, bag_set.class_names, n_train)
    for entry, extra in zip(result["per_fold"], fold_extra):
        entry.update(extra)
    result["auroc"] = metrics.mean_std([f["auroc"] for f in fold_extra])
    if test_index is not None:
        # Each test patient once: the per-class scores and the confusion matrix of the mean-probability predictions
        # (those of predictions.csv), not the fold models' predictions pooled, which count every patient k times.
        ensemble = _ensemble_scores(labels[test_index], mean_probabilities[test_index], bag_set.class_names)
        result["per_class"], result["confusion_matrix"] = ensemble.pop("per_class"), ensemble.pop("confusion_matrix")
        result["ensemble"] = ensemble
    result["config"] = asdict(config)
    records.sort(key=lambda r: r["patient"])
    return result, records, mean_probabilities
