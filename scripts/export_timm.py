"""Export a DinoBloom / DINOv2 backbone to a `.safetensors` file in timm's ViT layout.

    python scripts/export_timm.py --weights DinoBloom-S.pth --output dinobloom_s_timm.safetensors

then, in timm (the exported file records the model name and keyword arguments in its metadata):

    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, pretrained=True,
                              pretrained_cfg_overlay=dict(file="dinobloom_s_timm.safetensors", input_size=(3, 224, 224),
                                                          interpolation="bilinear", crop_pct=1.0, crop_mode="squash"))

The last four overlay entries make `timm.data.resolve_model_data_config(model)` describe DinoBloom's evaluation
preprocessing (`Resize((224, 224))` bilinear, ImageNet normalisation) instead of timm's 518 px bicubic default.

Key mapping (what timm's own DINOv2 converter does): `mask_token` is dropped; SwiGLU `mlp.w12`/`mlp.w3`
become `mlp.fc1`/`mlp.fc2` (timm's packed SwiGLU); with registers, `register_tokens` becomes `reg_token`,
the cls row of `pos_embed` is folded into `cls_token` and `pos_embed` keeps only the patch rows (timm's
`no_embed_class` models). Everything else keeps its name. timm interpolates position embeddings
differently, so outputs match ours at the exported image size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from a checkout: make `dinov2` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for every command

import torch  # noqa: E402

from dinov2.cli import check_file_writable, positive_int  # noqa: E402
from dinov2.hub import load_backbone  # noqa: E402
from dinov2.hub.loader import flatten_block_chunks, mlp_ratio_for  # noqa: E402
from dinov2.layers import LayerScale  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402
from dinov2.models import ARCH_SIZES, DinoVisionTransformer, arch_of_width  # noqa: E402

logger = logging.getLogger(__name__)

# timm's size names of DINOv2's architectures; a SwiGLU backbone maps to the giant model, another width to small.
_TIMM_SIZE_NAMES = {"vit_small": "small", "vit_base": "base", "vit_large": "large", "vit_giant2": "giant"}
_TIMM_SWIGLU_RATIO = 2.66667 * 2  # timm's vit_giant_patch14_dinov2 default (packed w12 width / dim)


def timm_model_config(model: DinoVisionTransformer) -> tuple[str, dict[str, Any]]:
    """The timm model name and the `timm.create_model` keyword arguments that rebuild `model`'s layout."""
    dim, swiglu, registers = model.embed_dim, _is_swiglu(model), model.num_register_tokens
    arch = "vit_giant2" if swiglu else arch_of_width(dim) or "vit_small"
    size, (default_dim, depth, heads) = _TIMM_SIZE_NAMES[arch], ARCH_SIZES[arch]
    name = f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2"
    kwargs: dict[str, Any] = {"img_size": model.patch_embed.img_size[0], "num_classes": 0}
    for key, value, default in (
        ("patch_size", model.patch_size, 14),
        ("embed_dim", dim, default_dim),
        ("num_heads", model.num_heads, heads),
        ("depth", model.n_blocks, depth),
        ("reg_tokens", registers, 4 if registers else 0),
    ):
        if value != default:
            kwargs[key] = value
    block = _first_block(model)
    if not isinstance(block.ls1, LayerScale):  # timm's DINOv2 models have LayerScale; a falsy value drops it
        kwargs["init_values"] = 0.0  # (None would not do: timm.create_model discards None arguments)
    if block.attn.qkv.bias is None:
        kwargs["qkv_bias"] = False
    # timm's proj_bias covers the attention output and both feed-forward layers together.
    proj_bias, ffn_bias = block.attn.proj.bias is not None, _first_layer_of(block.mlp).bias is not None
    if proj_bias != ffn_bias:
        raise ValueError(
            f"timm's ViT has one switch for the biases of the attention output and the feed-forward; this backbone "
            f"has proj_bias={proj_bias} and ffn_bias={ffn_bias}, so it cannot be exported"
        )
    if not proj_bias:
        kwargs["proj_bias"] = False
    hidden = _ffn_hidden(model)
    if swiglu and int(dim * _TIMM_SWIGLU_RATIO) != 2 * hidden:
        kwargs["mlp_ratio"] = mlp_ratio_for(2 * hidden, dim)  # timm's packed SwiGLU counts both halves
    elif not swiglu and hidden != int(dim * 4):
        kwargs["mlp_ratio"] = mlp_ratio_for(hidden, dim)
    return name, kwargs


def _first_block(model: DinoVisionTransformer) -> torch.nn.Module:
    return next(model.iter_blocks())


def _is_swiglu(model: DinoVisionTransformer) -> bool:
    return hasattr(_first_block(model).mlp, "w12")


def _first_layer_of(mlp: torch.nn.Module) -> torch.nn.Linear:
    """The input projection of an MLP (`fc1`) or SwiGLU (`w12`) feed-forward."""
    return mlp.w12 if hasattr(mlp, "w12") else mlp.fc1


def _ffn_hidden(model: DinoVisionTransformer) -> int:
    mlp = _first_block(model).mlp
    return mlp.w3.in_features if hasattr(mlp, "w3") else mlp.fc1.out_features


def timm_state_dict(model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """`model`'s weights renamed to timm's VisionTransformer keys (see the module docstring)."""
    state = flatten_block_chunks(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value.detach().clone().contiguous()
    if model.num_register_tokens:
        out["reg_token"] = out.pop("register_tokens")
        pos_embed = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:].contiguous()
    return out


def export_timm(
    weights: str | Path,
    output: str | Path,
    model: str | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> tuple[Path, str, dict[str, Any]]:
    """Load `weights` (any layout the strict loader accepts) and write the timm `.safetensors` export.

    `num_heads`: the head count of a training export away from its run's config.yaml whose width has no DINOv2
    convention (the weights cannot tell it)."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"the export must be a .safetensors file, got {output}")
    check_file_writable(output)  # before the weights are read
    backbone = load_backbone(model, weights, img_size, **({"num_heads": num_heads} if num_heads else {}))
    name, kwargs = timm_model_config(backbone)
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs), "source": str(weights)}
    save_file(timm_state_dict(backbone), str(output), metadata=metadata)
    # safetensors creates the file private (0600); give it the permissions of any other new file.
    umask = os.umask(0)
    os.umask(umask)
    output.chmod(0o666 & ~umask)
    return output, name, kwargs


def timm_preprocessing(img_size: int) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` entries that make timm's data config DinoBloom's evaluation preprocessing
    (``Resize((img_size, img_size))`` bilinear, ImageNet normalisation)."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Export a DinoBloom / DINOv2 backbone to timm's safetensors layout.")
    parser.add_argument("--weights", required=True, help="checkpoint path or URL (any layout the loader accepts)")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--model", default=None, help="hub entry name; omit to infer it from the weights")
    parser.add_argument("--img-size", type=int, default=None, help="resize the position embedding first")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="attention heads of a training export copied out of its run (the weights cannot tell)")
    args = parser.parse_args(argv)
    setup_logging()
    output, name, kwargs = export_timm(args.weights, args.output, args.model, args.img_size, args.num_heads)
    call = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in kwargs.items())])
    overlay_items = {"file": str(output), **timm_preprocessing(kwargs["img_size"])}
    overlay = ", ".join(f"{k}={v!r}" for k, v in overlay_items.items())
    print(f"wrote {output}; load it with timm.create_model({call}, pretrained=True, "
          f"pretrained_cfg_overlay=dict({overlay}))")
    return output


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
