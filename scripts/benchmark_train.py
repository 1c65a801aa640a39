"""Training throughput and model-FLOP utilisation (MFU) of the DINO + iBOT + KoLeo step.

    python scripts/benchmark_train.py --arch vit_small --batch-size 32            # GPU: bf16, CPU: fp32
    python scripts/benchmark_train.py --config-file dinov2/configs/train/demo.yaml --batch-size 16
    torchrun --nproc_per_node=8 scripts/benchmark_train.py --arch vit_large --batch-size 64   # FSDP2

Times full training steps (forward and backward of the student on every crop, teacher forward, clipping,
AdamW, EMA) on synthetic images after a warm-up, twice: as a training run steps, with the device synchronised only
every ``--window`` steps (the median over such windows of their time per step: the images/s and MFU reported),
and with a synchronisation after every step (the median step: ``s_per_iter_synced``, the latency of one step,
which also holds the time the device waits for the host to queue each step's first work). ``host_s_per_iter`` is
the host's time to queue a step: near ``s_per_iter``, the host sets the pace. On CUDA, ``device_syncs_per_step``
counts the times one step makes the host wait for the device, and a warning names each place. FLOPs of one step
are counted with ``torch.utils.flop_counter``, attention included (PyTorch's table has no entry for the CPU
flash-attention kernels, so they are added here, and xFormers is switched off while counting), and the forward that
activation checkpointing recomputes left out: they are the model's FLOPs, not the hardware's. MFU is achieved
FLOP/s over the dense matrix-multiply rate that this script measures on the same device, dtype and thread count
(fp32 on CPU, bf16 on GPU): the best of several square sizes, each warmed up, measured before and after the timed
steps. On a CPU shared with other busy processes both rates drop and the MFU is unreliable; a warning says so.
The last line reads ``images_per_s=<x> mfu=<fraction> peak_mem_gb=<z>`` (peak memory: of the GPU's allocator, or
on a CPU the process's peak resident memory). ``--profile FILE`` writes the per-operator table of one more step
(with CUDA kernel times on a GPU) and a Chrome trace next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dinov2  # noqa: E402, F401  before torch: it sets OpenMP's wait policy, as for the commands it times

import argparse
import ast
import logging
import os
import random
import resource
import statistics
import time
import warnings
from typing import Any

import torch
import torch._inductor.config as inductor_config
from omegaconf import DictConfig
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dinov2.cli import check_file_writable, non_negative_int, positive_int
from dinov2 import distributed, parallel
from dinov2.configs import TRAIN_CONFIG_DIR, apply_scaling_rules_to_cfg, load_config
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.data.photometric import finish_crops
from dinov2.layers.attention import XFORMERS_DISABLED_ENV, xformers_attention
from dinov2.logs import setup_logging
from dinov2.parallel import autocast_dtype
from dinov2.train.data import effective_local_crops
from dinov2.train.train import build_training_state, make_autocast, training_step

logger = logging.getLogger("benchmark_train")

ARCH_PATCH = {"vit_small": 14, "vit_base": 14, "vit_large": 14, "vit_giant2": 14}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int) -> float:
    """Best measured FLOP/s of square dense matrix multiplies of the given sizes on ``device``.

    Each size is warmed up first; every repeat times a few products back to back, and the fastest repeat of the
    fastest size counts (the rate the hardware reaches, as the step's FLOPs are compared with it).
    """
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        products = max(1, int(2e10 // (2 * size**3))) if device.type == "cpu" else 10
        for _ in range(2):
            a @ b
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(products):
                a @ b
            synchronize(device)
            best = max(best, 2 * size**3 * products / (time.perf_counter() - start))
    return best


def _cpu_flash_attention_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch.utils.flop_counter knows the CUDA attention kernels but not the CPU ones (checked with PyTorch 2.14): without
# these entries attention would count as zero FLOPs on CPU and the MFU would come out too low.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def _attention_flops(counter: FlopCounterMode) -> int:
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" in str(op))


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_step_flops(step: Any) -> tuple[int, int]:
    """FLOPs of one call of ``step`` and the attention part of them: the model's FLOPs, also with activation
    checkpointing, whose recomputed forward (what backward recomputes of each block) is counted apart and left out.

    xFormers kernels are not in the FLOP table either, so the counted step runs attention through SDPA (the same
    arithmetic); the setting is restored afterwards. The step runs eagerly (compiled code runs the same matmuls):
    with PyTorch 2.11, running compiled code under the FLOP counter left it uncompiled for the rest of the process.
    """
    recomputed = [0, 0]  # FLOPs, attention FLOPs
    checkpoint = parallel.checkpoint

    def checkpoint_counting_recomputation(function: Any, *args: Any, **kwargs: Any) -> Any:
        calls = [0]

        def counted(*inner_args: Any, **inner_kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself
                return function(*inner_args, **inner_kwargs)
            counter = _flop_counter()
            try:  # (a recomputation may be stopped early, by an exception, once it has what backward needs)
                with counter:
                    return function(*inner_args, **inner_kwargs)
            finally:
                recomputed[0] += counter.get_total_flops()
                recomputed[1] += _attention_flops(counter)

        return checkpoint(counted, *args, **kwargs)

    previous = os.environ.get(XFORMERS_DISABLED_ENV)
    os.environ[XFORMERS_DISABLED_ENV] = "1"
    xformers_attention.cache_clear()
    parallel.checkpoint = checkpoint_counting_recomputation
    try:
        counter = _flop_counter()
        with torch.compiler.set_stance("force_eager"), counter:
            step()
    finally:
        parallel.checkpoint = checkpoint
        if previous is None:
            del os.environ[XFORMERS_DISABLED_ENV]
        else:
            os.environ[XFORMERS_DISABLED_ENV] = previous
        xformers_attention.cache_clear()
    return counter.get_total_flops() - recomputed[0], _attention_flops(counter) - recomputed[1]


def cpu_busy_warning(threads: int) -> str | None:
    """A warning when other processes keep the CPU busy (1-minute load above what the benchmark's ``threads``, over
    all its processes on this machine, explain)."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load > threads + 0.75:
        return (f"1-minute load average {load:.1f} on {os.cpu_count()} cores while this benchmark runs {threads} "
                "threads: other processes compete for the CPU, so the step and matmul rates (and the MFU) are "
                "unreliable")
    return None


def synthetic_batch(cfg: DictConfig, batch_size: int, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """A collated batch of random images with iBOT masks, shaped like the training loader's (crops as ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    g, l = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local = effective_local_crops(cfg)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, l, l, generator=gen) for _ in range(n_local)],
            },
            0,
        )
        for _ in range(batch_size)
    ]
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=dtype,
        mask_generator=MaskingGenerator.for_global_crops(g, cfg.student.patch_size),
        rng=random.Random(seed),
    )


def head_sizes(text: str) -> tuple[int, int, int]:
    """``--heads``: three positive integers, prototypes,hidden,bottleneck."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers PROTOTYPES,HIDDEN,BOTTLENECK, got {text!r}")
    return sizes  # type: ignore[return-value]


def inductor_setting(text: str) -> tuple[str, Any]:
    """``--inductor``: NAME=VALUE of ``torch._inductor.config`` (dotted for nested settings, e.g.
    ``triton.max_tiles``; CUDA graphs are ``train.cuda_graphs=true``, which also marks each step), the value read as
    the setting's type: true/false for a flag, a number, text; other settings take a Python literal."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    settings = inductor_config.get_config_copy()
    if name not in settings:
        raise argparse.ArgumentTypeError(f"torch._inductor.config has no setting {name!r}")
    default = settings[name]
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} is a flag: expected true or false, got {value!r}")
        return name, value.lower() == "true"
    if isinstance(default, (int, float, str)):
        try:
            return name, type(default)(value)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(type(default), "text")
            raise argparse.ArgumentTypeError(f"{name} takes {kind}, got {value!r}") from None
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        message = f"{name} takes a Python literal (e.g. None, 3, 'text'), got {value!r}"
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=str(TRAIN_CONFIG_DIR / "custom.yaml"),
                   help="training config to benchmark (default: the packaged custom.yaml)")
    p.add_argument("--arch", default=None, choices=sorted(ARCH_PATCH), help="backbone (overrides the config)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per rank")
    p.add_argument("--crops", choices=("dinobloom", "dinov2", "config"), default="config",
                   help="dinobloom: 2 global crops; dinov2: 2 global + 8 local (98 px); config: as configured")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile as train.compile does: each transformer block (or the backbone whole, "
                   "train.compile_scope=backbone), each head, the student cross-entropies and, on CUDA, Sinkhorn-Knopp")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=positive_int, default=10,
                   help="timed steps of each timing (synchronised steps, then windows)")
    p.add_argument("--window", type=positive_int, default=5,
                   help="steps between two synchronisations of the device when timing throughput (a training run "
                   "synchronises only on its logging steps)")
    p.add_argument("--heads", type=head_sizes, default=None,
                   help="prototypes,hidden,bottleneck of both heads, e.g. 65536,2048,256")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the step and the matmul rate (default: torch's)")
    p.add_argument("--profile", default=None,
                   help="write the operator table of one more step to this file (+ a gzipped .json.gz trace)")
    p.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="set torch._inductor.config.NAME for everything compiled (repeatable), e.g. cpp_wrapper=True "
                   "to launch the kernels from C++ rather than Python")
    p.add_argument("opts", nargs="*", help="further key=value config overrides (before or after the options)")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its figures."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.inductor and not args.compile:
        parser.error("--inductor sets how --compile compiles: add --compile")
    if args.compile and args.warmup < 1:  # the FLOP count runs eagerly: the first timed step would compile
        parser.error("--compile needs --warmup 1 or more, or the compilation is timed as a step")
    setup_logging(logging.WARNING)
    logger.setLevel(logging.INFO)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.profile:  # a path that cannot be written is refused before the work, not after it
        check_file_writable(Path(args.profile))
    with inductor_config.patch(dict(args.inductor)):  # (restored afterwards, for a caller in the same process)
        return run(args)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Time the training step that ``args`` describe and print the figures."""
    info = distributed.enable_distributed()
    device = info.device
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = load_config(args.config_file, benchmark_overrides(args, precision) + args.opts)
    apply_scaling_rules_to_cfg(cfg, info.world_size)
    parallel.check_compile_settings(cfg, device, info.world_size)  # as the training command refuses them

    torch.manual_seed(0)
    model, optimizer, scaler = build_training_state(cfg, device)
    autocast = make_autocast(cfg, device)
    crops = synthetic_batch(cfg, args.batch_size, info.rank, autocast_dtype(cfg, device))  # as the trainer collates
    batch = finish_crops(crops, device, autocast_dtype(cfg, device))  # moved as the trainer moves its batches
    n_params = sum(p.numel() for p in model.student.backbone.parameters())

    def step() -> None:
        training_step(model, optimizer, scaler, autocast, batch, teacher_temp=0.07, momentum=0.994, clip_grad=3.0)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    flops_per_step, attention_flops = count_step_flops(step)
    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    sizes, repeats = ((4096, 8192), 10) if device.type == "cuda" else ((1024, 2048, 3072), 3)
    peak = matmul_peak_flops(device, matmul_dtype, sizes, repeats)
    seconds_synced, peak_mem_gb = time_steps(step, device, args.iters)
    seconds, host_seconds = time_step_windows(step, device, args.iters, args.window)
    syncs = count_device_syncs(step, device)
    peak = max(peak, matmul_peak_flops(device, matmul_dtype, sizes, repeats))  # and once more after the steps

    images_per_s = args.batch_size * info.world_size / seconds
    achieved = flops_per_step * info.world_size / seconds  # each rank counts its own share
    mfu = achieved / (peak * info.world_size)
    result = {
        "images_per_s": images_per_s,
        "s_per_iter": seconds,
        "s_per_iter_synced": seconds_synced,
        "host_s_per_iter": host_seconds,
        "tflops_per_step": flops_per_step / 1e12,
        "attention_flop_share": attention_flops / max(flops_per_step, 1),
        "achieved_tflops_per_rank": achieved / info.world_size / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": mfu,
        "peak_mem_gb": peak_mem_gb,
    }
    if cfg.train.cuda_graphs:  # graphs Inductor left uncaptured (TORCH_LOGS=cudagraphs says why)
        result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    if syncs is not None:
        result["device_syncs_per_step"] = syncs[0]
        for where in syncs[1]:
            logger.warning("the step waits for the device: %s", where)
    if info.is_main_process:
        cpu = f"CPU ({torch.get_num_threads()} threads)"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
        # every process of this machine's ranks runs as many threads as this one
        threads = torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        busy = cpu_busy_warning(threads) if device.type == "cpu" else None
        if busy:
            logger.warning(busy)
        compiled = f"{args.compile}" + (f" ({compile_settings(cfg)})" if args.compile else "")
        print(f"device: {name}; ranks: {info.world_size}; precision: {precision}; compile: {compiled}; "
              f"activation checkpointing: {args.activation_checkpointing}"
              + "".join(f"; inductor {name}={value!r}" for name, value in args.inductor))
        backbone = model.student.backbone
        print(f"model: {cfg.student.arch} ({backbone.embed_dim} wide, {backbone.n_blocks} blocks, "
              f"{n_params / 1e6:.1f} M backbone params), crops {args.crops} (global {cfg.crops.global_crops_size} px, "
              f"{effective_local_crops(cfg)} local), batch {args.batch_size}/rank, "
              f"heads {cfg.dino.head_n_prototypes} prototypes")
        for key, value in result.items():
            print(f"{key:>26}: {value:.4g}")
        print(f"images_per_s={images_per_s:.2f} mfu={mfu:.3f} peak_mem_gb={peak_mem_gb:.2f}")
    if args.profile:  # after the figures are printed, which a failed write must not lose
        write_profile(step, device, Path(args.profile), save=info.is_main_process)
    distributed.destroy()
    return result


def compile_settings(cfg: DictConfig) -> str:
    """What ``train.compile`` compiles and how, in words: the scope, CUDA graphs, tuning."""
    return ", ".join([f"scope {cfg.train.compile_scope}"] + ["CUDA graphs"] * bool(cfg.train.cuda_graphs)
                     + ["tuned"] * bool(cfg.train.compile_tuning))  # fmt: skip


def benchmark_overrides(args: argparse.Namespace, precision: str) -> list[str]:
    """The config overrides that the command-line options stand for."""
    overrides = [
        f"train.batch_size_per_gpu={args.batch_size}",
        f"train.precision={precision}",
        f"train.compile={args.compile}",
        f"train.activation_checkpointing={args.activation_checkpointing}",
        "student.pretrained_weights=''",
        "train.dataset_path=unused",
    ]
    if args.arch:
        overrides += [f"student.arch={args.arch}", f"student.patch_size={ARCH_PATCH[args.arch]}",
                      "student.embed_dim=0", "student.depth=0", "student.num_heads=0"]
        if args.arch == "vit_giant2":
            overrides.append("student.ffn_layer=swiglufused")
    if args.crops == "dinobloom":
        overrides += ["crops.local_crops_number=1", "crops.global_crops_size=224"]
    elif args.crops == "dinov2":
        overrides += ["crops.local_crops_number=8", "crops.local_crops_size=98", "crops.global_crops_size=224"]
    if args.heads:
        k, hidden, bottleneck = args.heads
        for head in ("dino", "ibot"):
            overrides += [f"{head}.head_n_prototypes={k}", f"{head}.head_hidden_dim={hidden}",
                          f"{head}.head_bottleneck_dim={bottleneck}"]
    return overrides


def time_steps(step: Any, device: torch.device, iters: int) -> tuple[float, float]:
    """The median seconds of ``iters`` calls of ``step``, and the peak memory in GB (GPU allocations; on a CPU the
    process's peak resident memory, interpreter and libraries included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # Linux reports KiB
        peak_mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return statistics.median(times), peak_mem_gb


def time_step_windows(step: Any, device: torch.device, iters: int, window: int) -> tuple[float, float]:
    """Seconds per call of ``step`` as a training run calls it: ``iters`` calls in windows of ``window`` (the last
    one shorter) with the device synchronised only between windows, so that the host queues each step while the
    device still runs the one before; the median over the windows of their time per call. Also the median of the
    host's time per call, until its last call of the window returned: close to the first figure, the host, not the
    device, sets the pace (or the step waits for the device inside)."""
    per_call, host_per_call = [], []
    synchronize(device)
    for first in range(0, iters, window):
        calls = min(window, iters - first)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        host_per_call.append((time.perf_counter() - start) / calls)
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call), statistics.median(host_per_call)


#: What ``torch.cuda.set_sync_debug_mode("warn")`` says at each synchronising operation.
SYNC_WARNING = "called a synchronizing CUDA operation"


def count_device_syncs(step: Any, device: torch.device) -> tuple[int, list[str]] | None:
    """How often one call of ``step`` makes the host wait for a CUDA device (``torch.cuda.set_sync_debug_mode``),
    and the distinct warnings that say where; None on other devices, which have no such mode."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the warnings of synchronising operations: the mode also warns, once, that it is a prototype.
    syncs = [f"{w.message} ({w.filename}:{w.lineno})" for w in caught if SYNC_WARNING in str(w.message)]
    return len(syncs), sorted(set(syncs))


def write_profile(step: Any, device: torch.device, path: Path, save: bool = True) -> None:
    """Profile one call of ``step``: the operator table sorted by self time to ``path``, a Chrome trace beside it.

    Every rank runs the step (it holds collectives); only one with ``save`` writes the files.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    if not save:
        return
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        prof.key_averages().table(sort_by=sort_by, row_limit=60) + "\n"
        + prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=60)
    )
    trace = path.with_suffix(".json.gz")  # gzipped: a GPU step's trace is tens of MB as text
    prof.export_chrome_trace(str(trace))
    logger.info("profile of one step written to %s (trace %s)", path, trace)


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
