"""Hub entry points (`dinobloom_s/b/l/g`, `dinov2_vit{s,b,l,g}14`) and `load_backbone` (also the `_reg` variants).

Nothing is downloaded unless `weights` is a URL or `pretrained=True`; the release URLs are listed below.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch.hub

from dinov2.models import HUB_MODELS, DinoVisionTransformer, arch_of_width, build_model

from .loader import (
    CheckpointError,
    infer_backbone_config,
    is_export_path,
    is_url,
    load_backbone_state,
    load_pretrained_backbone_state,
    release_pos_embed_grid,
)
from .releases import DINOBLOOM_URLS, DINOV2_URLS, RELEASE_URLS

logger = logging.getLogger(__name__)

WeightsArg = str | os.PathLike[str] | None


def _read_run_config(config_file: Path, weights: str | os.PathLike[str]) -> Any:
    """The run config ``config_file`` of ``weights``, unresolved (the run's variables are not ours), or None with a
    warning for a config of another tool or version."""
    from dinov2.configs import load_config  # deferred: configs import the models

    try:
        return load_config(config_file, resolve=False)
    except (ValueError, OSError) as err:
        logger.warning("ignoring %s while loading %s: %s", config_file, weights, err)
        return None


def _run_config_of(weights: str | os.PathLike[str]) -> tuple[Path, Any] | None:
    """The run config file of a training export ``<run>/eval/<name>/teacher_checkpoint.pth``, ``<run>/config.yaml``,
    and its content (unresolved); None for any other file (a release file, also one placed inside a run's folder), a
    URL, or a run config that is missing or cannot be read."""
    if is_url(weights):
        return None
    path = Path(weights).expanduser().resolve()
    if not is_export_path(path):
        return None
    config_file = path.parents[2] / "config.yaml"
    cfg = _read_run_config(config_file, weights) if config_file.is_file() else None
    return None if cfg is None else (config_file, cfg)


def run_image_size(weights: str | os.PathLike[str]) -> int | None:
    """The image size (``crops.global_crops_size``) that the training run of an export
    ``<run>/eval/<name>/teacher_checkpoint.pth`` trained at, from ``<run>/config.yaml``; None for any other file (a
    release file, also one placed inside a run's folder) or a run config that cannot be read."""
    found = _run_config_of(weights)
    return None if found is None else int(found[1].crops.global_crops_size)


#: DinoBloom's image size (its released files hold 16x16 patches of 14 px).
DINOBLOOM_IMAGE_SIZE = 224


def default_image_size(weights: WeightsArg) -> tuple[int, str | None]:
    """The size to resize images to for ``weights`` when none is asked for, and why (None: DinoBloom's 224 px).

    In order: the size the training run of an export ``<run>/eval/<name>/teacher_checkpoint.pth`` trained at (its
    ``config.yaml``, :func:`run_image_size`); for a local file in DinoBloom's release layout
    (``{"teacher": {"backbone.*", ...}}``, which training exports have, also when copied out of their run) whose
    position embedding covers another size than 224 px, the size its grid implies (grid x patch size); else 224:
    released DinoBloom files (16x16), DINOv2 hub files (plain state dicts, 37x37), other layouts, URLs and no
    weights.
    """
    if weights is None:
        return DINOBLOOM_IMAGE_SIZE, None
    trained_at = run_image_size(weights)
    if trained_at is not None:
        return trained_at, f"the size {weights} was trained at (crops.global_crops_size of its run's config.yaml)"
    grid = release_pos_embed_grid(weights)
    if grid is None or grid[0] * grid[1] == DINOBLOOM_IMAGE_SIZE:
        return DINOBLOOM_IMAGE_SIZE, None
    side, patch = grid
    return side * patch, (
        f"the size that the {side}x{side} position-embedding grid of {weights} implies, with {patch} px patches (no "
        "config.yaml of its training run found next to it)"
    )


def check_image_size(model: torch.nn.Module, size: int, setting: str = "--img-size") -> None:
    """Raise a ValueError naming ``setting`` when ``size`` px is not a whole number of ``model``'s patches (a model
    without a ``patch_size`` is not checked)."""
    patch = getattr(model, "patch_size", None)
    if isinstance(patch, int) and size % patch:
        lower, upper = size - size % patch, size - size % patch + patch
        nearest = f"{lower} or {upper}" if lower > 0 else str(upper)
        raise ValueError(f"{setting} {size} is not a multiple of the model's patch size {patch} (e.g. {nearest})")


def run_config_settings(weights: str | os.PathLike[str], inferred: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that weight shapes cannot tell (heads, interpolation), from the training run a file belongs to.

    A training export lives at ``<run>/eval/training_<it>/teacher_checkpoint.pth`` next to ``<run>/config.yaml``;
    when that config describes a backbone of the same width and depth, its head count and position-embedding
    interpolation settings are used instead of DINOv2's conventions (head dimension 64). Any other file gets none
    (as for :func:`run_image_size`).
    """
    found = _run_config_of(weights)
    if found is None:  # fall back to the shapes
        return {}
    config_file, cfg = found
    from dinov2.configs import resolve_arch  # deferred: configs import the models

    arch = resolve_arch(cfg).kwargs  # (load_config checked it already)
    if (arch["embed_dim"], arch["depth"]) != (inferred["embed_dim"], inferred["depth"]):
        return {}
    settings = {key: arch[key] for key in ("num_heads", "interpolate_antialias", "interpolate_offset")}
    logger.info("architecture of %s completed from its run's %s: %s", weights, config_file, settings)
    return settings


def load_backbone(
    name: str | None,
    weights: WeightsArg = None,
    img_size: int | None = None,
    *,
    pretrained: bool = False,
    **kwargs: Any,
) -> DinoVisionTransformer:
    """Build a backbone by hub name (or infer it from `weights` when `name` is None), load weights, eval mode.

    `weights` is a path or URL of any layout the strict loader accepts; None gives a random init with a
    `UserWarning` (`dinov2.models.build_model` builds one on purpose, silently), unless `pretrained=True`, which
    downloads the entry's release file (`DINOBLOOM_URLS`, `DINOV2_URLS`).
    `img_size=None` means 224 px for the `dinobloom_*` entries (a DINOv2 file's 37×37 position embedding is
    resized bicubically once, at load time, as DinoBloom did) and, for the `dinov2_*` entries and `name=None`,
    the checkpoint's own size (so a DinoBloom file stays at 224 px inside a `dinov2_*` model, as DinoBloom's
    loader does) or, without weights, the entry's default. Any other `img_size` resamples the position embedding
    once, at load time, exactly as the checkpoint's model does at run time for images of that size, so the
    model gives the features the checkpoint's own model gives on them. `kwargs` override constructor arguments
    other than the size, which a hub name fixes.
    """
    if img_size is not None and img_size <= 0:
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size}")
    if pretrained and weights is None:
        if name not in RELEASE_URLS:
            raise ValueError(f"pretrained=True needs a released entry ({', '.join(RELEASE_URLS)}), got {name!r}")
        weights = RELEASE_URLS[name]
    # DinoBloom's start-of-training resize applies to its 224 px entries; any other requested size keeps the
    # checkpoint's run-time features (see the docstring).
    dinobloom_default = name is not None and name.startswith("dinobloom") and img_size == 224
    as_at_run_time = img_size is not None and not dinobloom_default
    state = load_pretrained_backbone_state(weights) if weights is not None else None
    if name is None:
        if state is None:
            raise ValueError("load_backbone needs a model name, or weights to infer the architecture from")
        config = infer_backbone_config(state)
        from_run = run_config_settings(weights, config)
        config.update(from_run)
        if "num_heads" not in from_run and "num_heads" not in kwargs and arch_of_width(config["embed_dim"]) is None:
            logger.warning(
                "%s: a %d-wide backbone's head count cannot be read from its weights; assuming %d (%d per head). "
                "If it was trained with another, keep the file where its run wrote it "
                "(<run>/eval/<name>/teacher_checkpoint.pth, whose run's config.yaml gives the count) or pass "
                "num_heads=... to load_backbone",
                weights, config["embed_dim"], config["num_heads"],
                config["embed_dim"] // config["num_heads"],
            )
        _warn_if_register_interpolation_is_a_guess(weights, config, {**from_run, **kwargs})
        if img_size is not None:
            config["img_size"] = img_size
        model = _without_random_init(lambda: DinoVisionTransformer(**{**config, **kwargs}), kwargs)
    else:
        if name not in HUB_MODELS:
            raise ValueError(f"unknown backbone {name!r}; expected one of: {', '.join(HUB_MODELS)}")
        if img_size is None and state is not None and "pos_embed" in state and not name.startswith("dinobloom"):
            patch_size = kwargs.get("patch_size", HUB_MODELS[name][1]["patch_size"])
            img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * patch_size
        if img_size is not None:
            kwargs["img_size"] = img_size
        if state is None:
            model = build_model(name, **kwargs)
            _warn_random_init(name)
        else:
            model = _without_random_init(lambda: build_model(name, **kwargs), kwargs)
    if img_size is not None:
        check_image_size(model, img_size, "img_size")
    if state is not None:
        hint = "" if name is None else (
            f"load_backbone(None, {str(weights)!r}) builds the checkpoint's own architecture "
            f"(the command-line tools: leave out --model {name}, on the command line and in a --config file)"
        )
        load_backbone_state(model, state, source=str(weights), as_at_run_time=as_at_run_time, hint=hint)
    return model.eval()


def _warn_if_register_interpolation_is_a_guess(
    weights: WeightsArg, config: Mapping[str, Any], given: Mapping[str, Any]
) -> None:
    """Warn when a training export with registers, away from its run's config.yaml, gets DINOv2's ``_reg``
    interpolation settings by assumption: a run with registers from scratch used its config's (by default no
    antialiasing, offset 0.1), and only inputs of other sizes than the one it trained at would tell them apart."""
    if not config["num_register_tokens"] or {"interpolate_antialias", "interpolate_offset"} & set(given):
        return
    if release_pos_embed_grid(weights) is None:  # a DINOv2 hub file: its _reg settings are the hub's own
        return
    logger.warning(
        "%s: a training export with registers, away from its run's config.yaml: the position embedding is assumed "
        "to be interpolated for other input sizes as DINOv2's _reg models do (antialias, offset 0); if its run set "
        "student.interpolate_antialias/interpolate_offset otherwise (by default false and 0.1), pass "
        "interpolate_antialias=..., interpolate_offset=... (the size it trained at is not affected)", weights,
    )


def _without_random_init(
    build: Callable[[], DinoVisionTransformer], kwargs: Mapping[str, Any]
) -> DinoVisionTransformer:
    """``build()`` on the meta device, then given uninitialised CPU memory: for a model whose every tensor the strict
    load then replaces, the random initialisation is wasted work (ViT-g: about 15 s on a CPU). Layers of the
    caller's own (``block_fn``, ``act_layer``, ... in ``kwargs``) may hold tensors that no state dict restores, so
    such a model is built as usual."""
    if any(callable(value) for value in kwargs.values()):
        return build()
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def _warn_random_init(name: str) -> None:
    """Warn that hub entry `name` was built without weights, in a way a notebook shows (it has no log handler)."""
    release = Path(urlparse(RELEASE_URLS[name]).path).name
    warnings.warn(
        f"{name} is randomly initialised (no weights given), so its features are meaningless; load weights with "
        f'weights="{release}" (a path or URL) or pretrained=True (downloads it). For a random backbone on purpose, '
        f'use dinov2.models.build_model("{name}")',
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The stacklevel, for a `warnings.warn` in the calling function, of the first frame outside our hub and torch's."""
    # A user reaches load_backbone directly, through an entry point or through torch.hub.load; a fixed stacklevel
    # would name our code for two of them (warnings.warn's skip_file_prefixes needs Python 3.12).
    internal = (str(Path(__file__).parent) + os.sep, str(Path(torch.hub.__file__)))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def dinobloom_s(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DinoBloom-S: ViT-S/14 (384-d features, 22M parameters) for single blood-cell images at 224 px.

    weights: path or URL of a checkpoint (released file: DINOBLOOM_URLS["dinobloom_s"] =
    https://zenodo.org/records/10908163/files/DinoBloom-S.pth); None = random init (pretrained=True: the release file).
    img_size: input size (default 224; a checkpoint's position embedding is resized to it once, at load).
    Returns the model in eval mode; `model(x)` gives the CLS token after the final LayerNorm.
    """
    return load_backbone("dinobloom_s", weights, img_size, pretrained=pretrained, **kwargs)


def dinobloom_b(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DinoBloom-B: ViT-B/14 (768-d features, 86M parameters) for single blood-cell images at 224 px.

    weights: path or URL of a checkpoint (released file: DINOBLOOM_URLS["dinobloom_b"] =
    https://zenodo.org/records/10908163/files/DinoBloom-B.pth); None = random init (pretrained=True: the release file).
    img_size: input size (default 224; a checkpoint's position embedding is resized to it once, at load).
    Returns the model in eval mode; `model(x)` gives the CLS token after the final LayerNorm.
    """
    return load_backbone("dinobloom_b", weights, img_size, pretrained=pretrained, **kwargs)


def dinobloom_l(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DinoBloom-L: ViT-L/14 (1024-d features, 303M parameters) for single blood-cell images at 224 px.

    weights: path or URL of a checkpoint (released file: DINOBLOOM_URLS["dinobloom_l"] =
    https://zenodo.org/records/10908163/files/DinoBloom-L.pth); None = random init (pretrained=True: the release file).
    img_size: input size (default 224; a checkpoint's position embedding is resized to it once, at load).
    Returns the model in eval mode; `model(x)` gives the CLS token after the final LayerNorm.
    """
    return load_backbone("dinobloom_l", weights, img_size, pretrained=pretrained, **kwargs)


def dinobloom_g(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DinoBloom-G: ViT-g/14 with SwiGLU (1536-d features, 1.1B parameters) for blood cells at 224 px.

    weights: path or URL of a checkpoint (released file: DINOBLOOM_URLS["dinobloom_g"] =
    https://zenodo.org/records/10908163/files/DinoBloom-G.pth); None = random init (pretrained=True: the release file).
    img_size: input size (default 224; a checkpoint's position embedding is resized to it once, at load).
    Returns the model in eval mode; `model(x)` gives the CLS token after the final LayerNorm.
    """
    return load_backbone("dinobloom_g", weights, img_size, pretrained=pretrained, **kwargs)


def dinov2_vits14(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 as built by DINOv2's torch.hub (518 px position embedding, LayerScale 1.0).

    weights: path or URL (original weights: DINOV2_URLS["dinov2_vits14"]), or a DinoBloom-S file;
    None = random init (pretrained=True: the original weights). img_size: resize the position embedding (default:
    the checkpoint's, else 518).
    """
    return load_backbone("dinov2_vits14", weights, img_size, pretrained=pretrained, **kwargs)


def dinov2_vitb14(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 as built by DINOv2's torch.hub (518 px position embedding, LayerScale 1.0).

    weights: path or URL (original weights: DINOV2_URLS["dinov2_vitb14"]), or a DinoBloom-B file;
    None = random init (pretrained=True: the original weights). img_size: resize the position embedding (default:
    the checkpoint's, else 518).
    """
    return load_backbone("dinov2_vitb14", weights, img_size, pretrained=pretrained, **kwargs)


def dinov2_vitl14(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 as built by DINOv2's torch.hub (518 px position embedding, LayerScale 1.0).

    weights: path or URL (original weights: DINOV2_URLS["dinov2_vitl14"]), or a DinoBloom-L file;
    None = random init (pretrained=True: the original weights). img_size: resize the position embedding (default:
    the checkpoint's, else 518).
    """
    return load_backbone("dinov2_vitl14", weights, img_size, pretrained=pretrained, **kwargs)


def dinov2_vitg14(
    *, weights: WeightsArg = None, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 (SwiGLU FFN) as built by DINOv2's torch.hub (518 px position embedding).

    weights: path or URL (original weights: DINOV2_URLS["dinov2_vitg14"]), or a DinoBloom-G file;
    None = random init (pretrained=True: the original weights). img_size: resize the position embedding (default:
    the checkpoint's, else 518).
    """
    return load_backbone("dinov2_vitg14", weights, img_size, pretrained=pretrained, **kwargs)


__all__ = [
    "DINOBLOOM_URLS",
    "DINOV2_URLS",
    "RELEASE_URLS",
    "CheckpointError",
    "dinobloom_b",
    "dinobloom_g",
    "dinobloom_l",
    "dinobloom_s",
    "dinov2_vitb14",
    "dinov2_vitg14",
    "dinov2_vitl14",
    "dinov2_vits14",
    "load_backbone",
]
