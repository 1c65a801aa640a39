"""The strict weight loader, architecture inference, hub entry points and the timm export."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.transforms import make_eval_transform
from dinov2.hub import (
    CheckpointError,
    infer_backbone_config,
    load_backbone,
    load_backbone_weights,
    load_pretrained_backbone_state,
    resize_pos_embed_as_dinobloom,
)
from dinov2.models import DinoVisionTransformer, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_model(**kwargs: Any) -> DinoVisionTransformer:
    """A small randomly initialised backbone (head dim 64, so the head count is inferable)."""
    torch.manual_seed(0)
    defaults = dict(img_size=56, embed_dim=128, depth=2, num_heads=2, init_values=1.0)
    model = DinoVisionTransformer(**{**defaults, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # nothing left at its init value, so a skipped key would show
    return model


def teacher_checkpoint(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The DinoBloom release layout: backbone + DINO/iBOT heads under "teacher"."""
    heads = {f"{h}.mlp.0.weight": torch.zeros(4, model.embed_dim) for h in ("dino_head", "ibot_head")}
    heads.update({f"{h}.last_layer.weight_g": torch.ones(8, 1) for h in ("dino_head", "ibot_head")})
    return {"teacher": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, **heads}}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "layout",
    ["plain", "teacher", "model", "state_dict", "module_prefix", "orig_mod_prefix", "chunked", "full_training"],
)
def test_accepted_layouts_load_identically(tmp_path: Path, layout: str) -> None:
    source = tiny_model()
    state = source.state_dict()
    if layout == "plain":
        obj: Any = state
    elif layout == "teacher":
        obj = teacher_checkpoint(source)
    elif layout in ("model", "state_dict"):
        obj = {layout: state, "iteration": 12}
    elif layout == "module_prefix":
        obj = {"teacher": {f"module.{k}": v for k, v in teacher_checkpoint(source)["teacher"].items()}}
    elif layout == "orig_mod_prefix":
        obj = {f"_orig_mod.{k}": v for k, v in state.items()}
    elif layout == "chunked":
        obj = tiny_model(block_chunks=2).state_dict()
        assert "blocks.1.1.attn.qkv.weight" in obj
    else:  # DINOv2's full training checkpoint: student and teacher side by side
        obj = {"model": {**{f"student.backbone.{k}": v * 0 for k, v in state.items()},
                         **{f"teacher.backbone.{k}": v for k, v in state.items()}}}
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    target = DinoVisionTransformer(img_size=56, embed_dim=128, depth=2, num_heads=2, init_values=1.0)
    load_backbone_weights(target, path)
    assert_same_weights(target, source)


def test_safetensors_and_chunked_target(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = tiny_model()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    state = load_pretrained_backbone_state(path)
    assert sorted(state) == sorted(source.state_dict())  # safetensors stores keys sorted
    chunked = tiny_model(block_chunks=2)
    load_backbone_weights(chunked, path)  # flat file into DINOv2's chunked layout
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), source(x), rtol=0, atol=0)


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    source = tiny_model()
    target = tiny_model()
    with torch.no_grad():
        target.cls_token.fill_(3.0)
    state = source.state_dict()
    del state["blocks.1.ls2.gamma"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    state["norm.weight"] = torch.zeros(64)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, _save(tmp_path, state))
    message = str(info.value)
    assert "bad.pth" in message
    assert "missing keys: blocks.1.ls2.gamma" in message
    assert "unexpected keys: blocks.0.attn.extra.weight" in message
    assert "mis-shaped keys: norm.weight (checkpoint (64,), model (128,))" in message
    assert torch.all(target.cls_token == 3.0)  # nothing was loaded
    assert issubclass(CheckpointError, RuntimeError)


def test_a_classifier_head_is_unexpected(tmp_path: Path) -> None:
    state = {**tiny_model().state_dict(), "head.weight": torch.zeros(10, 128)}
    with pytest.raises(CheckpointError, match="unexpected keys: head.weight"):
        load_backbone_weights(tiny_model(), _save(tmp_path, state))


class NotATensor:
    """A class that weights_only unpickling refuses."""


def test_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a PyTorch checkpoint"):
        load_pretrained_backbone_state(text)

    image = tmp_path / "cell.pth"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image, format="PNG")
    with pytest.raises(CheckpointError, match=r"cell\.pth is not a PyTorch checkpoint"):
        load_pretrained_backbone_state(image)

    complete = tmp_path / "complete.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, complete)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(complete.read_bytes()[: complete.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=r"cut\.pth cannot be read: a truncated or damaged checkpoint"):
        load_pretrained_backbone_state(cut)

    pickled = tmp_path / "object.pth"
    torch.save({"teacher": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match=r"object\.pth contains pickled Python objects other than tensors and "
                                              r"plain containers \(test_hub_loader\.NotATensor\).*weights_only"):
        load_pretrained_backbone_state(pickled)
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8), "crop": slice(0, 8)}}, pickled)  # a built-in
    with pytest.raises(CheckpointError, match=r"object\.pth contains pickled Python objects .* \(slice\)"):
        load_pretrained_backbone_state(pickled)
    # a damaged file of the format before PyTorch 1.6 (one pickle, no archive) is not mistaken for one of objects
    legacy = tmp_path / "legacy.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, legacy, _use_new_zipfile_serialization=False)
    data = bytearray(legacy.read_bytes())
    data[12:40] = b"\x07" * 28
    legacy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"legacy\.pth cannot be read: a truncated or damaged checkpoint \(is the "
                                              r"download complete\?\) \(Unsupported operand 7\)$"):  # fmt: skip
        load_pretrained_backbone_state(legacy)

    fake_st = tmp_path / "fake.safetensors"
    fake_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"fake\.safetensors is not a valid safetensors file"):
        load_pretrained_backbone_state(fake_st)

    with pytest.raises(CheckpointError, match=r"weights file not found: \S*absent\.pth$"):
        load_pretrained_backbone_state(tmp_path / "absent.pth")
    # a published file not downloaded yet: where to get it (the README's training commands name these files)
    for name, url in (("DinoBloom-S.pth", "https://zenodo.org/records/10908163/files/DinoBloom-S.pth"),
                      ("dinov2_vitb14_pretrain.pth",
                       "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth")):
        with pytest.raises(CheckpointError, match=f"weights file not found: .*{name}; .*download it from {url}"):
            load_pretrained_backbone_state(tmp_path / "weights" / name)
    checkpoint_folder = tmp_path / "checkpoints" / "000000299"
    checkpoint_folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"000000299 is a folder, not a weights file.*teacher_checkpoint\.pth"):
        load_pretrained_backbone_state(checkpoint_folder)
    (checkpoint_folder / ".metadata").write_bytes(b"dcp")  # one shard of it, as a user might pick it
    (checkpoint_folder / "__0_0.distcp").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is part of a torch\.distributed\.checkpoint folder"):
        load_pretrained_backbone_state(checkpoint_folder / "__0_0.distcp")
    # its other files hold no weights either (extra_state.pt used to get advice to save a dict from it)
    torch.save({"extra_state": {"iteration": 9}, "iteration": 9}, checkpoint_folder / "extra_state.pt")
    with pytest.raises(CheckpointError, match=r"extra_state\.pt is part of .*/teacher_checkpoint\.pth"):
        load_pretrained_backbone_state(checkpoint_folder / "extra_state.pt")
    with pytest.raises(CheckpointError, match="weights file not found"):  # a mistyped name there is just missing
        load_pretrained_backbone_state(checkpoint_folder / "teacher_checkpoint.pth")

    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4), "backbone.note": "x"}}, pickled)
    with pytest.raises(CheckpointError, match="entries that are not tensors: note$"):
        load_pretrained_backbone_state(pickled)
    torch.save({"student": {"backbone.cls_token": torch.zeros(1, 1, 4)}}, pickled)  # weights under another name
    with pytest.raises(CheckpointError, match=r"not tensors: student; 'student' holds a dict: .* torch\.save\(checkpoint"):
        load_pretrained_backbone_state(pickled)

    torch.save({"teacher": {"backbone": {"cls_token": torch.zeros(1, 1, 4)}}}, pickled)  # one level deeper
    hint = "torch.save(checkpoint['teacher']['backbone'], 'backbone.pth')"
    with pytest.raises(CheckpointError, match=re.escape(hint)):
        load_pretrained_backbone_state(pickled)

    torch.save({"module.cls_token": torch.zeros(1, 1, 4), "cls_token": torch.ones(1, 1, 4)}, pickled)
    with pytest.raises(CheckpointError, match="'module.cls_token' and 'cls_token' both name 'cls_token' once"):
        load_pretrained_backbone_state(pickled)

    torch.save([torch.zeros(2)], pickled)
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found list"):
        load_pretrained_backbone_state(pickled)


def test_a_file_whose_bytes_were_damaged_in_place_is_refused(tmp_path: Path) -> None:
    """Zeroed bytes inside a tensor's record (a failing disk, a bad copy): torch.load would load them unsaid; the
    records' CRC-32 names the damage. A file saved without checksums (PyTorch's option) still loads."""
    values = torch.arange(4096, dtype=torch.float32).reshape(1, 1, 4096) + 1
    complete = tmp_path / "complete.pth"
    torch.save({"teacher": {"backbone.cls_token": values}}, complete)
    data = bytearray(complete.read_bytes())
    start = data.index(values.numpy().tobytes()[:64])  # the tensor's bytes, stored uncompressed
    data[start + 1000 : start + 2000] = bytes(1000)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"damaged\.pth cannot be read: a damaged checkpoint \(its record "
                                              r"data/0: Bad CRC"):  # (not the archive's top folder, "complete/")
        load_pretrained_backbone_state(damaged)
    data = bytearray(complete.read_bytes())  # a damaged record entry: an unknown compression method
    entry = data.index(b"PK\x01\x02")
    data[entry + 10 : entry + 12] = (99).to_bytes(2, "little")
    damaged.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"damaged\.pth cannot be read: a damaged checkpoint \(.*compression"):
        load_pretrained_backbone_state(damaged)
    unchecked = tmp_path / "unchecked.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"teacher": {"backbone.cls_token": values}}, unchecked)
    finally:
        torch.serialization.set_crc32_options(True)
    torch.testing.assert_close(load_pretrained_backbone_state(unchecked)["cls_token"], values, rtol=0, atol=0)


def test_hub_sized_pos_embed_is_resized_on_load(tmp_path: Path) -> None:
    """A DINOv2 hub file (37x37 grid, 1370 tokens) into a 224 px model: DinoBloom's bicubic 16x16 for training,
    and for a requested size the hub model's own run-time resampling, so features stay the hub model's."""
    hub = tiny_model(img_size=518)
    assert hub.pos_embed.shape[1] == 1370
    path = tmp_path / "hub.pth"
    torch.save(hub.state_dict(), path)
    # what DinoBloom did before training: F.interpolate to size 16x16, cls kept
    trained = load_backbone_weights(tiny_model(img_size=224), path)
    grid = hub.pos_embed[:, 1:].reshape(1, 37, 37, 128).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(trained.pos_embed[:, 1:], expected.reshape(1, 256, 128), rtol=0, atol=0)
    assert torch.equal(trained.pos_embed[:, 0], hub.pos_embed[:, 0])
    # the hub model at 224 px, asked for by size: the features the 518 px model computes on 224 px images
    model = load_backbone(None, path, img_size=224)
    assert model.pos_embed.shape == (1, 257, 128)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hub.eval()(x), rtol=0, atol=2e-5)
    with pytest.raises(CheckpointError, match="not square patch grids"):
        resize_pos_embed_as_dinobloom(torch.zeros(1, 1 + 12, 8), 257)


def test_architecture_inference() -> None:
    cases = [
        (dict(), dict(ffn_layer="mlp", mlp_ratio=4.0, num_register_tokens=0, interpolate_offset=0.1)),
        (dict(ffn_layer="swiglufused", depth=3), dict(ffn_layer="swiglufused", depth=3)),
        (dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
         dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)),
        (dict(mlp_ratio=3.0, init_values=None, qkv_bias=False), dict(mlp_ratio=3.0, init_values=None, qkv_bias=False)),
        (dict(img_size=98, patch_size=7), dict(img_size=98, patch_size=7)),
    ]
    for kwargs, expected in cases:
        source = tiny_model(**kwargs)
        config = infer_backbone_config(source.state_dict())
        assert {k: config[k] for k in expected} == expected, kwargs
        assert (config["embed_dim"], config["num_heads"]) == (128, 2)
        rebuilt = DinoVisionTransformer(**config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in source.state_dict().items()
        }
    with pytest.raises(CheckpointError, match="no cls_token, pos_embed"):
        infer_backbone_config({"patch_embed.proj.weight": torch.zeros(4, 3, 14, 14)})


def test_load_backbone_by_name_and_inferred(tmp_path: Path) -> None:
    source = tiny_model(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(teacher_checkpoint(source), path)
    model = load_backbone(None, path)
    assert not model.training
    assert_same_weights(model, source)
    x = torch.randn(1, 3, 70, 42)  # non-square: exercises the registers' interpolation settings
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backbone 'dinobloom_xl'"):
        load_backbone("dinobloom_xl", path)
    with pytest.raises(ValueError, match="needs a model name, or weights"):
        load_backbone(None, None)
    with pytest.raises(CheckpointError, match="another architecture than the model"):
        load_backbone("dinobloom_s", path)


def test_a_named_entry_refuses_another_architecture_in_one_short_line(tmp_path: Path) -> None:
    """A demo training export (192 wide, 4 blocks) through `dinobloom_s`: the two architectures and the fix."""
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(teacher_checkpoint(tiny_model(embed_dim=192, depth=4, num_heads=3)), path)
    with pytest.raises(CheckpointError) as info:
        load_backbone("dinobloom_s", path)
    message = str(info.value)
    assert "checkpoint: width 192, 4 blocks, patch size 14; model: width 384, 12 blocks, patch size 14" in message
    assert f"load_backbone(None, {str(path)!r})" in message and "leave out --model dinobloom_s" in message
    assert "blocks.0." not in message and len(message) < 300 + len(str(path)) * 2
    assert load_backbone(None, path).embed_dim == 192  # what the message suggests works


def test_registers_are_part_of_the_architecture(tmp_path: Path) -> None:
    path = _save(tmp_path, tiny_model(num_register_tokens=4).state_dict())
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(tiny_model(), path)
    message = str(info.value)
    assert message == (
        f"{path} is another architecture than the model (checkpoint: width 128, 2 blocks, patch size 14, "
        "4 register tokens; model: width 128, 2 blocks, patch size 14, 0 register tokens)"
    )  # no hint: the caller built the model itself


def test_a_copied_register_export_says_its_interpolation_is_assumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run from scratch with registers interpolates as its config says (no antialiasing, offset 0.1): a copy of
    its export away from config.yaml gets DINOv2's _reg settings, which changes its features at other input sizes,
    so the loader says it assumed them; given them, the copy computes what the run's model computes."""
    source = tiny_model(num_register_tokens=2, interpolate_antialias=False, interpolate_offset=0.1)
    path = tmp_path / "copied" / "teacher_checkpoint.pth"
    path.parent.mkdir()
    torch.save(teacher_checkpoint(source), path)
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        assumed = load_backbone(None, path)
    assert "a training export with registers, away from its run's config.yaml" in caplog.text
    assert (assumed.interpolate_antialias, assumed.interpolate_offset) == (True, 0.0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        given = load_backbone(None, path, interpolate_antialias=False, interpolate_offset=0.1)
    assert "registers" not in caplog.text
    x = torch.randn(1, 3, 84, 84)  # another size than the 56 px it was built for
    with torch.no_grad():
        torch.testing.assert_close(given(x), source(x), rtol=0, atol=0)
        assert not torch.allclose(assumed(x), source(x))
    hub_file = _save(tmp_path, source.state_dict())  # a plain state dict, as DINOv2's _reg hub files: no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        load_backbone(None, hub_file)
    assert "registers" not in caplog.text


def test_keys_of_another_naming_are_listed_briefly(tmp_path: Path) -> None:
    """A wrong prefix leaves no architecture to compare: the first keys of each list are named, then a count, and
    the prefix to strip."""
    state = {f"encoder.{k}": v for k, v in tiny_model().state_dict().items()}
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(tiny_model(), path)
    first = "cls_token, pos_embed, mask_token, patch_embed.proj.weight, patch_embed.proj.bias"
    assert str(info.value) == (
        f"{path} does not match the model; missing keys: {first}, ... and {len(state) - 5} more; "
        f"unexpected keys: encoder.{first.replace(', ', ', encoder.')}, ... and {len(state) - 5} more; "
        "every unexpected key starts with 'encoder.', and without it names a missing key: strip it, e.g. "
        "{k.removeprefix('encoder.'): v for k, v in state_dict.items()}"
    )
    # a prefix that only some keys carry, or that leaves a key the model lacks, is no such case
    state["encoder.extra"] = state.pop("encoder.cls_token")
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(tiny_model(), _save(tmp_path, state))
    assert "strip it" not in str(info.value)


def test_a_run_export_named_from_home_takes_its_heads_from_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~/run/eval/.../teacher_checkpoint.pth`` finds ``~/run/config.yaml`` (2 heads; the shapes would say 1)."""
    from dinov2.configs import TRAIN_CONFIG_DIR, load_config, write_config

    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "run"
    write_config(load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["student.embed_dim=64", "student.depth=2",
                                                               "student.num_heads=2"]), run)  # fmt: skip
    source = tiny_model(embed_dim=64, depth=2, num_heads=2, img_size=112)
    export = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    torch.save(teacher_checkpoint(source), export)
    model = load_backbone(None, "~/run/eval/training_9/teacher_checkpoint.pth")
    assert model.num_heads == 2
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_img_size_of_a_half_precision_file_gives_its_run_time_features(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "half.pth"
    torch.save({k: v.to(dtype) for k, v in tiny_model().state_dict().items()}, path)
    at_load, at_run_time = load_backbone(None, path, img_size=84), load_backbone(None, path)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(at_load(x), at_run_time(x), rtol=0, atol=0)


def test_a_random_backbone_warns_where_it_was_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights: a UserWarning (a notebook shows it; it has no log handler) naming the caller's line.
    Loaded weights, and a random backbone built on purpose, stay silent."""
    import hubconf
    from dinov2.hub import backbones, dinov2_vits14

    monkeypatch.setattr(backbones, "build_model", lambda name, **kwargs: tiny_model())  # tiny, for speed
    for build, name, release in [
        (lambda: load_backbone("dinobloom_s"), "dinobloom_s", "DinoBloom-S.pth"),
        (lambda: hubconf.dinobloom_s(), "dinobloom_s", "DinoBloom-S.pth"),
        (lambda: torch.hub.load(str(REPO_ROOT), "dinobloom_s", source="local"), "dinobloom_s", "DinoBloom-S.pth"),
        (lambda: dinov2_vits14(), "dinov2_vits14", "dinov2_vits14_pretrain.pth"),
    ]:
        with pytest.warns(UserWarning) as record:
            build()
        assert len(record) == 1
        message = str(record[0].message)
        assert message.startswith(f"{name} is randomly initialised (no weights given)")
        assert f'weights="{release}"' in message and "pretrained=True" in message
        assert record[0].filename == __file__  # this file's lambda, not the package's or torch.hub's
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(teacher_checkpoint(tiny_model()), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone("dinobloom_s", path)
        build_model("dinobloom_s")  # the real builder: a random backbone on purpose


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_register_tokens": 2}, {"block_chunks": 2}, {"ffn_layer": "swiglufused"}, {"init_values": None}],
    ids=["plain", "registers", "chunks", "swiglu", "no_layerscale"],
)
def test_every_tensor_of_a_loaded_backbone_comes_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]
) -> None:
    """The model a file is loaded into is not initialised first (see load_backbone): made NaN before the load here,
    no tensor may stay NaN after it, and the features are the source's."""
    import dinov2.hub.backbones as backbones

    unfilled = backbones._without_random_init

    def poisoned(build: Callable[[], DinoVisionTransformer], build_kwargs: dict[str, Any]) -> DinoVisionTransformer:
        model = unfilled(build, build_kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.fill_(float("nan"))
        return model

    monkeypatch.setattr(backbones, "_without_random_init", poisoned)
    source = tiny_model(**kwargs)
    path = tmp_path / "run.pth"
    torch.save(teacher_checkpoint(source), path)
    model = load_backbone(None, path, **({"block_chunks": 2} if "block_chunks" in kwargs else {}))
    assert not any(tensor.isnan().any() for tensor in model.state_dict().values())
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_layers_of_the_callers_own_keep_their_own_tensors(tmp_path: Path) -> None:
    """A caller's layer class may hold a tensor that no state dict restores (a non-persistent buffer): such a model
    is initialised as usual before the load, not left with uninitialised memory."""

    class ScaledGELU(torch.nn.GELU):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    path = tmp_path / "run.pth"
    torch.save(teacher_checkpoint(tiny_model()), path)
    model = load_backbone(None, path, act_layer=ScaledGELU)
    assert all(torch.equal(buffer, torch.full((1,), 2.0)) for buffer in model.buffers())
    assert len(list(model.buffers())) == 2  # one per block


def test_an_image_size_that_is_not_whole_patches_is_refused(tmp_path: Path) -> None:
    """A negative size built a one-patch model, a size between patches a model for the size below; both are errors."""
    path = tmp_path / "run.pth"
    torch.save(teacher_checkpoint(tiny_model()), path)
    for size in (-14, 0):
        with pytest.raises(ValueError, match=f"img_size must be a positive number of pixels, got {size}"):
            load_backbone(None, path, img_size=size)
    with pytest.raises(ValueError, match=re.escape("img_size 100 is not a multiple of the model's patch size 14 "
                                                   "(e.g. 98 or 112)")):  # fmt: skip
        load_backbone(None, path, img_size=100)


def test_a_named_entry_keeps_its_size() -> None:
    with pytest.raises(ValueError, match="dinobloom_s fixes depth, num_heads; for another size"):
        load_backbone("dinobloom_s", None, num_heads=12, depth=2)
    with pytest.raises(ValueError, match="vit_small fixes embed_dim"):
        build_model("vit_small", embed_dim=192)


def test_dinobloom_entries_resize_a_dinov2_file_to_224(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DinoBloom's start: a DINOv2 hub file in a dinobloom_* entry is 224 px (257 tokens), resized once at load."""
    from dinov2.hub import backbones
    from dinov2.models import build_model

    hub = build_model("dinov2_vits14")
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(hub.state_dict(), path)
    model = load_backbone("dinobloom_s", path)
    assert model.pos_embed.shape == (1, 257, 384)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed_as_dinobloom(hub.pos_embed, 257), rtol=0, atol=0)
    assert load_backbone("dinov2_vits14", path).pos_embed.shape == (1, 1370, 384)  # keeps the file's size

    requested: list[Any] = []
    monkeypatch.setattr(backbones, "load_pretrained_backbone_state", lambda w: requested.append(w) or hub.state_dict())
    load_backbone("dinov2_vits14", pretrained=True)
    assert requested == [backbones.DINOV2_URLS["dinov2_vits14"]]
    with pytest.raises(ValueError, match="pretrained=True needs a released entry"):
        load_backbone(None, pretrained=True)


def test_the_readmes_notebook_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first code block, in a folder holding a release-format DinoBloom-S file and two cell images."""
    from dinov2.models import build_model

    backbone = build_model("dinobloom_s")
    release = {"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    torch.save(release, tmp_path / "DinoBloom-S.pth")
    for i in (1, 2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
            tmp_path / f"cell_{i}.jpg"
        )
    readme = (REPO_ROOT / "README.md").read_text()
    block = next(b.split("```")[0] for b in readme.split("```python\n")[1:] if "load_backbone(" in b.split("```")[0])
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["features"].shape == (2, 384) and namespace["images"].shape == (2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(namespace["features"], backbone.eval()(namespace["images"]))


def test_every_hub_entry_shows_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.hub.help shows an entry's signature and docstring: each names weights, pretrained and img_size, and
    pretrained=True loads that entry's own release file."""
    import inspect

    import hubconf
    from dinov2.hub import backbones

    requested: list[Any] = []
    monkeypatch.setattr(backbones, "load_backbone", lambda name, weights, img_size, **kw: requested.append((name, kw)))
    for name in hubconf.__all__:
        entry = getattr(hubconf, name)
        parameters = inspect.signature(entry).parameters
        for option in ("weights", "pretrained", "img_size"):
            assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
            assert option in inspect.getdoc(entry), (name, option)
        getattr(backbones, name)(pretrained=True)
        assert requested[-1] == (name, {"pretrained": True})


def test_the_default_image_size_of_each_kind_of_weights_file(tmp_path: Path) -> None:
    """Without a size asked for: a run's export gets its run's size; a file in the release layout (a training export
    copied out of its run) the size its position-embedding grid implies, unless that is DinoBloom's 16x16; DINOv2
    hub files, other layouts, URLs and no weights DinoBloom's 224."""
    from safetensors.torch import save_file

    from dinov2.configs import TRAIN_CONFIG_DIR, load_config, write_config
    from dinov2.hub.backbones import default_image_size

    at_112 = tiny_model(img_size=112)  # an 8x8 grid of 14 px patches, as the demo run trains
    run = tmp_path / "run"
    write_config(load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["crops.global_crops_size=98"]), run)
    export = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    torch.save(teacher_checkpoint(at_112), export)
    assert default_image_size(export)[0] == 98  # the run's config says, whatever the grid
    assert "crops.global_crops_size" in default_image_size(export)[1]

    copied = tmp_path / "copied" / "teacher_checkpoint.pth"
    copied.parent.mkdir()
    shutil.copy(export, copied)
    size, why = default_image_size(copied)
    assert size == 112 and "8x8 position-embedding grid" in why and str(copied) in why
    legacy = tmp_path / "legacy.pth"  # an old torch.save file, which cannot be memory-mapped
    torch.save(teacher_checkpoint(at_112), legacy, _use_new_zipfile_serialization=False)
    assert default_image_size(legacy)[0] == 112
    patch_16 = tmp_path / "patch16.pth"  # the grid times the file's own patch size
    torch.save(teacher_checkpoint(tiny_model(img_size=96, patch_size=16)), patch_16)
    assert default_image_size(patch_16)[0] == 96
    patch_16_at_256 = tmp_path / "patch16_256.pth"  # 16x16 patches of 16 px: 256 px, not DinoBloom's 224
    torch.save(teacher_checkpoint(tiny_model(img_size=256, patch_size=16)), patch_16_at_256)
    assert default_image_size(patch_16_at_256)[0] == 256

    at_224 = tmp_path / "DinoBloom-S.pth"  # a release file: 16x16
    torch.save(teacher_checkpoint(tiny_model(img_size=224)), at_224)
    hub = tmp_path / "dinov2_vits14_pretrain.pth"  # DINOv2's hub layout, a plain state dict: DinoBloom's 224
    torch.save(tiny_model(img_size=518).state_dict(), hub)
    plain_112 = tmp_path / "plain.pth"
    torch.save(at_112.state_dict(), plain_112)
    tensors = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in at_112.state_dict().items()}, str(tensors))
    for weights in (at_224, hub, plain_112, tensors, "https://example.org/teacher_checkpoint.pth", None):
        assert default_image_size(weights) == (224, None), weights


def test_a_release_layout_file_with_a_grid_that_is_not_square_gets_the_default_size(tmp_path: Path) -> None:
    """1 + 72 position tokens: 72 is no square (8x9), so no side can be read from it; isqrt(72) = 8 would say 112."""
    from dinov2.hub.backbones import default_image_size
    from dinov2.hub.loader import release_pos_embed_grid

    checkpoint = teacher_checkpoint(tiny_model(img_size=112))
    checkpoint["teacher"]["backbone.pos_embed"] = torch.zeros(1, 1 + 72, 128)
    weights = tmp_path / "teacher_checkpoint.pth"  # no run's config.yaml beside it
    torch.save(checkpoint, weights)
    assert release_pos_embed_grid(weights) is None
    assert default_image_size(weights) == (224, None)


def test_an_unknown_width_warns_that_the_head_count_is_a_guess(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "elsewhere" / "teacher_checkpoint.pth"
    path.parent.mkdir()
    torch.save(teacher_checkpoint(tiny_model()), path)  # 128 wide: not a DINOv2 width, and no run config.yaml
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        assert load_backbone(None, path).num_heads == 2
    assert "head count cannot be read from its weights; assuming 2 (64 per head)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        assert load_backbone(None, path, num_heads=4).num_heads == 4
    assert "head count" not in caplog.text
    torch.save(teacher_checkpoint(tiny_model(embed_dim=96, num_heads=1)), path)  # one head of 96, not of 64
    with caplog.at_level("WARNING", logger="dinov2.hub.backbones"):
        assert load_backbone(None, path).num_heads == 1
    assert "assuming 1 (96 per head)" in caplog.text


@pytest.fixture
def hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[str, str], None]], Path]]:
    """``serve(download)``: torch.hub's cache moves to ``tmp_path/hub`` (returned) and ``download(url, dst)`` stands
    in for the network; both are restored afterwards."""
    previous_dir = torch.hub.get_dir()

    def serve(download: Callable[[str, str], None]) -> Path:
        monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, progress=True: download(url, dst))
        torch.hub.set_dir(str(tmp_path / "hub"))
        return tmp_path / "hub"

    yield serve
    torch.hub.set_dir(previous_dir)


def test_weights_url_is_downloaded_once_into_the_hub_cache(tmp_path: Path, hub_cache) -> None:
    source = tiny_model()
    served = tmp_path / "served.pth"
    torch.save(teacher_checkpoint(source), served)
    calls: list[str] = []

    def download(url: str, dst: str) -> None:
        calls.append(url)
        shutil.copy(served, dst)

    hub = hub_cache(download)
    url = "https://zenodo.org/records/10908163/files/DinoBloom-T.pth"
    for _ in range(2):
        state = load_pretrained_backbone_state(url)
    assert calls == [url]
    assert [p.name for p in (hub / "checkpoints").rglob("*.pth")] == ["DinoBloom-T.pth"]
    assert torch.equal(state["cls_token"], source.cls_token)


def test_a_download_that_is_not_weights_leaves_the_cache(hub_cache) -> None:
    """A server's error page saved under the weights' name: the error names the URL, and the next call downloads
    again instead of failing on the cached page."""
    source = tiny_model()
    served = [b"<html>429 Too Many Requests</html>"]

    def download(url: str, dst: str) -> None:
        content = served.pop(0)
        if isinstance(content, bytes):
            Path(dst).write_bytes(content)
        else:
            torch.save(content, dst)

    hub = hub_cache(download)
    url = "https://zenodo.org/records/10908163/files/DinoBloom-T.pth"
    with pytest.raises(CheckpointError, match=re.escape(f"{url}: the downloaded file cannot be used (") +
                       r".*is not a PyTorch checkpoint.*removed from the cache, so the next attempt downloads"):
        load_pretrained_backbone_state(url)
    assert list((hub / "checkpoints").rglob("*.pth")) == []
    served.append(teacher_checkpoint(source))
    assert torch.equal(load_pretrained_backbone_state(url)["cls_token"], source.cls_token)


def test_urls_of_files_with_one_name_are_cached_apart(tmp_path: Path, hub_cache) -> None:
    """Two runs' exports, both called teacher_checkpoint.pth: the second address gets its own weights."""
    served = {}
    for shift, run in enumerate(("run1", "run2")):
        model = tiny_model()
        with torch.no_grad():
            model.cls_token.add_(shift)  # (tiny_model seeds itself: the two runs differ here)
        served[f"https://example.org/{run}/eval/training_9/teacher_checkpoint.pth"] = model.cls_token.detach().clone()
        torch.save(teacher_checkpoint(model), tmp_path / f"{run}.pth")
    hub_cache(lambda url, dst: shutil.copy(tmp_path / f"{url.split('/')[3]}.pth", dst))
    for url, cls_token in served.items():
        assert torch.equal(load_pretrained_backbone_state(url)["cls_token"], cls_token)


def test_a_failed_download_is_a_clear_error(hub_cache) -> None:
    import urllib.error

    def offline(url: str, dst: str) -> None:
        raise urllib.error.URLError("no route to host")

    hub = hub_cache(offline)
    with pytest.raises(CheckpointError, match=r"could not download https://\S+/DinoBloom-T.pth .*local path"):
        load_pretrained_backbone_state("https://zenodo.org/records/10908163/files/DinoBloom-T.pth")
    assert not list(hub.rglob("DinoBloom-T.pth"))


def test_torch_hub_load_offline(tmp_path: Path) -> None:
    """`torch.hub.load(repo, "dinobloom_s", source="local", weights=...)` on a random ViT-S checkpoint."""
    source = build_model("dinobloom_s")
    path = tmp_path / "DinoBloom-S.pth"
    torch.save(teacher_checkpoint(source), path)
    model = torch.hub.load(str(REPO_ROOT), "dinobloom_s", source="local", weights=str(path))
    assert not model.training and model.pos_embed.shape == (1, 257, 384)
    assert_same_weights(model, source)
    # DinoBloom's recipe: a DinoBloom file inside the dinov2_vits14 hub model keeps its 257 tokens
    as_dinov2 = torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local", weights=str(path))
    assert_same_weights(as_dinov2, source)
    import hubconf

    # What torch.hub.list shows: the public callables of hubconf.py.
    entries = {name for name in dir(hubconf) if not name.startswith("_") and callable(getattr(hubconf, name))}
    assert hubconf.dependencies == ["torch"]
    assert {"dinobloom_s", "dinobloom_b", "dinobloom_l", "dinobloom_g", "dinov2_vitg14"} <= entries
    assert "zenodo.org/records/10908163/files/DinoBloom-S.pth" in hubconf.dinobloom_s.__doc__


# ----------------------------------------------------------------------------------------- timm interop


@pytest.mark.parametrize(
    ("kwargs", "timm_name"),
    [
        (dict(img_size=224, embed_dim=384, depth=2, num_heads=6), "vit_small_patch14_dinov2"),
        (dict(img_size=224, embed_dim=384, depth=2, num_heads=6, num_register_tokens=4,
              interpolate_antialias=True, interpolate_offset=0.0), "vit_small_patch14_reg4_dinov2"),
        (dict(img_size=28, embed_dim=128, depth=1, num_heads=2, ffn_layer="swiglufused"), "vit_giant_patch14_dinov2"),
        (dict(img_size=28, embed_dim=384, depth=1, num_heads=6, init_values=None), "vit_small_patch14_dinov2"),
        (dict(img_size=28, embed_dim=384, depth=1, num_heads=6, qkv_bias=False, proj_bias=False, ffn_bias=False),
         "vit_small_patch14_dinov2"),
    ],
    ids=["vits14", "vits14_reg4", "swiglu", "no_layerscale", "no_biases"],
)
def test_timm_export_loads_into_timm(
    tmp_path: Path, kwargs: dict[str, Any], timm_name: str, load_script: Callable[[str], ModuleType]
) -> None:
    timm = pytest.importorskip("timm")
    from safetensors import safe_open

    export_timm = load_script("export_timm")
    source = tiny_model(**kwargs)
    weights = tmp_path / "teacher_checkpoint.pth"
    torch.save(teacher_checkpoint(source), weights)
    output = tmp_path / "export.safetensors"
    export_timm.main(["--weights", str(weights), "--output", str(output)])
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other new file, not private
    with safe_open(str(output), "pt") as f:
        name, timm_kwargs = f.metadata()["timm_model"], json.loads(f.metadata()["timm_kwargs"])
    assert name == timm_name
    size = kwargs["img_size"]
    overlay = dict(file=str(output), **export_timm.timm_preprocessing(size))  # as the script prints it
    timm_model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = source(x)
        theirs = timm_model.forward_features(x)[:, 0]
    assert (ours - theirs).abs().max().item() <= 2e-5
    # timm's own preprocessing of the model is then DinoBloom's: a non-square cell gives the same tensor
    cell = Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(timm_model))
    torch.testing.assert_close(transform(cell), make_eval_transform(size)(cell), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(output))}.*; this looks like timm's layout"):
        load_backbone(None, output)  # the exported file is timm's: our loader says so rather than guess


def test_timm_export_takes_the_head_count_the_weights_cannot_tell(
    tmp_path: Path, load_script: Callable[[str], ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    """A 128-wide training export with 4 heads, copied away from its run's config.yaml: the weights imply 2 heads of
    64 (said in a warning); --num-heads exports what the run trained, and timm's model then gives our features."""
    from safetensors import safe_open

    source = tiny_model(img_size=28, num_heads=4)
    weights = tmp_path / "copied" / "teacher_checkpoint.pth"
    weights.parent.mkdir()
    torch.save(teacher_checkpoint(source), weights)
    export_timm = load_script("export_timm")
    for heads, expected in ((None, 2), (4, 4)):
        output = tmp_path / f"export_{heads}.safetensors"
        export_timm.main(["--weights", str(weights), "--output", str(output),
                          *(["--num-heads", str(heads)] if heads else [])])  # fmt: skip
        with safe_open(str(output), "pt") as f:
            name, timm_kwargs = f.metadata()["timm_model"], json.loads(f.metadata()["timm_kwargs"])
        assert timm_kwargs["num_heads"] == expected
    assert "head count cannot be read from its weights; assuming 2" in caplog.text
    in_the_way = tmp_path / "a_file"
    in_the_way.touch()
    with pytest.raises(ValueError, match=f"cannot write {in_the_way}/x.safetensors: {in_the_way} is a file, not a "):
        export_timm.main(["--weights", str(weights), "--output", str(in_the_way / "x.safetensors")])
    timm = pytest.importorskip("timm")
    overlay = dict(file=str(output), **export_timm.timm_preprocessing(28))
    timm_model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (source(x) - timm_model.forward_features(x)[:, 0]).abs().max().item() <= 2e-5


def test_timm_export_refuses_a_layout_timm_cannot_build(load_script: Callable[[str], ModuleType]) -> None:
    export_timm = load_script("export_timm")
    with pytest.raises(ValueError, match="has proj_bias=True and ffn_bias=False, so it cannot be exported"):
        export_timm.timm_model_config(tiny_model(img_size=28, embed_dim=384, depth=1, num_heads=6, ffn_bias=False))


def test_timm_export_of_the_vit_small_layout(load_script: Callable[[str], ModuleType]) -> None:
    """Every timm vit_small_patch14_dinov2 key (depth 2) is produced, with the same shape."""
    timm = pytest.importorskip("timm")
    export_timm = load_script("export_timm")
    source = tiny_model(img_size=224, embed_dim=384, depth=2, num_heads=6)
    name, kwargs = export_timm.timm_model_config(source)
    assert (name, kwargs) == ("vit_small_patch14_dinov2", {"img_size": 224, "num_classes": 0, "depth": 2})
    expected = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    exported = export_timm.timm_state_dict(source)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in expected.items()}
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        export_timm.export_timm("w.pth", "out.pt")


def test_benchmark_runs_and_checks_agreement(
    capsys: pytest.CaptureFixture[str], load_script: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark times our backbone and timm's holding the same weights, and refuses to time models whose
    features differ (here timm's final norm is moved off by 0.01)."""
    pytest.importorskip("timm")
    benchmark = load_script("benchmark_features")
    args = ["--batch-size", "1", "--img-size", "28", "--iters", "1", "--warmup", "0"]
    with pytest.warns(UserWarning, match="dinobloom_s is randomly initialised"):  # no --weights: random, and said
        results = benchmark.main(args)
    assert len(results) == 2 and all(math.isfinite(t) and t > 0 for t in results.values())
    table = capsys.readouterr().out
    assert "dinov2 (ours)" in table and "timm vit_small_patch14_dinov2" in table and "images / s" in table
    same_weights = benchmark.timm_state_dict

    def other_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = same_weights(model)
        return {**state, "norm.bias": state["norm.bias"] + 0.01}

    monkeypatch.setattr(benchmark, "timm_state_dict", other_weights)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="our features and timm's differ by 1.00e-02"):
        benchmark.main(args)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler (g++)")
def test_benchmark_times_bf16_compiled_extraction(
    capsys: pytest.CaptureFixture[str], load_script: Callable[[str], ModuleType]
) -> None:
    """The mode `extract_features --precision bf16 --compile` runs in, for both models; the first call compiles, so
    it must be a warm-up call."""
    pytest.importorskip("timm")
    benchmark = load_script("benchmark_features")
    with pytest.raises(SystemExit):
        benchmark.main(["--compile", "--warmup", "0"])
    assert "--compile needs --warmup 1 or more" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="randomly initialised"):
        results = benchmark.main(["--batch-size", "2", "--img-size", "28", "--iters", "1", "--warmup", "1",
                                  "--precision", "bf16", "--compile"])  # fmt: skip
    assert len(results) == 2 and all(math.isfinite(t) and t > 0 for t in results.values())
    assert "batch 2, bf16, compiled, cpu" in capsys.readouterr().out


def test_script_clis_have_help(capsys: pytest.CaptureFixture[str], load_script: Callable[[str], ModuleType]) -> None:
    for name, flag in (("export_timm", "--weights"), ("benchmark_features", "--batch-size")):
        with pytest.raises(SystemExit) as info:
            load_script(name).main(["--help"])
        assert info.value.code == 0 and flag in capsys.readouterr().out


NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error on a machine without MPS")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("export_timm.py", ["--weights", "absent.pth", "--output", "x.safetensors"], "weights file not found: absent.pth"),
        ("make_file_lists.py", ["absent", "--output", "lists"], "source folder absent does not exist"),
        ("benchmark_train.py", ["--config-file", "absent.yaml"], "config file absent.yaml does not exist"),
        ("benchmark_data.py", ["--data", "absent"], "dataset root absent does not exist"),
        ("benchmark_loss.py", ["--tokens", "70000", "--prototypes", "8"], "--tokens must be in 1..65536 for 256 crops"),
        # refused before the steps are timed, not after them
        ("benchmark_train.py", ["--profile", "."], "cannot write .: it is a folder"),
        pytest.param("benchmark_attention.py", ["--device", "mps"], "--device mps was requested, but PyTorch",
                     marks=NO_MPS),
        pytest.param("benchmark_data.py", ["--data", "absent", "--device", "mps"], "--device mps was requested",
                     marks=NO_MPS),
    ],
)
def test_scripts_end_a_user_mistake_in_one_error_line(tmp_path: Path, script: str, args: list[str], message: str) -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    last_line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert last_line.startswith("error: ") and message in last_line


def test_benchmark_overrides_may_precede_options(load_script: Callable[[str], ModuleType]) -> None:
    args = load_script("benchmark_train").build_parser().parse_intermixed_args(
        ["--config-file", "run.yaml", "train.seed=3", "--iters", "2", "optim.epochs=2"]
    )
    assert args.opts == ["train.seed=3", "optim.epochs=2"] and args.iters == 2


def test_benchmark_train_reports_its_figures(
    load_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The demo step on this CPU: the figures of the last line agree with the result, the options reach the
    config (a batch of 2, the DinoBloom crops), and ``--profile`` writes its table and trace after the figures."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    script = load_script("benchmark_train")
    args = script.build_parser().parse_intermixed_args(["--arch", "vit_small", "--crops", "dinobloom", "--heads",
                                                       "1024,256,64", "--batch-size", "2"])  # fmt: skip
    overrides = script.benchmark_overrides(args, "fp32")
    assert {"train.batch_size_per_gpu=2", "student.arch=vit_small", "crops.local_crops_number=1",
            "dino.head_n_prototypes=1024", "ibot.head_bottleneck_dim=64"} <= set(overrides)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        result = script.main(["--config-file", str(REPO_ROOT / "dinov2/configs/train/demo.yaml"), "--batch-size", "2",
                              "--iters", "1", "--warmup", "0", "--threads", "1",
                              "--profile", str(tmp_path / "profiles" / "step.txt")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert "Self CPU" in (tmp_path / "profiles" / "step.txt").read_text()
    assert (tmp_path / "profiles" / "step.json.gz").stat().st_size > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"images_per_s", "mfu", "peak_mem_gb"}
    assert float(figures["images_per_s"]) == pytest.approx(result["images_per_s"], rel=1e-2)
    assert result["images_per_s"] == pytest.approx(2 / result["s_per_iter"]) and 0 < result["mfu"]
    assert result["s_per_iter_synced"] > 0


def test_benchmark_inductor_settings_are_read_and_checked_before_the_work(
    load_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture
) -> None:
    """``--inductor NAME=VALUE`` (repeatable) reads its value as the setting's type (a flag's ``false`` must not
    become the text "false", which Python takes as true); a setting that Inductor does not have, a value of another
    type, a missing value, or settings without ``--compile`` end in an argparse error at once."""
    script = load_script("benchmark_train")
    args = script.build_parser().parse_intermixed_args(
        ["--compile", "--inductor", "cpp_wrapper=false", "--inductor", "triton.cudagraphs=True",
         "--inductor", "compile_threads=8", "--inductor", "max_autotune_gemm_backends=ATEN,TRITON"])  # fmt: skip
    assert args.inductor == [("cpp_wrapper", False), ("triton.cudagraphs", True), ("compile_threads", 8),
                             ("max_autotune_gemm_backends", "ATEN,TRITON")]  # fmt: skip
    for argv, message in ((["--compile", "--inductor", "cpp_wraper=True"], "has no setting 'cpp_wraper'"),
                          (["--compile", "--inductor", "cpp_wrapper=1"], "cpp_wrapper is a flag: expected true"),
                          (["--compile", "--inductor", "compile_threads=eight"], "compile_threads takes an integer"),
                          (["--compile", "--inductor", "cpp_wrapper"], "expected NAME=VALUE"),
                          (["--inductor", "cpp_wrapper=True"], "add --compile")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            script.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_inductor_settings_hold_during_the_run_and_are_restored(
    load_script: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings apply while the step is built and compiled, and are Inductor's own again afterwards."""
    import torch._inductor.config as inductor_config

    script = load_script("benchmark_train")
    before = inductor_config.compile_threads
    seen = []

    def stopped(args):
        seen.append(inductor_config.compile_threads)
        return {}

    monkeypatch.setattr(script, "run", stopped)
    script.main(["--compile", "--inductor", f"compile_threads={before + 3}"])
    assert seen == [before + 3] and inductor_config.compile_threads == before


@pytest.mark.parametrize("name", ["benchmark_train", "benchmark_loss"])
def test_compiled_benchmarks_refuse_to_time_the_compilation(
    name: str, load_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture
) -> None:
    """Without a warm-up call the first timed call compiles: its seconds would be reported as the step's."""
    with pytest.raises(SystemExit) as info:
        load_script(name).main(["--compile", "--warmup", "0"])
    assert info.value.code == 2 and "--compile needs --warmup 1 or more" in capsys.readouterr().err


def test_benchmark_step_windows_time_each_step_once_and_take_the_median_window(
    load_script: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven steps in windows of three (3, 3, 1) on a clock that each step advances by its own duration and each
    synchronisation by 3 s: each step runs once, the figure is the median of the windows' times per step, and the
    host's figure leaves out the wait for the device at the window's end."""
    script = load_script("benchmark_train")
    durations = iter([1.0, 1.0, 1.0, 2.0, 2.0, 5.0, 9.0])
    clock = [0.0]
    monkeypatch.setattr(script.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(script, "synchronize", lambda device: clock.__setitem__(0, clock[0] + 3.0))

    def step() -> None:
        clock[0] += next(durations)

    seconds, host_seconds = script.time_step_windows(step, torch.device("cpu"), iters=7, window=3)
    assert seconds == pytest.approx(4.0)  # windows (3 + 3) / 3, (9 + 3) / 3 and (9 + 3) / 1 per step
    assert host_seconds == pytest.approx(3.0)  # 1.0, 3.0 and 9.0 per step
    assert next(durations, None) is None


def test_benchmark_counts_the_steps_waits_for_the_device(
    load_script: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA each synchronising operation of one step (a warning under ``set_sync_debug_mode("warn")``) is
    counted and its place named once; the mode is reset after the step, also when it fails. Other warnings are not
    counted, such as the mode's own that it is a prototype (which a GPU run once counted as a wait). Other devices
    have no such mode: None."""
    script = load_script("benchmark_train")
    modes = []
    monkeypatch.setattr(script.torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(script, "synchronize", lambda device: None)

    def step() -> None:
        warnings.warn("Synchronization debug mode is a prototype feature")  # as PyTorch 2.11 warns on a GPU
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    count, places = script.count_device_syncs(step, torch.device("cuda"))
    assert count == 2 and len(places) == 1 and "synchronizing" in places[0] and modes == ["warn", "default"]

    def failing_step() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        script.count_device_syncs(failing_step, torch.device("cuda"))
    assert modes[-1] == "default"
    assert script.count_device_syncs(step, torch.device("cpu")) is None


def test_benchmark_flop_count_of_an_attention_layer_is_the_hand_count(load_script: Callable[[str], ModuleType]) -> None:
    """Forward and backward of DINOv2's attention on (B, N, D) tokens: the qkv and output projections make
    2·B·N·D·(3D + D) FLOPs forward and twice that backward (gradients of input and weights); QKᵀ and AV make
    4·B·N²·D forward, and the backward five such products (PyTorch's counter includes the scores that flash
    attention recomputes), 10·B·N²·D. On a CPU the attention kernels have no entry in PyTorch's FLOP table, so this
    checks the benchmark's own mapping."""
    from dinov2.layers import Attention

    batch, tokens, dim = 2, 10, 32
    layer = Attention(dim, num_heads=4, qkv_bias=True)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    total, attention = load_script("benchmark_train").count_step_flops(lambda: layer(x).sum().backward())
    projections = 2 * batch * tokens * dim * (3 * dim + dim)
    scores = 4 * batch * tokens**2 * dim
    assert attention == scores + 10 * batch * tokens**2 * dim
    assert total == 3 * projections + attention


def test_attention_benchmark_times_the_backends_a_cpu_has(
    load_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmark_attention.py`` times PyTorch's default and each backend that runs here, marks the others n/a and
    names the fastest backend."""
    script = load_script("benchmark_attention")
    fastest = script.main(["--arch", "vit_small", "--crops", "2", "--tokens", "17", "--warmup", "0", "--iters", "1",
                           "--device", "cpu"])  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    timed = {row[-3]: float(row[-2]) for row in rows[1:-1] if row[-1] != "n/a"}
    assert {"default", "MATH", "FLASH_ATTENTION"} <= set(timed) and all(ms > 0 for ms in timed.values())
    backends = {name: ms for name, ms in timed.items() if name != "default"}
    assert fastest == {"vit_small": min(backends, key=backends.get)}
    assert rows[-1] == [f"vit_small={fastest['vit_small']}"]


def test_attention_benchmark_counts_the_strict_attention_flops(load_script: Callable[[str], ModuleType]) -> None:
    """Its TFLOP/s count the matmuls of attention forward and backward as PyTorch's FLOP counter counts them on the
    math backend, which recomputes nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    script = load_script("benchmark_attention")
    crops, heads, tokens, head_dim = 2, 3, 17, 8
    qkv = torch.randn(crops, tokens, 3, heads, head_dim, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    assert matmuls == script.attention_flops(crops, heads, tokens, head_dim) > 0
