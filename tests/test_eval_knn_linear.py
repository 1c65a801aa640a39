"""kNN and linear probe against scikit-learn, the fold protocol, metrics and input errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from dinov2.cli import run_cli
from dinov2.eval import knn, linear, metrics, protocol
from dinov2.eval.features_io import FeatureSet, save_features
from dinov2.files import atomic_write


pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 features around random class centres, like CLS embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _sklearn_knn(train_x, train_y, test_x, k, metric="minkowski"):
    return KNeighborsClassifier(n_neighbors=k, metric=metric).fit(train_x, train_y).predict(test_x)


def _our_knn(train_x, train_y, test_x, ks, **kwargs):
    scores = knn.knn_probabilities(train_x, train_y, test_x, ks=ks, num_classes=int(train_y.max()) + 1, **kwargs)
    return {k: s.argmax(axis=1) for k, s in scores.items()}


@pytest.mark.parametrize("n_test", [60, 700])  # fewer / more queries than training samples
def test_knn_equals_sklearn_on_random_features(n_test: int) -> None:
    x, y = _clusters(400 + n_test, 24, 5, spread=2.0, seed=0)
    ours = _our_knn(x[:400], y[:400], x[400:], (1, 20))
    for k in (1, 20):
        np.testing.assert_array_equal(ours[k], _sklearn_knn(x[:400], y[:400], x[400:], k))
    ours_proba = knn.knn_probabilities(x[:400], y[:400], x[400:], ks=(1, 20), num_classes=5)
    for k in (1, 20):  # each k's vote fractions, asked for together
        proba = KNeighborsClassifier(n_neighbors=k).fit(x[:400], y[:400]).predict_proba(x[400:])
        np.testing.assert_allclose(ours_proba[k], proba, atol=1e-12)


def _tied_data(seed: int, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small-integer features (exact in float64): many equal distances and equal vote counts."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-1, 2, size=(n_train // 4, 20)).astype(np.float32)
    train = np.repeat(base, 4, axis=0)[rng.permutation(n_train // 4 * 4)]
    labels = rng.integers(0, 4, train.shape[0])
    test = rng.integers(-1, 2, size=(n_test, 20)).astype(np.float32)
    return train, labels, test


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_test", [50, 900])
def test_knn_equals_sklearn_with_distance_and_vote_ties(threads: int, n_test: int) -> None:
    train, labels, test = _tied_data(seed=threads + n_test, n_train=600, n_test=n_test)
    sq = ((test[:, None, :].astype(np.float64) - train[None]) ** 2).sum(-1)
    kth = np.sort(sq, axis=1)
    # the data really tie across the k-th neighbour, for k = 1 and 20
    assert (kth[:, 0] == kth[:, 1]).mean() > 0.3 and (kth[:, 19] == kth[:, 20]).mean() > 0.3
    with threadpool_limits(threads, user_api="openmp"):
        ours = _our_knn(train, labels, test, (1, 20))
        for k in (1, 20):
            np.testing.assert_array_equal(ours[k], _sklearn_knn(train, labels, test, k), err_msg=f"k={k}")
    counts = np.stack([np.bincount(r, minlength=4) for r in labels[np.argsort(sq, axis=1, kind="stable")[:, :20]]])
    assert ((counts == counts.max(1, keepdims=True)).sum(1) > 1).any(), "no vote ties exercised"


def test_knn_equals_sklearn_through_the_fold_protocol() -> None:
    x, y = _clusters(500, 48, 6, spread=3.0, seed=3)
    output = protocol.run_protocol(
        x, y, [f"c{i}" for i in range(6)], lambda a, b, c, n: {"knn_20": knn.knn_probabilities(a, b, c, (20,), n)[20]}
    )
    expected = np.empty_like(y)
    for train, test in StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y):
        expected[test] = _sklearn_knn(x[train], y[train], x[test], 20)
    np.testing.assert_array_equal(output.predictions["knn_20"], expected)


def test_knn_cosine_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 16)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(500, 1)).astype(np.float32)
    y = rng.integers(0, 3, 500)
    ours = _our_knn(x[:400], y[:400], x[400:], (1, 20), metric="cosine")
    for k in (1, 20):
        np.testing.assert_array_equal(ours[k], _sklearn_knn(x[:400], y[:400], x[400:], k, metric="cosine"))


def test_knn_temperature_weighting_is_dinov2_vote() -> None:
    """DINOv2's scores: one softmax over the neighbours of the largest k, each k summing its k nearest's weights."""
    x, y = _clusters(300, 16, 4, spread=2.0, seed=5)
    train, train_y, test = x[:250], y[:250], x[250:]
    ks = (1, 5, 10)
    scores = knn.knn_probabilities(train, train_y, test, ks, 4, metric="cosine", weighting="temperature")
    unit = [a.astype(np.float64) / np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True) for a in (test, train)]
    sims = unit[0] @ unit[1].T
    top = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    weights = np.exp(np.take_along_axis(sims, top, 1) / 0.07)
    weights /= weights.sum(1, keepdims=True)
    for k in ks:
        expected = np.zeros((50, 4))
        for c in range(4):
            expected[:, c] = (weights[:, :k] * (train_y[top[:, :k]] == c)).sum(1)
        np.testing.assert_allclose(scores[k], expected, atol=1e-9, err_msg=f"k={k}")


def test_knn_chunking_does_not_change_predictions() -> None:
    x, y = _clusters(300, 16, 3, spread=2.0, seed=6)
    small = knn.knn_probabilities(x[:200], y[:200], x[200:], (1, 20), 3, batch_size=7)
    large = knn.knn_probabilities(x[:200], y[:200], x[200:], (1, 20), 3, batch_size=1000)
    for k in (1, 20):
        np.testing.assert_array_equal(small[k], large[k])


def test_knn_rejects_k_above_training_size() -> None:
    x, y = _clusters(30, 8, 2, spread=1.0, seed=7)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 20\] \(the number of training images of this split or"):
        knn.knn_probabilities(x[:20], y[:20], x[20:], (1, 25), 2)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [("temperature", {"temperature": 0.0}), ("temperature", {"temperature": -0.07}),
     ("temperature", {"temperature": float("nan")}), ("batch_size", {"batch_size": 0})],
)
def test_knn_rejects_nonpositive_temperature_and_batch_size(option: str, kwargs: dict) -> None:
    x, y = _clusters(30, 8, 2, spread=1.0, seed=7)
    with pytest.raises(ValueError, match=f"^{option} must be"):
        knn.knn_probabilities(x[:20], y[:20], x[20:], (1, 3), 2, metric="cosine", weighting="temperature", **kwargs)


@pytest.mark.parametrize("backend", linear.BACKENDS)
@pytest.mark.parametrize("C", [0.0, -1.0])
def test_linear_probe_rejects_nonpositive_C(backend: str, C: float) -> None:
    x, y = _clusters(30, 8, 3, spread=1.0, seed=9)
    fit = {"sklearn": linear.logreg_sklearn, "torch": linear.logreg_torch}[backend]
    with pytest.raises(ValueError, match=r"^C must be > 0"):
        fit(x[:20], y[:20], x[20:], 3, C=C)


def test_logreg_sklearn_backend_is_dinobloom_logistic_regression() -> None:
    x, y = _clusters(300, 32, 4, spread=3.0, seed=8)
    ours = linear.logreg_sklearn(x[:240], y[:240], x[240:], 4)
    x = x.astype(np.float64)  # DinoBloom's features reached scikit-learn as Python lists, i.e. float64
    reference = LogisticRegression(C=32 * 4 / 100, max_iter=1000).fit(x[:240], y[:240])
    np.testing.assert_array_equal(ours.argmax(1), reference.predict(x[240:]))
    np.testing.assert_allclose(ours, reference.predict_proba(x[240:]), atol=1e-12)


def test_a_probe_that_cannot_start_on_nearly_constant_features_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Features of a barely trained model (standard deviation 5e-5): the fit barely moves from zero weights and every
    prediction is the most frequent class; the chance-level score is said to come from the features."""
    x, y = _clusters(60, 16, 3, spread=3.0, seed=2)
    flat = (x - x.mean(axis=0)) / x.std(axis=0) * 5e-5  # the same clusters, 5e-5 wide
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.linear"):
        linear.logreg_sklearn(flat, y, flat[:5], 3)
    assert "predicts one class for all 5 test samples: features that barely vary (standard deviation 5.0e-05" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.linear"):
        linear.logreg_sklearn(x, y, x[:5], 3)
    assert "barely vary" not in caplog.text


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_two_class_probe_is_dinobloom_multinomial_fit(backend: str) -> None:
    """Two classes: DinoBloom's two-row softmax model, fitted here by scipy from its objective."""
    from scipy.optimize import minimize

    x, y = _clusters(160, 6, 2, spread=1.0, seed=21)
    train_x, train_y, test_x = x[:120], y[:120], x[120:]
    C = 6 * 2 / 100

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = theta[:12].reshape(2, 6), theta[12:]
        logits = train_x @ weight.T + bias
        log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        residual = np.exp(log_p) - np.eye(2)[train_y]
        loss = -C * log_p[np.arange(len(train_y)), train_y].sum() + 0.5 * np.square(weight).sum()
        grad = np.concatenate([(C * residual.T @ train_x + weight).ravel(), C * residual.sum(0)])
        return loss, grad

    theta = minimize(objective, np.zeros(14), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15}).x
    logits = test_x @ theta[:12].reshape(2, 6).T + theta[12:]
    expected = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
    probe = linear.logreg_sklearn if backend == "sklearn" else linear.logreg_torch
    ours = probe(train_x, train_y, test_x, 2, tol=1e-8)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("classes", [2, 5])
def test_logreg_torch_backend_agrees_with_sklearn(classes: int) -> None:
    x, y = _clusters(600, 32, classes, spread=4.0, seed=9 + classes)
    sk = linear.logreg_sklearn(x[:450], y[:450], x[450:], classes)
    tc = linear.logreg_torch(x[:450], y[:450], x[450:], classes)
    assert (sk.argmax(1) == tc.argmax(1)).mean() >= 0.99
    bal = [balanced_accuracy_score(y[450:], p.argmax(1)) for p in (sk, tc)]
    assert abs(bal[0] - bal[1]) <= 0.01
    np.testing.assert_allclose(tc, sk, atol=0.02)


def _objective(x: np.ndarray, y: np.ndarray, weight, bias, C: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean CE + ||W||^2 / (2 C N) and its gradients, at the given parameters."""
    weight = torch.tensor(np.asarray(weight), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(np.asarray(bias), dtype=torch.float64, requires_grad=True)
    logits = torch.as_tensor(x, dtype=torch.float64) @ weight.T + bias
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)) + weight.square().sum() / (2 * C * len(y))
    loss.backward()
    return loss.detach(), weight.grad, bias.grad


def test_logreg_torch_objective_is_sklearns() -> None:
    """sklearn's solution is a stationary point of the torch objective, and the torch fit reaches it."""
    x, y = _clusters(200, 12, 3, spread=3.0, seed=11)
    C = 0.7
    reference = LogisticRegression(C=C, max_iter=10000, tol=1e-12).fit(x, y)
    sk_loss, grad_w, grad_b = _objective(x, y, reference.coef_, reference.intercept_, C)
    # a wrong penalty scale (e.g. 1/(C N) instead of 1/(2 C N)) would leave gradients near 1e-3
    assert grad_w.abs().max() < 1e-4 and grad_b.abs().max() < 1e-4
    fitted_w, fitted_b = linear.fit_logreg_torch(x, y, C, max_iter=1000, tol=1e-9)
    torch_loss, _, _ = _objective(x, y, fitted_w.numpy(), fitted_b.numpy(), C)
    assert torch_loss <= sk_loss + 1e-10
    np.testing.assert_allclose(fitted_w.numpy(), reference.coef_, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 3])
def test_folds_are_seeded_shuffled_stratified_kfold(seed: int) -> None:
    y = np.random.default_rng(12).integers(0, 3, 97)
    ours = protocol.stratified_folds(y, ["a", "b", "c"], 5, seed=seed)
    theirs = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(np.zeros(97), y))
    assert len(ours) == 5
    for fold, (train, test) in zip(ours, theirs):
        np.testing.assert_array_equal(fold.train_index, train)
        np.testing.assert_array_equal(fold.test_index, test)


def test_folds_by_patient_keep_each_patient_in_one_fold_as_stratified_group_kfold() -> None:
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(6)
    patients = rng.integers(0, 23, 240)
    y = (patients % 3 + rng.integers(0, 2, 240)) % 3  # classes cluster by patient, as leukaemia subtypes do
    paths = [f"{'abc'[label]}/Patient_{p:02d}_{i}.jpg" for i, (label, p) in enumerate(zip(y, patients))]
    groups = protocol.path_groups(paths, r"Patient_\d+")
    assert groups[0] == f"Patient_{patients[0]:02d}"
    folds = protocol.stratified_folds(y, ["a", "b", "c"], 5, seed=2, groups=groups)
    theirs = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=2).split(np.zeros(240), y, groups)
    for fold, (train, test) in zip(folds, theirs):
        np.testing.assert_array_equal(fold.test_index, test)
        assert not set(groups[fold.test_index]) & set(groups[fold.train_index])  # no patient on both sides
    assert list(protocol.path_groups(["aml/P7/c1.jpg"], r"^[^/]+/([^/]+)/")) == ["P7"]  # a capture group
    with pytest.raises(ValueError, match=r"matches nothing in 'a/x.jpg'"):
        protocol.path_groups(["a/Patient_01_1.jpg", "a/x.jpg"], r"Patient_\d+")
    with pytest.raises(ValueError, match="is not a regular expression"):
        protocol.path_groups(paths, "Patient_(")
    with pytest.raises(ValueError, match="needs at least 5 groups, found 2"):
        protocol.stratified_folds(y[:20], ["a", "b", "c"], 5, groups=np.array(["p", "q"] * 10))


def test_group_folds_that_lack_a_class_or_are_uneven_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """Whole groups can leave a class out of a fold's training (it can then only be misclassified) or make folds of
    very different sizes; both are said, and neither happens with groups that spread over the classes."""
    y = np.repeat([0, 1, 2], 20)
    spread = np.arange(60) % 10  # ten groups, each holding all three classes
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        protocol.stratified_folds(y, ["a", "b", "c"], 5, groups=spread)
    assert not caplog.records
    one_class_groups = np.where(y == 0, 0, np.arange(60) % 6 + 1)  # class 'a' in one group only
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        folds = protocol.stratified_folds(y, ["a", "b", "c"], 5, groups=one_class_groups)
    fold = next(i for i, f in enumerate(folds) if 0 in y[f.test_index])
    assert f"fold {fold} tests images of 'a' (20), which its training folds lack" in caplog.text
    assert "the groups make test folds of" in caplog.text  # 20 images of 'a' in one fold, about 8 in the others
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        protocol.stratified_folds(y, ["a", "b", "c"], 5, groups=one_class_groups, warn=False)
    assert not caplog.records


def test_a_fixed_split_needs_two_classes_to_train_on() -> None:
    x, y = _clusters(40, 8, 2, spread=1.0, seed=3)
    with pytest.raises(ValueError, match="at least 2 classes in the training features, found only 'a'"):
        protocol.run_protocol(x[y == 0], y[y == 0], ["a", "b"], lambda *args: {}, test_x=x, test_y=y)
    with pytest.raises(ValueError, match="the training features hold no images"):
        protocol.run_protocol(x[:0], y[:0], ["a", "b"], lambda *args: {}, test_x=x, test_y=y)


def test_group_by_on_the_command_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = _clusters(90, 8, 3, spread=2.0, seed=9)
    paths = [f"{'abc'[label]}/Patient_{i % 9}_{i}.jpg" for i, label in enumerate(y)]
    path = _write(FeatureSet(x, y, paths, ["a", "b", "c"], {"model": "toy"}), tmp_path / "f.h5")
    # Folds of images over paths that name patients: said, with the --group-by that keeps patients whole.
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        knn.main(["--features", str(path), "--output-dir", str(tmp_path / "cells"), "--no-figures", "--k", "1"])
    assert "the 90 images come from 9 patients (e.g. 'Patient_0')" in caplog.text
    assert "--group-by 'Patient_\\d+' keeps each patient's images in one fold" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        results = knn.main(["--features", str(path), "--output-dir", str(tmp_path / "o"), "--no-figures", "--k", "1",
                            "--group-by", r"Patient_\d+"])  # fmt: skip
    assert "patients" not in caplog.text
    assert results["meta"]["group_by"] == r"Patient_\d+"
    report = (tmp_path / "o" / "results.md").read_text()
    assert "- group by: `Patient_\\d+`" in report and "## knn_1: per class (pooled over folds)" in report
    groups = protocol.path_groups(paths, r"Patient_\d+")
    expected = [fold.test_index.size for fold in protocol.stratified_folds(y, ["a", "b", "c"], 5, groups=groups)]
    assert [fold["n_test"] for fold in results["knn_1"]["per_fold"]] == expected
    with pytest.raises(ValueError, match="--group-by sets the cross-validation folds; --test-features has none"):
        knn.main(["--features", str(path), "--test-features", str(path), "--output-dir", str(tmp_path / "t"),
                  "--group-by", "Patient"])  # fmt: skip


def test_names_that_are_not_utf8_are_reported_as_their_own_bytes(tmp_path: Path) -> None:
    """A class folder and image names in Latin-1 (read with surrogateescape, kept by an .npz): every report file is
    written, the CSV and the markdown hold the names' own bytes, and the figures show them escaped."""
    x, y = _clusters(30, 8, 3, spread=3.0, seed=2)
    names = ["a", "gr\udce4n", "c"]  # the byte 0xe4 of "grän" in Latin-1
    paths = [f"{names[label]}/cell_\udce4{i}.jpg" for i, label in enumerate(y)]
    path = _write(FeatureSet(x, y, paths, names, {"model": "toy"}), tmp_path / "f.npz")
    results = knn.main(["--features", str(path), "--output-dir", str(tmp_path / "o"), "--k", "1", "--device", "cpu"])
    assert results["meta"]["classes"] == names
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "confusion_knn_1.png", "embedding.png", "predictions.csv", "results.json", "results.md"]
    with (tmp_path / "o" / "predictions.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == paths and [row["label"] for row in rows] == [names[label] for label in y]
    assert b"- classes: a, gr\xe4n, c" in (tmp_path / "o" / "results.md").read_bytes()


def test_unshuffled_folds_on_the_command_line_are_dinobloom_stratified_kfold(tmp_path: Path) -> None:
    """--no-shuffle: StratifiedKFold(5) over the file's order, scored as scikit-learn's kNN scores those folds."""
    x, y = _clusters(90, 8, 3, spread=3.0, seed=4)
    path = _write(FeatureSet(x, y, [f"c{l}/{i}.jpg" for i, l in enumerate(y)], ["a", "b", "c"], {"model": "toy"}),
                  tmp_path / "f.h5")  # fmt: skip
    results = knn.main(["--features", str(path), "--output-dir", str(tmp_path / "o"), "--no-figures", "--k", "1",
                        "--no-shuffle", "--device", "cpu"])  # fmt: skip
    expected = []
    for train, test in StratifiedKFold(n_splits=5).split(x, y):
        predicted = KNeighborsClassifier(n_neighbors=1).fit(x[train], y[train]).predict(x[test])
        expected.append(balanced_accuracy_score(y[test], predicted))
    assert [f["balanced_accuracy"] for f in results["knn_1"]["per_fold"]] == pytest.approx(expected, abs=1e-12)
    assert results["meta"]["folds"] == "unshuffled, in the features file's order" and results["meta"]["fold_seed"] is None
    assert "- folds: `unshuffled, in the features file's order`" in (tmp_path / "o" / "results.md").read_text()


def test_folds_do_not_follow_the_sorted_file_order() -> None:
    """Sorted paths put a class's subtypes (or patients) in runs; a fold must not be one such run."""
    y = np.repeat([0, 1], 50)  # class 0: images 0-24 one subtype, 25-49 another
    for fold in protocol.stratified_folds(y, ["ig", "neutrophil"], 5):
        first_class = fold.test_index[fold.test_index < 50]
        assert 0 < (first_class < 25).sum() < first_class.size  # both subtypes in every test fold


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_equal_sklearn_metrics() -> None:
    rng = np.random.default_rng(13)
    y_true = rng.integers(0, 5, 200)
    y_true[y_true == 4] = 3  # class 4 never occurs in y_true
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, 200))
    cm = metrics.confusion_matrix(y_true, y_pred, 5)
    np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred, labels=range(5)))
    summary = metrics.summary_from_confusion(cm)
    assert summary["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert summary["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert summary["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    per_class = metrics.per_class_scores(cm)
    for ours, theirs in zip((per_class["precision"], per_class["recall"], per_class["f1"], per_class["support"]), (p, r, f, s)):
        np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert metrics.mean_std([0.5, 0.7, 0.9]) == pytest.approx({"mean": 0.7, "std": np.std([0.5, 0.7, 0.9])})


def test_auroc_equals_sklearn() -> None:
    rng = np.random.default_rng(14)
    y = rng.integers(0, 2, 100)
    p1 = np.round(np.clip(0.3 * y + rng.random(100) * 0.7, 0, 1), 1)  # rounded: tied scores
    binary = np.stack([1 - p1, p1], axis=1)
    assert metrics.auroc(y, binary) == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    y3 = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y3]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(y3, proba, multi_class="ovr", average="macro")
    assert metrics.auroc(y3, proba) == pytest.approx(expected, abs=1e-12)


def _feature_set(n_per_class: list[int], dim: int = 8, seed: int = 0, model: str = "toy") -> FeatureSet:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    features = rng.normal(size=(labels.size, dim)).astype(np.float32)
    names = [f"class{c}" for c in range(len(n_per_class))]
    paths = [f"{names[l]}/{i}.jpg" for i, l in enumerate(labels)]
    return FeatureSet(features, labels, paths, names, {"model": model, "embed_dim": dim})


def test_small_class_error_names_class_and_count() -> None:
    fs = _feature_set([10, 3, 8])
    with pytest.raises(ValueError, match=r"'class1' \(3\)"):
        protocol.stratified_folds(fs.labels, fs.class_names, 5)


def test_labelled_checks() -> None:
    fs = _feature_set([6, 6])
    fs.labels[2] = -1
    with pytest.raises(ValueError, match=r"f\.h5: 1 of 12 samples are unlabelled"):
        protocol.check_labelled(fs, "f.h5")
    from_txt_list = FeatureSet(fs.features, np.full(12, -1, dtype=np.int64), fs.paths, [], {})  # as extracted
    with pytest.raises(ValueError, match=r"f\.h5: the features are unlabelled .* a CSV with path and label columns"):
        protocol.check_labelled(from_txt_list, "f.h5")


def test_unlabelled_samples_are_named_by_path() -> None:
    fs = _feature_set([6, 6])
    fs.labels[[2, 9]] = -1
    with pytest.raises(ValueError, match=r"f\.h5: 2 of 12 samples are unlabelled \(label -1\): class0/2\.jpg, "
                                         r"class1/9\.jpg; evaluation needs labelled features"):
        protocol.check_labelled(fs, "f.h5")
    fs.labels[:8] = -1  # many: the first five, and how many more
    with pytest.raises(ValueError, match=r"9 of 12 samples are unlabelled \(label -1\): class0/0\.jpg, class0/1\.jpg, "
                                         r"class0/2\.jpg, class0/3\.jpg, class0/4\.jpg and 4 more; "):
        protocol.check_labelled(fs, "f.h5")


def test_exactly_five_unlabelled_samples_are_all_named_and_none_more() -> None:
    fs = _feature_set([6, 6])
    fs.labels[[1, 3, 5, 7, 9]] = -1  # as many as the message names: no "and N more"
    with pytest.raises(ValueError) as raised:
        protocol.check_labelled(fs, "f.h5")
    assert str(raised.value).startswith(
        "f.h5: 5 of 12 samples are unlabelled (label -1): class0/1.jpg, class0/3.jpg, class0/5.jpg, class1/7.jpg, "
        "class1/9.jpg; evaluation needs labelled features"
    )
    assert "more" not in str(raised.value)


def test_a_folder_or_a_missing_file_as_features_says_where_features_files_come_from(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)
    folder = tmp_path / "cells"
    folder.mkdir()
    made_by = "features files (.h5 or .npz) come from python -m dinov2.eval.extract_features"
    for given, said in [(folder, f"{folder} is a folder, not a features file; {made_by}"),
                        (tmp_path / "absent", f"features file not found: {tmp_path / 'absent'}; {made_by}")]:
        with pytest.raises(SystemExit):
            run_cli(lambda: knn.main(["--features", str(given), "--output-dir", str(tmp_path / "o")]))
        assert capsys.readouterr().err == f"error: {said}\n"
    wrong_type = tmp_path / "cells.csv"
    wrong_type.write_text("path,label\n")
    with pytest.raises(ValueError, match=r"cells\.csv: unsupported features file type '\.csv'; use one of \.h5, "
                                         r"\.hdf5, \.npz; features files come from python -m dinov2\.eval\.extract_"):
        knn.main(["--features", str(wrong_type), "--output-dir", str(tmp_path / "o")])


def _partly_shared(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A training file of classes a, b, c, d (30 images each) and a test file of b, c, d (20 each), e (10) and f (15),
    its classes in another order; also the training and test features and labels (0, 1, 2 = b, c, d) of the shared
    classes."""
    rng = np.random.default_rng(21)
    centres = rng.normal(size=(6, 16))
    names = ["a", "b", "c", "d", "e", "f"]

    def images(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(6), counts)
        return (centres[y] + 1.2 * rng.normal(size=(y.size, 16))).astype(np.float32), y

    train_x, train_y = images([30, 30, 30, 30, 0, 0])
    test_x, test_y = images([0, 20, 20, 20, 10, 15])
    test_names = ["f", "d", "c", "b", "e"]  # the test file's own class order
    train = _write(FeatureSet(train_x, train_y, [f"tr/{names[l]}/{i}.jpg" for i, l in enumerate(train_y)], names[:4],
                              {"model": "toy"}), tmp_path / "train.h5")  # fmt: skip
    test = _write(FeatureSet(test_x, np.array([test_names.index(names[l]) for l in test_y]),
                             [f"te/{names[l]}/{i}.jpg" for i, l in enumerate(test_y)], test_names, {"model": "toy"}),
                  tmp_path / "test.h5")  # fmt: skip
    shared_train, shared_test = np.isin(train_y, [1, 2, 3]), np.isin(test_y, [1, 2, 3])
    return train, test, train_x[shared_train], train_y[shared_train] - 1, test_x[shared_test], test_y[shared_test] - 1


def test_shared_classes_trains_and_tests_on_the_classes_both_files_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train, test, train_x, train_y, test_x, test_y = _partly_shared(tmp_path)
    args = ["--features", str(train), "--test-features", str(test), "--no-figures", "--k", "5"]
    # without the option: the error, which names the option, and no output folder left behind
    with pytest.raises(ValueError, match=r"classes \['e', 'f'\] do not occur in .*train\.h5 .*; --shared-classes"):
        knn.main([*args, "--output-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.INFO, logger="dinov2.eval.protocol"):
        results = knn.main([*args, "--output-dir", str(tmp_path / "knn"), "--shared-classes"])
    assert f"dropped 30 of 120 samples of {train}, of the classes {test} lacks: a (30)" in caplog.text
    assert f"dropped 25 of 85 samples of {test}, of the classes {train} lacks: f (15), e (10)" in caplog.text
    meta = results["meta"]
    assert (meta["classes"], meta["n_samples"], meta["n_test_samples"]) == (["b", "c", "d"], 90, 60)
    assert meta["shared_classes"] == {"kept": ["b", "c", "d"], "dropped_from_features": {"a": 30},
                                      "dropped_from_test_features": {"f": 15, "e": 10}}  # fmt: skip
    expected = _sklearn_knn(train_x, train_y, test_x, 5)
    assert (expected != test_y).any(), "some test samples must be misclassified, or a prediction is a label"
    assert results["knn_5"]["accuracy"]["mean"] == pytest.approx(accuracy_score(test_y, expected))
    assert results["knn_5"]["confusion_matrix"] == confusion_matrix(test_y, expected, labels=range(3)).tolist()
    with (tmp_path / "knn" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["knn_5"]) for r in rows] == [("bcd"[t], "bcd"[p]) for t, p in zip(test_y, expected)]
    report = (tmp_path / "knn" / "results.md").read_text()
    said = "- shared classes (`--shared-classes`): trained and tested on the 3 classes both features files hold"
    assert said in report
    assert "  - dropped from the features: a (30)\n  - dropped from the test features: f (15), e (10)\n" in report
    # the linear probe takes the same option; the fit is DinoBloom's on the shared classes' images
    logreg = linear.main([*args[:-2], "--output-dir", str(tmp_path / "linear"), "--shared-classes"])
    reference = LogisticRegression(C=16 * 3 / 100, max_iter=1000).fit(train_x.astype(np.float64), train_y)
    predicted = reference.predict(test_x.astype(np.float64))
    assert logreg["logreg"]["accuracy"]["mean"] == pytest.approx(accuracy_score(test_y, predicted))
    assert logreg["meta"]["shared_classes"] == meta["shared_classes"]
    # the option without a test file is a mistake, said before the features are read
    with pytest.raises(ValueError, match="--shared-classes .* needs --test-features"):
        knn.main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(tmp_path / "cv"), "--shared-classes"])
    # without the option, the meta says it was not used
    plain = knn.main(["--features", str(train), "--output-dir", str(tmp_path / "cv"), "--no-figures", "--k", "5"])
    assert plain["meta"]["shared_classes"] is None


def _shared_in_training_order(tmp_path: Path) -> tuple[Path, Path]:
    """A training file of classes d, b, c, a (20 images each; not in alphabetical order) and e (named, no images),
    and a test file of c, e, a, d (10 each, in its own order): the shared classes with images in both are d, c, a,
    in the training file's order; b is the training file's alone and e, which the training file names but holds no
    image of, the test file's alone."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 16)) * 3

    def write(class_names: list[str], counts: dict[str, int], prefix: str, path: Path) -> Path:
        names = [name for name in class_names for _ in range(counts.get(name, 0))]
        y = np.array([class_names.index(name) for name in names], dtype=np.int64)
        x = np.stack([centres["abcde".index(name)] for name in names]) + rng.normal(size=(len(names), 16))
        paths = [f"{prefix}/{name}/{i}.jpg" for i, name in enumerate(names)]
        return _write(FeatureSet(x.astype(np.float32), y, paths, class_names, {"model": "toy"}), path)

    train = write(["d", "b", "c", "a", "e"], dict.fromkeys("dbca", 20), "tr", tmp_path / "train.h5")
    test = write(["c", "e", "a", "d"], dict.fromkeys("cead", 10), "te", tmp_path / "test.h5")
    return train, test


def test_shared_classes_keep_the_training_files_class_order(tmp_path: Path) -> None:
    train, test = _shared_in_training_order(tmp_path)
    results = knn.main(["--features", str(train), "--test-features", str(test), "--shared-classes", "--no-figures",
                        "--k", "1", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert results["meta"]["classes"] == ["d", "c", "a"]  # the training file's order, not sorted
    assert results["meta"]["shared_classes"]["kept"] == ["d", "c", "a"]
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    assert all(row["label"] == row["path"].split("/")[1] for row in rows), rows  # te/<class>/<i>.jpg


def test_shared_classes_drop_a_class_the_training_file_names_without_images(tmp_path: Path) -> None:
    train, test = _shared_in_training_order(tmp_path)
    results = knn.main(["--features", str(train), "--test-features", str(test), "--shared-classes", "--no-figures",
                        "--k", "1", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert results["meta"]["shared_classes"] == {"kept": ["d", "c", "a"], "dropped_from_features": {"b": 20},
                                                 "dropped_from_test_features": {"e": 10}}  # fmt: skip
    assert (results["meta"]["n_samples"], results["meta"]["n_test_samples"]) == (60, 30)  # not e's 10 test images


def test_shared_classes_needs_a_class_in_common() -> None:
    train, test = _feature_set([6, 6]), _feature_set([3, 3])
    test.class_names = ["x", "y"]
    with pytest.raises(ValueError, match=r"--shared-classes: train\.h5 \(\['class0', 'class1'\]\) and test\.h5 "
                                         r"\(\['x', 'y'\]\) have no class in common"):
        protocol.keep_shared_classes(train, test, "train.h5", "test.h5")


def test_features_repeating_an_image_are_refused() -> None:
    fs = _feature_set([6, 6])
    fs.paths[7] = "class0/./3.jpg"  # the image of row 3, spelt another way
    with pytest.raises(ValueError, match=r"f\.h5: image class0/\./3\.jpg is in rows 3 and 7; .* tested on its own copy"):
        protocol.check_labelled(fs, "f.h5")


def test_test_file_must_match_train_file() -> None:
    train = _feature_set([6, 6], dim=8)
    with pytest.raises(ValueError, match=r"test\.h5: feature dim 16 differs from train\.h5 \(8\)"):
        protocol.align_test_set(train, _feature_set([3, 3], dim=16), "train.h5", "test.h5")
    with pytest.raises(ValueError, match="model 'other' differs"):
        protocol.align_test_set(train, _feature_set([3, 3], model="other"), "train.h5", "test.h5")
    subset = _feature_set([4], dim=8)
    subset.class_names = ["class1"]
    np.testing.assert_array_equal(protocol.align_test_set(train, subset, "train.h5", "test.h5"), np.ones(4))


def test_test_file_weights_are_compared(caplog: pytest.LogCaptureFixture) -> None:
    train, test = _feature_set([6, 6]), _feature_set([3, 3])
    train.meta.update(model="dinobloom_s", weights="/w/a.pth")
    # the same file named once explicitly and once by its inferred architecture is the same model
    test.meta.update(model="inferred:vit_small", weights="/w/a.pth")
    protocol.align_test_set(train, test, "train.h5", "test.h5")
    # same name, other weights: allowed (the files may be copies) but said
    test.meta.update(model="dinobloom_s", weights="/w/b.pth")
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        protocol.align_test_set(train, test, "train.h5", "test.h5")
    assert "test.h5 was extracted with weights /w/b.pth but train.h5 with /w/a.pth" in caplog.text
    # the same model, its images resized another way
    train.meta["resize"] = "bilinear"
    test.meta.update(weights="/w/a.pth", resize="pil-bicubic")
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.protocol"):
        protocol.align_test_set(train, test, "train.h5", "test.h5")
    assert "test.h5 was extracted with resize=pil-bicubic but train.h5 with resize=bilinear" in caplog.text


def _write(fs: FeatureSet, path: Path) -> Path:
    return save_features(path, fs.features, fs.labels, fs.paths, fs.class_names, fs.meta)


def test_knn_cli_fixed_split_and_config_override(tmp_path: Path) -> None:
    x, y = _clusters(160, 16, 4, spread=2.0, seed=15)
    names = [f"c{i}" for i in range(4)]
    train = _write(FeatureSet(x[:120], y[:120], [f"a/{i}" for i in range(120)], names, {"model": "toy"}), tmp_path / "train.h5")
    test = _write(FeatureSet(x[120:], y[120:], [f"b/{i}" for i in range(40)], names, {"model": "toy"}), tmp_path / "test.h5")
    config = tmp_path / "knn.yaml"
    config.write_text("k: [3]\nmetric: cosine\nbatch_size: 8\n")
    results = knn.main(
        ["--config", str(config), "--features", str(train), "--test-features", str(test),
         "--output-dir", str(tmp_path / "out"), "--metric", "euclidean", "--no-figures"]
    )
    assert set(results) == {"meta", "knn_3"}
    assert results["meta"]["protocol"] == "train_test" and results["meta"]["settings"]["metric"] == "euclidean"
    expected = _sklearn_knn(x[:120], y[:120], x[120:], 3)
    assert results["knn_3"]["accuracy"]["mean"] == pytest.approx(accuracy_score(y[120:], expected))
    assert results["knn_3"]["accuracy"]["std"] == 0.0 and results["meta"]["std"].startswith("0 by construction")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["knn_3"]["confusion_matrix"] == confusion_matrix(y[120:], expected, labels=range(4)).tolist()
    # predictions.csv names, per test path, scikit-learn's kNN prediction (not e.g. the true label)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert (expected != y[120:]).any(), "some test samples must be misclassified, or a prediction is a label"
    assert [(r["path"], r["label"], r["knn_3"]) for r in rows] == [
        (f"b/{i}", names[t], names[p]) for i, (t, p) in enumerate(zip(y[120:], expected))
    ]


def test_config_unknown_key_names_closest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("metrc: cosine\n")
    with pytest.raises(SystemExit):
        knn.main(["--config", str(config), "--features", "x.h5", "--output-dir", str(tmp_path)])
    assert "unknown key 'metrc'; did you mean 'metric'?" in capsys.readouterr().err


def test_config_values_take_the_options_types(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A single k in YAML is a list of one (the option takes several); a wrong type names the key."""
    config = tmp_path / "knn.yaml"
    config.write_text("k: 20\nbatch_size: '8'\n")
    required = ["--config", str(config), "--features", "x.h5", "--output-dir", str(tmp_path)]
    args = protocol.parse_args_with_config(knn.build_parser(), required)
    assert args.k == [20] and args.batch_size == 8
    config.write_text("no_shuffle: true\n")
    assert protocol.parse_args_with_config(knn.build_parser(), required).no_shuffle is True
    for bad, message in (("k: [1, twenty]", "k=[1, 'twenty'] is not a valid value"),
                         ("k: 20.7", "k=20.7 is not a valid value"), ("batch_size: true", "batch_size=True is not"),
                         ("k: []", "k needs at least one value"),
                         ('no_shuffle: "false"', "no_shuffle must be true or false, got 'false'"),
                         ("no_figures: 2", "no_figures must be true or false, got 2")):
        config.write_text(bad + "\n")
        with pytest.raises(SystemExit):
            protocol.parse_args_with_config(knn.build_parser(), required)
        assert message in capsys.readouterr().err, bad


@pytest.mark.parametrize(("command", "option", "value"), [
    ("knn", "--temperature", "0"), ("knn", "--batch-size", "0"), ("linear", "--C", "0"), ("linear", "--C", "nan"),
])  # fmt: skip
def test_an_option_out_of_range_is_refused_before_any_features_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, option: str, value: str
) -> None:
    """From the command line or a --config file, before the (perhaps large) features file is read."""
    main = {"knn": knn.main, "linear": linear.main}[command]
    with pytest.raises(SystemExit):
        main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(tmp_path / "o"), option, value])
    assert f"argument {option}: must be" in capsys.readouterr().err
    config = tmp_path / "settings.yaml"
    config.write_text(f"{option[2:].replace('-', '_')}: {value}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--features", str(tmp_path / "absent.h5"), "--output-dir", str(tmp_path / "o")])
    assert "is not a valid value (must be" in capsys.readouterr().err
    # null is the option's default, as if the key were not there
    config.write_text(f"{option[2:].replace('-', '_')}: null\n")
    build_parser = {"knn": knn.build_parser, "linear": linear.build_parser}[command]
    required = ["--config", str(config), "--features", "f.h5", "--output-dir", "o"]
    args = protocol.parse_args_with_config(build_parser(), required)
    dest = option[2:].replace("-", "_")
    assert getattr(args, dest) == build_parser().get_default(dest)


def test_test_features_from_the_same_images_are_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = _clusters(60, 8, 3, spread=2.0, seed=3)
    meta = {"model": "toy", "data": "/cells"}
    paths = [f"c{label}/{i}.jpg" for i, label in enumerate(y)]
    train = _write(FeatureSet(x, y, paths, ["a", "b", "c"], meta), tmp_path / "train.h5")
    test = _write(FeatureSet(x[:20], y[:20], paths[:20], ["a", "b", "c"], meta), tmp_path / "test.h5")
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        knn.main(["--features", str(train), "--test-features", str(test), "--output-dir", str(tmp_path / "o"),
                  "--k", "1", "--no-figures", "--device", "cpu"])
    assert "share 20 of 20 test images: the test scores are not held out" in caplog.text


def test_train_and_test_files_are_compared_by_their_weights_bytes_and_image_locations(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Weights files of one name in two folders are told apart by their bytes, copies of one file are not; test
    images are found among the training images whatever folder or list spelling the extraction was given."""
    x, y = _clusters(60, 8, 3, spread=2.0, seed=3)
    paths = [f"c{label}/{i}.jpg" for i, label in enumerate(y)]

    def files(train_meta: dict, test_meta: dict, test_paths: list[str]) -> list[str]:
        train = _write(FeatureSet(x[20:], y[20:], paths[20:], ["a", "b", "c"], {"model": "toy", **train_meta}),
                       tmp_path / "train.h5")  # fmt: skip
        test = _write(FeatureSet(x[:20], y[:20], test_paths, ["a", "b", "c"], {"model": "toy", **test_meta}),
                      tmp_path / "test.h5")  # fmt: skip
        return ["--features", str(train), "--test-features", str(test), "--output-dir", str(tmp_path / "o"),
                "--k", "1", "--no-figures", "--device", "cpu"]  # fmt: skip

    run_a, run_b = {"weights": "w/DinoBloom-S.pth", "weights_sha256": "aa"}, {"weights": "w2/DinoBloom-S.pth"}
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        results = knn.main(files(run_a, {**run_b, "weights_sha256": "bb"}, paths[:20]))
    assert "with weights w2/DinoBloom-S.pth but" in caplog.text and "(other bytes)" in caplog.text
    assert results["meta"]["test_weights"] == "w2/DinoBloom-S.pth"
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        knn.main(files(run_a, {**run_b, "weights_sha256": "aa"}, paths[:20]))  # a copy of the same file
    assert "weights" not in caplog.text
    # the test images are training images, listed from a sub-folder: same files, other relative paths
    caplog.clear()
    overlapping = [f"{i}.jpg" for i in range(20, 40)]
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        knn.main(files({"root": "/cells"}, {"root": "/cells/c0/../c1"}, overlapping))
    moved = {f"c1/{i}.jpg" for i in range(20, 40)} & set(paths[20:])
    assert f"share {len(moved)} of 20 test images: the test scores are not held out" in caplog.text
    assert moved  # (the clusters put some of those images in class 1)
    caplog.clear()  # older files, without a root: their --data strings, normalised
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        knn.main(files({"data": "/cells/"}, {"data": "/cells"}, paths[20:40]))
    assert "share 20 of 20 test images" in caplog.text
    caplog.clear()  # an older file with a newer one: both by --data
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        knn.main(files({"data": "cells", "root": "/home/me/cells"}, {"data": "cells"}, paths[20:40]))
    assert "share 20 of 20 test images" in caplog.text


def test_test_features_made_another_way_are_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = _clusters(60, 8, 3, spread=2.0, seed=3)
    paths = [f"c{label}/{i}.jpg" for i, label in enumerate(y)]
    train = _write(FeatureSet(x[20:], y[20:], paths[20:], ["a", "b", "c"], {"model": "toy", "img_size": 224}),
                   tmp_path / "train.h5")  # fmt: skip
    test = _write(FeatureSet(x[:20], y[:20], paths[:20], ["a", "b", "c"], {"model": "toy", "img_size": 112}),
                  tmp_path / "test.h5")  # fmt: skip
    with caplog.at_level("WARNING", logger="dinov2.eval.protocol"):
        results = knn.main(["--features", str(train), "--test-features", str(test), "--output-dir",
                            str(tmp_path / "o"), "--k", "1", "--no-figures", "--device", "cpu"])  # fmt: skip
    assert "with img_size=112 but" in caplog.text and "with img_size=224" in caplog.text
    assert results["meta"]["pooled"].startswith("per_class and confusion_matrix are of the test set's predictions")
    assert "## knn_1: per class (test set)" in (tmp_path / "o" / "results.md").read_text()


def test_an_unparsable_eval_config_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("k: [1, 2\n")
    with pytest.raises(SystemExit):
        protocol.parse_args_with_config(knn.build_parser(), ["--config", str(broken), "--features", "f.h5",
                                                             "--output-dir", "o"])  # fmt: skip
    assert f"{broken}: cannot parse the YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knn.build_parser().parse_args(["--features", "f.h5", "--output-dir", "o", "--seed", "-1"])
    assert "argument --seed: must be >= 0, got -1" in capsys.readouterr().err


def test_linear_cli_cross_validation_schema(tmp_path: Path) -> None:
    x, y = _clusters(100, 16, 3, spread=2.0, seed=16)
    path = _write(FeatureSet(x, y, [f"c{l}/{i}.jpg" for i, l in enumerate(y)], ["a", "b", "c"], {"model": "toy"}), tmp_path / "f.h5")
    results = linear.main(["--features", str(path), "--output-dir", str(tmp_path / "out"), "--no-figures"])
    logreg = results["logreg"]
    assert set(logreg) == {"accuracy", "balanced_accuracy", "weighted_f1", "per_class", "per_fold", "confusion_matrix"}
    assert len(logreg["per_fold"]) == 5 and sum(f["n_test"] for f in logreg["per_fold"]) == 100
    folds = [f["balanced_accuracy"] for f in logreg["per_fold"]]
    assert logreg["balanced_accuracy"] == pytest.approx({"mean": np.mean(folds), "std": np.std(folds)})
    assert results["meta"]["n_samples"] == 100 and results["meta"]["classes"] == ["a", "b", "c"]
    # each fold is DinoBloom's LogisticRegression(C = dim * classes / 100) on StratifiedKFold(5) folds (seed 0)
    # (guards against a wrong C, e.g. a constant instead of --C / its default, and against other folds)
    expected = np.empty_like(y)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["logreg"]["per_fold"]
    for fold, (train, test) in zip(saved, StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y)):
        x64 = x.astype(np.float64)  # as DinoBloom's features reached scikit-learn
        expected[test] = LogisticRegression(C=16 * 3 / 100, max_iter=1000).fit(x64[train], y[train]).predict(x64[test])
        assert (fold["n_train"], fold["n_test"]) == (train.size, test.size)
        assert fold["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[test], expected[test]), abs=1e-12)
        assert fold["accuracy"] == pytest.approx(accuracy_score(y[test], expected[test]), abs=1e-12)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["logreg"] for r in rows] == [["a", "b", "c"][p] for p in expected]
    # the fold that tested each image, the same folds as above
    splits = StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y)
    tested_in = {int(i): number for number, (_, test) in enumerate(splits) for i in test}
    assert [int(r["fold"]) for r in rows] == [tested_in[i] for i in range(100)]


def test_linear_probe_needs_at_least_one_iteration(capsys: pytest.CaptureFixture[str]) -> None:
    """--max-iter 0 used to report the scores of an unfitted model."""
    with pytest.raises(SystemExit):
        linear.main(["--features", "f.h5", "--output-dir", "o", "--max-iter", "0"])
    assert "argument --max-iter: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the torch backend took a negative tolerance as "never converged"
        linear.main(["--features", "f.h5", "--output-dir", "o", "--tol", "-1"])
    assert "argument --tol: must be a finite number >= 0, got -1" in capsys.readouterr().err


def test_a_reused_output_folder_holds_one_runs_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kNN, then the linear probe into the same folder: results.json holds only the probe, the kNN figures are gone
    (they would sit beside the probe's report), and the log says what was replaced."""
    x, y = _clusters(60, 8, 3, spread=2.0, seed=5)
    path = _write(FeatureSet(x, y, [f"c{l}/{i}.jpg" for i, l in enumerate(y)], ["a", "b", "c"], {"model": "toy"}),
                  tmp_path / "f.h5")  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    # a user's files of the same names, in a folder that held no report of ours: never touched
    for name in ("notes.txt", "embedding.png", "confusion_from_the_paper.png", "predictions.csv"):
        (out / name).write_text("mine")
    linear.main(["--features", str(path), "--output-dir", str(out), "--no-figures"])
    assert (out / "embedding.png").read_text() == "mine" and (out / "confusion_from_the_paper.png").is_file()
    for name in ("results.json", "embedding.png", "predictions.csv"):
        (out / name).unlink()
    knn.main(["--features", str(path), "--output-dir", str(out), "--k", "1", "--device", "cpu"])
    assert (out / "confusion_knn_1.png").is_file() and (out / "embedding.png").is_file()
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.reports"):
        linear.main(["--features", str(path), "--output-dir", str(out), "--no-figures"])
    assert set(json.loads((out / "results.json").read_text())) == {"meta", "logreg"}
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_from_the_paper.png", "notes.txt", "predictions.csv", "results.json", "results.md"
    ]
    assert "held an earlier run's report (results of knn_1)" in caplog.text
    assert "and its embedding.png, confusion_knn_1.png were removed" in caplog.text


def test_cli_input_mistakes_end_in_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    run = subprocess.run(
        [sys.executable, "-m", "dinov2.eval.knn", "--features", str(missing), "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: features file not found: {missing}; features files (.h5 or .npz) come from "
        "python -m dinov2.eval.extract_features"
    )
    assert "Traceback" not in run.stderr


def test_damaged_features_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)
    fake = tmp_path / "fake.h5"
    fake.write_text("x\n")
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: knn.main(["--features", str(fake), "--output-dir", str(tmp_path / "o")]))
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {fake}: not a readable HDF5 features file (")


def test_ctrl_c_in_a_command_is_one_line(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_cli(interrupted)
    assert exited.value.code == 130  # what a shell reports for SIGINT
    assert capsys.readouterr().err == "interrupted\n"
    monkeypatch.setenv("DINOBLOOM_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        run_cli(interrupted)


def test_a_library_error_says_where_it_came_from(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own checks end in one line; a ValueError from a library's Python code also names the module."""
    from dinov2.parallel import dtype_from_name

    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit):
        run_cli(lambda: dtype_from_name("fp8"))
    assert capsys.readouterr().err == "error: unknown dtype 'fp8'; expected one of fp32, fp16, bf16\n"
    with pytest.raises(SystemExit):
        run_cli(lambda: json.loads("{not json"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: Expecting property name")
    assert lines[1] == "(raised in json.decoder; DINOBLOOM_TRACEBACK=1 shows the traceback)"
    # A library installed in a virtual environment inside the checkout (CI's .ci-venv) is still a library.
    from sklearn.model_selection import StratifiedKFold

    with pytest.raises(SystemExit):
        run_cli(lambda: next(StratifiedKFold(n_splits=5).split(np.zeros((3, 1)), [0, 1, 2])))
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("(raised in sklearn.model_selection")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail as on a full disk")
def test_a_full_disk_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that finds the disk full (here /dev/full's, which fails as a full disk does) ends any command in one
    line that names the file being written, whatever error a library wrapped it in; no temporary copy is left."""
    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)
    target = tmp_path / "results.json"

    def write_on_a_full_disk() -> None:
        atomic_write(target, lambda tmp: Path("/dev/full").write_text("{}"))

    def wrapped_by_a_library() -> None:
        try:
            write_on_a_full_disk()
        except OSError as err:
            raise RuntimeError("the library's own words") from err

    for main in (write_on_a_full_disk, wrapped_by_a_library):
        with pytest.raises(SystemExit) as exited:
            run_cli(main)
        assert exited.value.code == 2
        assert capsys.readouterr().err == (
            f"error: {target}: No space left on device; free some space and run the command again (training and "
            "feature extraction go on from what they saved)\n"
        )
    assert list(tmp_path.iterdir()) == []
    # A library's own error that says the disk is full is shown whole (here PyTorch's, for /dev/shm).
    shm = "unable to write to file </torch_1_2_3>: No space left on device (28)"
    with pytest.raises(SystemExit):
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError(shm)))
    assert capsys.readouterr().err.startswith(f"error: {shm}; free some space")
    # A bug met while a full disk was being handled is the bug, with its traceback.

    def bug_while_handling() -> None:
        try:
            write_on_a_full_disk()
        except OSError:
            raise AttributeError("a bug") from None

    with pytest.raises(AttributeError, match="a bug"):
        run_cli(bug_while_handling)
    monkeypatch.setenv("DINOBLOOM_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="the library's own words"):
        run_cli(wrapped_by_a_library)


def test_temperature_weighting_votes_over_cosine_neighbours(tmp_path: Path) -> None:
    """DINOv2's vote: the CLI picks cosine neighbours for it, and refuses Euclidean ones."""
    x, y = _clusters(60, 8, 3, spread=2.0, seed=5)
    path = _write(FeatureSet(x, y, [f"c{l}/{i}.jpg" for i, l in enumerate(y)], ["a", "b", "c"], {"model": "toy"}),
                  tmp_path / "f.h5")  # fmt: skip
    results = knn.main(["--features", str(path), "--output-dir", str(tmp_path / "o"), "--no-figures",
                        "--weighting", "temperature", "--k", "5"])  # fmt: skip
    assert results["meta"]["settings"]["metric"] == "cosine"
    assert results["meta"]["fold_seed"] == 0
    report = (tmp_path / "o" / "results.md").read_text()  # two runs with other settings must not read alike
    assert "- folds: `shuffled with seed 0`" in report and "weighting `temperature`" in report
    assert "metric `cosine`" in report
    with pytest.raises(ValueError, match="temperature weighting .* needs the cosine metric, not 'euclidean'"):
        knn.main(["--features", str(path), "--output-dir", str(tmp_path / "o"), "--no-figures",
                  "--weighting", "temperature", "--metric", "euclidean"])  # fmt: skip


@pytest.mark.parametrize("module", ["knn", "linear", "mil"])
def test_an_output_dir_that_is_a_file_is_one_error_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, module: str
) -> None:
    """`--output-dir results.h5` (a file) ends in one error line before the features are even read."""
    from dinov2.eval.mil import __main__ as mil_cli

    taken = tmp_path / "results.h5"
    taken.write_text("not a folder")
    main = {"knn": knn.main, "linear": linear.main, "mil": mil_cli.main}[module]
    monkeypatch.delenv("DINOBLOOM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit):
        run_cli(lambda: main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(taken)]))
    assert capsys.readouterr().err == f"error: --output-dir {taken} is a file; name a folder for the results\n"


@pytest.mark.parametrize("module", ["knn", "linear", "mil", "checkpoints"])
def test_a_failed_command_leaves_no_output_folder(tmp_path: Path, module: str) -> None:
    """The output folder appears with the first file written: a command that fails before leaves none."""
    from dinov2.eval import checkpoints
    from dinov2.eval.mil import __main__ as mil_cli

    out = tmp_path / "new" / "out"
    if module == "checkpoints":
        with pytest.raises(FileNotFoundError, match="does not exist"):
            checkpoints.main(["--run-dir", str(tmp_path / "demoo"), "--data", str(tmp_path), "--output-dir", str(out)])
    else:
        main = {"knn": knn.main, "linear": linear.main, "mil": mil_cli.main}[module]
        with pytest.raises(FileNotFoundError, match="features file not found"):
            main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(out)])
    assert not (tmp_path / "new").exists()


def test_an_output_dir_below_a_file_is_one_error_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^--output-dir .*taken/out: .*taken is a file, not a folder$"):
        knn.main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(tmp_path / "taken" / "out")])
    if sys.platform == "linux":  # a folder that permissions allow (root) but the file system refuses: before the work
        with pytest.raises(ValueError, match=r"--output-dir /proc/knn: the folder /proc/knn cannot be made"):
            knn.main(["--features", str(tmp_path / "absent.h5"), "--output-dir", "/proc/knn"])
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a link to nothing cannot become the folder either
    with pytest.raises(ValueError, match=r"--output-dir .*link is a file"):
        knn.main(["--features", str(tmp_path / "absent.h5"), "--output-dir", str(tmp_path / "link")])
