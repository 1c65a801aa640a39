"""Progress of an unfinished feature extraction, kept next to its output so that a killed run continues.

``<output>.partial/`` holds ``settings.json`` (what the features depend on: model, weights, image size,
precision, device type, the image list) and one ``chunk_<first>_<end>.npz`` per saved stretch of the image list
(the features of the images in ``[first, end)`` that could be read, and their indices). A run with the same
settings continues after the last chunk; a run with other settings discards the folder. The folder is removed
once the output file is written. Every file is written under a temporary name and renamed into place, so a save
interrupted half-way (a second Ctrl-C, a kill) leaves the folder as it was before that save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dinov2.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

_CHUNK = re.compile(r"^chunk_(\d+)_(\d+)\.npz$")


def image_list_digest(paths: list[str]) -> str:
    """A digest of the image list's order and names."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


class PartialFeatures:
    """The chunks already computed for one output file under one set of settings."""

    def __init__(self, output: Path, settings: dict[str, Any]) -> None:
        self.folder = output.with_name(output.name + ".partial")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from settings.json
        self.features: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.done = 0  # images [0, done) of the list were processed (embedded or found unreadable)
        if self.folder.is_dir():
            self._load()
        elif os.path.lexists(self.folder):  # said before the work, not at the first save
            raise ValueError(f"{self.folder} is in the way: this extraction saves its progress in a folder of that "
                             "name; move it, or choose another --output")  # fmt: skip

    def _load(self) -> None:
        settings_file = self.folder / "settings.json"
        try:
            saved = json.loads(settings_file.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):  # (settings.json is written before any chunk: nothing is lost)
            logger.warning("discarding %s: it has no readable settings.json", self.folder)
            shutil.rmtree(self.folder)
            return
        if saved != self.settings:
            changed = sorted(k for k in self.settings if saved.get(k) != self.settings[k])
            logger.warning("discarding %s: computed with other settings (%s)", self.folder, ", ".join(changed))
            shutil.rmtree(self.folder)
            return
        chunks = sorted(
            (int(m[1]), int(m[2]), p) for p in self.folder.iterdir() if (m := _CHUNK.match(p.name))
        )
        for first, end, path in chunks:
            if first != self.done:  # a gap (a chunk removed by hand): continue from before it
                break
            try:
                with np.load(path) as chunk:
                    features, indices = chunk["features"], chunk["indices"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                # e.g. cut short by a machine that went down before the file reached the disk
                logger.warning("discarding the damaged progress file %s (%s: %s); its images are embedded again",
                               path, type(err).__name__, err)  # fmt: skip
                path.unlink(missing_ok=True)
                break
            self.features.append(features)
            self.indices.append(indices)
            self.done = end
        if self.done:
            logger.info("continuing %s: %d images already processed", self.folder, self.done)

    def save(self, features: np.ndarray, indices: np.ndarray, end: int) -> None:
        """Keep the features of images ``[self.done, end)`` (``indices``: those that could be read)."""
        settings_file = self.folder / "settings.json"
        if not settings_file.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(settings_file, json.dumps(self.settings, indent=1) + "\n")
        path = self.folder / f"chunk_{self.done:09d}_{end:09d}.npz"
        atomic_write(path, lambda tmp: np.savez(tmp, features=features, indices=indices))
        self.features.append(features)
        self.indices.append(indices)
        self.done = end

    def remove(self) -> None:
        """Delete the folder (the output file is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
