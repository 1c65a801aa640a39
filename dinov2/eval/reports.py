"""Evaluation reports: results.json, a Markdown summary, predictions.csv and PNG figures.

Figures use matplotlib's Agg backend (no display needed): one row-normalised confusion
matrix per method, and a 2-D embedding of the features coloured by class (UMAP when
``umap-learn`` is installed, else PCA; the title says which).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dinov2.files import atomic_write_text, check_folder_writable, shown_name

logger = logging.getLogger(__name__)

_MAX_EMBEDDING_POINTS = 5000
_METRIC_TITLES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "weighted_f1": "weighted F1",
    "auroc": "AUROC",
}


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _json_ready(value: Any) -> Any:
    """Convert numpy scalars/arrays and NaN (to null) so that the result is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented strict JSON (NaN becomes null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_json_ready(payload), indent=2, allow_nan=False) + "\n")
    return path


def method_names(results: Mapping[str, Any]) -> list[str]:
    """The method entries of a results dict (every top-level key except ``meta``)."""
    return [key for key in results if key != "meta"]


def _format(score: Mapping[str, float] | None) -> str:
    """'mean ± std' with four decimals, or '-' when absent/undefined."""
    if not score or score.get("mean") is None or not math.isfinite(score["mean"]):
        return "-"
    return f"{score['mean']:.4f} ± {score['std']:.4f}"


def _format_value(value: float | None) -> str:
    """A single score with four decimals, or '-' when absent/undefined."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def markdown_summary(results: Mapping[str, Any]) -> str:
    """A Markdown report: inputs, the summary table (mean ± std over folds) and per-class scores."""
    meta = results.get("meta", {})
    methods = method_names(results)
    columns = [m for m in _METRIC_TITLES if any(m in results[name] for name in methods)]
    lines = ["# Evaluation results", ""]
    for key in ("features", "test_features", "bags", "model", "weights", "test_weights", "embed_dim", "n_samples",
                "n_test_samples", "n_patients", "test_patients", "protocol", "n_splits", "folds", "group_by"):
        if meta.get(key) not in (None, ""):
            lines.append(f"- {key.replace('_', ' ')}: `{meta[key]}`")
    settings = {key: value for key, value in (meta.get("settings") or {}).items() if value is not None}
    if settings:
        lines.append("- settings: " + ", ".join(f"{key} `{value}`" for key, value in settings.items()))
    if meta.get("classes"):
        lines.append(f"- classes: {', '.join(meta['classes'])}")
    shared = meta.get("shared_classes")
    if shared:  # --shared-classes: the scores are of the classes both files hold only
        lines.append(f"- shared classes (`--shared-classes`): trained and tested on the {len(shared['kept'])} classes "
                     "both features files hold")
        for key, side in (("dropped_from_features", "features"), ("dropped_from_test_features", "test features")):
            dropped = shared.get(key) or {}
            listed = ", ".join(f"{name} ({n})" for name, n in dropped.items()) if dropped else "none"
            lines.append(f"  - dropped from the {side}: {listed}")
    if meta.get("std"):  # not "± is the ...": meta["std"] describes a spread over folds, but is a value for one split
        lines.append(f"- ±: {meta['std']}")
    lines += ["", "| method | " + " | ".join(_METRIC_TITLES[c] for c in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for name in methods:
        lines.append(f"| {name} | " + " | ".join(_format(results[name].get(c)) for c in columns) + " |")
        ensemble = results[name].get("ensemble")  # MIL's fixed test set: the fold models' mean probabilities
        if ensemble:
            lines.append(f"| {name}, mean of the fold models | "
                         + " | ".join(_format_value(ensemble.get(c)) for c in columns) + " |")
    # Cross-validation pools every sample's out-of-fold prediction; a fixed split scores its test set.
    cross_validated = str(meta.get("protocol", "stratified_kfold")).startswith(("stratified_kfold", "patient_"))
    pooled = "pooled over folds" if cross_validated else "test set"
    for name in methods:
        per_class = results[name].get("per_class")
        if not per_class:
            continue
        lines += ["", f"## {name}: per class ({pooled})", "", "| class | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        for cls, s in per_class.items():
            lines.append(f"| {cls} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: str | Path) -> Path:
    """Save a confusion matrix (colour: row-normalised recall, text: counts) as a PNG."""
    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [shown_name(name) for name in class_names]
    ax.set_xticks(range(len(class_names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(shown_name(title))
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            colour = "white" if fraction[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write a figure to PNG and close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``features``: UMAP when ``umap-learn`` is importable, else PCA."""
    try:
        import umap
    except ImportError:
        from dinov2.eval.pca import principal_components

        return principal_components(features, 2), "PCA"
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(features), "UMAP"


def plot_embedding(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "features",
    seed: int = 0,
    max_points: int = _MAX_EMBEDDING_POINTS,
) -> Path:
    """Scatter a 2-D embedding of the features coloured by class (a seeded subset above max_points)."""
    plt = pyplot()
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(features.shape[0], max_points, replace=False))
        features, labels = features[keep], labels[keep]
    coords, method = embed_2d(features, seed)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=cmap(c % cmap.N), label=shown_name(name), alpha=0.8)
    ax.set_title(f"{method} of {shown_name(title)} ({features.shape[0]} samples)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_scores_vs_iteration(
    iterations: Sequence[int], scores: Mapping[str, Sequence[float]], path: str | Path, ylabel: str
) -> Path:
    """Line plot of one score per method against the training iteration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in scores.items():
        ax.plot(iterations, values, marker="o", label=name)
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def write_predictions_csv(
    path: str | Path,
    paths: Sequence[str],
    labels: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    id_column: str = "path",
    probabilities: np.ndarray | None = None,
    folds: np.ndarray | None = None,
) -> Path:
    """One row per evaluated sample (or patient): its id, true class and each method's predicted class.

    ``probabilities`` (samples, classes), given for a single method, adds a ``p_<class>`` column per class;
    ``folds`` (the cross-validation fold that tested each sample) a ``fold`` column after the label. The file is
    UTF-8, with an image name that is not (read with ``surrogateescape``) written as its own bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(predictions)
    if probabilities is not None and (len(methods) != 1 or probabilities.shape != (len(paths), len(class_names))):
        raise ValueError(
            f"predictions.csv: probabilities of shape {probabilities.shape} need one method and "
            f"({len(paths)}, {len(class_names)}); got methods {methods}"
        )
    probability_columns = [f"p_{c}" for c in class_names] if probabilities is not None else []
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        fold_column = ["fold"] if folds is not None else []
        writer.writerow([id_column, "label", *fold_column, *methods, *probability_columns])
        for i, sample in enumerate(paths):
            fold = [int(folds[i])] if folds is not None else []
            row = [sample, class_names[labels[i]], *fold, *(class_names[predictions[m][i]] for m in methods)]
            if probabilities is not None:
                row += [repr(float(p)) for p in probabilities[i]]  # all digits: near-ties decide ROC curves
            writer.writerow(row)
    return path


def prepare_output_dir(path: str | Path) -> Path:
    """Check that the output folder ``path`` can be created or written in, or raise one clear ValueError before any
    work is done. The folder is not left created here: the writers create it with the first file, so a command that
    fails leaves no empty folder behind."""
    path = Path(path)
    if os.path.lexists(path) and not os.path.isdir(path):  # (a link to nothing included)
        raise ValueError(f"--output-dir {path} is a file; name a folder for the results")
    check_folder_writable(path, f"--output-dir {path}")
    return path


def _earlier_report_files(output_dir: Path) -> tuple[list[str], list[Path]]:
    """The methods of the report an earlier run of ours left in ``output_dir`` (its results.json, with our
    ``meta.dinobloom_version``) and the files that report wrote: its predictions, its confusion matrices, the
    embedding and MIL's attention files. Nothing when the folder holds no such results.json."""
    try:
        earlier = json.loads((output_dir / "results.json").read_text())
        if not isinstance(earlier, dict) or "dinobloom_version" not in earlier.get("meta", {}):
            return [], []
    except (OSError, ValueError, AttributeError):
        return [], []
    methods = method_names(earlier)
    names = ["predictions.csv", "embedding.png", "attention.json", "attention.csv",
             *(f"confusion_{name}.png" for name in methods)]  # fmt: skip
    return methods, [output_dir / name for name in names if (output_dir / name).is_file()]


def _remove_earlier_report(output_dir: Path, earlier: tuple[list[str], list[Path]], now: Sequence[str],
                          written: set[Path]) -> None:  # fmt: skip
    """Remove the files of an earlier run's report (see :func:`_earlier_report_files`) that this run did not
    write, and say what the new results.json replaced, so that the folder holds one run's report only."""
    methods, files = earlier
    stale = [path for path in files if path not in written]
    for path in stale:
        path.unlink(missing_ok=True)
    replaced = [name for name in methods if name not in now]
    if replaced or stale:
        logger.warning(
            "%s held an earlier run's report%s; this run's replaces it%s", output_dir,
            f" (results of {', '.join(replaced)})" if replaced else "",
            f", and its {', '.join(p.name for p in stale)} were removed" if stale else "",
        )


def write_report(
    output_dir: str | Path,
    results: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray] | None = None,
    paths: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    embedding_features: np.ndarray | None = None,
    figures: bool = True,
    id_column: str = "path",
    probabilities: np.ndarray | None = None,
    folds: np.ndarray | None = None,
    keep: Sequence[Path] | None = None,
) -> dict[str, Path]:
    """Write results.json, results.md, predictions.csv (when given) and the figures; return their paths.

    ``probabilities`` (samples, classes) of a single method become predictions.csv's ``p_<class>`` columns, and
    ``folds`` (the fold that tested each sample) its ``fold`` column. The files of an earlier run's report in
    ``output_dir`` that this run does not write are removed, except those in ``keep`` (which the caller writes
    next).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    class_names = results["meta"]["classes"]
    earlier = _earlier_report_files(output_dir)
    written = {"json": write_json(output_dir / "results.json", results)}
    written["markdown"] = atomic_write_text(output_dir / "results.md", markdown_summary(results))
    if predictions is not None and paths is not None and labels is not None:
        written["predictions"] = write_predictions_csv(
            output_dir / "predictions.csv", paths, labels, predictions, class_names, id_column, probabilities, folds
        )
    if figures:
        for name in method_names(results):
            ensemble = results[name].get("ensemble")  # then the matrix is the ensemble's, and so is the title
            if ensemble:
                score = _format_value(ensemble["balanced_accuracy"])
            else:
                score = _format(results[name]["balanced_accuracy"])
            title = f"{name}: balanced accuracy {score}"
            written[f"confusion_{name}"] = plot_confusion(
                results[name]["confusion_matrix"], class_names, title, output_dir / f"confusion_{name}.png"
            )
        if embedding_features is not None and labels is not None:
            model = results["meta"].get("model") or "features"
            written["embedding"] = plot_embedding(
                embedding_features, labels, class_names, output_dir / "embedding.png", title=str(model)
            )
    logger.info("wrote %s", ", ".join(str(p) for p in written.values()))
    _remove_earlier_report(output_dir, earlier, method_names(results), {*written.values(), *(keep or ())})
    return written
