"""Process-group set-up from torchrun or SLURM (or none for a single process), and small rank helpers.

`enable_distributed` reads, in this order:

1. torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
   ``MASTER_PORT``);
2. SLURM's, for tasks started by ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, the
   first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` as master, a port derived from ``SLURM_JOB_ID``;
   ``MASTER_ADDR``/``MASTER_PORT`` win when set). Run one task per GPU. A batch script (or an ``salloc`` shell) that
   runs python directly is not an ``srun`` step: it runs as a single process, with a warning when the job has
   more tasks;
3. otherwise a single process.

With a world size of 1 no process group is created; every helper here works with or without one. The backend is
NCCL when the device is CUDA and gloo otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dinov2.configs import CHOICES

logger = logging.getLogger(__name__)

DEVICE_CHOICES = CHOICES["train.device"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ranks, world size, launcher, device and backend (None without a process group)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"
    device: torch.device
    backend: str | None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_distributed(self) -> bool:
        """True when a process group with more than one rank exists."""
        return self.backend is not None

    @property
    def is_main_process(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list in compact syntax, e.g. ``gpu[01-03,07],cpu5`` or ``r[1-2]-n[3-4]``."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        pieces: list[list[str]] = []
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if text:
                pieces.append([text])
            if ranges:
                pieces.append(_expand_ranges(ranges, nodelist))
        hosts += ["".join(parts) for parts in itertools.product(*pieces)]
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for part in ranges.split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            width = len(bounds[0])  # zero padding follows the lower bound, as SLURM writes it
            values += [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"cannot parse the range {part!r} in the SLURM node list {nodelist!r}")
    return values


def slurm_master_port(job_id: str, step_id: str = "0") -> int:
    """A port in [10000, 30000) that every task of a job step derives alike: ``10000 + (job + 7919 step) % 20000``.

    The step enters too: two steps of one allocation on one node (a sweep of two 4-GPU runs) must not share it. The
    range stays below 32768, where Linux starts the ports it gives outgoing connections, which could hold it.
    """
    job, step = (int(re.sub(r"\D", "", value) or 0) for value in (job_id, step_id))
    return 10000 + (job + 7919 * step) % 20000


class LaunchEnvironmentError(ValueError):
    """The launcher's environment variables (torchrun's, SLURM's) are missing, half set or malformed."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise LaunchEnvironmentError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError as err:
        raise LaunchEnvironmentError(f"environment variable {name}={value!r} is not an integer") from err


def _read_launcher_env() -> tuple[str, int, int, int, int, str | None, int | None]:
    """(launcher, rank, local_rank, world_size, local_world_size, master_addr, master_port) from the environment."""
    if ("RANK" in os.environ) != ("WORLD_SIZE" in os.environ):  # one of torchrun's pair: a launch half set up
        name, other = ("RANK", "WORLD_SIZE") if "RANK" in os.environ else ("WORLD_SIZE", "RANK")
        if _env_int(name) > (0 if name == "RANK" else 1):
            raise LaunchEnvironmentError(
                f"{name}={os.environ[name]} is set but {other} is not: start the processes with torchrun (or srun), "
                f"or unset {name} for one process"
            )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _env_int("WORLD_SIZE")
        return (
            "torchrun",
            _env_int("RANK"),
            _env_int("LOCAL_RANK", 0),
            world,
            _env_int("LOCAL_WORLD_SIZE", world),
            os.environ.get("MASTER_ADDR"),
            _env_int("MASTER_PORT") if os.environ.get("MASTER_PORT") else None,
        )
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" not in os.environ:
        # The batch step of a job: SLURM_NTASKS counts tasks that only srun would start.
        if os.environ["SLURM_PROCID"] != "0":
            raise LaunchEnvironmentError(
                f"SLURM_PROCID={os.environ['SLURM_PROCID']} without SLURM_STEP_NUM_TASKS: this launcher does not say "
                "how many tasks there are; start the training with srun or torchrun"
            )
        tasks = os.environ.get("SLURM_NTASKS", "1")
        if tasks != "1":
            logger.warning(
                "running as one process in a SLURM job of %s tasks: python was not started by srun; launch "
                "'srun python dinov2/train/train.py ...' (one task per GPU) or torchrun to use them all", tasks,
            )
    elif "SLURM_PROCID" in os.environ:
        world = _env_int("SLURM_STEP_NUM_TASKS")
        if world > 1:
            nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
            addr = os.environ.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else None)
            if addr is None:
                raise LaunchEnvironmentError("SLURM job with several tasks but no SLURM_JOB_NODELIST or MASTER_ADDR")
            port = (
                _env_int("MASTER_PORT")
                if os.environ.get("MASTER_PORT")
                else slurm_master_port(os.environ.get("SLURM_JOB_ID", "0"), os.environ.get("SLURM_STEP_ID", "0"))
            )
            n_nodes = _env_int("SLURM_STEP_NUM_NODES", _env_int("SLURM_NNODES", 1))
            return (
                "slurm",
                _env_int("SLURM_PROCID"),
                _env_int("SLURM_LOCALID", 0),
                world,
                max(world // max(n_nodes, 1), 1),
                addr,
                port,
            )
    return "single", 0, 0, 1, 1, None, None


class DeviceUnavailableError(ValueError):
    """The requested device does not exist here, or cannot run the requested number of processes."""


def get_device(preference: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this process: auto = cuda:LOCAL_RANK if CUDA is available, else mps (single process), else cpu."""
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {preference!r}")
    if local_rank is None:
        local_rank = _env_int("LOCAL_RANK", _env_int("SLURM_LOCALID", 0))
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("device 'cuda' was requested but CUDA is not available here; use auto or cpu")
        # Modulo: a scheduler that shows each process only its own GPU(s) (SLURM's GPU binding) leaves fewer devices
        # than local ranks; without such binding, more processes than GPUs would share them, which is said.
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: more processes than GPUs
            raise DeviceUnavailableError(
                f"local rank {local_rank} but only {n_gpus} GPU(s) visible: torchrun --nproc_per_node must not "
                "exceed the GPUs this machine shows its processes (CUDA_VISIBLE_DEVICES)"
            )
        if local_rank >= n_gpus and "SLURM_STEP_GPUS" not in os.environ and "SLURM_JOB_GPUS" not in os.environ:
            logger.warning(
                "local rank %d but only %d GPU(s) visible: it shares cuda:%d with another process; start at most "
                "one process per GPU (torchrun --nproc_per_node)", local_rank, n_gpus, local_rank % n_gpus,
            )
        return torch.device("cuda", local_rank % n_gpus)
    if preference == "mps" or (preference == "auto" and get_world_size() == 1 and _mps_available()):
        if not _mps_available():
            raise DeviceUnavailableError("device 'mps' was requested but MPS is not available here; use auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def enable_distributed(*, device: str = "auto", timeout: timedelta = timedelta(minutes=30)) -> DistInfo:
    """Create the process group described by the environment (none for one process) and pick this rank's device."""
    launcher, rank, local_rank, world, local_world, addr, port = _read_launcher_env()
    if world > 1 and device == "mps":
        raise DeviceUnavailableError("MPS does not support multi-process training; use device cpu or cuda")
    if world > 1 and device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    dev = get_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dist.is_initialized():
            backend = dist.get_backend()
        else:
            if addr is None or port is None:
                raise LaunchEnvironmentError(
                    f"{launcher}: world size {world} but MASTER_ADDR/MASTER_PORT are unknown: start the processes "
                    "with torchrun or srun, which set them, or set both"
                )
            # Other libraries (and torch's env:// rendezvous) read these.
            os.environ.update(
                MASTER_ADDR=addr,
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(local_rank),
            )
            try:
                dist.init_process_group(
                    backend=backend,
                    init_method="env://",
                    rank=rank,
                    world_size=world,
                    timeout=timeout,
                    device_id=dev if dev.type == "cuda" else None,
                )
            except Exception as err:  # NCCL refuses two ranks on one GPU as it starts (device_id: at once)
                if "Duplicate GPU" not in str(err):
                    raise
                nccl = next(line.strip() for line in str(err).splitlines() if "Duplicate GPU" in line)
                message = f"two ranks of one machine got one GPU ({nccl}): {SHARED_GPU_ADVICE}"
                raise DeviceUnavailableError(message) from err
        if dev.type == "cuda":
            _check_one_gpu_per_rank(dev)
    info = DistInfo(rank, local_rank, world, local_world, launcher, dev, backend, addr, port)
    logger.info(
        "%s: rank %d/%d (local %d), device %s, backend %s", launcher, rank, world, local_rank, dev, backend or "none"
    )
    return info


def _check_one_gpu_per_rank(dev: torch.device) -> None:
    """Refuse two ranks of one machine on one GPU where NCCL's start did not (a lazily started communicator)."""
    record = (socket.gethostname(), str(torch.cuda.get_device_properties(dev).uuid))
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    problem = shared_gpu_problem(records)
    if problem:
        raise DeviceUnavailableError(problem)


def shared_gpu_problem(records: Sequence[tuple[str, str]]) -> str | None:
    """What is wrong when two ranks' ``(host, GPU uuid)`` records, indexed by rank, are the same; else None."""
    first_rank: dict[tuple[str, str], int] = {}
    for rank, record in enumerate(records):
        if record in first_rank:
            host, gpu = record
            return f"ranks {first_rank[record]} and {rank} on {host} both got GPU {gpu}: {SHARED_GPU_ADVICE}"
        first_rank[record] = rank
    return None


#: Why two ranks of one machine can get one GPU, and the remedy.
SHARED_GPU_ADVICE = (
    "a process that sees only some of the machine's GPUs (e.g. srun --gpu-bind=closest) takes its local rank modulo "
    "their number; bind one GPU to each task (--gpus-per-task=1) or let every task see all of them"
)


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks, as a new floating-point tensor (a copy without a process group)."""
    result = tensor.detach().clone()
    if not result.is_floating_point():
        result = result.double()
    if get_world_size() > 1:
        dist.all_reduce(result)
        result /= get_world_size()
    return result


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's (picklable) ``value``, in rank order; ``[value]`` without a process group. Call on every rank."""
    if get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def raise_rank_0s_error(error: Exception | None) -> None:
    """Call on every rank after work that rank 0 alone did (``error``: what it raised there, or None): rank 0 raises
    its error, and every other rank one of the same type and message, instead of waiting at the next collective for
    a rank that has stopped. Without a process group, ``error`` is raised if given."""
    if get_world_size() > 1:
        shared: list[Any] = [None if error is None else (type(error), str(error))]
        if error is not None:
            try:
                pickle.dumps(type(error))
            except Exception:  # a class the other ranks could not import: its name goes with the message
                shared = [(RuntimeError, f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            kind, message = shared[0]
            try:
                error = kind(message)
            except Exception:  # a type whose constructor takes other arguments
                error = RuntimeError(f"rank 0: {message}")
    if error is not None:
        raise error


def destroy() -> None:
    """Destroy the process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
