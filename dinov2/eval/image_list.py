"""The images an evaluation command embeds: a folder of class folders, a ``.txt`` list or a ``.csv`` list.

A folder is searched recursively and its first folder level is the label (``<class>/.../<image>``; images directly in
it are unlabelled); a ``.txt`` list is read by the rules of the training lists (unlabelled); a ``.csv`` list has a
path column and an optional label column. See :mod:`dinov2.eval.extract_features` for the command.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinov2.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    check_image_path,
    find_images,
    read_list_entries,
    spot_checks,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageList:
    """Images to embed: paths relative to `root` (or absolute), labels (-1 = none) and class names."""

    root: Path
    paths: list[str]
    labels: list[int]
    class_names: list[str]


def _labelled(root: Path, paths: list[str], names: list[str | None]) -> ImageList:
    class_names = sorted({n for n in names if n})
    index = {n: i for i, n in enumerate(class_names)}
    return ImageList(root, paths, [index[n] if n else -1 for n in names], class_names)


#: The CSV columns of the image path and the label when `--csv-columns` names none.
CSV_COLUMNS = ("path", "label")


def csv_columns(text: str) -> tuple[str, str | None]:
    """``--csv-columns``: the CSV's names of the path column and, optionally, the label column (``file,label``)."""
    names = [name.strip() for name in text.split(",")]
    if len(names) not in (1, 2) or not all(names):
        raise argparse.ArgumentTypeError(f"expected PATH or PATH,LABEL column names, e.g. file,label; got {text!r}")
    return names[0], names[1] if len(names) == 2 else None


def _read_list(
    data: Path, root: Path, columns: tuple[str, str | None] | None, columns_setting: str | None = None
) -> ImageList:
    """The images of a `.txt` (unlabelled) or `.csv` list (`columns`: the path and label column names; None: `path`
    and, if there is one, `label`; `columns_setting`: the option that sets them, for errors), relative paths taken
    from `root`."""
    if data.suffix.lower() == ".txt":  # the training lists' format, read by the same rules
        paths = read_list_entries(data, root)
        return ImageList(root, paths, [-1] * len(paths), [])
    path_column, label_column = columns or CSV_COLUMNS
    paths: list[str] = []
    labels: list[str | None] = []
    first_line: dict[str, int] = {}  # normalised path -> the line that listed it
    unlabelled: list[int] = []  # the lines with an empty label
    with data.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
        reader = csv.DictReader(f)
        found = reader.fieldnames or []
        if not found:
            raise DatasetError(f"{data} is empty: a CSV image list needs a header row naming its columns")
        missing = [c for c in (path_column, label_column if columns else None) if c is not None and c not in found]
        if missing:
            how = (
                f"; name its path and label columns with {columns_setting}, e.g. file,label" if columns_setting else ""
            )
            raise DatasetError(
                f"{data}: a CSV image list needs a {missing[0]!r} column (found {reader.fieldnames}){how}"
            )
        for row in reader:
            path = (row.get(path_column) or "").strip()
            if not path:
                continue
            check_image_path(path, f"{data}:{reader.line_num}")  # as in a .txt list
            key = os.path.abspath(root / os.path.expanduser(path))  # (an absolute path stays as it is)
            if key in first_line:  # cross-validation would test such an image on its own copy
                raise DatasetError(
                    f"{data}:{reader.line_num}: {path} is listed again (first on line {first_line[key]}); list each "
                    "image once, or cross-validation tests images on their own copies"
                )
            first_line[key] = reader.line_num
            paths.append(os.path.expanduser(path))
            label = ((row.get(label_column) or "").strip() or None) if label_column in found else None
            labels.append(label)
            if label is None and label_column in found:
                unlabelled.append(reader.line_num)
    if unlabelled:
        more = f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""
        logger.warning(
            "%s: %d row(s) have an empty %r: lines %s%s; they are kept unlabelled (label -1), which the kNN and linear "
            "probes refuse", data, len(unlabelled), label_column, ", ".join(map(str, unlabelled[:5])), more,
        )
    return _labelled(root, paths, labels)


def _warn_of_images_beside_classes(data: Path, rel: Sequence[Path]) -> None:
    """Warn when a folder of class folders also holds images directly: they are unlabelled, which the probes
    refuse. A folder of images only (no class folders) is an unlabelled set, and says nothing."""
    loose = [r.as_posix() for r in rel if len(r.parts) == 1]
    if not loose or len(loose) == len(rel):
        return
    more = f" and {len(loose) - 5} more" if len(loose) > 5 else ""
    logger.warning(
        "%s: %d image(s) lie directly in the folder, beside its class folders: %s%s; they have no class and are kept "
        "unlabelled (label -1), which the kNN and linear probes refuse: move them into a class folder, or elsewhere",
        data, len(loose), ", ".join(loose[:5]), more,
    )


def check_list_paths(data: str | os.PathLike[str], image_list: ImageList, root_setting: str | None = None) -> None:
    """Refuse the list ``data`` (read into ``image_list``) when none of :data:`LIST_SPOT_CHECKS` evenly spaced images
    of it exists (paths relative to another folder, or from another machine), before any model is loaded; single
    missing images are skipped later. A folder is not checked. ``root_setting`` names the option that sets the
    folder relative paths are read from, for the error message."""
    data = Path(data).expanduser()
    paths = image_list.paths
    if data.is_dir() or not paths:
        return
    sample = spot_checks(paths)
    if any(os.path.isfile(image_list.root / path) for path in sample):
        return
    if image_list.root == data.parent:
        where = f"the list's folder, {image_list.root}"
        how = f"; {root_setting} names another" if root_setting else ""
    else:
        where, how = f"{root_setting or 'root'} {image_list.root}", ""
    raise DatasetError(
        f"{data}: none of the {len(sample)} images looked up exists, e.g. {image_list.root / sample[0]} (a relative "
        f"path is read from {where}{how})"
    )


def list_images(
    data: str | os.PathLike[str],
    setting: str = "--data",
    *,
    root: str | os.PathLike[str] | None = None,
    columns: tuple[str, str | None] | None = None,
    root_setting: str | None = None,
    columns_setting: str | None = None,
) -> ImageList:
    """Collect the images of a folder, `.txt` list or `.csv` list (see the module docstring for labels).

    ``setting`` names where ``data`` came from in error messages (an option or a config key). For a list, ``root``
    is the folder its relative paths are relative to (default: the list's folder) and ``columns`` the CSV's path and
    label column names (default: ``path`` and, if there is one, ``label``); ``root_setting`` and ``columns_setting``
    name the options that set them, for error messages. Whether the listed images exist is
    :func:`check_list_paths`'s to check.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"{setting} not found: {data}")
    is_list = data.suffix.lower() in (".txt", ".csv") and data.is_file()
    if root is not None and not is_list:
        raise DatasetError(f"{root_setting or 'root'} applies to a .txt or .csv list, and {setting}={data} is none")
    if columns is not None and not (is_list and data.suffix.lower() == ".csv"):
        raise DatasetError(f"{columns_setting or 'columns'} applies to a .csv list, and {setting}={data} is none")
    if data.is_dir():
        rel = sorted(Path(path).relative_to(data) for path in find_images(data))  # by folder, then name
        labels = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
        image_list = _labelled(data, [r.as_posix() for r in rel], labels)
        _warn_of_images_beside_classes(data, rel)
    elif is_list:
        list_root = data.parent if root is None else Path(root).expanduser()
        if not list_root.is_dir():
            raise FileNotFoundError(f"{root_setting or 'root'} {list_root} is not a folder")
        try:
            image_list = _read_list(data, list_root, columns, columns_setting)
        except UnicodeDecodeError as err:
            raise DatasetError(f"{data}: an image list must be UTF-8 text, not UTF-16 or a Windows code page ({err})")
    else:
        raise DatasetError(f"{setting} must be a folder, a .txt or a .csv list of images, got {data}")
    if not image_list.paths:
        raise DatasetError(f"{setting}={data}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return image_list


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    """``--csv-columns`` and ``--root``: how a ``--data`` list is read (see :func:`list_images`)."""
    parser.add_argument(
        "--csv-columns", type=csv_columns, default=None, metavar="PATH[,LABEL]",
        help="the --data CSV's names of the path and label columns, e.g. file,label for a manifest (default: path "
        "and, if there is one, label; a single name: unlabelled)",
    )
    parser.add_argument(
        "--root", default=None,
        help="folder that relative paths in a --data list are relative to (default: the list's folder)",
    )
