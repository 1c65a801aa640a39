"""Self-supervised training (DINO + iBOT + KoLeo), DinoBloom's recipe.

    python dinov2/train/train.py --config-file dinov2/configs/train/custom.yaml [key=value ...]
    torchrun --nproc_per_node=N dinov2/train/train.py --config-file ... [key=value ...]

Re-running the same command resumes from the newest checkpoint in the output directory; adding ``--eval-only``
exports that checkpoint's teacher (``eval/manual_<steps>/teacher_checkpoint.pth``) without training.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy (dinov2/__init__.py)

import argparse
import logging
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.checkpoint import (
    CheckpointSaveError, export_teacher, find_latest_checkpoint, load_checkpoint, save_checkpoint, tidy_checkpoints,
)
from dinov2.configs import ConfigError, apply_scaling_rules_to_cfg, load_config, resolve_arch, write_config
from dinov2.data import DatasetError
from dinov2.data.loaders import batches
from dinov2.data.photometric import finish_crops
from dinov2.files import out_of_space
from dinov2.hub.loader import CheckpointError, conventional_num_heads, export_path
from dinov2.models import ARCH_SIZES
from dinov2.parallel import (
    allow_tf32_matmul,
    autocast_dtype,
    build_grad_scaler,
    check_compile_settings,
    clip_grad_norm,
    parallelize_from_config,
)
from dinov2.train.data import anchor_data_paths, build_train_dataset, build_train_loader
from dinov2.train.knn_monitor import END_OF_TRAINING, KnnMonitor
from dinov2.train.logs import LOG_FILE_ONLY, LOG_FILES, HeldRecords, setup_run_logging
from dinov2.train.optim import apply_optim_scheduler, build_optimizer, build_param_groups
from dinov2.train.preemption import PreemptionHandler
from dinov2.train.rankme import RankMeMonitor
from dinov2.train.resume import (
    Progress, check_same_network, check_within_schedule, network_record, resume_from_checkpoint,
)
from dinov2.train.run_folder import (
    START_OVER_MARKER, claim_output_folder, mark_start_over, may_resume, output_dir_error, start_over,
)
from dinov2.train.run_lock import RunLock
from dinov2.train.schedules import build_schedulers, total_iterations
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.trackers import MetricsLog, check_tracking

logger = logging.getLogger("dinov2")

#: What ends the training command in one ``error:`` line (see ``dinov2.cli.run_cli``): mistakes in the config,
#: data or files, and a loss that is no longer finite. Anything else keeps its traceback.
CLI_ERRORS = (ConfigError, DatasetError, CheckpointError, CheckpointSaveError, FileNotFoundError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the trainer."""
    parser = argparse.ArgumentParser(
        description="DinoBloom self-supervised training", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: dotted key=value pairs, before or after the options, e.g. train.batch_size_per_gpu=32",
    )
    parser.add_argument("--config-file", required=True, help="run config (YAML) over ssl_default_config.yaml")
    parser.add_argument("--output-dir", default=None, help="output directory (default: train.output_dir)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument(
        "--eval-only", action="store_true",
        help="no training: export the teacher of the newest checkpoint (or MODEL.WEIGHTS) to "
        "eval/manual_<steps>/teacher_checkpoint.pth and, with evaluation.knn_data, score it",
    )
    parser.add_argument("opts", nargs="*", help="key=value config overrides")
    return parser


def training_step(
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    autocast: Any,
    batch: dict[str, Any],
    teacher_temp: float,
    momentum: float,
    clip_grad: float,
) -> dict[str, torch.Tensor]:
    """Forward-backward, gradient clipping, optimiser step and teacher EMA; returns the detached loss terms."""
    optimizer.zero_grad(set_to_none=True)
    if model.cuda_graphs:  # the graphs' outputs of the step before are no longer needed: replays may overwrite them
        torch.compiler.cudagraph_mark_step_begin()
    with autocast:
        loss, terms = model.forward_loss(batch, teacher_temp=teacher_temp)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad:
        for params in model.student_part_params():
            clip_grad_norm(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.update_teacher(momentum)
    return terms


def make_autocast(cfg: DictConfig, device: torch.device) -> Any:
    """The autocast context of the configured compute dtype (a null context for fp32)."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def describe_student(cfg: DictConfig, student: torch.nn.ModuleDict) -> str:
    """One line on the network being trained: the backbone's architecture (saying which of ``student.arch``'s sizes
    the config replaced) and each part's parameter count."""
    spec = resolve_arch(cfg)
    arch = spec.kwargs
    own_sizes = dict(zip(("embed_dim", "depth", "num_heads"), ARCH_SIZES[spec.name]))
    replaced = {key: own for key, own in own_sizes.items() if arch[key] != own}
    name = spec.hub_name or spec.name
    if replaced:
        keys = ", ".join(f"student.{key}" for key in replaced)
        name += f" ({keys} replacing its {', '.join(str(own) for own in replaced.values())})"
    counts = ", ".join(
        f"{part} {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M" for part, module in student.items()
    )
    return (
        f"student: {name}: {arch['embed_dim']} wide, {arch['depth']} blocks, {arch['num_heads']} heads, "
        f"{arch['ffn_layer']} feed-forward, {arch['num_register_tokens']} registers, patch {arch['patch_size']}, "
        f"{arch['img_size']} px; parameters: {counts} (the teacher is their EMA)"
    )


def build_sharded_model(cfg: DictConfig, device: torch.device) -> SSLMetaArch:
    """The student/teacher, sharded as configured, with uninitialised weights on ``device``.

    It is built on the meta device and sharded before it holds any weight, so that no rank ever holds the full model.
    """
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    logger.info("%s", describe_student(cfg, model.student))
    parallelize_from_config(model.student, cfg, "student", device)
    parallelize_from_config(model.teacher, cfg, "teacher", device)
    model.to_empty(device=device)
    return model


def build_training_state(
    cfg: DictConfig, device: torch.device
) -> tuple[SSLMetaArch, torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """The initialised, sharded student/teacher, its AdamW optimiser and the fp16 loss scaler (if any).

    ``init_weights`` fills each rank's shards (rank 0 builds the full initial weights, pretrained backbone included,
    and broadcasts them).
    """
    if device.type == "cuda":
        allow_tf32_matmul()
    model = build_sharded_model(cfg, device)
    if cfg.train.compile:
        model.compile_losses()
    model.init_weights()
    scaler = build_grad_scaler(cfg, device)
    optimizer = build_optimizer(build_param_groups(model.student, cfg), cfg, loss_scaled=scaler is not None)
    return model, optimizer, scaler


def sum_over_ranks(values: Sequence[int], group: dist.ProcessGroup | None) -> list[int]:
    """Element-wise sums of ``values`` over the ranks of ``group``, a gloo group (the values themselves without one).

    The sum runs on CPU tensors: reading back an NCCL all-reduce with ``.tolist()`` would make the host wait for all
    of the step's queued GPU work every iteration.
    """
    if group is None:
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


def check_bad_images(bad_images: int, images_seen: int, dataset_size: int, max_fraction: float) -> None:
    """Raise when more than ``max_fraction`` of the images read so far were unreadable.

    Until ``min(dataset_size, 1000)`` images have been read the fraction is taken of that many, so that one bad image
    in the first batch does not stop a run; one bad image is always tolerated unless ``max_fraction`` is 0 (in a
    data set of fewer than 100 images the fraction alone would allow none).
    """
    allowed = max_fraction * max(images_seen, min(dataset_size, 1000))
    if bad_images > (max(allowed, 1.0) if max_fraction > 0 else 0.0):
        raise DatasetError(
            f"{bad_images} of the {images_seen} images read so far were unreadable, more than "
            f"train.max_bad_image_fraction={max_fraction} allows; the 'skipping unreadable image' warnings in "
            f"{LOG_FILES} name them: fix or remove those files, or raise the limit"
        )


def warn_if_exports_need_num_heads(cfg: DictConfig) -> None:
    """Warn when the backbone's head count is not the one its weights imply: the exported files cannot record it,
    so a copy loaded outside the run folder (away from its config.yaml) would get the wrong attention."""
    arch = resolve_arch(cfg).kwargs
    implied = conventional_num_heads(arch["embed_dim"])
    if arch["num_heads"] != implied:
        logger.warning(
            "%d attention heads where %d-wide weights imply %d (DINOv2's convention): this run's exported "
            "teacher_checkpoint.pth files load with %d heads inside the run folder, next to its config.yaml (so do "
            "the command-line tools); a copy elsewhere needs load_backbone(None, path, num_heads=%d)",
            arch["num_heads"], arch["embed_dim"], implied, arch["num_heads"], arch["num_heads"],
        )


def score_end_of_training(monitor: KnnMonitor, backbone: torch.nn.Module, metrics: MetricsLog, iterations: int) -> None:
    """The kNN score after ``iterations`` steps, sent to the trackers, and the line comparing it with the first."""
    score = monitor.evaluate(backbone, END_OF_TRAINING, iterations)
    metrics.log({"iteration": iterations, "knn_balanced_accuracy": score}, to_file=False)  # knn_monitor.json has it
    monitor.log_summary()


def finite_mean_losses(terms: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
    """The loss terms averaged over the ranks; a total that is not finite stops the run before anything is saved."""
    values = distributed.all_reduce_mean(torch.stack([v.float() for v in terms.values()]))
    losses = dict(zip(terms, values.tolist()))
    if not math.isfinite(losses["total_loss"]):
        raise FloatingPointError(
            f"the loss is {losses['total_loss']} at iteration {iteration}; stopping before this iteration is saved "
            "(re-running resumes from the last checkpoint); lower optim.base_lr or use bf16/fp32"
        )
    return losses


def colour_augmentation_on_device(cfg: DictConfig, device: torch.device) -> bool:
    """Whether the views' colour operations run on ``device`` (``train.colour_augmentation``); logs where."""
    on_device = cfg.train.colour_augmentation == "device" or (
        cfg.train.colour_augmentation == "auto" and device.type == "cuda"
    )
    loading = "the data-loader workers" if cfg.train.num_workers > 0 else "the data loader (in this process)"
    logger.info("colour augmentation %s", f"on {device.type} (uint8 crops from {loading})" if on_device
                else f"in {loading}")  # fmt: skip
    return on_device


def log_progress(record: dict[str, Any], max_iter: int, seconds_per_step: float, first: bool = False) -> None:
    """One log line of a logged step: the losses, lr, throughput and the time left.

    The ``first`` step of a run (or of a resume) carries the start-up (the loader's workers, ``torch.compile``,
    the device's warm-up), so its pace says nothing about the time left, which the next logged step gives.
    """
    terms = ", ".join(
        f"{k.removesuffix('_loss')} {v:.4f}" for k, v in record.items() if k.endswith("_loss") and k != "total_loss"
    )
    if first:
        eta = "after the start-up step"
    else:
        eta = str(timedelta(seconds=round((max_iter - 1 - record["iteration"]) * seconds_per_step)))
    scale = f"  loss scale {record['loss_scale']:g}" if "loss_scale" in record else ""
    logger.info(
        "it %d/%d  loss %.4f (%s)  lr %.2e%s  %.1f img/s  eta %s",
        record["iteration"], max_iter, record["total_loss"], terms, record["lr"], scale, record["images_per_s"], eta,
    )


def check_batch_has_images(batch: dict[str, Any], iteration: int, rank: int) -> None:
    """Raise when none of the batch's images, nor any image tried in their stead, could be read."""
    if "collated_global_crops" not in batch:  # (torchrun, or srun --kill-on-bad-exit, stops the other ranks)
        raise DatasetError(
            f"iteration {iteration}, rank {rank}: none of the {batch['n_images']} images of the batch "
            f"could be read, nor any of the {batch['n_tried']} images after its first "
            "in the data set that were tried in their stead; the 'skipping unreadable image' warnings in "
            f"{LOG_FILES} name them"
        )


class StepOutputs(NamedTuple):
    """What a step writes besides the update itself."""

    record: bool  # a line of training_metrics.json and of the trackers
    log: bool  # a console line
    export: bool  # the teacher, to eval/training_<iteration>/
    save: bool  # a training checkpoint


def step_outputs(
    cfg: DictConfig, iteration: int, start_iter: int, max_iter: int, stop: bool, rankme_scored: bool
) -> StepOutputs:
    """What ``iteration`` writes: the configured periods, everything at the last step, a checkpoint at a stop."""
    is_last = iteration == max_iter - 1
    period = cfg.evaluation.eval_period_iterations
    record = (iteration + 1) % cfg.train.log_period == 0 or is_last or iteration == 0 or rankme_scored
    return StepOutputs(
        record=record,
        # A resume also shows its first step (its start-up time) on the console, but records only what an
        # uninterrupted run records, so that both leave the same metrics.
        log=record or iteration == start_iter,
        export=bool(period) and ((iteration + 1) % period == 0 or is_last),
        save=(iteration + 1) % cfg.train.checkpoint_period == 0 or is_last or stop,
    )


def metrics_record(
    iteration: int,
    losses: dict[str, float],
    schedule_values: dict[str, float],
    images_per_s: float,
    bad_images: int,
    scaler: torch.amp.GradScaler | None,
    rankme_score: tuple[float, int] | None,
) -> dict[str, Any]:
    """The metrics of a logged step, as the console line, training_metrics.json and the trackers get them."""
    record = {"iteration": iteration, **losses, **schedule_values, "images_per_s": images_per_s,
              "bad_images": bad_images}  # fmt: skip
    if scaler is not None:  # fp16: the scale falls while steps are skipped for overflowing gradients
        record["loss_scale"] = scaler.get_scale()
    if rankme_score is not None:
        record["rankme"], record["rankme_crops"] = rankme_score
    return record


def finish_a_finished_run(
    cfg: DictConfig, output_dir: Path, info: distributed.DistInfo, monitor: KnnMonitor | None, model: SSLMetaArch,
    checkpoint: Path | None,
) -> None:
    """A run whose last checkpoint is its end: do what a kill while that checkpoint was saved may have left undone
    (the pruning of older checkpoints, the end-of-training score)."""
    max_iter = total_iterations(cfg)
    logger.info("nothing to do: the checkpoint %s is the end of this %d-iteration run", checkpoint, max_iter)
    if info.is_main_process:
        tidy_checkpoints(output_dir / "checkpoints", cfg.train.keep_last_checkpoints)
    if monitor is None or monitor.has_score(END_OF_TRAINING, max_iter):
        return
    metrics = MetricsLog.from_config(cfg, output_dir, info.is_main_process, max_iter)
    try:
        score_end_of_training(monitor, model.teacher.backbone, metrics, max_iter)
    except BaseException as err:
        metrics.close(failed=not isinstance(err, SystemExit))
        raise
    metrics.close()


def record_the_starting_point(
    cfg: DictConfig, output_dir: Path, model: SSLMetaArch, monitor: KnnMonitor | None, metrics: MetricsLog
) -> None:
    """The untrained teacher, the start of the run's score-against-iteration curve: exported and scored."""
    if cfg.evaluation.eval_period_iterations:
        export_teacher(export_path(output_dir, "training_init"), model.teacher)
    if monitor is not None:
        score = monitor.evaluate(model.teacher.backbone, "initialisation", 0)
        metrics.log({"iteration": 0, "knn_balanced_accuracy": score}, to_file=False)  # knn_monitor.json has it


def hand_back_stop_signals(preemption: PreemptionHandler, host_group: dist.ProcessGroup | None) -> None:
    """After the last checkpoint, before the end-of-training score: restore the stop signals' previous handlers.

    A stop signal that came after the last step's vote (the last checkpoint is written) ends the run before its
    end-of-training score, which a re-run of the command computes; one during the score acts as it would without
    the preemption handler (submitit's requeue, or the signal's default).
    """
    if preemption.agree(sum_over_ranks(preemption.vote(), host_group)):
        logger.log(preemption.level, "stopping before the end-of-training kNN score; re-run the command to score the "
                   "last checkpoint")  # fmt: skip
        preemption.forward_signal()
    preemption.uninstall()
    preemption.replay_late_signal()


def train(
    cfg: DictConfig, output_dir: Path, resume: bool, info: distributed.DistInfo, previous_config: str | None = None
) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the last logged metrics.

    ``previous_config``: the text of the ``config.yaml`` this run replaced, kept with the earlier run's outputs if
    this run starts over.
    """
    device = info.device
    ckpt_dir = output_dir / "checkpoints"
    latest = find_latest_checkpoint(ckpt_dir) if may_resume(output_dir, resume) else None
    check_tracking(cfg)
    # Data and kNN set first: a wrong path fails here, before any model is built.
    dataset = build_train_dataset(cfg)
    augmentation = dataset.transform.record()
    cfg.crops.blur_probabilities = augmentation["blur"]  # config.yaml records the probabilities used, not null
    monitor = KnnMonitor.from_config(cfg, output_dir, device, resume=latest is not None)

    model, optimizer, scaler = build_training_state(cfg, device)
    if info.is_main_process:
        warn_if_exports_need_num_heads(cfg)
    schedules = build_schedulers(cfg)
    max_iter = total_iterations(cfg)
    global_batch = int(cfg.train.batch_size_per_gpu) * info.world_size

    progress = Progress()
    resuming = latest is not None
    if latest is None and cfg.MODEL.WEIGHTS:
        latest = Path(cfg.MODEL.WEIGHTS)
        logger.info("starting from the training checkpoint MODEL.WEIGHTS=%s", latest)
    if latest is not None:
        progress = resume_from_checkpoint(
            latest, model, optimizer, scaler, cfg, previous_config if resuming else None, global_batch,
            len(dataset), augmentation,
        )
        # before anything in the folder changes: its config, metrics and scores stay as they are
        check_within_schedule(latest, progress.iteration, cfg, resuming)
    start_iter, images_seen, bad_images, rankme_window = progress
    if not resuming:  # after loading MODEL.WEIGHTS, which may lie in this folder's checkpoints
        start_over(output_dir, previous_config, info.is_main_process)
    if info.is_main_process:  # only now: a resume that fails leaves the config of the run's checkpoints in place
        write_config(cfg, output_dir)
    if start_iter >= max_iter:
        finish_a_finished_run(cfg, output_dir, info, monitor, model, latest)
        return {}

    def checkpoint(iteration: int, images_seen: int, bad_images: int) -> None:
        """Save the training state after ``iteration``, with the progress and what a resume compares."""
        model.apply_center_updates()
        extra = {
            "images_seen": images_seen, "bad_images": bad_images, "dataset_size": len(dataset),
            "global_batch": global_batch, "augmentation": augmentation,
            "network": network_record(model.student.backbone),
        }
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        window = rankme.window_state(iteration, host_group) if rankme is not None else None
        if window is not None:
            extra["rankme_window"] = window
        save_checkpoint(ckpt_dir, iteration, model, optimizer, extra, keep_last=cfg.train.keep_last_checkpoints)

    last: dict[str, Any] = {}
    iteration = start_iter
    metrics = MetricsLog.from_config(cfg, output_dir, info.is_main_process, start_iter)
    rankme = RankMeMonitor.from_config(cfg)
    if rankme is not None:
        rankme.continue_window(rankme_window, start_iter, info.rank)
    preemption = PreemptionHandler(info.is_main_process, offer_second_ctrl_c=info.launcher != "torchrun")
    # Small per-step host values (stop votes, bad-image counts) travel over gloo, never through the GPU.
    host_group = dist.new_group(backend="gloo") if info.is_distributed else None
    preemption.install()
    try:
        if start_iter == 0:
            record_the_starting_point(cfg, output_dir, model, monitor, metrics)

        colour_on_device = colour_augmentation_on_device(cfg, device)
        compute_dtype = autocast_dtype(cfg, device)
        loader = build_train_loader(
            cfg, dataset, start=images_seen, rank=info.rank, world_size=info.world_size,
            dtype=compute_dtype, defer_colour=colour_on_device, pin_memory=device.type == "cuda",
        )
        autocast = make_autocast(cfg, device)
        logger.info(
            "training iterations %d -> %d, %d images per step on %d rank(s)", start_iter, max_iter, global_batch,
            info.world_size,
        )
        window_start, window_images = time.perf_counter(), 0
        timeout_setting = "train.data_timeout_s" + (f", on rank {info.rank}" if info.is_distributed else "")
        for iteration, batch in zip(range(start_iter, max_iter), batches(loader, timeout_setting)):
            check_batch_has_images(batch, iteration, info.rank)
            batch = finish_crops(batch, device, compute_dtype)
            lr, wd = schedules["lr"][iteration], schedules["wd"][iteration]
            momentum, teacher_temp = schedules["momentum"][iteration], schedules["teacher_temp"][iteration]
            apply_optim_scheduler(optimizer, lr, wd, schedules["last_layer_lr"][iteration])

            clip = cfg.optim.clip_grad
            terms = training_step(model, optimizer, scaler, autocast, batch, teacher_temp, momentum, clip)

            # One collective per step: stop signals and unreadable images, summed over the ranks.
            *votes, new_bad = sum_over_ranks([*preemption.vote(), batch["n_bad_images"]], host_group)
            stop = preemption.agree(votes)
            images_seen += global_batch
            window_images += global_batch
            bad_images += new_bad
            check_bad_images(bad_images, images_seen, len(dataset), cfg.train.max_bad_image_fraction)
            rankme_score = None  # (RankMe, CLS tokens it was computed on)
            if rankme is not None and rankme.wants(iteration):
                rankme.update(model.teacher.backbone, batch["collated_global_crops"], autocast)
                rankme_score = rankme.result(iteration, host_group)

            outputs = step_outputs(cfg, iteration, start_iter, max_iter, stop, rankme_scored=rankme_score is not None)
            if outputs.log or outputs.export or outputs.save:  # the loss is checked before anything is written
                losses = finite_mean_losses(terms, iteration)
            if outputs.log:
                elapsed = time.perf_counter() - window_start
                schedule_values = {"lr": lr, "wd": wd, "momentum": momentum, "teacher_temp": teacher_temp}
                last = metrics_record(iteration, losses, schedule_values, window_images / max(elapsed, 1e-9),
                                      bad_images, scaler, rankme_score)  # fmt: skip
                if rankme_score is not None:
                    logger.info("RankMe of the teacher's CLS tokens on %d global crops: %.1f", *rankme_score[::-1])
                if outputs.record:
                    metrics.log(last)
                log_progress(last, max_iter, seconds_per_step=elapsed * global_batch / max(window_images, 1),
                             first=iteration == start_iter and iteration < max_iter - 1)  # fmt: skip
                window_start, window_images = time.perf_counter(), 0

            saving_since = time.perf_counter()
            if outputs.export:
                export_teacher(export_path(output_dir, f"training_{iteration}"), model.teacher)
            if outputs.save:
                checkpoint(iteration, images_seen, bad_images)
            window_start += time.perf_counter() - saving_since  # img/s and eta are of training steps, not of saves
            if stop:
                logger.log(preemption.level, "stopping after the checkpoint of iteration %d; re-run the command to "
                           "resume", iteration)  # fmt: skip
                preemption.forward_signal()

        if monitor is not None:
            hand_back_stop_signals(preemption, host_group)
            score_end_of_training(monitor, model.teacher.backbone, metrics, iteration + 1)
    except BaseException as err:
        metrics.close(failed=not isinstance(err, SystemExit))  # a preempted run (SystemExit) has not failed
        raise
    finally:
        preemption.uninstall()
    metrics.close()
    return last


def checkpoint_to_export(cfg: DictConfig, output_dir: Path) -> Path:
    """``--eval-only``'s checkpoint: the newest in ``output_dir`` (else ``MODEL.WEIGHTS``); a :class:`ConfigError`
    when there is none, a :class:`CheckpointError` when ``MODEL.WEIGHTS`` names none. Asked before the folder is
    claimed, so that a mistyped folder is not made."""
    latest = find_latest_checkpoint(output_dir / "checkpoints")
    if latest is None and cfg.MODEL.WEIGHTS:
        latest = Path(cfg.MODEL.WEIGHTS)
        if not latest.exists():
            raise CheckpointError(f"--eval-only: MODEL.WEIGHTS={latest}: no such checkpoint")
    if latest is None:
        raise ConfigError(
            f"--eval-only: {output_dir / 'checkpoints'} holds no complete checkpoint and MODEL.WEIGHTS is empty; "
            "pass the run's --output-dir, or MODEL.WEIGHTS=<checkpoints/NNNNNNNNN>"
        )
    return latest


def export_checkpoint_teacher(cfg: DictConfig, output_dir: Path, info: distributed.DistInfo, latest: Path) -> Path:
    """``--eval-only``: the teacher of checkpoint ``latest`` (see :func:`checkpoint_to_export`) as a release-format
    file.

    It goes to ``eval/manual_<steps completed>/teacher_checkpoint.pth`` (DINOv2's name) and, when
    ``evaluation.knn_data`` is set, is scored like the end of a training (``knn_monitor.json``, stage "manual").
    Every rank must call it (the model is sharded as in training).
    """
    monitor = KnnMonitor.from_config(cfg, output_dir, info.device, resume=True)
    model = build_sharded_model(cfg, info.device)
    state = load_checkpoint(latest, model, restore_rng=False)  # strict: every tensor is loaded
    check_same_network(latest, state.get("network"), network_record(model.student.backbone),
                       remedy="export it with the settings of its run (its config.yaml)")  # fmt: skip
    steps = state["iteration"] + 1
    if info.is_main_process and not (output_dir / "config.yaml").is_file():
        write_config(cfg, output_dir)  # the export's architecture (head count) is read from it when it is loaded
    path = export_path(output_dir, f"manual_{steps}")
    export_teacher(path, model.teacher)
    if monitor is not None:
        monitor.evaluate(model.teacher.backbone, "manual", steps)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the command line, set up processes and logging, train."""
    args = build_parser().parse_intermixed_args(argv)
    held = HeldRecords()
    try:
        return _main(args, held)
    finally:
        held.pass_on()


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's key=value overrides, ``--output-dir`` last (it replaces the file's value before that is
    resolved: a ${oc.env:...} set only in jobs, say)."""
    overrides = list(args.opts)
    if args.output_dir:
        if "${" in args.output_dir:
            raise ConfigError(f"--output-dir {args.output_dir}: a folder name with '${{' cannot be used (the config "
                              "reads it as an interpolation); rename the folder")  # fmt: skip
        overrides.append("train.output_dir='{}'".format(args.output_dir.replace("'", "''")))  # YAML-quoted as given
    return overrides


def start_processes(cfg: DictConfig) -> distributed.DistInfo:
    """Join the launcher's process group on ``train.device``; a device or launch environment that cannot be used
    is a :class:`ConfigError`."""
    try:
        return distributed.enable_distributed(device=cfg.train.device)
    except distributed.DeviceUnavailableError as err:
        raise ConfigError(f"train.device={cfg.train.device}: {err}") from None
    except distributed.LaunchEnvironmentError as err:
        raise ConfigError(str(err)) from None


def open_run_folder(
    output_dir: Path, lock: RunLock, info: distributed.DistInfo, held: HeldRecords
) -> list[logging.Handler]:
    """Claim ``output_dir`` (see :func:`claim_output_folder`) and log into it, with the records held until now;
    returns the log handlers, for the caller to remove."""
    try:
        claim_output_folder(output_dir, lock, info.is_main_process, info.device)
        handlers = setup_run_logging(output_dir, info.is_main_process, info.rank)
        held.pass_on(configs=info.is_main_process)  # the config's warnings and notes, into log.txt
    except OSError as err:  # the log file cannot be written
        raise ConfigError(output_dir_error(output_dir, err)) from None
    return handlers


def run_command(
    args: argparse.Namespace, cfg: DictConfig, output_dir: Path, info: distributed.DistInfo, previous: str | None,
    to_export: Path | None,
) -> None:
    """Train (or, with ``--eval-only``, export checkpoint ``to_export`` and score it) in the claimed ``output_dir``;
    ``previous``: the text of its earlier config.yaml."""
    apply_scaling_rules_to_cfg(cfg, info.world_size)
    check_compile_settings(cfg, info.device, info.world_size)
    if to_export is not None:
        export_checkpoint_teacher(cfg, output_dir, info, to_export)
        return
    starts_over = args.no_resume or not cfg.train.resume
    if starts_over and info.is_main_process:
        mark_start_over(output_dir)
    distributed.barrier()  # every rank sees the marker before it decides whether to resume
    train(cfg, output_dir, resume=not starts_over, info=info, previous_config=previous)


def _main(args: argparse.Namespace, held: HeldRecords) -> int:
    cfg = load_config(args.config_file, config_overrides(args))
    output_dir = Path(cfg.train.output_dir).expanduser().resolve()
    cfg.train.output_dir = str(output_dir)
    anchor_data_paths(cfg)
    to_export = checkpoint_to_export(cfg, output_dir) if args.eval_only else None
    info = start_processes(cfg)
    # FSDP2 warns that the backbone returns views (its CLS and patch tokens); the loss never modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    handlers: list[logging.Handler] = []
    root_level = logging.getLogger().level  # restored at the end, with the handlers (main may run in a notebook)
    lock = RunLock(output_dir)
    try:
        handlers = open_run_folder(output_dir, lock, info, held)
        config_file = output_dir / "config.yaml"
        # An earlier run's config, kept in case this run starts over (its exports need it to load).
        previous = config_file.read_text() if info.is_main_process and config_file.is_file() else None
        torch.manual_seed(cfg.train.seed + info.rank)
        logger.info("rank %d/%d on %s (%s)", info.rank, info.world_size, info.device, info.launcher)
        try:
            run_command(args, cfg, output_dir, info, previous, to_export)
        except SystemExit as stop:  # a stop all ranks agreed on (preemption): they all leave here
            distributed.barrier()
            handler_error = getattr(stop, "handler_error", None)
            if handler_error is not None:  # the previous signal handler's (see PreemptionHandler.forward_signal)
                raise handler_error from None
            raise
        except Exception as err:
            # log.txt says why the run ended; the command line says it on stderr
            if isinstance(err, CLI_ERRORS) or out_of_space(err) is not None:
                logger.error("stopped: %s", err, extra=LOG_FILE_ONLY)
            else:  # its traceback follows on stderr
                logger.error("stopped by an unexpected error: %s: %s", type(err).__name__, err)
            if info.is_main_process:  # a start-over that failed is not to be repeated by the next plain run
                (output_dir / START_OVER_MARKER).unlink(missing_ok=True)
            raise
        distributed.barrier()  # every rank is done with the process group before any rank destroys it
    finally:
        distributed.destroy()
        lock.release()
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        logging.getLogger().setLevel(root_level)
    return 0


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main, errors=CLI_ERRORS)
