"""The evaluation protocol shared by kNN and the linear probe: folds, scoring, config and CLI plumbing.

DinoBloom scored frozen features with ``StratifiedKFold(n_splits=5)`` over one labelled set; we shuffle its folds
with a seed (see :func:`stratified_folds` for why); ``--test-features`` instead trains on one file and tests on
another (``--shared-classes``: on the classes both files hold only, see :func:`keep_shared_classes`).
Per-fold accuracy, balanced accuracy and weighted F1 are summarised as mean and
population standard deviation (ddof=0); per-class scores and the confusion matrix are
pooled over the out-of-fold predictions (every sample is tested exactly once).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.cli import non_negative_int
from dinov2.configs import closest_key
from dinov2.eval import metrics
from dinov2.eval.features_io import FeatureSet, load_features

logger = logging.getLogger(__name__)

#: ``predict(train_x, train_y, test_x, num_classes) -> {method name: class scores (n_test, num_classes)}``
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray, int], dict[str, np.ndarray]]


@dataclass
class Fold:
    """One train/test split: indices into the training set and into the evaluated set."""

    train_index: np.ndarray
    test_index: np.ndarray


@dataclass
class ProtocolOutput:
    """Scores per method, the out-of-fold predictions (index into class_names) per method, and the fold that tested
    each sample (None for a fixed split)."""

    results: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray]
    test_folds: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU; any other name is used as given, once checked."""
    if name == "auto":
        # Not MPS, unlike training's get_device: evaluation computes in float64 in places, which MPS lacks.
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested, but CUDA is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: a one-element allocation says whether it is usable
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__  # its first sentence
            raise ValueError(f"--device {name} was requested, but PyTorch cannot use it here ({reason}); "
                             "use --device cpu or auto") from err
    return device


#: How many paths an error message names before "and N more".
_SHOWN_PATHS = 5


def check_labelled(feature_set: FeatureSet, path: str | Path) -> None:
    """Raise if the set is empty, has no class names, repeats an image, or holds unlabelled (-1) samples."""
    labels = np.asarray(feature_set.labels)
    if labels.size == 0:
        raise ValueError(f"{path}: the features file holds no samples")
    if not feature_set.class_names:
        raise ValueError(
            f"{path}: the features are unlabelled (no class names; a .txt image list gives none): evaluation needs "
            "features extracted from a <class>/<image> folder or a CSV with path and label columns"
        )
    rows: dict[str, int] = {}
    for row, image in enumerate(feature_set.paths):
        first = rows.setdefault(os.path.normpath(image), row)
        if first != row:
            raise ValueError(
                f"{path}: image {image} is in rows {first} and {row}; a repeated image is tested on its own copy in "
                "cross-validation (or counted twice in a test set): extract from a list that names each image once"
            )
    unlabelled = np.flatnonzero(labels < 0)
    if unlabelled.size:
        shown = ", ".join(feature_set.paths[row] for row in unlabelled[:_SHOWN_PATHS])
        more = f" and {unlabelled.size - _SHOWN_PATHS} more" if unlabelled.size > _SHOWN_PATHS else ""
        raise ValueError(
            f"{path}: {unlabelled.size} of {labels.size} samples are unlabelled (label -1): {shown}{more}; "
            "evaluation needs labelled features, extracted from a <class>/<image> folder or a CSV with path and "
            "label columns"
        )
    if labels.max() >= len(feature_set.class_names):
        raise ValueError(
            f"{path}: label {int(labels.max())} has no class name ({len(feature_set.class_names)} classes)"
        )


def _shared_images(train_set: FeatureSet, test_set: FeatureSet) -> int:
    """How many test images are also training images: compared by absolute path under each file's recorded image
    root, or, when a file was written before the root was recorded, by path under each file's normalised
    ``--data``, as given (0 when that is not recorded either)."""
    key = "root" if train_set.meta.get("root") and test_set.meta.get("root") else "data"

    def locations(feature_set: FeatureSet) -> set[str]:
        base = feature_set.meta.get(key)
        if base is None:
            return set()
        return {os.path.normpath(os.path.join(os.path.normpath(str(base)), path)) for path in feature_set.paths}

    return len(locations(train_set) & locations(test_set))


def align_test_set(
    train_set: FeatureSet, test_set: FeatureSet, train_path: str | Path, test_path: str | Path
) -> np.ndarray:
    """Check that the test file fits the training file; return its labels in the training class order."""
    train_dim, test_dim = train_set.features.shape[1], test_set.features.shape[1]
    if train_dim != test_dim:
        raise ValueError(f"{test_path}: feature dim {test_dim} differs from {train_path} ({train_dim})")
    train_model, test_model = train_set.meta.get("model"), test_set.meta.get("model")
    train_weights, test_weights = train_set.meta.get("weights") or None, test_set.meta.get("weights") or None
    train_digest, test_digest = train_set.meta.get("weights_sha256"), test_set.meta.get("weights_sha256")
    if train_digest and test_digest:  # the files' bytes, wherever they lay
        same_weights = train_digest == test_digest
    else:  # a file written before the digest was recorded, or weights from a URL: their names
        same_weights = train_weights is not None and train_weights == test_weights  # names may then differ in spelling
    if not same_weights and train_model is not None and test_model is not None and train_model != test_model:
        raise ValueError(f"{test_path}: model {test_model!r} differs from {train_path} ({train_model!r})")
    if train_weights is not None and test_weights is not None and not same_weights:
        logger.warning(
            "%s was extracted with weights %s but %s with %s%s: the probe is trained on one model's features and "
            "tested on another's", test_path, test_weights, train_path, train_weights,
            " (other bytes)" if train_digest and test_digest else ", unless the two files are the same",
        )
    # how the features were made; a file written before --resize existed was resized bilinearly
    for key, default in (("img_size", None), ("resize", "bilinear"), ("precision", None)):
        train_value, test_value = train_set.meta.get(key, default), test_set.meta.get(key, default)
        if train_value is not None and test_value is not None and train_value != test_value:
            logger.warning(
                "%s was extracted with %s=%s but %s with %s=%s: the probe is tested on features made another way",
                test_path, key, test_value, train_path, key, train_value,
            )
    unknown = sorted(set(test_set.class_names) - set(train_set.class_names))
    if unknown:
        raise ValueError(
            f"{test_path}: classes {unknown} do not occur in {train_path} ({train_set.class_names}); "
            "--shared-classes scores only the classes both files hold"
        )
    n_shared = _shared_images(train_set, test_set)
    if n_shared:
        logger.warning(
            "%s and %s share %d of %d test images: the test scores are not held out",
            train_path, test_path, n_shared, len(test_set.paths),
        )
    mapping = np.array([train_set.class_names.index(name) for name in test_set.class_names], dtype=np.int64)
    return mapping[np.asarray(test_set.labels, dtype=np.int64)]


def subset_classes(feature_set: FeatureSet, class_names: Sequence[str]) -> FeatureSet:
    """The samples of ``feature_set`` whose class is one of ``class_names`` (by name), relabelled in that order."""
    new_label = np.array([class_names.index(name) if name in class_names else -1 for name in feature_set.class_names],
                         dtype=np.int64)  # fmt: skip
    labels = new_label[np.asarray(feature_set.labels, dtype=np.int64)]
    keep = np.flatnonzero(labels >= 0)
    return FeatureSet(feature_set.features[keep], labels[keep], [feature_set.paths[i] for i in keep],
                      list(class_names), dict(feature_set.meta))  # fmt: skip


def keep_shared_classes(
    train_set: FeatureSet, test_set: FeatureSet, train_path: str | Path, test_path: str | Path
) -> tuple[FeatureSet, FeatureSet, dict[str, Any]]:
    """``--shared-classes``: both sets reduced to the classes that have samples in both (matched by name, in the
    training file's order), and what was kept and dropped, for the reports' ``meta``."""

    def counts(feature_set: FeatureSet) -> dict[str, int]:
        numbers = np.bincount(np.asarray(feature_set.labels, dtype=np.int64), minlength=len(feature_set.class_names))
        return {name: int(n) for name, n in zip(feature_set.class_names, numbers) if n}

    train_counts, test_counts = counts(train_set), counts(test_set)
    kept = [name for name in train_counts if name in test_counts]
    if not kept:
        raise ValueError(
            f"--shared-classes: {train_path} ({sorted(train_counts)}) and {test_path} ({sorted(test_counts)}) "
            "have no class in common"
        )
    dropped_train = {name: n for name, n in train_counts.items() if name not in test_counts}
    dropped_test = {name: n for name, n in test_counts.items() if name not in train_counts}
    for path, dropped, total in ((train_path, dropped_train, len(train_set)), (test_path, dropped_test, len(test_set))):
        if dropped:
            logger.warning(
                "--shared-classes: dropped %d of %d samples of %s, of the classes %s lacks: %s",
                sum(dropped.values()), total, path, test_path if path == train_path else train_path,
                ", ".join(f"{name} ({n})" for name, n in dropped.items()),
            )
    logger.info("--shared-classes: scoring the %d classes %s and %s share: %s", len(kept), train_path, test_path,
                ", ".join(kept))  # fmt: skip
    summary = {
        "kept": kept,
        "dropped_from_features": dropped_train,
        "dropped_from_test_features": dropped_test,
    }
    return subset_classes(train_set, kept), subset_classes(test_set, kept), summary


def path_groups(paths: Sequence[str], pattern: str) -> np.ndarray:
    """The group of each path: the first match of the regular expression ``pattern`` (its first capture group if it
    has one), e.g. ``Patient_\\d+`` for DeepAPL's ``Patient_07_BL_123.jpg`` or ``^[^/]+/([^/]+)/`` for
    ``<label>/<patient>/<cell>`` paths. A path without a match is an error naming it."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--group-by {pattern!r} is not a regular expression: {err}") from None
    groups = []
    for path in paths:
        match = regex.search(path)
        if match is None:
            raise ValueError(f"--group-by {pattern!r} matches nothing in {path!r}; every image needs a group")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return np.asarray(groups)


_PATIENT_ID = re.compile(r"(?i)(?:^|[/_.\- ])((patient|subject|donor)([_\- ]?)\d+)")


def warn_if_folds_split_patients(paths: Sequence[str], n_splits: int) -> str | None:
    """Warn when every stored path names a patient (``Patient_07``, ``subject-3``, ...) and patients have several
    images, but the folds are of images: cells of one patient then fall in training and test folds. Returns the
    ``--group-by`` pattern the warning suggests, or None when there is nothing to warn about."""
    found = [_PATIENT_ID.search(path) for path in paths]
    if not paths or any(match is None for match in found):
        return None
    ids = {match.group(1).lower() for match in found}
    if len(ids) < n_splits or len(ids) == len(paths):  # cannot be grouped, or one image per patient
        return None
    first = found[0]
    pattern = f"{re.escape(first.group(2) + first.group(3))}\\d+"
    logger.warning(
        "the %d images come from %d patients (e.g. %r), and the folds are of images, as in DinoBloom: cells of one "
        "patient fall in training and test folds, which measures recognition across cells more than across "
        "patients; --group-by '%s' keeps each patient's images in one fold",
        len(paths), len(ids), first.group(1), pattern,
    )
    return pattern


def stratified_folds(
    labels: np.ndarray,
    class_names: Sequence[str],
    n_splits: int = 5,
    seed: int | None = 0,
    groups: np.ndarray | None = None,
    warn: bool = True,
) -> list[Fold]:
    """``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``, with a clear error for small classes;
    ``seed=None``: unshuffled folds, in the samples' order (``--no-shuffle``).

    With ``groups`` (a patient per cell, see :func:`path_groups`) the folds are
    ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``: a group's images all fall in one fold, so
    no test cell has cells of its own patient in the training folds; ``warn``: say where that leaves a fold
    lacking a class, or the folds uneven (:func:`warn_of_uneven_group_folds`).

    DinoBloom ran ``StratifiedKFold(n_splits)`` unshuffled over its files in directory order, an order no one can
    reproduce and unrelated to the names. Over our sorted paths the unshuffled folds would be runs of neighbouring
    names, which in the public sets are cell subtypes (``MMY_``, ``MY_``, ``PMY_`` within ``ig``) and patients
    (``Patient_07_...``): a fold would be tested on a subtype or patient its training folds hardly hold. Seeded
    shuffling keeps the folds stratified, reproducible and unrelated to the file names. Unshuffled folds are there
    for a features file in an order of one's choosing (extracted from a CSV list), e.g. DinoBloom's file order.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    require_two_classes(labels, class_names)
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)
    small = [f"{class_names[c]!r} ({counts[c]})" for c in present if counts[c] < n_splits]
    if small:
        raise ValueError(
            f"{n_splits}-fold stratified CV needs at least {n_splits} samples per class; "
            f"too few in: {', '.join(small)}"
        )
    shuffle = seed is not None
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=shuffle, random_state=seed)
        return [Fold(train, test) for train, test in splitter.split(np.zeros(labels.size), labels)]
    n_groups = np.unique(groups).size
    if n_groups < n_splits:
        raise ValueError(f"{n_splits}-fold CV by group needs at least {n_splits} groups, found {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=shuffle, random_state=seed)
    folds = [Fold(train, test) for train, test in splitter.split(np.zeros(labels.size), labels, groups)]
    if warn:
        warn_of_uneven_group_folds(folds, labels, class_names)
    return folds


def require_two_classes(
    labels: np.ndarray, class_names: Sequence[str] | None = None, where: str = ""
) -> np.ndarray:
    """The classes ``labels`` hold, sorted; raise unless there are at least two (``where`` says whose labels, in the
    message, which names the class found by its name in ``class_names``, else by its number)."""
    present = np.unique(labels)
    if present.size < 2:
        only = "none" if not present.size else int(present[0]) if class_names is None else class_names[present[0]]
        raise ValueError(f"classification needs at least 2 classes{where}, found only {only!r}")
    return present


def warn_of_uneven_group_folds(folds: Sequence[Fold], labels: np.ndarray, class_names: Sequence[str]) -> None:
    """Warn of what whole groups can do to folds: a fold that tests a class its training folds lack (a class held
    by fewer groups than needed), and folds of very different sizes (each counts equally in the mean)."""
    for index, fold in enumerate(folds):
        tested = np.unique(labels[fold.test_index])
        trained = np.unique(labels[fold.train_index])
        lacking = [f"{class_names[c]!r} ({int((labels[fold.test_index] == c).sum())})"
                   for c in np.setdiff1d(tested, trained)]  # fmt: skip
        if lacking:
            logger.warning(
                "fold %d tests images of %s, which its training folds lack (all their groups are in this fold): "
                "they can only be misclassified; use a --group-by pattern with more groups per class, or fewer folds",
                index, ", ".join(lacking),
            )
    sizes = [fold.test_index.size for fold in folds]
    if max(sizes) > 2 * min(sizes):
        logger.warning(
            "the groups make test folds of %s images: each fold counts equally in the mean, so the small ones weigh "
            "as much as the large; a --group-by pattern with more, smaller groups evens them out",
            ", ".join(map(str, sizes)),
        )


def score_folds(
    y_true_per_fold: Sequence[np.ndarray],
    y_pred_per_fold: Sequence[np.ndarray],
    class_names: Sequence[str],
    n_train_per_fold: Sequence[int],
) -> dict[str, Any]:
    """Mean/std of the summary metrics over folds, plus pooled per-class scores and confusion matrix."""
    num_classes = len(class_names)
    per_fold = []
    pooled = np.zeros((num_classes, num_classes), dtype=np.int64)
    for fold, (y_true, y_pred, n_train) in enumerate(zip(y_true_per_fold, y_pred_per_fold, n_train_per_fold)):
        cm = metrics.confusion_matrix(y_true, y_pred, num_classes)
        pooled += cm
        per_fold.append(
            {"fold": fold, "n_train": int(n_train), "n_test": int(cm.sum()), **metrics.summary_from_confusion(cm)}
        )
    result: dict[str, Any] = {name: metrics.mean_std([f[name] for f in per_fold]) for name in metrics.SUMMARY_METRICS}
    scores = metrics.per_class_scores(pooled)
    result["per_class"] = {
        name: {
            "precision": float(scores["precision"][c]),
            "recall": float(scores["recall"][c]),
            "f1": float(scores["f1"][c]),
            "support": int(scores["support"][c]),
        }
        for c, name in enumerate(class_names)
    }
    result["per_fold"] = per_fold
    result["confusion_matrix"] = pooled.tolist()
    return result


def run_protocol(
    train_x: np.ndarray,
    train_y: np.ndarray,
    class_names: Sequence[str],
    predict: Predictor,
    n_splits: int = 5,
    test_x: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    progress: bool = False,
    seed: int | None = 0,
    groups: np.ndarray | None = None,
    warn: bool = True,
) -> ProtocolOutput:
    """Run ``predict`` on every fold (``seed`` assigns them, None in the samples' order, keeping ``groups`` whole) or
    on the fixed split when ``test_x`` is given; ``warn`` as for :func:`stratified_folds`."""
    num_classes = len(class_names)
    if test_x is None:
        folds = stratified_folds(train_y, class_names, n_splits, seed, groups, warn)
        eval_x, eval_y = train_x, train_y
    else:
        if test_y is None:
            raise ValueError("test_y is required with test_x")
        if train_y.size == 0:
            raise ValueError("the training features hold no images")
        require_two_classes(train_y, class_names, " in the training features")
        folds = [Fold(np.arange(train_y.size), np.arange(test_y.size))]
        eval_x, eval_y = test_x, test_y
    truths: list[np.ndarray] = []
    preds: dict[str, list[np.ndarray]] = {}
    pooled: dict[str, np.ndarray] = {}
    # (log lines, e.g. a solver's warnings, print above the progress bar, not glued to it)
    with logging_redirect_tqdm() if progress else nullcontext():
        for fold in tqdm(folds, desc="folds", disable=not progress or len(folds) == 1):
            train_index, test_index = fold.train_index, fold.test_index
            scores = predict(train_x[train_index], train_y[train_index], eval_x[test_index], num_classes)
            truths.append(eval_y[fold.test_index])
            for method, method_scores in scores.items():
                prediction = np.argmax(method_scores, axis=1)
                preds.setdefault(method, []).append(prediction)
                pooled.setdefault(method, np.full(eval_y.size, -1, dtype=np.int64))[fold.test_index] = prediction
    n_train = [fold.train_index.size for fold in folds]
    results = {
        method: score_folds(truths, method_preds, class_names, n_train) for method, method_preds in preds.items()
    }
    test_folds = None
    if test_x is None:
        test_folds = np.empty(eval_y.size, dtype=np.int64)
        for number, fold in enumerate(folds):
            test_folds[fold.test_index] = number
    return ProtocolOutput(results, pooled, test_folds)


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    """The cross-validation options: fold count, fold seed and folds by group."""
    parser.add_argument("--n-splits", type=int, default=5, help="folds of the stratified CV (default 5)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the (shuffled) fold assignment (default 0)")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="folds in the order of the features file, unshuffled, as DinoBloom's StratifiedKFold(5) "
                        "over its files (see the README); --seed is then not used")
    parser.add_argument("--group-by", default=None, metavar="REGEX",
                        help="keep the images of a group (a patient) in one fold: the regex's match, or its first "
                             r"group, in each stored path, e.g. 'Patient_\d+' (default: folds of images)")


def fold_seed(args: argparse.Namespace) -> int | None:
    """The seed that the fold options give :func:`stratified_folds` (None: unshuffled)."""
    return None if args.no_shuffle else int(args.seed)


def fold_order(args: argparse.Namespace) -> str:
    """How the fold options assign the folds, in words for the reports."""
    return "unshuffled, in the features file's order" if args.no_shuffle else f"shuffled with seed {args.seed}"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the kNN and linear-probe CLIs."""
    parser.add_argument("--config", help="YAML file of option values (keys = option names); flags override it")
    parser.add_argument("--features", required=True, help="features file (.h5/.npz) from dinov2.eval.extract_features")
    parser.add_argument("--test-features", help="evaluate on this file instead of cross-validating --features")
    parser.add_argument("--shared-classes", action="store_true",
                        help="with --test-features: train and test on only the classes both files hold (by name), "
                        "dropping the others' samples from each side (default: every test class must be a training "
                        "class)")
    parser.add_argument(
        "--output-dir", required=True, help="folder for results.json, results.md, predictions.csv and figures"
    )
    add_fold_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--no-figures", action="store_true", help="no figures: results.json, results.md and predictions.csv only"
    )


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` become defaults that explicit flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"config file not found: {path}")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            parser.error(f"{path}: cannot parse the YAML: {err}")
        if not isinstance(config, dict):
            parser.error(f"{path}: expected a mapping of option names to values")
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        defaults = {}
        for key, value in config.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                close = closest_key(dest, list(actions))
                hint = f"; did you mean {close!r}?" if close else ""
                parser.error(f"{path}: unknown key {key!r}{hint} (valid: {sorted(actions)})")
            action = actions[dest]
            if value is None and action.nargs != "+":  # null: the option's own default (rule), as if it were not set
                continue
            many = action.nargs in ("+", "*")
            values = list(value) if many and isinstance(value, (list, tuple)) else [value]
            if action.nargs == "+" and (not values or None in values):
                parser.error(f"{path}: {key} needs at least one value, got {value!r}")
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                if not isinstance(value, bool):  # "false" (a string) would be true
                    parser.error(f"{path}: {key} must be true or false, got {value!r}")
            elif action.type is not None:
                try:  # through str, as from the command line: 20.7 or true is not an int
                    values = [v if v is None else action.type(v if isinstance(v, str) else str(v)) for v in values]
                except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                    parser.error(f"{path}: {key}={value!r} is not a valid value ({err})")
            for v in values:
                if action.choices is not None and v not in action.choices:
                    parser.error(f"{path}: {key}={v!r} is not one of {list(action.choices)}")
            action.required = False
            defaults[dest] = values if many else values[0]
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


#: results.json's ``meta["std"]`` of cross-validation, and its ``meta["pooled"]`` (kNN, linear probe, MIL).
STD_OVER_FOLDS = "population standard deviation over folds (numpy ddof=0)"
POOLED_OUT_OF_FOLD = "per_class and confusion_matrix pool the out-of-fold predictions (rows: true class)"


def features_meta(path: str | Path, feature_set: FeatureSet) -> dict[str, Any]:
    """The ``meta`` fields of a results file that describe the features file it scored: path, model, weights, width."""
    return {
        "features": str(path),
        "model": feature_set.meta.get("model"),
        "weights": feature_set.meta.get("weights"),
        "embed_dim": int(feature_set.features.shape[1]),
    }


def fold_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The ``meta`` fields of a results file that describe its cross-validation folds (:func:`add_fold_arguments`)."""
    return {"n_splits": int(args.n_splits), "fold_seed": fold_seed(args), "folds": fold_order(args),
            "group_by": args.group_by}  # fmt: skip


def provenance_meta() -> dict[str, Any]:
    """The ``meta`` fields of a results file that say which version wrote it, and when."""
    from dinov2 import __version__

    return {
        "dinobloom_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def build_meta(
    args: argparse.Namespace,
    train_set: FeatureSet,
    test_set: FeatureSet | None,
    n_evaluated: int,
    settings: dict[str, Any],
    shared_classes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` block of results.json: inputs, protocol and settings (``shared_classes``: what
    :func:`keep_shared_classes` kept and dropped, None without ``--shared-classes``)."""
    fixed = test_set is not None
    return {
        **features_meta(args.features, train_set),
        "test_features": str(args.test_features) if fixed else None,
        "test_weights": test_set.meta.get("weights") if fixed and test_set is not None else None,
        "n_samples": int(train_set.labels.size),
        "n_test_samples": int(n_evaluated) if fixed else None,
        "classes": list(train_set.class_names),
        "shared_classes": shared_classes,
        "protocol": "train_test" if fixed else "stratified_kfold",
        **(dict.fromkeys(fold_meta(args)) if fixed else fold_meta(args)),  # (one split: no folds)
        "std": "0 by construction (one train/test split has no spread over folds)" if fixed else STD_OVER_FOLDS,
        "pooled": "per_class and confusion_matrix are of the test set's predictions (rows: true class)" if fixed
        else POOLED_OUT_OF_FOLD,
        "settings": settings,
        **provenance_meta(),
    }


def run_cli_protocol(args: argparse.Namespace, predict: Predictor, settings: dict[str, Any]) -> dict[str, Any]:
    """Load the features named by the CLI, run the protocol, write the reports; return the results dict."""
    from dinov2.eval import reports

    reports.prepare_output_dir(args.output_dir)
    if args.shared_classes and not args.test_features:
        raise ValueError("--shared-classes compares the classes of --features and --test-features; "
                         "it needs --test-features")
    train_set = load_features(args.features)
    check_labelled(train_set, args.features)
    test_set = None
    test_x = test_y = None
    shared = None
    if args.test_features:
        test_set = load_features(args.test_features)
        check_labelled(test_set, args.test_features)
        if args.shared_classes:
            train_set, test_set, shared = keep_shared_classes(train_set, test_set, args.features, args.test_features)
        test_y = align_test_set(train_set, test_set, args.features, args.test_features)
        test_x = np.ascontiguousarray(test_set.features)
    train_x = np.ascontiguousarray(train_set.features)
    train_y = np.asarray(train_set.labels, dtype=np.int64)
    logger.info("evaluating %s: %d samples, %d classes", args.features, train_y.size, len(train_set.class_names))
    groups = None
    if args.group_by is not None:
        if args.test_features:
            raise ValueError("--group-by sets the cross-validation folds; --test-features has none")
        groups = path_groups(train_set.paths, args.group_by)
        logger.info("folds keep %d groups (%s) whole", np.unique(groups).size, args.group_by)
    elif not args.test_features:
        warn_if_folds_split_patients(train_set.paths, args.n_splits)
    output = run_protocol(
        train_x, train_y, train_set.class_names, predict, args.n_splits, test_x, test_y, progress=True,
        seed=fold_seed(args),
        groups=groups,
    )
    evaluated = test_set if test_set is not None else train_set
    evaluated_y = test_y if test_y is not None else train_y
    results = {
        "meta": build_meta(args, train_set, test_set, evaluated_y.size, settings, shared),
        **output.results,
    }
    reports.write_report(
        args.output_dir,
        results,
        predictions=output.predictions,
        paths=list(evaluated.paths),
        labels=evaluated_y,
        embedding_features=None if args.no_figures else evaluated.features,
        figures=not args.no_figures,
        folds=output.test_folds,
    )
    for method, result in output.results.items():
        logger.info(
            "%s: balanced accuracy %.4f ± %.4f, weighted F1 %.4f ± %.4f",
            method,
            result["balanced_accuracy"]["mean"],
            result["balanced_accuracy"]["std"],
            result["weighted_f1"]["mean"],
            result["weighted_f1"]["std"],
        )
    return results
