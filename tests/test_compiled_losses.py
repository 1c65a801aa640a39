"""``train.compile``: the compiled cross-entropies, Sinkhorn-Knopp and heads give the eager losses, gradients and
targets, and the compiled blocks stay compiled."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from dinov2.configs import TRAIN_CONFIG_DIR, load_config
from dinov2.loss import DINOLoss, centering, iBOTPatchLoss, sinkhorn_knopp
from dinov2.loss.centering import compiled_sinkhorn_knopp_pays
from dinov2.train.ssl_meta_arch import SSLMetaArch

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or c++), and none is on PATH",
)


def _scores_and_targets(rows: int, prototypes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = (3 * torch.randn(rows, prototypes, generator=generator)).requires_grad_()
    targets = torch.softmax(5 * torch.randn(rows, prototypes, generator=generator), dim=-1)
    return scores, targets


def test_compiled_losses_match_eager() -> None:
    prototypes = 512
    eager_ibot, compiled_ibot = iBOTPatchLoss(prototypes), iBOTPatchLoss(prototypes)
    eager_dino, compiled_dino = DINOLoss(prototypes), DINOLoss(prototypes)
    for loss in (compiled_ibot, compiled_dino):
        loss.cross_entropy.compile(dynamic=True)
    # A different number of masked tokens every step: the compiled function must follow.
    for step, (crops, tokens) in enumerate([(4, 9), (6, 16)]):
        masks = torch.zeros(crops, tokens, dtype=torch.bool)
        masks[::2, : tokens // 2 + step] = True
        scores, targets = _scores_and_targets(int(masks.sum()), prototypes, seed=step)
        results = []
        for loss in (eager_ibot, compiled_ibot):
            scores.grad = None
            value = loss.forward_masked(scores, targets, student_masks_flat=masks)
            value.backward()
            results.append((value.detach(), scores.grad.clone()))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-8)

        cls_scores, cls_targets = _scores_and_targets(2 * crops, prototypes, seed=10 + step)
        expected = eager_dino([cls_scores], [cls_targets])
        torch.testing.assert_close(compiled_dino([cls_scores], [cls_targets]), expected, rtol=1e-5, atol=1e-6)


def test_train_compile_compiles_both_cross_entropies() -> None:
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["train.dataset_path=unused", "train.compile=true"])
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    model.compile_losses()
    assert model.dino_loss.cross_entropy._compiled_call_impl is not None
    assert model.ibot_patch_loss.cross_entropy._compiled_call_impl is not None
    assert model.dino_loss.compile_sinkhorn_knopp and model.ibot_patch_loss.compile_sinkhorn_knopp
    assert "cross_entropy" not in "".join(model.state_dict())  # the checkpoint keys stay the same


def test_compiled_sinkhorn_knopp_matches_stored_targets() -> None:
    """The compiled passes (which recompute ``exp`` from the logits) give the stored version's targets, for bf16 and
    float32 logits, a changing number of rows, an empty shard, and a temperature schedule without recompiling."""
    torch._dynamo.reset()  # the recompile limits below count this test's compilations only
    generator = torch.Generator().manual_seed(0)
    for rows, dtype, temp in [(37, torch.float32, 0.04), (50, torch.bfloat16, 0.07), (0, torch.float32, 0.05)]:
        logits = (2 * torch.rand(rows, 640, generator=generator) - 1).to(dtype)
        stored = sinkhorn_knopp(logits, temp, n_samples=max(rows, 1))
        compiled = sinkhorn_knopp(logits, temp, n_samples=max(rows, 1), compiled=True)
        assert compiled.dtype == stored.dtype == torch.float32 and compiled.shape == (rows, 640)
        torch.testing.assert_close(compiled, stored, rtol=1e-5, atol=1e-12)
        if rows:
            torch.testing.assert_close(compiled.sum(dim=1), torch.ones(rows), rtol=1e-5, atol=0)
    # Another row count and temperature (the teacher's warm-up) reuse the kernels compiled above, compiled code.
    logits = (2 * torch.rand(45, 640, generator=generator) - 1).to(torch.bfloat16)
    with torch._dynamo.config.patch(error_on_recompile=True), profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled = sinkhorn_knopp(logits, 0.06, n_samples=45, compiled=True)
    assert any("Torch-Compiled Region" in event.name for event in prof.events())
    torch.testing.assert_close(compiled, sinkhorn_knopp(logits, 0.06, n_samples=45), rtol=1e-5, atol=1e-12)
    # Both dtypes and the 0, 1 and many row counts fit each function's variants, none left uncompiled.
    with torch._dynamo.config.patch(recompile_limit=6, fail_on_recompile_limit_hit=True):
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (0, 1, 2, 45):
                sinkhorn_knopp(torch.rand(rows, 640).to(dtype), 0.05, n_samples=max(rows, 1), compiled=True)


def test_compiled_sinkhorn_knopp_runs_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU keeps the stored passes even under ``train.compile`` (compiled, they ran at half the speed there); so
    does any other device but CUDA, where they were measured."""
    assert not compiled_sinkhorn_knopp_pays(torch.zeros(2, 3))
    assert not compiled_sinkhorn_knopp_pays(torch.zeros(2, 3, device="meta"))  # measured on CUDA only

    def fail(*args: object) -> None:
        raise AssertionError("the compiled Sinkhorn-Knopp passes ran on a CPU")

    monkeypatch.setattr(centering, "_RecomputedPasses", fail)
    for loss in (iBOTPatchLoss(64), DINOLoss(64)):
        loss.compile_sinkhorn_knopp = True
        assert loss.sinkhorn_knopp_teacher(torch.randn(10, 64), 0.07).shape == (10, 64)


def test_train_compile_takes_both_losses_sinkhorn_knopp_to_the_compiled_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the compiled passes pay (a CUDA GPU, here pretended), the DINO and iBOT teachers use them under
    ``train.compile`` and only then, with the same targets as the stored passes."""
    used: list[int] = []
    recomputed = centering._RecomputedPasses

    def spy(*args: object) -> object:
        used.append(1)
        return recomputed(*args)

    monkeypatch.setattr(centering, "_RecomputedPasses", spy)
    monkeypatch.setattr(centering, "compiled_sinkhorn_knopp_pays", lambda logits: True)
    logits = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    for loss in (iBOTPatchLoss(64), DINOLoss(64)):
        stored = loss.sinkhorn_knopp_teacher(logits, 0.07)
        assert used == []  # train.compile off
        loss.compile_sinkhorn_knopp = True
        torch.testing.assert_close(loss.sinkhorn_knopp_teacher(logits, 0.07), stored, rtol=1e-5, atol=1e-7)
        assert used == [1]
        used.clear()


def test_benchmark_flop_count_leaves_compiled_code_compiled(load_script: Callable[[str], ModuleType]) -> None:
    """``benchmark_train.count_step_flops`` counts a compiled step eagerly and leaves it compiled afterwards
    (PyTorch 2.11 ran compiled code under the FLOP counter and never again: its --compile figures were eager)."""
    from dinov2.layers import Block

    benchmark = load_script("benchmark_train")

    torch.manual_seed(0)
    block = Block(32, 4, init_values=1e-5)
    x = torch.randn(2, 5, 32)

    def step() -> None:
        block(x).sum().backward()

    eager_flops, _ = benchmark.count_step_flops(step)
    block.compile()
    step()
    flops, _ = benchmark.count_step_flops(step)
    assert flops == eager_flops > 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    assert any("Torch-Compiled Region" in event.name for event in prof.events())


def test_benchmark_flop_count_leaves_out_what_checkpointing_recomputes(load_script: Callable[[str], ModuleType]) -> None:
    """MFU counts the model's FLOPs: a backbone trained with activation checkpointing (whose backward recomputes
    each block's forward) does the same model FLOPs, attention included, as one without."""
    from dinov2.models import DinoVisionTransformer
    from dinov2.parallel import parallelize_model

    benchmark = load_script("benchmark_train")
    x = torch.randn(2, 3, 28, 28)
    counts = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                                      init_values=1e-5)  # fmt: skip
        parallelize_model(model, activation_checkpointing=checkpointing)

        def step() -> None:
            model(x).square().sum().backward()

        counts.append(benchmark.count_step_flops(step))
    assert counts[0] == counts[1] and counts[0][1] > 0


def test_compiled_block_chunks_share_one_compiled_block() -> None:
    """With ``student.block_chunks`` the blocks inside the chunks are compiled, not the chunks: chunks differ in
    layout, and four of them, each with and without gradients, filled Dynamo's 8 variants and left the rest of the
    run uncompiled. Per block, two variants (gradients or not) serve them all."""
    from dinov2.layers.block import Block, BlockChunk
    from dinov2.models import DinoVisionTransformer
    from dinov2.parallel import parallelize_model

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, block_chunks=4)
    parallelize_model(model, compile=True)
    assert all(isinstance(chunk, BlockChunk) and chunk._compiled_call_impl is None for chunk in model.blocks)
    blocks = [layer for chunk in model.blocks for layer in chunk if isinstance(layer, Block)]
    assert len(blocks) == 4 and all(block._compiled_call_impl is not None for block in blocks)
    x = torch.randn(2, 3, 28, 28)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        model(x).sum().backward()
        with torch.no_grad():
            model(x)


def test_compiled_head_follows_the_row_count_without_recompiling() -> None:
    """A head compiled by ``train.compile`` gives the eager scores and gradients, and one compiled variant with
    gradients and one without serve every row count (the iBOT head's masked tokens change every step)."""
    from dinov2.layers import DINOHead
    from dinov2.parallel import parallelize_model

    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8)
    eager = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8)
    eager.load_state_dict(head.state_dict())
    parallelize_model(head, compile=True)
    assert head._compiled_call_impl is not None and list(head.state_dict()) == list(eager.state_dict())
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for rows in (5, 9, 13):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(head(x), eager(x), rtol=1e-5, atol=1e-6)
            head(x).square().sum().backward()
            eager(x).square().sum().backward()
            with torch.no_grad():
                torch.testing.assert_close(head(x), eager(x), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(head.named_parameters(), eager.parameters()):
        scale = q.grad.abs().max().item()  # float32 sums in another order: equal to a millionth of the largest
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_block_benchmark_times_each_compile_setting(
    load_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmark_block.py`` times a block eagerly, compiled and compiled with coordinate-descent tuning (the
    GPU check's comparison), each with the block's own numbers, and ends with one ``mode=ms`` line."""
    script = load_script("benchmark_block")
    results = script.main(["--device", "cpu", "--crops", "2", "--tokens", "17", "--warmup", "0", "--iters", "1",
                           "--modes", "eager", "compiled", "coordinate-descent"])  # fmt: skip
    assert list(results) == ["eager", "compiled", "coordinate-descent"] and all(ms > 0 for ms in results.values())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == " ".join(f"{mode}={ms:.3f}" for mode, ms in results.items())
    assert [line.split()[0] for line in lines[1:-1]] == list(results)
    with pytest.raises(SystemExit):
        script.main(["--modes", "fastest"])


def test_compile_tuning_reaches_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile_tuning`` compiles each block with coordinate-descent tuning (heads and losses as before), and
    without ``train.compile`` it is a configuration error rather than a setting that silently does nothing."""
    from torch import nn

    from dinov2.configs import ConfigError
    from dinov2.models import DinoVisionTransformer
    from dinov2.parallel import parallelize_from_config

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs)))
    cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml",
                      ["train.dataset_path=unused", "train.compile=true", "train.compile_tuning=true"])  # fmt: skip
    backbone = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)
    parts = nn.ModuleDict({"backbone": backbone, "dino_head": nn.Linear(32, 8)})
    parallelize_from_config(parts, cfg, "student", torch.device("cpu"))
    assert calls == [("Block", {"options": {"coordinate_descent_tuning": True}})] * 2 + [("Linear", {"dynamic": True})]
    with pytest.raises(ConfigError, match="train.compile_tuning=true tunes what train.compile compiles"):
        load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["train.dataset_path=unused", "train.compile_tuning=true"])


def _backbone_pair(**kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    from dinov2.models import DinoVisionTransformer

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, **kwargs)
    eager = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, **kwargs)
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_backbone_compiled_whole_matches_eager(checkpointing: bool) -> None:
    """``train.compile_scope=backbone`` compiles the backbone as one graph (its blocks are not compiled apart): the
    masked student forward and its gradients, and the teacher's forward without gradients, equal the eager ones,
    with one compiled variant each, also with activation checkpointing."""
    from dinov2.parallel import parallelize_model

    model, eager = _backbone_pair(block_chunks=3)
    parallelize_model(model, compile=True, compile_scope="backbone", activation_checkpointing=checkpointing)
    assert model._compiled_call_impl is not None
    assert all(module._compiled_call_impl is None for module in model.modules() if module is not model)
    assert list(model.state_dict()) == list(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for _ in range(2):  # a second step reuses both variants
            x = torch.randn(4, 3, 28, 28, generator=generator)
            masks = torch.rand(4, 4, generator=generator) < 0.5
            out, expected = model(x, masks=masks, is_training=True), eager(x, masks=masks, is_training=True)
            for key in ("x_norm_clstoken", "x_norm_patchtokens"):
                torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
            out["x_norm_patchtokens"].square().sum().backward()
            expected["x_norm_patchtokens"].square().sum().backward()
            with torch.no_grad():
                torch.testing.assert_close(model(x, is_training=True)["x_norm_clstoken"],
                                           eager(x, is_training=True)["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        # Inductor's CPU kernels sum in another order; through three blocks the gradients of this loss then differ by
        # up to about 0.1 % of each tensor's largest (the blocks compiled one by one: 0.03 %). A wrong wiring (a mask
        # not applied, a block skipped) differs by the gradient's own size.
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=3e-3 * scale, msg=name)


def test_compile_scope_and_cuda_graphs_reach_the_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``train.compile_scope`` and ``train.cuda_graphs`` ask of the compiler: each block or the whole backbone,
    with CUDA graphs and tuning combined into one set of Inductor options; the heads keep dynamic shapes and no
    graphs."""
    from torch import nn

    from dinov2.models import DinoVisionTransformer
    from dinov2.parallel import parallelize_from_config

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs)))
    options = {  # (train.compile_tuning, train.cuda_graphs): the Inductor options of what the backbone compiles
        ("false", "false"): None,
        ("true", "false"): {"coordinate_descent_tuning": True},
        ("false", "true"): {"triton.cudagraphs": True},
        ("true", "true"): {"coordinate_descent_tuning": True, "triton.cudagraphs": True},
    }
    for scope, compiled, count in (("blocks", "Block", 2), ("backbone", "DinoVisionTransformer", 1)):
        for (tuning, graphs), expected_options in options.items():
            overrides = ["train.dataset_path=unused", "train.compile=true", f"train.compile_scope={scope}",
                         f"train.cuda_graphs={graphs}", f"train.compile_tuning={tuning}"]  # fmt: skip
            cfg = load_config(TRAIN_CONFIG_DIR / "demo.yaml", overrides)
            backbone = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)
            parts = nn.ModuleDict({"backbone": backbone, "dino_head": nn.Linear(32, 8)})
            calls.clear()
            parallelize_from_config(parts, cfg, "student", torch.device("cpu"))
            expected = [(compiled, {"options": expected_options})] * count
            assert calls == expected + [("Linear", {"dynamic": True})], (scope, tuning, graphs)


def test_compile_settings_that_cannot_work_are_config_errors(load_script: Callable[[str], ModuleType]) -> None:
    """A misspelt compile scope, CUDA graphs without ``train.compile`` or off CUDA, and a backbone compiled whole or
    CUDA graphs with several processes are refused before any work, each naming the setting and the way out; the
    training benchmark refuses what the training command refuses."""
    from dinov2.configs import ConfigError
    from dinov2.parallel import check_compile_settings, parallelize_model

    def config(*overrides: str) -> DictConfig:
        return load_config(TRAIN_CONFIG_DIR / "demo.yaml", ["train.dataset_path=unused", *overrides])

    with pytest.raises(ConfigError, match=r"train.compile_scope='block' is not one of blocks, backbone"):
        config("train.compile=true", "train.compile_scope=block")
    with pytest.raises(ConfigError, match=r"train.cuda_graphs=true replays what train.compile compiles"):
        config("train.cuda_graphs=true")
    with pytest.raises(ConfigError, match=r"train.compile_scope=backbone chooses what train.compile compiles"):
        config("train.compile_scope=backbone")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"train.cuda_graphs=true needs a CUDA device, and this run is on cpu"):
        check_compile_settings(config("train.compile=true", "train.cuda_graphs=true"), cpu, 1)
    check_compile_settings(config("train.compile=true", "train.cuda_graphs=true"), cuda, 1)
    check_compile_settings(config("train.compile=true", "train.compile_scope=backbone"), cpu, 1)
    check_compile_settings(config("train.compile=true"), cpu, 4)
    for setting in ("train.compile_scope=backbone", "train.cuda_graphs=true"):
        with pytest.raises(ConfigError, match=rf"{setting} is for a single process, and this run has 2: .* use "
                           r"train.compile_scope=blocks and train.cuda_graphs=false"):  # fmt: skip
            check_compile_settings(config("train.compile=true", setting), cuda, 2)
    benchmark = load_script("benchmark_train")
    with pytest.raises(ConfigError, match=r"train.cuda_graphs=true needs a CUDA device"):
        benchmark.main(["--config-file", str(TRAIN_CONFIG_DIR / "demo.yaml"), "--compile", "train.cuda_graphs=true"])
    with pytest.raises(ValueError, match="unknown compile_scope 'everything'"):
        parallelize_model(torch.nn.Linear(2, 2), compile=True, compile_scope="everything")
    for settings in ({"compile_scope": "backbone"}, {"cuda_graphs": True}):  # and with FSDP2 (any mesh), at the source
        with pytest.raises(ValueError, match="for one process: FSDP2 shards the blocks"):
            parallelize_model(torch.nn.Linear(2, 2), compile=True, device_mesh=object(), **settings)
