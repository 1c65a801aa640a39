"""The one strict loader for backbone weights: DinoBloom releases, DINOv2 hub files, our own checkpoints.

Accepted layouts (after `torch.load(weights_only=True)` or safetensors):

* `{"teacher": {...}}` (DinoBloom / our training runs): `dino_head.*` and `ibot_head.*` are dropped,
  `backbone.` is stripped;
* `{"model": {...}}` or `{"state_dict": {...}}` wrappers; inside them, `teacher.backbone.*` keys of a
  full DINOv2 training checkpoint are selected;
* a plain backbone state dict (DINOv2 hub files, `.safetensors` files with DINOv2 key names);
* DDP's leading `module.` and torch.compile's `_orig_mod.` (at any depth) are removed;
* DINOv2's chunked block keys `blocks.{chunk}.{i}.` are mapped to flat `blocks.{i}.`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.hub.releases import release_url_of_file
from dinov2.models.vision_transformer import ARCH_SIZES, arch_of_width, resample_pos_embed

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("dino_head.", "ibot_head.")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
_PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle, protocol 2+
_CHECKSUM_CHUNK = 1 << 24
_CHUNKED_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_FLAT_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FIRST_SENTENCE = re.compile(r"\s{2,}|\. (?=[A-Z])")  # where the first sentence of a message ends
# weights_only unpickling's words for a class or function it refuses (a damaged stream gives other words, or a
# "global" whose name is no Python name)
_REFUSED_GLOBAL = re.compile(
    r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?: was not an| whose module)"
)


class CheckpointError(RuntimeError):
    """A weights file or training checkpoint that cannot be loaded: unreadable, incomplete, or not fitting the model."""


def is_url(path_or_url: str | os.PathLike[str]) -> bool:
    """Whether ``path_or_url`` is an http(s) or ftp address rather than a local path."""
    return urlparse(str(path_or_url)).scheme in ("http", "https", "ftp")


def _download(url: str) -> Path:
    """Download `url` once into torch.hub's checkpoint cache and return the local path.

    The cached copy lies in a folder named after the whole URL's hash: files of one name from different addresses
    (every training export is a `teacher_checkpoint.pth`) never stand in for one another.
    """
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = Path(torch.hub.get_dir()) / "checkpoints" / folder / Path(urlparse(url).path).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, target)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except OSError as err:  # URLError, HTTPError, timeouts, a full disk: the file is only moved in when complete
            raise CheckpointError(
                f"could not download {url} ({err}); download it by other means and pass its local path instead"
            ) from err
    return target


#: The file name of a training run's teacher exports, ``<run>/eval/<name>/teacher_checkpoint.pth`` (DINOv2's layout).
EXPORT_FILE_NAME = "teacher_checkpoint.pth"


def export_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where a run writes its teacher export ``name`` (``training_<iteration>``, ``training_init``,
    ``manual_<steps>``): ``<run_dir>/eval/<name>/teacher_checkpoint.pth``."""
    return Path(run_dir) / "eval" / name / EXPORT_FILE_NAME


def is_export_path(path: Path) -> bool:
    """Whether ``path`` is laid out as a run's teacher export, ``<run>/eval/<name>/teacher_checkpoint.pth``."""
    return path.name == EXPORT_FILE_NAME and path.parent.parent.name == "eval"


_TRAINING_EXPORT_HINT = (
    "a training run's backbone is in <run>/eval/training_<it>/teacher_checkpoint.pth (checkpoint folders hold the "
    "full training state; `python dinov2/train/train.py --config-file <run>/config.yaml --output-dir <run> "
    "--eval-only` exports the newest one's teacher)"
)


def _read_file(path: Path) -> Any:
    """Read a `.safetensors` or `torch.save` file without executing any pickled code."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; {_TRAINING_EXPORT_HINT}")
    if not path.is_file():
        url = release_url_of_file(path.name)
        hint = f"; it is a published file: download it from {url}, or give that URL instead" if url else ""
        raise CheckpointError(f"weights file not found: {path}{hint}")
    if path.suffix == ".distcp" or path.name == ".metadata" or (path.parent / ".metadata").is_file():
        raise CheckpointError(
            f"{path} is part of a torch.distributed.checkpoint folder ({path.parent}), not a weights file; "
            f"{_TRAINING_EXPORT_HINT}"
        )
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from err
    with path.open("rb") as f:
        magic = f.read(4)
    if not (magic.startswith(_ZIP_MAGIC) or magic.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, neither a torch.save zip archive "
            "nor a pickle); expected a .pth/.pt file from torch.save or a .safetensors file"
        )
    if magic.startswith(_ZIP_MAGIC):
        _check_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise CheckpointError(
                f"{path} contains pickled Python objects other than tensors and plain containers ({refused[1]}), "
                "which weights_only=True refuses to load; if you trust the file, re-save its state dict with "
                "torch.save(state_dict, new_path)"
            ) from err
        cause = re.search(r"WeightsUnpickler error: (.+)", str(err).replace("\n", "  "))
        shown = f" ({_FIRST_SENTENCE.split(cause[1].strip())[0]})" if cause else ""
        raise CheckpointError(
            f"{path} cannot be read: a truncated or damaged checkpoint (is the download complete?){shown}"
        ) from err
    except Exception as err:  # torch.load reports corrupt files with many exception types
        cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} cannot be read: a truncated or damaged checkpoint (is the download complete?) ({cause})"
        ) from err


def _check_zip_checksums(path: Path) -> None:
    """Raise a CheckpointError when a record of the ``torch.save`` archive ``path`` fails its CRC-32: torch.load does
    not check them, and would load a damaged tensor unsaid. Records saved without a checksum (CRC 0, PyTorch's
    ``set_crc32_options(False)``) are not checked; an archive too damaged to list is left to torch.load to name."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError):
        return
    with archive:
        for record in archive.infolist():
            if record.CRC == 0 and record.file_size > 0:
                continue
            try:
                with archive.open(record) as handle:  # (reading to the end checks the record's CRC-32)
                    while handle.read(_CHECKSUM_CHUNK):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError, zlib.error) as err:
                cause = str(err) or type(err).__name__
                # (the archive's top folder is named after the file as it was written: a temporary name, say)
                record_name = record.filename.split("/", 1)[-1]
                raise CheckpointError(
                    f"{path} cannot be read: a damaged checkpoint (its record {record_name}: {cause}); download or "
                    "copy it again"
                ) from None


def _strip_wrappers(key: str) -> str:
    """Remove DDP's leading `module.` and torch.compile's `_orig_mod.` (which may sit at any depth)."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def extract_backbone_state(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reduce a loaded checkpoint of any accepted layout to a plain backbone state dict with flat keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    inside = ""  # where in the file the weights were looked for, for the hint below
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj, inside = obj[wrapper], f"[{wrapper!r}]"
            break
    state = {_strip_wrappers(str(k)): v for k, v in obj.items()}
    if len(state) < len(obj):  # two keys name one tensor: which of the two is meant, no one can tell
        stripped: dict[str, list[str]] = {}
        for key in map(str, obj):
            stripped.setdefault(_strip_wrappers(key), []).append(key)
        twice = next(keys for keys in stripped.values() if len(keys) > 1)
        raise CheckpointError(
            f"{source}: {' and '.join(map(repr, twice))} both name {_strip_wrappers(twice[0])!r} once the "
            "`module.`/`_orig_mod.` prefixes are removed; keep one of them"
        )
    if any(k.startswith("teacher.backbone.") for k in state):
        state = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        nested = [k for k in not_tensors if isinstance(state[k], Mapping)]
        hint = (
            f"; {nested[0]!r} holds a dict: the loader looks for weights under 'teacher', 'model' or 'state_dict', so "
            f"save the one you want on its own, e.g. torch.save(checkpoint{inside}[{nested[0]!r}], 'backbone.pth')"
            if nested else ""
        )
        raise CheckpointError(f"{source}: entries that are not tensors: {', '.join(not_tensors[:10])}{hint}")
    if not state:
        raise CheckpointError(f"{source}: no backbone weights found (empty state dict)")
    return flatten_block_chunks(state)


def flatten_block_chunks(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map DINOv2's chunked `blocks.{chunk}.{i}.` keys to flat `blocks.{i}.` keys (others unchanged)."""
    out = {}
    for key, value in state.items():
        match = _CHUNKED_KEY.match(key)
        out[f"blocks.{match.group(2)}.{match.group(3)}" if match else key] = value
    return out


def load_pretrained_backbone_state(path_or_url: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a weights file or URL and return its backbone state dict with plain, flat DINOv2 keys.

    A download that is not a weights file (a server's error page, a damaged transfer) is removed from the cache, so
    that the next call downloads it again rather than fail on the same copy."""
    if not is_url(path_or_url):
        return extract_backbone_state(_read_file(Path(path_or_url).expanduser()), str(path_or_url))
    path = _download(str(path_or_url))
    try:
        content = _read_file(path)
    except CheckpointError as err:
        path.unlink(missing_ok=True)
        raise CheckpointError(
            f"{path_or_url}: the downloaded file cannot be used ({err}); it was removed from the cache, so the next "
            "attempt downloads it again"
        ) from None
    return extract_backbone_state(content, str(path_or_url))


def release_pos_embed_grid(path_or_url: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The patch-grid side and the patch size of the position embedding of a local file in DinoBloom's release
    layout, ``{"teacher": {"backbone.pos_embed", ...}}``, which training exports share; None for a URL, any other
    layout (DINOv2 hub files, plain state dicts, other wrappers, `.safetensors`), a grid that is not square, or a file
    that cannot be read (loading it says why).

    The file is memory-mapped where it can be: only the position embedding's and patch weights' shapes are read.
    """
    if is_url(path_or_url):
        return None
    path = Path(path_or_url).expanduser()
    if path.suffix.lower() == ".safetensors" or not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) torch.save file cannot be mapped; any other failure: not our call here
        try:
            obj = _read_file(path)
        except CheckpointError:
            return None
    if not (isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping)):
        return None
    try:
        state = extract_backbone_state({"teacher": obj["teacher"]}, str(path_or_url))
    except CheckpointError:
        return None
    pos, patch = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or patch is None or pos.ndim != 3 or pos.shape[1] < 2:
        return None
    side = math.isqrt(pos.shape[1] - 1)
    return (side, patch.shape[-1]) if side * side == pos.shape[1] - 1 else None


def resize_pos_embed_as_dinobloom(pos_embed: torch.Tensor, num_tokens: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, prefix + M*M, D) position embedding to `num_tokens` tokens as DinoBloom resized DINOv2's 37×37
    grid once, when it started training (to 16×16 for 224 px).

    The square patch grid is resized with bicubic `F.interpolate(size=...)` in float32 (no antialias,
    align_corners=False); the prefix (cls) rows are kept as they are. Not the run-time resampling of
    :func:`dinov2.models.vision_transformer.resample_pos_embed` (scale factor with DINOv2's offset, antialias as
    configured), which gives other values.
    """
    old_grid = pos_embed.shape[1] - num_prefix_tokens
    new_grid = num_tokens - num_prefix_tokens
    old_side, new_side = math.isqrt(old_grid), math.isqrt(new_grid)
    if old_side * old_side != old_grid or new_side * new_side != new_grid:
        raise CheckpointError(
            f"cannot resize pos_embed from {pos_embed.shape[1]} to {num_tokens} tokens: not square patch grids"
        )
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, num_prefix_tokens:].float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :num_prefix_tokens], grid), dim=1)


def _chunk_keys_for(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename flat block keys to the model's chunked `blocks.{chunk}.{i}.` keys when the model is chunked."""
    chunk_of_block = {}
    for key in model.state_dict():
        match = _CHUNKED_KEY.match(key)
        if match:
            chunk_of_block[match.group(2)] = match.group(1)
    if not chunk_of_block:
        return dict(state)
    out = {}
    for key, value in state.items():
        match = _FLAT_BLOCK_KEY.match(key)
        if match and match.group(1) in chunk_of_block:
            key = f"blocks.{chunk_of_block[match.group(1)]}.{match.group(1)}.{match.group(2)}"
        out[key] = value
    return out


def _format_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


_ARCHITECTURE_WORDS = {
    "embed_dim": "width {}",
    "depth": "{} blocks",
    "patch_size": "patch size {}",
    "num_register_tokens": "{} register tokens",
}


def _architecture_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """Both architectures side by side when `state` and `expected` are different backbones, else None.

    Compares width, depth and patch size (and register tokens when either side has some).
    """
    try:
        saved, built = (infer_backbone_config(flatten_block_chunks(s)) for s in (state, expected))
    except CheckpointError:  # not DINOv2 key names (a prefix?): the key lists say more
        return None
    fields = ["embed_dim", "depth", "patch_size"]
    if saved["num_register_tokens"] or built["num_register_tokens"]:
        fields.append("num_register_tokens")
    if all(saved[f] == built[f] for f in fields):
        return None

    def describe(config: Mapping[str, Any]) -> str:
        return ", ".join(_ARCHITECTURE_WORDS[f].format(config[f]) for f in fields)

    return f"checkpoint: {describe(saved)}; model: {describe(built)}"


def load_backbone_weights(model: nn.Module, path_or_url: str | os.PathLike[str]) -> nn.Module:
    """Strictly load backbone weights into `model`; resize `pos_embed` bicubically if its token count differs.

    Raises `CheckpointError` naming both architectures when they differ, else the missing, unexpected and
    mis-shaped keys (the first few of each); nothing is loaded then.
    """
    return load_backbone_state(model, load_pretrained_backbone_state(path_or_url), source=str(path_or_url))


def _timm_hint(state: Mapping[str, torch.Tensor]) -> str:
    """``; this looks like timm's layout ...`` for a state dict without DINOv2's ``mask_token`` (which every DINOv2
    file has, and ``scripts/export_timm.py`` drops) or with timm's ``reg_token``; else empty."""
    if "mask_token" in state and "reg_token" not in state:
        return ""
    return (
        "; this looks like timm's layout (scripts/export_timm.py drops mask_token): load it with timm, or load the "
        "file it was exported from"
    )


def load_backbone_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "state dict",
    *,
    as_at_run_time: bool = False,
    hint: str = "",
) -> nn.Module:
    """`load_backbone_weights` for a plain backbone state dict (flat or chunked block keys).

    A checkpoint of another width, depth, patch size or register count is refused with the two architectures
    (and `hint`, what the caller can do about it) instead of its key lists.

    A position embedding of another grid is resized as DinoBloom resized DINOv2's when it started training
    (:func:`resize_pos_embed_as_dinobloom`), or, with ``as_at_run_time``, exactly as the checkpoint's own model
    resamples it for an input of this model's size (:func:`resample_pos_embed`), so that this model computes the
    very features the checkpoint's model computes on such images.
    """
    state = _chunk_keys_for(model, flatten_block_chunks(state))
    expected = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in expected and pos.shape != expected["pos_embed"].shape:
        target = expected["pos_embed"].shape
        if pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[2] == target[2]:
            logger.info("resizing pos_embed from %d to %d tokens (bicubic)", pos.shape[1], target[1])
            if as_at_run_time and math.isqrt(target[1] - 1) ** 2 == target[1] - 1:
                size = math.isqrt(target[1] - 1) * model.patch_size
                resampled = resample_pos_embed(
                    pos, model.patch_size, size, size, model.interpolate_offset, model.interpolate_antialias
                )
                state["pos_embed"] = resampled  # float32, as the run-time resampling; loading casts it once
            else:
                try:
                    state["pos_embed"] = resize_pos_embed_as_dinobloom(pos, target[1])
                except CheckpointError as err:
                    raise CheckpointError(f"{source}: {err}{_timm_hint(state)}") from None
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        # Another size of ViT mismatches almost every key; the two architectures say what is wrong in one line.
        mismatch = _architecture_mismatch(state, expected)
        if mismatch is not None:
            message = f"{source} is another architecture than the model ({mismatch})"
            raise CheckpointError(message + (f"; {hint}" if hint else ""))
        problems = []
        if missing:
            problems.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_format_keys(unexpected)}")
        if mis_shaped:
            problems.append(f"mis-shaped keys: {_format_keys(mis_shaped)}")
        prefix = _common_extra_prefix(unexpected, missing)
        if prefix:
            problems.append(
                f"every unexpected key starts with {prefix!r}, and without it names a missing key: strip it, e.g. "
                f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}"
            )
        if "mask_token" in missing and set(missing) <= {"mask_token", "register_tokens"}:  # every DINOv2 file has it
            problems.append(_timm_hint(state).removeprefix("; "))
        raise CheckpointError(f"{source} does not match the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def _common_extra_prefix(unexpected: list[str], missing: list[str]) -> str | None:
    """The prefix (``encoder.``) that all of ``unexpected`` carry and that, removed, turns each into a key of
    ``missing``; None if there is no such prefix."""
    if not unexpected or not missing:
        return None
    prefix = unexpected[0].split(".", 1)[0] + "."
    stripped = {key.removeprefix(prefix) for key in unexpected if key.startswith(prefix)}
    if len(stripped) == len(unexpected) and stripped <= set(missing):
        return prefix
    return None


def conventional_num_heads(embed_dim: int) -> int:
    """The head count that weights of width ``embed_dim`` imply, which they cannot record: DINOv2's for its
    architectures, else one head per 64 dimensions (at least one)."""
    arch = arch_of_width(embed_dim)
    return ARCH_SIZES[arch][2] if arch else max(embed_dim // 64, 1)


def infer_backbone_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments of `DinoVisionTransformer` inferred from the shapes of a flat backbone state dict.

    Heads follow DINOv2 (head dim 64); registers imply the hub `_reg` interpolation settings.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(f"cannot infer the architecture: no {', '.join(absent)} in the checkpoint")
    embed_dim = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    patch_size = patch_weight.shape[-1]
    block_ids = {int(m.group(1)) for k in state if (m := _FLAT_BLOCK_KEY.match(k))}
    depth = max(block_ids) + 1 if block_ids else 0
    n_registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    config: dict[str, Any] = dict(
        img_size=side * patch_size,
        patch_size=patch_size,
        in_chans=patch_weight.shape[1],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=conventional_num_heads(embed_dim),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=n_registers,
        interpolate_antialias=bool(n_registers),
        interpolate_offset=0.0 if n_registers else 0.1,
    )
    if "blocks.0.mlp.w12.weight" in state:
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
        config.update(ffn_layer="swiglufused", ffn_bias="blocks.0.mlp.w12.bias" in state)
        config["mlp_ratio"] = _swiglu_mlp_ratio(embed_dim, hidden)
    elif "blocks.0.mlp.fc1.weight" in state:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        ratio = mlp_ratio_for(hidden, embed_dim)
        config.update(ffn_layer="mlp", ffn_bias="blocks.0.mlp.fc1.bias" in state, mlp_ratio=ratio)
    elif depth:
        config["ffn_layer"] = "identity"
    return config


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """An mlp_ratio with ``int(dim * ratio) == hidden`` (a float ratio can truncate to one below)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else math.nextafter(ratio, math.inf)


def _swiglu_mlp_ratio(embed_dim: int, hidden: int) -> float:
    """An mlp_ratio for which DINOv2's SwiGLU rule `(int(int(D*r)*2/3)+7)//8*8` gives `hidden`."""
    from dinov2.layers import swiglu_hidden_features

    for ratio in (4.0, hidden * 1.5 / embed_dim):
        if swiglu_hidden_features(int(embed_dim * ratio)) == hidden:
            return ratio
    raise CheckpointError(f"SwiGLU hidden width {hidden} (embed dim {embed_dim}) fits no mlp_ratio")
