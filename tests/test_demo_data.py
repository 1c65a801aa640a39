"""Tests of the synthetic blood-smear generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data import FileListDataset
from dinov2.data.demo import DEMO_CLASSES, generate_demo_dataset, main, render_cell


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_render_is_deterministic_and_varied() -> None:
    first = render_cell("neutrophil", _rng(0))
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_cell("neutrophil", _rng(0)))
    others = [render_cell("neutrophil", _rng(s)) for s in (1, 2)]
    assert all(np.abs(first.astype(int) - o.astype(int)).mean() > 5 for o in others)
    assert render_cell("lymphocyte", _rng(0), size=96).shape == (96, 96, 3)
    with pytest.raises(ValueError, match="unknown demo class 'dragon'"):
        render_cell("dragon", _rng(0))


def _centre_stats(image: np.ndarray) -> np.ndarray:
    """Mean and spread of the colours in the central third of an image (where the cell is)."""
    size = image.shape[0]
    centre = image[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3].reshape(-1, 3).astype(np.float64)
    return np.concatenate([centre.mean(0), centre.std(0)])


def test_classes_are_distinguishable_only_partly() -> None:
    per_class = 6
    images = {c: [render_cell(c, _rng(1000 * k + i)) for i in range(per_class)] for k, c in enumerate(DEMO_CLASSES)}
    labels = np.repeat(np.arange(len(DEMO_CLASSES)), per_class)

    # not one fixed picture per class
    for class_images in images.values():
        assert len({img.tobytes() for img in class_images}) == per_class

    # Colour statistics of the cell region separate the classes far better than chance (1/8) ...
    stats = np.stack([_centre_stats(img) for c in DEMO_CLASSES for img in images[c]])
    stats = (stats - stats.mean(0)) / stats.std(0)
    hits = 0
    for i in range(len(stats)):
        centroids = [stats[(labels == k) & (np.arange(len(stats)) != i)].mean(0) for k in range(len(DEMO_CLASSES))]
        hits += int(np.argmin([np.linalg.norm(stats[i] - c) for c in centroids]) == labels[i])
    assert hits / len(stats) > 0.5

    # ... while the raw pixels of whole images (position, rotation, stain, red cells all vary) do not
    # separate them perfectly: a leave-one-out 1-NN on 32x32 thumbnails makes mistakes.
    thumbs = np.stack([
        np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
        for c in DEMO_CLASSES for img in images[c]
    ])
    distances = np.linalg.norm(thumbs[:, None] - thumbs[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(1)] == labels).mean() < 1.0

    # the intended stain chemistry: eosinophil granules are red-orange, lymphocyte cytoplasm and nuclei blue
    def centre_red_minus_blue(c: str) -> float:
        return float(np.mean([_centre_stats(img)[0] - _centre_stats(img)[2] for img in images[c]]))

    assert centre_red_minus_blue("eosinophil") > centre_red_minus_blue("lymphocyte") + 20


def test_generate_layout_and_idempotence(tmp_path: Path) -> None:
    classes = ["monocyte", "basophil"]
    demo = generate_demo_dataset(tmp_path / "demo", images_per_class=3, image_size=64, seed=1, classes=classes,
                                 num_workers=0)
    assert demo.num_images == 6 and demo.classes == ("monocyte", "basophil")
    images = sorted(p.relative_to(demo.images_dir).as_posix() for p in demo.images_dir.rglob("*.png"))
    assert images == [f"{c}/{c}_{i:05d}.png" for c in ("basophil", "monocyte") for i in range(3)]
    lines = demo.train_list.read_text().splitlines()
    assert len(lines) == 6 and all(not Path(line).is_absolute() for line in lines)
    assert all((demo.lists_dir / line).is_file() for line in lines)
    assert [p.name for p in demo.lists_dir.iterdir()] == ["train.txt"]
    manifest = json.loads((demo.root / "manifest.json").read_text())
    assert manifest["images_per_class"] == 3 and manifest["seed"] == 1 and manifest["classes"] == classes

    stamps = {p: p.stat().st_mtime_ns for p in demo.images_dir.rglob("*.png")}
    again = generate_demo_dataset(tmp_path / "demo", images_per_class=3, image_size=64, seed=1, classes=classes,
                                  num_workers=0)
    assert again == demo
    assert {p: p.stat().st_mtime_ns for p in demo.images_dir.rglob("*.png")} == stamps  # nothing rewritten

    smaller = generate_demo_dataset(tmp_path / "demo", images_per_class=2, image_size=64, seed=1, classes=classes,
                                    num_workers=0)
    assert len(list(smaller.images_dir.rglob("*.png"))) == 4  # stale images of the old settings removed
    assert len(smaller.train_list.read_text().splitlines()) == 4


def test_an_interrupted_generation_leaves_no_stale_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped half-way through a regeneration as JPEG, then run again as PNG: only the PNGs remain."""
    from dinov2.data import demo as demo_module

    kwargs = {"images_per_class": 3, "image_size": 48, "seed": 2, "classes": ["basophil"], "num_workers": 0}
    generate_demo_dataset(tmp_path / "demo", **kwargs)
    render = demo_module._render_and_save
    calls = []

    def stopped_at_the_third(job: tuple) -> None:
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        render(job)

    monkeypatch.setattr(demo_module, "_render_and_save", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "demo", image_format="jpg", **kwargs)
    monkeypatch.setattr(demo_module, "_render_and_save", render)
    demo = generate_demo_dataset(tmp_path / "demo", **kwargs)
    names = sorted(p.name for p in (demo.images_dir / "basophil").iterdir())
    assert names == [f"basophil_{i:05d}.png" for i in range(3)]
    assert len(FileListDataset(demo.images_dir)) == 3


def test_output_does_not_depend_on_worker_count(tmp_path: Path) -> None:
    kwargs = {"images_per_class": 2, "image_size": 48, "seed": 5, "classes": ["eosinophil", "platelet"]}
    serial = generate_demo_dataset(tmp_path / "serial", num_workers=0, **kwargs)
    parallel = generate_demo_dataset(tmp_path / "parallel", num_workers=2, **kwargs)
    names = sorted(p.relative_to(serial.images_dir) for p in serial.images_dir.rglob("*.png"))
    assert len(names) == 4 and names == sorted(p.relative_to(parallel.images_dir)
                                               for p in parallel.images_dir.rglob("*.png"))  # fmt: skip
    for name in names:
        assert np.array_equal(np.asarray(Image.open(serial.images_dir / name)),
                              np.asarray(Image.open(parallel.images_dir / name)))  # fmt: skip


def test_demo_feeds_the_datasets(tmp_path: Path) -> None:
    demo = generate_demo_dataset(tmp_path / "demo", images_per_class=2, image_size=48, classes=["ig", "neutrophil"],
                                 num_workers=0)
    training = FileListDataset(demo.lists_dir)
    evaluation = FileListDataset(demo.images_dir)
    assert len(training) == len(evaluation) == 4
    assert [Path(evaluation.path(i)).parent.name for i in range(4)] == ["ig", "ig", "neutrophil", "neutrophil"]
    image, _ = training[3]
    assert image.size == (48, 48)


def test_generate_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo class"):
        generate_demo_dataset(tmp_path, images_per_class=1, classes=["neutrophil", "unicorn"])
    with pytest.raises(ValueError, match="image_format"):
        generate_demo_dataset(tmp_path, images_per_class=1, image_format="gif")
    with pytest.raises(ValueError, match="demo class\\(es\\) basophil given more than once"):
        generate_demo_dataset(tmp_path, images_per_class=1, classes=["basophil", "ig", "basophil"])
    with pytest.raises(ValueError, match=r"\(--size\), got 8"):
        generate_demo_dataset(tmp_path, images_per_class=1, image_size=8)
    with pytest.raises(ValueError, match=r"\(--seed\), got -1"):
        generate_demo_dataset(tmp_path, images_per_class=1, seed=-1)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="notes.txt is a file; the demo data set needs a folder"):
        generate_demo_dataset(a_file, images_per_class=1)
    assert not (tmp_path / "images").exists()  # nothing was written


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    argv = ["--output", str(out), "--images-per-class", "1", "--size", "48", "--classes", "lymphocyte,monocyte",
            "--workers", "0", "--seed", "3"]
    assert main(argv) == 0
    assert "2 images" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert main(argv) == 0  # second run skips


def test_a_moved_demo_folder_still_trains(tmp_path: Path) -> None:
    kwargs = dict(images_per_class=2, image_size=48, classes=("monocyte", "basophil"), num_workers=0)
    demo = generate_demo_dataset(tmp_path / "first", **kwargs)
    moved = (tmp_path / "first").rename(tmp_path / "second")
    dataset = FileListDataset(moved / demo.lists_dir.name)
    assert len(dataset) == 4 and all(dataset[i] is not None for i in range(4))
    assert generate_demo_dataset(moved, **kwargs).num_images == 4  # recognised as already generated
