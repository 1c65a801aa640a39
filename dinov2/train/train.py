"""Self-supervised training (DINO + iBOT + KoLeo), DinoBloom's recipe.

    python dinov2/train/train.py --config-file dinov2/configs/train/custom.yaml [key=value ...]
    torchrun --nproc_per_node=N dinov2/train/train.py --config-file ... [key=value ...]

Re-running the same command resumes from the newest checkpoint in the output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.checkpoint import export_teacher, find_latest_checkpoint, load_checkpoint, save_checkpoint
from dinov2.configs import apply_scaling_rules_to_cfg, load_config, write_config
from dinov2.parallel import autocast_dtype, build_grad_scaler, clip_grad_norm, parallelize_from_config
from dinov2.train.data import build_train_dataset, build_train_loader
from dinov2.train.knn_monitor import KnnMonitor
from dinov2.train.optim import apply_optim_scheduler, build_optimizer, build_param_groups
from dinov2.train.schedules import build_schedulers, total_iterations
from dinov2.train.ssl_meta_arch import SSLMetaArch

logger = logging.getLogger("dinov2")


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the trainer."""
    parser = argparse.ArgumentParser(
        description="DinoBloom self-supervised training", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: dotted key=value pairs after the options, e.g. train.batch_size_per_gpu=32",
    )
    parser.add_argument("--config-file", required=True, help="run config (YAML) over ssl_default_config.yaml")
    parser.add_argument("--output-dir", default=None, help="output directory (default: train.output_dir)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """Rank 0 logs INFO to stdout and to ``output_dir/log.txt``; other ranks log warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dinov2", False):
            root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._dinov2 = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 into "checkpoint at the next iteration, then stop".

    The previously installed handler (for example submitit's requeue handler) is remembered and called
    after the checkpoint is written.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (main thread only)."""
        for sig in self.SIGNALS:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: checkpointing at the end of this iteration", signal.Signals(signum).name)
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Whether any rank was signalled (all ranks agree, so they checkpoint together)."""
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = int(signal.SIGTERM)
        return flag

    def forward_signal(self, frame: Any = None) -> None:
        """Hand the signal to the previous handler, or exit with 128 + signal number."""
        assert self.received is not None
        previous = self.previous.get(self.received)
        self.uninstall()
        if callable(previous):
            previous(self.received, frame)
        raise SystemExit(128 + self.received)


class MetricsWriter:
    """One JSON line per logged iteration in ``training_metrics.json`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, start_iteration: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            # Drop records past the checkpoint being resumed, so the file tells one consistent story.
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < start_iteration]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


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
    with autocast:
        loss, terms = model.forward_loss(batch, teacher_temp=teacher_temp)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad:
        for part in model.student.values():
            clip_grad_norm(part.parameters(), clip_grad)
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


def build_training_state(
    cfg: DictConfig, device: torch.device
) -> tuple[SSLMetaArch, torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """The initialised, sharded student/teacher, its AdamW optimiser and the fp16 loss scaler (if any)."""
    model = SSLMetaArch(cfg)
    model.init_weights()
    model.to(device)
    parallelize_from_config(model.student, cfg, "student", device)
    parallelize_from_config(model.teacher, cfg, "teacher", device)
    optimizer = build_optimizer(build_param_groups(model.student, cfg), cfg)
    return model, optimizer, build_grad_scaler(cfg, device)


def train(cfg: DictConfig, output_dir: Path, resume: bool, info: distributed.DistInfo) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the last logged metrics."""
    device = info.device
    dataset = build_train_dataset(cfg)  # fails on bad paths before any model is built

    model, optimizer, scaler = build_training_state(cfg, device)
    schedules = build_schedulers(cfg)
    max_iter = total_iterations(cfg)
    batch_per_rank = int(cfg.train.batch_size_per_gpu)
    global_batch = batch_per_rank * info.world_size

    ckpt_dir = output_dir / "checkpoints"
    start_iter, images_seen, bad_images = 0, 0, 0
    latest = find_latest_checkpoint(ckpt_dir) if resume else None
    if latest is None and cfg.MODEL.WEIGHTS:
        latest = Path(cfg.MODEL.WEIGHTS)
        logger.info("starting from the training checkpoint MODEL.WEIGHTS=%s", latest)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        start_iter = state["iteration"] + 1
        images_seen, bad_images = state["images_seen"], state["bad_images"]
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        logger.info("resuming at iteration %d from %s", start_iter, latest)

    monitor = KnnMonitor.from_config(cfg, output_dir, device)
    if monitor is not None and start_iter == 0:
        monitor.evaluate(model.teacher.backbone, "initialisation", 0)

    loader, _ = build_train_loader(
        cfg, dataset, start=start_iter * global_batch, rank=info.rank, world_size=info.world_size
    )
    autocast = make_autocast(cfg, device)
    metrics = MetricsWriter(output_dir / "training_metrics.json", info.is_main_process, start_iter)
    preemption = PreemptionHandler()
    preemption.install()

    def checkpoint(iteration: int) -> None:
        model.apply_center_updates()
        extra = {"images_seen": images_seen, "bad_images": bad_images}
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        save_checkpoint(ckpt_dir, iteration, model, optimizer, extra, keep_last=cfg.train.keep_last_checkpoints)

    logger.info("training iterations %d -> %d, %d images per step on %d rank(s)", start_iter, max_iter, global_batch, info.world_size)
    last: dict[str, Any] = {}
    iteration = start_iter
    window_start, window_images = time.perf_counter(), 0
    for iteration, batch in zip(range(start_iter, max_iter), loader):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        lr, wd = schedules["lr"][iteration], schedules["wd"][iteration]
        momentum, teacher_temp = schedules["momentum"][iteration], schedules["teacher_temp"][iteration]
        apply_optim_scheduler(optimizer, lr, wd, schedules["last_layer_lr"][iteration])

        terms = training_step(model, optimizer, scaler, autocast, batch, teacher_temp, momentum, cfg.optim.clip_grad)

        images_seen += global_batch
        window_images += global_batch
        bad_images += batch["n_bad_images"]  # this rank's count, against this rank's share of the images
        rank_images = images_seen // info.world_size
        # Until a rank has read min(len(dataset), 1000) images the limit applies to that many, so that one bad
        # image in the first batch does not stop a run.
        if bad_images > cfg.train.max_bad_image_fraction * max(rank_images, min(len(dataset), 1000)):
            raise RuntimeError(
                f"rank {info.rank}: {bad_images} of {rank_images} images were unreadable, more than "
                f"train.max_bad_image_fraction={cfg.train.max_bad_image_fraction}; see the warnings above"
            )

        is_last = iteration == max_iter - 1
        if (iteration + 1) % cfg.train.log_period == 0 or is_last or iteration == start_iter:
            values = {k: v.float() for k, v in terms.items()}
            if info.is_distributed:
                stacked = torch.stack(list(values.values()))
                dist.all_reduce(stacked, op=dist.ReduceOp.AVG)
                values = dict(zip(values, stacked))
            elapsed = time.perf_counter() - window_start
            last = {
                "iteration": iteration,
                **{k: float(v) for k, v in values.items()},
                "lr": lr, "wd": wd, "momentum": momentum, "teacher_temp": teacher_temp,
                "images_per_s": window_images / max(elapsed, 1e-9),
                "bad_images": bad_images,
            }
            if not math.isfinite(last["total_loss"]):
                raise FloatingPointError(f"the loss is {last['total_loss']} at iteration {iteration}; stopping")
            metrics.write(last)
            logger.info(
                "it %d/%d  loss %.4f (%s)  lr %.2e  %.1f img/s",
                iteration, max_iter, last["total_loss"],
                ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in last.items() if k.endswith("_loss") and k != "total_loss"),
                lr, last["images_per_s"],
            )
            window_start, window_images = time.perf_counter(), 0

        period = cfg.evaluation.eval_period_iterations
        if period and ((iteration + 1) % period == 0 or is_last):
            export_teacher(output_dir / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth", model.teacher)
        stop = preemption.should_stop(device)
        if (iteration + 1) % cfg.train.checkpoint_period == 0 or is_last or stop:
            checkpoint(iteration)
        if stop:
            logger.warning("stopping after the checkpoint of iteration %d; re-run the command to resume", iteration)
            preemption.forward_signal()
    preemption.uninstall()

    if monitor is not None:
        monitor.evaluate(model.teacher.backbone, "end of training", iteration + 1)
        monitor.log_summary()
    return last


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the command line, set up processes and logging, train."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config_file, [o for o in args.opts if o != "--"])
    output_dir = Path(args.output_dir or cfg.train.output_dir).expanduser().resolve()
    cfg.train.output_dir = str(output_dir)
    info = distributed.enable_distributed(device=cfg.train.device)
    try:
        if info.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        setup_logging(output_dir, info.is_main_process)
        apply_scaling_rules_to_cfg(cfg, info.world_size)
        if info.is_main_process:
            write_config(cfg, output_dir)
        torch.manual_seed(cfg.train.seed + info.rank)
        logger.info("rank %d/%d on %s (%s)", info.rank, info.world_size, info.device, info.launcher)
        train(cfg, output_dir, resume=cfg.train.resume and not args.no_resume, info=info)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
