"""Feature extraction CLI and the features file format."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from dinov2 import files
from dinov2.data import FileListDataset
from dinov2.data.datasets import DatasetError
from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinov2.eval import extract_features as ef
from dinov2.eval import image_list
from dinov2.eval.features_io import FeatureSet, load_features, save_features
from dinov2.hub import load_backbone as hub_load_backbone
from dinov2.models import DinoVisionTransformer

IMG = 28  # 2x2 patches of 14 px: a tiny, fast model


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DinoVisionTransformer]:
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=IMG, embed_dim=64, depth=1, num_heads=1, init_values=1.0).eval()
    path = tmp_path_factory.mktemp("weights") / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path, model


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "cells"
    _image(root / "neutrophil" / "patient1" / "a.jpg", 0)
    _image(root / "neutrophil" / "b.png", 1)
    _image(root / "basophil" / "c.JPG", 2)
    _image(root / "loose.png", 3)
    (root / "basophil" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "basophil" / "notes.txt").write_text("ignored: not an image")
    _image(root / ".thumbnails" / "hidden.png", 4)  # hidden folders are not data
    (root / "neutrophil" / "._b.png").write_bytes(b"macOS resource fork")
    return root


def _expected_feature(
    model: DinoVisionTransformer, path: Path, resample: Image.Resampling = Image.Resampling.BILINEAR
) -> np.ndarray:
    """DinoBloom's preprocessing written out independently: torchvision's Resize((s, s)) on a PIL image is
    PIL's bilinear resize (its probes' datasets used PIL's bicubic one); then ToTensor and the ImageNet
    normalisation."""
    image = Image.open(path).convert("RGB").resize((IMG, IMG), resample)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)[None]
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls = model(x)
    return cls[0].numpy()  # the CLS token after the final LayerNorm, not L2-normalised (as DinoBloom stored it)


def test_folder_extraction_cli(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    weights, model = tiny_weights
    output = tmp_path / "features.h5"
    with caplog.at_level(logging.INFO):
        ef.main(["--weights", str(weights), "--data", str(image_folder), "--output", str(output),
                 "--img-size", str(IMG), "--num-workers", "0", "--batch-size", "2", "--device", "cpu"])
    assert f"skipping unreadable image {image_folder / 'basophil' / 'broken.jpg'}" in caplog.text
    assert "skipped 1 of 5 images" in caplog.text
    assert "2 classes: basophil, neutrophil" in caplog.messages  # (a nested folder's labels show before the work)

    result = load_features(output)
    assert result.paths == ["basophil/c.JPG", "loose.png", "neutrophil/b.png", "neutrophil/patient1/a.jpg"]
    assert result.class_names == ["basophil", "neutrophil"]
    assert result.labels.tolist() == [0, -1, 1, 1]
    assert result.features.dtype == np.float32 and result.features.shape == (4, 64)
    assert not np.allclose(np.linalg.norm(result.features, axis=1), 1.0)
    for row, rel in zip(result.features, result.paths):
        np.testing.assert_allclose(row, _expected_feature(model, image_folder / rel), atol=1e-5)
    assert result.meta["model"] == "inferred:vit"
    assert result.meta["weights"] == str(weights)
    assert result.meta["embed_dim"] == 64 and result.meta["n_skipped"] == 1
    assert result.meta["precision"] == "fp32" and "not L2-normalised" in result.meta["feature"]
    assert result.meta["resize"] == "bilinear"
    # what the probes compare train and test files by: the weights' bytes and where the images lie
    assert result.meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result.meta["root"] == str(image_folder.resolve())

    # --resize pil-bicubic: the features of PIL-resized images (DinoBloom's cross-validation probes), recorded
    bicubic = tmp_path / "bicubic.h5"
    ef.main(["--weights", str(weights), "--data", str(image_folder), "--output", str(bicubic), "--img-size", str(IMG),
             "--num-workers", "0", "--device", "cpu", "--resize", "pil-bicubic"])  # fmt: skip
    other = load_features(bicubic)
    assert other.meta["resize"] == "pil-bicubic" and other.paths == result.paths
    for row, rel in zip(other.features, other.paths):
        np.testing.assert_allclose(row, _expected_feature(model, image_folder / rel, Image.Resampling.BICUBIC),
                                   atol=1e-5)  # fmt: skip
    assert not np.allclose(other.features, result.features, atol=1e-5)

    # the HDF5 layout the evaluation code reads
    with h5py.File(output) as f:
        assert f["features"].dtype == np.float32 and f["labels"].dtype == np.int64
        assert f["paths"].asstr()[0] == "basophil/c.JPG"
        assert f.attrs["class_names"] == '["basophil", "neutrophil"]'


def test_a_module_with_an_output_file(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """A model module (no weights file) writes its features like a hub model does."""
    weights, model = tiny_weights
    result = ef.extract_features(image_folder, tmp_path / "m.h5", model=model, img_size=IMG, device="cpu")
    assert load_features(tmp_path / "m.h5").paths == result.paths and len(result) == 4
    for row, rel in zip(load_features(tmp_path / "m.h5").features, result.paths):
        np.testing.assert_allclose(row, _expected_feature(model, image_folder / rel), atol=1e-5)


class _Counting(torch.nn.Module):
    """A backbone that counts its calls and is interrupted (as by Ctrl-C) at call number ``stop_at``."""

    def __init__(self, inner: torch.nn.Module, stop_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.embed_dim, self.stop_at, self.calls = inner, inner.embed_dim, stop_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner(x)


def _counting_backbones(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[_Counting]:
    """From now on, the backbones the extraction loads are ``_Counting(stop_at)`` wrappers, collected in the list."""
    loaded: list[_Counting] = []

    def load(*args: object, **kwargs: object) -> _Counting:
        loaded.append(_Counting(hub_load_backbone(*args, **kwargs), stop_at))
        return loaded[-1]

    monkeypatch.setattr(ef, "load_backbone", load)
    return loaded


def _args(weights: Path, image_folder: Path) -> list[str]:
    """One image per batch, so that an interruption at the k-th model call has a known set of images before it."""
    return ["--weights", str(weights), "--data", str(image_folder), "--img-size", str(IMG), "--num-workers", "0",
            "--batch-size", "1", "--device", "cpu"]  # fmt: skip


def _interrupted_at_the_third_image(
    weights: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], Path]:
    """An uninterrupted extraction to whole.h5, then one to features.h5 that saves after every batch and is
    interrupted at the third backbone call; its command-line arguments and output."""
    args = _args(weights, image_folder)
    ef.main([*args, "--output", str(tmp_path / "whole.h5")])
    monkeypatch.setattr(ef, "PARTIAL_SAVE_SECONDS", 0.0)
    output = tmp_path / "features.h5"
    _counting_backbones(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        ef.main([*args, "--output", str(output)])
    return args, output


def test_an_interrupted_extraction_continues_where_it_stopped(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Progress saved after every batch (interval 0 s): the re-run embeds only the images not yet saved, the file
    equals an uninterrupted extraction's, and progress kept under other settings is discarded, not mixed in."""
    args, output = _interrupted_at_the_third_image(tiny_weights[0], image_folder, tmp_path, monkeypatch)
    assert not output.exists() and (tmp_path / "features.h5.partial").is_dir()
    backbones = _counting_backbones(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ef.main([*args, "--output", str(output)])
    assert re.search(r"continuing .*features\.h5\.partial: 3 images already processed", caplog.text)
    assert backbones[0].calls == 2  # of the 4 readable images, 2 were embedded before the interruption
    whole, resumed = load_features(tmp_path / "whole.h5"), load_features(output)
    assert resumed.paths == whole.paths and np.array_equal(resumed.features, whole.features)
    assert resumed.labels.tolist() == whole.labels.tolist() and resumed.meta["n_skipped"] == 1
    assert not (tmp_path / "features.h5.partial").exists()
    # the unreadable image was met before the interruption; the resumed run still names it, and so does the file
    assert "skipping unreadable image" not in caplog.text
    assert "skipped 1 of 5 images that could not be read: basophil/broken.jpg" in caplog.text
    assert json.loads(resumed.meta["skipped_paths"]) == ["basophil/broken.jpg"]

    _counting_backbones(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        ef.main([*args, "--output", str(output)])
    backbones = _counting_backbones(monkeypatch)
    with caplog.at_level(logging.WARNING):
        ef.main([*args, "--img-size", "42", "--output", str(output)])  # (the last --img-size counts)
    assert re.search(r"discarding .*features\.h5\.partial: computed with other settings \(img_size\)", caplog.text)
    assert backbones[0].calls == 4

    # the same relative --data, run from another folder, names other images: their progress is not mixed in
    for place in ("A", "B"):
        shutil.copytree(image_folder, tmp_path / place / "cells")
    relative = [*args[: args.index("--data") + 1], "cells", *args[args.index("--data") + 2 :]]
    monkeypatch.chdir(tmp_path / "A")
    _counting_backbones(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        ef.main([*relative, "--output", str(output)])
    monkeypatch.chdir(tmp_path / "B")
    _counting_backbones(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ef.main([*relative, "--output", str(output)])
    assert re.search(r"discarding .*features\.h5\.partial: computed with other settings \(images\)", caplog.text)


def test_a_damaged_progress_file_is_embedded_again(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunk cut short (a machine that went down before it reached the disk): named, dropped, and its images and
    the later ones embedded again, to the uninterrupted extraction's features."""
    args, output = _interrupted_at_the_third_image(tiny_weights[0], image_folder, tmp_path, monkeypatch)
    second = sorted((tmp_path / "features.h5.partial").glob("chunk_*"))[1]
    second.write_bytes(second.read_bytes()[:100])
    backbones = _counting_backbones(monkeypatch)
    with caplog.at_level(logging.INFO):
        ef.main([*args, "--output", str(output)])
    assert f"discarding the damaged progress file {second} (BadZipFile" in caplog.text
    assert re.search(r"continuing .*features\.h5\.partial: 1 images already processed", caplog.text)
    whole, resumed = load_features(tmp_path / "whole.h5"), load_features(output)
    assert resumed.paths == whole.paths and np.array_equal(resumed.features, whole.features)
    assert backbones[0].calls == 4  # the first chunk, kept, held the unreadable image; the 4 readable ones again
    # a file where the progress folder goes is said before any image is embedded, not at the first save
    (tmp_path / "other.h5.partial").write_text("not a folder")
    with pytest.raises(ValueError, match=r"other\.h5\.partial is in the way: this extraction saves its progress"):
        ef.main([*args, "--output", str(tmp_path / "other.h5")])
    assert backbones[0].calls == 4


def test_an_interrupt_saves_what_was_computed_since_the_last_save(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C before the first periodic save: the images embedded so far are saved, one line says so and how to
    continue, and the re-run embeds only the others and writes what an uninterrupted run writes."""
    args = _args(tiny_weights[0], image_folder)
    ef.main([*args, "--output", str(tmp_path / "whole.h5")])
    whole = load_features(tmp_path / "whole.h5")
    monkeypatch.setattr(ef, "PARTIAL_SAVE_SECONDS", float("inf"))
    output, partial = tmp_path / "features.h5", tmp_path / "features.h5.partial"
    _counting_backbones(monkeypatch, stop_at=3)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        ef.main([*args, "--output", str(output)])
    # images 0-2 of the list: basophil/broken.jpg (unreadable), basophil/c.JPG and loose.png (embedded)
    assert f"interrupted: 3 of 5 images are saved in {partial}; run the same command to continue" in caplog.text
    assert sorted(p.name for p in partial.iterdir()) == ["chunk_000000000_000000003.npz", "settings.json"]
    with np.load(partial / "chunk_000000000_000000003.npz") as chunk:
        assert chunk["indices"].tolist() == [1, 2]
        assert np.array_equal(chunk["features"], whole.features[:2])

    backbones = _counting_backbones(monkeypatch)
    ef.main([*args, "--output", str(output)])
    assert backbones[0].calls == 2  # neutrophil/b.png and neutrophil/patient1/a.jpg
    resumed = load_features(output)
    assert resumed.paths == whole.paths and np.array_equal(resumed.features, whole.features)
    assert resumed.labels.tolist() == whole.labels.tolist() and resumed.meta["n_skipped"] == 1


def test_an_interrupt_during_a_save_loses_nothing(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C while a chunk is being written (its file cut short): no damaged chunk is left, the interrupted save is
    done again before the extraction stops, and the re-run continues from it."""
    args = _args(tiny_weights[0], image_folder)
    ef.main([*args, "--output", str(tmp_path / "whole.h5")])
    monkeypatch.setattr(ef, "PARTIAL_SAVE_SECONDS", 0.0)
    savez, written = np.savez, []

    def savez_interrupted_once(file: str | Path, **arrays: np.ndarray) -> None:
        written.append(file)
        savez(file, **arrays)
        if len(written) == 2:  # the save after basophil/c.JPG, the first image embedded
            Path(file).write_bytes(Path(file).read_bytes()[:100])
            raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_interrupted_once)
    output, partial = tmp_path / "features.h5", tmp_path / "features.h5.partial"
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        ef.main([*args, "--output", str(output)])
    assert f"interrupted: 2 of 5 images are saved in {partial}" in caplog.text
    chunks = sorted(p.name for p in partial.glob("chunk_*"))
    assert chunks == ["chunk_000000000_000000001.npz", "chunk_000000001_000000002.npz"]
    backbones = _counting_backbones(monkeypatch)
    with caplog.at_level(logging.INFO):
        ef.main([*args, "--output", str(output)])
    assert re.search(r"continuing .*features\.h5\.partial: 2 images already processed", caplog.text)
    assert backbones[0].calls == 3
    whole, resumed = load_features(tmp_path / "whole.h5"), load_features(output)
    assert resumed.paths == whole.paths and np.array_equal(resumed.features, whole.features)


_TERMINATED_AT_THE_THIRD_BATCH = """
import os, signal, sys, torch
from dinov2.eval import extract_features as ef

group = sys.argv.pop(1) == "group"

class Terminated(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.embed_dim, self.calls = inner, inner.embed_dim, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:  # as `kill` sends it, or a job scheduler to the whole job (data-loader workers too)
            os.killpg(os.getpgrp(), signal.SIGTERM) if group else signal.raise_signal(signal.SIGTERM)
        return self.inner(x)

load = ef.load_backbone
ef.load_backbone = lambda *args, **kwargs: Terminated(load(*args, **kwargs))
ef.PARTIAL_SAVE_SECONDS = float("inf")
ef.main(sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a POSIX signal")
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_the_work_and_still_ends_the_process(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, workers: int,
) -> None:
    """A killed extraction (SIGTERM) saves its progress like Ctrl-C, then ends as SIGTERM ends a process.

    With data-loader workers the signal goes to the whole process group, as a job scheduler sends it.
    """
    args = _args(tiny_weights[0], image_folder)
    ef.main([*args, "--output", str(tmp_path / "whole.h5")])
    output, partial = tmp_path / "features.h5", tmp_path / "features.h5.partial"
    target = "group" if workers else "process"
    command = [sys.executable, "-c", _TERMINATED_AT_THE_THIRD_BATCH, target, *args, "--num-workers", str(workers),
               "--output", str(output)]  # fmt: skip
    killed = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGTERM, killed.stderr
    assert f"interrupted: 3 of 5 images are saved in {partial}; run the same command to continue" in killed.stderr
    assert "killed by signal" not in killed.stderr  # the workers let this process save and end them
    assert [p.name for p in partial.glob("chunk_*")] == ["chunk_000000000_000000003.npz"]
    backbones = _counting_backbones(monkeypatch)
    ef.main([*args, "--output", str(output)])
    assert backbones[0].calls == 2
    whole, resumed = load_features(tmp_path / "whole.h5"), load_features(output)
    assert resumed.paths == whole.paths and np.array_equal(resumed.features, whole.features)


class _SeesSigterm(torch.nn.Module):
    """A backbone that records the SIGTERM handler in place while it is called."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.embed_dim, self.handlers = inner, inner.embed_dim, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.handlers.append(signal.getsignal(signal.SIGTERM))
        return self.inner(x)


def test_the_sigterm_handler_is_set_only_during_the_extraction(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``extract_features`` is also a library function: the program calling it keeps its SIGTERM behaviour."""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the test needs SIGTERM's default action"
    spies: list[_SeesSigterm] = []
    monkeypatch.setattr(ef, "load_backbone", lambda *a, **k: spies.append(_SeesSigterm(hub_load_backbone(*a, **k)))
                        or spies[-1])  # fmt: skip
    ef.extract_features(image_folder, tmp_path / "a.h5", weights=tiny_weights[0], img_size=IMG, device="cpu")
    assert all(callable(h) for h in spies[0].handlers)  # SIGTERM is turned into an interrupt while embedding
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def own_handler(signum: int, frame: object) -> None:
        """A program's own handler (e.g. the training's checkpoint-and-exit)."""

    signal.signal(signal.SIGTERM, own_handler)
    try:
        ef.extract_features(image_folder, tmp_path / "b.h5", weights=tiny_weights[0], img_size=IMG, device="cpu")
        assert spies[1].handlers == [own_handler] and signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_txt_and_csv_lists_and_worker_loading(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    weights, _ = tiny_weights
    txt = image_folder / "list.txt"
    txt.write_text("# cells to embed\nneutrophil/b.png\n\n" + str(image_folder / "basophil" / "c.JPG") + "\n")
    from_txt = ef.extract_features(txt, tmp_path / "txt.npz", weights=weights, img_size=IMG, device="cpu")
    assert from_txt.paths == ["neutrophil/b.png", str(image_folder / "basophil" / "c.JPG")]
    assert from_txt.labels.tolist() == [-1, -1] and from_txt.class_names == []

    csv_path = image_folder / "list.csv"
    csv_path.write_text("path,label\nneutrophil/b.png,neutrophil\nbasophil/c.JPG,basophil\nloose.png,\n")
    from_csv = ef.extract_features(csv_path, tmp_path / "csv.npz", weights=weights, img_size=IMG,
                                   device="cpu", num_workers=1, batch_size=2)
    assert from_csv.class_names == ["basophil", "neutrophil"]
    assert from_csv.labels.tolist() == [1, 0, -1]
    np.testing.assert_allclose(from_csv.features[0], from_txt.features[0], atol=1e-6)

    reloaded = load_features(tmp_path / "csv.npz")
    np.testing.assert_array_equal(reloaded.features, from_csv.features)
    assert reloaded.paths == from_csv.paths and reloaded.class_names == from_csv.class_names
    assert reloaded.meta["embed_dim"] == 64 and reloaded.meta["model"] == "inferred:vit"

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="needs a 'path' column"):
        image_list.list_images(bad_csv)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        image_list.list_images(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match="--data not found"):
        image_list.list_images(tmp_path / "nowhere")


def test_no_readable_image_is_an_error(tmp_path: Path, tiny_weights: tuple[Path, DinoVisionTransformer]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    expected = re.escape(f"none of the 1 images could be read, e.g. {tmp_path / 'a' / 'x.png'}")
    with pytest.raises(ValueError, match=expected):
        ef.extract_features(tmp_path, weights=tiny_weights[0], img_size=IMG, device="cpu")


def test_symlinked_class_folders_are_followed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cells"
    _image(root / "neutrophil" / "a.png", 0)
    _image(tmp_path / "elsewhere" / "basophil" / "b.png", 1)
    (root / "basophil").symlink_to(tmp_path / "elsewhere" / "basophil", target_is_directory=True)
    (root / "neutrophil" / "loop").symlink_to(root, target_is_directory=True)  # must not be walked forever
    (root / "neutrophil" / "gone.png").symlink_to(tmp_path / "moved_away.png")  # a broken link is named
    with caplog.at_level(logging.WARNING):
        images = image_list.list_images(root)
    assert images.paths == ["basophil/b.png", "neutrophil/a.png"]
    assert images.class_names == ["basophil", "neutrophil"] and images.labels == [0, 1]
    assert f"skipping {root / 'neutrophil' / 'loop'}" in caplog.text
    assert f"skipping {root / 'neutrophil' / 'gone.png'}: a link to {tmp_path / 'moved_away.png'}" in caplog.text


def test_images_beside_class_folders_are_named_and_kept_unlabelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray image at the root of a labelled folder is named (the first five) and kept with label -1; a folder of
    images only is an unlabelled set, and says nothing."""
    root = tmp_path / "cells"
    _image(root / "neutrophil" / "a.png", 0)
    for i in range(7):
        _image(root / f"stray_{i}.png", i + 1)
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.image_list"):
        images = image_list.list_images(root)
    assert images.labels == [0] + [-1] * 7 and images.class_names == ["neutrophil"]
    assert (f"{root}: 7 image(s) lie directly in the folder, beside its class folders: stray_0.png, stray_1.png, "
            "stray_2.png, stray_3.png, stray_4.png and 2 more; they have no class and are kept unlabelled (label -1)"
            ) in caplog.text  # fmt: skip
    caplog.clear()
    shutil.rmtree(root / "neutrophil")
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.image_list"):
        assert image_list.list_images(root).labels == [-1] * 7
    assert caplog.text == ""


def test_a_list_whose_paths_all_miss_is_refused_before_the_model_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_weights: tuple[Path, DinoVisionTransformer]
) -> None:
    """Paths written relative to the working folder, which a list's are not: one error naming the first path looked
    up and where relative paths are read from, before any model is loaded; --root reads them from elsewhere."""
    for i in range(50):
        _image(tmp_path / "cells" / "blast" / f"{i}.png", i, size=(14, 14))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "cells.csv").write_text("path,label\n" + "".join(f"cells/blast/{i}.png,blast\n" for i in range(50)))
    (lists / "cells.txt").write_text("".join(f"cells/blast/{i}.png\n" for i in range(50)))
    loaded: list[object] = []
    monkeypatch.setattr(ef, "load_backbone", lambda name, weights: loaded.append(weights))
    monkeypatch.chdir(tmp_path)  # where the paths would be right
    for name in ("cells.csv", "cells.txt"):
        expected = (f"{lists / name}: none of the 20 images looked up exists, e.g. {lists / 'cells/blast/0.png'} "
                    f"(a relative path is read from the list's folder, {lists}; --root names another)")  # fmt: skip
        with pytest.raises(DatasetError, match=re.escape(expected)):
            ef.extract_features(lists / name, tmp_path / "new" / "f.npz", weights="w.pth", img_size=IMG, device="cpu")
        assert not (tmp_path / "new").exists()  # the output's folder, made to test it, is gone with the failure
        elsewhere = tmp_path / "cells"
        with pytest.raises(DatasetError, match=re.escape(f"(a relative path is read from --root {elsewhere})")):
            listed = image_list.list_images(lists / name, root=elsewhere, root_setting="--root")
            image_list.check_list_paths(lists / name, listed, root_setting="--root")
    assert loaded == []
    monkeypatch.undo()
    # one missing image, on the first line (the first of the images looked up): skipped later, not refused
    (lists / "cells.csv").write_text("path,label\ncells/blast/gone.png,blast\n"
                                     + "".join(f"cells/blast/{i}.png,blast\n" for i in range(50)))
    result = ef.main(["--weights", str(tiny_weights[0]), "--data", str(lists / "cells.csv"), "--root", str(tmp_path),
                      "--output", str(tmp_path / "f.npz"), "--img-size", str(IMG), "--num-workers", "0",
                      "--device", "cpu"])  # fmt: skip
    assert len(result) == 50 and result.meta["n_skipped"] == 1 and result.meta["root"] == str(tmp_path.resolve())
    assert result.paths == [f"cells/blast/{i}.png" for i in range(50)]


def test_csv_columns_and_root_read_a_manifest(
    tmp_path: Path, tiny_weights: tuple[Path, DinoVisionTransformer]
) -> None:
    """A manifest's columns (file,label,...) named with --csv-columns, its paths read from --root."""
    data = tmp_path / "data"
    _image(data / "dev" / "basophil" / "a.jpg", 0)
    _image(data / "dev" / "neutrophil" / "b.jpg", 1)
    manifest = data / "manifests" / "dev.csv"
    manifest.parent.mkdir()
    manifest.write_text("file,label,width\ndev/basophil/a.jpg,basophil,40\ndev/neutrophil/b.jpg,neutrophil,40\n")
    common = ["--weights", str(tiny_weights[0]), "--data", str(manifest), "--img-size", str(IMG),
              "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    result = ef.main([*common, "--csv-columns", "file,label", "--root", str(data), "--output", str(tmp_path / "f.h5")])
    assert result.paths == ["dev/basophil/a.jpg", "dev/neutrophil/b.jpg"] and result.labels.tolist() == [0, 1]
    assert result.class_names == ["basophil", "neutrophil"] and result.meta["root"] == str(data.resolve())
    unlabelled = image_list.list_images(manifest, columns=("file", None), root=data)
    assert unlabelled.labels == [-1, -1] and unlabelled.class_names == []
    with pytest.raises(DatasetError, match=r"needs a 'path' column \(found \['file', 'label', 'width'\]\); name its "
                                           r"path and label columns with --csv-columns, e.g. file,label"):
        image_list.list_images(manifest, root=data, columns_setting="--csv-columns")
    with pytest.raises(DatasetError, match=r"needs a 'path' column \(found \['file', 'label', 'width'\]\)$"):
        image_list.list_images(manifest, root=data)  # a caller without the option (the kNN monitor) names none
    with pytest.raises(FileNotFoundError, match="--data not found"):  # not "--root applies to a list"
        image_list.list_images(data / "manifests" / "gone.csv", root=data, root_setting="--root")
    with pytest.raises(DatasetError, match="needs a 'class' column"):
        image_list.list_images(manifest, columns=("file", "class"), root=data)
    with pytest.raises(DatasetError, match="--csv-columns applies to a .csv list"):
        image_list.list_images(data / "dev", columns=("file", "label"), columns_setting="--csv-columns")
    with pytest.raises(DatasetError, match="--root applies to a .txt or .csv list"):
        image_list.list_images(data / "dev", root=data, root_setting="--root")
    with pytest.raises(SystemExit):
        ef.main([*common, "--csv-columns", "file,label,width", "--output", str(tmp_path / "g.h5")])


def test_csv_columns_name_a_label_column_not_called_label(
    tmp_path: Path, tiny_weights: tuple[Path, DinoVisionTransformer]
) -> None:
    """The label column --csv-columns names is read, whatever its name."""
    _image(tmp_path / "a.jpg", 0)
    _image(tmp_path / "b.jpg", 1)
    manifest = tmp_path / "cells.csv"
    manifest.write_text("file,cell_type\na.jpg,basophil\nb.jpg,neutrophil\n")
    result = ef.main(["--weights", str(tiny_weights[0]), "--data", str(manifest), "--csv-columns", "file,cell_type",
                      "--output", str(tmp_path / "f.h5"), "--img-size", str(IMG), "--num-workers", "0",
                      "--device", "cpu"])  # fmt: skip
    assert result.paths == ["a.jpg", "b.jpg"]
    assert result.class_names == ["basophil", "neutrophil"] and result.labels.tolist() == [0, 1]


def test_the_real_dev_manifest_with_csv_columns_and_root(
    shared_data_dir: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """The first rows of manifests/dev.csv, as it is (file,label,... relative to the data folder)."""
    lines = (shared_data_dir / "manifests" / "dev.csv").read_text().splitlines()
    manifest = tmp_path / "dev.csv"
    manifest.write_text("\n".join(lines[:5]) + "\n")
    result = ef.main(["--weights", str(tiny_weights[0]), "--data", str(manifest), "--csv-columns", "file,label",
                      "--root", str(shared_data_dir), "--output", str(tmp_path / "f.h5"), "--num-workers", "0",
                      "--device", "cpu"])  # fmt: skip
    assert len(result) == 4 and result.meta["n_skipped"] == 0 and result.paths[0] == lines[1].split(",")[0]
    assert result.class_names == sorted({line.split(",")[1] for line in lines[1:5]})


def test_csv_list_repeating_an_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of one image would land in different folds and test each other: the list is refused, by line."""
    csv_path = tmp_path / "cells.csv"
    csv_path.write_text("path,label\nneutrophil/b.png,neutrophil\nbasophil/c.png,basophil\n./neutrophil/b.png,ig\n")
    with pytest.raises(DatasetError, match=r"cells\.csv:4: \./neutrophil/b\.png is listed again \(first on line 2\)"):
        image_list.list_images(csv_path)
    absolute = tmp_path / "basophil" / "c.png"  # the image of line 3, by its absolute path
    csv_path.write_text(f"path,label\nneutrophil/b.png,neutrophil\nbasophil/c.png,basophil\n{absolute},basophil\n")
    with pytest.raises(DatasetError, match=r"cells\.csv:4: .*c\.png is listed again \(first on line 3\)"):
        image_list.list_images(csv_path)
    monkeypatch.chdir(tmp_path)  # the list named relative to the working folder
    with pytest.raises(DatasetError, match=r"cells\.csv:4: .*c\.png is listed again \(first on line 3\)"):
        image_list.list_images("cells.csv")


def test_csv_rows_without_a_label_and_an_empty_csv_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A row whose label cell is empty is kept unlabelled (-1), which the probes refuse only later, after the
    extraction: the list's lines are named when it is read. A list without a label column says nothing."""
    csv_path = tmp_path / "cells.csv"
    csv_path.write_text("path,label\na.png,neutrophil\nb.png,\nc.png, \nd.png,basophil\n")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        listed = image_list.list_images(csv_path)
    assert listed.labels == [1, -1, -1, 0]
    assert [r.getMessage() for r in caplog.records] == [
        f"{csv_path}: 2 row(s) have an empty 'label': lines 3, 4; they are kept unlabelled (label -1), which the kNN "
        "and linear probes refuse"
    ]
    caplog.clear()
    csv_path.write_text("path\na.png\nb.png\n")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert image_list.list_images(csv_path).labels == [-1, -1]
    assert caplog.records == []
    csv_path.write_text("")
    with pytest.raises(DatasetError, match=r"cells\.csv is empty: a CSV image list needs a header row naming its "):
        image_list.list_images(csv_path)


def test_lists_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Excel and Notepad start UTF-8 files with a BOM; it is not part of the first column name or path."""
    csv_path = tmp_path / "excel.csv"
    csv_path.write_text("path,label\nneutrophil/b.png,neutrophil\n", encoding="utf-8-sig")
    from_csv = image_list.list_images(csv_path)
    assert from_csv.paths == ["neutrophil/b.png"] and from_csv.class_names == ["neutrophil"]
    txt_path = tmp_path / "notepad.txt"
    txt_path.write_text("neutrophil/b.png\n", encoding="utf-8-sig")
    assert image_list.list_images(txt_path).paths == ["neutrophil/b.png"]


@pytest.mark.parametrize(("name", "message"), [("cells.txt", r"cells.txt:1: .* is not UTF-8 text"),
                                               ("cells.csv", r"cells.csv: an image list must be UTF-8 text")])
def test_a_list_in_another_encoding_is_named(tmp_path: Path, name: str, message: str) -> None:
    listed = tmp_path / name
    listed.write_bytes("path,label\nZelle_\u00fc.png,blast\n".encode("utf-16"))
    with pytest.raises(ValueError, match=message):
        image_list.list_images(listed)


def test_a_txt_list_read_from_root_takes_a_raw_non_utf8_name_found_there(tmp_path: Path) -> None:
    """A name that is not UTF-8 (as make_file_lists writes one) is an image if it exists where --root says the
    list's paths are, not only beside the list."""
    raw_name = os.fsdecode(b"Zelle_\xfc.png")
    _image(tmp_path / "images" / raw_name, 0)
    listed = tmp_path / "lists" / "cells.txt"
    listed.parent.mkdir()
    listed.write_bytes(b"Zelle_\xfc.png\n")
    assert image_list.list_images(listed, root=tmp_path / "images").paths == [raw_name]
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        image_list.list_images(listed)  # beside the list there is no such image


def test_a_txt_list_follows_the_training_lists_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_weights: tuple[Path, DinoVisionTransformer]
) -> None:
    """`~` paths, # comments, and a line that is no image path named by its line number, as in training."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _image(tmp_path / "home" / "cells" / "a.png", 0)
    listed = tmp_path / "cells.txt"
    listed.write_text("# my cells\n~/cells/a.png\n")
    features = ef.extract_features(listed, weights=tiny_weights[0], img_size=IMG, device="cpu")
    assert features.paths == [str(tmp_path / "home" / "cells" / "a.png")] and features.features.shape[0] == 1
    assert FileListDataset(listed).path(0) == features.paths[0]
    listed.write_text("~/cells/a.png\nnotes about the stain\n")
    with pytest.raises(ValueError, match=r"cells.txt:2: 'notes about the stain' is not an image path"):
        image_list.list_images(listed)
    with pytest.raises(ValueError, match=r"cells.txt is empty"):
        listed.write_text("# nothing yet\n")
        image_list.list_images(listed)
    listed_csv = tmp_path / "cells.csv"
    listed_csv.write_text("path,label\n~/cells/a.png,neutrophil\n")
    assert image_list.list_images(listed_csv).paths == [str(tmp_path / "home" / "cells" / "a.png")]
    listed_csv.write_text("path\n~/cells/a.png\n")  # the label column is optional: unlabelled
    unlabelled = image_list.list_images(listed_csv)
    assert unlabelled.labels == [-1] and unlabelled.class_names == []
    listed_csv.write_text("path,label\n~/cells/a.png,neutrophil\n# a comment row,\n")
    with pytest.raises(ValueError, match=r"cells.csv:3: '# a comment row' is not an image path"):
        image_list.list_images(listed_csv)
    monkeypatch.chdir(tmp_path)
    assert image_list.list_images("~/cells").paths == ["a.png"]
    with pytest.raises(FileNotFoundError, match="^evaluation.knn_data not found: "):
        image_list.list_images("~/nowhere", setting="evaluation.knn_data")


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names of any bytes are a Linux matter")
def test_a_name_an_h5_file_cannot_store_is_refused_before_any_work(
    tmp_path: Path, tiny_weights: tuple[Path, DinoVisionTransformer]
) -> None:
    """A file name that is not UTF-8 (kept by the loader as it is) fits an .npz, not an .h5: said up front."""
    _image(tmp_path / "cells" / "a" / os.fsdecode(b"\xff\xfe.jpg"), seed=1)
    _image(tmp_path / "cells" / "a" / "ok.jpg", seed=2)
    args = ["--weights", str(tiny_weights[0]), "--data", str(tmp_path / "cells"), "--img-size", str(IMG),
            "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    for suffix in (".h5", ".hdf5"):
        with pytest.raises(ValueError, match=rf"a/\\xff\\xfe\.jpg: the name is not UTF-8, which an HDF5 file \({suffix}\)"):
            ef.main([*args, "--output", str(tmp_path / f"f{suffix}")])
        assert not (tmp_path / f"f{suffix}.partial").exists()
    # a folder's name, which the file records too
    odd_folder = tmp_path / os.fsdecode(b"cells_\xe9")
    _image(odd_folder / "a" / "ok.jpg", seed=3)
    with pytest.raises(ValueError, match=r"cells_\\xe9: the name is not UTF-8"):
        ef.main([*args[:2], "--data", str(odd_folder), *args[4:], "--output", str(tmp_path / "g.h5")])
    stored = ef.main([*args, "--output", str(tmp_path / "f.npz")])
    assert len(stored) == 2 and load_features(tmp_path / "f.npz").paths == stored.paths


def test_output_suffix_is_checked_before_any_work(monkeypatch: pytest.MonkeyPatch, image_folder: Path,
                                                  tmp_path: Path) -> None:
    loaded = []
    monkeypatch.setattr(ef, "load_backbone", lambda name, weights: loaded.append(weights))
    with pytest.raises(ValueError, match=r"f\.pt: unsupported features file type '\.pt'"):
        ef.extract_features(image_folder, tmp_path / "f.pt", weights="w.pth", img_size=IMG, device="cpu")
    (tmp_path / "taken").write_text("a file where a folder is wanted")
    with pytest.raises(ValueError, match=r"x\.h5: .*taken is a file, not a folder"):
        ef.extract_features(image_folder, tmp_path / "taken" / "sub" / "x.h5", weights="w.pth", img_size=IMG,
                            device="cpu")  # fmt: skip
    (tmp_path / "folder.h5").mkdir()
    with pytest.raises(ValueError, match=r"cannot write .*folder\.h5: it is a folder; name a file ending in \.h5"):
        ef.extract_features(image_folder, tmp_path / "folder.h5", weights="w.pth", img_size=IMG, device="cpu")
    (tmp_path / "features").mkdir()  # a folder named for the output, not a file's name
    with pytest.raises(ValueError, match=r"cannot write .*features: it is a folder; name a file ending in \.h5"):
        ef.extract_features(image_folder, tmp_path / "features", weights="w.pth", img_size=IMG, device="cpu")
    assert loaded == []


@pytest.mark.parametrize("probe_fails", [False, True])
def test_the_output_folders_made_for_the_probe_are_all_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe_fails: bool
) -> None:
    """Three folders made (a, a/b, a/b/c) to test that the output can be written: none is left, whether the test
    file could be written or not."""
    output = tmp_path / "a" / "b" / "c" / "f.h5"
    if probe_fails:
        def no_space(*args: object, **kwargs: object) -> tuple[int, str]:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(files.tempfile, "mkstemp", no_space)
        with pytest.raises(ValueError, match=re.escape(f"cannot write {output}: {output.parent} takes no new files")):
            files.check_folder_writable(output.parent, f"cannot write {output}")
    else:
        files.check_folder_writable(output.parent, f"cannot write {output}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="/proc takes no files on Linux, even for root")
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch, image_folder: Path
) -> None:
    """A folder that cannot be created, or one that takes no files, though permissions (or root) would allow it."""
    loaded = []
    monkeypatch.setattr(ef, "load_backbone", lambda name, weights: loaded.append(weights))
    with pytest.raises(ValueError, match=r"cannot write /proc/x\.h5: /proc takes no new files"):
        ef.extract_features(image_folder, "/proc/x.h5", weights="w.pth", img_size=IMG, device="cpu")
    with pytest.raises(ValueError, match=r"cannot write /proc/no_such/x\.h5: the folder /proc/no_such cannot be made"):
        ef.extract_features(image_folder, "/proc/no_such/x.h5", weights="w.pth", img_size=IMG, device="cpu")
    assert loaded == []


def test_an_image_size_that_is_not_whole_patches_names_the_option(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """--img-size 100 with 14 px patches: an error that names the option and the nearest sizes, before any image is
    embedded or any progress is kept."""
    output = tmp_path / "out" / "f.h5"
    with pytest.raises(ValueError, match=re.escape("--img-size 100 is not a multiple of the model's patch size 14 "
                                                   "(e.g. 98 or 112)")):  # fmt: skip
        ef.main([*_args(tiny_weights[0], image_folder), "--img-size", "100", "--output", str(output)])
    with pytest.raises(ValueError, match=re.escape("--img-size 10 is not a multiple of the model's patch size 14 "
                                                   "(e.g. 14)")):  # fmt: skip
        ef.main([*_args(tiny_weights[0], image_folder), "--img-size", "10", "--output", str(output)])
    assert not (tmp_path / "out").exists()


def test_hub_name_without_weights_fetches_the_release(monkeypatch: pytest.MonkeyPatch, image_folder: Path) -> None:
    requested = []

    def fake_load_backbone(name: str | None, weights: str) -> DinoVisionTransformer:
        requested.append((name, weights))
        return DinoVisionTransformer(img_size=IMG, embed_dim=64, depth=1, num_heads=1)

    monkeypatch.setattr(ef, "load_backbone", fake_load_backbone)
    result = ef.extract_features(image_folder, model="dinobloom_b", img_size=IMG, device="cpu")
    assert requested == [("dinobloom_b", "https://zenodo.org/records/10908163/files/DinoBloom-B.pth")]
    assert result.meta["model"] == "dinobloom_b"
    with pytest.raises(ValueError, match="no released weights known for 'vit_small'"):
        ef.release_weights("vit_small")
    with pytest.raises(ValueError, match="give --model, --weights, or both"):
        ef.extract_features(image_folder)


def test_features_io_validation(tmp_path: Path) -> None:
    features = np.eye(3, 4, dtype=np.float32)
    for suffix in (".h5", ".npz"):
        path = save_features(tmp_path / f"f{suffix}", features, [0, 1, -1], ["a", "b", "c"], ["x", "y"],
                             {"model": "m", "weights": "w.pth", "embed_dim": 4})
        loaded = load_features(path)
        assert isinstance(loaded, FeatureSet) and len(loaded) == 3
        np.testing.assert_array_equal(loaded.features, features)
        assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [0, 1, -1]
        assert loaded.meta == {"model": "m", "weights": "w.pth", "embed_dim": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "f.npz"]  # no temporary files left
    with pytest.raises(ValueError, match="unsupported features file type '.pt'"):
        save_features(tmp_path / "f.pt", features, [0, 1, 0], ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="3 feature rows but labels of shape"):
        save_features(tmp_path / "g.h5", features, [0, 1], ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match=r"labels must lie in \[-1, 1\]"):
        save_features(tmp_path / "g.h5", features, [0, 2, 0], ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="clash with the array names"):
        save_features(tmp_path / "g.h5", features, [0, 1, 0], ["a", "b", "c"], ["x", "y"], {"labels": "no"})
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f.create_dataset("features", data=features)
    with pytest.raises(ValueError, match=r"partial\.h5: missing datasets \['labels', 'paths'\]"):
        load_features(tmp_path / "partial.h5")
    with pytest.raises(FileNotFoundError, match="features file not found"):
        load_features(tmp_path / "absent.npz")


def test_damaged_features_files_are_value_errors(tmp_path: Path) -> None:
    """Files that are not features files, or are cut short, are named in a ValueError; nothing is unpickled."""
    features = np.eye(3, 4, dtype=np.float32)
    damaged = {}
    for suffix in (".h5", ".npz"):
        whole = save_features(tmp_path / f"whole{suffix}", features, [0, 1, 0], ["a", "b", "c"], ["x", "y"])
        damaged[tmp_path / f"truncated{suffix}"] = whole.read_bytes()[: whole.stat().st_size // 2]
        damaged[tmp_path / f"text{suffix}"] = b"x\n"
    np.save(tmp_path / "array.npy", features)
    damaged[tmp_path / "array.npz"] = (tmp_path / "array.npy").read_bytes()  # a single .npy array, renamed
    for path, content in damaged.items():
        path.write_bytes(content)
        kind = "HDF5" if path.suffix == ".h5" else ".npz"
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable {kind} features file (")):
            load_features(path)


def test_real_blood_cell_images(shared_data_dir: Path, tiny_weights: tuple[Path, DinoVisionTransformer],
                                tmp_path: Path) -> None:
    """Real PBC jpgs decode and keep their class from the folder name."""
    dev = shared_data_dir / "dev"
    classes = sorted(p.name for p in dev.iterdir() if p.is_dir())[:2]
    rows = [f"{(dev / c / f.name).as_posix()},{c}" for c in classes for f in sorted((dev / c).glob("*.jpg"))[:3]]
    csv_path = tmp_path / "cells.csv"
    csv_path.write_text("path,label\n" + "\n".join(rows) + "\n")
    result = ef.extract_features(csv_path, tmp_path / "f.h5", weights=tiny_weights[0], img_size=IMG, device="cpu")
    assert result.class_names == classes and result.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert result.meta["n_skipped"] == 0 and np.isfinite(result.features).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_a_clear_error(image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer],
                                             tmp_path: Path) -> None:
    weights, _ = tiny_weights
    with pytest.raises(ValueError, match="--device cuda was requested, but CUDA is not available"):
        ef.extract_features(image_folder, weights=weights, img_size=IMG, device="cuda")
    if not torch.backends.mps.is_available():  # another accelerator this machine lacks, refused as clearly
        with pytest.raises(ValueError, match="--device mps was requested, but PyTorch cannot use it here"):
            ef.extract_features(image_folder, weights=weights, img_size=IMG, device="mps")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        ef.extract_features(image_folder, weights=weights, img_size=IMG, device="cpu", precision="fp16")


def test_a_training_export_is_embedded_at_the_size_its_run_trained_at(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """Without --img-size, a run's teacher_checkpoint.pth gets its run's crops.global_crops_size; a DINOv2 hub file
    (a plain state dict) and a release file (16x16 grid) 224, also when it lies in a run's folder."""
    from omegaconf import OmegaConf

    from dinov2.configs import load_config

    run = tmp_path / "run"
    export = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    export.write_bytes(tiny_weights[0].read_bytes())
    # a run's saved config, as train.py writes it
    config = load_config(Path(__file__).resolve().parents[1] / "dinov2/configs/train/demo.yaml",
                         [f"crops.global_crops_size={IMG}"])  # fmt: skip
    OmegaConf.save(config, run / "config.yaml")
    common = ["--data", str(image_folder), "--num-workers", "0", "--device", "cpu"]
    from_run = ef.main(["--weights", str(export), "--output", str(tmp_path / "run.h5"), *common])
    assert from_run.meta["img_size"] == IMG != 224
    hub_layout = tmp_path / "plain.pth"  # DINOv2's hub layout, whatever its grid: DinoBloom's 224
    torch.save(tiny_weights[1].state_dict(), hub_layout)
    assert ef.main(["--weights", str(hub_layout), "--output", str(tmp_path / "a.h5"), *common]).meta["img_size"] == 224
    told = ef.main(["--weights", str(export), "--output", str(tmp_path / "b.h5"), "--img-size", "42", *common])
    assert told.meta["img_size"] == 42
    release_in_run = run / "DinoBloom-S.pth"  # a file placed in a run's folder is not one of its exports
    torch.manual_seed(0)
    release = DinoVisionTransformer(img_size=224, embed_dim=64, depth=1, num_heads=1, init_values=1.0)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in release.state_dict().items()}}, release_in_run)
    in_run = ef.main(["--weights", str(release_in_run), "--output", str(tmp_path / "c.h5"), *common])
    assert in_run.meta["img_size"] == 224
    with pytest.raises(SystemExit):  # 0 is not a size (and must not mean "the default")
        ef.main(["--weights", str(export), "--output", str(tmp_path / "d.h5"), "--img-size", "0", *common])


def test_a_training_export_copied_out_of_its_run_is_embedded_at_the_size_its_grid_implies(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A teacher_checkpoint.pth without its run's config.yaml: its 2x2 grid of 14 px patches says 28 px, with an INFO
    line; the features are those of the export inside its run. --img-size still wins."""
    from omegaconf import OmegaConf

    from dinov2.configs import load_config

    run = tmp_path / "run"
    export = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    export.write_bytes(tiny_weights[0].read_bytes())
    OmegaConf.save(load_config(Path(__file__).resolve().parents[1] / "dinov2/configs/train/demo.yaml",
                               [f"crops.global_crops_size={IMG}"]), run / "config.yaml")  # fmt: skip
    common = ["--data", str(image_folder), "--num-workers", "0", "--device", "cpu"]
    from_run = ef.main(["--weights", str(export), "--output", str(tmp_path / "run.h5"), *common])
    copied = tmp_path / "copied" / "teacher_checkpoint.pth"
    copied.parent.mkdir()
    shutil.copy(export, copied)
    with caplog.at_level(logging.INFO, logger="dinov2.eval.extract_features"):
        from_copy = ef.main(["--weights", str(copied), "--output", str(tmp_path / "copy.h5"), *common])
    assert from_copy.meta["img_size"] == IMG
    assert f"resized to {IMG} px, the size that the 2x2 position-embedding grid of {copied} implies" in caplog.text
    np.testing.assert_array_equal(from_copy.features, from_run.features)
    told = ef.main(["--weights", str(copied), "--output", str(tmp_path / "told.h5"), "--img-size", "42", *common])
    assert told.meta["img_size"] == 42


def test_pca_embeds_a_copied_training_export_at_the_size_its_grid_implies(
    tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pca takes the same default size as extract_features (here the export's 2x2 grid: 28 px), and refuses an
    output it cannot write before loading any model."""
    from dinov2.eval import pca

    sizes: list[tuple[int, ...]] = []
    tokens_of = pca.patch_tokens_of
    monkeypatch.setattr(pca, "patch_tokens_of", lambda model, images: sizes.append(tuple(images.shape)) or
                        tokens_of(model, images))  # fmt: skip
    monkeypatch.setattr(pca, "save_figure", lambda images, rgb, titles, path: Path(path))
    _image(tmp_path / "a.png", 0)
    copied = tmp_path / "copied" / "teacher_checkpoint.pth"
    copied.parent.mkdir()
    shutil.copy(tiny_weights[0], copied)
    args = ["--weights", str(copied), "--image", str(tmp_path / "a.png"), "--device", "cpu"]
    pca.main([*args, "--output", str(tmp_path / "pca.png")])
    assert sizes == [(1, 3, IMG, IMG)]
    if sys.platform == "linux":
        with pytest.raises(ValueError, match=r"cannot write /proc/pca\.png: /proc takes no new files"):
            pca.main([*args, "--output", "/proc/pca.png"])
        assert len(sizes) == 1


def test_a_named_model_for_a_run_trained_at_another_size_is_warned_about(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--model dinobloom_s (built for 224 px) with the export of a run trained at 28 px: the run's position embedding
    is resampled twice, so the features are not the run's; said, with the remedy. Without --model: nothing to say."""
    from omegaconf import OmegaConf

    from dinov2.configs import load_config
    from dinov2.models import build_model

    run = tmp_path / "run"
    export = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    torch.manual_seed(0)
    small = build_model("vit_small", img_size=IMG, init_values=1.0)  # LayerScale, as the hub entries have
    torch.save({"teacher": {f"backbone.{k}": v for k, v in small.state_dict().items()}}, export)
    config = load_config(Path(__file__).resolve().parents[1] / "dinov2/configs/train/demo.yaml",
                         [f"crops.global_crops_size={IMG}"])  # fmt: skip
    OmegaConf.save(config, run / "config.yaml")
    common = ["--weights", str(export), "--data", str(image_folder), "--num-workers", "0", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.extract_features"):
        ef.main(["--model", "dinobloom_s", "--output", str(tmp_path / "named.h5"), *common])
    assert f"--model dinobloom_s is built for 224 px: the run's {IMG} px position embedding" in caplog.text
    assert "leave --model out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.extract_features"):
        ef.main(["--output", str(tmp_path / "inferred.h5"), *common])
    assert "position embedding" not in caplog.text


def test_bf16_on_a_cpu_autocasts_and_is_recorded(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """`--precision bf16` on a CPU computes in bf16 (it used to fall back to fp32 there): close to, not equal to,
    the float32 features, and the file says so."""
    weights, model = tiny_weights
    output = tmp_path / "bf16.h5"
    ef.main(["--weights", str(weights), "--data", str(image_folder), "--output", str(output), "--img-size", str(IMG),
             "--num-workers", "0", "--device", "cpu", "--precision", "bf16"])  # fmt: skip
    result = load_features(output)
    assert result.meta["precision"] == "bf16" and result.features.dtype == np.float32
    expected = np.stack([_expected_feature(model, image_folder / rel) for rel in result.paths])
    difference = np.abs(result.features - expected).max()
    assert 1e-4 < difference < 0.1 * np.abs(expected).max()


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler (g++)")
def test_compiled_extraction_gives_the_eager_features(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path
) -> None:
    """`--compile` with a batch size that leaves a short last batch (4 readable images of 5, batches of 3): the
    features come from compiled code, the padded batch's extra rows are dropped and every image keeps its own
    features."""
    from torch.profiler import ProfilerActivity, profile

    weights, model = tiny_weights
    output = tmp_path / "compiled.h5"
    torch._dynamo.reset()  # forget other tests' compilations of the same code (e.g. under bf16 autocast)
    with torch._dynamo.config.patch(error_on_recompile=True), profile(activities=[ProfilerActivity.CPU]) as prof:
        # (one compilation for batches of 3 and of 1)
        ef.main(["--weights", str(weights), "--data", str(image_folder), "--output", str(output), "--img-size",
                 str(IMG), "--num-workers", "0", "--device", "cpu", "--batch-size", "3", "--compile"])  # fmt: skip
    assert any("Torch-Compiled Region" in event.name for event in prof.events())
    result = load_features(output)
    assert len(result) == 4 and result.meta["compiled"] is True
    for row, rel in zip(result.features, result.paths):
        np.testing.assert_allclose(row, _expected_feature(model, image_folder / rel), atol=1e-5)


def test_compile_without_a_cpp_compiler_is_an_error_before_any_work(
    image_folder: Path, tiny_weights: tuple[Path, DinoVisionTransformer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the weights are read (or downloaded: a released file is gigabytes)."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError, match=r"--compile on a CPU needs a C\+\+ compiler .* turn --compile off"):
        ef.extract_features(image_folder, tmp_path / "f.h5", weights=tmp_path / "absent.pth", img_size=IMG,
                            device="cpu", compile=True)  # fmt: skip
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.partial").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [("--batch-size", "0", "must be >= 1"),
                                                        ("--num-workers", "-1", "must be >= 0")])
def test_counts_are_checked_by_the_command_line(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The option is named (it used to be torch's DataLoader error, after the model was loaded)."""
    with pytest.raises(SystemExit) as info:
        ef.main(["--data", "cells", "--output", "f.h5", flag, value])
    assert info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_a_features_file_save_killed_before_its_rename_leaves_no_copy_behind(tmp_path: Path) -> None:
    """kill -9 during the final save left a full-size `.f.h5.tmp-<pid>.h5` beside the output for good; the next save
    removes it (a copy of a process still running is left alone)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, running = tmp_path / f".f.h5.tmp-{gone.pid}.h5", tmp_path / f".f.h5.tmp-{os.getppid()}.h5"
    stale.write_bytes(b"\0" * 1000)
    running.write_bytes(b"\0")
    save_features(tmp_path / "f.h5", np.zeros((2, 4), np.float32), np.array([0, 1]), ["a.png", "b.png"], ["x", "y"])
    assert not stale.exists() and running.exists() and load_features(tmp_path / "f.h5").paths == ["a.png", "b.png"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_copy(tmp_path: Path) -> None:
    """A writer that fails half-way leaves the earlier file as it was and removes its temporary copy."""
    from dinov2.files import atomic_write

    target = atomic_write(tmp_path / "f.npz", lambda tmp: np.savez(tmp, x=np.arange(3)))  # (a name that keeps .npz)

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"] and np.load(target)["x"].tolist() == [0, 1, 2]
