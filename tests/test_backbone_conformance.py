"""The backbone against the reference DINOv2 outputs and checkpoint layouts in ../shared/conformance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from dinov2.hub import (
    extract_backbone_state,
    infer_backbone_config,
    load_backbone,
    load_backbone_state,
    resize_pos_embed_as_dinobloom,
)
from dinov2.layers import LayerNorm, PatchEmbed, SwiGLUFFNFused
from dinov2.layers.patch_embed import patch_matmul
from dinov2.models import DinoVisionTransformer, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-5  # README §5: about 3.5x the worst float32-vs-float64 deviation of the reference
VARIANTS = ("DinoBloom-S", "DinoBloom-B", "DinoBloom-L", "DinoBloom-G")


def _fixture_files(conformance_dir: Path) -> list[Path]:
    files = sorted(conformance_dir.glob("backbone_*.pt"))
    assert files, f"no backbone_*.pt fixtures in {conformance_dir}"
    return files


@pytest.fixture(scope="module")
def manifest(conformance_dir: Path) -> dict[str, Any]:
    return json.loads((conformance_dir / "manifest.json").read_text())


def model_from_fixture_config(config: dict[str, Any], **overrides: Any) -> DinoVisionTransformer:
    """Our model with the fixture's constructor arguments (the hub classes built at img_size 224)."""
    kwargs = dict(
        img_size=config["img_size"],
        patch_size=config["patch_size"],
        embed_dim=config["embed_dim"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"],
        ffn_layer=config["ffn_layer"],
        num_register_tokens=config["num_register_tokens"],
        interpolate_antialias=config["interpolate_antialias"],
        interpolate_offset=config["interpolate_offset"],
        init_values=1e-5 if config["layerscale"] else None,
        block_chunks=config["block_chunks"],
        qkv_bias=config["qkv_bias"],
        proj_bias=config["proj_bias"],
        ffn_bias=config["ffn_bias"],
    )
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.3g} > {ATOL}"


def check_fixture_outputs(model: DinoVisionTransformer, fixture: dict[str, Any], name: str) -> None:
    """Every input and output key of a backbone fixture, including the masked forward."""
    n_registers = fixture["config"]["num_register_tokens"]
    with torch.no_grad():
        for input_name, x in fixture["inputs"].items():
            expected = fixture["outputs"][input_name]
            out = model.forward_features(x)
            for key, value in expected["forward_features"].items():
                assert_close(out[key], value, f"{name}/{input_name}/{key}")
            if n_registers == 0:
                assert out["x_norm_regtokens"].shape[1] == 0
            assert torch.equal(model(x), out["x_norm_clstoken"])
            layers = model.get_intermediate_layers(x, n=2, return_class_token=True, norm=True)
            assert len(layers) == len(expected["get_intermediate_layers"]) == 2
            for i, ((patch, cls), ref) in enumerate(zip(layers, expected["get_intermediate_layers"])):
                assert_close(patch, ref["patch"], f"{name}/{input_name}/intermediate[{i}].patch")
                assert_close(cls, ref["cls"], f"{name}/{input_name}/intermediate[{i}].cls")
        if "masked" in fixture:
            masked = fixture["masked"]
            out = model.forward_features(fixture["inputs"][masked["input"]], masks=masked["masks"])
            for key, value in masked["outputs"]["forward_features"].items():
                assert_close(out[key], value, f"{name}/masked/{key}")


def test_every_backbone_fixture(conformance_dir: Path) -> None:
    for path in _fixture_files(conformance_dir):
        fixture = torch.load(path, map_location="cpu", weights_only=True)
        model = model_from_fixture_config(fixture["config"])
        load_backbone_state(model, extract_backbone_state(fixture["checkpoint"]), source=path.name)
        assert sum(p.numel() for p in model.parameters()) == fixture["config"]["n_params"], path.name
        check_fixture_outputs(model, fixture, path.name)


def test_fixture_architecture_is_inferred_from_the_checkpoint(conformance_dir: Path) -> None:
    """Building from the checkpoint shapes alone (as `load_backbone(None, ...)` does) gives the same outputs."""
    for path in _fixture_files(conformance_dir):
        fixture = torch.load(path, map_location="cpu", weights_only=True)
        state = extract_backbone_state(fixture["checkpoint"])
        config = infer_backbone_config(state)
        expected = {k: fixture["config"][k] for k in ("embed_dim", "depth", "num_register_tokens", "ffn_layer")}
        assert {k: config[k] for k in expected} == expected
        # heads leave no trace in the shapes: inferred as head dim 64, the DINOv2 widths' rule
        if config["embed_dim"] in (384, 768, 1024, 1536):
            assert config["num_heads"] == fixture["config"]["num_heads"]
        else:
            assert config["num_heads"] == config["embed_dim"] // 64
            config["num_heads"] = fixture["config"]["num_heads"]
        model = load_backbone_state(DinoVisionTransformer(**config).eval(), state)
        x = fixture["inputs"]["x224"]
        with torch.no_grad():
            assert_close(model(x), fixture["outputs"]["x224"]["forward_features"]["x_norm_clstoken"], path.name)


def test_chunked_blocks_reproduce_fixture_and_keys(conformance_dir: Path) -> None:
    """block_chunks>0 nests blocks as DINOv2 does (Identity padding keeps global indices) and loads flat files."""
    fixture = torch.load(conformance_dir / "backbone_vits14_depth2.pt", map_location="cpu", weights_only=True)
    model = model_from_fixture_config(fixture["config"], block_chunks=2)
    keys = [k for k in model.state_dict() if k.startswith("blocks.")]
    assert {k.split(".")[1] + "." + k.split(".")[2] for k in keys} == {"0.0", "1.1"}
    assert isinstance(model.blocks[1][0], nn.Identity)
    load_backbone_state(model, extract_backbone_state(fixture["checkpoint"]))
    check_fixture_outputs(model, fixture, "chunked")
    # and a chunked checkpoint loads into a flat model
    flat = load_backbone_state(model_from_fixture_config(fixture["config"]), model.state_dict())
    for key, value in flat.state_dict().items():
        assert torch.equal(value, extract_backbone_state(fixture["checkpoint"])[key]), key


def test_a_model_loaded_for_another_size_gives_the_reference_features_at_that_size(
    conformance_dir: Path, tmp_path: Path
) -> None:
    """load_backbone(..., img_size=N) on a 224 px checkpoint equals the reference 224 px model fed N px images."""
    for path in _fixture_files(conformance_dir):
        fixture = torch.load(path, map_location="cpu", weights_only=True)
        weights = tmp_path / f"{path.stem}.pth"
        torch.save(fixture["checkpoint"], weights)
        config = fixture["config"]
        settings = {k: config[k] for k in ("num_heads", "interpolate_antialias", "interpolate_offset")}
        for input_name, size in (("x280", 280), ("x98", 98)):
            model = load_backbone(None, weights, img_size=size, **settings)
            assert model.pos_embed.shape[1] == 1 + (size // 14) ** 2
            with torch.no_grad():
                out = model.forward_features(fixture["inputs"][input_name])
            for key in ("x_norm_clstoken", "x_norm_patchtokens"):
                expected = fixture["outputs"][input_name]["forward_features"][key]
                assert_close(out[key], expected, f"{path.name}/img_size={size}/{key}")


def test_posembed_resampling_matches_dinobloom(conformance_dir: Path) -> None:
    """The loader turns a 1370-token hub pos_embed into DinoBloom's 257-token one exactly as DinoBloom did."""
    fixture = torch.load(conformance_dir / "posembed_init.pt", map_location="cpu", weights_only=True)
    hub, expected = fixture["hub_pos_embed"], fixture["dinobloom_pos_embed"]
    assert_close(resize_pos_embed_as_dinobloom(hub, expected.shape[1]), expected, "resize_pos_embed_as_dinobloom")
    # through the strict loader, with a ViT-S-width model of depth 0 (just the embeddings)
    model = DinoVisionTransformer(img_size=224, embed_dim=hub.shape[-1], depth=0, num_heads=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = hub
    load_backbone_state(model, state)
    assert_close(model.pos_embed.detach(), expected, "loader pos_embed")
    assert torch.equal(model.pos_embed[:, 0], hub[:, 0])


def _meta_model(variant: dict[str, Any], hub: bool) -> DinoVisionTransformer:
    name = variant["hub_name"] if hub else variant["hub_name"].replace("dinov2_vit", "dinobloom_").removesuffix("14")
    with torch.device("meta"):
        return build_model(name)


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_state_dict_layout_matches_manifest(manifest: dict[str, Any], variant_name: str) -> None:
    """Every key, shape and the order of the teacher checkpoint's backbone and of the hub backbone; on meta."""
    variant = manifest["variants"][variant_name]
    teacher = [(e["key"], tuple(e["shape"])) for e in variant["teacher_checkpoint"]["entries"]]
    backbone = [(k.removeprefix("backbone."), s) for k, s in teacher if k.startswith("backbone.")]
    assert all(k.startswith(("backbone.", "dino_head.", "ibot_head.")) for k, _ in teacher)

    model = _meta_model(variant, hub=False)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == backbone
    assert sum(p.numel() for p in model.parameters()) == variant["n_params_backbone"]
    hub_model = _meta_model(variant, hub=True)
    hub_entries = [(e["key"], tuple(e["shape"])) for e in variant["hub_backbone_state_dict"]["entries"]]
    assert [(k, tuple(v.shape)) for k, v in hub_model.state_dict().items()] == hub_entries

    # the loader reduces the full teacher layout (heads included) to exactly the model's keys
    checkpoint = {"teacher": {k: torch.empty(s, device="meta") for k, s in teacher}}
    state = extract_backbone_state(checkpoint)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == backbone
    config = infer_backbone_config(state)
    assert (config["embed_dim"], config["depth"], config["num_heads"], config["img_size"]) == (
        variant["embed_dim"], variant["depth"], variant["num_heads"], 224,
    )
    assert config["ffn_layer"] == ("swiglufused" if variant["ffn_layer"] == "swiglufused" else "mlp")
    with torch.device("meta"):
        inferred = DinoVisionTransformer(**config)
    assert [(k, tuple(v.shape)) for k, v in inferred.state_dict().items()] == backbone


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_norm_eps_and_exact_gelu_structurally(variant_name: str) -> None:
    """LayerNorm eps 1e-6 everywhere (a 1e-5 eps is only just visible numerically) and erf GELU."""
    size = variant_name[-1].lower()
    with torch.device("meta"):
        model = build_model(f"dinobloom_{size}")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * model.n_blocks + 1
    assert all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert all(m.approximate == "none" for m in gelus)
    assert len(gelus) == (0 if size == "g" else model.n_blocks)


def test_swiglu_hidden_rule_of_vit_giant() -> None:
    with torch.device("meta"):
        model = build_model("vit_giant2", ffn_layer="swiglufused")
        plain = build_model("vit_giant2", ffn_layer="swiglu")
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, SwiGLUFFNFused) and isinstance(plain.blocks[0].mlp, SwiGLUFFNFused)
    assert tuple(mlp.w12.weight.shape) == (8192, 1536) and tuple(mlp.w3.weight.shape) == (1536, 4096)


def test_swiglu_forward_gates_first_half_with_silu() -> None:
    torch.manual_seed(0)
    ffn = SwiGLUFFNFused(in_features=16, hidden_features=64)
    assert ffn.w3.in_features == (int(64 * 2 / 3) + 7) // 8 * 8 == 48
    x = torch.randn(3, 16)
    a, b = (x @ ffn.w12.weight.T + ffn.w12.bias).split(48, dim=-1)
    expected = (torch.nn.functional.silu(a) * b) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


def test_patch_matmul_is_the_strided_convolution() -> None:
    """The CUDA patch embedding (a matmul of flattened patches) computes DINOv2's patch-strided Conv2d."""
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=56, patch_size=14, in_chans=3, embed_dim=32)
    images = torch.randn(2, 3, 42, 70)  # not square: rows and columns of patches must not be swapped
    expected = embed(images)  # the convolution, on the CPU
    assert expected.shape == (2, 15, 32)
    conv = torch.nn.functional.conv2d(images, embed.proj.weight, embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    torch.testing.assert_close(expected, conv, rtol=0, atol=0)
    torch.testing.assert_close(patch_matmul(images, embed.proj.weight, embed.proj.bias), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_keeps_a_half_precision_stream_under_autocast() -> None:
    """Under autocast, bf16 input is normalised as FSDP mixed precision does it (bf16 parameters), to bf16;
    float32 input stays float32."""
    torch.manual_seed(0)
    norm = LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 64) * 4 + 1
    half_params = (norm.weight.bfloat16(), norm.bias.bfloat16())
    expected = torch.nn.functional.layer_norm(x.bfloat16(), (64,), *half_params, 1e-6)
    full_precision = torch.nn.functional.layer_norm(x.bfloat16().float(), (64,), norm.weight, norm.bias, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = norm(x.bfloat16())
        full = norm(x)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(half, expected, rtol=0, atol=0)
    torch.testing.assert_close(half.float(), full_precision, rtol=0.02, atol=0.05)
    assert set(norm.state_dict()) == {"weight", "bias"}


def test_autocast_stream_is_the_compute_dtype_in_training_and_float32_in_eval() -> None:
    """Training under autocast keeps the tokens between blocks in bf16 (as DINOv2's FSDP mixed precision does); an
    eval-mode model keeps them float32, as DINOv2's hub models do under autocast, and returns float32 features
    that are closer to the float32 model's than the bf16 stream's."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, init_values=1.0)
    stream_dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: stream_dtypes.append((args[0].dtype, out.dtype)))
    images = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        reference = model.eval()(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_eval = model(images)
            in_training = model.train()(images)
    assert stream_dtypes[3:6] == [(torch.float32, torch.float32)] * 3
    assert stream_dtypes[6:] == [(torch.bfloat16, torch.bfloat16)] * 3
    assert in_eval.dtype == torch.float32 and in_training.dtype == torch.bfloat16
    torch.testing.assert_close(in_training.float(), reference, rtol=0.05, atol=0.05)
    torch.testing.assert_close(in_eval, reference, rtol=0.05, atol=0.05)
    assert (in_eval - reference).abs().mean() < (in_training.float() - reference).abs().mean()


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
def test_a_small_layerscale_keeps_its_branch_exact_under_fp16_autocast(ffn_layer: str) -> None:
    """DINOv2's initial LayerScale (1e-5) times the output projection would fall into fp16's subnormals if folded
    into the weight; each residual branch stays within fp16's rounding of the float64 result, in both modes."""
    from dinov2.layers.block import Block
    from dinov2.layers.mlp import Mlp

    torch.manual_seed(0)
    block = Block(96, 4, init_values=1e-5, ffn_layer=SwiGLUFFNFused if ffn_layer == "swiglufused" else Mlp)
    exact = Block(96, 4, init_values=1e-5, ffn_layer=type(block.mlp)).double()
    exact.load_state_dict(block.state_dict())
    x = torch.randn(2, 17, 96)
    for training in (True, False):
        block.train(training)
        expected = (exact.train(training)._attn_residual(x.double()), exact._ffn_residual(x.double()))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            branches = (block._attn_residual(x), block._ffn_residual(x))
            stream = block(x.half())
        for branch, reference in zip(branches, expected):
            assert (branch.double() - reference).norm() / reference.norm() < 2e-3
        assert stream.dtype == torch.float16  # the token stream keeps its dtype


def test_a_forward_pass_on_the_meta_device_gives_the_output_shape() -> None:
    """Shape inference without memory (the meta device has no autocast to ask about)."""
    with torch.device("meta"):
        model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, init_values=1e-5)
        features = model.eval()(torch.randn(3, 3, 56, 56))
    assert features.shape == (3, 64) and features.device.type == "meta"


def test_ffn_layer_choices() -> None:
    with torch.device("meta"):
        identity = DinoVisionTransformer(embed_dim=64, depth=1, num_heads=1, ffn_layer="identity", init_values=1.0)
    assert isinstance(identity.blocks[0].mlp, nn.Identity)
    assert "blocks.0.ls2.gamma" in identity.state_dict()
    with pytest.raises(ValueError, match="unknown ffn_layer 'gelu'"):
        DinoVisionTransformer(embed_dim=64, depth=1, num_heads=1, ffn_layer="gelu")


def test_build_model_names() -> None:
    with torch.device("meta"):
        assert build_model("vit_small").pos_embed.shape == (1, 257, 384)
        assert build_model("dinov2_vits14").pos_embed.shape == (1, 1370, 384)
        reg = build_model("dinov2_vits14_reg")
        assert reg.register_tokens.shape == (1, 4, 384) and reg.interpolate_antialias and reg.interpolate_offset == 0
        assert build_model("dinobloom_b", img_size=98).pos_embed.shape == (1, 50, 768)
        assert build_model("dinobloom_l").blocks[0].ls1.gamma.shape == (1024,)
    with pytest.raises(ValueError, match="unknown backbone architecture 'vit_tiny'.*vit_small.*dinobloom_s"):
        build_model("vit_tiny")


def _tiny(**kwargs: Any) -> DinoVisionTransformer:
    torch.manual_seed(0)
    defaults = dict(img_size=56, embed_dim=32, depth=3, num_heads=2, init_values=0.5)
    return DinoVisionTransformer(**{**defaults, **kwargs}).eval()


def test_init_weights_after_meta_construction() -> None:
    """A model built on the meta device becomes a properly initialised model with to_empty + init_weights."""
    with torch.device("meta"):
        model = DinoVisionTransformer(img_size=224, embed_dim=192, depth=2, num_heads=3, init_values=1e-5,
                                      num_register_tokens=2)
    model.to_empty(device="cpu")
    model.init_weights()
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert model.cls_token.abs().max() < 1e-4 and model.cls_token.abs().max() > 0
    assert model.register_tokens.abs().max() < 1e-4
    assert torch.count_nonzero(model.mask_token) == 0
    block = model.blocks[0]
    assert torch.all(block.ls1.gamma == 1e-5) and torch.all(block.ls2.gamma == 1e-5)
    assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert torch.count_nonzero(block.attn.qkv.bias) == 0
    assert abs(block.mlp.fc1.weight.std().item() - 0.02) < 0.002 and abs(block.mlp.fc1.weight.mean()) < 1e-3
    assert torch.isfinite(model.patch_embed.proj.weight).all() and model.patch_embed.proj.weight.std() > 0


def test_forward_variants() -> None:
    model = _tiny(num_register_tokens=2)
    x, x_small = torch.randn(2, 3, 56, 56), torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        single, small = model.forward_features(x), model.forward_features(x_small)
        listed = model.forward_features([x, x_small], masks=[torch.zeros(2, 16, dtype=torch.bool), None])
        assert isinstance(listed, list) and len(listed) == 2
        torch.testing.assert_close(listed[0]["x_norm_patchtokens"], single["x_norm_patchtokens"])
        torch.testing.assert_close(listed[1]["x_norm_clstoken"], small["x_norm_clstoken"])
        assert single["x_norm_regtokens"].shape == (2, 2, 32) and single["x_prenorm"].shape == (2, 1 + 2 + 16, 32)
        assert small["x_norm_patchtokens"].shape == (1, 2 * 3, 32)
        full = model(x, is_training=True)
        assert isinstance(full, dict) and full["masks"] is None
        maps = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
        assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
        torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), single["x_norm_patchtokens"])
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[:, :5] = True
        model.mask_token.data.normal_()
        masked = model.forward_features(x, masks=masks)
        assert not torch.allclose(masked["x_norm_clstoken"], single["x_norm_clstoken"])
        assert masked["masks"] is masks
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        model.forward_features([x, x_small], masks=[None])
    with torch.no_grad():  # a list of batches through model(x): one CLS tensor per batch, as forward_features
        cls_tokens = model([x, x_small])
    assert isinstance(cls_tokens, list)
    torch.testing.assert_close(cls_tokens[1], small["x_norm_clstoken"])


def test_a_wrong_input_is_named_with_its_remedy() -> None:
    """What a notebook user passes by mistake is refused before torch's own errors (a concatenation's sizes, a
    convolution's types), which name neither the input nor the fix."""
    model = _tiny()
    image = torch.randn(3, 28, 28)
    for x, error, message in (
        (image, ValueError, r"got shape \(3, 28, 28\); one image: add the batch dimension, x.unsqueeze\(0\)"),
        (image.permute(1, 2, 0)[None], ValueError, r"channels last: x.permute\(0, 3, 1, 2\)"),
        ((image * 255).to(torch.uint8)[None], TypeError, "expected float images, normalised as .*got torch.uint8"),
        (Image.new("RGB", (28, 28)), TypeError, "got a Image; make one with .*make_eval_transform"),
        (image[None].double(), TypeError, "images are torch.float64 but the model's weights are torch.float32"),
    ):
        with pytest.raises(error, match=message):
            model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the dtypes may differ
        assert model(image[None].bfloat16()).shape == (1, 32)


def test_drop_path_in_training_only() -> None:
    uniform = _tiny(drop_path_rate=0.3, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in uniform.blocks] == pytest.approx([0.3, 0.3, 0.3])
    linear = _tiny(drop_path_rate=0.3)
    assert [b.sample_drop_ratio for b in linear.blocks] == pytest.approx([0.0, 0.15, 0.3])
    x = torch.randn(8, 3, 56, 56)
    reference = _tiny()
    reference.load_state_dict(uniform.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(uniform(x), reference(x))  # eval: no stochastic depth
        uniform.train()
        torch.manual_seed(1)
        assert not torch.allclose(uniform(x), reference(x))
    # (its gradients: the next test)


def test_a_low_drop_rate_computes_the_residuals_of_a_sample_subset_as_dinov2s_student() -> None:
    """DINOv2's student runs its blocks on lists of crops, whose stochastic depth, at any rate, adds each residual
    to a random subset of int(B (1 - rate)) samples, scaled by B / subset; written out here for rate 0.05, forward
    and gradients (of the input and of every parameter)."""
    block = _tiny(drop_path_rate=0.05, drop_path_uniform=True).blocks[0].train()
    x = torch.randn(16, 5, 32)
    weights = torch.randn(16, 5, 32)  # (a loss whose gradient differs per output)
    x_ours = x.clone().requires_grad_()
    torch.manual_seed(3)
    out = block(x_ours)
    (out * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    x_written = x.clone().requires_grad_()
    torch.manual_seed(3)
    expected = x_written
    for residual in (lambda t: block.ls1(block.attn(block.norm1(t))), lambda t: block.ls2(block.mlp(block.norm2(t)))):
        kept = torch.randperm(16)[:15]
        expected = expected.index_add(0, kept, residual(expected[kept]), alpha=16 / 15)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_written.grad, atol=1e-6, rtol=1e-5)
    for name, p in block.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_xformers_is_optional_and_never_imported_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Even when an xformers package is importable, building and running on CPU never imports it."""
    fake = tmp_path / "xformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('fake xformers must not be imported')\n")
    code = (
        "import sys, torch\n"
        "from dinov2.models import DinoVisionTransformer\n"
        "m = DinoVisionTransformer(img_size=28, embed_dim=32, depth=1, num_heads=2).eval()\n"
        "m(torch.randn(1, 3, 28, 28))\n"
        "print('imported' if 'xformers' in sys.modules else 'not imported')\n"
        "from dinov2.layers import xformers_attention\n"
        "print(xformers_attention())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    env.pop("XFORMERS_DISABLED", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["not", "imported", "None"]
    assert "cannot be imported" in result.stderr  # the broken install is reported, SDPA is used

    import dinov2.layers.attention as attention

    attention.xformers_attention.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(attention.XFORMERS_DISABLED_ENV, "1")
            mp.syspath_prepend(str(tmp_path))
            assert attention.xformers_attention() is None
        assert "cannot be imported" not in caplog.text  # $XFORMERS_DISABLED: not even tried
    finally:
        attention.xformers_attention.cache_clear()


def test_compiled_attention_does_not_look_up_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside torch.compile the CUDA path takes SDPA without xFormers' lookup, which Dynamo cannot trace."""
    import dinov2.layers.attention as attention

    def lookup_not_traceable() -> None:
        raise AssertionError("xFormers' lookup ran inside torch.compile")

    monkeypatch.setattr(attention, "xformers_attention", lookup_not_traceable)

    def kernel_choice(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if attention.xformers_for_device("cuda") is None else x

    torch._dynamo.reset()
    compiled = torch.compile(kernel_choice, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.zeros(3)), torch.ones(3))
    assert attention.xformers_for_device("cpu") is None
    with pytest.raises(AssertionError, match="lookup ran"):  # eager CUDA runs still look it up
        attention.xformers_for_device("cuda")


def test_attention_backward_writes_the_qkv_gradient_with_one_copy() -> None:
    """Gradients equal the textbook permute-and-unbind attention's, and the backward copies qkv's gradient once
    (stacking dq, dk, dv in place of the qkv layout), not twice (a stack, then a permuted copy)."""
    from torch.profiler import ProfilerActivity, profile

    from dinov2.layers.attention import Attention

    torch.manual_seed(0)
    attention = Attention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 9, 64, requires_grad=True)
    grad_output = torch.randn(2, 9, 64)

    def textbook(tokens: torch.Tensor) -> torch.Tensor:
        qkv = attention.qkv(tokens).reshape(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0), scale=attention.scale)
        return attention.proj(out.transpose(1, 2).reshape(2, 9, 64))

    grads = []
    for forward in (textbook, attention):
        x.grad = None
        attention.zero_grad()
        out = forward(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out.backward(grad_output)
        grads.append([x.grad.clone(), *(p.grad.clone() for p in attention.parameters())])
    copies = [event.count for event in prof.key_averages() if event.key == "aten::copy_"]
    assert sum(copies) == 0, f"aten::copy_ ran {sum(copies)} time(s) in the attention backward besides the stack of dq, dk, dv"
    for ours, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
