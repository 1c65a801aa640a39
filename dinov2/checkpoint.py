"""Resumable training checkpoints (torch.distributed.checkpoint) and the release-format teacher export (scored, one
after another, by ``python -m dinov2.eval.checkpoints``).

Layout of `ckpt_dir` (normally `<output_dir>/checkpoints`)::

    000001500/              one complete checkpoint per saved iteration (9-digit folder name)
        .metadata, *.distcp     model and optimizer state, written by DCP: each rank writes its own shards, and any
                                number of ranks can load them (DCP reshards)
        extra_state.pt          rank 0's `extra_state` (must be the same on every rank) and the iteration
        rng_rank00000.pt ...    each rank's RNG states (python, numpy, torch, and the current CUDA device's)
        checksums_rank00000.json ...  the CRC-32 of every file above, each rank recording the files it wrote;
                                checked when the checkpoint is loaded (a flipped bit would otherwise resume silently)
    latest                  the name of the newest checkpoint folder, for people and scripts

A checkpoint is written to `tmp-<iteration>` and renamed to its final name by rank 0 only after every rank has
finished, so a numbered folder is always complete: a process killed while saving leaves a `tmp-*` folder that
`find_latest_checkpoint` ignores and the next save removes. Old checkpoints are deleted the same way (renamed to
`trash-*` first), so an interrupted deletion never leaves a half-deleted numbered folder behind.

Everything works with FSDP2-sharded and plain modules, with or without a process group.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dinov2.distributed import all_gather_objects, barrier, get_rank, get_world_size, raise_rank_0s_error
from dinov2.files import atomic_write, atomic_write_text, naming_the_file, nearly_full_note
# One error type for every checkpoint or weights file that cannot be loaded (the CLIs end it in one line).
from dinov2.hub.loader import CheckpointError

logger = logging.getLogger(__name__)

EXTRA_STATE_FILE = "extra_state.pt"
_CHECKSUMS_FILE = re.compile(r"^checksums_rank\d{5}\.json$")
_RNG_FILE = re.compile(r"^rng_rank(\d{5})\.pt$")
# the files a checkpoint writes, whose checksums it records (DCP's shards: __<rank>_<n>.distcp)
_CHECKPOINT_FILE = re.compile(r"^(\.metadata|extra_state\.pt|rng_rank\d{5}\.pt|__\d+_\d+\.distcp)$")
_CHECKSUM_CHUNK = 1 << 24
LATEST_FILE = "latest"
TEACHER_PARTS = ("backbone", "dino_head", "ibot_head")
_CHECKPOINT_NAME = re.compile(r"^\d{9}$")


class CheckpointDamagedError(CheckpointError):
    """A training checkpoint with a file that is damaged or missing (the one before it may load)."""


class CheckpointSaveError(OSError):
    """A training checkpoint that could not be written (a full disk, say); the checkpoints before it are kept."""


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it saves/loads in one process: without a process group that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _checksums_file(rank: int) -> str:
    return f"checksums_rank{rank:05d}.json"


def _crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes (about 2 GB/s)."""
    crc = 0
    with path.open("rb") as handle:
        while piece := handle.read(_CHECKSUM_CHUNK):
            crc = zlib.crc32(piece, crc)
    return crc


def _record_checksums(folder: Path, names: set[str], rank: int) -> None:
    """Write the CRC-32s of the checkpoint files ``names`` (those this rank wrote) to ``checksums_rank<rank>.json``,
    durably."""
    crcs = {name: _crc32(folder / name) for name in sorted(names)}
    path = folder / _checksums_file(rank)
    with naming_the_file(path), path.open("w", encoding="utf-8") as handle:
        json.dump(crcs, handle, indent=0, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _verify_checksums(path: Path) -> None:
    """Raise CheckpointDamagedError, on every rank alike, when a file of checkpoint ``path`` is missing, unreadable,
    without a recorded checksum or with another CRC-32 than the one recorded when it was saved; each rank reads a
    share of the files. A checkpoint saved before checksums were recorded (no checksums files) is loaded unchecked;
    files the checkpoint does not write (a user's note) are left alone. Call on every rank."""
    try:
        problems = _checksum_problems(path)
    except OSError as err:  # (a folder that cannot be listed: said on every rank, none left waiting for this one)
        problems = [f"{path} cannot be read ({err.strerror or err})"]
    found = sorted({problem for of_a_rank in all_gather_objects(problems) for problem in of_a_rank})
    if found:
        more = f" (and {len(found) - 1} more file(s))" if len(found) > 1 else ""
        raise CheckpointDamagedError(
            f"{found[0]}{more}; remove the folder {path} to resume from the checkpoint before it"
        )


def _checksum_problems(path: Path) -> list[str]:
    """What is wrong with the files of checkpoint ``path`` by their recorded checksums, as far as this rank checks
    them (its share); ``[]`` for a checkpoint without checksums."""
    present = sorted(p.name for p in path.iterdir() if p.is_file())
    checksums_files = [name for name in present if _CHECKSUMS_FILE.match(name)]
    if not checksums_files:
        return []
    problems: list[str] = []
    recorded: dict[str, int] = {}
    for name in checksums_files:
        try:
            crcs = json.loads((path / name).read_text(encoding="utf-8"))
        except OSError as err:
            problems.append(f"{path / name} cannot be read ({err.strerror or err})")
            continue
        except ValueError as err:
            crcs = f"not JSON: {err}"
        if not isinstance(crcs, dict) or not all(isinstance(crc, int) for crc in crcs.values()):
            problems.append(f"{path / name} is damaged ({crcs if isinstance(crcs, str) else 'not a record of CRCs'})")
            continue
        recorded.update(crcs)
    for rank_file in (name for name in present if _RNG_FILE.match(name)):
        record = _checksums_file(int(_RNG_FILE.match(rank_file)[1]))
        if record not in checksums_files:  # each rank records the files it wrote, its RNG states among them
            problems.append(f"{path / record} is missing")
    if problems:
        return problems
    ours = [name for name in present if _CHECKPOINT_FILE.match(name)]
    problems += [f"{path / name} has no recorded checksum" for name in ours if name not in recorded]
    for name in sorted(recorded)[get_rank() :: get_world_size()]:
        file = path / name
        try:
            if _crc32(file) != recorded[name]:
                problems.append(f"{file} is damaged (its CRC-32 is not the one recorded when it was saved)")
        except FileNotFoundError:
            problems.append(f"{file} is missing")
        except OSError as err:
            problems.append(f"{file} cannot be read ({err.strerror or err})")
    return problems


def _is_complete(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and (folder / EXTRA_STATE_FILE).is_file()


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name) and _is_complete(p)]
    return sorted(found, key=lambda p: int(p.name))


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_durably(obj: Any, path: Path) -> None:
    """``torch.save`` and fsync, so that the file is on disk before its folder is renamed into place."""
    with naming_the_file(path), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_small_file(path: Path) -> Any:
    """``torch.load`` (weights only) of a checkpoint's extra-state or RNG file; a damaged one is a CheckpointError."""
    try:
        return torch.load(path, weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise CheckpointDamagedError(
            f"{path} is damaged ({type(err).__name__}: {err}); remove the folder {path.parent} to resume from the "
            "checkpoint before it"
        ) from None


def _remove(folder: Path) -> None:
    """Delete a folder by renaming it to trash-* first (atomic), then removing it."""
    trash = folder.with_name(f"trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain containers (loadable with weights_only=True)."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (algorithm, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_loadable(extra_state: Mapping[str, Any]) -> None:
    """Fail at save time, on every rank alike, if `extra_state` could not be loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(dict(extra_state), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as err:
        raise TypeError(f"extra_state must hold only containers, numbers, strings and tensors: {err}") from None


def save_checkpoint(
    ckpt_dir: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: Mapping[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Save model, optimizer, `extra_state` and RNG states to `ckpt_dir/<iteration:09d>`; call on every rank.

    `extra_state` holds plain containers, numbers, strings and tensors (schedule and sampler positions, the grad
    scaler's state_dict, ...) and must be the same on every rank (rank 0's is stored). Keeps this checkpoint and the
    newest `keep_last - 1` others. Returns the checkpoint folder.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _check_loadable(extra_state or {})
    ckpt_dir = Path(ckpt_dir)
    name = f"{iteration:09d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f"tmp-{name}"
    rank = get_rank()
    error = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as err:
            error = CheckpointSaveError(f"cannot save the checkpoint of iteration {iteration} in {ckpt_dir}: {err}")
    raise_rank_0s_error(error)  # (every rank raises it, none waits for rank 0)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    own_error: BaseException | None = None  # (the cause of the error raised, for its traceback)
    try:
        with _single_process_is_intended():
            metadata = dcp.save(state, checkpoint_id=tmp, no_dist=_no_dist())
    except CheckpointException as err:  # (a BaseException), raised on every rank with every rank's failures
        if any(isinstance(error, KeyboardInterrupt) for _, error in _failures(err)):
            raise KeyboardInterrupt from None
        failures = _describe(_failures(err))
        own_error = err
    else:
        record = {"iteration": iteration, "world_size": get_world_size(), "extra_state": dict(extra_state or {})}
        try:
            _write_own_files(tmp, metadata, record)
            failed = None
        except Exception as err:  # (a full disk: an OSError, or PyTorch's archive writer's RuntimeError; any other
            failed = _describe([(rank, err)])  # error too, so that no rank waits for this one)
            own_error = err
        failures = "; ".join(f for f in all_gather_objects(failed) if f is not None)  # every rank learns of any
    if failures:
        full = nearly_full_note(ckpt_dir)  # (before the partial checkpoint's room is given back)
        barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            f"cannot save the checkpoint of iteration {iteration} in {ckpt_dir}: {full}{failures} (the checkpoints "
            "saved before it are kept: the same command resumes from the newest)"
        ) from own_error
    barrier()
    if rank == 0:
        try:
            _put_in_place(tmp, final, keep_last)
        except OSError as err:
            error = CheckpointSaveError(f"cannot put the checkpoint of iteration {iteration} in place: {err}")
        except Exception as err:  # (any other: raised on every rank alike)
            error = err
    raise_rank_0s_error(error)
    return final


def _put_in_place(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once every rank has written its part: rename the complete checkpoint ``tmp`` to ``final``, point
    ``latest`` at it and remove the checkpoints beyond the newest ``keep_last`` and any unfinished folders."""
    ckpt_dir = final.parent
    if final.exists():  # saving the same iteration again, e.g. right after a resume
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    atomic_write_text(ckpt_dir / LATEST_FILE, final.name + "\n")
    others = [p for p in _checkpoints(ckpt_dir) if p != final]  # the new one is kept even if not the highest
    for old in others[: max(len(others) - (keep_last - 1), 0)]:
        _remove(old)
    _remove_unfinished(ckpt_dir)
    logger.info("saved checkpoint %s", final)


def _write_own_files(tmp: Path, metadata: Any, record: dict[str, Any]) -> None:
    """After DCP's save into ``tmp``: this rank's RNG states (rank 0: also ``record``, as extra_state.pt) and the
    CRC-32s of the files this rank wrote (its DCP shards, ``__<rank>_*``; rank 0 also .metadata, extra_state.pt
    and any shard of a name that says no rank)."""
    rank = get_rank()
    _save_durably(_rng_state(), tmp / _rng_file(rank))
    shards = {info.relative_path for info in metadata.storage_data.values()}
    own = {shard for shard in shards if shard.startswith(f"__{rank}_")} | {_rng_file(rank)}
    if rank == 0:
        _save_durably(record, tmp / EXTRA_STATE_FILE)
        prefixes = tuple(f"__{other}_" for other in range(get_world_size()))
        own |= {".metadata", EXTRA_STATE_FILE} | {shard for shard in shards if not shard.startswith(prefixes)}
    _record_checksums(tmp, own, rank)


def _failures(err: CheckpointException) -> list[tuple[int, BaseException]]:
    """The (rank, exception) pairs of a failed DCP save or load: each failure is an exception or (in some PyTorch
    versions) a tuple of it and its traceback's frames."""
    return [(rank, failure[0] if isinstance(failure, tuple) else failure) for rank, failure in err.failures.items()]


def _describe(failures: list[tuple[int, BaseException]]) -> str:
    """``rank <r>: <type>: <message>`` for each (rank, exception) (the type too: ``str(EOFError())`` is empty)."""
    return "; ".join(f"rank {rank}: {type(error).__name__}: {error}" for rank, error in failures)


def _remove_unfinished(ckpt_dir: Path) -> None:
    """Delete the tmp-* folders of killed saves and the trash-* of interrupted deletions."""
    for leftover in ckpt_dir.glob("*-*"):
        if leftover.is_dir() and leftover.name.split("-", 1)[0] in ("tmp", "trash"):
            shutil.rmtree(leftover)


def tidy_checkpoints(ckpt_dir: str | Path, keep_last: int) -> None:
    """Finish what a run killed while saving its last checkpoint left undone (there is no later save to do it):
    `latest` names the newest complete checkpoint, the newest `keep_last` are kept, and unfinished folders go.
    Rank 0 only."""
    ckpt_dir = Path(ckpt_dir)
    found = _checkpoints(ckpt_dir)
    if not found:
        return
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file() or latest.read_text().strip() != found[-1].name:
        atomic_write_text(latest, found[-1].name + "\n")
    for old in found[: max(len(found) - keep_last, 0)]:
        _remove(old)
    _remove_unfinished(ckpt_dir)


def find_latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `ckpt_dir`, or None; unfinished `tmp-*` folders are ignored."""
    found = _checkpoints(Path(ckpt_dir))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint folder into `model` (and `optimizer`) on any number of ranks; return its `extra_state`.

    The returned dict is the saved `extra_state` plus `iteration`. Loading is strict: a model key missing from the
    checkpoint, an unexpected one, or a shape mismatch raises `CheckpointError`. Of the optimizer, the per-parameter
    state (step counts and moments, keyed by parameter name) is restored; its parameter groups and their settings
    (lr and weight-decay multipliers, betas, eps, kernel) stay those `optimizer` was built with from this run's
    config, so a changed setting takes effect on resume and a changed grouping (e.g. layer-wise decay switched on)
    loads too. With `restore_rng`, each rank restores the RNG states saved by the same rank (when the number of
    ranks changed, ranks without a saved state keep theirs). Call on every rank.
    """
    path = Path(path)
    _check_is_checkpoint(path)
    _verify_checksums(path)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": {"state": optim_state["state"]}}
    _check_model_keys(path, state["model"])
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    except CheckpointException as err:
        raise CheckpointError(
            f"{path}: cannot load into this model/optimizer: {_describe(_failures(err))} (if the folder is damaged, "
            "remove it to resume from the checkpoint before it)"
        ) from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        this_run_groups = optim_state["param_groups"]
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optimizer"]["state"], "param_groups": this_run_groups},
        )
    record = _load_small_file(path / EXTRA_STATE_FILE)
    if restore_rng:
        rng_file = path / _rng_file(get_rank())
        if rng_file.is_file():
            _set_rng_state(_load_small_file(rng_file))
        else:
            logger.warning(
                "%s has no RNG state for rank %d (saved by %d ranks)", path, get_rank(), record["world_size"]
            )
    logger.info("loaded %s (iteration %d, saved by %d ranks)", path, record["iteration"], record["world_size"])
    return {**record["extra_state"], "iteration": record["iteration"]}


def _check_is_checkpoint(path: Path) -> None:
    """Raise CheckpointError saying why `path` is not a complete checkpoint folder, and what was meant if that shows."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        if _is_complete(path.parent):
            hint = f"; the checkpoint is its folder {path.parent}"
        elif path.suffix in (".pth", ".pt"):  # a released backbone or a teacher_checkpoint.pth export
            hint = (
                f"; {path.name} looks like a weights file: to start a training from its backbone (with new heads and "
                f"a fresh schedule), use student.pretrained_weights={path} instead of MODEL.WEIGHTS"
            )
        else:
            hint = ""
        raise CheckpointError(
            f"{path} is a file, but a training checkpoint is a folder (<output_dir>/checkpoints/NNNNNNNNN, holding "
            f".metadata and {EXTRA_STATE_FILE}){hint}"
        )
    if not _is_complete(path):
        newest = find_latest_checkpoint(path) or find_latest_checkpoint(path / "checkpoints")
        hint = f"; the newest checkpoint in it is {newest}" if newest else ""
        raise CheckpointError(f"{path} is not a complete checkpoint (expected .metadata and {EXTRA_STATE_FILE}){hint}")


def _check_model_keys(path: Path, model_state: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped model keys."""
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # a damaged pickle raises almost anything (TypeError, ModuleNotFoundError, ...)
        raise CheckpointDamagedError(
            f"{path / '.metadata'} cannot be read: damaged, or written by an incompatible PyTorch "
            f"({type(err).__name__}: {err}); if it is damaged, remove the folder {path} to resume from the "
            "checkpoint before it"
        ) from None
    saved = {
        key[len("model.") :]: meta for key, meta in metadata.state_dict_metadata.items() if key.startswith("model.")
    }
    problems = []
    missing = sorted(set(model_state) - set(saved))
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:10]}")
    unexpected = sorted(set(saved) - set(model_state))
    if unexpected:
        problems.append(f"not in this model: {unexpected[:10]}")
    mis_shaped = [
        f"{key} {tuple(saved[key].size)} in the checkpoint vs {tuple(value.shape)} here"
        for key, value in model_state.items()
        if key in saved and isinstance(value, torch.Tensor) and hasattr(saved[key], "size")
        and tuple(saved[key].size) != tuple(value.shape)
    ]
    if mis_shaped:
        problems.append(f"different shapes: {mis_shaped[:10]}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model; model keys " + "; ".join(problems))


def export_teacher(path: str | Path, teacher: nn.Module) -> Path | None:
    """Write the teacher as DinoBloom's release file `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`.

    Full float32 tensors on CPU, keys ordered backbone, dino_head, ibot_head; rank 0 writes the file atomically, and
    removes what an export killed while writing it left (call it under the run's lock). Call on every rank (the full
    tensors are gathered from all of them). Returns the path on rank 0, None elsewhere.
    """
    path = Path(path)
    # Checked on every rank before the collective gather, so that no rank is left waiting for the others.
    stray = [key for key in teacher.state_dict() if key.split(".", 1)[0] not in TEACHER_PARTS]
    if stray:
        raise ValueError(f"the teacher must hold only {', '.join(TEACHER_PARTS)}; unexpected keys {stray[:10]}")
    state = get_model_state_dict(teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    written: Path | None = None
    error: Exception | None = None
    if get_rank() == 0:
        try:
            written = _write_export(path, state)
        except (OSError, RuntimeError) as err:  # (PyTorch's archive writer reports a full disk as a RuntimeError)
            cause = err.strerror if isinstance(err, OSError) and err.filename == str(path) else err  # (path once)
            error = CheckpointSaveError(
                f"cannot write the teacher export {path}: {nearly_full_note(path.parent)}{type(err).__name__}: {cause}"
            )
        except Exception as err:  # (any other: raised on every rank alike)
            error = err
    raise_rank_0s_error(error)  # (the other ranks raise it too, instead of waiting for rank 0)
    return written


def _write_export(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Rank 0: write the gathered teacher ``state`` as the release file ``path`` (float32 on the CPU, parts in
    order)."""
    ordered = {
        key: (value.detach().to("cpu", torch.float32) if value.is_floating_point() else value.detach().cpu())
        for part in TEACHER_PARTS
        for key, value in state.items()
        if key.split(".", 1)[0] == part
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # The run's lock keeps other writers away: any temporary copy here is a killed export's, full-size, and goes.
    written = atomic_write(path, lambda tmp: torch.save({"teacher": ordered}, tmp), sole_writer=True)
    logger.info("exported the teacher (%d tensors) to %s", len(ordered), path)
    return written
