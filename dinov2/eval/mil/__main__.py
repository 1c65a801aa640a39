"""``python -m dinov2.eval.mil``: patient-level attention-MIL cross-validation on a features file.

    python -m dinov2.eval.mil --features mil.h5 --output-dir results/mil [--bags bags.csv] [--test-patients ids.txt]

Writes results.json (key ``abmil``), results.md, predictions.csv (one row per patient: the predicted class and
the probability of each class, for ROC curves), attention.json / attention.csv (every cell of every test patient
with its attention weight, highest first) and confusion_abmil.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.eval import protocol, reports
from dinov2.eval.features_io import load_features
from dinov2.eval.mil.data import CSV_COLUMNS, bags_from_csv, bags_from_paths
from dinov2.eval.mil.train import MILConfig, cross_validate, patient_positions
from dinov2.logs import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; the MILConfig fields are options with the same names."""
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.mil",
        description="Gated-attention MIL over patient bags of cell features, k-fold CV over patients.",
    )
    parser.add_argument("--config", help="YAML file of option values (keys = option names); flags override it")
    parser.add_argument("--features", required=True, help="features file of the cells (.h5/.npz)")
    parser.add_argument("--output-dir", required=True, help="folder for results.json, attention.csv, ...")
    parser.add_argument("--bags", help="CSV with columns patient,label,path (default: paths <label>/<patient>/<cell>)")
    parser.add_argument(
        "--bag-columns",
        type=bag_columns,
        default=CSV_COLUMNS,
        metavar="PATIENT,LABEL,PATH",
        help="the --bags CSV's names for the patient, label and path columns, e.g. bag_id,bag_label,file for a "
        "manifest (default: patient,label,path)",
    )
    parser.add_argument(
        "--test-patients",
        help="text file of patient IDs (one per line) forming a fixed test set, e.g. DeepAPL's validation cohort; "
        "each of the --n-splits folds over the other patients trains a model that is tested on them",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    parser.add_argument("--no-figures", action="store_true", help="skip the confusion-matrix PNG")
    for field in dataclasses.fields(MILConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(field.default),
            default=field.default,
            help=f"{field.metadata['help']} (default {field.default})",
        )
    return parser


def bag_columns(text: str) -> tuple[str, str, str]:
    """``--bag-columns``: three comma-separated column names, patient, label and path."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) != 3 or not all(names):
        raise argparse.ArgumentTypeError(f"expected three column names, PATIENT,LABEL,PATH; got {text!r}")
    return names  # type: ignore[return-value]


def write_attention(output_dir: Path, records: list[dict[str, Any]]) -> None:
    """attention.json (nested per patient) and attention.csv (one row per cell; UTF-8, an image name that is not UTF-8
    written as its own bytes, as in predictions.csv)."""
    reports.write_json(output_dir / "attention.json", records)
    class_names = list(records[0]["probabilities"]) if records else []
    attention_csv = output_dir / "attention.csv"
    with attention_csv.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        probabilities = [f"p_{c}" for c in class_names]
        writer.writerow(["patient", "label", "prediction", "fold", *probabilities, "path", "attention"])
        for record in records:
            probs = [repr(float(record["probabilities"][c])) for c in class_names]
            for cell in record["cells"]:
                writer.writerow(
                    [record["patient"], record["label"], record["prediction"], record["fold"], *probs,
                     cell["path"], repr(float(cell["attention"]))]
                )
    logger.info("wrote %s, %s", output_dir / "attention.json", attention_csv)


def read_patient_list(path: str | Path) -> list[str]:
    """Patient IDs, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--test-patients: file not found: {path}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return [line for line in lines if line]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the MIL evaluation and write its reports to --output-dir."""
    parser = build_parser()
    args = protocol.parse_args_with_config(parser, argv)
    setup_logging()
    device = protocol.resolve_device(args.device)
    config = MILConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MILConfig)})
    output_dir = reports.prepare_output_dir(args.output_dir)
    feature_set = load_features(args.features)
    if args.bags:
        bag_set = bags_from_csv(feature_set, args.bags, args.bag_columns)
        source = str(args.bags)
    else:
        bag_set = bags_from_paths(feature_set, str(args.features))
        source = str(args.features)
    logger.info(
        "%d patients (%s), %d cells", len(bag_set.bags),
        ", ".join(f"{n}: {c}" for n, c in zip(bag_set.class_names, np.bincount(bag_set.labels))),
        sum(b.features.shape[0] for b in bag_set.bags),
    )
    test_index = None
    if args.test_patients:
        test_index = patient_positions(bag_set, read_patient_list(args.test_patients), str(args.test_patients))
        logger.info("fixed test set: %d patients from %s", test_index.size, args.test_patients)
        if config.val_fraction != MILConfig.val_fraction:
            logger.warning(
                "--val-fraction %s is not used with --test-patients: each fold's held-out part of the other "
                "patients is its validation set (--n-splits sets its size)", config.val_fraction,
            )
    with logging_redirect_tqdm():  # each fold's log lines print above the progress bar, not glued to it
        result, records, probabilities = cross_validate(
            bag_set, config, device, source, progress=True, test_index=test_index
        )
    tested = ~np.isnan(probabilities).any(axis=1)
    results = {
        "meta": {
            **protocol.features_meta(args.features, feature_set),
            "bags": str(args.bags) if args.bags else "paths <label>/<patient>/<cell>",
            "n_samples": int(sum(b.features.shape[0] for b in bag_set.bags)),
            "n_patients": len(bag_set.bags),
            "classes": bag_set.class_names,
            "protocol": (
                "patient_stratified_kfold (shuffled, seeded); validation split of the training patients"
                if test_index is None else
                "fixed test patients; patient_stratified_kfold over the others gives each fold model's training and "
                "validation patients; scores are the mean over the fold models, predictions their mean probability"
            ),
            "pooled": (
                protocol.POOLED_OUT_OF_FOLD
                if test_index is None else
                "per_class, confusion_matrix and ensemble are of the mean-probability predictions, one per test "
                "patient (rows: true class)"
            ),
            "test_patients": str(args.test_patients) if args.test_patients else None,
            "n_splits": config.n_splits,
            "std": protocol.STD_OVER_FOLDS,
            "auroc": "binary: probability of the second class; multi-class: macro one-vs-rest",
            **protocol.provenance_meta(),
        },
        "abmil": result,
    }
    tested_bags = [bag for bag, test in zip(bag_set.bags, tested) if test]
    fold_of = {record["patient"]: record["fold"] for record in records}  # (cross-validation: one fold per patient)
    reports.write_report(
        output_dir,
        results,
        predictions={"abmil": probabilities[tested].argmax(axis=1)},
        probabilities=probabilities[tested],
        paths=[bag.patient for bag in tested_bags],
        labels=bag_set.labels[tested],
        figures=not args.no_figures,
        id_column="patient",
        folds=None if test_index is not None else np.array([fold_of[bag.patient] for bag in tested_bags]),
        keep=[output_dir / "attention.json", output_dir / "attention.csv"],
    )
    write_attention(output_dir, records)
    print(output_dir / "results.json")
    return results


if __name__ == "__main__":
    from dinov2.cli import USER_ERRORS, run_cli

    run_cli(main, errors=(*USER_ERRORS, FloatingPointError))
