"""torch.hub entry points: `torch.hub.load(repo, "dinobloom_s", weights="DinoBloom-S.pth")`.

Every entry takes keyword-only `weights` (path or URL; None = random init, unless `pretrained=True`, which
downloads the release file) and `img_size`, and returns
the backbone in eval mode. Each entry's docstring says what it builds: `torch.hub.help("owner/repo", name)` shows
it for a GitHub repository (it has no local source); on a checkout, read `dinov2/hub/backbones.py`.
"""

dependencies = ["torch"]

from dinov2.hub.backbones import (  # noqa: E402  (torch.hub reads `dependencies` first)
    dinobloom_b,
    dinobloom_g,
    dinobloom_l,
    dinobloom_s,
    dinov2_vitb14,
    dinov2_vitg14,
    dinov2_vitl14,
    dinov2_vits14,
)

__all__ = [
    "dinobloom_b",
    "dinobloom_g",
    "dinobloom_l",
    "dinobloom_s",
    "dinov2_vitb14",
    "dinov2_vitg14",
    "dinov2_vitl14",
    "dinov2_vits14",
]
