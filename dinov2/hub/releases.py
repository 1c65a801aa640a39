"""Where the published weights are: the DinoBloom release and the DINOv2 backbones it started from."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

_ZENODO = "https://zenodo.org/records/10908163/files"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"

#: The released DinoBloom teacher checkpoints (Koch et al., MICCAI 2024), `{"teacher": ...}` files.
DINOBLOOM_URLS: dict[str, str] = {
    "dinobloom_s": f"{_ZENODO}/DinoBloom-S.pth",
    "dinobloom_b": f"{_ZENODO}/DinoBloom-B.pth",
    "dinobloom_l": f"{_ZENODO}/DinoBloom-L.pth",
    "dinobloom_g": f"{_ZENODO}/DinoBloom-G.pth",
}

#: The original DINOv2 LVD-142M backbones (plain state dicts, 518 px position embedding).
DINOV2_URLS: dict[str, str] = {
    **{f"dinov2_vit{s}14": f"{_DINOV2}/dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth" for s in "sblg"},
    **{f"dinov2_vit{s}14_reg": f"{_DINOV2}/dinov2_vit{s}14/dinov2_vit{s}14_reg4_pretrain.pth" for s in "sblg"},
}

#: Every hub entry with published weights and their URL.
RELEASE_URLS: dict[str, str] = {**DINOBLOOM_URLS, **DINOV2_URLS}


def release_url_of_file(name: str) -> str | None:
    """The URL of the published file called ``name`` (e.g. "DinoBloom-S.pth"), or None."""
    return next((url for url in RELEASE_URLS.values() if Path(urlparse(url).path).name == name), None)
