"""Evaluate every teacher checkpoint of a training run, in iteration order (the exported teachers; the resumable
training checkpoints are :mod:`dinov2.checkpoint`'s).

    python -m dinov2.eval.checkpoints --run-dir RUN --data cells/ --output-dir RUN/eval_curve

For each ``RUN/eval/training_<iter>/teacher_checkpoint.pth`` (and ``RUN/eval/training_init/``, the teacher
before the first step) the features of ``--data`` are extracted (architecture inferred from the checkpoint) and
scored with the kNN protocol (k = 1, 20 by default; 5-fold stratified CV) and, with ``--methods knn logreg``, the
linear probe. Writes checkpoints.json, checkpoints.md and checkpoints.png (balanced accuracy against iteration)
after each checkpoint. Iterations are counted as steps completed: ``training_<i>`` was exported after step ``i``
(counted from 0), so it is reported as iteration ``i + 1``, and ``training_init`` as iteration 0. Run again with
the same settings (after an interruption, or once a run still training has exported more), the command keeps the
scores of the checkpoints it scored already (the same file, by its SHA-256) and scores the others. A damaged
export is skipped with a warning and named in the results' ``skipped_checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2.cli import non_negative_int, positive_int
from dinov2.data.transforms import EVAL_RESIZES
from dinov2.eval import knn, linear, metrics, protocol, reports
from dinov2.files import atomic_write_text
from dinov2.hub.loader import EXPORT_FILE_NAME
from dinov2.logs import setup_logging

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^training_(\d+|init)$")
METHODS = ("knn", "logreg")


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(steps completed, path)`` of every ``eval/training_<iter|init>/teacher_checkpoint.pth``, in order."""
    if not Path(run_dir).exists():
        raise FileNotFoundError(f"--run-dir {run_dir} does not exist; name a training run's output folder")
    if not Path(run_dir).is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file; name a training run's output folder")
    eval_dir = Path(run_dir) / "eval"
    found = []
    if eval_dir.is_dir():
        for child in eval_dir.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and (child / EXPORT_FILE_NAME).is_file():
                step = 0 if match.group(1) == "init" else int(match.group(1)) + 1
                found.append((step, child / EXPORT_FILE_NAME))
    if not found:
        raise FileNotFoundError(f"no eval/training_<iteration>/teacher_checkpoint.pth under {run_dir}")
    return sorted(found)


def score_features(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    methods: list[str],
    n_splits: int,
    device: torch.device | str,
    ks: tuple[int, ...] = (1, 20),
    seed: int | None = 0,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Summary scores (mean/std over folds) of each method on one feature set."""

    def predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int) -> dict:
        scores: dict[str, np.ndarray] = {}
        if "knn" in methods:
            probabilities = knn.knn_probabilities(train_x, train_y, test_x, ks, num_classes, device=device)
            scores.update({f"knn_{k}": p for k, p in probabilities.items()})
        if "logreg" in methods:
            scores["logreg"] = linear.logreg_sklearn(train_x, train_y, test_x, num_classes)
        return scores

    # (the folds' warnings were said once, before the first checkpoint: check_sweep_settings)
    output = protocol.run_protocol(features, labels, class_names, predict, n_splits, seed=seed, groups=groups,
                                   warn=False)  # fmt: skip
    return {
        method: {name: result[name] for name in metrics.SUMMARY_METRICS} for method, result in output.results.items()
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m dinov2.eval.checkpoints``."""
    from dinov2.eval.image_list import add_list_arguments  # (deferred, as in main)

    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.checkpoints",
        description="Score every eval/training_<iter>/teacher_checkpoint.pth of a run with kNN (and logreg).",
    )
    parser.add_argument("--run-dir", required=True, help="training output directory")
    parser.add_argument("--data", required=True, help="labelled images: <class>/<image> folder or .csv (path,label)")
    add_list_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="folder for checkpoints.json/.md/.png")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["knn"], help="default: knn")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20], help="kNN neighbour counts (default: 1 20)")
    protocol.add_fold_arguments(parser)
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="input size for feature extraction (default: the run's crops.global_crops_size)")
    parser.add_argument("--resize", choices=EVAL_RESIZES, default="bilinear",
                        help="how images are resized (see python -m dinov2.eval.extract_features --help)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    parser.add_argument("--num-workers", type=non_negative_int, default=0,
                        help="image-loading processes for extraction (default 0)")
    parser.add_argument("--keep-features", action="store_true",
                        help="also write features/<checkpoint folder>.h5 (training_init.h5, training_149.h5, ...)")
    return parser


def check_sweep_settings(
    args: argparse.Namespace, paths: list[str], labels: np.ndarray, class_names: list[str]
) -> None:
    """The fold, grouping and kNN settings checked on the listed images' paths and labels, before any checkpoint is
    embedded (the sweep's first extraction can take long)."""
    groups = None if args.group_by is None else protocol.path_groups(paths, args.group_by)
    folds = protocol.stratified_folds(labels, class_names, args.n_splits, protocol.fold_seed(args), groups)
    smallest = min(fold.train_index.size for fold in folds)
    wrong = [k for k in args.k if not 1 <= k <= smallest]
    if "knn" in args.methods and wrong:
        raise ValueError(f"--k {' '.join(map(str, wrong))}: k must lie in [1, {smallest}] (the smallest training fold "
                         f"of {args.n_splits}-fold CV over these {labels.size} images)")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Extract and score the features of each checkpoint; write the table and plot."""
    from dinov2.eval.extract_features import extract_features
    from dinov2.eval.image_list import list_images
    from dinov2.files import file_sha256
    from dinov2.hub.backbones import default_image_size
    from dinov2.hub.loader import CheckpointError

    args = build_parser().parse_args(argv)
    setup_logging()
    device = protocol.resolve_device(args.device)
    output_dir = reports.prepare_output_dir(args.output_dir)
    checkpoints = find_checkpoints(args.run_dir)
    images = list_images(args.data, root=args.root, columns=args.csv_columns, root_setting="--root",
                         columns_setting="--csv-columns")  # labelled? checked before any checkpoint is embedded
    unlabelled = sum(label < 0 for label in images.labels)
    if unlabelled or not images.class_names:
        raise ValueError(
            f"--data {args.data}: {unlabelled} of {len(images.paths)} images have no class; the sweep needs a "
            "<class>/<image> folder or a .csv with a label column"
        )
    check_sweep_settings(args, images.paths, np.asarray(images.labels), images.class_names)
    img_size, why = (args.img_size, None) if args.img_size else default_image_size(checkpoints[0][1])
    logger.info("evaluating %d checkpoints of %s at %d px%s", len(checkpoints), args.run_dir, img_size,
                f" ({why})" if why else "")  # fmt: skip
    settings = {
        "run_dir": str(args.run_dir),
        "data": str(args.data),
        "protocol": "stratified_kfold",
        **protocol.fold_meta(args),
        "img_size": img_size,
        "resize": args.resize,
        "requested_methods": list(args.methods),
        "k": list(args.k),
        "std": protocol.STD_OVER_FOLDS,
    }
    earlier = _earlier_rows(output_dir / "checkpoints.json", settings)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for iteration, path in checkpoints:
        if str(path) in earlier and earlier[str(path)]["weights_sha256"] == file_sha256(path):
            rows.append(earlier[str(path)])
            logger.info("%s: scored by an earlier run of this command with these settings, kept", path.parent.name)
            continue
        target = output_dir / "features" / f"{path.parent.name}.h5" if args.keep_features else None
        try:
            feature_set = extract_features(
                args.data, target, model=None, weights=path, batch_size=args.batch_size,
                num_workers=args.num_workers, img_size=img_size, device=device, resize=args.resize, root=args.root,
                csv_columns=args.csv_columns,
            )
        except CheckpointError as err:  # a damaged export: the others are still scored
            logger.warning("skipping %s: %s", path, err)
            skipped.append(str(path))
            continue
        protocol.check_labelled(feature_set, args.data)
        groups = None if args.group_by is None else protocol.path_groups(feature_set.paths, args.group_by)
        if groups is None and not rows:  # (the same images for every checkpoint: said once)
            protocol.warn_if_folds_split_patients(feature_set.paths, args.n_splits)
        scores = score_features(
            feature_set.features, feature_set.labels, feature_set.class_names, args.methods, args.n_splits, device,
            tuple(args.k), protocol.fold_seed(args), groups,
        )
        digest = feature_set.meta["weights_sha256"]  # (of the very bytes the features came from)
        rows.append({"iteration": iteration, "checkpoint": str(path), "weights_sha256": digest, "results": scores})
        logger.info(
            "%s (after %d steps): %s", path.parent.name, iteration,
            ", ".join(f"{m} {s['balanced_accuracy']['mean']:.4f}" for m, s in scores.items()),
        )
        write_summary(output_dir, settings, rows, skipped)  # after each checkpoint: an interruption keeps the rows
    if not rows:
        raise CheckpointError(f"none of the {len(checkpoints)} checkpoints of {args.run_dir} could be read")
    summary = write_summary(output_dir, settings, rows, skipped)
    appeared = {str(path) for _, path in find_checkpoints(args.run_dir)} - {str(path) for _, path in checkpoints}
    if appeared:
        logger.warning("%d checkpoint(s) appeared while the sweep ran (the run still trains?): run the same command "
                       "again to score them, the others being kept", len(appeared))  # fmt: skip
    print(output_dir / "checkpoints.json")
    return summary


def _earlier_rows(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows, by checkpoint path, of a checkpoints.json written by this command with the same ``settings`` (an
    interrupted sweep, or one run again after new exports appeared); none otherwise, with a warning when the file
    cannot be read or is not this command's."""
    try:
        earlier = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("%s cannot be read (%s): every checkpoint is scored again", path, err)
        return {}
    try:
        same = {key: earlier["meta"].get(key) for key in settings} == json.loads(json.dumps(settings))
        return {row["checkpoint"]: row for row in earlier["checkpoints"] if "weights_sha256" in row} if same else {}
    except (KeyError, TypeError, AttributeError):
        logger.warning("%s is not a summary this command wrote: every checkpoint is scored again", path)
        return {}


def write_summary(
    output_dir: Path, settings: dict[str, Any], rows: list[dict[str, Any]], skipped: list[str]
) -> dict[str, Any]:
    """Write checkpoints.json, checkpoints.md and checkpoints.png for ``rows`` so far; return the summary."""
    rows = sorted(rows, key=lambda row: row["iteration"])
    methods = _methods(rows)
    summary = {
        "meta": {**settings, "methods": methods, "skipped_checkpoints": skipped, **protocol.provenance_meta()},
        "checkpoints": rows,
    }
    reports.write_json(output_dir / "checkpoints.json", summary)
    atomic_write_text(output_dir / "checkpoints.md", markdown_table(rows))
    reports.plot_scores_vs_iteration(
        [row["iteration"] for row in rows],
        {m: [row["results"][m]["balanced_accuracy"]["mean"] for row in rows] for m in methods},
        output_dir / "checkpoints.png",
        ylabel="balanced accuracy (mean over folds)",
    )
    return summary


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    """The scored methods in the order they were run (knn_1, knn_5, knn_20, logreg), not as sorted text."""
    return list(dict.fromkeys(method for row in rows for method in row["results"]))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Iteration x method table of balanced accuracy and weighted F1 (mean ± std over folds)."""
    methods = _methods(rows)
    header = "| iteration | " + " | ".join(f"{m} bal. acc. | {m} weighted F1" for m in methods) + " |"
    lines = ["# Scores per checkpoint", "", header, "|---|" + "---|---|" * len(methods)]
    for row in rows:
        cells = []
        for m in methods:
            r = row["results"][m]
            cells += [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in ("balanced_accuracy", "weighted_f1")]
        lines.append(f"| {row['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
