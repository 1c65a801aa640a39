"""The one place that applies FSDP2 sharding, activation checkpointing and torch.compile to the models, and picks
dtypes.

The models stay plain PyTorch. `parallelize_model` changes them in place:

* activation checkpointing: each transformer block's forward runs under `torch.utils.checkpoint` (non-reentrant),
  by rebinding the block's `forward`; no wrapper module, so parameter names and state-dict keys are unchanged;
* compile: `Module.compile()` on each block (inside `block_chunks` too), or on the whole backbone (compile scope
  `backbone`, one process only), and on each head (with dynamic shapes), which also keeps the keys (no `_orig_mod.`
  prefix); CUDA graphs, if asked for, replay what the backbone's compilation covers; the losses' cross-entropies (and,
  on CUDA, Sinkhorn-Knopp) are compiled by `SSLMetaArch.compile_losses`;
* FSDP2 (`torch.distributed.fsdp.fully_shard`), only with a process group of more than one rank: each block, then
  the backbone; each head as one unit. FULL_SHARD frees the gathered parameters after forward, SHARD_GRAD_OP keeps
  them for backward, NO_SHARD replicates them: FSDP2 has no NO_SHARD, so it shards over a mesh dimension of size 1
  and replicates over the other (HSDP on a (world, 1) mesh), which is plain data parallelism with all-reduced
  gradients and works with gloo on CPU as with NCCL.

With one process nothing is sharded: the single-GPU / CPU path is the plain module (with autocast for mixed
precision, see `autocast_dtype`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dinov2.configs import CHOICES, SHARDING_STRATEGIES, ConfigError
from dinov2.distributed import get_world_size
from dinov2.layers.block import BlockChunk

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FORWARD_METHODS = ("forward_features", "get_intermediate_layers")


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """`torch.float16` for 'fp16' (also 'bf16', 'fp32'); a dtype is returned as is."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """The compute dtype from `train.precision`: auto = the student backbone's param_dtype on CUDA, fp32 elsewhere.

    Use it as `torch.autocast(device.type, dtype=..., enabled=dtype != torch.float32)` around forward passes.
    """
    precision = cfg.train.precision
    source = "train.precision"
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        precision = cfg.compute_precision.student.backbone.mixed_precision.param_dtype
        source = "compute_precision.student.backbone.mixed_precision.param_dtype (train.precision=auto)"
    dtype = dtype_from_name(precision)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{source} asks for bf16, which {torch.cuda.get_device_name(device)} does not support; "
            "set train.precision=fp16 (with its loss scaler) or fp32"
        )
    return dtype


def build_grad_scaler(cfg: DictConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler when computing in fp16 and `compute_precision.grad_scaler` is on; None otherwise.

    With several processes it is FSDP's `ShardedGradScaler`, which agrees across ranks on skipping a step.
    """
    if autocast_dtype(cfg, device) != torch.float16 or not cfg.compute_precision.grad_scaler:
        return None
    if get_world_size() > 1:
        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)


def _enable_activation_checkpointing(block: nn.Module) -> None:
    """Recompute `block`'s activations during backward; parameters and keys stay as they are."""
    block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _device_mesh(sharding_strategy: str, device_type: str | None = None) -> DeviceMesh:
    """A 1-D mesh over all ranks (sharding), or (world, 1) for NO_SHARD (replicate, shard over size 1).

    Without ``device_type``, CUDA when the process group has an NCCL backend (also "cpu:gloo,cuda:nccl"), else CPU.
    """
    if device_type is None:
        device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    world = dist.get_world_size()
    if sharding_strategy == "NO_SHARD":
        return init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))


#: Inductor options of the blocks under `train.compile_tuning`: coordinate-descent tuning of the fused kernels.
COMPILE_TUNING_OPTIONS = {"coordinate_descent_tuning": True}
#: Inductor options under `train.cuda_graphs`: what `mode="reduce-overhead"` sets (which cannot be combined with
#: options), CUDA graphs (trees) replaying the compiled code's kernels, on CUDA devices only.
CUDA_GRAPHS_OPTIONS = {"triton.cudagraphs": True}
#: What a backbone's compilation covers (`train.compile_scope`): each block, or the backbone as one graph.
COMPILE_SCOPES = CHOICES["train.compile_scope"]


def backbone_compile_options(*, compile_tuning: bool = False, cuda_graphs: bool = False) -> dict[str, Any] | None:
    """Inductor options for what a backbone's compilation covers (each block, or the backbone whole)."""
    options = {**(COMPILE_TUNING_OPTIONS if compile_tuning else {}), **(CUDA_GRAPHS_OPTIONS if cuda_graphs else {})}
    return options or None


def parallelize_model(
    model: nn.Module,
    *,
    sharding_strategy: str = "SHARD_GRAD_OP",
    param_dtype: str | torch.dtype = "fp32",
    reduce_dtype: str | torch.dtype = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    compile_tuning: bool = False,
    compile_scope: str = "blocks",
    cuda_graphs: bool = False,
    device_mesh: DeviceMesh | None = None,
    reshard_after_forward: bool | None = None,
    name: str = "model",
) -> nn.Module:
    """Apply checkpointing, compile and FSDP2 in place to a backbone, a head, or a ModuleDict of them; return it.

    A part with a `blocks` attribute is a backbone (blocks handled one by one), anything else is a head. FSDP2 is
    applied over `device_mesh` when one is given, else when a process group with more than one rank exists (over all
    ranks; a (world, 1) mesh for NO_SHARD). `reshard_after_forward` overrides the strategy's choice (True for a model
    that only runs forward, so its parameters are DTensors again after each forward); `name` labels the part in the
    log. `compile_tuning` compiles the backbone (its blocks, or it whole) with Inductor's coordinate-descent tuning
    (`train.compile_tuning`);
    `compile_scope` "backbone" compiles each backbone as one graph instead of block by block (`train.compile_scope`);
    `cuda_graphs` replays the backbone's compiled code as CUDA graphs (`train.cuda_graphs`). Neither goes with FSDP2.
    The model must already be on its device, or on the meta device: then `to_empty(device=...)` it afterwards
    and load its weights (the trainer does so, see `SSLMetaArch.init_weights`), so that only rank 0 ever holds a
    full copy, while initialising.
    """
    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"unknown sharding_strategy {sharding_strategy!r}; expected one of {SHARDING_STRATEGIES}")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile_scope {compile_scope!r}; expected one of {COMPILE_SCOPES}")
    shard = device_mesh is not None or get_world_size() > 1
    if shard and compile and (compile_scope == "backbone" or cuda_graphs):
        asked = "a backbone compiled whole" if compile_scope == "backbone" else "CUDA graphs"
        raise ValueError(f"{asked} is for one process: FSDP2 shards the blocks")
    if shard and device_mesh is None:
        device_mesh = _device_mesh(sharding_strategy)
    param = dtype_from_name(param_dtype)
    reduce = dtype_from_name(reduce_dtype)
    policy = MixedPrecisionPolicy(
        param_dtype=None if param == torch.float32 else param,
        reduce_dtype=None if reduce == torch.float32 and param == torch.float32 else reduce,
    )
    if reshard_after_forward is None:
        reshard_after_forward = sharding_strategy == "FULL_SHARD"
    fsdp_kwargs = dict(mesh=device_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    parts = list(model.values()) if isinstance(model, nn.ModuleDict) else [model]
    backbone_options = backbone_compile_options(compile_tuning=compile_tuning, cuda_graphs=cuda_graphs)
    for part in parts:
        is_backbone = hasattr(part, "blocks")
        if compile and not is_backbone:  # a head: its row count changes (iBOT's masked tokens)
            part.compile(dynamic=True)
        if compile and is_backbone and compile_scope == "backbone":
            part.compile(options=backbone_options)
        for block in getattr(part, "blocks", ()):
            if activation_checkpointing:
                _enable_activation_checkpointing(block)
            # Each block, also inside a chunk: chunks differ in layout, and would each compile anew.
            if compile and compile_scope == "blocks":
                for layer in block if isinstance(block, BlockChunk) else (block,):
                    if not isinstance(layer, nn.Identity):
                        layer.compile(options=backbone_options)
            if shard:
                fully_shard(block, **fsdp_kwargs)
        if shard:
            fully_shard(part, **fsdp_kwargs)
            # Backbones are also called through these methods; FSDP2 must gather parameters for them too.
            for method in _FORWARD_METHODS:
                if hasattr(part, method):
                    register_fsdp_forward_method(part, method)
    if shard:
        logger.info("FSDP2 %s over %d ranks for %s (param %s, reduce %s)", sharding_strategy,
                    dist.get_world_size(), name, param, reduce)  # fmt: skip
    return model


def parallelize_from_config(parts: nn.ModuleDict, cfg: DictConfig, role: str, device: torch.device) -> nn.ModuleDict:
    """`parallelize_model` for each part of the student or teacher with `cfg.compute_precision[role][part]`.

    Mixed precision follows `train.precision`: fp32 compute keeps everything fp32; auto on CUDA uses the configured
    param/reduce dtypes; explicit fp16/bf16 sets every param dtype to it and reduces in fp32. The teacher never runs
    backward, so it reshards after every forward whatever its strategy (as DINOv2 did by hand; its parameters are then
    DTensors laid out like the student's, which the EMA update needs), and it gets no activation checkpointing.
    `train.compile` applies to both.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    compute = autocast_dtype(cfg, device)
    shard = get_world_size() > 1
    meshes: dict[bool, DeviceMesh] = {}  # one mesh per layout, shared by the parts
    for name, part in parts.items():
        settings = cfg.compute_precision[role][name]
        strategy = settings.sharding_strategy
        replicate = strategy == "NO_SHARD"
        if shard and replicate not in meshes:
            meshes[replicate] = _device_mesh(strategy, device.type)
        if compute == torch.float32:
            param_dtype, reduce_dtype = "fp32", "fp32"
        elif cfg.train.precision == "auto":
            param_dtype, reduce_dtype = settings.mixed_precision.param_dtype, settings.mixed_precision.reduce_dtype
        else:
            param_dtype, reduce_dtype = compute, "fp32"
        parallelize_model(
            part,
            sharding_strategy=strategy,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            activation_checkpointing=bool(cfg.train.activation_checkpointing) and role == "student",
            compile=bool(cfg.train.compile),
            compile_tuning=bool(cfg.train.compile_tuning),
            compile_scope=cfg.train.compile_scope,
            cuda_graphs=bool(cfg.train.cuda_graphs),
            device_mesh=meshes.get(replicate),
            reshard_after_forward=True if role == "teacher" else None,
            name=f"{role}.{name}",
        )
    return parts


def check_compile_toolchain(device: torch.device, setting: str = "train.compile") -> None:
    """Raise ConfigError when torch.compile cannot work on ``device``: on a CPU, Inductor builds its kernels with
    a C++ compiler (``$CXX``, else g++; clang++ on macOS), and without one the first compiled call would fail with a
    long traceback after the data and model are built. ``setting`` names the option that asked for compilation."""
    if device.type != "cpu":
        return
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(compiler) is None:
        raise ConfigError(
            f"{setting} on a CPU needs a C++ compiler for torch.compile's kernels, and {compiler} is not on "
            f"PATH: install one (e.g. apt install g++), name it in $CXX, or turn {setting} off"
        )


def check_compile_settings(cfg: DictConfig, device: torch.device, world_size: int) -> None:
    """Raise ConfigError, before any work, for compile settings that this device or process count cannot take:
    ``train.compile`` without a C++ compiler on a CPU, ``train.cuda_graphs`` off CUDA, and a backbone compiled whole
    or CUDA graphs with several processes (FSDP2 gathers each block's weights in hooks around it)."""
    if not cfg.train.compile:
        return
    check_compile_toolchain(device)
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs=true needs a CUDA device, and this run is on {device.type}; turn it off")
    if world_size > 1 and (cfg.train.compile_scope == "backbone" or cfg.train.cuda_graphs):
        setting = "train.compile_scope=backbone" if cfg.train.compile_scope == "backbone" else "train.cuda_graphs=true"
        raise ConfigError(
            f"{setting} is for a single process, and this run has {world_size}: FSDP2 shards each block and gathers "
            "its weights in hooks around it; use train.compile_scope=blocks and train.cuda_graphs=false"
        )


def allow_tf32_matmul() -> None:
    """Let float32 matmuls use TF32 tensor cores, as DINOv2's trainer does (PyTorch's default is full float32).

    Through ``torch.set_float32_matmul_precision("high")``, the setting that every PyTorch version and
    ``torch.compile`` read back without complaint (setting only the newer per-backend ``fp32_precision`` makes
    the older getters raise). The trainer calls it for CUDA runs only.
    """
    torch.set_float32_matmul_precision("high")


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to `max_norm` (plain or FSDP2-sharded) and return the norm before clipping."""
    total = nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return total.full_tensor() if isinstance(total, DTensor) else total
