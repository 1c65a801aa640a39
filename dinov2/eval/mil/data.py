"""Patient bags of cell features for multiple-instance learning.

A bag is one patient: the features of its cells and the patient's label. Bags come from
the stored paths ``<label>/<patient>/<cell>`` of a features file (as extracted from a
folder such as ``mil/APL/Patient_00/000.jpg``), or from a CSV with the columns
``patient,label,path`` whose paths name the cells of the features file.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from dinov2.eval.features_io import FeatureSet

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("patient", "label", "path")


@dataclass
class Bag:
    """One patient: cell features (n, D), the cells' paths and the class index of the patient."""

    patient: str
    label: int
    features: np.ndarray
    paths: list[str]


@dataclass
class BagSet:
    """All patients with the class names their labels index."""

    bags: list[Bag]
    class_names: list[str]

    @property
    def labels(self) -> np.ndarray:
        """Patient labels (n_patients,)."""
        return np.asarray([bag.label for bag in self.bags], dtype=np.int64)


def _assemble(
    feature_set: FeatureSet, rows: Sequence[tuple[str, str, int]], source: str, from_paths: bool = False
) -> BagSet:
    """Group (patient, label name, feature row) triples into bags, checking one label per patient; ``from_paths``:
    the triples were read from the paths (:func:`bags_from_paths`), which a label conflict then explains."""
    class_names = sorted({label for _, label, _ in rows})
    patient_label: dict[str, str] = {}
    members: dict[str, list[int]] = {}
    for patient, label, row in rows:
        if patient_label.setdefault(patient, label) != label:
            read_as = (
                f"; each path is read as [<cohort>/...]<label>/<patient>/<cell>, so {feature_set.paths[row]!r} is a "
                f"cell of patient {patient!r} of class {label!r}: for another layout pass --bags CSV"
            ) if from_paths else ""  # fmt: skip
            raise ValueError(
                f"{source}: patient {patient!r} has cells labelled both {patient_label[patient]!r} and {label!r} (if "
                f"these are two patients, give their folders names that differ across classes, or pass --bags CSV)"
                f"{read_as}"
            )
        members.setdefault(patient, []).append(row)
    bags = [
        Bag(
            patient=patient,
            label=class_names.index(patient_label[patient]),
            features=feature_set.features[index],
            paths=[feature_set.paths[i] for i in index],
        )
        for patient, index in sorted(members.items())
    ]
    return BagSet(bags, class_names)


def bags_from_paths(feature_set: FeatureSet, source: str = "features file") -> BagSet:
    """Bags from paths ``[<cohort>/...]<label>/<patient>/<cell>``.

    A bag is a patient folder, named by the folder; when folders of one name lie under different parents above
    the label level (``cohortA/APL/P01``, ``cohortB/APL/P01``) they are different patients, named with that
    parent (``cohortA/P01``). One patient folder under two labels is an error.
    """
    entries = []
    for row, path in enumerate(feature_set.paths):
        parts = PurePosixPath(path.replace("\\", "/")).parts
        if len(parts) < 3:
            raise ValueError(
                f"{source}: path {path!r} is not <label>/<patient>/<cell>; extract the features from a folder "
                "laid out that way, or pass --bags CSV with columns patient,label,path"
            )
        entries.append((PurePosixPath(*parts[:-3]).as_posix() if len(parts) > 3 else "", parts[-2], parts[-3], row))
    parents: dict[str, set[str]] = {}
    for parent, patient, _, _ in entries:
        parents.setdefault(patient, set()).add(parent)
    rows = [
        (f"{parent}/{patient}" if parent and len(parents[patient]) > 1 else patient, label, row)
        for parent, patient, label, row in entries
    ]
    return _assemble(feature_set, rows, source, from_paths=True)


def _suffixes(path: str) -> list[str]:
    """The path and each of its shorter trailing component sequences (``a/b/c``, ``b/c``, ``c``)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _path_index(paths: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The rows of ``paths`` by each trailing component sequence of their path, and by their whole path."""
    by_suffix: dict[str, list[int]] = {}
    by_path: dict[str, list[int]] = {}
    for row, path in enumerate(paths):
        suffixes = _suffixes(path)
        for suffix in suffixes:
            by_suffix.setdefault(suffix, []).append(row)
        by_path.setdefault(suffixes[0] if suffixes else "", []).append(row)
    return by_suffix, by_path


def _matching_rows(path: str, by_suffix: dict[str, list[int]], by_path: dict[str, list[int]]) -> list[int]:
    """Feature rows whose path ends with all of ``path``'s components, else those whose whole path ``path`` ends with.

    Of the latter, the longest (most components in common) win; folders that differ never match.
    """
    tails = _suffixes(path)
    if tails and tails[0] in by_suffix:
        return by_suffix[tails[0]]
    return next((by_path[tail] for tail in tails[1:] if tail in by_path), [])


def bags_from_csv(
    feature_set: FeatureSet, csv_path: str | Path, columns: tuple[str, str, str] = CSV_COLUMNS
) -> BagSet:
    """Bags from a CSV whose ``columns`` name the patient, the label and the cell path (default patient,label,path).

    A CSV path matches the one feature path that ends with it or that it ends with, compared by whole path
    components (``mil/APL/P1/a.jpg`` and ``APL/P1/a.jpg`` match; ``AML/P3/a.jpg`` and ``APL/P1/a.jpg`` do not).
    Rows that match no feature path are an error, unless they are unreadable images that the extraction skipped
    (``meta["skipped_paths"]``; for files without that list, no more of them than ``meta["n_skipped"]``): those are
    left out with a warning that names any patient left with no cells. A blank patient, label or path is an error.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"bags CSV not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a BOM
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise ValueError(f"{csv_path} is empty: a bag list needs a header row naming its columns")
        missing = [c for c in columns if c not in reader.fieldnames]
        if missing:
            raise ValueError(
                f"{csv_path}: missing columns {missing} (found {reader.fieldnames}); name the patient, label and path "
                "columns with --bag-columns, e.g. --bag-columns bag_id,bag_label,file"
            )
        entries = []
        for row in reader:
            entry = tuple((row[column] or "").strip() for column in columns)  # (None: a row cut short)
            blank = [column for column, value in zip(columns, entry) if not value]
            if blank:
                raise ValueError(f"{csv_path}, line {reader.line_num}: no {' and no '.join(blank)}")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{csv_path}: no rows")
    by_suffix, by_path = _path_index(feature_set.paths)
    rows, unmatched, absent = [], [], []
    claimed: dict[int, tuple[str, str]] = {}  # feature row -> (patient, CSV path) that matched it first
    for patient, label, path in entries:
        match = _matching_rows(path, by_suffix, by_path)
        if len(match) != 1:  # none, or several that the CSV path cannot tell apart
            (absent if not match else unmatched).append(path)
            continue
        row = match[0]
        if row in claimed:  # one cell in two bags (or twice in one) would leak between folds
            first_patient, first_path = claimed[row]
            raise ValueError(
                f"{csv_path}: {path!r} (patient {patient!r}) and {first_path!r} (patient {first_patient!r}) match the "
                f"same features row, {feature_set.paths[row]!r}; each cell must be listed once and its path must tell "
                "it apart (add the folders that differ)"
            )
        claimed[row] = (patient, path)
        rows.append((patient, label, row))
    skipped = int(feature_set.meta.get("n_skipped") or 0)
    if absent and not unmatched and _all_skipped(absent, feature_set.meta.get("skipped_paths"), skipped):
        absent_paths = set(absent)
        left_out = sorted({patient for patient, _, path in entries if path in absent_paths}
                          - {patient for patient, _, _ in rows})  # fmt: skip
        logger.warning(
            "%s: %d cell paths match no path of the features file, whose extraction skipped %d unreadable images; "
            "leaving them out, e.g. %s%s", csv_path, len(absent), skipped, absent[:3],
            f"; patients left with no cells: {left_out}" if left_out else "",
        )
        absent = []
    if unmatched or absent:
        raise ValueError(
            f"{csv_path}: {len(unmatched) + len(absent)} of {len(entries)} cell paths match no single path of the "
            f"features file, e.g. {(unmatched + absent)[:3]} ({len(absent)} match none; its extraction skipped "
            f"{skipped} unreadable images)"
        )
    return _assemble(feature_set, rows, str(csv_path))


def _all_skipped(absent: list[str], skipped_paths: str | None, n_skipped: int) -> bool:
    """Whether the CSV paths that match no feature are images the extraction skipped: by path where the features
    file lists them (``meta["skipped_paths"]``, a JSON list), else (older files) by count."""
    if skipped_paths is None:
        return len(absent) <= n_skipped
    by_suffix, by_path = _path_index(json.loads(skipped_paths))
    return all(_matching_rows(path, by_suffix, by_path) for path in absent)


def check_bags(bag_set: BagSet, n_splits: int, source: str) -> None:
    """Raise unless ``n_splits`` is at least 2, there are two classes and every class has ``n_splits`` patients."""
    if n_splits < 2:
        raise ValueError(f"--n-splits must be at least 2, got {n_splits}")
    counts = np.bincount(bag_set.labels, minlength=len(bag_set.class_names))
    if len(bag_set.class_names) < 2:
        only = bag_set.class_names[0] if bag_set.class_names else "none"
        raise ValueError(f"{source}: MIL needs at least 2 classes, found only {only!r}")
    small = [f"{name!r} ({count})" for name, count in zip(bag_set.class_names, counts) if count < n_splits]
    if small:
        raise ValueError(
            f"{source}: {n_splits}-fold CV over patients needs {n_splits} patients per class; too few in "
            f"{', '.join(small)}"
        )


def collate(bags: Sequence[Bag], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to (B, n_max, D) with a boolean mask of real cells; returns (x, mask, labels). A bag without cells
    is a ValueError (its attention, a softmax over no cell, would be NaN)."""
    empty = [bag.patient for bag in bags if bag.features.shape[0] == 0]
    if empty:
        raise ValueError(f"bag(s) without cells: {', '.join(empty[:5])}; a patient needs at least one cell")
    n_max = max(bag.features.shape[0] for bag in bags)
    dim = bags[0].features.shape[1]
    x = torch.zeros(len(bags), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        n = bag.features.shape[0]
        x[i, :n] = torch.from_numpy(np.asarray(bag.features, dtype=np.float32))
        mask[i, :n] = True
    labels = torch.as_tensor([bag.label for bag in bags], dtype=torch.int64)
    return x.to(device), mask.to(device), labels.to(device)
