"""Attention MIL: model structure, bag building, learning a planted signal, determinism, errors, CLI."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from dinov2.eval.features_io import FeatureSet, save_features
from dinov2.eval.mil import AttentionMIL, Bag, BagSet, MILConfig, bags_from_csv, bags_from_paths, cross_validate, train_fold
from dinov2.eval.mil.__main__ import main as mil_main

FAST = dict(hidden_dim=32, attention_dim=16, dropout=0.0, lr=0.05, epochs=40, patience=20, batch_size=4, n_splits=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(n_patients: int = 24, dim: int = 16, seed: int = 0) -> BagSet:
    """Bags of background cells; a bag is positive iff it holds 1-2 cells from a distinct cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim))
    planted = 3.0 * rng.normal(size=dim)
    bags = []
    for p in range(n_patients):
        label = p % 2
        n = int(rng.integers(8, 14))
        x = centres[rng.integers(0, 4, n)] + 0.5 * rng.normal(size=(n, dim))
        kinds = ["bg"] * n
        if label:
            for i in rng.choice(n, int(rng.integers(1, 3)), replace=False):
                x[i] = planted + 0.5 * rng.normal(size=dim)
                kinds[i] = "planted"
        name = ["neg", "pos"][label]
        paths = [f"{name}/P{p:02d}/{kind}_{i}.jpg" for i, kind in enumerate(kinds)]
        bags.append(Bag(f"P{p:02d}", label, x.astype(np.float32), paths))
    return BagSet(bags, ["neg", "pos"])


def _record_training_patients(monkeypatch: pytest.MonkeyPatch) -> list[tuple[set[str], set[str]]]:
    """Make every fold's training record its (training, validation) patients in the returned list."""
    import dinov2.eval.mil.train as mil_train

    seen = []
    original = mil_train.train_fold

    def spy(train_bags, val_bags, *args, **kwargs):
        seen.append(({b.patient for b in train_bags}, {b.patient for b in val_bags}))
        return original(train_bags, val_bags, *args, **kwargs)

    monkeypatch.setattr(mil_train, "train_fold", spy)
    return seen


def test_gated_attention_follows_clam_structure() -> None:
    model = AttentionMIL(in_dim=384, num_classes=2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["embed.0.weight"] == (512, 384)
    assert shapes["attention.attention_a.0.weight"] == (256, 512)
    assert shapes["attention.attention_b.0.weight"] == (256, 512)
    assert shapes["attention.attention_c.weight"] == (1, 256)
    assert shapes["classifier.weight"] == (2, 512)
    assert isinstance(model.attention.attention_a[1], torch.nn.Tanh)
    assert isinstance(model.attention.attention_b[1], torch.nn.Sigmoid)


def test_attention_is_the_gated_formula_of_ilse_et_al() -> None:
    """a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) over a bag's cells, and the bag is sum_k a_k h_k with
    h_k = ReLU(W x_k + b): computed by hand from the module's parameters."""
    torch.manual_seed(1)
    model = AttentionMIL(in_dim=6, num_classes=3, hidden_dim=10, attention_dim=5).eval()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    model = model.double()
    p = dict(model.named_parameters())
    h = torch.relu(x @ p["embed.0.weight"].T + p["embed.0.bias"])
    v = torch.tanh(h @ p["attention.attention_a.0.weight"].T + p["attention.attention_a.0.bias"])
    u = torch.sigmoid(h @ p["attention.attention_b.0.weight"].T + p["attention.attention_b.0.bias"])
    scores = ((v * u) @ p["attention.attention_c.weight"].T + p["attention.attention_c.bias"]).squeeze(-1)
    expected_attention = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
    pooled = (expected_attention.unsqueeze(-1) * h).sum(dim=1)
    expected_logits = pooled @ p["classifier.weight"].T + p["classifier.bias"]
    logits, attention = model(x)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(logits, expected_logits)


def test_test_patients_never_reach_training_or_model_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per fold: training, validation and test patients are disjoint, validation comes from the fold's training
    patients, every patient is tested exactly once, and each fold's test set keeps the class shares."""
    seen = _record_training_patients(monkeypatch)
    bag_set = _planted(30)
    _, records, _ = cross_validate(bag_set, MILConfig(**{**FAST, "epochs": 2}))
    tested: dict[int, set[str]] = {}
    for record in records:
        tested.setdefault(record["fold"], set()).add(record["patient"])
    everyone = {b.patient for b in bag_set.bags}
    assert sorted(p for fold in tested.values() for p in fold) == sorted(everyone)  # each tested once
    labels = {b.patient: b.label for b in bag_set.bags}
    assert len(seen) == len(tested) == 3  # (one training per fold)
    for fold, (train, val) in enumerate(seen):
        test = tested[fold]
        assert not train & val and not (train | val) & test and train | val | test == everyone
        assert sorted(labels[p] for p in test) == [0] * 5 + [1] * 5  # stratified: 15 of each class, 3 folds
        assert {labels[p] for p in val} == {0, 1}


def test_the_model_of_lowest_validation_loss_is_the_one_kept() -> None:
    """Early stopping keeps the best epoch's weights, not the last epoch's."""
    from dinov2.eval.mil.train import _mean_loss

    bags = _planted(16).bags
    run = train_fold(bags[:12], bags[12:], 2, MILConfig(**{**FAST, "lr": 0.5, "epochs": 30, "patience": 30}), seed=0)
    assert run.best_epoch + 1 < run.epochs_run  # a later epoch was worse, so keeping the last would differ
    assert _mean_loss(run.model, bags[12:], "cpu") == pytest.approx(run.best_val_loss, rel=1e-6)


def test_a_diverging_or_nan_run_fails_instead_of_reporting_an_untrained_model(tmp_path: Path) -> None:
    bags = _planted(12).bags
    with pytest.raises(FloatingPointError, match=r"the validation loss is nan after epoch 1"):
        bad = [Bag(b.patient, b.label, np.full_like(b.features, np.nan), b.paths) for b in bags[8:]]
        train_fold(bags[:8], bad, 2, MILConfig(**FAST), seed=0)
    features = np.concatenate([b.features for b in bags])
    features[3, 1] = np.nan
    paths = [path for b in bags for path in b.paths]
    save_features(tmp_path / "nan.npz", features, np.zeros(len(paths), np.int64), paths, ["x"], {})
    with pytest.raises(ValueError, match=rf"features of 1 of {len(paths)} images are not finite .*e.g. {paths[3]}"):
        mil_main(["--features", str(tmp_path / "nan.npz"), "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize(("option", "value", "message"), [
    ("epochs", 0, "--epochs must be at least 1, got 0"),
    ("batch_size", 0, "--batch-size must be at least 1, got 0"),
    ("hidden_dim", 0, "--hidden-dim must be at least 1, got 0"),
    ("val_fraction", 1.0, r"--val-fraction must be in \(0, 1\), got 1.0"),
    ("dropout", 1.0, r"--dropout must be in \[0, 1\), got 1.0"),
    ("lr", 0.0, "--lr must be positive, got 0.0"),
])  # fmt: skip
def test_settings_out_of_range_are_named(option: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        MILConfig(**{option: value})


def test_padding_is_ignored() -> None:
    torch.manual_seed(0)
    model = AttentionMIL(in_dim=8, num_classes=3, hidden_dim=16, attention_dim=8).eval()
    x = torch.randn(1, 5, 8)
    logits, attention = model(x)
    padded = torch.cat([x, 100 * torch.randn(1, 3, 8)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    padded_logits, padded_attention = model(padded, mask)
    torch.testing.assert_close(padded_logits, logits)
    torch.testing.assert_close(padded_attention[:, :5], attention)
    assert padded_attention[:, 5:].abs().max() == 0 and attention.sum().item() == pytest.approx(1.0)


def test_mil_learns_planted_signal_and_attends_to_it() -> None:
    bag_set = _planted()
    result, records, probabilities = cross_validate(bag_set, MILConfig(**FAST))
    assert result["balanced_accuracy"]["mean"] >= 0.95
    assert result["auroc"]["mean"] >= 0.95
    # every patient tested once: its probabilities are those of the fold model in its record
    assert probabilities.shape == (24, 2) and not np.isnan(probabilities).any()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    record_probabilities = {r["patient"]: [r["probabilities"][c] for c in bag_set.class_names] for r in records}
    np.testing.assert_allclose(probabilities, [record_probabilities[b.patient] for b in bag_set.bags], rtol=1e-6)
    predictions = probabilities.argmax(axis=1)
    # the returned predictions are the per-patient records' and recover the planted labels
    # (guards against predictions lost or overwritten after the folds are scored)
    by_patient = {r["patient"]: r["prediction"] for r in records}
    assert [by_patient[b.patient] for b in bag_set.bags] == [bag_set.class_names[p] for p in predictions]
    assert balanced_accuracy_score(bag_set.labels, predictions) >= 0.95
    positives = [r for r in records if r["label"] == "pos"]
    assert len(records) == 24 and len(positives) == 12
    masses = []
    for record in positives:
        cells = record["cells"]
        assert sum(c["attention"] for c in cells) == pytest.approx(1.0, abs=1e-5)
        masses.append(sum(c["attention"] for c in cells if "planted" in c["path"]))
        planted_share = sum("planted" in c["path"] for c in cells) / len(cells)
        # attention concentrates on the planted cells: well above their share of the bag (~0.1)
        assert masses[-1] >= 2 * planted_share
        assert "planted" in cells[0]["path"]  # records list cells by attention, highest first
    assert np.mean(masses) >= 0.5


def test_training_is_deterministic_on_cpu() -> None:
    bags = _planted(12).bags
    config = MILConfig(**{**FAST, "dropout": 0.25, "epochs": 5})
    first = train_fold(bags[:8], bags[8:], 2, config, seed=3).model.state_dict()
    second = train_fold(bags[:8], bags[8:], 2, config, seed=3).model.state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_evaluation_batches_bags_of_like_size_and_answers_in_the_bags_order() -> None:
    """A bag of thousands of cells is not padded into 31 others' rows (memory 32 x its size); each bag's
    probabilities and attention are those it gets alone, in the order the bags were given."""
    from dinov2.eval.mil.train import EVAL_CELL_BUDGET, _evaluation_batches, predict_bags

    torch.manual_seed(0)
    sizes = [5, 3000, 7, 1, 40000, 12]
    bags = [Bag(f"P{i}", i % 2, np.random.default_rng(i).normal(size=(n, 8)).astype(np.float32), ["a"] * n)
            for i, n in enumerate(sizes)]  # fmt: skip
    batches = _evaluation_batches(bags, 32)
    assert sorted(i for batch in batches for i in batch) == list(range(len(bags)))
    assert all(len(b) == 1 or len(b) * max(sizes[i] for i in b) <= EVAL_CELL_BUDGET for b in batches)
    assert [4] in batches  # the largest alone
    model = AttentionMIL(in_dim=8, num_classes=2, hidden_dim=16, attention_dim=8).eval()
    probabilities, attention = predict_bags(model, bags)
    for i, bag in enumerate(bags):
        alone, alone_attention = predict_bags(model, [bag])
        np.testing.assert_allclose(probabilities[i], alone[0], atol=1e-6)
        np.testing.assert_allclose(attention[i], alone_attention[0], atol=1e-6)
        assert attention[i].shape == (sizes[i],)


def test_a_bag_without_cells_is_refused_not_scored_nan() -> None:
    """Through the API a bag may hold no cell (the CLI drops such patients): its attention would be a softmax over
    nothing, its class probabilities NaN; it is named instead."""
    from dinov2.eval.mil.train import predict_bags

    model = AttentionMIL(in_dim=8, num_classes=2, hidden_dim=16, attention_dim=8).eval()
    cells = Bag("P1", 0, np.ones((3, 8), dtype=np.float32), ["a"] * 3)
    with pytest.raises(ValueError, match=r"bag\(s\) without cells: P2; a patient needs at least one cell"):
        predict_bags(model, [cells, Bag("P2", 1, np.zeros((0, 8), dtype=np.float32), [])])


def test_a_validation_fraction_that_leaves_a_class_no_training_patient_is_refused() -> None:
    from dinov2.eval.mil.train import _validation_split

    labels = np.repeat([0, 1, 2], [2, 2, 30])
    train, _ = _validation_split(labels, 0.3, seed=0)
    assert set(labels[train]) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"leaves every class a patient to train on; lower --val-fraction \(0.7\)"):
        _validation_split(labels, 0.7, seed=0)  # (stratified rounding would leave one small class none)


def test_one_class_data_fails_clearly() -> None:
    bags = [Bag(f"P{i}", 0, np.zeros((3, 4), np.float32), ["a"] * 3) for i in range(6)]
    with pytest.raises(ValueError, match="needs at least 2 classes, found only 'AML'"):
        cross_validate(BagSet(bags, ["AML"]), MILConfig(**FAST))


def test_too_few_patients_per_class_fails_clearly() -> None:
    bags = [Bag(f"P{i}", int(i < 2), np.zeros((3, 4), np.float32), ["a"] * 3) for i in range(8)]
    with pytest.raises(ValueError, match=r"needs 3 patients per class; too few in 'APL' \(2\)"):
        cross_validate(BagSet(bags, ["AML", "APL"]), MILConfig(**FAST))
    with pytest.raises(ValueError, match=r"^--n-splits must be at least 2, got 1$"):  # (it was scikit-learn's text)
        cross_validate(BagSet(bags, ["AML", "APL"]), MILConfig(**{**FAST, "n_splits": 1}))


def _feature_set(paths: list[str], dim: int = 4) -> FeatureSet:
    features = np.arange(len(paths) * dim, dtype=np.float32).reshape(len(paths), dim)
    return FeatureSet(features, np.full(len(paths), -1), paths, [], {"model": "toy"})


def test_bags_from_paths_groups_cells_by_patient() -> None:
    fs = _feature_set(["APL/P1/a.jpg", "AML/P2/b.jpg", "APL/P1/c.jpg", "AML/P3/d.jpg"])
    bag_set = bags_from_paths(fs)
    assert bag_set.class_names == ["AML", "APL"]
    assert [(b.patient, b.label, b.paths) for b in bag_set.bags] == [
        ("P1", 1, ["APL/P1/a.jpg", "APL/P1/c.jpg"]),
        ("P2", 0, ["AML/P2/b.jpg"]),
        ("P3", 0, ["AML/P3/d.jpg"]),
    ]
    np.testing.assert_array_equal(bag_set.bags[0].features, fs.features[[0, 2]])
    with pytest.raises(ValueError, match="has cells labelled both"):
        bags_from_paths(_feature_set(["APL/P1/a.jpg", "AML/P1/b.jpg"]))
    # the same patient folder name in two cohorts is two patients
    cohorts = bags_from_paths(_feature_set(["A/APL/P1/a.jpg", "B/APL/P1/b.jpg", "B/AML/P2/c.jpg"]))
    assert [(b.patient, b.label) for b in cohorts.bags] == [("A/P1", 1), ("B/P1", 1), ("P2", 0)]
    with pytest.raises(ValueError, match=r"'flat\.jpg' is not <label>/<patient>/<cell>"):
        bags_from_paths(_feature_set(["flat.jpg"]))


def test_bags_from_csv_matches_paths_by_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = _feature_set(["APL/P1/a.jpg", "AML/P2/b.jpg", "APL/P1/c.jpg"])
    table = tmp_path / "bags.csv"
    table.write_text("patient,label,path\nX,pos,mil/APL/P1/a.jpg\nX,pos,mil/APL/P1/c.jpg\nY,neg,AML/P2/b.jpg\n")
    bag_set = bags_from_csv(fs, table)
    assert bag_set.class_names == ["neg", "pos"]
    assert [(b.patient, b.label, len(b.paths)) for b in bag_set.bags] == [("X", 1, 2), ("Y", 0, 1)]
    table.write_text("patient,label,path\nX,pos,APL/P9/zzz.jpg\n")
    with pytest.raises(ValueError, match=r"1 of 1 cell paths match no single path .*skipped 0 unreadable images"):
        bags_from_csv(fs, table)
    # rows of images the extraction could not read (no more than it skipped) are left out, with a warning
    table.write_text("patient,label,path\nX,pos,APL/P1/a.jpg\nX,pos,APL/P1/unreadable.jpg\nY,neg,AML/P2/b.jpg\n")
    fs.meta["n_skipped"] = 1
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.mil.data"):
        kept = bags_from_csv(fs, table)
    assert [(b.patient, b.paths) for b in kept.bags] == [("X", ["APL/P1/a.jpg"]), ("Y", ["AML/P2/b.jpg"])]
    assert "1 cell paths match no path of the features file, whose extraction skipped 1 unreadable" in caplog.text
    table.write_text("patient,label,path\nX,pos,APL/P1/gone.jpg\nX,pos,APL/P1/unreadable.jpg\n")
    with pytest.raises(ValueError, match=r"2 of 2 cell paths match no single path .*skipped 1 unreadable images"):
        bags_from_csv(fs, table)  # more than it skipped: a list for other features
    fs.meta["n_skipped"] = 0
    table.write_text("bag_id,bag_label,file,cohort\nX,pos,APL/P1/a.jpg,A\nY,neg,AML/P2/b.jpg,B\n")
    with pytest.raises(ValueError, match=r"missing columns \['patient', 'label', 'path'\].*--bag-columns"):
        bags_from_csv(fs, table)
    # a manifest's own column names, given in patient, label, path order
    renamed = bags_from_csv(fs, table, ("bag_id", "bag_label", "file"))
    assert [(b.patient, b.label, b.paths) for b in renamed.bags] == [
        ("X", 1, ["APL/P1/a.jpg"]), ("Y", 0, ["AML/P2/b.jpg"])
    ]
    with pytest.raises(ValueError, match=r"missing columns \['patient'\]"):
        bags_from_csv(fs, table, ("patient", "bag_label", "file"))
    table.write_text("")
    with pytest.raises(ValueError, match=r"bags\.csv is empty: a bag list needs a header row naming its columns$"):
        bags_from_csv(fs, table)
    # two cohorts' patients P1 in the CSV, features of one cohort only: both tails fall back to the same cells
    table.write_text("patient,label,path\nA_P1,pos,cohortA/APL/P1/a.jpg\nB_P1,pos,cohortB/APL/P1/a.jpg\n")
    with pytest.raises(ValueError, match=r"\(patient 'B_P1'\) and 'cohortA/APL/P1/a.jpg' \(patient 'A_P1'\) match the same"):
        bags_from_csv(fs, table)


def test_bags_from_csv_leaves_out_only_the_images_the_extraction_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A features file that lists its skipped images lets only those CSV rows go: a misspelt path (here one that
    would give patient X a second label) is an error even when the skipped count would cover it; a patient whose
    every cell was skipped is named; blank fields are errors with their CSV line."""
    fs = _feature_set(["APL/P1/a.jpg", "AML/P2/b.jpg", "APL/P1/c.jpg"])
    fs.meta.update(n_skipped=2, skipped_paths=json.dumps(["/data/mil/APL/P1/bad.jpg", "/data/mil/AML/P3/bad.jpg"]))
    table = tmp_path / "bags.csv"
    table.write_text("patient,label,path\nX,pos,APL/P1/a.jpg\nX,neg,APL/P1/typo.jpg\nY,neg,AML/P2/b.jpg\n")
    with pytest.raises(ValueError, match=r"1 of 3 cell paths match no single path .*'APL/P1/typo.jpg'"):
        bags_from_csv(fs, table)
    table.write_text("patient,label,path\nX,pos,APL/P1/a.jpg\nX,pos,APL/P1/bad.jpg\nY,neg,AML/P2/b.jpg\n"
                     "Z,neg,AML/P3/bad.jpg\n")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.mil.data"):
        kept = bags_from_csv(fs, table)
    assert [b.patient for b in kept.bags] == ["X", "Y"]
    assert "2 cell paths match no path" in caplog.text and "patients left with no cells: ['Z']" in caplog.text
    for body, message in (("X,,APL/P1/a.jpg\n", "line 3: no label"),
                          ("\n ,pos,\n", "line 4: no patient and no path"),  # after a blank line, which is skipped
                          ("Z,neg\n", "line 3: no path")):  # a row cut short  # fmt: skip
        table.write_text("patient,label,path\nY,neg,AML/P2/b.jpg\n" + body)
        with pytest.raises(ValueError, match=message):
            bags_from_csv(fs, table)


def test_one_patient_name_under_two_labels_suggests_names_that_differ() -> None:
    with pytest.raises(ValueError, match=r"'P0' has cells labelled both 'AML' and 'APL' .*names that differ"):
        bags_from_paths(_feature_set(["AML/P0/a.jpg", "APL/P0/b.jpg"]))


def test_a_deeper_folder_layout_is_explained_by_how_the_paths_were_read() -> None:
    """<label>/<patient>/<slide>/<cell>: the last three levels make the patient folders the classes, which the error
    spells out for the cell that met the conflict."""
    cells = ["AML/P00/slide1/a.jpg", "AML/P01/slide1/b.jpg", "APL/P02/slide2/c.jpg"]
    with pytest.raises(ValueError, match=re.escape(
        "patient 'slide1' has cells labelled both 'P00' and 'P01' (if these are two patients, give their folders names "
        "that differ across classes, or pass --bags CSV); each path is read as [<cohort>/...]<label>/<patient>/<cell>, "
        "so 'AML/P01/slide1/b.jpg' is a cell of patient 'slide1' of class 'P01': for another layout pass --bags CSV"
    )):  # fmt: skip
        bags_from_paths(_feature_set(cells))


_CELLS = ["APL/P1/a.jpg", "AML/P2/b.jpg", "AML/P2/c.jpg", "AML/P4/c.jpg"]


@pytest.mark.parametrize(
    ("rows", "unmatched"),
    [(["P3,AML,AML/P3/a.jpg"], "AML/P3/a.jpg"),  # shares only the file name with the APL cell: folders contradict
     (["P1,APL,a.jpg", "P4,AML,c.jpg"], "c.jpg")],  # names two cells
)
def test_bags_from_csv_reports_paths_naming_no_single_cell(tmp_path: Path, rows: list[str], unmatched: str) -> None:
    table = tmp_path / "bags.csv"
    table.write_text("\n".join(["patient,label,path", *rows]) + "\n")
    with pytest.raises(ValueError, match=rf"1 of {len(rows)} cell paths match no single path .*\['{unmatched}'\]"):
        bags_from_csv(_feature_set(_CELLS), table)


def test_bags_from_csv_matches_whole_trailing_folders(tmp_path: Path) -> None:
    table = tmp_path / "bags.csv"
    table.write_text("patient,label,path\nP1,APL,a.jpg\nP2,AML,/data/mil/AML/P2/c.jpg\nP4,AML,P4/c.jpg\n")
    matched = bags_from_csv(_feature_set(_CELLS), table)
    assert [(b.patient, b.paths) for b in matched.bags] == [
        ("P1", ["APL/P1/a.jpg"]), ("P2", ["AML/P2/c.jpg"]), ("P4", ["AML/P4/c.jpg"])
    ]


def test_bags_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    table = tmp_path / "excel.csv"
    table.write_text("patient,label,path\nX,pos,APL/P1/a.jpg\nY,neg,AML/P2/b.jpg\n", encoding="utf-8-sig")
    bag_set = bags_from_csv(_feature_set(["APL/P1/a.jpg", "AML/P2/b.jpg"]), table)
    assert [(b.patient, b.label) for b in bag_set.bags] == [("X", 1), ("Y", 0)]


def test_mil_cli_writes_results_and_attention(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag_set = _planted(18, dim=8, seed=1)
    features = np.concatenate([b.features for b in bag_set.bags])
    paths = [p for b in bag_set.bags for p in b.paths]
    path = save_features(tmp_path / "mil.h5", features, np.full(len(paths), -1), paths, [], {"model": "toy"})
    args = ["--features", str(path), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    with caplog.at_level(logging.INFO, logger="dinov2.eval.mil.__main__"):
        results = mil_main(args)
    assert f"wrote {tmp_path / 'out' / 'attention.json'}, {tmp_path / 'out' / 'attention.csv'}" in caplog.text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved) == {"meta", "abmil"}
    for key in ("accuracy", "balanced_accuracy", "weighted_f1", "auroc"):
        assert set(saved["abmil"][key]) == {"mean", "std"}
    assert saved["meta"]["n_patients"] == 18 and saved["meta"]["classes"] == ["neg", "pos"]
    assert len(saved["abmil"]["per_fold"]) == 3 and results["abmil"]["config"]["lr"] == FAST["lr"]
    with (tmp_path / "out" / "attention.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(paths) and {r["path"] for r in rows} == set(paths)
    assert set(rows[0]) == {"patient", "label", "prediction", "fold", "p_neg", "p_pos", "path", "attention"}
    # attention.csv pairs each cell's own path with its attention: the same (path, attention) pairs, in the same
    # order, as attention.json, every path in its patient's folder, and each positive patient's most attended
    # cell one of its planted cells (guards against attention values written next to other cells' paths)
    records = json.loads((tmp_path / "out" / "attention.json").read_text())
    from_json = [(r["patient"], c["path"], c["attention"]) for r in records for c in r["cells"]]
    assert [(r["patient"], r["path"]) for r in rows] == [(patient, path) for patient, path, _ in from_json]
    assert [float(r["attention"]) for r in rows] == [a for _, _, a in from_json]  # to the last digit, as in the JSON
    assert all(r["path"].split("/")[1] == r["patient"] for r in rows)
    for bag in bag_set.bags:
        cells = [r for r in rows if r["patient"] == bag.patient]
        if bag.label == 1:
            assert "planted" in max(cells, key=lambda r: float(r["attention"]))["path"], bag.patient
    # predictions.csv (one row per patient) agrees with attention.csv / attention.json and with the planted
    # labels (guards against a predictions array that is not the folds' predictions)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        patients = list(csv.DictReader(handle))
    expected_ids = [(b.patient, ["neg", "pos"][b.label]) for b in bag_set.bags]
    assert [(p["patient"], p["label"]) for p in patients] == expected_ids
    by_patient = {r["patient"]: r["prediction"] for r in records}
    assert {r["patient"]: r["prediction"] for r in rows} == by_patient
    assert [p["abmil"] for p in patients] == [by_patient[b.patient] for b in bag_set.bags]
    # ... with the class probabilities of the fold model that tested the patient (for ROC curves)
    record_probabilities = {r["patient"]: [r["probabilities"][c] for c in ("neg", "pos")] for r in records}
    np.testing.assert_allclose(
        [[float(p["p_neg"]), float(p["p_pos"])] for p in patients],
        [record_probabilities[p["patient"]] for p in patients],
        atol=1e-6,
    )
    predicted = [["neg", "pos"].index(p["abmil"]) for p in patients]
    assert balanced_accuracy_score(bag_set.labels, predicted) >= 0.9
    assert (tmp_path / "out" / "confusion_abmil.png").stat().st_size > 1000
    # ... and the fold that tested the patient, as attention.json records it
    fold_of = {r["patient"]: r["fold"] for r in records}
    assert [int(p["fold"]) for p in patients] == [fold_of[b.patient] for b in bag_set.bags]


def test_mil_writes_image_names_that_are_not_utf8_as_their_own_bytes(tmp_path: Path) -> None:
    bag_set = _planted(12, dim=8, seed=3)
    features = np.concatenate([b.features for b in bag_set.bags])
    paths = [f"{p}_\udce4" for b in bag_set.bags for p in b.paths]  # a Latin-1 byte, read with surrogateescape
    path = save_features(tmp_path / "mil.npz", features, np.full(len(paths), -1), paths, [], {"model": "toy"})
    args = ["--features", str(path), "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--epochs=2"]
    mil_main(args + [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items() if k != "epochs"])
    with (tmp_path / "out" / "attention.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        assert sorted(row["path"] for row in csv.DictReader(handle)) == sorted(paths)
    assert (tmp_path / "out" / "predictions.csv").is_file() and (tmp_path / "out" / "results.md").is_file()


def test_a_fixed_test_set_is_tested_by_every_fold_model_and_never_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--test-patients (DeepAPL's validation cohort, say): each fold model trains and selects its epoch on the other
    patients only and is tested on all the listed ones; predictions.csv holds just those patients."""
    seen = _record_training_patients(monkeypatch)
    bag_set = _planted(30, dim=8, seed=2)
    features = np.concatenate([b.features for b in bag_set.bags])
    paths = [p for b in bag_set.bags for p in b.paths]
    path = save_features(tmp_path / "mil.h5", features, np.full(len(paths), -1), paths, [], {"model": "toy"})
    test_patients = [b.patient for b in bag_set.bags[:8]]  # 4 of each class
    listing = tmp_path / "validation.txt"
    listing.write_text("# the validation cohort\n" + "\n".join(test_patients) + "\n\n")
    args = ["--features", str(path), "--output-dir", str(tmp_path / "out"), "--test-patients", str(listing)]
    mil_main(args + [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()])

    others = {b.patient for b in bag_set.bags} - set(test_patients)
    assert len(seen) == FAST["n_splits"]
    for train, val in seen:
        assert not train & val and train | val == others
    assert set.union(*(val for _, val in seen)) == others  # the validation folds cover the training patients
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f["n_test"] for f in saved["abmil"]["per_fold"]] == [8] * FAST["n_splits"]
    assert saved["meta"]["test_patients"] == str(listing)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patient"] for r in rows] == test_patients
    assert "fold" not in rows[0]  # every fold model tested these patients
    labels = {b.patient: ["neg", "pos"][b.label] for b in bag_set.bags}
    assert sum(r["abmil"] == labels[r["patient"]] for r in rows) >= 7  # the planted signal, learnt without them
    # each test patient's probabilities are the mean of every fold model's (attention.json keeps each), and the
    # predicted class is the larger mean
    records = json.loads((tmp_path / "out" / "attention.json").read_text())
    for row in rows:
        per_model = [[r["probabilities"][c] for c in ("neg", "pos")] for r in records if r["patient"] == row["patient"]]
        assert len(per_model) == FAST["n_splits"]
        mean = np.mean(per_model, axis=0)
        np.testing.assert_allclose([float(row["p_neg"]), float(row["p_pos"])], mean, rtol=1e-12, atol=0)
        assert row["abmil"] == ["neg", "pos"][int(mean.argmax())]
    # the per-class scores and the confusion matrix count each test patient once, as predictions.csv does
    predicted = [["neg", "pos"].index(r["abmil"]) for r in rows]
    truth = [["neg", "pos"].index(labels[r["patient"]]) for r in rows]
    expected_cm = confusion_matrix(truth, predicted, labels=[0, 1]).tolist()
    assert saved["abmil"]["confusion_matrix"] == expected_cm
    assert [saved["abmil"]["per_class"][c]["support"] for c in ("neg", "pos")] == [4, 4]
    assert saved["abmil"]["ensemble"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    ensemble_row = f"| abmil, mean of the fold models | {saved['abmil']['ensemble']['accuracy']:.4f} |"
    assert ensemble_row in (tmp_path / "out" / "results.md").read_text()
    listing.write_text("P00\nP99\n")
    with pytest.raises(ValueError, match=r"1 test patients have no bag, e.g. \['P99'\]"):
        mil_main(args)
    listing.write_text("P00\nP01\n")
    with caplog.at_level(logging.WARNING):
        mil_main(args + ["--val-fraction", "0.3", "--epochs", "1", "--n-splits", "2"])
    assert "--val-fraction 0.3 is not used with --test-patients" in caplog.text


def test_bag_columns_option_needs_three_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        mil_main(["--features", "f.h5", "--output-dir", "out", "--bags", "b.csv", "--bag-columns", "bag_id,file"])
    assert "expected three column names, PATIENT,LABEL,PATH; got 'bag_id,file'" in capsys.readouterr().err


def _padded(bags: list[Bag]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags zero-padded to their longest, with a mask of real cells and the labels (written out for the reference)."""
    longest = max(bag.features.shape[0] for bag in bags)
    x = torch.zeros(len(bags), longest, bags[0].features.shape[1])
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : bag.features.shape[0]] = torch.tensor(bag.features)
        mask[i, : bag.features.shape[0]] = True
    return x, mask, torch.tensor([bag.label for bag in bags])


def _reference_training(
    train_bags: list[Bag], val_bags: list[Bag], num_classes: int, config: MILConfig, seed: int
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The documented recipe by hand, every epoch, no early stopping: the model initialised after
    ``torch.manual_seed(seed)``, SGD with Nesterov momentum, cosine annealing of the lr to 0 over ``epochs``, each
    epoch's bag order ``torch.randperm`` of a generator seeded with ``seed``, mean cross-entropy per batch. Returns
    each epoch's parameters and its validation loss (mean cross-entropy of each validation bag alone)."""
    torch.manual_seed(seed)
    model = AttentionMIL(
        train_bags[0].features.shape[1], num_classes, config.hidden_dim, config.attention_dim, config.dropout
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    order_generator = torch.Generator().manual_seed(seed)
    states, val_losses = [], []
    for _ in range(config.epochs):
        order = torch.randperm(len(train_bags), generator=order_generator).tolist()
        for start in range(0, len(order), config.batch_size):
            x, mask, labels = _padded([train_bags[i] for i in order[start : start + config.batch_size]])
            loss = torch.nn.functional.cross_entropy(model(x, mask)[0], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model(*_padded([b])[:2])[0], _padded([b])[2]) for b in val_bags]
        val_losses.append(float(sum(losses)) / len(val_bags))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, val_losses


def _assert_same_parameters(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_training_follows_the_documented_sgd_nesterov_cosine_recipe() -> None:
    """The fold model is what the documented recipe gives (Nesterov momentum, lr annealed by a cosine, a fresh
    seeded bag order each epoch, batches of ``batch_size`` with a short last one, weight decay), at the epoch of
    lowest validation loss: checked against a training loop written out in the test."""
    bags = _planted(16).bags
    train, val = bags[:10], bags[10:]  # 10 bags in batches of 4: 4, 4, 2
    config = MILConfig(**{**FAST, "lr": 0.2, "weight_decay": 1e-3, "epochs": 8, "patience": 8})
    states, val_losses = _reference_training(train, val, 2, config, seed=5)
    best = int(np.argmin(val_losses))
    assert best >= 3  # late enough for momentum and the schedule to have shaped the kept weights
    run = train_fold(train, val, 2, config, seed=5)
    assert (run.best_epoch, run.epochs_run) == (best, config.epochs)
    assert run.best_val_loss == pytest.approx(val_losses[best], rel=1e-5)
    _assert_same_parameters(run.model.state_dict(), states[best])


@pytest.mark.parametrize(
    ("unlearnable", "lr", "patience"),
    [(False, 1.0, 1), (False, 1.0, 2),  # a bump in the validation loss, which later falls below its first low
     (True, 0.05, 3)],  # half the validation labels flipped: the loss rises once training starts to fit
)  # fmt: skip
def test_early_stopping_ends_patience_epochs_after_the_best_and_keeps_it(
    unlearnable: bool, lr: float, patience: int
) -> None:
    """Training stops after ``patience`` epochs in a row without a lower validation loss (not one epoch later,
    which here would train past the bump or waste an epoch), and the model kept is that of the best epoch."""
    bags = _planted(16).bags
    val = [Bag(b.patient, 1 - b.label, b.features, b.paths) if unlearnable and i % 2 else b
           for i, b in enumerate(bags[10:])]  # fmt: skip
    config = MILConfig(**{**FAST, "lr": lr, "epochs": 30, "patience": patience})
    states, val_losses = _reference_training(bags[:10], val, 2, config, seed=0)
    lowest, best, without_improvement = np.inf, -1, 0
    for epoch, loss in enumerate(val_losses):  # the stopping rule as the help states it, counted independently
        if loss < lowest:
            lowest, best, without_improvement = loss, epoch, 0
        else:
            without_improvement += 1
        if without_improvement == patience:
            break
    assert epoch + 1 < config.epochs  # the run does stop early
    run = train_fold(bags[:10], val, 2, config, seed=0)
    assert run.epochs_run == epoch + 1 == best + patience + 1
    assert run.best_epoch == best
    assert run.best_val_loss == pytest.approx(val_losses[best], rel=1e-5)
    _assert_same_parameters(run.model.state_dict(), states[best])
