"""Process groups, FSDP2 equivalence, and DCP checkpoints across rank counts (gloo, 2 CPU processes).

The multi-process tests start 2 ranks with `torch.multiprocessing.spawn`; a failed assertion in a rank fails the test
with that rank's traceback.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import signal
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import dinov2.checkpoint as checkpoint_module
import dinov2.files
from conftest import spawn_ranks
from dinov2 import distributed
from dinov2.cli import run_cli
from dinov2.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    export_teacher,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dinov2.configs import ConfigError, load_config
from dinov2.distributed import enable_distributed, expand_nodelist
from dinov2.layers import DINOHead
from dinov2.models import DinoVisionTransformer
from dinov2.parallel import (
    autocast_dtype,
    build_grad_scaler,
    clip_grad_norm,
    parallelize_from_config,
    parallelize_model,
)
from dinov2.train.optim import apply_optim_scheduler, build_optimizer, build_param_groups

WORLD = 2
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
                 "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_STEP_NUM_NODES")
FP32 = ["train.precision=fp32", "optim.layerwise_decay=0.9", "ibot.separate_head=true"]


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 was applied to ``module`` or to one of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _free_port(low: int = 10000, high: int = 30000) -> int:
    """A free TCP port in [low, high) (the range SLURM job ids map to)."""
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _set_env(variables: dict[str, str]) -> None:
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(variables)


def _torchrun_env(rank: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _slurm_env(rank: int, port: int) -> dict[str, str]:
    # The first host of the node list is the master; the port comes from the job id (10000 + id % 20000).
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": str(WORLD),
            "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_ID": str(port - 10000 + 20000 * 7), "SLURM_NNODES": "1"}


def _parts(seed: int, with_ibot: bool = True) -> nn.ModuleDict:
    """A tiny student or teacher: ViT (2 blocks, LayerScale) with DINO and iBOT heads."""
    torch.manual_seed(seed)
    parts = {
        "backbone": DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=0.5),
        "dino_head": DINOHead(32, 24, hidden_dim=16, bottleneck_dim=8),
    }
    if with_ibot:
        parts["ibot_head"] = DINOHead(32, 20, hidden_dim=16, bottleneck_dim=8)
    return nn.ModuleDict(parts)


def _loss(student: nn.ModuleDict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in objective touching every part; returns (loss, cls tokens)."""
    features = student["backbone"].forward_features(images)
    cls, patches = features["x_norm_clstoken"], features["x_norm_patchtokens"]
    loss = student["dino_head"](cls).logsumexp(-1).mean() + student["ibot_head"](patches).square().mean()
    return loss, cls


def _images(step: int) -> torch.Tensor:
    return torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(100 + step))


def _train_step(student: nn.ModuleDict, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> tuple[torch.Tensor, list]:
    apply_optim_scheduler(optimizer, lr=1e-2, wd=0.04, last_layer_lr=5e-3)
    optimizer.zero_grad(set_to_none=True)
    loss, cls = _loss(student, images)
    loss.backward()
    norms = [clip_grad_norm(part.parameters(), 0.05) for part in student.values()]
    optimizer.step()
    return cls.detach(), norms


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _fsdp_worker(rank: int, port: int, strategy: str) -> None:
    _set_env(_torchrun_env(rank, port))
    info = enable_distributed(device="cpu")
    try:
        assert (info.launcher, info.rank, info.world_size, info.backend) == ("torchrun", rank, WORLD, "gloo")
        assert distributed.get_world_size() == WORLD and distributed.is_main_process() == (rank == 0)
        assert distributed.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        cfg = load_config(None, FP32)
        student, reference = _parts(seed=0), _parts(seed=0)
        names = [name for name, _ in student.named_parameters()]
        parallelize_model(student, sharding_strategy=strategy, activation_checkpointing=True)
        assert _is_sharded(student) and not _is_sharded(reference)
        assert [name for name, _ in student.named_parameters()] == names  # keys unchanged by FSDP2 and checkpointing
        assert all(isinstance(p, DTensor) for p in student.parameters())
        optimizer = build_optimizer(build_param_groups(student, cfg), cfg)
        ref_optimizer = build_optimizer(build_param_groups(reference, cfg), cfg)
        for step in range(2):
            images = _images(step)
            # Each rank sees half the batch; FSDP2 averages gradients, which equals the full-batch mean.
            cls, norms = _train_step(student, optimizer, images.chunk(WORLD)[rank])
            ref_cls, ref_norms = _train_step(reference, ref_optimizer, images)
            torch.testing.assert_close(cls, ref_cls.chunk(WORLD)[rank], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), atol=1e-5, rtol=1e-5)
            for (name, p), q in zip(student.named_parameters(), reference.parameters()):
                torch.testing.assert_close(_full(p), q, atol=2e-6, rtol=1e-5, msg=f"step {step}: {name}")
        # A teacher (forward only) is laid out like the student after its forward, so the EMA update applies.
        teacher, ref_teacher = _parts(seed=1), _parts(seed=1)
        parallelize_model(teacher, sharding_strategy=strategy, reshard_after_forward=True)
        with torch.no_grad():
            teacher["backbone"].forward_features(_images(0).chunk(WORLD)[rank])
            assert [p.placements for p in teacher.parameters()] == [p.placements for p in student.parameters()]
            for ema, source in ((teacher, student), (ref_teacher, reference)):
                torch._foreach_mul_(list(ema.parameters()), 0.99)
                torch._foreach_add_(list(ema.parameters()), list(source.parameters()), alpha=0.01)
        for (name, p), q in zip(teacher.named_parameters(), ref_teacher.parameters()):
            torch.testing.assert_close(_full(p), q, atol=2e-6, rtol=1e-5, msg=f"EMA: {name}")
        distributed.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        distributed.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp2_two_ranks_match_one(strategy: str) -> None:
    """Forward, gradient norms and optimizer steps of 2 FSDP2 ranks equal the unsharded model on the full batch."""
    spawn_ranks(_fsdp_worker, (_free_port(), strategy), WORLD)


def _model(seed: int) -> nn.ModuleDict:
    """What a trainer checkpoints: student, teacher and a loss module with a centre buffer."""
    loss = nn.Module()
    loss.register_buffer("center", torch.zeros(1, 24))
    return nn.ModuleDict({"student": _parts(seed), "teacher": _parts(seed + 1000), "dino_loss": loss})


def _build(cfg, seed: int) -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    model = _model(seed)
    for p in model["teacher"].parameters():
        p.requires_grad_(False)
    device = torch.device("cpu")
    parallelize_from_config(model["student"], cfg, "student", device)
    parallelize_from_config(model["teacher"], cfg, "teacher", device)
    return model, build_optimizer(build_param_groups(model["student"], cfg), cfg)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    options = StateDictOptions(full_state_dict=True)
    state = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)["state"]
    return state


def _checkpoint_worker(rank: int, port: int, ckpt_dir: str) -> None:
    _set_env(_slurm_env(rank, port))
    info = enable_distributed(device="cpu")
    try:
        assert (info.launcher, info.master_addr, info.master_port) == ("slurm", "127.0.0.1", port)
        cfg = load_config(None, FP32)
        model, optimizer = _build(cfg, seed=0)
        _train_step(model["student"], optimizer, _images(0).chunk(WORLD)[rank])
        model["dino_loss"].center.fill_(0.25)
        saved = save_checkpoint(ckpt_dir, 7, model, optimizer, {"sampler": {"position": 840}}, keep_last=2)
        draws = torch.rand(3)  # what this rank's RNG gives right after saving
        export_teacher(Path(ckpt_dir) / "teacher.pth", model["teacher"])
        expected = _full_state(model, optimizer)
        if rank == 0:
            torch.save({"state": expected["model"], "draws": draws}, Path(ckpt_dir) / "expected.pt")

        # Load on 2 ranks into a differently initialised model: identical tensors, RNG and optimizer state.
        torch.manual_seed(12345)
        loaded_model, loaded_optimizer = _build(cfg, seed=1)
        extra = load_checkpoint(saved, loaded_model, loaded_optimizer)
        assert extra == {"sampler": {"position": 840}, "iteration": 7}
        torch.testing.assert_close(torch.rand(3), draws, atol=0, rtol=0)
        loaded = _full_state(loaded_model, loaded_optimizer)
        torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
        # A resumed step equals the uninterrupted one.
        _train_step(model["student"], optimizer, _images(1).chunk(WORLD)[rank])
        _train_step(loaded_model["student"], loaded_optimizer, _images(1).chunk(WORLD)[rank])
        torch.testing.assert_close(_full_state(loaded_model)["model"], _full_state(model)["model"], atol=0, rtol=0)
        # One flipped bit in a shard that rank 0 checks: both ranks refuse the checkpoint alike (none waits for the
        # other in DCP's load), with the same message.
        shard = saved / "__1_0.distcp"
        intact = shard.read_bytes()
        distributed.barrier()
        if rank == 0:
            shard.write_bytes(intact[:100] + bytes([intact[100] ^ 1]) + intact[101:])
        distributed.barrier()
        with pytest.raises(CheckpointError, match=re.escape(f"{shard} is damaged (its CRC-32 is not the one")):
            load_checkpoint(saved, loaded_model, loaded_optimizer)
        distributed.barrier()
        if rank == 0:
            shard.write_bytes(intact)
        # A write that fails on one rank only (its RNG file, on a full disk): every rank ends in the same error, none
        # waits for the others, and the partial checkpoint is removed.
        save_durably = checkpoint_module._save_durably

        def full_on_rank_1(obj: object, path: Path) -> None:
            if rank == 1:
                raise OSError(28, "No space left on device")
            save_durably(obj, path)

        checkpoint_module._save_durably = full_on_rank_1
        try:
            with pytest.raises(CheckpointSaveError, match=re.escape(
                "cannot save the checkpoint of iteration 9 in " f"{ckpt_dir}: rank 1: OSError: [Errno 28] No space "
                "left on device (the checkpoints saved before it"
            )):  # fmt: skip
                save_checkpoint(ckpt_dir, 9, model, optimizer, keep_last=2)
        finally:
            checkpoint_module._save_durably = save_durably
        distributed.barrier()
        assert sorted(path.name for path in Path(ckpt_dir).iterdir() if path.is_dir()) == ["000000007"]
        # What rank 0 does alone at the end (here: `latest` on a full disk) ends every rank alike, too.
        write_text = checkpoint_module.atomic_write_text

        def full_for_latest(path: Path, text: str) -> Path:
            raise OSError(28, "No space left on device", str(path))

        checkpoint_module.atomic_write_text = full_for_latest
        try:
            with pytest.raises(CheckpointSaveError, match=re.escape(
                f"cannot put the checkpoint of iteration 9 in place: [Errno 28] No space left on device: "
                f"'{Path(ckpt_dir) / 'latest'}'"
            )):  # fmt: skip
                save_checkpoint(ckpt_dir, 9, model, optimizer, keep_last=2)
        finally:
            checkpoint_module.atomic_write_text = write_text
        distributed.barrier()
        if rank == 0:
            shutil.rmtree(Path(ckpt_dir) / "000000009")  # (complete, but left out of the later tests)
        distributed.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by 2 FSDP2 ranks (the ranks also check that it loads back on 2 ranks)."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    spawn_ranks(_checkpoint_worker, (_free_port(), str(ckpt_dir)), WORLD)
    return ckpt_dir


@pytest.mark.slow
def test_two_rank_checkpoint_loads_on_two_ranks(two_rank_checkpoint: Path) -> None:
    assert (two_rank_checkpoint / "000000007" / "rng_rank00001.pt").is_file()
    assert (two_rank_checkpoint / "latest").read_text().strip() == "000000007"


@pytest.mark.slow
def test_two_rank_checkpoint_loads_on_one_rank(two_rank_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    expected = torch.load(two_rank_checkpoint / "expected.pt", weights_only=True)
    model, optimizer = _build(load_config(None, FP32), seed=3)
    extra = load_checkpoint(find_latest_checkpoint(two_rank_checkpoint), model, optimizer)
    assert extra["iteration"] == 7 and extra["sampler"] == {"position": 840}
    torch.testing.assert_close(_full_state(model)["model"], expected["state"], atol=0, rtol=0)
    torch.testing.assert_close(torch.rand(3), expected["draws"], atol=0, rtol=0)  # rank 0's RNG
    # The model alone (no optimizer), as evaluation would load it.
    plain = _model(seed=4)
    load_checkpoint(two_rank_checkpoint / "000000007", plain, restore_rng=False)
    assert torch.equal(plain["dino_loss"].center, torch.full((1, 24), 0.25))


@pytest.mark.slow
def test_a_two_rank_checkpoint_missing_a_ranks_checksums_or_unreadable_is_refused(
    two_rank_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank records the checksums of the files it wrote: without rank 1's record, its files are unchecked,
    which is refused, not skipped; a file that cannot be read while it is checked (a failing disk) is named."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    copy = tmp_path / "000000007"
    shutil.copytree(two_rank_checkpoint / "000000007", copy)
    model, optimizer = _build(load_config(None, FP32), seed=3)
    (copy / "notes.txt").write_text("a user's note: not part of the checkpoint, left alone")
    assert load_checkpoint(copy, model, optimizer)["iteration"] == 7
    (copy / "checksums_rank00001.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(
        f"{copy / 'checksums_rank00001.json'} is missing; remove the folder {copy} to resume"
    )):  # fmt: skip
        load_checkpoint(copy, model, optimizer)
    (copy / "checksums_rank00001.json").write_text('{"__1_0.distcp": 12, "rng_rank00001.pt": "not a CRC"}')
    with pytest.raises(CheckpointError, match=re.escape(
        f"{copy / 'checksums_rank00001.json'} is damaged (not a record of CRCs); remove the folder"
    )):  # fmt: skip
        load_checkpoint(copy, model, optimizer)
    shutil.copy(two_rank_checkpoint / "000000007" / "checksums_rank00001.json", copy)
    recorded = json.loads((copy / "checksums_rank00001.json").read_text())
    (copy / "checksums_rank00001.json").write_text(json.dumps({"rng_rank00001.pt": recorded["rng_rank00001.pt"]}))
    with pytest.raises(CheckpointError, match=re.escape(f"{copy / '__1_0.distcp'} has no recorded checksum; remove")):
        load_checkpoint(copy, model, optimizer)  # (a record whose line was lost: its shard is not left unchecked)
    shutil.copy(two_rank_checkpoint / "000000007" / "checksums_rank00001.json", copy)
    crc32 = checkpoint_module._crc32

    def failing_disk(path: Path) -> int:
        if path.name == "extra_state.pt":
            raise OSError(5, "Input/output error")
        return crc32(path)

    monkeypatch.setattr(checkpoint_module, "_crc32", failing_disk)
    with pytest.raises(CheckpointError, match=re.escape(f"{copy / 'extra_state.pt'} cannot be read (Input/output "
                                                        "error); remove the folder")):  # fmt: skip
        load_checkpoint(copy, model, optimizer)


@pytest.mark.slow
def test_export_from_two_ranks_is_the_release_format(two_rank_checkpoint: Path) -> None:
    exported = torch.load(two_rank_checkpoint / "teacher.pth", weights_only=True)
    expected = {k[len("teacher."):]: v for k, v in
                torch.load(two_rank_checkpoint / "expected.pt", weights_only=True)["state"].items() if k.startswith("teacher.")}
    assert list(exported) == ["teacher"]
    teacher = exported["teacher"]
    prefixes = [key.split(".", 1)[0] for key in teacher]
    assert prefixes == sorted(prefixes, key=["backbone", "dino_head", "ibot_head"].index)  # grouped in this order
    assert set(prefixes) == {"backbone", "dino_head", "ibot_head"}
    assert teacher.keys() == expected.keys()
    assert all(v.dtype == torch.float32 and not isinstance(v, DTensor) for v in teacher.values())
    torch.testing.assert_close(teacher, expected, atol=0, rtol=0)
    assert teacher["dino_head.last_layer.weight_g"].shape == (24, 1)


def test_single_process_has_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    info = enable_distributed(device="cpu")
    assert (info.launcher, info.world_size, info.backend, info.is_distributed) == ("single", 1, None, False)
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    distributed.barrier()
    value = torch.tensor([3, 5])
    mean = distributed.all_reduce_mean(value)
    assert mean.dtype == torch.float64 and torch.equal(mean, torch.tensor([3.0, 5.0], dtype=torch.float64))
    assert distributed.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        distributed.get_device("tpu")


def test_slurm_batch_step_runs_as_one_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # python run straight from an sbatch script of 4 tasks: SLURM sets the job's variables but no step's.
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "123",
                        "SLURM_JOB_NODELIST": "node[1-4]"}.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="dinov2.distributed"):
        info = enable_distributed(device="cpu")
    assert (info.launcher, info.world_size, info.is_distributed) == ("single", 1, False)
    assert "one process in a SLURM job of 4 tasks" in caplog.text and "srun" in caplog.text
    # a task other than 0 without a step size cannot be a batch step: refuse rather than run as rank 0 again
    monkeypatch.setenv("SLURM_PROCID", "3")
    with pytest.raises(distributed.LaunchEnvironmentError, match="SLURM_PROCID=3 without SLURM_STEP_NUM_TASKS"):
        enable_distributed(device="cpu")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu5,cpu[9-10]", ["gpu5", "cpu9", "cpu10"]),
        ("r[1-2]-n[3-4]", ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]),
        ("single", ["single"]),
    ],
)
def test_expand_slurm_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_slurm_steps_of_one_job_get_their_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two srun steps of one allocation on one node (e.g. two 4-GPU runs) must not rendezvous on one port."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "gpu01",
                        "SLURM_JOB_ID": "5150"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    ports = []
    for step in ("0", "1"):
        monkeypatch.setenv("SLURM_STEP_ID", step)
        launcher, *_, addr, port = distributed._read_launcher_env()
        assert (launcher, addr) == ("slurm", "gpu01") and 10000 <= port < 30000  # below Linux's outgoing ports
        ports.append(port)
    assert ports[0] == 15150 and ports[1] != ports[0]  # step 0 keeps the job's port, as sbatch_train.sh uses it
    monkeypatch.setenv("MASTER_PORT", "29500x")
    with pytest.raises(distributed.LaunchEnvironmentError, match=r"MASTER_PORT='29500x' is not an integer"):
        distributed._read_launcher_env()


def test_more_local_ranks_than_gpus_is_said(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="dinov2.distributed"):
        assert distributed.get_device("auto", local_rank=1) == torch.device("cuda", 1)
        assert not caplog.text
        assert distributed.get_device("auto", local_rank=2) == torch.device("cuda", 0)
    assert "local rank 2 but only 2 GPU(s) visible: it shares cuda:0" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM's GPU binding: each task sees its own GPU
    monkeypatch.setenv("SLURM_STEP_GPUS", "5")
    with caplog.at_level(logging.WARNING, logger="dinov2.distributed"):
        assert distributed.get_device("cuda", local_rank=5) == torch.device("cuda", 0)
    assert not caplog.text
    # torchrun (inside a SLURM GPU job too) starts more processes than the GPUs it shows them: an error, at once
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "77")
    with pytest.raises(distributed.DeviceUnavailableError, match="torchrun --nproc_per_node must not exceed"):
        distributed.get_device("auto", local_rank=1)


def test_a_half_set_torchrun_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """WORLD_SIZE=2 without RANK (or RANK=1 without WORLD_SIZE) used to run as a single process, unsaid; a lone
    WORLD_SIZE=1 or RANK=0, as some notebooks export, is one process indeed."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value, other in (("WORLD_SIZE", "2", "RANK"), ("RANK", "1", "WORLD_SIZE")):
        monkeypatch.setenv(name, value)
        with pytest.raises(distributed.LaunchEnvironmentError, match=f"{name}={value} is set but {other} is not"):
            distributed._read_launcher_env()
        monkeypatch.delenv(name)
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
        assert distributed._read_launcher_env()[0] == "single"
        monkeypatch.delenv(name)
    # both set by hand, without the rendezvous address: the command line's one error line, with the way out
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: distributed.enable_distributed(device="cpu"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: torchrun: world size 2 but MASTER_ADDR/MASTER_PORT are unknown: start "
                                       "the processes with torchrun or srun, which set them, or set both\n")


def test_nccls_refusal_of_two_ranks_on_one_gpu_gets_the_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With device_id NCCL starts at once and refuses a GPU shared by two ranks itself: its error gets our remedy."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "12345"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "get_device", lambda preference, local_rank: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def nccl_refuses(**kwargs: Any) -> None:
        raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1234, invalid usage\nLast error:\n"
                                    "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000")  # fmt: skip

    monkeypatch.setattr(dist, "init_process_group", nccl_refuses)
    with pytest.raises(distributed.DeviceUnavailableError) as raised:
        distributed.enable_distributed()
    assert str(raised.value).startswith("two ranks of one machine got one GPU (Duplicate GPU detected : rank 1 and")
    assert "--gpus-per-task=1" in str(raised.value)


def test_two_ranks_of_one_machine_on_one_gpu_are_named() -> None:
    """srun --gpu-bind=closest shows local ranks 0 and 4 of an 8-GPU node the same 4 GPUs: both take cuda:0. The
    ranks' (host, GPU) records say so before NCCL fails; one GPU per rank, also on two machines, is fine."""
    fine = [("gpu01", "GPU-a"), ("gpu01", "GPU-b"), ("gpu02", "GPU-a"), ("gpu02", "GPU-b")]
    assert distributed.shared_gpu_problem(fine) is None
    closest = [("gpu01", f"GPU-{'abcdabcd'[rank]}") for rank in range(8)]
    problem = distributed.shared_gpu_problem(closest)
    assert problem is not None and problem.startswith("ranks 0 and 4 on gpu01 both got GPU GPU-a")
    assert "--gpus-per-task=1" in problem


def test_bad_nodelist_is_named() -> None:
    with pytest.raises(ValueError, match=r"'a-b' in the SLURM node list 'n\[a-b\]'"):
        expand_nodelist("n[a-b]")


def test_single_process_parallelize_keeps_the_plain_model() -> None:
    model, reference = _parts(seed=0), _parts(seed=0)
    keys = list(model.state_dict())
    parallelize_model(model, sharding_strategy="FULL_SHARD", activation_checkpointing=True, compile=True)
    assert not _is_sharded(model) and list(model.state_dict()) == keys
    compiled = [*model["backbone"].blocks, model["dino_head"], model["ibot_head"]]
    assert all(module._compiled_call_impl is not None for module in compiled)
    # Checkpointed blocks give the same gradients (compiled blocks: tests/test_compiled_losses.py).
    for module in compiled:
        module._compiled_call_impl = None
    for m in (model, reference):
        _loss(m, _images(0))[0].backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="unknown sharding_strategy"):
        parallelize_model(_parts(seed=0), sharding_strategy="HYBRID")


def test_precision_settings() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    recipe = load_config(Path(__file__).parents[1] / "dinov2/configs/train/custom.yaml")
    assert autocast_dtype(recipe, cpu) == torch.float32  # auto: fp32 off CUDA
    assert autocast_dtype(recipe, cuda) == torch.float16  # auto on CUDA: the recipe's fp16
    assert autocast_dtype(load_config(None, ["train.precision=bf16"]), cpu) == torch.bfloat16
    assert build_grad_scaler(recipe, cpu) is None


def test_bf16_on_a_gpu_without_it_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^train.precision asks for bf16, which Tesla V100 does not support; set "):
        autocast_dtype(load_config(None, ["train.precision=bf16"]), cuda)
    with pytest.raises(ConfigError, match=r"param_dtype \(train.precision=auto\) asks for bf16"):
        autocast_dtype(load_config(None, ["compute_precision.student.backbone.mixed_precision.param_dtype=bf16"]), cuda)


def _ckpt_model() -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    cfg = load_config(None, FP32)
    model = _parts(seed=0, with_ibot=False)
    return model, build_optimizer(build_param_groups(model, cfg), cfg)


def test_keep_last_and_latest_pointer(tmp_path: Path) -> None:
    model, optimizer = _ckpt_model()
    for iteration in (5, 10, 15, 20, 25):
        save_checkpoint(tmp_path, iteration, model, optimizer, {"i": iteration}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000020", "000000025", "latest"]
    assert (tmp_path / "latest").read_text() == "000000025\n"
    assert find_latest_checkpoint(tmp_path) == tmp_path / "000000025"
    assert find_latest_checkpoint(tmp_path / "nothing") is None
    # A run restarted from scratch in the same folder: its new (lower) checkpoint is never the one deleted.
    save_checkpoint(tmp_path, 3, model, optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000003", "000000025", "latest"]


def test_extra_state_must_load_safely(tmp_path: Path) -> None:
    model, optimizer = _ckpt_model()
    with pytest.raises(TypeError, match="extra_state must hold only"):
        save_checkpoint(tmp_path, 1, model, optimizer, {"position": np.int64(3)})
    assert find_latest_checkpoint(tmp_path) is None


def test_unfinished_saves_are_ignored(tmp_path: Path) -> None:
    model, optimizer = _ckpt_model()
    save_checkpoint(tmp_path, 10, model, optimizer)
    (tmp_path / "tmp-000000030").mkdir()  # an interrupted save of a newer iteration
    (tmp_path / "tmp-000000030" / "__0_0.distcp").write_bytes(b"junk")
    (tmp_path / "000000040").mkdir()  # a numbered folder without DCP metadata is not a checkpoint either
    assert find_latest_checkpoint(tmp_path) == tmp_path / "000000010"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "000000040", model)
    save_checkpoint(tmp_path, 50, model, optimizer)
    assert not (tmp_path / "tmp-000000030").exists()  # the next save removes the leftovers


@contextmanager
def _files_limited_to(size: int) -> Iterator[None]:
    """Writing a file past ``size`` bytes fails in this process, as on a full disk (the size limit of ulimit -f)."""
    resource = pytest.importorskip("resource", reason="file size limits are POSIX's")
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    on_excess = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of ending the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, on_excess)


def test_a_save_that_fails_is_an_error_naming_the_cause_and_keeps_the_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (here past a file size limit) ends the save in one CheckpointSaveError naming the cause
    (DCP's CheckpointException is a BaseException, which `except Exception` would let pass), and saying when the
    disk is full, which PyTorch's archive writer does not; the partial checkpoint is removed, giving its room
    back, and the earlier ones stay. A Ctrl-C during the write is the KeyboardInterrupt it was."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _ckpt_model()
    save_checkpoint(tmp_path, 10, model, optimizer, {"i": 10})
    largest = max(path.stat().st_size for path in (tmp_path / "000000010").iterdir())
    with _files_limited_to(largest // 2), pytest.raises(CheckpointSaveError, match=re.escape(
        f"cannot save the checkpoint of iteration 20 in {tmp_path}: rank 0: RuntimeError: "
    )) as raised:  # fmt: skip
        save_checkpoint(tmp_path, 20, model, optimizer, {"i": 20})
    assert str(raised.value).endswith("(the checkpoints saved before it are kept: the same command resumes from the "
                                      "newest)")  # fmt: skip
    assert "file system is full" not in str(raised.value)  # (this disk has room)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["000000010", "latest"]

    full = shutil.disk_usage(tmp_path)._replace(free=3 << 20)
    monkeypatch.setattr(dinov2.files.shutil, "disk_usage", lambda path: full)
    small = full._replace(total=60 << 20, free=10 << 20)  # a 60 MiB file system with 10 MiB free: not full
    assert dinov2.files.nearly_full_note(tmp_path) == "its file system is full (3.1 MB free); "
    with monkeypatch.context() as patch:
        patch.setattr(dinov2.files.shutil, "disk_usage", lambda path: small)
        assert dinov2.files.nearly_full_note(tmp_path) == ""
    with _files_limited_to(largest // 2), pytest.raises(CheckpointSaveError, match=re.escape(
        f"in {tmp_path}: its file system is full (3.1 MB free); rank 0: RuntimeError: "
    )):  # fmt: skip
        save_checkpoint(tmp_path, 20, model, optimizer, {"i": 20})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["000000010", "latest"]

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, model, optimizer, {"i": 20})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "000000010"
    assert load_checkpoint(tmp_path / "000000010", model, optimizer)["i"] == 10


def test_a_bug_while_saving_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error while a rank writes its files ends the save on every rank alike (a CheckpointSaveError), and the
    error itself is its cause, so that DINOBLOOM_TRACEBACK=1 shows where a bug was raised."""
    model, optimizer = _ckpt_model()
    save_checkpoint(tmp_path, 10, model, optimizer, {"i": 10})

    def buggy(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(checkpoint_module, "_write_own_files", buggy)
    with pytest.raises(CheckpointSaveError, match="rank 0: TypeError: a bug") as raised:
        save_checkpoint(tmp_path, 20, model, optimizer, {"i": 20})
    assert isinstance(raised.value.__cause__, TypeError) and raised.value.__cause__.__traceback__ is not None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["000000010", "latest"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail as on a full disk")
def test_a_checkpoint_file_that_cannot_be_written_is_named() -> None:
    """A write that fails on a full disk names no file; the checkpoint's own writes name theirs."""
    with pytest.raises(OSError, match=re.escape("[Errno 28] No space left on device: '/dev/full'")):
        checkpoint_module._save_durably({"iteration": 3}, Path("/dev/full"))


def test_an_export_that_cannot_be_written_is_one_error_and_keeps_the_earlier_file(tmp_path: Path) -> None:
    """A teacher export that fails to write (a full disk) is a CheckpointSaveError naming the file; the export
    there before stays whole, and no temporary copy is left."""
    teacher = _parts(seed=0, with_ibot=False)
    path = tmp_path / "teacher_checkpoint.pth"
    export_teacher(path, teacher)
    before = path.read_bytes()
    with _files_limited_to(len(before) // 2), pytest.raises(CheckpointSaveError, match=re.escape(
        f"cannot write the teacher export {path}: RuntimeError: "
    )):  # fmt: skip
        export_teacher(path, teacher)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_damaged_checkpoint_file_is_named_with_the_way_out(tmp_path: Path) -> None:
    """A checkpoint file with one bit flipped (which DCP and torch.load would read unsaid), cut short or gone: the
    error names the file and says how to resume from the checkpoint before it (which then loads)."""
    model, optimizer = _ckpt_model()
    save_checkpoint(tmp_path, 10, model, optimizer)
    damaged = save_checkpoint(tmp_path, 20, model, optimizer)
    way_out = f"; remove the folder {damaged} to resume from the checkpoint before it"
    names = sorted(path.name for path in damaged.iterdir() if not path.name.startswith("checksums_"))
    assert names == [".metadata", "__0_0.distcp", "extra_state.pt", "rng_rank00000.pt"]
    for name in names:
        data = (damaged / name).read_bytes()
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        for changed in (bytes(flipped), data[: len(data) // 2]):
            (damaged / name).write_bytes(changed)
            with pytest.raises(CheckpointError) as raised:
                load_checkpoint(damaged, model, optimizer)
            assert str(raised.value) == (f"{damaged / name} is damaged (its CRC-32 is not the one recorded when it was "
                                         f"saved){way_out}")  # fmt: skip
        (damaged / name).write_bytes(data)
    (damaged / "rng_rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{damaged / 'rng_rank00000.pt'} is missing{way_out}")):
        load_checkpoint(damaged, model, optimizer)

    # A checkpoint saved without checksums (before they were recorded) still loads, and its damage is still named.
    legacy = save_checkpoint(tmp_path, 30, model, optimizer)
    for checksums in legacy.glob("checksums_*.json"):
        checksums.unlink()
    assert load_checkpoint(legacy, model, optimizer)["iteration"] == 30
    for name, cut in (("extra_state.pt", 0), ("rng_rank00000.pt", 40), (".metadata", 100)):
        data = (legacy / name).read_bytes()
        (legacy / name).write_bytes(data[:cut])
        start = f"{legacy / name} cannot be read: damaged" if name == ".metadata" else f"{legacy / name} is damaged ("
        with pytest.raises(CheckpointError, match=re.escape(start)) as raised:
            load_checkpoint(legacy, model, optimizer)
        assert str(raised.value).endswith(f"remove the folder {legacy} to resume from the checkpoint before it")
        (legacy / name).write_bytes(data)
    shard = next(legacy.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="remove it to resume from the checkpoint before it") as raised:
        load_checkpoint(legacy, model, optimizer)
    assert "FrameSummary" not in str(raised.value)  # the cause, not the repr of its traceback
    assert re.search(r"rank 0: \w+(Error|Exception)", str(raised.value))  # its type, too: str(EOFError()) is ''
    shutil.rmtree(legacy)
    shutil.rmtree(damaged)
    assert load_checkpoint(find_latest_checkpoint(tmp_path), model, optimizer)["iteration"] == 10


def test_loading_what_is_not_a_checkpoint_says_what_it_is(tmp_path: Path) -> None:
    """MODEL.WEIGHTS set to a mistyped path, a .pth export, a file inside a checkpoint or the folder of checkpoints:
    each error says what the path is and, where that shows, what was meant."""
    model, optimizer = _ckpt_model()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'nope'} does not exist")):
        load_checkpoint(tmp_path / "nope", model)

    # An export killed while writing left its copy, under a process id that a requeued job may hold again (ours).
    stale = tmp_path / "eval" / "training_9" / f".teacher_checkpoint.pth.tmp-{os.getpid()}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    export = export_teacher(tmp_path / "eval" / "training_9" / "teacher_checkpoint.pth", model)
    assert sorted(p.name for p in export.parent.iterdir()) == ["teacher_checkpoint.pth"]
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(export, model)
    assert str(raised.value) == (
        f"{export} is a file, but a training checkpoint is a folder (<output_dir>/checkpoints/NNNNNNNNN, holding "
        ".metadata and extra_state.pt); teacher_checkpoint.pth looks like a weights file: to start a training from "
        f"its backbone (with new heads and a fresh schedule), use student.pretrained_weights={export} instead of "
        "MODEL.WEIGHTS"
    )

    run = tmp_path / "run"
    newest = save_checkpoint(run / "checkpoints", 10, model, optimizer)
    with pytest.raises(CheckpointError, match=re.escape(f"; the checkpoint is its folder {newest}")):
        load_checkpoint(newest / "extra_state.pt", model)  # not mistaken for a weights file (.pt)
    for folder in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=re.escape(
            f"{folder} is not a complete checkpoint (expected .metadata and extra_state.pt); "
            f"the newest checkpoint in it is {newest}"
        )):
            load_checkpoint(folder, model)


def _killed_saver(ckpt_dir: str) -> None:
    """Save iteration 10, then die by SIGKILL in the middle of saving iteration 20 (all files written, no rename)."""
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    model, optimizer = _ckpt_model()
    save_checkpoint(ckpt_dir, 10, model, optimizer, {"tag": "first"})
    barriers = iter(range(100))

    def barrier_then_die() -> None:
        if next(barriers) == 0:  # the barrier after every rank has written its files
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_module.barrier = barrier_then_die
    optimizer.step()
    save_checkpoint(ckpt_dir, 20, model, optimizer, {"tag": "second"})


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    process = mp.get_context("spawn").Process(target=_killed_saver, args=(str(tmp_path),))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    assert (tmp_path / "tmp-000000020" / ".metadata").is_file()  # the killed save had written everything
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "000000010" and (tmp_path / "latest").read_text().strip() == "000000010"
    model, _ = _ckpt_model()
    assert load_checkpoint(latest, model, restore_rng=False)["tag"] == "first"


def test_load_names_mismatched_keys(tmp_path: Path) -> None:
    model, optimizer = _ckpt_model()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['ibot_head"):
        load_checkpoint(path, _parts(seed=0), restore_rng=False)
    with pytest.raises(CheckpointError, match=r"not in this model: \['dino_head"):
        load_checkpoint(path, nn.ModuleDict({"backbone": _parts(seed=0)["backbone"]}), restore_rng=False)
    wider = nn.ModuleDict({"backbone": _parts(seed=0)["backbone"], "dino_head": DINOHead(32, 30, hidden_dim=16, bottleneck_dim=8)})
    with pytest.raises(CheckpointError, match=r"dino_head.last_layer.weight_g \(24, 1\) in the checkpoint vs \(30, 1\)"):
        load_checkpoint(path, wider, restore_rng=False)


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def test_resume_keeps_moments_by_name_and_takes_group_settings_from_this_run(tmp_path: Path) -> None:
    """A run resumed with other optimizer settings (and so another grouping) uses them, with its saved moments."""
    cfg = load_config(None, FP32)
    model = _parts(seed=0)
    optimizer = build_optimizer(build_param_groups(model, cfg), cfg)
    _train_step(model, optimizer, _images(0))
    saved = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    path = save_checkpoint(tmp_path, 1, model, optimizer)

    changed = load_config(None, FP32 + ["optim.layerwise_decay=1.0", "optim.patch_embed_lr_mult=0.5",
                                        "optim.adamw_beta2=0.95"])
    resumed = _parts(seed=1)
    resumed_optimizer = build_optimizer(build_param_groups(resumed, changed), changed)
    assert len(resumed_optimizer.param_groups) < len(optimizer.param_groups)
    settings = _group_settings(resumed_optimizer)
    load_checkpoint(path, resumed, resumed_optimizer, restore_rng=False)

    assert _group_settings(resumed_optimizer) == settings
    assert {g["betas"] for g in resumed_optimizer.param_groups} == {(0.9, 0.95)}
    assert 0.5 in {g["lr_multiplier"] for g in resumed_optimizer.param_groups}
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(resumed_optimizer.state[p], saved[name], atol=0, rtol=0)
    _train_step(resumed, resumed_optimizer, _images(1))  # and it trains on


def test_export_orders_parts_and_casts_to_float32(tmp_path: Path) -> None:
    teacher = _parts(seed=0)
    reordered = nn.ModuleDict({"ibot_head": teacher["ibot_head"], "backbone": teacher["backbone"],
                               "dino_head": teacher["dino_head"]}).half()
    path = export_teacher(tmp_path / "eval" / "teacher_checkpoint.pth", reordered)
    exported = torch.load(path, weights_only=True)["teacher"]
    expected = {f"{part}.{k}": v.float() for part in ("backbone", "dino_head", "ibot_head")
                for k, v in reordered[part].state_dict().items()}
    assert list(exported) == list(expected)
    torch.testing.assert_close(exported, expected, atol=0, rtol=0)
    assert not list(tmp_path.glob("eval/.*"))  # no temporary file left behind
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'"):
        export_teacher(tmp_path / "bad.pth", nn.ModuleDict({"backbone": nn.Linear(2, 2), "extra": nn.Linear(2, 2)}))


def test_checkpoint_of_a_copy_is_independent(tmp_path: Path) -> None:
    """Activation checkpointing rebinds forward per module, so a deep copy runs its own parameters."""
    model = _parts(seed=0)
    parallelize_model(model, activation_checkpointing=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    out, out_clone = _loss(model, _images(0))[1], _loss(clone, _images(0))[1]
    assert not torch.allclose(out, out_clone)


def test_loading_keeps_this_runs_optimizer_kernel(tmp_path: Path) -> None:
    """A checkpoint saved with the other AdamW kernel (fused on GPU, foreach when sharded) keeps this run's kernel."""
    model, optimizer = _ckpt_model()
    fresh, fresh_optimizer = _ckpt_model()
    kernel = [(g["foreach"], g["fused"]) for g in fresh_optimizer.param_groups]
    for group in optimizer.param_groups:
        group["foreach"], group["fused"] = not group["foreach"], not group["fused"]  # the other kernel
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    load_checkpoint(path, fresh, fresh_optimizer, restore_rng=False)
    assert [(g["foreach"], g["fused"]) for g in fresh_optimizer.param_groups] == kernel
    assert all(g["lr_multiplier"] == h["lr_multiplier"] for g, h in zip(fresh_optimizer.param_groups, optimizer.param_groups))


def test_allow_tf32_matmul_sets_the_cuda_matmul_precision() -> None:
    """The training state on CUDA enables TF32 for float32 matmuls as DINOv2 does, readable by every getter."""
    from dinov2.parallel import allow_tf32_matmul

    before = torch.get_float32_matmul_precision()
    try:
        allow_tf32_matmul()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32  # the legacy getter still works (compile reads it)
    finally:
        torch.set_float32_matmul_precision(before)
