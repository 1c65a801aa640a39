"""End to end on real blood-cell images from ../shared/data: images -> features -> kNN, logreg and MIL reports.

The images are read in place through lists written to tmp_path (nothing is copied). The backbone is a tiny
randomly initialised ViT, so the scores say nothing about DinoBloom; the test checks that the pieces fit on
real files and that every report is complete and well formed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dinov2.data.transforms import load_image, make_eval_transform
from dinov2.eval import extract_features, knn, linear
from dinov2.eval.mil.__main__ import main as mil_main
from dinov2.models import DinoVisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

DEV_CLASSES = ("eosinophil", "lymphocyte", "neutrophil", "platelet")
PER_CLASS = 10
MIL_PATIENTS_PER_CLASS = 6
MIL_CELLS = 8
IMG_SIZE = 56  # 4 x 4 patches of 14 px
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "weighted_f1")


def _images(folder: Path, n: int) -> list[Path]:
    """The first ``n`` images of a folder in name order; skips the test when there are fewer."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(images) < n:
        pytest.skip(f"{folder} holds {len(images)} images, the test needs {n}")
    return images[:n]


def _tiny_backbone() -> DinoVisionTransformer:
    """A 2-block ViT with 128-d features and head dim 64 (so that the loader infers the same architecture)."""
    return DinoVisionTransformer(img_size=IMG_SIZE, patch_size=14, embed_dim=128, depth=2, num_heads=2, init_values=1.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny backbone saved as a run's teacher export (`{"teacher": {"backbone.*": ...}}`)."""
    torch.manual_seed(0)
    model = _tiny_backbone()
    path = tmp_path_factory.mktemp("model") / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def dev_features(shared_data_dir: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features of PER_CLASS dev images of each of DEV_CLASSES, listed in a CSV that points into ../shared."""
    folder = tmp_path_factory.mktemp("dev")
    table = folder / "dev.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for name in DEV_CLASSES:
            for image in _images(shared_data_dir / "dev" / name, PER_CLASS):
                writer.writerow([str(image), name])
    output = folder / "dev.h5"
    extract_features.main(
        ["--weights", str(weights), "--data", str(table), "--output", str(output),
         "--img-size", str(IMG_SIZE), "--num-workers", "0", "--device", "cpu", "--batch-size", "16"]
    )
    return output


def test_features_of_real_images_are_complete_and_match_the_backbone(dev_features: Path, weights: Path) -> None:
    with h5py.File(dev_features, "r") as handle:
        features = handle["features"][()]
        labels = handle["labels"][()]
        paths = [p.decode() if isinstance(p, bytes) else p for p in handle["paths"][()]]
        class_names = json.loads(handle.attrs["class_names"])
        embed_dim = int(handle.attrs["embed_dim"])
    n = len(DEV_CLASSES) * PER_CLASS
    assert features.shape == (n, 128) and features.dtype == np.float32 and embed_dim == 128
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)  # stored as DinoBloom's probes use them
    assert class_names == sorted(DEV_CLASSES)
    assert np.bincount(labels, minlength=len(DEV_CLASSES)).tolist() == [PER_CLASS] * len(DEV_CLASSES)
    assert all(Path(p).parent.name == class_names[y] for p, y in zip(paths, labels))
    # the file's first row is the saved backbone applied to the first image with the evaluation preprocessing
    model = _tiny_backbone()
    state = torch.load(weights, map_location="cpu")["teacher"]
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    with torch.inference_mode():
        expected = model.eval()(make_eval_transform(IMG_SIZE)(load_image(paths[0]))[None])
    expected = expected[0].numpy()
    np.testing.assert_allclose(features[0], expected, atol=1e-5)
    assert not np.allclose(features[0], features[-1], atol=1e-3), "different cells gave the same feature"


def _check_report(output_dir: Path, methods: tuple[str, ...], n_samples: int) -> dict:
    """results.json holds every method with sane scores; the Markdown, predictions and PNGs are written."""
    saved = json.loads((output_dir / "results.json").read_text())
    assert set(saved) == {"meta", *methods}
    assert saved["meta"]["n_samples"] == n_samples and saved["meta"]["n_splits"] == 5
    assert saved["meta"]["classes"] == sorted(DEV_CLASSES)
    for method in methods:
        for key in SUMMARY_KEYS:
            score = saved[method][key]
            assert set(score) == {"mean", "std"} and 0.0 <= score["mean"] <= 1.0 and score["std"] >= 0.0
        assert len(saved[method]["per_fold"]) == 5
        assert sum(f["n_test"] for f in saved[method]["per_fold"]) == n_samples
        assert np.asarray(saved[method]["confusion_matrix"]).sum() == n_samples
        assert set(saved[method]["per_class"]) == set(DEV_CLASSES)
        png = output_dir / f"confusion_{method}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    assert (output_dir / "embedding.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (output_dir / "results.md").read_text()
    assert all(method in markdown for method in methods)
    with (output_dir / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == n_samples
    return saved


def test_knn_cli_on_real_features(dev_features: Path, tmp_path: Path) -> None:
    knn.main(["--features", str(dev_features), "--output-dir", str(tmp_path), "--device", "cpu"])
    _check_report(tmp_path, ("knn_1", "knn_20"), len(DEV_CLASSES) * PER_CLASS)


def test_logreg_cli_on_real_features(dev_features: Path, tmp_path: Path) -> None:
    linear.main(["--features", str(dev_features), "--output-dir", str(tmp_path), "--device", "cpu"])
    saved = _check_report(tmp_path, ("logreg",), len(DEV_CLASSES) * PER_CLASS)
    assert saved["meta"]["embed_dim"] == 128


def test_mil_cli_on_real_patient_bags(shared_data_dir: Path, weights: Path, tmp_path: Path) -> None:
    mil_root = shared_data_dir / "mil"
    cells: list[Path] = []
    for label in ("AML", "APL"):
        patients = sorted(p for p in (mil_root / label).iterdir() if p.is_dir())
        if len(patients) < MIL_PATIENTS_PER_CLASS:
            pytest.skip(f"{mil_root / label} holds {len(patients)} patients, the test needs {MIL_PATIENTS_PER_CLASS}")
        for patient in patients[:MIL_PATIENTS_PER_CLASS]:
            cells.extend(_images(patient, MIL_CELLS))
    listing = tmp_path / "mil.txt"
    listing.write_text("".join(f"{p}\n" for p in cells))
    features = tmp_path / "mil.h5"
    extract_features.main(
        ["--weights", str(weights), "--data", str(listing), "--output", str(features),
         "--img-size", str(IMG_SIZE), "--num-workers", "0", "--device", "cpu", "--batch-size", "32"]
    )
    out = tmp_path / "mil"
    mil_main(
        ["--features", str(features), "--output-dir", str(out), "--device", "cpu", "--epochs", "3",
         "--patience", "3", "--hidden-dim", "32", "--attention-dim", "16", "--batch-size", "4"]
    )
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"meta", "abmil"}
    n_patients = 2 * MIL_PATIENTS_PER_CLASS
    assert saved["meta"]["n_patients"] == n_patients and saved["meta"]["classes"] == ["AML", "APL"]
    for key in (*SUMMARY_KEYS, "auroc"):
        assert 0.0 <= saved["abmil"][key]["mean"] <= 1.0
    assert len(saved["abmil"]["per_fold"]) == 5
    with (out / "attention.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(cells) and {r["path"] for r in rows} == {str(p) for p in cells}
    per_patient: dict[str, float] = {}
    for row in rows:
        assert row["label"] == Path(row["path"]).parent.parent.name  # bag label from <label>/<patient>/<cell>
        assert row["patient"] == Path(row["path"]).parent.name
        per_patient[row["patient"]] = per_patient.get(row["patient"], 0.0) + float(row["attention"])
    assert len(per_patient) == n_patients
    assert all(total == pytest.approx(1.0, abs=1e-4) for total in per_patient.values())
    attention = json.loads((out / "attention.json").read_text())
    assert len(attention) == n_patients
    assert (out / "confusion_abmil.png").read_bytes()[:8] == PNG_MAGIC
    with (out / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == n_patients

    # The same bags from the shared manifest's rows for these cells, under its own column names
    manifest = shared_data_dir / "manifests" / "mil.csv"
    if not manifest.is_file():
        pytest.skip(f"{manifest} is missing")
    chosen = {p.relative_to(shared_data_dir).as_posix() for p in cells}
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        manifest_rows = [row for row in reader if row["file"] in chosen]
        header = reader.fieldnames
    assert len(manifest_rows) == len(cells)
    subset = tmp_path / "mil_manifest.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(manifest_rows)
    by_manifest = tmp_path / "mil_manifest"
    mil_main(
        ["--features", str(features), "--output-dir", str(by_manifest), "--device", "cpu", "--epochs", "1",
         "--hidden-dim", "32", "--attention-dim", "16", "--bags", str(subset), "--bag-columns", "bag_id,bag_label,file"]
    )
    with (by_manifest / "predictions.csv").open() as handle:
        patients = {(r["patient"], r["label"]) for r in csv.DictReader(handle)}
    assert patients == {(r["bag_id"], r["bag_label"]) for r in manifest_rows}
    assert patients == {(p.parent.name, p.parent.parent.name) for p in cells}
