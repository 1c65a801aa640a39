"""Reports (JSON, Markdown, PNG), the patch-PCA figure and the per-checkpoint evaluation."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from dinov2 import files
from dinov2.configs import load_config
from dinov2.eval import checkpoints, knn, linear, pca, protocol, reports
from dinov2.eval.features_io import load_features, save_features
from dinov2.eval.mil import __main__ as mil_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000, f"{path} is not a non-trivial PNG"


def test_knn_cli_writes_json_markdown_and_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = (np.eye(3, 12)[y] * 2 + rng.normal(size=(60, 12))).astype(np.float32)
    names = ["basophil", "eosinophil", "lymphocyte"]
    features = save_features(tmp_path / "f.h5", x, y, [f"{names[l]}/{i}.jpg" for i, l in enumerate(y)], names,
                             {"model": "vit_small", "weights": "w.pth"})
    out = tmp_path / "out"
    knn.main(["--features", str(features), "--output-dir", str(out), "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "knn_1", "knn_20"}
    meta = results["meta"]
    assert (meta["features"], meta["n_samples"], meta["classes"], meta["protocol"], meta["n_splits"]) == (
        str(features), 60, names, "stratified_kfold", 5)
    for method in ("knn_1", "knn_20"):
        entry = results[method]
        assert set(entry) == {"accuracy", "balanced_accuracy", "weighted_f1", "per_class", "per_fold", "confusion_matrix"}
        assert set(entry["per_class"]) == set(names)
        assert set(entry["per_class"]["basophil"]) == {"precision", "recall", "f1", "support"}
        assert np.asarray(entry["confusion_matrix"]).sum() == 60
        assert [f["fold"] for f in entry["per_fold"]] == list(range(5))
    markdown = (out / "results.md").read_text()
    assert "| knn_20 |" in markdown and "balanced accuracy" in markdown and "ddof=0" in markdown
    predictions = (out / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "path,label,fold,knn_1,knn_20" and len(predictions) == 61
    # each row's predicted classes are scikit-learn's out-of-fold kNN votes for that path, not e.g. its true label
    rows = list(csv.DictReader(predictions))
    assert [r["path"] for r in rows] == [f"{names[l]}/{i}.jpg" for i, l in enumerate(y)]
    assert [r["label"] for r in rows] == [names[l] for l in y]
    for k in (1, 20):
        expected = np.empty_like(y)
        for train, test in StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y):
            expected[test] = KNeighborsClassifier(n_neighbors=k).fit(x[train], y[train]).predict(x[test])
        assert (expected != y).any(), "some samples must be misclassified, or a prediction is a label"
        assert [r[f"knn_{k}"] for r in rows] == [names[p] for p in expected], f"knn_{k}"
    for name in ("confusion_knn_1.png", "confusion_knn_20.png", "embedding.png"):
        _assert_png(out / name)


@pytest.mark.parametrize("fixed_split", [False, True], ids=["cross_validation", "train_test"])
def test_markdown_says_what_the_plus_minus_is(tmp_path: Path, fixed_split: bool) -> None:
    """results.md explains the ± of its table in a line that reads right for folds and for one fixed split."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 10)
    x = (np.eye(2, 4)[y] * 2 + rng.normal(size=(20, 4))).astype(np.float32)
    features = save_features(tmp_path / "f.h5", x, y, [f"{i}.jpg" for i in range(20)], ["a", "b"])
    test_args = ["--test-features", str(features)] if fixed_split else []
    knn.main(["--features", str(features), *test_args, "--output-dir", str(tmp_path / "out"), "--k", "1",
              "--n-splits", "2", "--no-figures", "--device", "cpu"])
    markdown = (tmp_path / "out" / "results.md").read_text().splitlines()
    explained = [line for line in markdown if "±" in line and "|" not in line]  # (the table's cells hold ± too)
    expected = ("- ±: 0 by construction (one train/test split has no spread over folds)" if fixed_split
                else "- ±: population standard deviation over folds (numpy ddof=0)")
    assert explained == [expected]


def test_json_is_strict_with_nan_as_null(tmp_path: Path) -> None:
    path = reports.write_json(tmp_path / "r.json", {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2)})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [0, 1]}


def test_embedding_falls_back_to_pca_and_says_so() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)) * np.array([5, 3, 0.1, 0.1, 0.1, 0.1])
    coords, method = reports.embed_2d(x)
    try:
        import umap  # noqa: F401
    except ImportError:
        assert method == "PCA"
        # PCA: the two coordinates carry the two largest variances, uncorrelated
        assert np.var(coords[:, 0]) > np.var(coords[:, 1]) > np.var(x[:, 2:], axis=0).max()
        assert abs(np.corrcoef(coords.T)[0, 1]) < 1e-8
    else:
        assert method == "UMAP"


def _token_grid(seed: int, flip: bool) -> np.ndarray:
    """Patch tokens (2, 8, 8, 16): a central 'cell' with varying texture on a flat background."""
    rng = np.random.default_rng(seed)
    tokens = 0.05 * rng.normal(size=(2, 8, 8, 16))
    direction = rng.normal(size=16) * (-1 if flip else 1)
    tokens[:, 2:6, 2:6] += 3 * direction + rng.normal(size=(2, 4, 4, 16))
    return tokens


@pytest.mark.parametrize("flip", [False, True])
def test_patch_pca_separates_cell_from_background(flip: bool) -> None:
    rgb, mask = pca.patch_pca_rgb(_token_grid(2, flip), threshold=0.5, foreground="auto")
    expected = np.zeros((2, 8, 8), dtype=bool)
    expected[:, 2:6, 2:6] = True
    np.testing.assert_array_equal(mask, expected)
    assert rgb.shape == (2, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.all(rgb[~mask] == 0) and rgb[mask].std() > 0.1
    with pytest.raises(ValueError, match="foreground mode"):
        pca.patch_pca_rgb(_token_grid(2, flip), foreground="inside")


def _tiny_vit_state(seed: int) -> dict[str, torch.Tensor]:
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(seed)
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    model.init_weights()
    return model.state_dict()


def _images(root: Path, per_class: int, shift: int = 150, noise: int = 60) -> list[Path]:
    """Random 28x28 images of two classes whose pixel values differ by ``shift`` on average."""
    rng = np.random.default_rng(3)
    paths = []
    for c, name in enumerate(["neutrophil", "platelet"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, noise, size=(28, 28, 3)) + shift * c
            path = root / name / f"{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def test_pca_cli_writes_side_by_side_png(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pth"
    torch.save(_tiny_vit_state(0), weights)
    images = _images(tmp_path / "cells", 1)
    output = pca.main(["--weights", str(weights), "--image", *map(str, images), "--output", str(tmp_path / "pca.png"),
                       "--img-size", "56", "--device", "cpu"])
    _assert_png(output)
    width, height = Image.open(output).size
    assert height == width * len(images) / 2  # one row per image, two square panels per row
    # no suffix: a PNG, and the path printed is the file written
    plain = pca.main(["--weights", str(weights), "--image", *map(str, images), "--output", str(tmp_path / "plain"),
                      "--img-size", "56", "--device", "cpu"])  # fmt: skip
    assert plain == tmp_path / "plain.png"
    _assert_png(plain)


def test_pca_cli_refuses_an_output_it_cannot_write_before_the_work(tmp_path: Path) -> None:
    images = _images(tmp_path / "cells", 1)
    absent = str(tmp_path / "absent.pth")  # never read: the output is refused first
    with pytest.raises(ValueError, match=r"--output .*pca\.xyz: a figure is written as \.png, .*; got '\.xyz'"):
        pca.main(["--weights", absent, "--image", *map(str, images), "--output", str(tmp_path / "pca.xyz")])
    (tmp_path / "figure.png").mkdir()
    with pytest.raises(ValueError, match=r"cannot write .*figure\.png: it is a folder"):
        pca.main(["--weights", absent, "--image", *map(str, images), "--output", str(tmp_path / "figure.png")])


def test_pca_cli_names_an_image_it_cannot_read(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pth"
    torch.save(_tiny_vit_state(0), weights)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(f"--image {not_an_image}: not a readable image")):
        pca.main(["--weights", str(weights), "--image", str(not_an_image), "--output",
                  str(tmp_path / "new" / "pca.png"), "--img-size", "28", "--device", "cpu"])  # fmt: skip
    assert not (tmp_path / "new").exists()  # made to test that the figure can be written, and removed again


def test_pca_cli_names_an_image_size_that_is_not_whole_patches(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pth"
    torch.save(_tiny_vit_state(0), weights)
    images = _images(tmp_path / "cells", 1)
    with pytest.raises(ValueError, match=re.escape("--img-size 50 is not a multiple of the model's patch size 14")):
        pca.main(["--weights", str(weights), "--image", *map(str, images), "--output",
                  str(tmp_path / "new" / "pca.png"), "--img-size", "50", "--device", "cpu"])  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_pca_cli_with_a_model_name_uses_the_released_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model without --weights is the released model, never a silently random one."""
    import dinov2.hub
    from dinov2.hub import DINOBLOOM_URLS

    requested = []

    def fake_load_backbone(name, weights=None, *args, **kwargs):
        requested.append((name, weights))
        raise RuntimeError("stop here")

    monkeypatch.setattr(dinov2.hub, "load_backbone", fake_load_backbone)
    with pytest.raises(RuntimeError, match="stop here"):
        pca.main(["--model", "dinobloom_s", "--image", "a.png", "--output", str(tmp_path / "p.png"), "--device", "cpu"])
    assert requested == [("dinobloom_s", DINOBLOOM_URLS["dinobloom_s"])]


def _independent_knn_scores(
    state: dict[str, torch.Tensor], images: list[Path], ks: tuple[int, ...], n_splits: int, seed: int,
    group_regex: str | None = None,
) -> dict[str, float]:
    """Mean balanced accuracy per k of scikit-learn's kNN on seeded, shuffled StratifiedKFold folds of the CLS
    features of ``images`` (28x28, ImageNet-normalised) from a tiny ViT holding ``state``."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    model.load_state_dict(state)
    ordered = sorted(images, key=lambda p: (p.parent.name, p.name))  # <class>/<image>, as the folder is listed
    labels = np.array([["neutrophil", "platelet"].index(p.parent.name) for p in ordered])
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in ordered]) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.tensor(((pixels - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        features = model.eval()(x).numpy()
    scores = {}
    for k in ks:
        folds = []
        if group_regex is None:
            splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(features, labels)
        else:  # a group per image, from its file name
            groups = [re.search(group_regex, p.name).group(1) for p in ordered]
            splits = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
                features, labels, groups
            )
        for train, test in splits:
            predicted = KNeighborsClassifier(n_neighbors=k).fit(features[train], labels[train]).predict(features[test])
            folds.append(balanced_accuracy_score(labels[test], predicted))
        scores[f"knn_{k}"] = np.mean(folds)
    return scores


def test_checkpoints_cli_continues_an_interrupted_sweep_and_skips_a_damaged_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Exports copied without their run's config.yaml are embedded at the size their grid implies (28 px here, not
    224). An interrupted sweep keeps the rows it wrote, and the same command then scores only the rest, as it does
    for exports that appear later; a damaged export is skipped and named, the others scored."""
    import dinov2.eval.extract_features as ef

    run = tmp_path / "run"
    for seed, name in enumerate(("training_init", "training_1", "training_3")):
        target = run / "eval" / name / "teacher_checkpoint.pth"
        target.parent.mkdir(parents=True)
        torch.save({"teacher": {f"backbone.{k}": v for k, v in _tiny_vit_state(seed).items()}}, target)
    _images(tmp_path / "data", 6, shift=10, noise=200)
    argv = ["--run-dir", str(run), "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
            "--n-splits", "3", "--k", "1", "--device", "cpu"]  # fmt: skip
    embedded: list[str] = []
    extract = ef.extract_features

    def counted(*args: Any, **kwargs: Any) -> Any:
        embedded.append(Path(kwargs["weights"]).parent.name)
        if len(embedded) == 2 and interrupt:
            raise KeyboardInterrupt
        return extract(*args, **kwargs)

    monkeypatch.setattr(ef, "extract_features", counted)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        checkpoints.main(argv)
    saved = json.loads((tmp_path / "out" / "checkpoints.json").read_text())
    assert [row["iteration"] for row in saved["checkpoints"]] == [0] and saved["meta"]["img_size"] == 28
    interrupt, embedded[:] = False, []
    whole = checkpoints.main(argv)
    assert embedded == ["training_1", "training_3"] and [r["iteration"] for r in whole["checkpoints"]] == [0, 2, 4]
    assert whole["checkpoints"][0] == saved["checkpoints"][0]
    target = run / "eval" / "training_5" / "teacher_checkpoint.pth"  # a later export, and a damaged one
    target.parent.mkdir()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in _tiny_vit_state(5).items()}}, target)
    damaged = run / "eval" / "training_1" / "teacher_checkpoint.pth"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    embedded[:] = []
    with caplog.at_level(logging.WARNING):
        later = checkpoints.main(argv)
    assert embedded == ["training_1", "training_5"]  # the damaged file is not the one scored before
    assert [r["iteration"] for r in later["checkpoints"]] == [0, 4, 6]
    assert later["meta"]["skipped_checkpoints"] == [str(damaged)] and f"skipping {damaged}: " in caplog.text
    embedded[:] = []
    checkpoints.main([*argv, "--k", "3"])  # other settings: every checkpoint is scored anew
    assert embedded == ["training_init", "training_1", "training_3", "training_5"]
    summary = tmp_path / "out" / "checkpoints.json"
    for damage in (summary.read_text()[:100], "[]"):  # a cut file, a file of another shape: said, and scored anew
        summary.write_text(damage)
        embedded[:] = []
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            checkpoints.main([*argv, "--k", "3"])
        assert embedded == ["training_init", "training_1", "training_3", "training_5"]
        assert f"{summary} " in caplog.text and "every checkpoint is scored again" in caplog.text


def test_checkpoints_cli_scores_each_checkpoint_in_iteration_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    states = {}
    for seed, name in enumerate(("training_9", "training_1", "training_init")):  # numeric order, not lexicographic
        target = run / "eval" / name / "teacher_checkpoint.pth"
        target.parent.mkdir(parents=True)
        states[name] = _tiny_vit_state(seed)
        torch.save({"teacher": {f"backbone.{k}": v for k, v in states[name].items()}}, target)
    (run / "eval" / "training_5").mkdir()  # no checkpoint inside: ignored
    # weakly separable images: each checkpoint's random features score differently
    images = _images(tmp_path / "data", 6, shift=10, noise=200)
    out = tmp_path / "curve"
    # the run's saved config (as train.py writes it) gives the image size the checkpoints are embedded at
    OmegaConf.save(load_config(REPO / "dinov2/configs/train/demo.yaml", ["crops.global_crops_size=28"]),
                   run / "config.yaml")  # fmt: skip
    summary = checkpoints.main(["--run-dir", str(run), "--data", str(tmp_path / "data"), "--output-dir", str(out),
                                "--n-splits", "3", "--k", "1", "3", "--device", "cpu", "--seed", "1"])
    assert summary["meta"]["img_size"] == 28
    # Steps completed: the initial teacher, then training_<i> after step i (counted from 0).
    assert [row["iteration"] for row in summary["checkpoints"]] == [0, 2, 10]
    saved = json.loads((out / "checkpoints.json").read_text())
    assert saved["checkpoints"][0]["checkpoint"].endswith("training_init/teacher_checkpoint.pth")
    assert saved["checkpoints"][1]["checkpoint"].endswith("training_1/teacher_checkpoint.pth")
    assert list(saved["checkpoints"][0]["results"]) == saved["meta"]["methods"] == ["knn_1", "knn_3"]
    assert saved["meta"]["fold_seed"] == 1
    # each row is scored on features of its own checkpoint (guards against extracting every row with one checkpoint)
    expected = {name: _independent_knn_scores(state, images, (1, 3), 3, seed=1) for name, state in states.items()}
    assert len({tuple(scores.values()) for scores in expected.values()}) == 3, "checkpoints must score differently"
    for row in saved["checkpoints"]:
        reference = expected[Path(row["checkpoint"]).parent.name]
        for method, score in reference.items():
            ours = row["results"][method]["balanced_accuracy"]["mean"]
            assert ours == pytest.approx(score, abs=1e-9), (row["checkpoint"], method)
    assert "| 2 |" in (out / "checkpoints.md").read_text()
    _assert_png(out / "checkpoints.png")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    evaluation = readme.split("## Evaluation", 1)[1].split("```", 1)[0]
    for written in out.iterdir():  # the README says what the command writes
        assert f"{written.name}`" in evaluation, written.name
    with pytest.raises(FileNotFoundError, match="no eval/training_<iteration>/teacher_checkpoint.pth"):
        checkpoints.find_checkpoints(tmp_path / "data")
    # Folds by group (here the image number, shared by one image of each class): scikit-learn's StratifiedGroupKFold.
    grouped = checkpoints.main(["--run-dir", str(run), "--data", str(tmp_path / "data"), "--output-dir",
                                str(tmp_path / "grouped"), "--img-size", "28", "--n-splits", "3", "--k", "1", "3",
                                "--device", "cpu", "--seed", "1", "--group-by", r"(\d+)\.png"])  # fmt: skip
    differs = False
    for row, ungrouped in zip(grouped["checkpoints"], saved["checkpoints"]):
        name = Path(row["checkpoint"]).parent.name
        reference = _independent_knn_scores(states[name], images, (1, 3), 3, seed=1, group_regex=r"(\d+)\.png")
        for method, score in reference.items():
            ours = row["results"][method]["balanced_accuracy"]["mean"]
            assert ours == pytest.approx(score, abs=1e-9), (name, method)
            differs |= ours != ungrouped["results"][method]["balanced_accuracy"]["mean"]
    assert differs, "grouped folds must differ from image folds here, or the test would not see them"
    # --resize reaches each checkpoint's extraction (kept features say so) and the summary records it
    bicubic = checkpoints.main(["--run-dir", str(run), "--data", str(tmp_path / "data"), "--output-dir",
                                str(tmp_path / "bicubic"), "--img-size", "28", "--n-splits", "3", "--k", "1",
                                "--device", "cpu", "--resize", "pil-bicubic", "--keep-features"])  # fmt: skip
    assert bicubic["meta"]["resize"] == "pil-bicubic" and saved["meta"]["resize"] == "bilinear"
    kept = sorted((tmp_path / "bicubic" / "features").glob("*.h5"))
    assert len(kept) == 3 and {load_features(p).meta["resize"] for p in kept} == {"pil-bicubic"}
    # A manifest of the same images, other column names and paths relative to another folder: the same scores.
    from dinov2.eval.image_list import list_images

    manifest = tmp_path / "manifests" / "data.csv"
    manifest.parent.mkdir()
    listed = list_images(tmp_path / "data")
    manifest.write_text("file,label\n" + "".join(f"data/{path},{listed.class_names[label]}\n"
                                                 for path, label in zip(listed.paths, listed.labels)))  # fmt: skip
    from_manifest = checkpoints.main(["--run-dir", str(run), "--data", str(manifest), "--csv-columns", "file,label",
                                      "--root", str(tmp_path), "--output-dir", str(tmp_path / "manifest"), "--n-splits",
                                      "3", "--k", "1", "3", "--device", "cpu", "--seed", "1"])  # fmt: skip
    assert len(from_manifest["checkpoints"]) == len(saved["checkpoints"]) == 3
    for row, reference in zip(from_manifest["checkpoints"], saved["checkpoints"]):
        assert row["results"]["knn_1"]["balanced_accuracy"] == reference["results"]["knn_1"]["balanced_accuracy"]



def test_checkpoints_are_found_in_step_order_whatever_order_the_folder_lists_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    for name in ("training_9", "training_init", "training_1"):
        (run / "eval" / name).mkdir(parents=True)
        (run / "eval" / name / "teacher_checkpoint.pth").write_bytes(b"")
    listed = Path.iterdir
    # the folder listed in reverse name order (training_init, training_9, training_1): not the step order
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listed(self), reverse=True)))
    found = checkpoints.find_checkpoints(run)
    assert [step for step, _ in found] == [0, 2, 10]  # training_init, then training_<i> after step i (from 0)
    assert [path for _, path in found] == [run / "eval" / name / "teacher_checkpoint.pth"
                                           for name in ("training_init", "training_1", "training_9")]  # fmt: skip


def test_an_output_dir_without_write_permission_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, who may write anywhere: the permission the check asks for is refused here."""
    asked = []

    def refused(path: str | Path, mode: int) -> bool:
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr(files.os, "access", refused)
    message = f"--output-dir {tmp_path}: no permission to write in it"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        reports.prepare_output_dir(tmp_path)
    new = tmp_path / "new" / "out"  # not there yet: the folder it would be made in is named
    with pytest.raises(ValueError, match=f"^{re.escape(f'--output-dir {new}: no permission to write in {tmp_path}')}$"):
        reports.prepare_output_dir(new)
    assert asked == [(tmp_path, os.W_OK | os.X_OK)] * 2


def test_checkpoints_names_a_run_dir_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^--run-dir .*demoo does not exist; name a training run's output"):
        checkpoints.find_checkpoints(tmp_path / "demoo")
    (tmp_path / "run.pth").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"^--run-dir .*run\.pth is a file; name a training run's output"):
        checkpoints.find_checkpoints(tmp_path / "run.pth")


@pytest.mark.parametrize(("option", "message"), [
    (["--k", "0"], r"--k 0: k must lie in \[1, \d+\]"),
    (["--n-splits", "1"], "n_splits must be at least 2"),
    (["--group-by", "Patient_("], "is not a regular expression"),
    (["--group-by", "Patient_\\d+"], r"matches nothing in 'neutrophil/0.png'"),  # checked on the listed paths
    # groups of 8, 2 and 2 images: a group fold trains on 2 where image folds would train on 6
    (["--group-by", r"/(?=[0-3])|/4|/5", "--n-splits", "2", "--k", "3"], r"--k 3: k must lie in \[1, 2\]"),
])
def test_checkpoints_cli_checks_its_settings_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], message: str
) -> None:
    """A setting the scoring would refuse is refused before the first checkpoint is embedded (which can take long)."""
    from dinov2.eval import extract_features

    target = tmp_path / "run" / "eval" / "training_init" / "teacher_checkpoint.pth"
    target.parent.mkdir(parents=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in _tiny_vit_state(0).items()}}, target)
    _images(tmp_path / "data", 6, shift=10, noise=200)

    def embedded(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint was embedded before the settings were checked")

    monkeypatch.setattr(extract_features, "extract_features", embedded)
    with pytest.raises(ValueError, match=message):
        checkpoints.main(["--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--output-dir",
                          str(tmp_path / "o"), "--img-size", "28", "--device", "cpu", *option])  # fmt: skip


def test_sweep_table_orders_k_by_number() -> None:
    rng = np.random.default_rng(4)
    features, labels = rng.normal(size=(60, 8)), np.repeat([0, 1], 30)
    scores = checkpoints.score_features(features, labels, ["a", "b"], ["knn", "logreg"], 5, "cpu", ks=(20, 5))
    header = checkpoints.markdown_table([{"iteration": 0, "results": scores}]).splitlines()[2]
    assert [cell.split()[0] for cell in header.strip("| ").split(" | ")[1::2]] == ["knn_5", "knn_20", "logreg"]


@pytest.mark.parametrize("name", ["knn", "linear", "mil", "pca"])
def test_shipped_configs_parse_with_their_cli(name: str) -> None:
    parser = {"knn": knn.build_parser, "linear": linear.build_parser, "mil": mil_cli.build_parser,
              "pca": pca.build_parser}[name]()
    config = Path(__file__).resolve().parents[1] / "configs" / "eval" / f"{name}.yaml"
    required = {"knn": ["--features", "f.h5", "--output-dir", "o"], "linear": ["--features", "f.h5", "--output-dir", "o"],
                "mil": ["--features", "f.h5", "--output-dir", "o"], "pca": ["--image", "a.png", "--output", "p.png"]}[name]
    args = protocol.parse_args_with_config(parser, ["--config", str(config), *required])
    for key, value in yaml.safe_load(config.read_text()).items():
        assert getattr(args, key) == value, key
    if name == "pca":  # the size then follows the weights (a training export's trained size), as without --config
        assert args.img_size is None
