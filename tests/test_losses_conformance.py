"""DINO head, DINO / iBOT / KoLeo losses against the reference outputs in ../shared/conformance/losses.pt."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2.layers.dino_head import DINOHead, WeightNormLinear
from dinov2.loss import DINOLoss, KoLeoLoss, dino_loss_term_scales, iBOTPatchLoss, sinkhorn_knopp

# Tolerances suggested by the conformance README (float32, CPU).
HEAD_ATOL = 1e-6
PROBS_ATOL = 1e-7
LOSS_RTOL = 1e-6
# Our float64 run and the reference's float64 run are the same computation up to float64 rounding.
FP64_SLACK = 1e-9

# Every entry of losses.pt (a leaf, or a sub-dict meaning all its leaves) and the tests or helpers that
# use it; config entries set up the modules.
COVERED_KEYS = {
    "format_version": "test_fixture_layout",
    "distributed_note": "test_sinkhorn_knopp_inside_single_process_gloo_group",
    "dino_head/config/in_dim": "test_dino_head_state_dict_layout",
    "dino_head/config/out_dim": "test_dino_head_state_dict_layout",
    "dino_head/config/hidden_dim": "test_dino_head_state_dict_layout",
    "dino_head/config/bottleneck_dim": "test_dino_head_state_dict_layout",
    "dino_head/config/nlayers": "test_dino_head_state_dict_layout",
    "dino_head/config/use_bn": "test_dino_head_state_dict_layout",
    "dino_head/config/mlp_bias": "test_dino_head_state_dict_layout",
    "dino_head/config/act": "test_dino_head_state_dict_layout",
    "dino_head/config/normalize_eps": "test_dino_head_float16_normalize_eps",
    "dino_head/config/weight_norm_dim": "test_weight_norm_linear_matches_torch_weight_norm",
    "dino_head/state_dict": "test_dino_head_state_dict_layout",
    "dino_head/x": "test_dino_head_matches_reference",
    "dino_head/mlp_out": "test_dino_head_matches_reference",
    "dino_head/normalized": "test_dino_head_matches_reference",
    "dino_head/last_layer_effective_weight": "test_dino_head_matches_reference",
    "dino_head/out": "test_dino_head_matches_reference",
    "dino_head/stats/max_abs_out": "test_dino_head_matches_reference",
    "dino_head/stats/fp32_vs_fp64_max_abs_diff": "test_dino_head_float64_is_the_reference_function",
    "dino_loss/config/out_dim": "_dino_loss",
    "dino_loss/config/student_temp": "_dino_loss",
    "dino_loss/config/center_momentum": "_dino_loss",
    "dino_loss/config/teacher_temp": "test_dino_softmax_centering_two_steps",
    "dino_loss/config/sk_n_iterations": "test_dino_sinkhorn_knopp_probs",
    "dino_loss/config/n_global_crops": "test_dino_trainer_normalisation",
    "dino_loss/config/batch_per_crop": "_teacher_per_crop",
    "dino_loss/teacher_logits_step1": "test_dino_softmax_centering_two_steps",
    "dino_loss/teacher_logits_step2": "test_dino_softmax_centering_two_steps",
    "dino_loss/student_global_logits": "test_dino_raw_losses",
    "dino_loss/student_local_logits": "test_dino_raw_losses",
    "dino_loss/center0": "test_dino_softmax_centering_two_steps",
    "dino_loss/softmax_center_probs_step1": "test_dino_softmax_centering_two_steps",
    "dino_loss/center1_after_step1": "test_dino_softmax_centering_two_steps",
    "dino_loss/softmax_center_probs_step2": "test_dino_softmax_centering_two_steps",
    "dino_loss/center2_after_step2": "test_dino_softmax_centering_two_steps",
    "dino_loss/sinkhorn_knopp_probs": "test_dino_sinkhorn_knopp_probs",
    "dino_loss/loss_with_softmax_center_probs_step1": "test_dino_raw_losses test_dino_trainer_normalisation",
    "dino_loss/loss_with_sinkhorn_knopp_probs": "test_dino_raw_losses test_dino_trainer_normalisation",
    "dino_loss/stats/global_raw_center_fp32_vs_fp64": "test_dino_float64_is_the_reference_function",
    "dino_loss/stats/sk_row_sums_max_dev_from_1": "test_dino_sinkhorn_knopp_probs",
    "dino_loss/stats/sk_probs_fp32_vs_fp64_max_abs_diff": "test_dino_float64_is_the_reference_function",
    "dino_loss/stats/center_probs_step1_fp32_vs_fp64_max_abs_diff": "test_dino_float64_is_the_reference_function",
    "dino_loss/stats/sk_probs_max": "test_dino_sinkhorn_knopp_probs",
    "dino_loss/stats/center_probs_step1_max": "test_dino_softmax_centering_two_steps",
    "dino_loss/stats/sk_gloo_world1_vs_uninitialised_max_abs_diff": (
        "test_sinkhorn_knopp_inside_single_process_gloo_group"
    ),
    "ibot_loss/config/patch_out_dim": "_ibot_loss",
    "ibot_loss/config/student_temp": "_ibot_loss",
    "ibot_loss/config/center_momentum": "_ibot_loss",
    "ibot_loss/config/teacher_temp": "test_ibot_softmax_centering_and_center_update",
    "ibot_loss/config/sk_n_iterations": "test_ibot_sinkhorn_knopp_probs",
    "ibot_loss/config/lossfunc": "test_ibot_forward_masked",
    "ibot_loss/teacher_masked_logits": "test_ibot_softmax_centering_and_center_update",
    "ibot_loss/student_masked_logits": "test_ibot_forward_masked",
    "ibot_loss/n_masked": "test_ibot_sinkhorn_knopp_probs",
    "ibot_loss/center0": "test_ibot_softmax_centering_and_center_update",
    "ibot_loss/softmax_center_probs": "test_ibot_softmax_centering_and_center_update",
    "ibot_loss/center1_after_update": "test_ibot_softmax_centering_and_center_update",
    "ibot_loss/sinkhorn_knopp_probs": "test_ibot_sinkhorn_knopp_probs",
    "ibot_loss/losses": "test_ibot_forward_masked",
    "ibot_loss/stats/forward_masked_center_fp32_vs_fp64": "test_ibot_forward_masked",
    "ibot_loss/stats/ibot_sk_vs_dino_sk_max_abs_diff": "test_ibot_sinkhorn_knopp_probs",
    "masks": "tests/test_masking_collate.py (and the iBOT inputs here)",
    "koleo/x": "test_koleo_matches_reference",
    "koleo/x_dup": "test_koleo_matches_reference",
    "koleo/pdist_eps_dinobloom": "test_koleo_matches_reference",
    "koleo/pdist_eps_upstream": "test_koleo_matches_reference",
    "koleo/log_eps": "test_koleo_matches_reference",
    "koleo/nn_index_x": "test_koleo_nearest_neighbours",
    "koleo/nn_index_x_dup": "test_koleo_nearest_neighbours",
    "koleo/dinobloom_x": "test_koleo_matches_reference",
    "koleo/upstream_x": "test_koleo_matches_reference",
    "koleo/dinobloom_trainer_term_x": "test_koleo_trainer_term",
    "koleo/dinobloom_x_dup": "test_koleo_matches_reference",
    "koleo/upstream_x_dup": "test_koleo_matches_reference",
    "koleo/dinobloom_trainer_term_x_dup": "test_koleo_trainer_term",
}


@pytest.fixture(scope="module")
def ref(conformance_dir: Path) -> dict[str, Any]:
    """The loaded losses.pt fixture."""
    return torch.load(conformance_dir / "losses.pt", weights_only=True)


def _leaf_paths(tree: Any, prefix: str = "") -> set[str]:
    """Slash-separated paths of the leaves of nested dicts (tensors, numbers, strings, lists)."""
    if not isinstance(tree, dict):
        return {prefix}
    paths: set[str] = set()
    for key, value in tree.items():
        paths |= _leaf_paths(value, f"{prefix}/{key}" if prefix else str(key))
    return paths


def _covered(path: str) -> bool:
    return any(path == key or path.startswith(key + "/") for key in COVERED_KEYS)


def _assert_scalar_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=LOSS_RTOL, atol=0.0)


def _dino_loss(cfg: dict[str, Any], dtype: torch.dtype = torch.float32) -> DINOLoss:
    return DINOLoss(cfg["out_dim"], student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"]).to(dtype)


def _ibot_loss(cfg: dict[str, Any], dtype: torch.dtype = torch.float32) -> iBOTPatchLoss:
    return iBOTPatchLoss(
        cfg["patch_out_dim"], student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"]
    ).to(dtype)


def _teacher_per_crop(probs: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """(n_global_crops * B, K) teacher targets viewed as (n_global_crops, B, K), as the trainer does."""
    return probs.view(cfg["n_global_crops"], cfg["batch_per_crop"], -1)


def _head(cfg: dict[str, Any]) -> DINOHead:
    return DINOHead(
        in_dim=cfg["in_dim"],
        out_dim=cfg["out_dim"],
        use_bn=cfg["use_bn"],
        nlayers=cfg["nlayers"],
        hidden_dim=cfg["hidden_dim"],
        bottleneck_dim=cfg["bottleneck_dim"],
        mlp_bias=cfg["mlp_bias"],
    )


# ----------------------------------------------------------------------------------------------- layout


def test_fixture_layout(ref: dict[str, Any]) -> None:
    assert ref["format_version"] == 1
    leaves = _leaf_paths({k: v for k, v in ref.items() if k != "reference"})
    uncovered = sorted(p for p in leaves if not _covered(p))
    assert not uncovered, f"losses.pt entries that no test checks: {uncovered}"
    names = {name for value in COVERED_KEYS.values() if not value.startswith("tests/") for name in value.split()}
    missing = {name for name in names if name not in globals()}
    assert not missing, f"COVERED_KEYS names unknown tests/helpers: {missing}"


# ----------------------------------------------------------------------------------------------- DINO head


def test_dino_head_state_dict_layout(ref: dict[str, Any]) -> None:
    cfg = ref["dino_head"]["config"]
    assert cfg["act"].startswith("nn.GELU()") and "erf" in cfg["act"]
    head = _head(cfg)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref["dino_head"]["state_dict"].items()}
    assert ours == theirs
    assert list(ours) == list(theirs)
    assert isinstance(head.mlp[1], nn.GELU) and head.mlp[1].approximate == "none"
    assert isinstance(head.mlp[3], nn.GELU)


def test_dino_head_matches_reference(ref: dict[str, Any]) -> None:
    fx = ref["dino_head"]
    head = _head(fx["config"])
    head.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        mlp_out = head.mlp(fx["x"])
        out = head(fx["x"])
    # mlp_out (|values| up to 1.35) is 3 float32 matmuls deep: the reference itself is 9e-7 from float64,
    # so a relative term is added to the README's head atol for this intermediate.
    torch.testing.assert_close(mlp_out, fx["mlp_out"], atol=HEAD_ATOL, rtol=1e-6)
    torch.testing.assert_close(F.normalize(mlp_out, dim=-1), fx["normalized"], atol=HEAD_ATOL, rtol=0)
    torch.testing.assert_close(
        head.last_layer.weight.detach(), fx["last_layer_effective_weight"], atol=HEAD_ATOL, rtol=0
    )
    torch.testing.assert_close(out, fx["out"], atol=HEAD_ATOL, rtol=0)
    assert out.abs().max().item() == pytest.approx(fx["stats"]["max_abs_out"], abs=HEAD_ATOL)


def test_dino_head_float64_is_the_reference_function(ref: dict[str, Any]) -> None:
    fx = ref["dino_head"]
    head = _head(fx["config"])
    head.load_state_dict(fx["state_dict"])
    head.double()
    with torch.no_grad():
        out64 = head(fx["x"].double())
    deviation = (out64 - fx["out"].double()).abs().max().item()
    assert deviation == pytest.approx(fx["stats"]["fp32_vs_fp64_max_abs_diff"], abs=FP64_SLACK)


def test_dino_head_float16_normalize_eps(ref: dict[str, Any]) -> None:
    assert ref["dino_head"]["config"]["normalize_eps"].startswith("1e-12 (1e-6 if input is float16)")
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4).half()
    for p in head.mlp.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():
        out = head(torch.randn(3, 8).half())
    # A zero bottleneck vector with eps 1e-12 (0 in float16) would give 0/0 = NaN.
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.zeros_like(out))


def test_weight_norm_linear_matches_torch_weight_norm(ref: dict[str, Any]) -> None:
    assert ref["dino_head"]["config"]["weight_norm_dim"] == 0
    ours = WeightNormLinear(5, 7)
    nn.init.uniform_(ours.weight_g, 0.5, 1.5)
    torch_ref = nn.utils.parametrizations.weight_norm(nn.Linear(5, 7, bias=False), dim=0)
    with torch.no_grad():
        torch_ref.parametrizations.weight.original0.copy_(ours.weight_g)
        torch_ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), torch_ref(x), atol=1e-6, rtol=1e-6)
    assert set(ours.state_dict()) == {"weight_g", "weight_v"}
    assert not ours._forward_pre_hooks


def test_dino_head_init_and_layouts() -> None:
    torch.manual_seed(0)
    head = DINOHead(64, 300, hidden_dim=256, bottleneck_dim=32)
    torch.testing.assert_close(head.last_layer.weight_g.detach(), torch.ones(300, 1))
    row_norms = head.last_layer.weight.detach().norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(300), atol=1e-6, rtol=0)
    weights = torch.cat([m.weight.flatten() for m in head.mlp if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.count_nonzero(m.bias) == 0 for m in head.mlp if isinstance(m, nn.Linear))

    bn_keys = set(DINOHead(8, 10, use_bn=True, hidden_dim=6, bottleneck_dim=4).state_dict())
    assert {"mlp.1.running_mean", "mlp.4.running_var", "mlp.6.weight", "mlp.3.bias"} <= bn_keys
    assert set(DINOHead(8, 10, nlayers=1, bottleneck_dim=4).state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)


# ----------------------------------------------------------------------------------------------- DINO loss


def test_dino_softmax_centering_two_steps(ref: dict[str, Any]) -> None:
    fx = ref["dino_loss"]
    temp = fx["config"]["teacher_temp"]
    loss = _dino_loss(fx["config"])
    loss.center.copy_(fx["center0"])

    probs1 = loss.softmax_center_teacher(fx["teacher_logits_step1"], teacher_temp=temp)
    torch.testing.assert_close(probs1, fx["softmax_center_probs_step1"], atol=PROBS_ATOL, rtol=0)
    assert probs1.max().item() == pytest.approx(fx["stats"]["center_probs_step1_max"], abs=PROBS_ATOL)
    loss.update_center(fx["teacher_logits_step1"])
    assert torch.equal(loss.center, fx["center0"]), "the center update must wait (lazy update)"

    probs2 = loss.softmax_center_teacher(fx["teacher_logits_step2"], teacher_temp=temp)
    torch.testing.assert_close(loss.center, fx["center1_after_step1"], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(probs2, fx["softmax_center_probs_step2"], atol=PROBS_ATOL, rtol=0)
    loss.update_center(fx["teacher_logits_step2"])
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, fx["center2_after_step2"], atol=1e-8, rtol=1e-6)
    loss.apply_center_update()  # nothing queued: no change
    torch.testing.assert_close(loss.center, fx["center2_after_step2"], atol=1e-8, rtol=1e-6)
    assert "center" in dict(loss.named_buffers())


def test_dino_sinkhorn_knopp_probs(ref: dict[str, Any]) -> None:
    fx = ref["dino_loss"]
    cfg = fx["config"]
    probs = _dino_loss(cfg).sinkhorn_knopp_teacher(
        fx["teacher_logits_step1"], teacher_temp=cfg["teacher_temp"], n_iterations=cfg["sk_n_iterations"]
    )
    torch.testing.assert_close(probs, fx["sinkhorn_knopp_probs"], atol=PROBS_ATOL, rtol=0)
    assert (probs.sum(dim=1) - 1).abs().max().item() <= fx["stats"]["sk_row_sums_max_dev_from_1"]
    assert probs.max().item() == pytest.approx(fx["stats"]["sk_probs_max"], abs=PROBS_ATOL)


def _naive_sinkhorn_knopp_float64(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """The README's algorithm as written (no max subtraction), in float64 where exp does not overflow here."""
    q = torch.exp(logits.double() / temp).t()
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.shape[0]
        q /= q.sum(dim=0, keepdim=True)
        q /= q.shape[1]
    return (q * q.shape[1]).t()


def test_sinkhorn_knopp_does_not_overflow(ref: dict[str, Any]) -> None:
    logits = ref["dino_loss"]["teacher_logits_step1"] * 30  # |t / T| up to ~150: exp overflows float32
    assert not torch.isfinite(torch.exp(logits / 0.07)).all()
    probs = sinkhorn_knopp(logits, 0.07, n_samples=logits.shape[0])
    assert torch.isfinite(probs).all()
    expected = _naive_sinkhorn_knopp_float64(logits, 0.07, 3).float()
    torch.testing.assert_close(probs, expected, atol=PROBS_ATOL, rtol=0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.07, n_samples=8, n_iterations=0)


def test_sinkhorn_knopp_sums_in_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA autocast runs ``torch.mv`` in bf16/fp16; the targets must still be the float32 ones, as in DINOv2."""
    real_mv = torch.mv

    def mv_as_cuda_autocast_runs_it(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):  # CPU autocast leaves mv alone; CUDA's casts its inputs
            matrix, vector = matrix.to(torch.bfloat16), vector.to(torch.bfloat16)
        return real_mv(matrix, vector)

    monkeypatch.setattr(torch, "mv", mv_as_cuda_autocast_runs_it)
    logits = torch.randn(96, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = sinkhorn_knopp(logits, 0.07, n_samples=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = sinkhorn_knopp(logits, 0.07, n_samples=96)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=0)


def test_dino_raw_losses(ref: dict[str, Any]) -> None:
    fx = ref["dino_loss"]
    cfg = fx["config"]
    loss = _dino_loss(cfg)
    loss.center.copy_(fx["center0"])
    targets = {
        "loss_with_softmax_center_probs_step1": loss.softmax_center_teacher(
            fx["teacher_logits_step1"], cfg["teacher_temp"]
        ),
        "loss_with_sinkhorn_knopp_probs": loss.sinkhorn_knopp_teacher(fx["teacher_logits_step1"], cfg["teacher_temp"]),
    }
    for name, probs in targets.items():
        per_crop = _teacher_per_crop(probs, cfg)
        global_raw = loss([fx["student_global_logits"]], [per_crop.flatten(0, 1)])
        local_raw = loss(fx["student_local_logits"].chunk(2), per_crop)
        _assert_scalar_close(global_raw, fx[name]["global_raw"])
        _assert_scalar_close(local_raw, fx[name]["local_raw"])
        assert global_raw.item() > 0 and local_raw.item() > 0
    with pytest.raises(ValueError, match="at least one"):
        loss([], [targets["loss_with_sinkhorn_knopp_probs"]])


def test_dino_float64_is_the_reference_function(ref: dict[str, Any]) -> None:
    fx = ref["dino_loss"]
    cfg = fx["config"]
    stats = fx["stats"]
    loss = _dino_loss(cfg, torch.float64)
    loss.center.copy_(fx["center0"])
    t64 = fx["teacher_logits_step1"].double()
    probs64 = loss.softmax_center_teacher(t64, cfg["teacher_temp"])
    deviation = (probs64 - fx["softmax_center_probs_step1"].double()).abs().max().item()
    assert deviation == pytest.approx(stats["center_probs_step1_fp32_vs_fp64_max_abs_diff"], abs=FP64_SLACK)
    sk64 = loss.sinkhorn_knopp_teacher(t64, cfg["teacher_temp"])
    deviation = (sk64 - fx["sinkhorn_knopp_probs"].double()).abs().max().item()
    assert deviation == pytest.approx(stats["sk_probs_fp32_vs_fp64_max_abs_diff"], abs=FP64_SLACK)
    # The reference statistic evaluates the float64 loss on the stored float32 targets.
    global64 = loss([fx["student_global_logits"].double()], [fx["softmax_center_probs_step1"].double()])
    deviation = (global64 - fx["loss_with_softmax_center_probs_step1"]["global_raw"].double()).abs().item()
    assert deviation == pytest.approx(stats["global_raw_center_fp32_vs_fp64"], abs=FP64_SLACK)


def test_dino_trainer_normalisation(ref: dict[str, Any]) -> None:
    n_global = ref["dino_loss"]["config"]["n_global_crops"]
    for name in ("loss_with_softmax_center_probs_step1", "loss_with_sinkhorn_knopp_probs"):
        fx = ref["dino_loss"][name]
        global_scale, local_scale = dino_loss_term_scales(n_global, 1)
        assert local_scale == 0.0, "DinoBloom's local_crops_number=1 has no local term"
        _assert_scalar_close(fx["global_raw"] * global_scale, fx["global_scaled_dinobloom_local_crops_number_1"])
        global_scale, local_scale = dino_loss_term_scales(n_global, 2)
        _assert_scalar_close(fx["global_raw"] * global_scale, fx["global_scaled_local_crops_number_2"])
        _assert_scalar_close(fx["local_raw"] * local_scale, fx["local_scaled_local_crops_number_2"])
    assert dino_loss_term_scales(2, 0) == pytest.approx((2 / 3, 0.0))  # n_local_terms = max(0, 1)
    assert dino_loss_term_scales(2, 8) == pytest.approx((2 / 18, 1 / 18))
    with pytest.raises(ValueError, match="2 global crops"):
        dino_loss_term_scales(3, 2)
    with pytest.raises(ValueError, match="n_local_crops"):
        dino_loss_term_scales(2, -1)


# ----------------------------------------------------------------------------------------------- iBOT loss


def test_ibot_softmax_centering_and_center_update(ref: dict[str, Any]) -> None:
    fx = ref["ibot_loss"]
    loss = _ibot_loss(fx["config"])
    assert loss.center.shape == fx["center0"].shape
    loss.center.copy_(fx["center0"])
    teacher = fx["teacher_masked_logits"].unsqueeze(0)
    probs = loss.softmax_center_teacher(teacher, teacher_temp=fx["config"]["teacher_temp"]).squeeze(0)
    torch.testing.assert_close(probs, fx["softmax_center_probs"], atol=PROBS_ATOL, rtol=0)
    loss.update_center(teacher)
    assert torch.equal(loss.center, fx["center0"])
    loss.apply_center_update()
    assert loss.center.shape == fx["center1_after_update"].shape
    torch.testing.assert_close(loss.center, fx["center1_after_update"], atol=1e-8, rtol=1e-6)


def test_ibot_sinkhorn_knopp_probs(ref: dict[str, Any]) -> None:
    fx = ref["ibot_loss"]
    cfg = fx["config"]
    # The reference counts the masked tokens of the batch: the rows of the masked-token logits.
    assert ref["masks"]["n_masked_patches"].item() == fx["n_masked"] == fx["teacher_masked_logits"].shape[0]
    probs = _ibot_loss(cfg).sinkhorn_knopp_teacher(
        fx["teacher_masked_logits"], cfg["teacher_temp"], n_iterations=cfg["sk_n_iterations"]
    )
    torch.testing.assert_close(probs, fx["sinkhorn_knopp_probs"], atol=PROBS_ATOL, rtol=0)
    dino_probs = DINOLoss(cfg["patch_out_dim"]).sinkhorn_knopp_teacher(fx["teacher_masked_logits"], cfg["teacher_temp"])
    assert (probs - dino_probs).abs().max().item() == fx["stats"]["ibot_sk_vs_dino_sk_max_abs_diff"]


def test_ibot_forward_masked(ref: dict[str, Any]) -> None:
    fx = ref["ibot_loss"]
    masks = ref["masks"]
    assert fx["config"]["lossfunc"].startswith("torch fallback")
    loss = _ibot_loss(fx["config"])
    loss.center.copy_(fx["center0"])
    teacher = fx["teacher_masked_logits"]
    targets = {
        "softmax_center": loss.softmax_center_teacher(teacher.unsqueeze(0), fx["config"]["teacher_temp"]).squeeze(0),
        "sinkhorn_knopp": loss.sinkhorn_knopp_teacher(teacher, fx["config"]["teacher_temp"]),
    }
    n_global_crops = ref["masks"]["settings"]["n_global_crops"]
    for name, probs in targets.items():
        expected = fx["losses"][name]
        student, student_masks_flat = fx["student_masked_logits"], masks["collated_masks"]
        with_weights = loss.forward_masked(student, probs, student_masks_flat, masks_weight=masks["masks_weight"])
        without_weights = loss.forward_masked(student, probs, student_masks_flat, masks_weight=None)
        _assert_scalar_close(with_weights, expected["forward_masked"])
        _assert_scalar_close(without_weights, expected["forward_masked_masks_weight_None"])
        # trainer: loss_scales (2) * 1 / n_global_crops
        _assert_scalar_close(with_weights * 2 * (1.0 / n_global_crops), expected["trainer_ibot_loss_term"])

    # The stored float32 targets through a float64 loss: the reference's own float32/float64 deviation.
    loss64 = loss.forward_masked(
        fx["student_masked_logits"].double(),
        fx["softmax_center_probs"].double(),
        masks["collated_masks"],
        masks["masks_weight"].double(),
    )
    deviation = (loss64 - fx["losses"]["softmax_center"]["forward_masked"].double()).abs().item()
    assert deviation == pytest.approx(fx["stats"]["forward_masked_center_fp32_vs_fp64"], abs=FP64_SLACK)

    with pytest.raises(ValueError, match="mask weights"):
        loss.forward_masked(
            fx["student_masked_logits"], targets["softmax_center"], masks["collated_masks"], masks["masks_weight"][:10]
        )


# ----------------------------------------------------------------------------------------------- KoLeo


def test_koleo_matches_reference(ref: dict[str, Any]) -> None:
    fx = ref["koleo"]
    assert fx["pdist_eps_dinobloom"] == KoLeoLoss().pairwise_eps
    for tag in ("dinobloom", "upstream"):
        koleo = KoLeoLoss(pairwise_eps=fx[f"pdist_eps_{tag}"])
        for name in ("x", "x_dup"):
            _assert_scalar_close(koleo(fx[name], eps=fx["log_eps"]), fx[f"{tag}_{name}"])


def test_koleo_nearest_neighbours(ref: dict[str, Any]) -> None:
    fx = ref["koleo"]
    for name in ("x", "x_dup"):
        xn = F.normalize(fx[name], p=2, dim=-1, eps=fx["log_eps"])
        assert torch.equal(KoLeoLoss.nearest_neighbours(xn), fx[f"nn_index_{name}"])


def test_koleo_trainer_term(ref: dict[str, Any]) -> None:
    fx = ref["koleo"]
    koleo = KoLeoLoss()
    for name in ("x", "x_dup"):
        term = 0.1 * sum(koleo(chunk) for chunk in fx[name].chunk(2))
        _assert_scalar_close(term, fx[f"dinobloom_trainer_term_{name}"])


def test_koleo_duplicate_rows_are_finite_with_finite_gradients(ref: dict[str, Any]) -> None:
    x = ref["koleo"]["x_dup"].clone().requires_grad_(True)
    value = KoLeoLoss()(x)
    value.backward()
    assert math.isfinite(value.item())
    assert torch.isfinite(x.grad).all()
    exact_copies = torch.stack([x.detach()[0]] * 4)
    assert math.isfinite(KoLeoLoss()(exact_copies).item())


def test_koleo_float32_under_autocast_and_no_graph_through_search(ref: dict[str, Any]) -> None:
    x = ref["koleo"]["x"]
    expected = KoLeoLoss()(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = KoLeoLoss()(x)
    assert value.dtype == torch.float32
    assert torch.equal(value, expected)
    with pytest.raises(ValueError, match="batch, dim"):
        KoLeoLoss()(x[0])


# ----------------------------------------------------------------------------------------------- distributed


def test_sinkhorn_knopp_inside_single_process_gloo_group(ref: dict[str, Any], tmp_path: Path) -> None:
    assert "gloo" in ref["distributed_note"]
    dino_fx, ibot_fx = ref["dino_loss"], ref["ibot_loss"]
    temp = dino_fx["config"]["teacher_temp"]
    dino_plain = _dino_loss(dino_fx["config"]).sinkhorn_knopp_teacher(dino_fx["teacher_logits_step1"], temp)
    ibot_plain = _ibot_loss(ibot_fx["config"]).sinkhorn_knopp_teacher(ibot_fx["teacher_masked_logits"], temp)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dino = _dino_loss(dino_fx["config"])
        dino_grouped = dino.sinkhorn_knopp_teacher(dino_fx["teacher_logits_step1"], temp)
        ibot = _ibot_loss(ibot_fx["config"])
        ibot_grouped = ibot.sinkhorn_knopp_teacher(ibot_fx["teacher_masked_logits"], temp)
        # the asynchronous center all-reduce inside the group
        dino.center.copy_(dino_fx["center0"])
        dino.update_center(dino_fx["teacher_logits_step1"])
        dino.apply_center_update()
        ibot.center.copy_(ibot_fx["center0"])
        ibot.update_center(ibot_fx["teacher_masked_logits"].unsqueeze(0))
        ibot.apply_center_update()
    finally:
        dist.destroy_process_group()
    max_diff = (dino_grouped - dino_plain).abs().max().item()
    assert max_diff == dino_fx["stats"]["sk_gloo_world1_vs_uninitialised_max_abs_diff"] == 0.0
    assert torch.equal(ibot_grouped, ibot_plain)
    torch.testing.assert_close(ibot_grouped, ibot_fx["sinkhorn_knopp_probs"], atol=PROBS_ATOL, rtol=0)
    torch.testing.assert_close(dino.center, dino_fx["center1_after_step1"], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(ibot.center, ibot_fx["center1_after_update"], atol=1e-8, rtol=1e-6)


def test_ibot_center_ignores_a_step_without_masked_tokens() -> None:
    """No masked patch anywhere: the centre keeps its value instead of becoming 0/0 = NaN."""
    loss = iBOTPatchLoss(8)
    loss.center.fill_(0.25)
    loss.update_center(torch.zeros(1, 0, 8))
    loss.apply_center_update()
    assert torch.equal(loss.center, torch.full((1, 1, 8), 0.25))
    tokens = torch.arange(16.0).view(1, 2, 8)
    loss.update_center(tokens)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * 0.25 + 0.1 * tokens.mean(dim=1, keepdim=True), rtol=0, atol=1e-6)


def test_ibot_loss_of_a_batch_without_masked_tokens_is_a_plain_zero() -> None:
    """No masked token: the loss is 0 with a gradient path, and logs +0.0, not the -0.0 of a negated empty sum."""
    loss = iBOTPatchLoss(8)
    student = torch.zeros(0, 8, requires_grad=True)
    value = loss.forward_masked(student, torch.zeros(0, 8), torch.zeros(2, 16, dtype=torch.bool))
    assert value.item() == 0.0 and math.copysign(1.0, value.item()) == 1.0 and value.requires_grad
