"""Launch DinoBloom training on SLURM, or on this machine, through submitit.

Example (two machines with eight GPUs each):

    python -m dinov2.run.submit --nodes 2 --ngpus 8 --partition gpu \\
        --config-file dinov2/configs/train/custom.yaml --output-dir /scratch/dinobloom/run1 \\
        train.batch_size_per_gpu=64

Launcher flags (``--nodes``, ``--partition``, ...) default to ``configs/slurm/default.yaml``;
``--config-file``, ``--output-dir``, ``--no-resume`` and the ``key=value`` overrides go to
``dinov2.train.train.main`` exactly as ``train.py`` takes them. Each task of the job runs one
training process; ``TrainingJob`` turns submitit's job environment into the torchrun variables
that ``train.py`` reads.

Preemption and time limits: SLURM sends SIGUSR1 ``signal_delay_s`` seconds before the time
limit. ``train.py`` saves a checkpoint at the next iteration boundary, then hands the signal to
submitit, which calls ``TrainingJob.checkpoint`` and requeues the job; the requeued job runs the
same command, and ``train.py`` resumes from the last checkpoint in the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.distributed import slurm_master_port
from dinov2.logs import setup_logging

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "dinov2.run.submit needs submitit to launch jobs: pip install submitit"
    ) from error

logger = logging.getLogger(__name__)

DEFAULT_SLURM_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "slurm" / "default.yaml"
# train.py saves a checkpoint on SIGUSR1 before handing the signal over to submitit's own handler.
# submitit's default is SIGUSR2, so the signal is pinned both in the sbatch file and in the job.
PREEMPT_SIGNAL = "USR1"

# Launcher settings: name -> type; each one is a key of the SLURM yaml and a flag (dashes for underscores).
SETTINGS: dict[str, type] = {
    "nodes": int,
    "ngpus": int,
    "partition": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "comment": str,
    "exclude": str,
    "timeout": int,
    "cpus_per_task": int,
    "mem_gb": int,
    "signal_delay_s": int,
    "max_num_timeout": int,
}
SETTING_HELP = {
    "nodes": "machines per job",
    "ngpus": "GPUs per machine (one training process per GPU)",
    "partition": "SLURM partition",
    "account": "SLURM account",
    "qos": "SLURM quality of service",
    "constraint": "SLURM node features, e.g. a100",
    "comment": "SLURM job comment",
    "exclude": "nodes to avoid, e.g. gpu[01-03]",
    "timeout": "wall time per job in minutes",
    "cpus_per_task": "CPU cores per training process",
    "mem_gb": "memory per machine in GB (0 = all of it)",
    "signal_delay_s": "seconds before the time limit at which SIGUSR1 asks for a checkpoint",
    "max_num_timeout": "how many times a job that hit its time limit is requeued",
}


class LaunchError(ValueError):
    """A launch request that cannot be submitted, with the reason (a user's mistake: one ``error:`` line)."""


@dataclass(frozen=True)
class LaunchRequest:
    """Everything needed to submit one training job."""

    settings: dict[str, Any]
    train_argv: list[str]
    output_dir: Path
    job_dir: Path
    local: bool
    missing_inputs: list[str]  # settings naming files or folders that this machine does not have


class JobEnvironmentLike(Protocol):
    """The part of ``submitit.JobEnvironment`` that the launcher reads."""

    job_id: str
    global_rank: int
    local_rank: int
    num_tasks: int
    num_nodes: int
    hostnames: Sequence[str]


def resuming(argv: Sequence[str]) -> list[str]:
    """The training arguments of a requeued job: without ``--no-resume``, and with ``train.resume=true`` last (it
    overrides a ``train.resume=false`` of the command line or the config file), so that it resumes."""
    kept = [arg for arg in argv if arg != "--no-resume"]
    return kept if kept[-1:] == ["train.resume=true"] else [*kept, "train.resume=true"]  # (once, however often)


def torchrun_env(job_env: JobEnvironmentLike) -> dict[str, str]:
    """Return the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*) for one task."""
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(slurm_master_port(job_env.job_id)),  # as a task started by srun alone would derive it
    }


class TrainingJob(Checkpointable):
    """One task of a submitted training job: sets up torchrun variables, then runs train.py."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        """Run ``dinov2.train.train.main`` with this task's rank; return its exit status (0)."""
        from dinov2.train.train import main as train_main

        job_env = submitit.JobEnvironment()
        os.environ.update(torchrun_env(job_env))
        argv = list(self.argv)
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            # SLURM requeued the job by itself (preemption, node failure): resume rather than start over.
            argv = resuming(argv)
        logger.info("%s runs: train.py %s", job_env, " ".join(argv))
        status = train_main(argv)
        if status != 0:
            raise RuntimeError(f"training ended with exit status {status} (arguments: {argv})")
        return status

    def checkpoint(self) -> DelayedSubmission:
        """Requeue the same training; train.py resumes from the last checkpoint in its output dir."""
        return DelayedSubmission(TrainingJob(resuming(self.argv)))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser: launcher flags plus the training arguments of train.py."""
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.run.submit",
        description="Submit DinoBloom training to SLURM (or run it here with --local) through submitit.",
    )
    launcher = parser.add_argument_group("launcher (defaults from --slurm-config)")
    for name, kind in SETTINGS.items():
        launcher.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=SETTING_HELP[name])
    launcher.add_argument(
        "--slurm-config",
        type=Path,
        default=None,
        help=f"yaml with launcher settings, over the defaults of {DEFAULT_SLURM_CONFIG} (keys it leaves out keep them)",
    )
    launcher.add_argument("--job-dir", type=Path, default=None, help="submitit logs (default: OUTPUT_DIR/slurm/%%j)")
    launcher.add_argument("--local", action="store_true", help="run on this machine (no SLURM), one node")
    launcher.add_argument(
        "--no-path-check", action="store_true",
        help="submit even when the data or weights paths do not exist on this machine (only the nodes see them)",
    )
    training = parser.add_argument_group("training (passed to dinov2/train/train.py)")
    training.add_argument("--config-file", required=True, help="training config yaml")
    training.add_argument("--output-dir", default=None, help="checkpoints and logs (default: train.output_dir)")
    training.add_argument("--no-resume", action="store_true", help="start afresh (the requeued job resumes)")
    training.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def load_slurm_settings(path: Path) -> dict[str, Any]:
    """Read launcher defaults from a SLURM yaml; unknown keys and wrong types are errors naming the file."""
    if not path.is_file():
        where = (" (it is the repository's configs/slurm/default.yaml, which only a checkout or an editable install "
                 "has)" if path == DEFAULT_SLURM_CONFIG else "")  # fmt: skip
        raise LaunchError(f"SLURM config {path} not found{where}; pass --slurm-config FILE")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except (OmegaConfBaseException, OSError, yaml.YAMLError) as error:
        raise LaunchError(f"SLURM config {path}: cannot parse the YAML: {error}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LaunchError(f"SLURM config {path}: expected a mapping of settings, got {type(raw).__name__}")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SETTINGS:
            from dinov2.configs import closest_key

            close = closest_key(str(key), list(SETTINGS))
            hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(SETTINGS)}"
            raise LaunchError(f"SLURM config {path}: unknown key '{key}'{hint}")
        kind = SETTINGS[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise LaunchError(f"SLURM config {path}: '{key}' must be {kind.__name__} or null, got {value!r}")
        settings[key] = value
    return settings


def _validate_training_args(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Check the config file and overrides now rather than in the queue; return the output dir and the data and
    weights settings whose paths this machine does not have (none with ``--no-path-check``)."""
    from dinov2.configs import ConfigError, load_config

    config_file = Path(args.config_file).expanduser()
    if not config_file.is_file():
        raise LaunchError(f"--config-file {config_file}: no such file")
    malformed = [item for item in args.overrides if "=" not in item]
    if malformed:
        raise LaunchError(f"overrides must be key=value, got: {' '.join(malformed)}")
    try:
        cfg = load_config(str(config_file), list(args.overrides), resolve=False)  # ${oc.env:...}: the job's
    except ConfigError as error:
        raise LaunchError(f"--config-file {config_file}: {error}") from error
    # (`--output-dir=~/run` reaches us unexpanded: the shell expands ~ only at the start of a word)
    output_text = args.output_dir
    if output_text is None:
        try:
            output_text = cfg.train.output_dir
        except OmegaConfBaseException as error:  # e.g. ${oc.env:SCRATCH} set only inside jobs
            raise LaunchError(
                f"train.output_dir={OmegaConf.to_container(cfg.train)['output_dir']} cannot be resolved here "
                f"({str(error).splitlines()[0]}); the launcher writes the job's files there: pass --output-dir, or "
                "set the variable in this shell"
            ) from None
    output_dir = Path(output_text).expanduser()
    _check_dataset_setting(cfg)
    return output_dir, [] if args.no_path_check else _inputs_missing_here(cfg)


def _check_dataset_setting(cfg: DictConfig) -> None:
    """A LaunchError for an empty ``train.dataset_path`` or a malformed DinoBloom spelling of it (an interpolation,
    resolved in the job, is not checked): the job would fail when it starts."""
    from dinov2.data.datasets import DatasetError, dataset_source

    value = str(OmegaConf.to_container(cfg.train, resolve=False)["dataset_path"] or "")
    if "${" in value:
        return
    if not value:
        raise LaunchError("train.dataset_path is empty: name a folder of .txt image lists (or one .txt list)")
    try:
        dataset_source(value)
    except DatasetError as error:
        raise LaunchError(f"train.dataset_path: {error}") from None


def _inputs_missing_here(cfg: DictConfig) -> list[str]:
    """``key=value`` of the data and weights settings whose paths do not exist on this machine; values with
    ``${...}`` interpolations (resolved in the job) and URLs are not checked."""
    from dinov2.data.datasets import dataset_source
    from dinov2.hub.loader import is_url

    raw = OmegaConf.to_container(cfg, resolve=False)
    data = str(raw["train"]["dataset_path"] or "")
    paths = {
        "train.dataset_path": data if "${" in data else dataset_source(data)[0],  # (its spelling checked before)
        "evaluation.knn_data": raw["evaluation"]["knn_data"],
        "student.pretrained_weights": raw["student"]["pretrained_weights"],
        "MODEL.WEIGHTS": raw["MODEL"]["WEIGHTS"],
    }
    return [
        f"{key}={value}"
        for key, value in paths.items()
        if value and "${" not in str(value) and not is_url(str(value)) and not Path(str(value)).expanduser().exists()
    ]


def parse_request(argv: Sequence[str] | None = None) -> LaunchRequest:
    """Parse the command line into a ``LaunchRequest`` (launcher settings and training argv)."""
    args = build_parser().parse_intermixed_args(argv)
    # A --slurm-config file may name only what it changes; the rest keeps the packaged defaults (when there are any:
    # an installed copy without the repository's configs/ uses the given file alone).
    settings = {}
    if args.slurm_config is None or DEFAULT_SLURM_CONFIG.is_file():
        settings = load_slurm_settings(DEFAULT_SLURM_CONFIG)
    if args.slurm_config is not None:
        settings.update(load_slurm_settings(args.slurm_config))
    for name in SETTINGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.local and args.ngpus is None:  # this machine's GPUs, not the cluster default (one rank on a CPU)
        settings["ngpus"] = max(torch.cuda.device_count(), 1)
        logger.info("--local: %d rank(s), one per GPU of this machine (--ngpus sets another count)",
                    settings["ngpus"])  # fmt: skip
    for name in ("nodes", "ngpus", "timeout", "signal_delay_s"):
        value = settings.get(name)
        if not isinstance(value, int) or value < 1:
            flag = name.replace("_", "-")
            raise LaunchError(f"{name} must be a positive integer (--{flag} or the SLURM yaml), got {value!r}")
    for name, least in (("cpus_per_task", 1), ("mem_gb", 0), ("max_num_timeout", 0)):
        value = settings.get(name)
        if value is not None and value < least:
            flag = name.replace("_", "-")
            raise LaunchError(f"{name} must be at least {least} (--{flag} or the SLURM yaml), got {value}")
    if args.local and settings["nodes"] != 1:
        raise LaunchError(f"--local runs on this machine only: --nodes must be 1, got {settings['nodes']}")
    output_dir, missing_inputs = _validate_training_args(args)
    train_argv = ["--config-file", str(Path(args.config_file).expanduser())]
    if args.output_dir is not None:
        train_argv += ["--output-dir", str(output_dir)]
    if args.no_resume:
        train_argv.append("--no-resume")
    train_argv += args.overrides
    job_dir = Path(args.job_dir).expanduser() if args.job_dir is not None else output_dir / "slurm" / "%j"
    _check_writable(output_dir, "--output-dir")
    _check_writable(next(p for p in (job_dir, *job_dir.parents) if "%" not in p.name), "--job-dir")
    return LaunchRequest(settings, train_argv, output_dir, job_dir, args.local, missing_inputs)


def _check_writable(folder: Path, flag: str) -> None:
    """A LaunchError naming ``flag`` when the launcher cannot make or write in ``folder`` (a file in the way, a
    read-only file system)."""
    from dinov2.files import check_folder_writable

    try:
        check_folder_writable(folder, f"{flag} {folder}")
    except ValueError as error:
        raise LaunchError(str(error)) from None


def executor_parameters(request: LaunchRequest) -> dict[str, Any]:
    """Return the ``AutoExecutor.update_parameters`` arguments of a SLURM request."""
    s = request.settings
    delay = s["signal_delay_s"]
    params: dict[str, Any] = {
        "name": f"dinobloom-{Path(request.train_argv[1]).stem}",
        "nodes": s["nodes"],
        "tasks_per_node": s["ngpus"],
        "gpus_per_node": s["ngpus"],
        "timeout_min": s["timeout"],
        "slurm_signal_delay_s": delay,
        # Pinned here because submitit writes its own default signal (USR2) into the sbatch file.
        "slurm_additional_parameters": {"signal": f"{PREEMPT_SIGNAL}@{delay}"},
        "slurm_setup": [
            f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}",
            # SLURM 22.05 to 23.02: srun no longer inherits sbatch's --cpus-per-task, so every task (and its
            # data-loading workers) would run on one CPU.
            'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi',
        ],
        # One task that fails (an unreadable batch, an out-of-memory GPU) ends the step, instead of leaving the
        # other ranks waiting in a collective until the process group times out.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.get("cpus_per_task") is not None:
        params["cpus_per_task"] = s["cpus_per_task"]
    if s.get("mem_gb") is not None:
        params["mem_gb"] = s["mem_gb"]  # 0 becomes --mem=0GB: all the memory of the machine
    for name in ("partition", "account", "qos", "constraint", "comment", "exclude"):
        if s.get(name) is not None:
            params[f"slurm_{name}"] = s[name]
    return params


def local_executor_parameters(request: LaunchRequest) -> dict[str, Any]:
    """Return the ``LocalExecutor.update_parameters`` arguments of a ``--local`` request.

    The GPUs are those of the caller's ``CUDA_VISIBLE_DEVICES`` when it is set: submitit would otherwise hand out
    GPUs 0..ngpus-1, whatever the user chose.
    """
    s = request.settings
    params: dict[str, Any] = {
        "timeout_min": s["timeout"],
        "gpus_per_node": s["ngpus"],
        "tasks_per_node": s["ngpus"],
        "signal_delay_s": s["signal_delay_s"],
    }
    visible = _visible_gpu_indices()
    if visible == []:  # GPUs hidden on purpose (CUDA_VISIBLE_DEVICES=""): the ranks run on the CPU and stay there
        params["gpus_per_node"] = 0
    elif visible is not None:
        if len(visible) < s["ngpus"]:
            raise LaunchError(f"--ngpus {s['ngpus']} but CUDA_VISIBLE_DEVICES lists only {len(visible)} GPU(s)")
        params["visible_gpus"] = visible
    return params


def _visible_gpu_indices() -> list[int] | None:
    """The GPU indices of ``CUDA_VISIBLE_DEVICES`` (None when it is not set)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise LaunchError(f"--local needs CUDA_VISIBLE_DEVICES as GPU indices (e.g. 4,5), got {value!r}") from None


@contextlib.contextmanager
def _output_to(log_file: Path) -> Iterator[None]:
    """Point this process's stdout and stderr at ``log_file`` for a while, at the level of file descriptors.

    submitit's local controller inherits them and lives as long as the job: left alone, it would hold the caller's
    pipe open (``$(...)``, a notebook's ``!``, ``subprocess.run(capture_output=True)``) until training ends.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_file, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


def _refuse_missing_inputs(request: LaunchRequest) -> None:
    """A LaunchError naming the data and weights settings whose paths this machine does not have, if any."""
    if request.missing_inputs:
        remedy = "" if request.local else ", or pass --no-path-check if only the compute nodes see it"
        raise LaunchError(
            f"{', '.join(request.missing_inputs)}: not found on this machine, so the job would fail when it starts; "
            f"fix the path{remedy}"
        )


def _refuse_a_folder_in_use(output_dir: Path) -> None:
    """A LaunchError naming the training that holds ``output_dir``'s lock now: the job would stop at its start."""
    from dinov2.train.run_lock import LOCK_NAME, RunLock, RunLockedError

    if not (output_dir / LOCK_NAME).is_file():
        return
    lock = RunLock(output_dir)
    try:
        lock.acquire()
    except RunLockedError as error:
        raise LaunchError(str(error)) from None
    finally:
        lock.release()


def submit(argv: Sequence[str] | None = None) -> submitit.Job:
    """Submit the training described by the command line; return the submitit job."""
    request = parse_request(argv)
    _refuse_a_folder_in_use(request.output_dir)
    max_num_timeout = request.settings.get("max_num_timeout")
    if request.local:
        _refuse_missing_inputs(request)  # the job would fail in the background, the command having said it started
        extra = {"max_num_timeout": max_num_timeout} if max_num_timeout is not None else {}
        executor = submitit.LocalExecutor(folder=request.job_dir, **extra)
        executor.update_parameters(**local_executor_parameters(request))
    else:
        extra = {"slurm_max_num_timeout": max_num_timeout} if max_num_timeout is not None else {}
        try:
            executor = submitit.AutoExecutor(folder=request.job_dir, cluster="slurm", **extra)
        except RuntimeError as error:
            raise LaunchError(f"cannot submit to SLURM here ({error}); pass --local to run on this machine") from error
        _refuse_missing_inputs(request)  # the job would wait in the queue, then fail at once
        executor.update_parameters(**executor_parameters(request))
    # Inherited by the local controller and, through sbatch's environment export, by SLURM tasks.
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL
    if request.local:
        with _output_to(request.output_dir / "slurm" / "local_controller.log"):
            job = executor.submit(TrainingJob(request.train_argv))
    else:
        job = executor.submit(TrainingJob(request.train_argv))
    cluster = "local" if request.local else "slurm"
    logger.info("submitted %s job %s: train.py %s", cluster, job.job_id, " ".join(request.train_argv))
    if request.local:  # the command returns at once; say where the run can be followed
        logger.info("it runs in the background on this machine (process %s); its training log: %s",
                    job.job_id, request.output_dir / "log.txt")  # fmt: skip
    return job


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: submit the job and print its id and log files."""
    setup_logging()
    job = submit(argv)
    print(f"Submitted job {job.job_id}")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
