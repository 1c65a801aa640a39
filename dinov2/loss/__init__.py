"""Training losses: DINO (class token), iBOT (masked patch tokens) and the KoLeo regulariser."""

from dinov2.loss.centering import sinkhorn_knopp
from dinov2.loss.dino_clstoken_loss import DINOLoss, dino_loss_term_scales
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "dino_loss_term_scales", "iBOTPatchLoss", "sinkhorn_knopp"]
