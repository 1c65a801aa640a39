"""Student/teacher pair and the DINO + iBOT + KoLeo objective of one training step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from dinov2.configs import ConfigError, resolve_arch
from dinov2.distributed import get_rank, get_world_size, raise_rank_0s_error
from dinov2.hub.backbones import run_config_settings
from dinov2.hub.loader import is_url, load_backbone_weights
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.loss.dino_clstoken_loss import dino_loss_term_scales
from dinov2.models import DinoVisionTransformer
from dinov2.train.data import effective_local_crops

logger = logging.getLogger(__name__)


def build_backbone_from_cfg(cfg: DictConfig, *, teacher: bool) -> DinoVisionTransformer:
    """Build the student or teacher ViT of the config (the teacher has no stochastic depth)."""
    kwargs = dict(resolve_arch(cfg).kwargs)
    if teacher:
        kwargs["drop_path_rate"] = 0.0
    return DinoVisionTransformer(**kwargs)


def build_parts(cfg: DictConfig, *, teacher: bool) -> nn.ModuleDict:
    """The student's or teacher's networks: ``backbone``, ``dino_head`` and (separate iBOT head) ``ibot_head``."""
    parts: dict[str, nn.Module] = {"backbone": build_backbone_from_cfg(cfg, teacher=teacher)}
    embed_dim = parts["backbone"].embed_dim
    heads = {"dino_head": cfg.dino}
    if cfg.ibot.loss_weight > 0 and cfg.ibot.separate_head:
        heads["ibot_head"] = cfg.ibot
    for name, head in heads.items():
        parts[name] = DINOHead(
            in_dim=embed_dim,
            out_dim=head.head_n_prototypes,
            hidden_dim=head.head_hidden_dim,
            bottleneck_dim=head.head_bottleneck_dim,
            nlayers=head.head_nlayers,
        )
    return nn.ModuleDict(parts)


def initial_student_state(cfg: DictConfig) -> dict[str, Tensor]:
    """The student's initial weights on CPU: random from ``train.seed``, then ``student.pretrained_weights`` if set.

    They depend on the config only (not on the global random state, the rank or the number of ranks), so every
    run of a config starts from the same weights.
    """
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(int(cfg.train.seed))
        parts = build_parts(cfg, teacher=False)  # the constructors initialise every parameter
        weights = cfg.student.pretrained_weights
        if weights:
            logger.info("starting the backbone from %s", weights)
            load_backbone_weights(parts.backbone, weights)
            check_run_head_count(parts.backbone, str(weights))
    return parts.state_dict()


def check_run_head_count(backbone: DinoVisionTransformer, weights: str) -> None:
    """Refuse a training export whose run's ``config.yaml`` gives another head count than ``backbone`` has.

    The tensors of a backbone fit any head count that divides its width, so the strict load cannot tell; the run's
    config can (a DINOv2 or release file has none and keeps DINOv2's 64 per head).
    """
    if is_url(weights):
        return
    trained = run_config_settings(Path(weights), {"embed_dim": backbone.embed_dim, "depth": backbone.n_blocks})
    if "num_heads" in trained and trained["num_heads"] != backbone.num_heads:
        raise ConfigError(
            f"student.pretrained_weights={weights} was trained with {trained['num_heads']} attention heads (its run's "
            f"config.yaml) but this config builds {backbone.num_heads}: its tensors would load but compute something "
            f"else; set student.num_heads={trained['num_heads']}"
        )


class SSLMetaArch(nn.Module):
    """DINOv2's self-distillation set-up: student and EMA teacher, each a backbone with heads.

    Build it on the meta device, shard it (``dinov2.parallel``), ``to_empty`` it onto its device and call
    :meth:`init_weights`: no process then holds more than its shards, except rank 0 during initialisation.
    """

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_parts(cfg, teacher=False)
        self.teacher = build_parts(cfg, teacher=True)
        for p in self.teacher.parameters():
            p.requires_grad = False

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.cuda_graphs = bool(cfg.train.cuda_graphs)  # (the config refuses it without train.compile)
        # What each step needs of the config, read once: OmegaConf's look-ups cost the host about 14 us each.
        self.softmax_centering = cfg.train.centering == "centering"
        self.n_local_crops = effective_local_crops(cfg)
        self.global_scale, self.local_scale = dino_loss_term_scales(2, int(cfg.crops.local_crops_number))
        self.dino_weight = float(cfg.dino.loss_weight)
        self.koleo_weight = float(cfg.dino.koleo_loss_weight)
        self.ibot_weight = float(cfg.ibot.loss_weight)
        self._ema_params: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        self._student_part_params: list[list[nn.Parameter]] | None = None
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        if self.do_koleo:
            self.koleo_loss = KoLeoLoss(pairwise_eps=float(cfg.dino.koleo_pairwise_eps))
        if self.do_ibot:
            self.ibot_patch_loss = iBOTPatchLoss(
                cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
            )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Load :func:`initial_student_state` into the student and the teacher (on every rank) and zero the centres.

        With several ranks only rank 0 builds the full weights; they are broadcast into every rank's shards.
        """
        broadcast = get_world_size() > 1
        state, error = {}, None
        if not broadcast or get_rank() == 0:
            try:  # (a missing or wrong student.pretrained_weights: every rank says so, none waits for rank 0)
                state = initial_student_state(self.cfg)
            except Exception as err:
                error = err
        raise_rank_0s_error(error)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
        for parts in (self.student, self.teacher):
            set_model_state_dict(parts, dict(state), options=options)
        self.dino_loss.center.zero_()
        if self.do_ibot:
            self.ibot_patch_loss.center.zero_()

    def compile_losses(self) -> None:
        """``torch.compile`` the student-side cross-entropies and, on CUDA, Sinkhorn-Knopp (``train.compile``).

        Row counts are dynamic: the number of masked tokens changes every step.
        """
        losses = [self.dino_loss] + ([self.ibot_patch_loss] if self.do_ibot else [])
        for loss in losses:
            loss.cross_entropy.compile(dynamic=True)
            loss.compile_sinkhorn_knopp = True

    @torch.no_grad()
    def _teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities for the student's global CLS tokens and masked patch tokens."""
        global_crops = batch["collated_global_crops"]
        mask_indices = batch["mask_indices_list"]
        out = self.teacher.backbone(global_crops, is_training=True)
        cls_a, cls_b = out["x_norm_clstoken"].chunk(2)
        # Swapped so that the teacher's view A is the target of the student's view B and vice versa.
        cls_tokens = torch.cat((cls_b, cls_a))
        patch_tokens = out["x_norm_patchtokens"].flatten(0, 1)

        masked_patch_logits = None
        if self.do_ibot:
            masked_tokens = torch.index_select(patch_tokens, 0, mask_indices)
            if self.ibot_separate_head:
                cls_logits = self.teacher.dino_head(cls_tokens)
                masked_patch_logits = self.teacher.ibot_head(masked_tokens)
            else:
                logits = self.teacher.dino_head(torch.cat((cls_tokens, masked_tokens)))
                cls_logits, masked_patch_logits = logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]
        else:
            cls_logits = self.teacher.dino_head(cls_tokens)

        if self.softmax_centering:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = None
            if self.do_ibot:
                patch_probs = self.ibot_patch_loss.softmax_center_teacher(
                    masked_patch_logits.unsqueeze(0), teacher_temp=teacher_temp
                ).squeeze(0)
                self.ibot_patch_loss.update_center(masked_patch_logits.unsqueeze(0))
        else:  # "sinkhorn_knopp", the one other value the config loader accepts
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp=teacher_temp)
            patch_probs = None
            if self.do_ibot:
                patch_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(masked_patch_logits, teacher_temp)
        return cls_probs, patch_probs

    def forward_loss(self, batch: dict[str, Tensor], teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss of one step and its detached terms, as DINOv2/DinoBloom normalise them."""
        n_local = self.n_local_crops
        cls_probs, patch_probs = self._teacher_targets(batch, teacher_temp)

        global_crops = batch["collated_global_crops"]
        masks = batch["collated_masks"]
        student_global = self.student.backbone(global_crops, masks=masks, is_training=True)
        loss_terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=global_crops.device)  # float32 whatever dtype the crops come in

        cls_tokens = student_global["x_norm_clstoken"]
        if self.do_ibot and not self.ibot_separate_head:
            # One head call for CLS and masked patch tokens, as the shared-head recipe does.
            masked = torch.index_select(
                student_global["x_norm_patchtokens"].flatten(0, 1), 0, batch["mask_indices_list"]
            )
            logits = self.student.dino_head(torch.cat((cls_tokens, masked)))
            cls_logits, masked_logits = logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]
        else:
            cls_logits = self.student.dino_head(cls_tokens)
            if self.do_ibot:
                masked = torch.index_select(
                    student_global["x_norm_patchtokens"].flatten(0, 1), 0, batch["mask_indices_list"]
                )
                masked_logits = self.student.ibot_head(masked)

        if n_local > 0 and self.do_dino:
            local_out = self.student.backbone(batch["collated_local_crops"], is_training=True)
            local_logits = self.student.dino_head(local_out["x_norm_clstoken"])
            local_loss = self.local_scale * self.dino_loss(local_logits.chunk(n_local), list(cls_probs.chunk(2)))
            loss_terms["dino_local_crops_loss"] = local_loss
            total = total + self.dino_weight * local_loss

        if self.do_dino:
            global_loss = self.global_scale * self.dino_loss([cls_logits], [cls_probs])
            loss_terms["dino_global_crops_loss"] = global_loss
            total = total + self.dino_weight * global_loss
            if self.do_koleo:
                koleo = self.koleo_weight * sum(self.koleo_loss(c) for c in cls_tokens.chunk(2))
                # Logged halved, as DINOv2's loss_dict logs it (see the README); the total takes the full term.
                loss_terms["koleo_loss"] = koleo / 2
                total = total + koleo

        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                masked_logits, patch_probs, student_masks_flat=masks, masks_weight=batch["masks_weight"]
            )
            # Logged halved, as DINOv2's loss_dict logs it (see the README); the total takes the full term.
            loss_terms["ibot_loss"] = ibot / 2
            total = total + self.ibot_weight * ibot

        loss_terms = {k: v.detach() for k, v in loss_terms.items()}
        loss_terms["total_loss"] = total.detach()
        return total, loss_terms

    def student_part_params(self) -> list[list[nn.Parameter]]:
        """The parameters of each part of the student (backbone, heads), listed once: walking the modules every
        step costs the host more than the clipping's own work."""
        if self._student_part_params is None:
            self._student_part_params = [list(part.parameters()) for part in self.student.values()]
        return self._student_part_params

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher: t = m * t + (1 - m) * s, fused over all tensors."""
        if self._ema_params is None:  # listed once (the modules keep their parameter objects), paired by part
            teacher, student = [], []
            for name in self.teacher:
                for t, s in zip(self.teacher[name].parameters(), self.student[name].parameters(), strict=True):
                    teacher.append(t)
                    student.append(s)
            self._ema_params = teacher, student
        teacher_params, student_params = self._ema_params
        if isinstance(teacher_params[0], DTensor):  # FSDP2: the local shards, asked for anew each step
            teacher_params, student_params = [_local(t) for t in teacher_params], [_local(s) for s in student_params]
        # t + (1 - m) (s - t): one pass over the teacher instead of a multiply and an add.
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    def apply_center_updates(self) -> None:
        """Finish the lazily reduced centre updates of the softmax-centering losses."""
        if self.softmax_centering:
            self.dino_loss.apply_center_update()
            if self.do_ibot:
                self.ibot_patch_loss.apply_center_update()


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t
