"""Synthetic blood-smear single-cell images, so that training and evaluation run without real data.

Each image shows one cell of a class among red blood cells on a plasma background, rendered with a
Beer-Lambert stain model (colour = background x exp(-optical density)): overlapping cells darken
naturally and a stain-strength change acts like a real staining difference. The class sets the cell and
nucleus shape (round, kidney, band, segmented, bilobed), the cytoplasm colour and the granules; size,
position, rotation, stain strength and hue, background, illumination, red-cell count and placement, blur
and noise are random. Class identity therefore lives in shape and texture as much as in colour: a kNN on
raw pixels separates the classes only partly.

Only NumPy and PIL are used. Image ``i`` of class ``c`` depends only on ``(seed, c, i)``, so the output is
the same for any number of worker processes.

    python -m dinov2.data.demo --output DIR [--images-per-class N --seed S --size 224]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dinov2.logs import setup_logging

__all__ = ["DEMO_CLASSES", "DemoDataset", "generate_demo_dataset", "main", "render_cell"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"


def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """Optical density that turns white light into ``rgb``."""
    return -np.log(np.asarray(rgb, dtype=np.float32))


@dataclass(frozen=True)
class CellClass:
    """Appearance of one cell class; lengths are diameters in pixels at 224 px image size."""

    diameter: tuple[float, float]
    nucleus: str  # round | kidney | band | segmented | bilobed | none
    nucleus_ratio: tuple[float, float]  # nucleus size / cell size
    nucleus_rgb: tuple[float, float, float]
    cytoplasm_rgb: tuple[float, float, float]
    granule_rgb: tuple[float, float, float] | None = None
    granule_count: tuple[int, int] = (0, 0)
    granule_sigma: float = 1.0
    granules_over_nucleus: bool = False
    chromatin_contrast: float = 0.5
    outline_wobble: float = 0.03
    vacuoles: tuple[int, int] = (0, 0)


CELL_CLASSES: dict[str, CellClass] = {
    "basophil": CellClass(
        diameter=(62, 76), nucleus="bilobed", nucleus_ratio=(0.55, 0.7),
        nucleus_rgb=(0.40, 0.24, 0.56), cytoplasm_rgb=(0.86, 0.80, 0.90),
        granule_rgb=(0.28, 0.16, 0.44), granule_count=(110, 190), granule_sigma=1.6,
        granules_over_nucleus=True,
    ),
    "eosinophil": CellClass(
        diameter=(72, 88), nucleus="bilobed", nucleus_ratio=(0.55, 0.68),
        nucleus_rgb=(0.42, 0.26, 0.58), cytoplasm_rgb=(0.94, 0.84, 0.80),
        granule_rgb=(0.95, 0.62, 0.50), granule_count=(280, 400), granule_sigma=1.3,
    ),
    "erythroblast": CellClass(
        diameter=(46, 58), nucleus="round", nucleus_ratio=(0.58, 0.72),
        nucleus_rgb=(0.24, 0.14, 0.38), cytoplasm_rgb=(0.72, 0.72, 0.86),
        chromatin_contrast=0.3, outline_wobble=0.015,
    ),
    "ig": CellClass(
        diameter=(78, 94), nucleus="band", nucleus_ratio=(0.62, 0.75),
        nucleus_rgb=(0.45, 0.30, 0.62), cytoplasm_rgb=(0.84, 0.78, 0.89),
        granule_rgb=(0.72, 0.60, 0.80), granule_count=(90, 180), granule_sigma=0.8,
    ),
    "lymphocyte": CellClass(
        diameter=(50, 64), nucleus="round", nucleus_ratio=(0.78, 0.9),
        nucleus_rgb=(0.32, 0.19, 0.50), cytoplasm_rgb=(0.72, 0.80, 0.94),
        chromatin_contrast=0.45, outline_wobble=0.02,
    ),
    "monocyte": CellClass(
        diameter=(84, 104), nucleus="kidney", nucleus_ratio=(0.6, 0.72),
        nucleus_rgb=(0.52, 0.38, 0.68), cytoplasm_rgb=(0.80, 0.78, 0.89),
        chromatin_contrast=0.35, outline_wobble=0.07, vacuoles=(0, 5),
    ),
    "neutrophil": CellClass(
        diameter=(70, 84), nucleus="segmented", nucleus_ratio=(0.62, 0.74),
        nucleus_rgb=(0.40, 0.24, 0.56), cytoplasm_rgb=(0.90, 0.81, 0.86),
        granule_rgb=(0.85, 0.76, 0.86), granule_count=(200, 320), granule_sigma=0.75,
    ),
    "platelet": CellClass(
        diameter=(12, 22), nucleus="none", nucleus_ratio=(0.5, 0.7),
        nucleus_rgb=(0.50, 0.38, 0.68), cytoplasm_rgb=(0.78, 0.76, 0.92),
        granule_rgb=(0.48, 0.34, 0.66), granule_count=(8, 20), granule_sigma=0.9, outline_wobble=0.12,
    ),
}
DEMO_CLASSES: tuple[str, ...] = tuple(sorted(CELL_CLASSES))

_RBC_RGB = (0.87, 0.70, 0.71)
_BACKGROUNDS = ((0.98, 0.92, 0.84), (0.93, 0.92, 0.97))  # cream and lavender plasma


def _blur(field: np.ndarray, sigma: float, mode: str = "edge") -> np.ndarray:
    """Separable Gaussian blur of a 2-D or (H, W, C) array; ``mode`` is NumPy's padding mode."""
    half = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    height, width = field.shape[:2]
    pad = [(half, half), (half, half)] + [(0, 0)] * (field.ndim - 2)
    padded = np.pad(field, pad, mode=mode)
    rows = sum(w * padded[:, k : k + width] for k, w in enumerate(weights))
    return sum(w * rows[k : k + height] for k, w in enumerate(weights))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-range smooth random field: a ``cells`` x ``cells`` grid upsampled bicubically."""
    coarse = rng.random((max(2, cells), max(2, cells)), dtype=np.float32) - 0.5
    resized = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized)


class _Scene:
    """An optical-density canvas; objects are drawn inside square windows around them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.od = np.zeros((size, size, 3), dtype=np.float32)
        self.y, self.x = np.mgrid[0:size, 0:size].astype(np.float32)

    def window(self, cx: float, cy: float, half: float) -> tuple[slice, slice]:
        """The pixel window of half-width ``half`` around (cx, cy), clipped to the canvas."""
        x0, x1 = max(0, int(cx - half)), min(self.size, int(math.ceil(cx + half)) + 1)
        y0, y1 = max(0, int(cy - half)), min(self.size, int(math.ceil(cy + half)) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def local(self, win: tuple[slice, slice], cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the window's pixels relative to (cx, cy), rotated by ``angle``."""
        dx, dy = self.x[win] - cx, self.y[win] - cy
        c, s = math.cos(angle), math.sin(angle)
        return c * dx + s * dy, -s * dx + c * dy


def _coverage(inside: np.ndarray, edge: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return np.clip(inside / edge + 0.5, 0.0, 1.0)


def _blob(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator, wobble: float,
          aspect: float = 1.0) -> np.ndarray:
    """Coverage of a wobbly ellipse-like blob centred at u = v = 0."""
    theta = np.arctan2(v, u)
    boundary = np.full_like(u, radius)
    for k in (2, 3, 4, 5):
        boundary *= 1.0 + wobble / (k - 1) * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _coverage(boundary - np.hypot(u, v / aspect))


def _segment(
    u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], width: float
) -> np.ndarray:
    """Coverage of a capsule (thick segment) from p0 to p1."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / max(du * du + dv * dv, 1e-6), 0.0, 1.0)
    return _coverage(width / 2 - np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv))


def _nucleus(kind: str, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of a nucleus of the given shape and outer radius, in cell-local coordinates."""
    if kind == "round":
        return _blob(u, v, radius, rng, 0.04, aspect=rng.uniform(0.85, 1.0))
    if kind == "kidney":
        body = _blob(u, v, radius, rng, 0.06, aspect=rng.uniform(0.7, 0.85))
        notch_radius = radius * rng.uniform(0.35, 0.55)
        notch = _blob(u, v + radius * rng.uniform(0.8, 1.0), notch_radius, rng, 0.05)
        return body * (1.0 - notch)
    if kind == "band":
        bend = radius * rng.uniform(0.55, 0.75)
        width = radius * rng.uniform(0.32, 0.45)
        span = rng.uniform(0.55, 0.8) * np.pi
        r = np.hypot(u, v)
        angle = np.abs(np.arctan2(u, -v))  # 0 at the bottom of the horseshoe
        ring = _coverage(width / 2 - np.abs(r - bend)) * (angle <= span)
        ends = [(bend * math.sin(sign * span), -bend * math.cos(span)) for sign in (-1, 1)]
        caps = [_blob(u - eu, v - ev, width / 2, rng, 0.05) for eu, ev in ends]
        return np.maximum(ring, np.maximum(*caps))
    if kind in ("segmented", "bilobed"):
        lobes = int(rng.integers(3, 6)) if kind == "segmented" else 2
        arc = radius * rng.uniform(0.45, 0.6)
        spread = rng.uniform(0.5, 0.75) * np.pi * (1.0 if kind == "segmented" else 0.6)
        lobe_radius = radius * (rng.uniform(0.34, 0.42) if kind == "segmented" else rng.uniform(0.42, 0.5))
        angles = np.linspace(-spread, spread, lobes) + rng.normal(0, 0.12, lobes)
        centres = [(arc * math.sin(a), arc * math.cos(a) - arc * 0.4) for a in angles]
        cover = np.zeros_like(u)
        for cu, cv in centres:
            lobe = _blob(u - cu, v - cv, lobe_radius * rng.uniform(0.85, 1.1), rng, 0.08, aspect=rng.uniform(0.75, 1))
            cover = np.maximum(cover, lobe)
        for a, b in zip(centres[:-1], centres[1:]):
            cover = np.maximum(cover, _segment(u, v, a, b, radius * rng.uniform(0.06, 0.12)))
        return cover
    raise ValueError(f"unknown nucleus kind {kind!r}")


def _granules(rng: np.random.Generator, region: np.ndarray, count: int, sigma: float) -> np.ndarray:
    """Density (peak about 1) of ``count`` point granules placed at random inside ``region``."""
    ys, xs = np.nonzero(region > 0.5)
    density = np.zeros_like(region)
    if count == 0 or len(ys) == 0:
        return density
    picks = rng.integers(0, len(ys), count)
    np.add.at(density, (ys[picks], xs[picks]), rng.uniform(0.6, 1.0, count).astype(np.float32))
    return _blur(density, sigma, mode="constant") * (2 * np.pi * sigma**2) * region


def _red_cells(scene: _Scene, rng: np.random.Generator, scale: float, avoid: tuple[float, float, float]) -> None:
    """Scatter red blood cells (discs with central pallor and a darker rim) over the scene."""
    size = scene.size
    count = int(rng.integers(10, 30))
    placed: list[tuple[float, float, float]] = []
    ax, ay, ar = avoid
    for _ in range(count * 6):
        if len(placed) == count:
            break
        radius = rng.uniform(19, 24) * scale
        cx, cy = rng.uniform(-radius, size + radius, 2)
        if math.hypot(cx - ax, cy - ay) < ar + radius * 0.3:
            continue
        if any(math.hypot(cx - px, cy - py) < (radius + pr) * rng.uniform(0.65, 1.0) for px, py, pr in placed):
            continue
        placed.append((cx, cy, radius))
        win = scene.window(cx, cy, radius + 2)
        u, v = scene.local(win, cx, cy, rng.uniform(0, 2 * np.pi))
        disc = _blob(u, v, radius, rng, 0.03, aspect=rng.uniform(0.82, 1.0))
        r = np.hypot(u, v) / radius
        pallor = rng.uniform(0.45, 0.75) * np.exp(-((r / 0.5) ** 4))
        profile = 1.0 - pallor + 0.25 * np.exp(-(((r - 0.85) / 0.12) ** 2))
        scene.od[win] += (disc * profile)[..., None] * (_od(_RBC_RGB) * rng.uniform(0.85, 1.15))


def render_cell(cell_class: str, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Render one (size, size, 3) uint8 smear image centred on a cell of ``cell_class``."""
    if cell_class not in CELL_CLASSES:
        raise ValueError(f"unknown demo class {cell_class!r}; known: {', '.join(DEMO_CLASSES)}")
    spec = CELL_CLASSES[cell_class]
    scale = size / 224.0 * rng.uniform(0.9, 1.1)  # magnification
    scene = _Scene(size)
    cx, cy = size / 2 + rng.normal(0, 6 * scale, 2)
    radius = rng.uniform(*spec.diameter) / 2 * scale
    _red_cells(scene, rng, scale, (cx, cy, radius))

    win = scene.window(cx, cy, radius * 1.2 + 3)
    shape = scene.od[win].shape[:2]
    u, v = scene.local(win, cx, cy, rng.uniform(0, 2 * np.pi))
    cell = _blob(u, v, radius, rng, spec.outline_wobble, aspect=rng.uniform(0.88, 1.0))
    scene.od[win] *= 1.0 - 0.8 * cell[..., None]  # the cell lies on top of the red cells
    cytoplasm = cell
    for _ in range(int(rng.integers(spec.vacuoles[0], spec.vacuoles[1], endpoint=True))):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8) * radius
        hu, hv = u - distance * math.cos(angle), v - distance * math.sin(angle)
        hole = _blob(hu, hv, rng.uniform(2, 5) * scale, rng, 0.1)
        cytoplasm = cytoplasm * (1.0 - 0.8 * hole)
    od = np.zeros(shape + (3,), dtype=np.float32)
    if spec.nucleus != "none":
        nucleus_radius = radius * rng.uniform(*spec.nucleus_ratio)
        offset = (radius - nucleus_radius) * rng.uniform(0.0, 0.8)
        nucleus = _nucleus(spec.nucleus, u - offset, v, nucleus_radius, rng) * cell
        cytoplasm = cytoplasm * (1.0 - nucleus)
        clumps = _smooth_noise(rng, shape, max(4, round(radius / 5)))
        grain = _smooth_noise(rng, shape, round(radius / 2))
        chromatin = 1.0 + spec.chromatin_contrast * (1.4 * clumps + 0.6 * grain)
        od += (nucleus * chromatin)[..., None] * _od(spec.nucleus_rgb)
    texture = 1.0 + 0.25 * _smooth_noise(rng, shape, 6)
    od += (cytoplasm * texture)[..., None] * _od(spec.cytoplasm_rgb)
    if spec.granule_rgb is not None:
        region = cell if spec.granules_over_nucleus else cytoplasm
        count = int(rng.integers(spec.granule_count[0], spec.granule_count[1], endpoint=True))
        density = _granules(rng, region, count, spec.granule_sigma * scale)
        od += np.clip(density, 0, 1.5)[..., None] * _od(spec.granule_rgb)
    scene.od[win] += od
    if cell_class != "platelet" and rng.random() < 0.3:
        _platelet(scene, rng, scale, avoid=(cx, cy, radius))
    return _develop(scene, rng)


def _platelet(scene: _Scene, rng: np.random.Generator, scale: float, avoid: tuple[float, float, float]) -> None:
    """A stray platelet somewhere away from the main cell."""
    spec = CELL_CLASSES["platelet"]
    ax, ay, ar = avoid
    for _ in range(10):
        px, py = rng.uniform(0, scene.size, 2)
        if math.hypot(px - ax, py - ay) > ar + 10 * scale:
            break
    radius = rng.uniform(*spec.diameter) / 2 * scale
    win = scene.window(px, py, radius * 1.5 + 3)
    u, v = scene.local(win, px, py, rng.uniform(0, 2 * np.pi))
    body = _blob(u, v, radius, rng, spec.outline_wobble)
    density = _granules(rng, body, int(rng.integers(*spec.granule_count)), spec.granule_sigma * scale)
    scene.od[win] += body[..., None] * _od(spec.cytoplasm_rgb) + np.clip(density, 0, 1.5)[..., None] * _od(
        spec.granule_rgb
    )


def _develop(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Stain variation, background, illumination, optical blur and sensor noise; returns uint8 RGB."""
    size = scene.size
    stain = rng.uniform(0.8, 1.2) * (1.0 + rng.normal(0, 0.07, 3)).astype(np.float32)
    mix = rng.random()
    background = (1 - mix) * np.asarray(_BACKGROUNDS[0]) + mix * np.asarray(_BACKGROUNDS[1])
    background = np.clip(background * rng.uniform(0.94, 1.02) + rng.normal(0, 0.012, 3), 0, 1).astype(np.float32)
    gx, gy = rng.normal(0, 0.03, 2)
    light = 1.0 + (gx * (scene.x / size - 0.5) + gy * (scene.y / size - 0.5))
    image = background * light[..., None] * np.exp(-scene.od * stain)
    image = _blur(image, rng.uniform(0.5, 0.9) * size / 224)
    image += rng.normal(0, 0.005, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class DemoDataset:
    """Where a generated demo dataset lives."""

    root: Path
    images_dir: Path  # ImageFolder tree images/<class>/<class>_<i>.<ext>, for evaluation
    lists_dir: Path  # folder with train.txt: what train.dataset_path points at
    train_list: Path
    classes: tuple[str, ...]
    num_images: int


def _image_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The generator of one image, from (seed, class, index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, DEMO_CLASSES.index(class_name), index]))


def _image_path(images_dir: Path, class_name: str, index: int, extension: str) -> Path:
    return images_dir / class_name / f"{class_name}_{index:05d}.{extension}"


def _render_and_save(job: tuple[str, int, int, int, str]) -> None:
    """Worker entry: render image ``index`` of ``class_name`` and write it."""
    class_name, index, size, seed, path = job
    pixels = render_cell(class_name, _image_rng(seed, class_name, index), size)
    image = Image.fromarray(pixels)
    if path.endswith(".png"):
        image.save(path, compress_level=3)
    else:
        image.save(path, quality=95)


def _first_entry_exists(list_file: Path) -> bool:
    """Whether the first image of a file list exists (a moved folder with absolute entries fails this)."""
    first = next((line.strip() for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()), None)
    return first is not None and (list_file.parent / first).is_file()


def generate_demo_dataset(
    output_dir: str | Path,
    images_per_class: int = 250,
    image_size: int = 224,
    seed: int = 0,
    classes: list[str] | tuple[str, ...] | None = None,
    image_format: str = "png",
    num_workers: int | None = None,
) -> DemoDataset:
    """Write a synthetic smear dataset (images/, lists/train.txt, manifest.json) unless already there.

    ``lists/`` holds only ``train.txt`` (the path of every image relative to ``lists/``, so the dataset folder
    can be moved), because a training run reads every ``.txt`` in the folder it is given. Regenerating with
    other settings first removes the images the previous manifest listed. ``num_workers`` processes render in
    parallel (default: all CPUs; 0 renders in this process); the images do not depend on it.
    """
    classes = tuple(DEMO_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in CELL_CLASSES]
    if unknown or not classes:
        raise ValueError(f"unknown demo class(es) {unknown or '(none given)'}; known: {', '.join(DEMO_CLASSES)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"demo class(es) {', '.join(repeated)} given more than once")
    if images_per_class <= 0:
        raise ValueError(f"images per class must be at least 1 (--images-per-class), got {images_per_class}")
    if image_size < 32:
        raise ValueError(f"the image size must be at least 32 pixels (--size), got {image_size}")
    if seed < 0:
        raise ValueError(f"the seed must be >= 0 (--seed), got {seed}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    root = Path(output_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; the demo data set needs a folder (--output)")
    images_dir, lists_dir = root / "images", root / "lists"
    train_list, manifest_path = lists_dir / "train.txt", root / MANIFEST_NAME
    settings = {
        "generator_version": GENERATOR_VERSION,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "classes": list(classes),
        "image_format": image_format,
    }
    result = DemoDataset(root, images_dir, lists_dir, train_list, classes, images_per_class * len(classes))
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if previous == settings and train_list.is_file() and _first_entry_exists(train_list):
        logger.info("demo dataset in %s is already generated with these settings; skipping", root)
        return result
    if previous is not None:
        _remove_previous(images_dir, previous)
    # The manifest names the images before they are rendered, and the list is written after them: a run stopped
    # in between leaves a manifest without a list, and the next run removes what it had rendered.
    train_list.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(settings, indent=2) + "\n")

    jobs = []
    for class_name in classes:
        (images_dir / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            path = _image_path(images_dir, class_name, index, image_format)
            jobs.append((class_name, index, image_size, seed, str(path)))
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    progress = tqdm(total=len(jobs), desc="demo images", unit="img", disable=len(jobs) < 200)
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_render_and_save, jobs, chunksize=16):
                progress.update()
    else:
        for job in jobs:
            _render_and_save(job)
            progress.update()
    progress.close()
    lists_dir.mkdir(parents=True, exist_ok=True)
    # Paths relative to the list's folder: the whole dataset folder can be moved or copied.
    train_list.write_text(
        "".join(f"{Path(os.path.relpath(job[4], lists_dir)).as_posix()}\n" for job in jobs), encoding="utf-8"
    )
    logger.info("wrote %d demo images of %d classes to %s", len(jobs), len(classes), root)
    return result


def _remove_previous(images_dir: Path, previous: dict) -> None:
    """Delete the images a previous manifest says were generated here."""
    try:
        classes, count, extension = previous["classes"], int(previous["images_per_class"]), previous["image_format"]
    except (KeyError, TypeError, ValueError):
        logger.warning("ignoring an unreadable previous %s in %s", MANIFEST_NAME, images_dir.parent)
        return
    for class_name in classes:
        for index in range(count):
            _image_path(images_dir, class_name, index, extension).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write images/, lists/ and manifest.json into")
    parser.add_argument("--images-per-class", type=int, default=250, help="default 250")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--classes", default=None, help=f"comma-separated subset of {','.join(DEMO_CLASSES)}")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="default png")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: all CPUs)")
    args = parser.parse_args(argv)
    setup_logging()
    demo = generate_demo_dataset(
        args.output,
        images_per_class=args.images_per_class,
        image_size=args.size,
        seed=args.seed,
        classes=None if args.classes is None else [c.strip() for c in args.classes.split(",") if c.strip()],
        image_format=args.format,
        num_workers=args.workers,
    )
    print(f"demo dataset: {demo.num_images} images in {demo.images_dir}; train list {demo.train_list}")
    return 0


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
