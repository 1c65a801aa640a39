"""A 20-NN score of the teacher on a labelled image folder (fewer neighbours on a small folder): at initialisation,
at the end of training and for an ``--eval-only`` export."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from dinov2.configs import ConfigError
from dinov2.distributed import is_main_process
from dinov2.eval.extract_features import embed_images
from dinov2.eval.image_list import ImageList, list_images
from dinov2.eval.knn import knn_probabilities
from dinov2.eval.protocol import run_protocol
from dinov2.files import atomic_write_text

logger = logging.getLogger(__name__)

K = 20
FOLDS = 5  # stratified cross-validation folds
END_OF_TRAINING = "end of training"  # the stage of the last score


def stratified_subset(image_list: ImageList, max_images: int, seed: int = 0) -> ImageList:
    """At most ``max_images`` images, the same share of each class, drawn reproducibly."""
    if max_images <= 0 or len(image_list.paths) <= max_images:
        return image_list
    labels = np.asarray(image_list.labels)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    share = max_images / labels.size
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(int(round(share * members.size)), min(members.size, FOLDS))
        keep.extend(rng.choice(members, size=n, replace=False).tolist())
    keep.sort()
    return replace(
        image_list, paths=[image_list.paths[i] for i in keep], labels=[image_list.labels[i] for i in keep]
    )


class _NoGradForward(nn.Module):
    """Calls a backbone (plain or FSDP-sharded) under no_grad, hidden from the caller's ``.to()``/``.eval()``.

    ``embed_images`` runs under inference mode and moves the model it is given. A sharded backbone must not be
    moved there (FSDP2 cannot swap parameters in inference mode), nor run there: its gathered parameters would become
    inference tensors, which the next training step's in-place all-gather may not write.

    ``cuda_graphs``: the backbone's compiled code is replayed as CUDA graphs (``train.cuda_graphs``); each batch then
    starts a new graph step, so that one recorded graph serves every batch of its shape (each batch's features are
    on the host before the next batch runs).
    """

    def __init__(self, backbone: nn.Module, cuda_graphs: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: .to() and .eval() leave it alone
        self.cuda_graphs = cuda_graphs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's CLS token of ``x`` after its final LayerNorm."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(False), torch.no_grad():
            return self.backbone(x)


def _earlier_scores(path: Path) -> list[dict]:
    """The scores a resumed run had recorded; a damaged file (from a copy cut short, say) is set aside, with a
    warning, and the scores start anew."""
    try:
        scores = json.loads(path.read_text())
        if isinstance(scores, list) and all(isinstance(s, dict) and {"stage", "iteration"} <= set(s) for s in scores):
            return scores
        problem = "not a list of scores"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = str(err)
    kept, n = path.with_name(path.name + ".damaged"), 1
    while kept.exists():  # an earlier damaged record is kept too
        kept, n = path.with_name(f"{path.name}.damaged-{n}"), n + 1
    if is_main_process():
        os.replace(path, kept)
    logger.warning("%s cannot be read (%s): set aside as %s; the kNN scores start anew", path, problem, kept.name)
    return []


@dataclass
class KnnMonitor:
    """Scores a backbone with 20-NN (Euclidean, uniform votes) under 5-fold stratified cross-validation."""

    images: ImageList
    img_size: int
    device: torch.device
    output_file: Path
    scores: list[dict[str, float | int | str]] = field(default_factory=list)
    cuda_graphs: bool = False  # the backbone's compiled code is replayed as CUDA graphs (train.cuda_graphs)

    @classmethod
    def from_config(
        cls, cfg: DictConfig, output_dir: Path, device: torch.device, resume: bool = False
    ) -> KnnMonitor | None:
        """The monitor of ``evaluation.knn_data``, or None when no labelled set is configured.

        ``resume``: a resumed run keeps the scores already in ``knn_monitor.json``.
        """
        if not cfg.evaluation.knn_data:
            return None
        if not Path(cfg.evaluation.knn_data).expanduser().exists():  # (training makes it absolute: anchor_data_paths)
            raise FileNotFoundError(
                f"evaluation.knn_data={cfg.evaluation.knn_data} does not exist; set it to a labelled image folder, or "
                "empty (evaluation.knn_data=) for no kNN monitor"
            )
        images = list_images(cfg.evaluation.knn_data, setting="evaluation.knn_data")
        if any(label < 0 for label in images.labels) or len(images.class_names) < 2:
            raise ConfigError(
                f"evaluation.knn_data={cfg.evaluation.knn_data} must be a folder with one sub-folder per class "
                f"(found classes {images.class_names})"
            )
        images = stratified_subset(images, int(cfg.evaluation.knn_max_images), seed=int(cfg.train.seed))
        counts = np.bincount(images.labels, minlength=len(images.class_names))
        small = [f"{name!r} ({count})" for name, count in zip(images.class_names, counts) if count < FOLDS]
        if small:  # checked now, not after the first feature extraction
            raise ConfigError(
                f"evaluation.knn_data={cfg.evaluation.knn_data}: the kNN monitor's {FOLDS}-fold stratified "
                f"cross-validation needs at least {FOLDS} images per class (of the {len(images.paths)} it uses); "
                f"too few in: {', '.join(small)}. Remove those class folders or choose a larger labelled set"
            )
        logger.info("kNN monitor: %d images of %d classes from %s", len(images.paths), len(images.class_names),
                    cfg.evaluation.knn_data)
        output_file = output_dir / "knn_monitor.json"
        earlier = _earlier_scores(output_file) if resume and output_file.exists() else []
        cuda_graphs = bool(cfg.train.cuda_graphs)  # (the config refuses it without train.compile)
        return cls(images, int(cfg.crops.global_crops_size), device, output_file, earlier, cuda_graphs)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, stage: str, iteration: int) -> float:
        """Balanced accuracy of 20-NN on ``backbone``'s features; every rank must call it (sharded models)."""
        was_training = backbone.training
        backbone.eval()
        try:
            features, kept = embed_images(
                _NoGradForward(backbone, self.cuda_graphs), self.images, batch_size=64, img_size=self.img_size,
                # a bar on a terminal only: in a job's log file its redraws would come between the log's lines
                device=self.device, progress=is_main_process() and sys.stderr.isatty(),
            )
        finally:
            backbone.train(was_training)
        labels = np.asarray(self.images.labels)[kept]
        k = min(K, labels.size * 4 // 5)  # k may not exceed a training fold

        def predict(
            train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int
        ) -> dict[str, np.ndarray]:
            return {f"knn_{k}": knn_probabilities(train_x, train_y, test_x, ks=(k,), num_classes=n_classes)[k]}

        result = run_protocol(features, labels, self.images.class_names, predict, n_splits=FOLDS).results[f"knn_{k}"]
        record = {
            "stage": stage,
            "iteration": iteration,
            "k": k,
            "balanced_accuracy": result["balanced_accuracy"]["mean"],
            "accuracy": result["accuracy"]["mean"],
            "weighted_f1": result["weighted_f1"]["mean"],
        }
        self.scores.append(record)
        if is_main_process():
            logger.info(
                "%d-NN on %d images (%s, after %d steps): balanced accuracy %.4f, accuracy %.4f, weighted F1 %.4f",
                k, len(kept), stage, iteration, record["balanced_accuracy"], record["accuracy"], record["weighted_f1"],
            )
            atomic_write_text(self.output_file, json.dumps(self.scores, indent=2) + "\n")
        return float(record["balanced_accuracy"])

    def has_score(self, stage: str, iteration: int) -> bool:
        """Whether ``knn_monitor.json`` already holds the score of this stage and iteration."""
        return any(s["stage"] == stage and s["iteration"] == iteration for s in self.scores)

    def log_summary(self) -> None:
        """One line comparing the first and the last score."""
        if len(self.scores) >= 2 and is_main_process():
            first, last = self.scores[0], self.scores[-1]
            logger.info(
                "kNN balanced accuracy: %.4f (%s) -> %.4f (%s, after %d steps)",
                first["balanced_accuracy"], first["stage"], last["balanced_accuracy"], last["stage"], last["iteration"],
            )
