"""PCA visualisation of patch features, as in DinoBloom's notebook.

    python -m dinov2.eval.pca --model dinobloom_s --weights DinoBloom-S.pth --image a.jpg b.jpg --output pca.png

The normalised patch tokens of all images are pooled; the first principal component,
min-max scaled to [0, 1] and thresholded, separates the cell from the background; a
second PCA on the foreground patches gives three components, each min-max scaled, shown
as RGB (background black), upsampled to the image and drawn next to it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dinov2.cli import check_file_writable, positive_int

logger = logging.getLogger(__name__)

FOREGROUND_MODES = ("auto", "above", "below")


def principal_components(x: np.ndarray, n_components: int) -> np.ndarray:
    """Projections (N, n_components) of the rows of x onto their leading principal axes."""
    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:n_components].T


def _minmax(x: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1] (constant columns become 0)."""
    low, high = x.min(axis=0), x.max(axis=0)
    return (x - low) / np.where(high > low, high - low, 1.0)


def foreground_mask(first: np.ndarray, threshold: float = 0.5, mode: str = "auto") -> np.ndarray:
    """Foreground patches (B, h, w) from the scaled first component (B, h, w).

    ``above``/``below`` keep patches above/below the threshold. The sign of a principal
    component is arbitrary, so ``auto`` calls background the side that holds most of the
    patches on the image borders (a single cell is centred in its crop).
    """
    if mode not in FOREGROUND_MODES:
        raise ValueError(f"foreground mode must be one of {FOREGROUND_MODES}, got {mode!r}")
    above = first > threshold
    if mode == "auto":
        border = np.ones(first.shape[1:], dtype=bool)
        border[1:-1, 1:-1] = False
        mode = "below" if above[:, border].mean() > 0.5 else "above"
    return above if mode == "above" else ~above


def patch_pca_rgb(
    patch_tokens: np.ndarray, threshold: float = 0.5, foreground: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """RGB maps (B, h, w, 3) in [0, 1] and foreground masks (B, h, w) from patch tokens (B, h, w, D)."""
    batch, h, w, dim = patch_tokens.shape
    flat = patch_tokens.reshape(-1, dim)
    first = _minmax(principal_components(flat, 1))[:, 0].reshape(batch, h, w)
    mask = foreground_mask(first, threshold, foreground)
    rgb = np.zeros((batch * h * w, 3), dtype=np.float64)
    selected = mask.reshape(-1)
    if selected.sum() >= 3:
        rgb[selected] = _minmax(principal_components(flat[selected], 3))
    else:
        logger.warning("fewer than 3 foreground patches at threshold %.2f: the PCA map is empty", threshold)
    return rgb.reshape(batch, h, w, 3), mask


@torch.inference_mode()
def patch_tokens_of(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Normalised patch tokens (B, h, w, D) of preprocessed images (B, 3, H, W)."""
    out = model.forward_features(images)
    tokens = out["x_norm_patchtokens"]
    grid_h, grid_w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return tokens.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1]).float().cpu().numpy()


def save_figure(images: Sequence[np.ndarray], rgb_maps: np.ndarray, titles: Sequence[str], path: str | Path) -> Path:
    """Each input image next to its PCA map (nearest-neighbour upsampled), one row per image, as a PNG."""
    from dinov2.eval.reports import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(images), 2, figsize=(6, 3 * len(images)), squeeze=False)
    for row, (image, rgb, title) in enumerate(zip(images, rgb_maps, titles)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(title, fontsize=8)
        axes[row, 1].imshow(rgb, interpolation="nearest", extent=(0, image.shape[1], image.shape[0], 0))
        axes[row, 1].set_title("patch-feature PCA (RGB = PC 1-3 of foreground)", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def figure_path(output: str) -> Path:
    """The file ``--output`` names, ``.png`` added when it has no suffix; ValueError for another format or a path
    that cannot be written."""
    path = Path(output)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise ValueError(f"--output {output}: a figure is written as {', '.join(FIGURE_SUFFIXES)}; got {path.suffix!r}")
    check_file_writable(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m dinov2.eval.pca``."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.pca", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of option values (keys = option names); flags override it")
    parser.add_argument("--model", default=None, help="hub name (dinobloom_s, ...); omit to infer it from --weights")
    parser.add_argument("--weights", default=None,
                        help="checkpoint path or URL (default: the released weights of --model, downloaded)")
    parser.add_argument("--image", nargs="+", required=True, help="one or more cell images")
    parser.add_argument("--output", required=True,
                        help="figure to write: .png (added when there is no suffix), .pdf, .svg or .jpg")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="input size (default: for a training run's teacher_checkpoint.pth the size it trained at, "
                        "its run's crops.global_crops_size or, copied out of its run, the size its position-embedding "
                        "grid implies; else 224: 16x16 patches)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="background cut on the scaled first component (default 0.5)")
    parser.add_argument("--foreground", choices=FOREGROUND_MODES, default="auto",
                        help="side of the threshold kept (default auto)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Render the PCA figure of the given images."""
    from dinov2.data.transforms import IMAGE_LOAD_ERRORS, load_image, make_eval_transform
    from dinov2.eval import protocol
    from dinov2.eval.extract_features import release_weights
    from dinov2.hub import load_backbone
    from dinov2.hub.backbones import check_image_size, default_image_size
    from dinov2.logs import setup_logging

    args = protocol.parse_args_with_config(build_parser(), argv)
    setup_logging()
    output = figure_path(args.output)  # checked before the model is loaded
    device = protocol.resolve_device(args.device)
    if args.model is None and args.weights is None:
        raise ValueError("give --model, --weights, or both")
    weights = args.weights if args.weights is not None else release_weights(args.model)
    model = load_backbone(args.model, weights).to(device)
    img_size, why = (args.img_size, None) if args.img_size else default_image_size(weights)
    if why is not None:
        logger.info("images resized to %d px, %s (--img-size to change)", img_size, why)
    check_image_size(model, img_size)
    transform = make_eval_transform(img_size)
    pictures = []
    for path in args.image:
        try:
            pictures.append(load_image(path))
        except IMAGE_LOAD_ERRORS as err:
            raise ValueError(f"--image {path}: not a readable image ({type(err).__name__}: {err})") from err
    batch = torch.stack([transform(p) for p in pictures]).to(device)
    rgb, mask = patch_pca_rgb(patch_tokens_of(model, batch), args.threshold, args.foreground)
    logger.info("foreground: %.1f%% of patches", 100.0 * mask.mean())
    path = save_figure([np.asarray(p) for p in pictures], rgb, [Path(p).name for p in args.image], output)
    print(path)
    return path


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
