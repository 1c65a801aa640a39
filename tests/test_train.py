"""The trainer end to end on CPU: outputs, learning, exact resume, unreadable images, early errors, kNN monitor.

Every run is demo.yaml shrunk further (ViT 64-d, 2 blocks, 56 px crops, heads of 256 prototypes) on a synthetic
dataset of 48 images, in this process through ``dinov2.train.train.main``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dinov2.checkpoint import EXTRA_STATE_FILE, find_latest_checkpoint
from dinov2.cli import run_cli
from dinov2.configs import TRAIN_CONFIG_DIR, ConfigError, load_config, resolve_arch
from dinov2.data import DatasetError
from dinov2.data.samplers import InfiniteSampler
from dinov2.hub import load_backbone
from dinov2.hub.loader import CheckpointError
from dinov2.models import DinoVisionTransformer
from dinov2.train import resume as resume_module
from dinov2.train import train as train_module
from dinov2.train.data import anchor_data_paths, build_train_dataset
from dinov2.train.knn_monitor import END_OF_TRAINING
from dinov2.train.logs import HeldRecords, setup_run_logging
from dinov2.train.preemption import PreemptionHandler
from dinov2.train.train import build_parser, check_bad_images, main

DEMO_CONFIG = TRAIN_CONFIG_DIR / "demo.yaml"
# Two heads of 32 dimensions: the shapes alone would suggest one head of 64, so loading an exported file with
# load_backbone(None, ...) must take the head count from the run's config.yaml.
TINY = [
    "train.num_workers=0",
    "train.batch_size_per_gpu=8",
    "train.log_period=1",
    "crops.global_crops_size=56",
    "student.embed_dim=64",
    "student.depth=2",
    "student.num_heads=2",
    "dino.head_n_prototypes=256",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=256",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
    "evaluation.knn_data=''",
    "evaluation.eval_period_iterations=0",
    "evaluation.rankme_period_iterations=0",
]


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """48 synthetic 64 px blood-cell images of 8 classes (images/<class>/..., lists/train.txt)."""
    from dinov2.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), images_per_class=6, image_size=64, num_workers=0)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Single-process runs on one thread, whatever the environment (threads only wait for each other on a busy
    machine at this size)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(output_dir: Path, dataset: Path | str, *overrides: str, epochs: int = 2, epoch_length: int = 5) -> int:
    return main(
        ["--config-file", str(DEMO_CONFIG), "--output-dir", str(output_dir), f"train.dataset_path={dataset}", *TINY,
         f"optim.epochs={epochs}", f"train.OFFICIAL_EPOCH_LENGTH={epoch_length}", *overrides]
    )  # fmt: skip


@contextmanager
def _as_an_earlier_version(checkpoint: Path) -> Iterator[dict]:
    """Edit the record of ``checkpoint`` (its extra_state.pt) into one that an earlier version wrote, which also
    recorded no checksums."""
    record = torch.load(checkpoint / EXTRA_STATE_FILE, weights_only=True)
    yield record
    torch.save(record, checkpoint / EXTRA_STATE_FILE)
    for checksums in checkpoint.glob("checksums_rank*.json"):
        checksums.unlink()


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "training_metrics.json").read_text().splitlines()]


def _losses(records: list[dict]) -> list[dict]:
    """The records without the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def _checkpoint_tensors(ckpt: Path, tmp_path: Path) -> dict:
    """Every tensor of a DCP checkpoint folder (model and optimizer), flattened to dotted keys."""
    target = tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, target)
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        elif torch.is_tensor(node):
            flat[prefix[:-1]] = node

    walk(torch.load(target, weights_only=False), "")
    return flat


def test_demo_run_writes_its_outputs_and_learns(tmp_path: Path, demo) -> None:
    out = tmp_path / "run"
    epochs, epoch_length = 4, 10
    export = ["evaluation.eval_period_iterations=20"]
    rankme = ["evaluation.rankme_period_iterations=20", "evaluation.rankme_batches=5"]
    assert _train(out, demo.lists_dir, *export, *rankme, epochs=epochs, epoch_length=epoch_length) == 0
    n_iter = epochs * epoch_length

    config = load_config(out / "config.yaml")  # resolved, and still a valid config
    assert config.train.output_dir == str(out) and config.optim.lr > 0 and config.student.embed_dim == 64

    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(n_iter))
    expected_keys = {"iteration", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss", "lr", "wd",
                     "momentum", "teacher_temp", "images_per_s", "bad_images"}  # fmt: skip
    assert all(set(r) == expected_keys for r in records if r["iteration"] not in (4, 24))
    # RankMe at the end of each window (iterations 0-4 and 20-24), over 5 steps of 2 x 8 CLS tokens of 64 dimensions.
    for r in (records[4], records[24]):
        assert set(r) == expected_keys | {"rankme", "rankme_crops"} and r["rankme_crops"] == 80
        assert 1 < r["rankme"] < 64
    assert all(np.isfinite([v for k, v in r.items()]).all() for r in records)
    assert records[0]["lr"] == 0.0 and max(r["lr"] for r in records) == pytest.approx(config.optim.lr)
    assert records[0]["teacher_temp"] == pytest.approx(config.teacher.warmup_teacher_temp)
    assert records[-1]["teacher_temp"] == pytest.approx(config.teacher.teacher_temp)
    assert records[-1]["momentum"] > records[0]["momentum"] and records[-1]["wd"] > records[0]["wd"]
    total = [r["total_loss"] for r in records]
    first, last = np.mean(total[:5]), np.mean(total[-5:])
    assert last < first - 0.3, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    dino = [r["dino_global_crops_loss"] for r in records]
    assert np.mean(dino[-5:]) < np.mean(dino[:5])

    log = (out / "log.txt").read_text()
    assert f"training iterations 0 -> {n_iter}" in log and f"it {n_iter - 1}/{n_iter}" in log
    assert re.search(r"it 0/40  loss .* img/s  eta after the start-up step\n", log)  # its pace includes start-up
    assert re.search(r"it 9/40  loss .* img/s  eta \d+:\d\d:\d\d\n", log)  # time left, from the last steps' pace
    assert re.search(r"it 39/40  loss .* img/s  eta 0:00:00\n", log)
    # dated lines: a resumed run appends to the file, maybe days later
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) ", line) for line in log.splitlines())
    assert (out / "checkpoints" / f"{n_iter - 1:09d}").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"{n_iter - 1:09d}"
    # The same command again finds the run finished and changes nothing.
    before = (out / "training_metrics.json").read_text()
    assert _train(out, demo.lists_dir, *export, *rankme, epochs=epochs, epoch_length=epoch_length) == 0
    assert (out / "training_metrics.json").read_text() == before
    assert "nothing to do" in (out / "log.txt").read_text()

    exports = sorted((out / "eval").iterdir())
    assert [p.name for p in exports] == ["training_19", "training_39", "training_init"]
    release = out / "eval" / "training_39" / "teacher_checkpoint.pth"
    teacher = torch.load(release, weights_only=True)["teacher"]
    assert {key.split(".", 1)[0] for key in teacher} == {"backbone", "dino_head", "ibot_head"}
    backbone = load_backbone(None, release)  # architecture inferred, loaded strictly
    assert (backbone.embed_dim, backbone.n_blocks, backbone.patch_size) == (64, 2, 14)
    assert backbone.num_heads == 2  # from the run's config.yaml
    assert backbone.pos_embed.shape[1] == (56 // 14) ** 2 + 1
    # The inferred model computes what the trained architecture computes.
    trained = DinoVisionTransformer(**resolve_arch(config).kwargs).eval()
    trained.load_state_dict({k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")})
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), trained(x), rtol=0, atol=1e-6)
    # The file cannot record 2 heads, which its 64-wide weights do not imply: the run said so, with the way out.
    assert ("2 attention heads where 64-wide weights imply 1 (DINOv2's convention)" in log
            and "a copy elsewhere needs load_backbone(None, path, num_heads=2)" in log)  # fmt: skip
    copy = tmp_path / "copied.pth"
    shutil.copy(release, copy)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(None, copy, num_heads=2)(x), trained(x), rtol=0, atol=1e-6)


def test_a_cpu_run_on_a_machine_with_a_gpu_does_not_pin_its_batches(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page-locked batches are for a copy to a CUDA device: with ``train.device=cpu`` the loader does not pin them,
    also where CUDA is available (pinning would start a CUDA context for a run that never uses it)."""
    pinned, build = [], train_module.build_train_loader

    class Built(Exception):
        pass

    def recording_loader(*args, **kwargs):
        pinned.append(build(*args, **kwargs).pin_memory)
        raise Built

    monkeypatch.setattr(train_module, "build_train_loader", recording_loader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (a machine with a GPU, as the loader sees it)
    with pytest.raises(Built):
        _train(tmp_path / "run", demo.lists_dir, "train.device=cpu", "evaluation.eval_period_iterations=0",
               "evaluation.knn_data=null", epochs=1, epoch_length=2)  # fmt: skip
    assert pinned == [False]


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int, how: str) -> None:
    """Make training step number ``call`` (counted from 0 in this run) be preempted by SIGUSR1 or crash."""
    original = train_module.training_step
    calls = iter(range(10**6))

    def step(*args, **kwargs):
        result = original(*args, **kwargs)
        if next(calls) == call:
            if how == "preempted":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                raise RuntimeError("simulated crash")
        return result

    monkeypatch.setattr(train_module, "training_step", step)


@pytest.mark.parametrize("how", ["preempted", "crashed"])
def test_resume_is_bitwise_exact(tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """N iterations in one go equal N/2 (interrupted), then a re-run of the same command, tensor for tensor.

    Stochastic depth is on, so the restored random state matters too. "crashed" dies 3 iterations after the last
    periodic checkpoint, so the metrics file holds records that the resumed run must replace, not duplicate.
    "preempted" stops inside a RankMe window (iterations 6 and 7): the resumed run scores it as a whole, the same.
    """
    args = ("student.drop_path_rate=0.2", "evaluation.eval_period_iterations=12", "train.checkpoint_period=4",
            "train.keep_last_checkpoints=5", "evaluation.rankme_period_iterations=6",
            "evaluation.rankme_batches=2")  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(whole, demo.lists_dir, *args, epochs=2, epoch_length=6)

    stop_after = 6  # preempted: checkpoint at 6; crashed: last checkpoint at 3
    _interrupt_at(monkeypatch, stop_after, how)
    if how == "preempted":
        with pytest.raises(SystemExit) as exit_info:
            _train(parts, demo.lists_dir, *args, epochs=2, epoch_length=6)
        assert exit_info.value.code == 128 + signal.SIGUSR1
        resumed_from = 6
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            _train(parts, demo.lists_dir, *args, epochs=2, epoch_length=6)
        assert "stopped by an unexpected error: RuntimeError: simulated crash" in (parts / "log.txt").read_text()
        resumed_from = 3
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the trainer restored the handlers
    logged = stop_after + 1 if how == "preempted" else stop_after  # a crash inside a step logs nothing for it
    assert [r["iteration"] for r in _metrics(parts)] == list(range(logged))
    monkeypatch.undo()
    _train(parts, demo.lists_dir, *args, epochs=2, epoch_length=6)

    assert f"resuming at iteration {resumed_from + 1}" in (parts / "log.txt").read_text()
    assert _losses(_metrics(parts)) == _losses(_metrics(whole))  # one record per iteration, equal values
    assert [r["iteration"] for r in _metrics(parts) if "rankme" in r] == [1, 7]  # RankMe compared above too
    final_whole = _checkpoint_tensors(whole / "checkpoints" / "000000011", tmp_path)
    final_parts = _checkpoint_tensors(parts / "checkpoints" / "000000011", tmp_path)
    assert final_whole.keys() == final_parts.keys()
    assert any(k.startswith("model.student.") for k in final_whole)
    assert any(k.startswith("optimizer.state.") for k in final_whole)
    unequal = [k for k in final_whole if not torch.equal(final_whole[k], final_parts[k])]
    assert not unequal, unequal[:10]
    exported = [torch.load(run / "eval" / "training_11" / "teacher_checkpoint.pth")["teacher"]
                for run in (whole, parts)]  # fmt: skip
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_a_resumed_run_records_the_iterations_an_uninterrupted_one_does(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With records every 4 steps, a run preempted at step 5 and resumed records steps 0, 3, 7 and 11, as one run
    that was never stopped does: the resume's first step is shown on the console, not added to the metrics."""
    args = ("train.log_period=4", "train.checkpoint_period=4")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(whole, demo.lists_dir, *args, epochs=2, epoch_length=6)
    _interrupt_at(monkeypatch, 5, "preempted")
    with pytest.raises(SystemExit):
        _train(parts, demo.lists_dir, *args, epochs=2, epoch_length=6)
    monkeypatch.undo()
    _train(parts, demo.lists_dir, *args, epochs=2, epoch_length=6)

    log = (parts / "log.txt").read_text()
    assert "resuming at iteration 6" in log
    # step 6 is on no period, yet the resume's first step is shown, its pace being the start-up's
    assert re.search(r"it 6/12  loss .* img/s  eta after the start-up step\n", log)
    assert [r["iteration"] for r in _metrics(whole)] == [0, 3, 7, 11]
    assert _losses(_metrics(parts)) == _losses(_metrics(whole))  # and step 6 is not recorded


def test_records_rankme_and_exports_follow_their_periods_and_the_last_step(tmp_path: Path, demo) -> None:
    """12 iterations with records and exports every 5 steps and RankMe windows of 2 steps every 6.

    Records: iteration 0, the log period's 4 and 9, the last step 11 (on no period), and the ends of the RankMe
    windows. A window covers the iterations with ``iteration % 6 < 2`` (0-1 and 6-7) and is scored at its last
    step, 1 and 7 (dinov2/train/rankme.py), neither of them on the log period: the record is written for the score.
    Exports: the initialisation, the eval period's 4 and 9, and the last step 11.
    """
    args = ("train.log_period=5", "evaluation.eval_period_iterations=5", "evaluation.rankme_period_iterations=6",
            "evaluation.rankme_batches=2")  # fmt: skip
    out = tmp_path / "run"
    _train(out, demo.lists_dir, *args, epochs=2, epoch_length=6)

    records = _metrics(out)
    assert [r["iteration"] for r in records] == [0, 1, 4, 7, 9, 11]
    assert [r["iteration"] for r in records if "rankme" in r] == [1, 7]
    # each score over its window's 2 steps of 2 global crops of the 8 images of a batch
    assert all(r["rankme_crops"] == 2 * 2 * 8 for r in records if "rankme" in r)
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["training_11", "training_4", "training_9",
                                                                "training_init"]  # fmt: skip


def test_starting_over_sets_the_earlier_run_aside(tmp_path: Path, demo) -> None:
    """--no-resume in a used folder: the new run neither prunes, nor later resumes from, the earlier run's files."""
    out = tmp_path / "run"
    args = ("train.checkpoint_period=2", "train.keep_last_checkpoints=2", "evaluation.eval_period_iterations=3")
    _train(out, demo.lists_dir, *args, epochs=2, epoch_length=3)  # iterations 0-5
    earlier = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert earlier == ["000000003", "000000005", "latest"]

    main(["--config-file", str(DEMO_CONFIG), "--output-dir", str(out), "--no-resume",
          f"train.dataset_path={demo.lists_dir}", *TINY, "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3", *args])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000001", "000000002", "latest"]
    assert [r["iteration"] for r in _metrics(out)] == [0, 1, 2]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["training_2", "training_init"]
    (previous,) = (out / "previous_runs").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == earlier
    assert [r["iteration"] for r in _metrics(previous)] == list(range(6))
    assert "training_5" in {p.name for p in (previous / "eval").iterdir()}
    # its config.yaml went with it: an export still loads with the run's 2 heads (shapes alone would say 1)
    assert load_config(previous / "config.yaml").student.num_heads == 2
    assert load_backbone(None, previous / "eval" / "training_5" / "teacher_checkpoint.pth").num_heads == 2

    _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)  # the new run's own command resumes the new run
    assert "nothing to do: the checkpoint" in (out / "log.txt").read_text().splitlines()[-1]
    assert "000000002" in (out / "log.txt").read_text().splitlines()[-1]


def test_a_start_over_stopped_before_it_moved_the_old_run_aside_starts_over_when_requeued(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --no-resume job preempted in its first minutes is requeued told to resume (train.resume=true): it must not
    continue the run it was to replace. A start-over that fails (a wrong path) leaves the next plain run resuming."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, epochs=1, epoch_length=3)
    with pytest.raises(FileNotFoundError):
        _train(out, tmp_path / "not_there", "--no-resume", epochs=2, epoch_length=3)
    assert not (out / ".starting_over").exists()

    def preempted(*args, **kwargs):  # stopped while the model is built, before the old run was moved aside
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "build_training_state", preempted)
    with pytest.raises(KeyboardInterrupt):
        _train(out, demo.lists_dir, "--no-resume", epochs=2, epoch_length=3)
    monkeypatch.undo()
    assert (out / "checkpoints" / "000000002").is_dir()
    _train(out, demo.lists_dir, "train.resume=true", epochs=2, epoch_length=3)
    assert "starting over, as it was told" in (out / "log.txt").read_text()
    assert [r["iteration"] for r in _metrics(out)] == list(range(6))  # trained from the start, not from step 3
    (previous,) = (out / "previous_runs").iterdir()
    assert [r["iteration"] for r in _metrics(previous)] == [0, 1, 2]
    assert not (out / ".starting_over").exists()
    _train(out, demo.lists_dir, epochs=2, epoch_length=3)  # and then resumes as usual: nothing to do
    assert "nothing to do" in (out / "log.txt").read_text().splitlines()[-1]


def test_a_resume_that_fails_keeps_the_runs_config(tmp_path: Path, demo) -> None:
    out = tmp_path / "run"
    _train(out, demo.lists_dir, epochs=1, epoch_length=2)
    before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="does not fit this model") as refused:
        _train(out, demo.lists_dir, "student.embed_dim=96", epochs=1, epoch_length=4)
    # the error names the settings that changed since the checkpointed run
    assert "student.embed_dim: 64 -> 96" in str(refused.value)
    assert "train.OFFICIAL_EPOCH_LENGTH: 2 -> 4" in str(refused.value)
    # the checkpoints and exports are the 64-wide run's; so must be the config their loading reads
    assert (out / "config.yaml").read_text() == before
    # Another head count fits every tensor: only the checkpoint's record of its network catches it.
    with pytest.raises(ConfigError, match=re.escape(
        "was trained with another network: student.num_heads=2 in the checkpoint, 4 in this config."
    )):
        _train(out, demo.lists_dir, "student.num_heads=4", epochs=1, epoch_length=4)
    assert (out / "config.yaml").read_text() == before
    with pytest.raises(ConfigError, match="student.interpolate_offset=0.1 in the checkpoint, 0.0 in this config"):
        _train(tmp_path / "other", demo.lists_dir, f"MODEL.WEIGHTS={out / 'checkpoints' / '000000001'}",
               "student.interpolate_offset=0.0", epochs=1, epoch_length=4)  # fmt: skip


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Iteration 3 is not logged (log period 10) but checkpointed: its NaN loss must stop the run unsaved."""
    original = train_module.training_step
    calls = iter(range(10**6))

    def step(*args, **kwargs):
        terms = original(*args, **kwargs)
        if next(calls) == 3:
            terms = {**terms, "total_loss": torch.tensor(float("nan"))}
        return terms

    monkeypatch.setattr(train_module, "training_step", step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:  # as the command line runs it: one error line, no traceback
        run_cli(lambda: _train(out, demo.lists_dir, "train.log_period=10", "train.checkpoint_period=2", epochs=1,
                               epoch_length=6), errors=train_module.CLI_ERRORS)  # fmt: skip
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: the loss is nan at iteration 3; stopping before")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000001", "latest"]


def test_a_backbone_from_a_run_with_another_head_count_is_refused(tmp_path: Path, demo) -> None:
    """student.pretrained_weights from a training export: its run's head count must be this config's (the tensors
    fit any count that divides the width); with the same count it starts from the export's weights."""
    _train(tmp_path / "first", demo.lists_dir, "evaluation.eval_period_iterations=1", epochs=1, epoch_length=1)
    export = tmp_path / "first" / "eval" / "training_0" / "teacher_checkpoint.pth"
    with pytest.raises(ConfigError, match=r"trained with 2 attention heads .* builds 4: .* set student.num_heads=2"):
        _train(tmp_path / "second", demo.lists_dir, f"student.pretrained_weights={export}", "student.num_heads=4",
               epochs=1, epoch_length=1)  # fmt: skip
    _train(tmp_path / "third", demo.lists_dir, f"student.pretrained_weights={export}", epochs=1, epoch_length=1)


def test_fp16_runs_log_their_loss_scale(tmp_path: Path, demo) -> None:
    """A step skipped for overflowing fp16 gradients leaves no other trace: the loss scale is in every record."""
    _train(tmp_path / "run", demo.lists_dir, "train.precision=fp16", epochs=1, epoch_length=3)
    scales = [record["loss_scale"] for record in _metrics(tmp_path / "run")]
    assert len(scales) == 3 and all(0 < s <= 2.0**16 and math.log2(s).is_integer() for s in scales)
    _train(tmp_path / "fp32", demo.lists_dir, "train.precision=fp32", epochs=1, epoch_length=1)
    assert "loss_scale" not in _metrics(tmp_path / "fp32")[0]


def test_a_metrics_line_cut_short_does_not_block_resume(tmp_path: Path, demo) -> None:
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.checkpoint_period=2", epochs=1, epoch_length=2)
    with (out / "training_metrics.json").open("a") as f:
        f.write('{"iteration": 2, "total_lo')  # a write killed half-way
    _train(out, demo.lists_dir, "train.checkpoint_period=2", epochs=2, epoch_length=2)
    assert [r["iteration"] for r in _metrics(out)] == [0, 1, 2, 3]
    assert "dropping an unreadable line" in (out / "log.txt").read_text()


def test_resuming_on_lists_of_another_length_is_said(tmp_path: Path, demo) -> None:
    images = [str(p) for p in sorted(demo.images_dir.rglob("*.png"))]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(images[:40]) + "\n")
    out = tmp_path / "run"
    _train(out, lists, epochs=1, epoch_length=2)
    (lists / "more.txt").write_text("\n".join(images[40:]) + "\n")  # the lists grew while the run was stopped
    _train(out, lists, epochs=2, epoch_length=2)
    log = (out / "log.txt").read_text()
    assert f"was trained on 40 images, the lists now hold {len(images)}" in log
    assert [r["iteration"] for r in _metrics(out)] == [0, 1, 2, 3]  # a warning, not a stop


def test_the_augmentation_used_is_recorded_and_a_change_on_resume_is_said(tmp_path: Path, demo) -> None:
    out = tmp_path / "run"
    _train(out, demo.lists_dir, epochs=1, epoch_length=2)
    # config.yaml says which blur probabilities ran (the demo's hematology recipe, as DinoBloom trained)
    assert list(load_config(out / "config.yaml").crops.blur_probabilities) == [0.0, 0.9, 0.5]
    _train(out, demo.lists_dir, epochs=2, epoch_length=2)
    assert "trained with another augmentation" not in (out / "log.txt").read_text()
    _train(out, demo.lists_dir, "crops.blur_probabilities=[0.1,0.1,0.5]", epochs=3, epoch_length=2)
    log = (out / "log.txt").read_text()
    assert "was trained with another augmentation" in log and "blur [0.0, 0.9, 0.5] -> [0.1, 0.1, 0.5]" in log
    assert "grayscale" not in log.split("was trained with another augmentation")[1].splitlines()[0]

    # A checkpoint of an earlier version recorded only the blur, and its hematology recipe had no grayscale and
    # no solarisation: a resume says so
    with _as_an_earlier_version(find_latest_checkpoint(out / "checkpoints")) as record:
        del record["extra_state"]["augmentation"]
        record["extra_state"]["blur"] = [0.9, 0.9, 0.5]
    _train(out, demo.lists_dir, epochs=4, epoch_length=2)
    log = (out / "log.txt").read_text().split("was trained with another augmentation")
    assert len(log) == 3 and "blur [0.9, 0.9, 0.5] -> [0.0, 0.9, 0.5]" in log[2].splitlines()[0]
    assert "records no augmentation recipe: if it trained the hematology recipe, that was an earlier version's" in (
        log[1]
    )
    # and a checkpoint older still records nothing of its augmentation
    with _as_an_earlier_version(find_latest_checkpoint(out / "checkpoints")) as record:
        del record["extra_state"]["augmentation"]
    _train(out, demo.lists_dir, epochs=5, epoch_length=2)
    log = (out / "log.txt").read_text()
    assert log.count("records no augmentation recipe") == 2 and log.count("was trained with another augmentation") == 2
    assert [r["iteration"] for r in _metrics(out)][-1] == 9


def test_settings_changed_on_resume_are_said_and_used(tmp_path: Path, demo) -> None:
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.resume=false", epochs=1, epoch_length=2)  # (as a requeued job's first run)
    # Layer-wise decay regroups the optimizer's parameters: the saved moments still load, by parameter name.
    _train(out, demo.lists_dir, "optim.layerwise_decay=0.9", "optim.adamw_beta2=0.95", epochs=2, epoch_length=2)
    log = (out / "log.txt").read_text()
    assert "differ from the checkpointed run's config.yaml; they apply from iteration 2 on" in log
    for change in ("optim.layerwise_decay: 1.0 -> 0.9", "optim.adamw_beta2: 0.999 -> 0.95", "optim.epochs: 1 -> 2"):
        assert change in log
    assert "train.resume" not in log  # a requeued job told to resume changes no setting
    assert [r["iteration"] for r in _metrics(out)] == [0, 1, 2, 3]
    assert "per step: it goes on" not in log
    # Another batch size: the run goes on from the first image its checkpoint had not seen (draw 32, not 4 steps
    # of 4), and says that its steps and learning rate are not those of an uninterrupted run.
    _train(out, demo.lists_dir, "train.batch_size_per_gpu=4", "optim.layerwise_decay=0.9", "optim.adamw_beta2=0.95",
           epochs=3, epoch_length=2)  # fmt: skip
    log = (out / "log.txt").read_text()
    warning = "was trained with 8 images per step; this run takes 4: it goes on with the next images"
    assert warning in log
    sampler = next(line for line in log.split(warning)[-1].splitlines() if "InfiniteSampler(" in line)
    assert "start=32," in sampler
    # A run folder moved elsewhere resumes there; its new place is not a changed setting, and its batch, the same
    # as the last run's, is not either (32 + 2 x 4 images in 6 steps no longer says so).
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    _train(moved, demo.lists_dir, "train.batch_size_per_gpu=4", "optim.layerwise_decay=0.9",
           "optim.adamw_beta2=0.95", epochs=4, epoch_length=2)  # fmt: skip
    resumed = (moved / "log.txt").read_text().split("resuming at iteration")[-2]
    assert "optim.epochs: 3 -> 4" in resumed and "train.output_dir" not in resumed
    assert "this run takes" not in resumed
    # A checkpoint of an earlier version, which did not record its batch: inferred from the images it saw
    with _as_an_earlier_version(find_latest_checkpoint(moved / "checkpoints")) as record:
        del record["extra_state"]["global_batch"]
    _train(moved, demo.lists_dir, "train.batch_size_per_gpu=4", "optim.layerwise_decay=0.9",
           "optim.adamw_beta2=0.95", epochs=5, epoch_length=2)  # fmt: skip
    resumed = (moved / "log.txt").read_text().split("resuming at iteration")[-2]
    assert "saw 48 images in 8 steps; this run takes 4 per step" in resumed


def test_relative_data_paths_are_recorded_absolute_and_a_resume_elsewhere_names_them(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same command with relative data paths, run again from another folder, reads other data: config.yaml
    records the absolute paths the run read, and the resume names both among the settings that changed."""
    out = tmp_path / "run"
    for place in ("A", "B"):
        (tmp_path / place).mkdir()
        (tmp_path / place / "lists").symlink_to(demo.lists_dir)
        (tmp_path / place / "cells").symlink_to(demo.images_dir)
    monkeypatch.chdir(tmp_path / "A")
    _train(out, "lists", "evaluation.knn_data=cells", epochs=1, epoch_length=2)
    recorded = OmegaConf.load(out / "config.yaml")
    assert recorded.train.dataset_path == str(tmp_path / "A" / "lists")
    assert recorded.evaluation.knn_data == str(tmp_path / "A" / "cells")
    monkeypatch.chdir(tmp_path / "B")
    _train(out, "lists", "evaluation.knn_data=cells", epochs=2, epoch_length=2)
    resumed = (out / "log.txt").read_text().split("resuming at iteration")[-2]
    for key, name in (("train.dataset_path", "lists"), ("evaluation.knn_data", "cells")):
        assert f"{key}: {tmp_path / 'A' / name} -> {tmp_path / 'B' / name}" in resumed
    # a config.yaml of an earlier version, with the relative paths as given: read from here, no change to name
    recorded = OmegaConf.load(out / "config.yaml")
    recorded.train.dataset_path, recorded.evaluation.knn_data = "lists", "cells"
    OmegaConf.save(recorded, out / "config.yaml")
    _train(out, "lists", "evaluation.knn_data=cells", epochs=3, epoch_length=2)
    resumed = (out / "log.txt").read_text().split("resuming at iteration")[-2]
    assert "train.dataset_path" not in resumed and "evaluation.knn_data" not in resumed
    spelled = OmegaConf.create({"train": {"dataset_path": "HemaStandardDataset:root=lists:shuffle=1"},
                                "evaluation": {"knn_data": ""}})  # fmt: skip
    anchor_data_paths(spelled)
    assert spelled.train.dataset_path == f"HemaStandardDataset:root={tmp_path / 'B' / 'lists'}:shuffle=1"


def test_only_rank_0_warns_of_what_a_resume_changes(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every rank would say the same: a 64-rank job says it once."""
    state = {"images_seen": 32, "global_batch": 8, "dataset_size": 100, "augmentation": {"blur": [0.9, 0.9, 0.5]}}
    args = (Path("ckpt"), state, 4, 4, 90, {"blur": [0.0, 0.9, 0.5]}, ["optim.epochs: 1 -> 2"])
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        resume_module.warn_about_changes(*args)
    assert len(caplog.records) == 4  # the batch, the data, the augmentation and the settings
    caplog.clear()
    monkeypatch.setattr(resume_module.distributed, "is_main_process", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        resume_module.warn_about_changes(*args)
    assert not caplog.records


def _damaged_list(tmp_path: Path, demo) -> tuple[Path, list[str]]:
    """The demo list plus a file of random bytes, a PNG cut in half and a path that does not exist."""
    images = sorted((demo.images_dir).rglob("*.png"))
    corrupt = tmp_path / "bad" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    truncated = tmp_path / "bad" / "truncated.png"
    data = images[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "bad" / "missing.png"
    paths = [str(p) for p in images]
    for position, bad in ((5, corrupt), (20, truncated), (40, missing)):
        paths.insert(position, str(bad))
    list_file = tmp_path / "damaged.txt"
    list_file.write_text("\n".join(paths) + "\n")
    return list_file, [str(corrupt), str(truncated), str(missing)]


def test_unreadable_images_are_skipped_counted_and_named(tmp_path: Path, demo) -> None:
    list_file, bad = _damaged_list(tmp_path, demo)
    out = tmp_path / "run"
    _train(out, list_file, "train.max_bad_image_fraction=0.2", epochs=1, epoch_length=8)
    # The images drawn in 8 steps of 8, as the sampler (seed 0) orders the 51 entries.
    sampler = InfiniteSampler(51, shuffle=True, seed=0, batch_size=8)
    bad_positions = {5, 20, 40}
    drawn_bad = sum(sampler.key(d).index in bad_positions for d in range(8 * 8))
    assert drawn_bad >= 3  # the whole first epoch was read
    records = _metrics(out)
    assert records[-1]["bad_images"] == drawn_bad
    assert all(np.isfinite(r["total_loss"]) for r in records)
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if "skipping unreadable image" in line]
    for path in bad:
        assert any(path in line for line in warnings), f"{path} is not named in the log"


def test_a_resumed_run_goes_on_counting_the_unreadable_images(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preempted after step 3 and resumed, a run over the damaged list counts (and limits) the unreadable images
    drawn before the stop as well as after it, as a run that was never stopped does."""
    list_file, _ = _damaged_list(tmp_path, demo)
    steps, batch = 8, 8
    sampler = InfiniteSampler(51, shuffle=True, seed=0, batch_size=batch)  # the 51 entries, as the run draws them
    bad_at_step = [sum(sampler.key(d).index in {5, 20, 40} for d in range(s * batch, (s + 1) * batch))
                   for s in range(steps)]  # fmt: skip
    counted = np.cumsum(bad_at_step).tolist()
    assert counted[3] > 0 and counted[-1] > counted[3]  # unreadable images on both sides of the stop
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(whole, list_file, "train.max_bad_image_fraction=0.2", epochs=1, epoch_length=steps)
    _interrupt_at(monkeypatch, 3, "preempted")
    with pytest.raises(SystemExit):
        _train(parts, list_file, "train.max_bad_image_fraction=0.2", epochs=1, epoch_length=steps)
    monkeypatch.undo()
    strict = tmp_path / "strict"
    shutil.copytree(parts, strict)
    _train(parts, list_file, "train.max_bad_image_fraction=0.2", epochs=1, epoch_length=steps)

    assert "resuming at iteration 4" in (parts / "log.txt").read_text()
    assert [r["bad_images"] for r in _metrics(parts)] == counted
    assert _metrics(parts)[-1]["bad_images"] == _metrics(whole)[-1]["bad_images"] == counted[-1]
    # The limit counts them too: a fraction of 0.07 allows 3 of the first 51 images read and 4 of 64, so the
    # resumed run must stop at its last step, when the count of the whole run passes 4.
    assert counted[-2] <= 0.07 * 51 < 0.07 * steps * batch < counted[-1]
    with pytest.raises(DatasetError, match=f"{counted[-1]} of the {steps * batch} images read so far"):
        _train(strict, list_file, "train.max_bad_image_fraction=0.07", epochs=1, epoch_length=steps)


def test_too_many_unreadable_images_stop_the_run(tmp_path: Path, demo) -> None:
    list_file, _ = _damaged_list(tmp_path, demo)
    with pytest.raises(DatasetError, match=r"train\.max_bad_image_fraction=0\.01"):
        _train(tmp_path / "run", list_file, "train.max_bad_image_fraction=0.01", epochs=1, epoch_length=8)


def test_one_bad_image_in_a_small_data_set_is_tolerated() -> None:
    """At 1 % of 33 images the fraction alone would stop a run at its first bad image; 0 means none at all."""
    check_bad_images(1, images_seen=24, dataset_size=33, max_fraction=0.01)
    with pytest.raises(DatasetError, match="2 of the 24 images read so far were unreadable"):
        check_bad_images(2, images_seen=24, dataset_size=33, max_fraction=0.01)
    with pytest.raises(DatasetError, match="1 of the 24 images"):
        check_bad_images(1, images_seen=24, dataset_size=33, max_fraction=0.0)
    check_bad_images(10, images_seen=2000, dataset_size=5000, max_fraction=0.01)  # the fraction itself above 1
    with pytest.raises(DatasetError):
        check_bad_images(21, images_seen=2000, dataset_size=5000, max_fraction=0.01)


def test_a_batch_without_a_readable_image_stops_the_run_with_its_iteration(tmp_path: Path) -> None:
    bad = []
    for i in range(8):
        path = tmp_path / f"garbage{i}.png"
        path.write_bytes(b"not an image")
        bad.append(str(path))
    list_file = tmp_path / "lists" / "cells.txt"
    list_file.parent.mkdir()
    list_file.write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetError, match=r"iteration 0, rank 0: none of the 8 images of the batch could be read, "
                                           r"nor any of the 7 images after its first"):
        _train(tmp_path / "run", list_file.parent, "train.max_bad_image_fraction=1.0", epochs=1, epoch_length=2)


def test_a_batch_of_one_unreadable_image_trains_on_a_stand_in(tmp_path: Path, demo) -> None:
    """With one image per rank, a bad image is the whole batch: the next readable image stands in, the bad one is
    counted, and the run goes on (before, every resume stopped at the same step)."""
    list_file, bad = _damaged_list(tmp_path, demo)
    out = tmp_path / "run"
    sampler = InfiniteSampler(51, shuffle=True, seed=0, batch_size=1)
    drawn_bad = [d for d in range(51) if sampler.key(d).index in {5, 20, 40}]
    _train(out, list_file, "train.batch_size_per_gpu=1", "train.max_bad_image_fraction=0.1", "train.log_period=1",
           epochs=1, epoch_length=51)  # fmt: skip
    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(51))
    assert records[-1]["bad_images"] == len(drawn_bad) == 3
    assert [records[d]["bad_images"] - (records[d - 1]["bad_images"] if d else 0) for d in drawn_bad] == [1, 1, 1]
    assert all(np.isfinite(r["total_loss"]) for r in records)
    # Three bad images in a row: the stand-ins tried are not counted again (they are counted when they are drawn).
    images = sorted(p for p in demo.images_dir.rglob("*.png"))[:20]
    garbage = []
    for i in range(3):
        garbage.append(tmp_path / f"garbage{i}.png")
        garbage[-1].write_bytes(b"not an image")
    in_a_row = tmp_path / "in_a_row.txt"
    in_a_row.write_text("".join(f"{p}\n" for p in images[:10] + garbage + images[10:]))
    _train(tmp_path / "run_in_a_row", in_a_row, "train.batch_size_per_gpu=1", "train.max_bad_image_fraction=0.2",
           epochs=1, epoch_length=23)  # fmt: skip
    assert _metrics(tmp_path / "run_in_a_row")[-1]["bad_images"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_a_config_error(tmp_path: Path, demo) -> None:
    with pytest.raises(ConfigError, match=r"train.device=cuda: device 'cuda' was requested but CUDA is not available"):
        _train(tmp_path / "run", demo.lists_dir, "train.device=cuda")


def test_compile_on_a_cpu_without_a_cpp_compiler_is_a_config_error(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the data and model are built: without one the first step failed with a 110-line Inductor traceback."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    message = r"train.compile on a CPU needs a C\+\+ compiler .* no-such-c\+\+-compiler is not on PATH"
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path / "run", demo.lists_dir, "train.compile=true", "train.device=cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "stopped: train.compile on a CPU needs a C++ compiler" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler (g++ or c++), and none is on PATH")
def test_training_with_the_backbone_compiled_whole_follows_the_eager_run(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.compile=true train.compile_scope=backbone`` trains on a CPU as the eager run does (each step's losses
    to 0.1 %: Inductor's kernels sum in another order, and AdamW magnifies that a little each step), and the steps
    mark no CUDA-graph generations without ``train.cuda_graphs``."""
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert _train(tmp_path / "eager", demo.lists_dir, epochs=1, epoch_length=3) == 0
    compiled = ("train.compile=true", "train.compile_scope=backbone")
    assert _train(tmp_path / "compiled", demo.lists_dir, *compiled, epochs=1, epoch_length=3) == 0
    eager, whole = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert [r["iteration"] for r in whole] == [r["iteration"] for r in eager] == [0, 1, 2]
    for ours, expected in zip(whole, eager):
        for key in ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"):
            assert ours[key] == pytest.approx(expected[key], rel=1e-3), (ours["iteration"], key)
    assert marks == []


def test_cuda_graphs_mark_each_training_step_and_each_monitor_batch(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``train.cuda_graphs`` each training step first tells the CUDA-graph trees that a new step begins (the
    outputs of the step before may be overwritten), before its forward, and so does each batch of the kNN monitor
    (one recorded graph then serves every batch); without it nothing is marked. On a CPU the training command refuses
    the setting before any work."""
    from dinov2.train.knn_monitor import KnnMonitor
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import training_step

    events: list[str] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))

    def config(*overrides: str):
        return load_config(DEMO_CONFIG, [*TINY, f"train.dataset_path={demo.lists_dir}", *overrides])

    graphed = ("train.compile=true", "train.cuda_graphs=true")
    with torch.device("meta"):
        assert SSLMetaArch(config(*graphed)).cuda_graphs and not SSLMetaArch(config("train.compile=true")).cuda_graphs

    class Step(torch.nn.Module):  # the parts of SSLMetaArch that training_step touches
        def __init__(self, cuda_graphs: bool) -> None:
            super().__init__()
            self.cuda_graphs = cuda_graphs
            self.student = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 1)})

        def forward_loss(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict]:
            events.append("forward")
            loss = self.student.backbone(batch["x"]).sum()
            return loss, {"total_loss": loss.detach()}

        def update_teacher(self, momentum: float) -> None:
            pass

    for graphs, expected in ((False, ["forward"] * 2), (True, ["mark", "forward"] * 2)):
        model = Step(graphs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            training_step(model, optimizer, None, nullcontext(), {"x": torch.ones(3, 2)}, 0.07, 0.99, 0.0)
        assert events == expected
        events.clear()

    backbone = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=1, num_heads=2)
    knn = f"evaluation.knn_data={demo.images_dir}"
    for overrides, expected in (((knn,), []), ((knn, *graphed), ["mark"])):  # 48 images: one batch of 64
        monitor = KnnMonitor.from_config(config(*overrides), tmp_path, torch.device("cpu"))
        monitor.evaluate(backbone, "initialisation", 0)
        assert events == expected
        events.clear()

    with pytest.raises(ConfigError, match="train.cuda_graphs=true needs a CUDA device, and this run is on cpu"):
        _train(tmp_path / "run", demo.lists_dir, *graphed, "train.device=cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("where", "override", "message"),
    [
        ("command line", "train.bach_size_per_gpu=4", r"did you mean train\.batch_size_per_gpu"),
        ("command line", "batch_size_per_gpu=4", r"did you mean train\.batch_size_per_gpu"),
        ("file", "optim:\n  base_lrr: 0.1\n", r"did you mean optim\.base_lr"),
    ],
)
def test_config_typo_fails_before_anything(tmp_path: Path, demo, where: str, override: str, message: str) -> None:
    out = tmp_path / "run"
    args = ["--output-dir", str(out), f"train.dataset_path={demo.lists_dir}"]
    if where == "file":
        config = tmp_path / "typo.yaml"
        config.write_text(override)
        argv = ["--config-file", str(config), *args]
    else:
        argv = ["--config-file", str(DEMO_CONFIG), *args, override]
    with pytest.raises(ConfigError, match=message):
        main(argv)
    assert not out.exists()


def test_output_dir_replaces_a_file_value_that_only_a_job_can_resolve(tmp_path: Path, demo) -> None:
    """A config whose output_dir names ${oc.env:...} of the cluster's jobs still runs here with --output-dir (as the
    launcher advises), under a folder name with a quote and a '#' kept as typed."""
    config = tmp_path / "cluster.yaml"
    demo_text = DEMO_CONFIG.read_text()
    assert "  output_dir: outputs/demo\n" in demo_text
    config.write_text(demo_text.replace("outputs/demo", "${oc.env:DINOBLOOM_TEST_UNSET_SCRATCH}/demo"))
    out = tmp_path / "it's run #2"
    main(["--config-file", str(config), "--output-dir", str(out), f"train.dataset_path={demo.lists_dir}", *TINY,
          "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=1"])  # fmt: skip
    assert load_config(out / "config.yaml").train.output_dir == str(out)
    assert (out / "checkpoints" / "000000000").is_dir()
    with pytest.raises(ConfigError, match=r"a folder name with '\$\{' cannot be used"):
        main(["--config-file", str(config), "--output-dir", str(tmp_path / "x${y}")])


def test_a_half_made_launch_environment_is_a_config_error(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RANK and WORLD_SIZE exported by hand without the rendezvous address: one error line, not a traceback."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="world size 2 but MASTER_ADDR/MASTER_PORT are unknown"):
        _train(tmp_path / "run", demo.lists_dir)


def test_options_may_follow_the_overrides() -> None:
    args = build_parser().parse_intermixed_args(
        ["--config-file", "run.yaml", "train.seed=3", "--no-resume", "optim.epochs=2", "--output-dir", "out"]
    )
    assert args.opts == ["train.seed=3", "optim.epochs=2"] and args.no_resume and args.output_dir == "out"


class _NoModel:
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("a model was built before the input was checked")


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        ("empty_list", ValueError, "is empty"),
        ("missing_dataset", FileNotFoundError, "does not exist"),
        ("missing_knn_data", FileNotFoundError, "evaluation.knn_data=.* does not exist"),
        ("imageless_knn_data", DatasetError, r"^evaluation.knn_data=.*lists: no images found"),
        ("unlabelled_knn_data", ConfigError, "evaluation.knn_data=.* must be a folder with one sub-folder per class"),
        ("small_class_knn_data", ConfigError, r"5-fold stratified cross-validation needs at least 5 images per class "
                                              r"\(of the 8 it uses\); too few in: 'small' \(2\)"),
    ],
)
def test_bad_data_paths_fail_before_any_model_is_built(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch, setting: str, error: type, message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(train_module, "SSLMetaArch", _NoModel)
    empty = tmp_path / "lists"
    empty.mkdir()
    (empty / "train.txt").write_text("# nothing here\n\n")
    few = tmp_path / "few"  # a labelled set with a class too small to cross-validate
    for name, count in (("large", 6), ("small", 2)):
        (few / name).mkdir(parents=True)
        for image in sorted((demo.images_dir / "lymphocyte").iterdir())[:count]:
            (few / name / image.name).symlink_to(image)
    dataset, extra = {
        "empty_list": (empty, []),
        "missing_dataset": (tmp_path / "nowhere", []),
        "missing_knn_data": (demo.lists_dir, [f"evaluation.knn_data={tmp_path / 'no_images'}"]),
        "imageless_knn_data": (demo.lists_dir, [f"evaluation.knn_data={demo.lists_dir}"]),  # the lists, by mistake
        "unlabelled_knn_data": (demo.lists_dir, [f"evaluation.knn_data={demo.images_dir / 'lymphocyte'}"]),
        "small_class_knn_data": (demo.lists_dir, [f"evaluation.knn_data={few}", "evaluation.knn_max_images=0"]),
    }[setting]
    out = tmp_path / "run"
    with pytest.raises(error, match=message) as raised:
        _train(out, dataset, *extra)
    assert not (out / "checkpoints").exists() and not (out / "training_metrics.json").exists()
    assert f"ERROR dinov2: stopped: {raised.value}" in (out / "log.txt").read_text()  # the log says why, too
    assert "stopped: " not in capsys.readouterr().out  # the console: the command line's one error line says it


def test_knn_monitor_scores_initialisation_and_end(
    tmp_path: Path, demo, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _train(out, demo.lists_dir, f"evaluation.knn_data={demo.images_dir}", "evaluation.knn_max_images=0",
           "evaluation.eval_period_iterations=3", epochs=1, epoch_length=3)  # fmt: skip
    assert "extracting features" not in capsys.readouterr().err  # no progress bar in a log that is not a terminal
    records = json.loads((out / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in records] == [("initialisation", 0), ("end of training", 3)]
    # Each score is scikit-learn's 20-NN balanced accuracy over seeded stratified 5-fold CV of the exported
    # teacher's features (k = 20 of the 38 or 39 training images of a fold).
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    from dinov2.eval.extract_features import extract_features

    for record, export in zip(records, ("training_init", "training_2")):
        features = extract_features(demo.images_dir, weights=out / "eval" / export / "teacher_checkpoint.pth",
                                    img_size=56, device="cpu")  # fmt: skip
        x, y = features.features, features.labels
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y)
        expected = np.mean([balanced_accuracy_score(y[test], KNeighborsClassifier(20).fit(x[train], y[train])
                                                    .predict(x[test])) for train, test in folds])  # fmt: skip
        assert record["k"] == 20 and record["balanced_accuracy"] == pytest.approx(expected, abs=1e-9), export
    assert "kNN balanced accuracy" in (out / "log.txt").read_text()
    # A job stopped while scoring the end (after the last checkpoint) scores it when it is run again.
    (out / "knn_monitor.json").write_text(json.dumps(records[:1]))
    _train(out, demo.lists_dir, f"evaluation.knn_data={demo.images_dir}", "evaluation.knn_max_images=0",
           epochs=1, epoch_length=3)  # fmt: skip
    again = json.loads((out / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in again] == [("initialisation", 0), ("end of training", 3)]
    assert again[1]["balanced_accuracy"] == records[1]["balanced_accuracy"]  # the same teacher, scored again
    _train(out, demo.lists_dir, f"evaluation.knn_data={demo.images_dir}", "evaluation.knn_max_images=0",
           epochs=1, epoch_length=3)  # fmt: skip
    assert len(json.loads((out / "knn_monitor.json").read_text())) == 2  # nothing more to score
    # A file cut short (a copy of the run folder, a full disk) is set aside, not a traceback; the end is scored again.
    damaged = (out / "knn_monitor.json").read_text()[:40]
    (out / "knn_monitor.json").write_text(damaged)
    _train(out, demo.lists_dir, f"evaluation.knn_data={demo.images_dir}", "evaluation.knn_max_images=0",
           epochs=1, epoch_length=3)  # fmt: skip
    assert (out / "knn_monitor.json.damaged").read_text() == damaged
    rescored = json.loads((out / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in rescored] == [("end of training", 3)]
    assert rescored[0]["balanced_accuracy"] == records[1]["balanced_accuracy"]


def test_a_schedule_shorter_than_the_checkpoint_is_refused_and_changes_nothing(tmp_path: Path, demo) -> None:
    """Run again with fewer epochs, a finished run would lose the records of its later steps; it is refused."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, epochs=2, epoch_length=3)
    before = {name: (out / name).read_text() for name in ("training_metrics.json", "config.yaml")}
    with pytest.raises(ConfigError, match=r"has trained 6 iterations, more than this config's run of 3 "
                                          r"\(optim.epochs=1 x train.OFFICIAL_EPOCH_LENGTH=3\)"):
        _train(out, demo.lists_dir, "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
               "teacher.warmup_teacher_temp_epochs=0", epochs=1, epoch_length=3)  # fmt: skip
    assert {name: (out / name).read_text() for name in before} == before
    with pytest.raises(ConfigError, match=r"MODEL.WEIGHTS continues the checkpoint's iteration count: raise optim"):
        _train(tmp_path / "new", demo.lists_dir, f"MODEL.WEIGHTS={out / 'checkpoints' / '000000005'}",
               "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
               epochs=1, epoch_length=3)  # fmt: skip


def test_a_damaged_checkpoint_stops_the_resume_naming_the_file_only(tmp_path: Path, demo) -> None:
    """A checkpoint with one flipped bit is not resumed from; the error names the file and the way out, and not the
    settings this run changed (here a longer schedule), which damaged nothing."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.checkpoint_period=2", epochs=1, epoch_length=2)
    shard = out / "checkpoints" / "000000001" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as raised:
        _train(out, demo.lists_dir, "train.checkpoint_period=2", epochs=2, epoch_length=2)
    assert str(raised.value) == (f"{shard} is damaged (its CRC-32 is not the one recorded when it was saved); remove "
                                 f"the folder {shard.parent} to resume from the checkpoint before it")  # fmt: skip


def test_eval_only_exports_the_teacher_of_the_newest_checkpoint(tmp_path: Path, demo) -> None:
    """--eval-only trains nothing: it writes the newest checkpoint's teacher (equal to the periodic export of the
    same step) as eval/manual_<steps>/, scores it with kNN, and names the problem when there is no checkpoint."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.checkpoint_period=3", "evaluation.eval_period_iterations=6",
           epochs=1, epoch_length=6)  # fmt: skip  (checkpoints 2 and 5, export training_5)
    metrics_before = (out / "training_metrics.json").read_text()
    _train(out, demo.lists_dir, "--eval-only", f"evaluation.knn_data={demo.images_dir}", epochs=1, epoch_length=6)
    manual = torch.load(out / "eval" / "manual_6" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    periodic = torch.load(out / "eval" / "training_5" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert list(manual) == list(periodic)
    assert all(torch.equal(manual[k], periodic[k]) for k in manual)
    (score,) = json.loads((out / "knn_monitor.json").read_text())
    assert (score["stage"], score["iteration"]) == ("manual", 6) and 0 <= score["balanced_accuracy"] <= 1
    assert (out / "training_metrics.json").read_text() == metrics_before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000002", "000000005", "latest"]

    other = tmp_path / "other"  # a folder without checkpoints, pointed at one of the run's
    _train(other, demo.lists_dir, "--eval-only", f"MODEL.WEIGHTS={out / 'checkpoints' / '000000002'}")
    # The new folder gets the config.yaml the export's architecture is read from: 2 heads, not the 1 of the shapes.
    assert load_backbone(None, other / "eval" / "manual_3" / "teacher_checkpoint.pth").num_heads == 2
    with pytest.raises(ConfigError, match=r"--eval-only: .* holds no complete checkpoint and MODEL.WEIGHTS is empty"):
        _train(tmp_path / "empty", demo.lists_dir, "--eval-only")
    assert not (tmp_path / "empty").exists()  # a mistyped folder is not made
    with pytest.raises(CheckpointError, match=r"--eval-only: MODEL.WEIGHTS=\S*000000099: no such checkpoint"):
        _train(tmp_path / "typo", demo.lists_dir, "--eval-only", f"MODEL.WEIGHTS={out / 'checkpoints' / '000000099'}")
    assert not (tmp_path / "typo").exists()  # nor a folder for a mistyped checkpoint
    # another head count fits every tensor but computes something else: refused as a resume refuses it, and the
    # new folder gets no config.yaml that would mislabel an export
    mislabelled = tmp_path / "mislabelled"
    with pytest.raises(ConfigError, match="trained with another network: student.num_heads=2 in the checkpoint, 4"):
        _train(mislabelled, demo.lists_dir, "--eval-only", "student.num_heads=4",
               f"MODEL.WEIGHTS={out / 'checkpoints' / '000000002'}")  # fmt: skip
    assert not (mislabelled / "config.yaml").exists()


def test_colour_augmentation_on_the_device_trains_exactly_as_in_the_workers(tmp_path: Path, demo) -> None:
    """train.colour_augmentation=device (here the CPU) gives the losses and teacher of the workers' colour."""
    runs = {}
    for where in ("workers", "device"):
        out = tmp_path / where
        _train(out, demo.lists_dir, f"train.colour_augmentation={where}", "train.num_workers=1", epochs=1,
               epoch_length=4)  # fmt: skip
        runs[where] = out
    assert _losses(_metrics(runs["device"])) == _losses(_metrics(runs["workers"]))
    assert len(_metrics(runs["device"])) == 4
    log = (runs["device"] / "log.txt").read_text()
    assert "colour augmentation on cpu (uint8 crops from the data-loader workers)" in log
    assert "colour augmentation in the data-loader workers" in (runs["workers"] / "log.txt").read_text()


def _crash_then_resume(out: Path, demo, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """8 iterations that crash in iteration 4 (last checkpoint 2, metrics logged up to 3), then the resumed run."""
    args = ("train.checkpoint_period=3", "evaluation.rankme_period_iterations=4", "evaluation.rankme_batches=2", *args)
    _interrupt_at(monkeypatch, 4, "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(out, demo.lists_dir, *args, epochs=2, epoch_length=4)
    monkeypatch.undo()
    _train(out, demo.lists_dir, *args, epochs=2, epoch_length=4)
    assert "resuming at iteration 3" in (out / "log.txt").read_text()


def test_metrics_reach_tensorboard_once_per_iteration_across_a_resume(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every number of training_metrics.json (and the kNN scores) is a TensorBoard scalar at its iteration, once:
    the resumed run hides the events that the crashed run logged after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _crash_then_resume(out, demo, monkeypatch, "tracking.tensorboard=true", f"evaluation.knn_data={demo.images_dir}")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(8))
    for key in ("total_loss", "ibot_loss", "lr", "teacher_temp", "images_per_s", "rankme"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(r["iteration"], r[key]) for r in records if key in r]
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), key
    assert [e.step for e in events.Scalars("rankme")] == [1, 5]
    knn = json.loads((out / "knn_monitor.json").read_text())
    logged = [(e.step, e.value) for e in events.Scalars("knn_balanced_accuracy")]
    assert logged == [(r["iteration"], pytest.approx(r["balanced_accuracy"], rel=1e-6)) for r in knn]


def test_an_end_of_training_score_finished_by_a_rerun_reaches_the_trackers(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while scoring the end of training (after the last checkpoint): the re-run that only scores it sends
    the score to TensorBoard too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dinov2.train.knn_monitor import KnnMonitor

    out, evaluate = tmp_path / "run", KnnMonitor.evaluate

    def stopped_at_the_end(self, backbone, stage, iteration):
        if stage == END_OF_TRAINING:
            raise KeyboardInterrupt
        return evaluate(self, backbone, stage, iteration)

    args = ("tracking.tensorboard=true", f"evaluation.knn_data={demo.images_dir}")
    monkeypatch.setattr(KnnMonitor, "evaluate", stopped_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    monkeypatch.undo()
    _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    assert "nothing to do" in (out / "log.txt").read_text()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    knn = json.loads((out / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in knn] == [("initialisation", 0), (END_OF_TRAINING, 3)]
    logged = [(e.step, e.value) for e in events.Scalars("knn_balanced_accuracy")]
    assert logged == [(r["iteration"], pytest.approx(r["balanced_accuracy"], rel=1e-6)) for r in knn]


def test_a_stop_signal_after_the_last_step_ends_the_run_before_its_score(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 while the last checkpoint is written (after the last step's vote): the run stops before the
    end-of-training score and hands the signal on (exit 128 + 10), instead of ignoring it; the re-run scores."""
    out, save = tmp_path / "run", train_module.save_checkpoint

    def signalled_while_saving(ckpt_dir, iteration, *args, **kwargs):
        result = save(ckpt_dir, iteration, *args, **kwargs)
        if iteration == 2:  # the last of 3 iterations
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(train_module, "save_checkpoint", signalled_while_saving)
    args = (f"evaluation.knn_data={demo.images_dir}",)
    with pytest.raises(SystemExit) as exit_info:
        _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    assert exit_info.value.code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    knn = json.loads((out / "knn_monitor.json").read_text())
    assert [r["stage"] for r in knn] == ["initialisation"]
    assert "stopping before the end-of-training kNN score" in (out / "log.txt").read_text()
    monkeypatch.undo()
    _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    knn = json.loads((out / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in knn] == [("initialisation", 0), (END_OF_TRAINING, 3)]


def test_a_stop_signal_while_the_last_vote_is_counted_reaches_the_previous_handler(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 after the last vote was read but before the handlers are restored: no rank stops for it, so it is
    raised again for the restored handler (here one that records it and raises, as submitit's may), which acts
    before the end-of-training score, instead of the signal being ignored."""
    out, count = tmp_path / "run", train_module.sum_over_ranks
    seen = []

    def previous_handler(signum, frame):
        seen.append(signum)
        raise RuntimeError("requeued")

    def signalled_during_the_last_vote(values, group):
        result = count(values, group)
        if len(values) == len(PreemptionHandler.SIGNALS):  # the vote after the last step
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(train_module, "sum_over_ranks", signalled_during_the_last_vote)
    original = signal.signal(signal.SIGUSR1, previous_handler)
    try:
        with pytest.raises(RuntimeError, match="requeued"):
            _train(out, demo.lists_dir, f"evaluation.knn_data={demo.images_dir}", epochs=1, epoch_length=3)
    finally:
        signal.signal(signal.SIGUSR1, original)
    assert seen == [signal.SIGUSR1]
    assert [r["stage"] for r in json.loads((out / "knn_monitor.json").read_text())] == ["initialisation"]


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log framing: 32 KiB blocks of 7-byte-header chunks)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, pending, records = path.read_bytes(), 7, b"", []  # after the file header
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if room < 7 or kind == 0:  # block trailer or padding
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_key(item) -> str:
    """The name of a W&B history or config item (kept in ``key`` or, split at dots, in ``nested_key``)."""
    return item.key or ".".join(item.nested_key)


def test_metrics_reach_wandb_and_a_resumed_run_continues_the_same_run(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline W&B: the crashed and the resumed process log to one run id, with the config, every number at its
    iteration, and the crash marked as a failure."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _crash_then_resume(out, demo, monkeypatch, "tracking.wandb=true", "tracking.wandb_project=tests")
    monkeypatch.undo()
    import wandb

    wandb.teardown()  # W&B's service process writes the run files; wait for it to finish them
    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the crashed and the resumed process

    records = _metrics(out)
    for path, steps, exit_code in ((files[0], range(4), 1), (files[1], range(3, 8), 0)):
        parsed = _wandb_records(path)
        (run,) = [r.run for r in parsed if r.WhichOneof("record_type") == "run"]
        assert run.run_id == run_id and run.project == "tests" and run.display_name == "run"
        config = {_wandb_key(item): json.loads(item.value_json) for item in run.config.update}
        assert config["train"]["batch_size_per_gpu"] == 8 and config["tracking"]["wandb"] is True
        history = [{_wandb_key(item): json.loads(item.value_json) for item in r.history.item}
                   for r in parsed if r.WhichOneof("record_type") == "history"]  # fmt: skip
        assert [h["_step"] for h in history] == list(steps)
        for row in history:
            expected = records[row["_step"]]
            for key in ("total_loss", "dino_global_crops_loss", "lr", "rankme"):
                if key in expected:
                    assert row[key] == pytest.approx(expected[key], rel=1e-12), (row["_step"], key)
                else:
                    assert key not in row, (row["_step"], key)
        (exit_record,) = [r.exit for r in parsed if r.WhichOneof("record_type") == "exit"]
        assert exit_record.exit_code == exit_code


def test_a_tracker_that_is_not_installed_fails_before_anything(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.wandb=true needs the wandb package: pip install wandb"):
        _train(tmp_path / "run", demo.lists_dir, "tracking.wandb=true")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_resize_reaches_the_dataset(demo, caplog: pytest.LogCaptureFixture) -> None:
    base = [f"train.dataset_path={demo.lists_dir}"]
    assert build_train_dataset(load_config(DEMO_CONFIG, base)).resize is None
    assert build_train_dataset(load_config(DEMO_CONFIG, [*base, "train.image_resize=224"])).resize == 224
    hema = [f"train.dataset_path=HemaStandardDataset:root={demo.lists_dir}:shuffle=1"]
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert build_train_dataset(load_config(DEMO_CONFIG, hema)).resize == 224  # DinoBloom's spelling resizes
    assert "images are resized to 224 x 224 px (Lanczos) before the augmentation" in caplog.text  # and says so
    assert build_train_dataset(load_config(DEMO_CONFIG, [*hema, "train.image_resize=112"])).resize == 112
    for name in ("custom", "vitb14"):
        assert load_config(TRAIN_CONFIG_DIR / f"{name}.yaml").train.image_resize == 224
    with pytest.raises(ConfigError, match="train.image_resize must be >= 0"):
        load_config(DEMO_CONFIG, [*base, "train.image_resize=-1"])


def test_forked_workers_ignore_the_preemption_signals() -> None:
    """A scheduler may signal every process of a job: only the trainer itself (not its data workers) reacts."""
    handler = PreemptionHandler()
    handler.install()
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a data-loader worker is forked like this, with the trainer's handlers
            os.close(read_end)
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            os.write(write_end, b"ignored" if handler.received is None else b"reacted")
            os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 16)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        assert answer == b"ignored" and os.waitstatus_to_exitcode(status) == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
    finally:
        handler.uninstall()


def test_a_previous_handler_that_fails_still_ends_in_the_agreed_exit(caplog: pytest.LogCaptureFixture) -> None:
    """submitit's handler raises when it will not requeue (timed out too many times): the rank still leaves with
    SystemExit, which every rank's stop ends with (its barrier), and says why."""

    def will_not_requeue(signum: int, frame: Any) -> None:
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    previous = signal.signal(signal.SIGUSR1, will_not_requeue)
    handler = PreemptionHandler()
    try:
        handler.install()
        handler._handle(signal.SIGUSR1, None)
        with caplog.at_level(logging.WARNING, logger="dinov2"), pytest.raises(SystemExit) as exit_info:
            handler.forward_signal()
        assert exit_info.value.code == 128 + signal.SIGUSR1
        assert isinstance(exit_info.value.handler_error, RuntimeError)  # for main to raise after the barrier
        assert "the stop ends here: RuntimeError: Job not requeued because: timed-out too many times." in caplog.text
    finally:
        handler.uninstall()
        signal.signal(signal.SIGUSR1, previous)


def test_the_training_command_raises_the_previous_handlers_error_after_the_checkpoint(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop whose previous handler raises (submitit's, when it will not requeue) ends the command with that error,
    after the checkpoint, so that the launcher records why (submitit writes it as the job's result)."""
    out, save = tmp_path / "run", train_module.save_checkpoint

    def will_not_requeue(signum: int, frame: Any) -> None:
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    def signalled_while_saving(ckpt_dir, iteration, *args, **kwargs):
        if iteration == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return save(ckpt_dir, iteration, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", signalled_while_saving)
    previous = signal.signal(signal.SIGUSR1, will_not_requeue)
    try:
        with pytest.raises(RuntimeError, match="timed-out too many times"):
            _train(out, demo.lists_dir, "train.checkpoint_period=1", epochs=1, epoch_length=5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert (out / "checkpoints" / "000000001").is_dir()  # the stop's checkpoint, the iteration after the signal
    assert not (out / "checkpoints" / "000000002").exists()


def test_a_run_started_with_nohup_keeps_ignoring_hangups() -> None:
    """``nohup`` (SIGHUP ignored) means "keep running when the terminal closes": that stays so; otherwise a hangup
    checkpoints and stops the run, as SIGTERM does."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        handler = PreemptionHandler()
        handler.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == handler._handle
        handler.uninstall()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        handler = PreemptionHandler()
        handler.install()
        assert signal.getsignal(signal.SIGHUP) == handler._handle
        handler.uninstall()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_only_rank_0_warns_of_a_stop_signal(caplog: pytest.LogCaptureFixture) -> None:
    """A signal to every process of a many-rank job is one warning (rank 0's), and a rank that received nothing
    learns of it from the votes; the other ranks say it at INFO, below what their log shows."""
    main_rank, other_rank = PreemptionHandler(is_main=True), PreemptionHandler(is_main=False)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        other_rank._handle(signal.SIGTERM, None)
        assert main_rank.agree([3, 0, 0]) and main_rank.received == signal.SIGTERM
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.INFO, "received SIGTERM: checkpointing at the end of this iteration"),
        (logging.WARNING, "3 other process(es) received SIGTERM: checkpointing at the end of this iteration"),
    ]


def test_the_second_ctrl_c_is_offered_only_where_it_stops_the_run(caplog: pytest.LogCaptureFixture) -> None:
    """Alone, a second Ctrl-C stops at once, and the log says so; under torchrun, which turns it into SIGTERM (a
    checkpoint all the same), the log does not offer it."""
    alone, under_torchrun = PreemptionHandler(), PreemptionHandler(offer_second_ctrl_c=False)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        alone._handle(signal.SIGINT, None)
        under_torchrun._handle(signal.SIGINT, None)
    assert [r.getMessage() for r in caplog.records] == [
        "received SIGINT: checkpointing at the end of this iteration (Ctrl-C again to stop at once, without it)",
        "received SIGINT: checkpointing at the end of this iteration",
    ]
    with pytest.raises(KeyboardInterrupt):
        alone._handle(signal.SIGINT, None)


@pytest.mark.parametrize("command", [
    ["dinov2/train/train.py"], ["-m", "dinov2.eval.mil"], ["scripts/benchmark_train.py"], ["scripts/benchmark_data.py"],
    ["scripts/benchmark_loss.py"], ["scripts/benchmark_features.py"],
])  # fmt: skip
def test_commands_set_the_openmp_wait_policy_before_torch_loads_it(command: list[str]) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: each command must import the package, which sets
    it, before torch (a reordered import would silently bring back the spinning that stalls a busy machine)."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert imported.index("dinov2") < imported.index("torch")


def test_logging_prints_each_line_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A launcher's logger with its own console handler (submitit's) is not printed a second time."""
    launcher = logging.getLogger("launcher_with_own_handler")
    own = logging.StreamHandler(sys.stdout)
    launcher.addHandler(own)
    root = logging.getLogger()
    handlers = setup_run_logging(tmp_path, is_main=True)
    try:
        launcher.info("from the launcher")
        logging.getLogger("dinov2.somewhere").info("from the trainer")
        printed = capsys.readouterr().out
        assert printed.count("from the launcher") == 1 and printed.count("from the trainer") == 1
        logged = (tmp_path / "log.txt").read_text()
        assert "from the launcher" in logged and "from the trainer" in logged
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        launcher.removeHandler(own)
    # A root logger that already prints (a launcher configured it) gets only the log file.
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        handlers = setup_run_logging(tmp_path, is_main=True)
        assert len(handlers) == 1 and isinstance(handlers[0], logging.FileHandler)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.removeHandler(console)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail as on a full disk")
def test_a_log_file_on_a_full_disk_is_told_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """log.txt that cannot be written (a full disk: here a link to /dev/full) is one warning on stderr, not a
    traceback per record; the run's records still reach the console, and closing the file raises nothing."""
    (tmp_path / "log.txt").symlink_to("/dev/full")
    root = logging.getLogger()
    handlers = setup_run_logging(tmp_path, is_main=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logging, "raiseExceptions", False)  # (pytest's setting would raise the bad record's error)
            logging.getLogger("dinov2.somewhere").info("a record that cannot be formatted: %d", "text")
        for step in range(3):
            logging.getLogger("dinov2.somewhere").info("step %d", step)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    printed = capsys.readouterr()
    assert all(f"step {step}" in printed.out for step in range(3))
    # (the bad record is logging's to report, as it reports it elsewhere: it is no failure to write the file)
    assert printed.err == (f"warning: cannot write {tmp_path / 'log.txt'} ([Errno 28] No space left on device); the "
                           "run goes on, its records only on the console\n")  # fmt: skip


def test_the_log_says_which_network_trains(tmp_path: Path, demo) -> None:
    """log.txt names the backbone built, and says when student.embed_dim/depth/num_heads replaced the sizes of
    student.arch (whose name alone would otherwise suggest a model the run does not train)."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "student.arch=vit_giant2", "student.ffn_layer=swiglufused", epochs=1, epoch_length=1)
    line = next(line for line in (out / "log.txt").read_text().splitlines() if "student: " in line)
    backbone = DinoVisionTransformer(img_size=56, embed_dim=64, depth=2, num_heads=2, ffn_layer="swiglufused")
    count = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert re.search(re.escape(
        "student: vit_giant2 (student.embed_dim, student.depth, student.num_heads replacing its 1536, 40, 24): 64 "
        f"wide, 2 blocks, 2 heads, swiglufused feed-forward, 0 registers, patch 14, 56 px; parameters: backbone "
        f"{count:.2f} M, "
    ) + r"dino_head 0\.\d\d M, ibot_head 0\.\d\d M \(the teacher is their EMA\)$", line)  # fmt: skip
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    with torch.device("meta"):
        cfg = load_config(DEMO_CONFIG, ["student.arch=vit_small", "student.embed_dim=0", "student.depth=0",
                                        "student.num_heads=0"])  # fmt: skip
        assert train_module.describe_student(cfg, SSLMetaArch(cfg).student).startswith(
            "student: vit_small: 384 wide, 12 blocks, 6 heads, mlp feed-forward, 0 registers, patch 14, 112 px; "
            "parameters: backbone 21."
        )


def test_what_the_config_says_while_it_loads_reaches_log_txt(
    tmp_path: Path, demo, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The config is read before log.txt exists: its warnings (an ignored DinoBloom key) and notes (the lr scaling)
    are written there once it does, and printed once; a run stopped by the config still prints its warnings."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.drop_path_rate=0.1", epochs=1, epoch_length=1)
    log = (out / "log.txt").read_text()
    assert re.search(r"WARNING dinov2.configs: command line: train.drop_path_rate is ignored", log)
    assert capsys.readouterr().out.count("train.drop_path_rate is ignored") == 1
    caplog.clear()
    with pytest.raises(ConfigError, match="did you mean"):  # (the root's handlers get it: pytest's, or stderr's)
        _train(tmp_path / "other", demo.lists_dir, "train.drop_path_rate=0.1", "train.bach_size_per_gpu=2")
    assert "train.drop_path_rate is ignored" in caplog.text


def test_each_step_gets_its_schedules_clipping_and_frozen_prototypes(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the loop hands each step, against DINOv2's formulas: the teacher temperature's linear warm-up, the EMA
    momentum's cosine to 1, prototypes (the heads' last layers) at lr 0 for the first epoch and the others not,
    and gradients clipped to optim.clip_grad per part."""
    seen = []
    step = train_module.training_step

    def recorded(model, optimizer, scaler, autocast, batch, teacher_temp, momentum, clip_grad):
        last = {g["lr"] for g in optimizer.param_groups if g["is_last_layer"]}
        other = {g["lr"] for g in optimizer.param_groups if not g["is_last_layer"]}
        terms = step(model, optimizer, scaler, autocast, batch, teacher_temp, momentum, clip_grad)
        norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters() if p.grad is not None]))
                 for part in model.student.values()]  # fmt: skip
        seen.append((teacher_temp, momentum, last, other, [float(n) for n in norms]))
        return terms

    monkeypatch.setattr(train_module, "training_step", recorded)
    _train(tmp_path / "run", demo.lists_dir, "teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07",
           "teacher.warmup_teacher_temp_epochs=1", "teacher.momentum_teacher=0.9",
           "teacher.final_momentum_teacher=1.0", "optim.freeze_last_layer_epochs=1", "optim.warmup_epochs=0",
           "optim.clip_grad=0.001", epochs=2, epoch_length=3)  # fmt: skip
    assert len(seen) == 6
    warm = np.linspace(0.04, 0.07, 3)
    for i, (temp, momentum, last, other, norms) in enumerate(seen):
        assert temp == pytest.approx(warm[i] if i < 3 else 0.07), i
        assert momentum == pytest.approx(1.0 + (0.9 - 1.0) * (1 + math.cos(math.pi * i / 6)) / 2), i
        assert (last == {0.0}) == (i < 3) and min(other) > 0, (i, last)
        assert all(0 < n <= 0.001 * (1 + 1e-5) for n in norms), (i, norms)


def test_a_run_killed_while_saving_its_last_checkpoint_is_tidied_when_run_again(tmp_path: Path, demo) -> None:
    """kill -9 after the last checkpoint's rename, before `latest`, pruning and clean-up: the re-run has nothing to
    train, and finishes that work (a stale `latest`, an extra checkpoint, trash-* and temporary files stayed)."""
    out = tmp_path / "run"
    args = ("train.checkpoint_period=1", "train.keep_last_checkpoints=2")
    _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    ckpt = out / "checkpoints"
    shutil.copytree(ckpt / "000000002", ckpt / "000000000")  # as if not yet pruned
    shutil.copytree(ckpt / "000000002", ckpt / "trash-000000000-99")  # a deletion cut short
    (ckpt / "latest").write_text("000000001\n")  # the rename done, `latest` not yet rewritten
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs: the killed writer's
    (ckpt / f".latest.tmp-{gone.pid}").write_text("000000002")
    (out / f".knn_monitor.json.tmp-{gone.pid}").write_text("[")
    _train(out, demo.lists_dir, *args, epochs=1, epoch_length=3)
    assert "nothing to do" in (out / "log.txt").read_text()
    assert sorted(p.name for p in ckpt.iterdir()) == ["000000001", "000000002", "latest"]
    assert (ckpt / "latest").read_text() == "000000002\n"
    _train(out, demo.lists_dir, *args, "train.resume=true", f"evaluation.knn_data={demo.images_dir}",
           "evaluation.knn_max_images=0", epochs=1, epoch_length=3)  # fmt: skip  (scores the end: writes the record)
    assert not (out / f".knn_monitor.json.tmp-{gone.pid}").exists()


def test_the_exported_teacher_is_the_checkpoints_teacher(tmp_path: Path, demo) -> None:
    """eval/training_N/teacher_checkpoint.pth holds the EMA teacher of step N (the network that is evaluated and
    released), not the student."""
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.checkpoint_period=3", "evaluation.eval_period_iterations=3",
           epochs=1, epoch_length=3)  # fmt: skip
    exported = torch.load(out / "eval" / "training_2" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    saved = _checkpoint_tensors(out / "checkpoints" / "000000002", tmp_path)
    assert exported and all(torch.equal(v, saved[f"model.teacher.{k}"]) for k, v in exported.items())
    assert any(not torch.equal(v, saved[f"model.student.{k}"]) for k, v in exported.items())


def test_held_records_reach_each_handler_once_and_other_ranks_keep_their_own() -> None:
    """Before log.txt exists: a handler the user put on the ``dinov2`` logger gets each record once (and no INFO when
    the user set WARNING), the root's handlers get them afterwards; the other ranks drop only the config's records
    (rank 0 reports them), not their own (a GPU shared by two local ranks, say)."""

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    root, project = logging.getLogger(), logging.getLogger("dinov2")
    at_root, on_project = Collect(), Collect()
    root.addHandler(at_root)
    project.addHandler(on_project)
    project.setLevel(logging.WARNING)
    try:
        held = HeldRecords()
        logging.getLogger("dinov2.configs").warning("config warning")
        logging.getLogger("dinov2.configs").info("config note")
        logging.getLogger("dinov2.distributed").warning("rank warning")
        held.pass_on(configs=False)
        held.pass_on()  # (a second call does nothing)
        assert project.propagate and project.level == logging.WARNING  # the user's level, restored
    finally:
        root.removeHandler(at_root)
        project.removeHandler(on_project)
        project.setLevel(logging.NOTSET)
    assert on_project.messages == ["config warning", "rank warning"]
    assert at_root.messages == ["rank warning"]


def test_the_time_of_saving_is_not_counted_as_training_pace(
    tmp_path: Path, demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint that takes 1,000 s (a slow file system; the trainer's clock is moved on, not waited for) does
    not show as a slow step in img/s, nor in the eta."""
    save, clock = train_module.save_checkpoint, {"offset": 0.0}

    def slow_save(*args, **kwargs):
        clock["offset"] += 1000.0
        return save(*args, **kwargs)

    class Clock:  # the trainer's `time`, with the saves' extra time
        def __getattr__(self, name: str):
            return getattr(time, name)

        def perf_counter(self) -> float:
            return time.perf_counter() + clock["offset"]

    monkeypatch.setattr(train_module, "save_checkpoint", slow_save)
    monkeypatch.setattr(train_module, "time", Clock())
    out = tmp_path / "run"
    _train(out, demo.lists_dir, "train.checkpoint_period=2", epochs=1, epoch_length=5)
    assert clock["offset"] >= 2000.0  # (the checkpoints of iterations 1 and 3, at least)
    records = _metrics(out)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    assert all(8 / r["images_per_s"] < 500.0 for r in records), [r["images_per_s"] for r in records]


def test_other_ranks_write_their_warnings_to_a_file_of_their_own(tmp_path: Path) -> None:
    """Rank 1's unreadable images (its share of the data) are named in log_rank1.txt, which errors point to; a rank
    without warnings leaves no file."""
    root, level = logging.getLogger(), logging.getLogger().level
    handlers = setup_run_logging(tmp_path, is_main=False, rank=1)
    try:
        logging.getLogger("dinov2.somewhere").info("progress of rank 1")
        assert not (tmp_path / "log_rank1.txt").exists()
        logging.getLogger("dinov2.data.datasets").warning("skipping unreadable image /data/x.png")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    logged = (tmp_path / "log_rank1.txt").read_text()
    assert "skipping unreadable image /data/x.png" in logged and "progress of rank 1" not in logged
    assert not (tmp_path / "log.txt").exists()
    with pytest.raises(DatasetError, match=r"warnings in log.txt \(and log_rank<N>.txt of the other ranks\) name"):
        check_bad_images(5, images_seen=10, dataset_size=10, max_fraction=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loader_batches_do_not_depend_on_the_worker_count(demo, dtype: torch.dtype) -> None:
    """Batches from worker processes (which stack the crops into shared memory) equal the in-process ones; crops
    collated in a mixed-precision run's dtype are the float32 crops rounded, as autocast would round them."""
    from dinov2.train.data import build_train_loader

    batches = {}
    for workers, crop_dtype in ((0, torch.float32), (2, dtype)):
        cfg = load_config(DEMO_CONFIG, [f"train.dataset_path={demo.lists_dir}", *TINY, f"train.num_workers={workers}"])
        loader = build_train_loader(cfg, build_train_dataset(cfg), start=8, rank=0, world_size=1, dtype=crop_dtype)
        iterator = iter(loader)
        batches[workers] = [next(iterator) for _ in range(2)]
        del iterator
    for in_process, from_worker in zip(batches[0], batches[2]):
        crops = from_worker["collated_global_crops"]
        assert crops.shape == (16, 3, 56, 56) and crops.dtype == dtype
        assert torch.equal(in_process["collated_global_crops"].to(dtype), crops)
        for key in ("collated_masks", "mask_indices_list", "masks_weight"):
            assert torch.equal(in_process[key], from_worker[key]), key


def test_an_output_directory_that_cannot_be_made_is_a_config_error(tmp_path: Path, demo) -> None:
    """A file where the output folder should be is named in one error line, not an OSError traceback."""
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    for output_dir, reason in ((blocker, "it is a file"), (blocker / "run1", f"{blocker} is a file")):
        with pytest.raises(ConfigError, match=rf"--output-dir \(train.output_dir\) {output_dir}: {reason}, not a "
                                              "folder; name a folder$"):  # fmt: skip
            _train(output_dir, demo.lists_dir)
    assert blocker.read_text() == "a file, not a folder"


def test_a_parent_folder_that_cannot_be_searched_is_no_file_in_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Python 3.12, Path.exists raises PermissionError under a folder one may not search: the search for a
    file in the way of an output folder must answer "none" there (the error names the permission instead)."""
    from dinov2.files import file_in_the_way

    def denied(self: Path, *args: object, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    monkeypatch.setattr(Path, "is_dir", denied)
    assert file_in_the_way(tmp_path / "locked" / "run") is None
    (tmp_path / "results").write_text("a file")
    assert file_in_the_way(tmp_path / "results" / "run") == tmp_path / "results"
    # so do the output checks of the evaluation commands: they go on to their own errors, not to a traceback
    from dinov2.cli import check_file_writable
    from dinov2.eval.reports import prepare_output_dir

    assert prepare_output_dir(tmp_path / "locked" / "run") == tmp_path / "locked" / "run"
    check_file_writable(tmp_path / "locked" / "features.h5")
    with pytest.raises(ValueError, match="results is a file, not a folder"):
        check_file_writable(tmp_path / "results" / "features.h5")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_training_in_a_folder_in_use_stops_before_touching_it(tmp_path: Path, demo) -> None:
    """While a run holds its output folder (here: its lock, taken by this test as that run would), a second run
    there stops with one error naming the holder, and writes nothing; once the holder is gone, the folder is free."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with (out / ".lock").open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("process 4242 on node7, since 2026-11-27T10:00:00\n")
        holder.flush()
        with pytest.raises(ConfigError, match=r"run is in use by another training \(process 4242 on node7, since "):
            _train(out, demo.lists_dir, epochs=1, epoch_length=2)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # not even its log
    _train(out, demo.lists_dir, epochs=1, epoch_length=2)  # a lock left by a finished (or killed) run is no obstacle
    assert (out / "checkpoints").is_dir()
    _train(out, demo.lists_dir, epochs=1, epoch_length=2)  # nor is the lock of this process's own earlier run


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked data-loader workers are POSIX")
def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path: Path) -> None:
    """A data-loader worker (a forked child) that outlives its trainer, which was killed, must not hold the folder:
    the re-run that resumes takes the lock while the child still runs."""
    import multiprocessing

    from dinov2.train.run_lock import RunLock

    lock = RunLock(tmp_path)
    lock.acquire()
    context = multiprocessing.get_context("fork")
    child_started, trainer_gone = context.Event(), context.Event()
    child = context.Process(target=_wait_as_a_worker, args=(child_started, trainer_gone))
    child.start()
    try:
        assert child_started.wait(30)
        lock.release()  # as the kernel releases the descriptors of a killed trainer
        rerun = RunLock(tmp_path)
        rerun.acquire()  # refused ("in use by another training") while the child held its copy
        rerun.release()
    finally:
        trainer_gone.set()
        child.join(30)
    assert child.exitcode == 0


def _wait_as_a_worker(started: Any, trainer_gone: Any) -> None:
    started.set()
    trainer_gone.wait(30)


@pytest.mark.parametrize("mistake", ["config typo", "empty file list"])
def test_train_script_ends_a_user_mistake_in_one_error_line(tmp_path: Path, mistake: str) -> None:
    empty = tmp_path / "lists" / "cells.txt"
    empty.parent.mkdir()
    empty.write_text("# nothing listed yet\n")
    override, message = {
        "config typo": ("train.bach_size_per_gpu=4",
                        "error: command line: unknown key 'train.bach_size_per_gpu'; did you mean "
                        "train.batch_size_per_gpu?"),
        "empty file list": (f"train.dataset_path={empty.parent}",
                            f"error: file list {empty} is empty (no image paths, only blank or # lines)"),
    }[mistake]
    script = Path(__file__).resolve().parents[1] / "dinov2" / "train" / "train.py"
    run = subprocess.run(
        [sys.executable, str(script), "--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"),
         override],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == message


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "Ctrl-C", "hangup"])
def test_a_stop_signal_to_every_process_of_the_run_still_checkpoints(tmp_path: Path, demo, sig: int) -> None:
    """``timeout``, ``scancel``, a terminal's Ctrl-C and a closed terminal or SSH session (SIGHUP) signal the whole
    process group, data-loader workers included: the run still finishes its iteration, checkpoints and stops with
    128 + signal, without a traceback.
    (PyTorch's workers die of a SIGTERM from anyone but their parent; the step after would fail.)"""
    out = tmp_path / "run"
    script = Path(__file__).resolve().parents[1] / "dinov2" / "train" / "train.py"
    argv = [sys.executable, str(script), "--config-file", str(DEMO_CONFIG), "--output-dir", str(out),
            f"train.dataset_path={demo.lists_dir}", *TINY, "train.num_workers=2", "train.checkpoint_period=1000",
            "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=1000"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        metrics = out / "training_metrics.json"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert run.poll() is None and time.monotonic() < deadline, "the training did not start in time"
            time.sleep(0.2)
        os.killpg(run.pid, sig)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    log = (out / "log.txt").read_text()
    stopped = re.search(r"stopping after the checkpoint of iteration (\d+)", log)
    assert stopped is not None, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"{int(stopped.group(1)):09d}"


def test_an_uncaught_error_ends_the_run_with_its_workers(tmp_path: Path, demo) -> None:
    """An error that reaches the interpreter (here with ``DINOBLOOM_TRACEBACK=1``; a full disk while saving is
    another) ends the process with its traceback. The data-loader workers ignore SIGTERM, which multiprocessing sends
    them at exit before waiting for them: the run used to hang there for ever, holding a cluster's allocation."""
    list_file, _ = _damaged_list(tmp_path, demo)
    script = Path(__file__).resolve().parents[1] / "dinov2" / "train" / "train.py"
    argv = [sys.executable, str(script), "--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"),
            f"train.dataset_path={list_file}", *TINY, "train.num_workers=2", "train.max_bad_image_fraction=0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DINOBLOOM_TRACEBACK": "1"}
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        _, stderr = run.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the failed run did not exit: it waits for its data-loader workers")
    assert run.returncode == 1, stderr[-3000:]
    assert "Traceback" in stderr and "max_bad_image_fraction=0.01" in stderr
    assert "stopped: " in (tmp_path / "run" / "log.txt").read_text()  # log.txt says why


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_read_that_never_returns_ends_the_run_after_the_data_timeout(tmp_path: Path, demo) -> None:
    """A list naming a named pipe (as a stalled network file system: a read that never returns) stops the run
    with one error line after train.data_timeout_s, and no worker outlives it, stuck in the read."""
    images = sorted(demo.images_dir.rglob("*.png"))[:3]
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)  # opening it for reading waits for a writer that never comes
    list_file = tmp_path / "train.txt"
    list_file.write_text("".join(f"{p}\n" for p in [*images, stuck]))  # every batch of 8 draws from the 4
    script = Path(__file__).resolve().parents[1] / "dinov2" / "train" / "train.py"
    argv = [sys.executable, str(script), "--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"),
            f"train.dataset_path={list_file}", *TINY, "train.num_workers=1", "train.data_timeout_s=3"]
    run = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:  # the pipes close only when every process holding them has ended, the workers included
        _, stderr = run.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the run, or a worker stuck in the read, did not end")
    assert run.returncode == 2, stderr[-3000:]
    assert "error: no batch came from the 1 data-loader workers within 3 s (train.data_timeout_s)" in stderr
    assert "Traceback" not in stderr


def test_the_knn_monitor_subset_keeps_each_class_share() -> None:
    """evaluation.knn_max_images: 2,000 of a 4,000-image set keep half of each class, and a class too small for
    that keeps the 5 images that 5-fold CV needs; the draw depends on the seed only."""
    from dinov2.eval.image_list import ImageList
    from dinov2.train.knn_monitor import stratified_subset

    counts = {"neutrophil": 3000, "lymphocyte": 990, "basophil": 10}
    labels = [c for c, n in enumerate(counts.values()) for _ in range(n)]
    images = ImageList(Path("/cells"), [f"{i}.jpg" for i in range(len(labels))], labels, list(counts))
    subset = stratified_subset(images, 2000, seed=3)
    assert np.bincount(subset.labels).tolist() == [1500, 495, 5]
    assert subset.paths == [f"{i}.jpg" for i in range(4000) if f"{i}.jpg" in set(subset.paths)]  # in list order
    assert all(images.labels[int(p.split(".")[0])] == label for p, label in zip(subset.paths, subset.labels))
    assert stratified_subset(images, 2000, seed=3) == subset != stratified_subset(images, 2000, seed=4)
    assert stratified_subset(images, 0) is images and stratified_subset(images, 4000) is images
