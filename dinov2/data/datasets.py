"""The image dataset: file lists (DinoBloom's ``HemaStandardDataset``) or image folders.

``FileListDataset(root)`` accepts

* a folder of ``.txt`` file lists (every ``.txt`` file directly inside it, any case, hidden ones such as macOS
  ``._name.txt`` left out, in name order), as DinoBloom's ``HemaStandardDataset``: UTF-8 text (a byte-order
  mark is allowed), one image path per line, absolute or relative to the list's folder; blank lines and lines
  starting with ``#`` are ignored; an image name that is not UTF-8 may appear as its raw bytes;
* a single ``.txt`` file list;
* an image folder, searched recursively for ``.jpg .jpeg .png .tif .tiff .bmp .webp`` files (name order;
  hidden files and folders skipped, symlinked folders followed, each real folder once).

``dataset[SampleKey(index, epoch)]`` (what :class:`dinov2.data.samplers.InfiniteSampler` yields) runs the
transform with torch's CPU generator, Python's ``random`` and NumPy's global generator all seeded from
``derive_seed(seed, index, epoch)`` (and restores them afterwards, outside a DataLoader worker), so a
sample's augmentation is the same in every run, in every worker and after a resume. ``dataset[index]`` runs
it with whatever state the generators are in.

An image that cannot be read is logged once (with its path) and returned as ``None``;
:class:`dinov2.train.data.TrainCollate` leaves those out of a batch and counts them.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinov2.data.samplers import SampleKey, derive_seed
from dinov2.data.transforms import IMAGE_LOAD_ERRORS, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "FileListDataset",
    "find_images",
    "make_dataset",
    "seeded_rng",
]

logger = logging.getLogger(__name__)

class DatasetError(ValueError):
    """A dataset path, file list or dataset string that cannot be used (the message says what and where)."""


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_DATASET_NAMES = ("HemaStandardDataset", "FileListDataset")


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and NumPy's global generator; restore all three on exit.

    In a DataLoader worker they are only seeded: every sample seeds them anew and nothing else there draws from
    them (the training collate has its own seeded generator), so restoring them would only cost time (about
    0.2 ms a sample, some 4 % of a worker's work per image).
    """
    if torch.utils.data.get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield
        return
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run torch ops single-threaded for a while, as in a DataLoader worker.

    The augmentation is many small element-wise ops; split over threads they gain little, and on a busy
    machine (threads waiting for each other) they run ten times slower or worse. This only matters in the
    main process (``num_workers=0``): workers already have one thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: How many evenly spaced paths of each training list are looked up when it is read.
LIST_SPOT_CHECKS = 20


def spot_checks(paths: list[str]) -> list[str]:
    """The :data:`LIST_SPOT_CHECKS` evenly spaced entries of a list's ``paths`` that are looked up when it is read."""
    return paths[:: max(len(paths) // LIST_SPOT_CHECKS, 1)][:LIST_SPOT_CHECKS]


def _read_file_list(list_file: Path) -> list[str]:
    """Image paths of one ``.txt`` list, relative entries resolved against the list's folder.

    When none of :data:`LIST_SPOT_CHECKS` evenly spaced paths exists, the list is wrong as a whole (paths relative to
    another folder, or from another machine): that is an error now, before any model is built. Single missing
    images are the loader's to skip and count.
    """
    base = list_file.parent
    paths = [path if os.path.isabs(path) else os.path.join(base, path) for path in read_list_entries(list_file)]
    sample = spot_checks(paths)
    if not any(os.path.isfile(path) for path in sample):
        raise DatasetError(
            f"{list_file}: none of the {len(sample)} images looked up exists, e.g. {sample[0]} (a relative path is "
            f"read from the list's folder, {base})"
        )
    return paths


def read_list_entries(list_file: Path, base: Path | None = None) -> list[str]:
    """The image paths of a ``.txt`` list as written (``~`` expanded; relative ones are relative to ``base``, by
    default the list's folder).

    One path per line; blank lines and ``#`` comments are skipped. A line that is not an image path, text that is
    not UTF-8 (other than the raw name of an existing image) and a list without paths are errors naming the line.
    """
    base = list_file.parent if base is None else base
    entries: list[str] = []
    # surrogateescape keeps the raw bytes of an image name that is not UTF-8 (as make_file_lists writes it);
    # any other byte that is not UTF-8 (a cp1252 or UTF-16 list) is caught below.
    with open(list_file, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = raw.strip().lstrip("\ufeff")  # lists joined from files that began with a byte-order mark
            if not line or line.startswith("#"):
                continue
            entry = os.path.expanduser(line)
            path = entry if os.path.isabs(entry) else os.path.join(base, entry)
            if "\0" in line or (not _is_utf8(line) and not os.path.isfile(path)):
                raw_bytes = line.encode("utf-8", "surrogateescape")
                raise DatasetError(
                    f"{list_file}:{line_number}: {raw_bytes!r} is not UTF-8 text (nor the raw name of an existing "
                    "image); a file list must be UTF-8 text: save it as UTF-8, not as UTF-16 or in a Windows code page"
                )
            check_image_path(line, f"{list_file}:{line_number}")
            entries.append(entry)
    if not entries:
        raise DatasetError(f"file list {list_file} is empty (no image paths, only blank or # lines)")
    return entries


def _warn_of_repeated_paths(root: Path, listed: Sequence[tuple[Path, list[str]]]) -> None:
    """Warn when file lists name an image more than once (nested folders listed twice, say): such an image is drawn
    as often as it is listed."""
    first_list: dict[str, Path] = {}
    repeated: list[tuple[str, Path, Path]] = []  # (path, its first list, the list that names it again)
    for list_file, entries in listed:
        for path in entries:
            key = os.path.normpath(path)
            if key in first_list:
                repeated.append((path, first_list[key], list_file))
            else:
                first_list[key] = list_file
    if repeated:
        path, first, again = repeated[0]
        images = len({os.path.normpath(p) for p, _, _ in repeated})
        logger.warning(
            "%s: %d image(s) are listed more than once, %d listings in all of the %d (e.g. %s, in %s%s); each is "
            "drawn as often as it is listed", root, images, images + len(repeated), len(first_list) + len(repeated),
            path, first.name, "" if again == first else f" and {again.name}",
        )


def check_image_path(path: str, where: str) -> None:
    """Raise a DatasetError naming ``where`` (``file:line``) unless ``path`` ends in an image extension."""
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise DatasetError(
            f"{where}: {path!r} is not an image path (expected a path ending in one of {', '.join(IMAGE_EXTENSIONS)})"
        )


def _is_utf8(text: str) -> bool:
    """Whether ``text`` holds no undecodable bytes (the lone surrogates of ``surrogateescape``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_images(folder: str | Path) -> list[str]:
    """All image files under ``folder``, recursively, sorted; hidden files and folders (``.name``) skipped.

    Symlinked folders are followed, each real folder once: the folders themselves are walked before the links to
    them, and a folder whose real path was already walked (a symlink loop, or a second link to one folder) is
    skipped with a warning, as is a folder that cannot be read and a link that leads nowhere (to nothing, or round
    in a loop).
    """
    found: list[str] = []
    walked: set[str] = set()
    pending, linked = [os.fspath(folder)], []
    while pending or linked:
        directory = pending.pop() if pending else linked.pop()
        real = os.path.realpath(directory)
        if real in walked:
            logger.warning("skipping %s: it is %s, already listed (a symlink loop or a second link)", directory, real)
            continue
        walked.add(real)
        try:
            with os.scandir(directory) as scan:
                entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            logger.warning("skipping folder %s: %s", directory, error)
            continue
        kinds = {entry.path: _kind(entry) for entry in entries}
        found.extend(e.path for e in entries if kinds[e.path] == "file" and _is_image_name(e.name))
        for entry in reversed(entries):  # depth first, in name order
            if kinds[entry.path] == "folder":
                (linked if entry.is_symlink() else pending).append(entry.path)
    return sorted(found)


def _is_image_name(name: str) -> bool:
    """Whether ``name`` has one of the :data:`IMAGE_EXTENSIONS`."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _kind(entry: os.DirEntry) -> str | None:
    """``"file"``, ``"folder"``, or None (with a warning for a link that leads nowhere) for a folder entry."""
    try:
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "folder"
    except OSError as error:  # a link round in a loop: "Too many levels of symbolic links"
        logger.warning("skipping %s: %s", entry.path, error.strerror or error)
        return None
    if entry.is_symlink() and _is_image_name(entry.name):
        logger.warning("skipping %s: a link to %s, which does not exist", entry.path, os.readlink(entry.path))
    return None


class _StringTable:
    """Strings packed in one NumPy buffer: no per-item Python objects whose reference counts would make
    forked DataLoader workers copy the whole list (the copy-on-read memory growth of large datasets)."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]  # image names need not be UTF-8
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        encoded = self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes()
        return encoded.decode("utf-8", "surrogateescape")


class FileListDataset(torch.utils.data.Dataset):
    """Images from file lists or an image folder, for self-supervised training: no labels.

    Items are ``(transform(image), 0)``, DINOv2's (sample, target) pairs, which the training collate takes, or
    ``None`` when the image cannot be read. (Evaluation labels its images itself, see
    :mod:`dinov2.eval.extract_features`.)

    Args:
        root: folder of ``.txt`` lists, one ``.txt`` list, or image folder.
        transform: applied to the RGB PIL image (e.g. :class:`DataAugmentationDINO`).
        resize: if set, images are first resized to ``resize`` x ``resize`` (Lanczos), as DinoBloom did (224).
        seed: base seed of the per-sample augmentation seeds.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        resize: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root).expanduser()
        if resize is not None and resize <= 0:
            raise ValueError(f"resize must be a positive size in pixels or None, got {resize}")
        self.transform = transform
        self.resize = resize
        self.seed = int(seed)
        paths = self._discover()
        self._paths = _StringTable(paths)
        self._reported_bad: set[int] = set()
        logger.info("dataset %s: %d images", self.root.absolute(), len(paths))

    def _discover(self) -> list[str]:
        """The image paths of the lists or the folder."""
        root = self.root
        if not root.exists():
            raise FileNotFoundError(f"dataset root {root} does not exist")
        if root.is_file():
            if root.suffix.lower() != ".txt":
                raise DatasetError(f"dataset root {root} is a file but not a .txt file list")
            entries = _read_file_list(root)
            _warn_of_repeated_paths(root, [(root, entries)])
            return entries
        all_lists = sorted(p for p in root.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        lists = [p for p in all_lists if not p.name.startswith(".")]
        hidden = [p.name for p in all_lists if p.name.startswith(".")]
        if hidden:  # macOS's "._name" files, say; but a list named after a hidden folder would be lost unsaid
            logger.warning("%s: skipping %d hidden .txt file(s) (%s): rename a list without its leading '.' to "
                           "train on it", root, len(hidden), ", ".join(hidden[:5]))  # fmt: skip
        if lists:
            listed = []
            for list_file in lists:
                try:
                    listed.append((list_file, _read_file_list(list_file)))
                except ValueError as err:
                    if not _looks_like_image_folder(root):
                        raise
                    raise DatasetError(
                        f"{err}\n({root} holds .txt files, so it is read as a folder of file lists; for a folder of "
                        "images, move its .txt files elsewhere)"
                    ) from err
            _warn_of_repeated_paths(root, listed)
            paths = [path for _, entries in listed for path in entries]
            if _looks_like_image_folder(root):
                _warn_of_images_beside_lists(root, len({os.path.normpath(path) for path in paths}))
            return paths
        paths = find_images(root)
        if not paths:
            deeper = sorted(str(p.parent) for p in root.glob("*/*.txt") if not p.name.startswith("."))
            hint = (f"; .txt lists are read only directly in the folder, and {deeper[0]} holds some: name that folder"
                    if deeper else "")  # fmt: skip
            raise DatasetError(
                f"no .txt file lists directly in {root} and no images ({', '.join(IMAGE_EXTENSIONS)}) under it{hint}"
            )
        return paths

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """The image path of sample ``index``."""
        return self._paths[index]

    def __getitem__(self, key: int | SampleKey | tuple[int, int]) -> tuple[Any, Any] | None:
        """Load and transform one sample; ``key`` is an index or ``(index, epoch)`` for a seeded transform."""
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"dataset key must be an index or (index, epoch), got {key!r}")
            index, epoch = operator.index(key[0]), operator.index(key[1])
        else:
            index, epoch = operator.index(key), None
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self)} images")
        path = self._paths[index]
        try:
            image = load_image(path, self.resize)
        except IMAGE_LOAD_ERRORS as error:
            self._report_bad(index, path, error)
            return None
        with _one_intra_op_thread():
            if epoch is None:
                return self._apply_transform(image)
            with seeded_rng(derive_seed(self.seed, index, epoch)):
                return self._apply_transform(image)

    def _apply_transform(self, image: Image.Image) -> tuple[Any, int]:
        """``(transform(image), 0)``."""
        return (image if self.transform is None else self.transform(image)), 0

    def _report_bad(self, index: int, path: str, error: BaseException) -> None:
        """Log an unreadable sample the first time this process meets it."""
        if index not in self._reported_bad:
            self._reported_bad.add(index)
            logger.warning("skipping unreadable image %s (sample %d): %s", path, index, error)

    def __repr__(self) -> str:
        return (
            f"FileListDataset(root={str(self.root)!r}, {len(self)} images, "
            f"resize={self.resize}, transform={self.transform!r})"
        )


def _warn_of_images_beside_lists(root: Path, listed: int) -> None:
    """Warn when the folder of lists ``root`` holds more images (symlinked folders not followed) than its lists name
    (``listed``): a folder of images with a stray ``.txt`` file trains on that file's images only. The search stops
    once it has found more."""
    found = 0
    for _, folders, files in os.walk(root):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += sum(1 for name in files if not name.startswith(".") and _is_image_name(name))
        if found > listed:
            logger.warning(
                "%s holds .txt file lists, so it is read as a folder of lists, which name %d image(s); more images "
                "lie under it, and only listed ones are used (for a folder of images, move its .txt files elsewhere)",
                root, listed,
            )  # fmt: skip
            return


def _looks_like_image_folder(root: Path) -> bool:
    """Whether ``root`` has sub-folders or images of its own (a folder of file lists has neither)."""
    return any(p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())


def _parse_dataset_spec(dataset_str: str) -> tuple[str, dict[str, str]]:
    """Split ``Name:key=value:...`` into the name and its options. A part without ``=`` after an option continues
    its value (a ``root`` whose path holds a ``:``)."""
    name, *tokens = dataset_str.split(":")
    options: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key:
            options[key] = value
        elif options:
            last = next(reversed(options))
            options[last] += f":{token}"
        else:
            raise DatasetError(f"dataset string {dataset_str!r}: expected key=value, got {token!r}")
    return name, options


def _names_a_path(dataset_str: str) -> bool:
    """Whether ``dataset_str`` is a path rather than DinoBloom's ``Name:key=value`` spelling."""
    head = dataset_str.split(":", 1)[0]
    if ":" not in dataset_str or os.path.isabs(dataset_str) or re.match(r"[A-Za-z]:[\\/]", dataset_str):
        return True  # (a Windows drive letter is no dataset name)
    return "/" in head or os.sep in head or "." in head


def absolute_dataset_string(dataset_str: str) -> str:
    """``dataset_str`` with its path (or the ``root=`` of its spelled form) made absolute, ``~`` expanded and a
    relative path taken from the current folder; a malformed spelling is returned as it is (:func:`make_dataset`
    says what is wrong with it)."""
    if _names_a_path(dataset_str):
        return os.path.abspath(os.path.expanduser(dataset_str))
    try:
        name, options = _parse_dataset_spec(dataset_str)
    except DatasetError:
        return dataset_str
    if options.get("root"):
        options["root"] = os.path.abspath(os.path.expanduser(options["root"]))
    return ":".join([name, *(f"{key}={value}" for key, value in options.items())])


def dataset_source(dataset_str: str, resize: int | None = None) -> tuple[str, int | None]:
    """The folder or list file that a dataset string names, and the size its images are resized to (None: kept).

    A path names itself. DinoBloom's spelling ``HemaStandardDataset:root=<dir>[:shuffle=1]`` accepts ``root``
    (required), ``resize`` (pixels, or ``none``), ``shuffle`` (accepted and ignored: the sampler shuffles) and
    ``split`` (ignored with a warning: lists are not split). With the ``HemaStandardDataset`` name images are resized
    to 224 like DinoBloom's dataset unless ``resize`` says otherwise; ``FileListDataset:...`` and plain paths do not
    resize by default. A ``resize`` argument overrides the default but must agree with a ``resize=`` in the string.
    Raises DatasetError for a malformed spelling; nothing is read.
    """
    if _names_a_path(dataset_str):
        return dataset_str, resize
    name, options = _parse_dataset_spec(dataset_str)
    if name not in _DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r} in {dataset_str!r}; expected one of {_DATASET_NAMES} or a path")
    unknown = set(options) - {"root", "resize", "shuffle", "split"}
    if unknown:
        raise DatasetError(
            f"dataset string {dataset_str!r}: unknown option(s) {sorted(unknown)}; valid: root, resize, shuffle, split"
        )
    if not options.get("root"):
        raise DatasetError(f"dataset string {dataset_str!r} has no root=<folder of .txt lists>")
    if "split" in options:
        logger.warning(
            "dataset string %r: split=%s is ignored (file lists are used whole)", dataset_str, options["split"]
        )
    spec_resize: int | None = 224 if name == "HemaStandardDataset" else None
    if "resize" in options:
        value = options["resize"].strip().lower()
        try:
            spec_resize = None if value in ("", "none", "0") else int(value)
        except ValueError:
            raise DatasetError(f"dataset string {dataset_str!r}: resize must be an integer or none") from None
        if resize is not None and resize != spec_resize:
            raise DatasetError(f"dataset string {dataset_str!r} says resize={value} but resize={resize} was passed")
    return options["root"], spec_resize if resize is None else resize


def make_dataset(
    dataset_str: str,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    resize: int | None = None,
    seed: int = 0,
) -> FileListDataset:
    """Build the dataset named by a path or by DinoBloom's ``HemaStandardDataset:root=<dir>[:shuffle=1]`` (see
    :func:`dataset_source`)."""
    root, resize = dataset_source(dataset_str, resize)
    return FileListDataset(root, transform, resize=resize, seed=seed)
