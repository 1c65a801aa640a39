"""Read and write features files: `.h5` (HDF5) or `.npz`, chosen by the file suffix.

Layout (both formats): `features` float32 (N, D), `labels` int64 (N,) with -1 for unlabelled samples,
`paths` (N,) utf-8 strings relative to the data root, `class_names` (list of str; a JSON attribute in
HDF5, a str array in npz), and metadata such as `model`, `weights` and `embed_dim` (HDF5 attributes,
0-d arrays in npz).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2.cli import check_file_writable
from dinov2.files import atomic_write, shown_name

ARRAY_NAMES = ("features", "labels", "paths")
_RESERVED = (*ARRAY_NAMES, "class_names")
_SUFFIXES = (".h5", ".hdf5", ".npz")
_MADE_BY = "features files (.h5 or .npz) come from python -m dinov2.eval.extract_features"


@dataclass
class FeatureSet:
    """Features of N images with their labels, relative paths, class names and extraction metadata."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _check_suffix(path: Path, hint: bool = False) -> str:
    """The format (suffix) of a features file; ``hint``: an error also says where features files come from."""
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported features file type {suffix!r}; use one of {', '.join(_SUFFIXES)}"
                         + ("; features files come from python -m dinov2.eval.extract_features" if hint else ""))
    return suffix


def check_writable(path: Path) -> str:
    """The format of an output features file (its suffix), once its name and folder are known to be usable."""
    if path.is_dir():  # (said first: a folder's name has no suffix, or not a features file's)
        raise ValueError(f"cannot write {path}: it is a folder; name a file ending in {' or '.join(_SUFFIXES)}")
    suffix = _check_suffix(path)
    check_file_writable(path)
    return suffix


def check_names_storable(path: Path, names: Sequence[str], root: Path, others: Sequence[str] = ()) -> None:
    """Refuse, before any work, image names (under ``root``) and other texts the file records (folders, weights)
    that the output's format cannot store: an HDF5 file stores UTF-8 text, and a file name may be in another
    encoding (an .npz keeps it)."""
    if _check_suffix(path) == ".npz":
        return
    for text, shown_under in [(str(root), None), *((other, None) for other in others), *((n, root) for n in names)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = shown_name(text)
            raise ValueError(
                f"{shown_under / shown if shown_under else shown}: the name is not UTF-8, which an HDF5 file "
                f"({path.suffix}) cannot store; write an .npz instead (--output NAME.npz), or rename it"
            ) from None


def _plain(value: Any) -> Any:
    """numpy scalars / bytes to plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    labels: np.ndarray | Sequence[int],
    paths: Sequence[str],
    class_names: Sequence[str],
    meta: Mapping[str, str | int | float | bool] | None = None,
) -> Path:
    """Write a features file (format from the suffix), atomically via a temporary file; returns the path."""
    path = Path(path)
    suffix = check_writable(path)
    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    paths = [str(p) for p in paths]
    class_names = [str(c) for c in class_names]
    meta = dict(meta or {})
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {features.shape}")
    n = features.shape[0]
    if labels.shape != (n,) or len(paths) != n:
        raise ValueError(f"{n} feature rows but labels of shape {labels.shape} and {len(paths)} paths")
    if n and (labels.min() < -1 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [-1, {len(class_names) - 1}] for {len(class_names)} class names")
    clashes = sorted(set(meta) & set(_RESERVED))
    if clashes:
        raise ValueError(f"metadata keys {clashes} clash with the array names {_RESERVED}")
    bad = sorted(k for k, v in meta.items() if not isinstance(v, (str, int, float, bool, np.generic)))
    if bad:
        raise TypeError(f"metadata values must be str/int/float/bool; not so for {bad}")

    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        if suffix == ".npz":
            arrays = {name: np.asarray(value) for name, value in meta.items()}
            with open(tmp, "wb") as f:  # (given a name, np.savez would append .npz to a `.NPZ` one)
                np.savez(
                    f,
                    features=features,
                    labels=labels,
                    paths=np.asarray(paths, dtype=np.str_),
                    class_names=np.asarray(class_names, dtype=np.str_),
                    **arrays,
                )
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=features)
                f.create_dataset("labels", data=labels)
                f.create_dataset("paths", data=paths, dtype=h5py.string_dtype("utf-8"))
                f.attrs["class_names"] = json.dumps(class_names)
                for key, value in meta.items():
                    f.attrs[key] = value

    # (a save killed before its rename left a full-size copy: atomic_write removes it)
    return atomic_write(path, write)


def load_features(path: str | os.PathLike[str]) -> FeatureSet:
    """Read a features file written by `save_features` (or any file with the same layout)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a features file; {_MADE_BY}")
    if not path.exists():
        raise FileNotFoundError(f"features file not found: {path}; {_MADE_BY}")
    suffix = _check_suffix(path, hint=True)
    if suffix == ".npz":
        # np.load falls back to pickle for anything that is not a zip or .npy: check the format first.
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a readable .npz features file (not a zip archive)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a readable .npz features file ({err})") from err
        missing = [k for k in _RESERVED if k not in arrays]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing} (found {list(arrays)})")
        features, labels = arrays["features"], arrays["labels"]
        paths, class_names = arrays["paths"].tolist(), arrays["class_names"].tolist()
        meta = {k: _plain(v) for k, v in arrays.items() if k not in _RESERVED}
    else:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ARRAY_NAMES if k not in f]
                if missing:
                    raise ValueError(f"{path}: missing datasets {missing} (found {sorted(f)})")
                if "class_names" not in f.attrs:
                    raise ValueError(f"{path}: missing the 'class_names' attribute")
                features, labels = f["features"][()], f["labels"][()]
                paths = [str(p) for p in f["paths"].asstr()[()]]
                class_names = json.loads(_plain(f.attrs["class_names"]))
                meta = {k: _plain(v) for k, v in f.attrs.items() if k != "class_names"}
        except OSError as err:  # h5py's error for a file that is not HDF5, truncated or damaged
            raise ValueError(f"{path}: not a readable HDF5 features file ({err})") from err
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or labels.shape != (features.shape[0],) or len(paths) != features.shape[0]:
        raise ValueError(
            f"{path}: inconsistent sizes: features {features.shape}, labels {labels.shape}, {len(paths)} paths"
        )
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise ValueError(
            f"{path}: the features of {bad_rows.size} of {features.shape[0]} images are not finite (NaN or inf), "
            f"e.g. {paths[bad_rows[0]]}: extract them again (a model or precision that overflows gives these)"
        )
    return FeatureSet(features, labels, [str(p) for p in paths], [str(c) for c in class_names], meta)


__all__ = ["FeatureSet", "load_features", "save_features"]
