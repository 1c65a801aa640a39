"""``scripts/gpu_check.sh`` calls each benchmark with options that it accepts (a GPU session is too short to
lose a step to a typo), and the training command with overrides its config accepts: the check runs here with
recording stand-ins for python, torchrun and nvidia-smi."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dinov2.train.train as train_command
from dinov2.configs import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")  # fmt: skip


def _recorder(path: Path, log: Path, seconds: float = 0.0) -> None:
    """An executable that appends its arguments to ``log`` as one JSON line, takes ``seconds`` and succeeds."""
    path.write_text(
        f"#!{sys.executable}\nimport json, sys, time\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv) + '\\n')\n"
        f"time.sleep({seconds})\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_check(tmp_path: Path, seconds: float = 0.0, budget: int | None = None,
               steps: str | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """gpu_check.sh with recording stand-ins for python and nvidia-smi; returns the run and the calls file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("python", "nvidia-smi"):
        _recorder(bin_dir / name, calls, seconds)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    if steps is not None:
        env["GPU_CHECK_STEPS"] = steps
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "logs")],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    return run, calls


def test_gpu_check_passes_options_each_benchmark_accepts(
    tmp_path: Path, load_script: Callable[[str], ModuleType]
) -> None:
    run, calls = _run_check(tmp_path)
    assert run.returncode == 0, run.stderr
    assert "gpu_check done" in run.stdout
    # few files come back from a device run: one log, one summary (and the two profiles, not written here)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["gpu_check.log", "summary.txt"]

    benchmarks = []
    for line in calls.read_text().splitlines():
        argv = json.loads(line)[1:]
        script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
        if script is not None:  # python scripts/X.py ... or torchrun [options] scripts/X.py ...
            benchmarks.append((Path(argv[script]).stem, argv[script + 1 :]))
    steps = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("=== ") and "(limit" in line]
    assert len(benchmarks) == len(steps) >= 10 and len(set(steps)) == len(steps)
    assert "train" in [name for name, _ in benchmarks]  # the end-to-end step: dinov2/train/train.py
    for name, args in benchmarks:
        parser = (train_command if name == "train" else load_script(name)).build_parser()
        parser.exit_on_error = False
        try:
            parsed = parser.parse_intermixed_args(args)
            if name == "train":  # and its overrides name keys and values that the config accepts
                load_config(REPO_ROOT / parsed.config_file, parsed.opts)
            elif name == "benchmark_train":  # its config overrides, with those its options stand for
                overrides = load_script(name).benchmark_overrides(parsed, "bf16") + parsed.opts
                load_config(REPO_ROOT / parsed.config_file, overrides)
        except (SystemExit, Exception) as err:  # argparse reports unknown options by exiting
            pytest.fail(f"gpu_check.sh calls {name}.py with options it rejects: {args} ({err})")


def test_gpu_check_keeps_within_its_time_budget(tmp_path: Path) -> None:
    """Each step's limit is cut to what is left of GPU_CHECK_BUDGET_S, a step that would get less than half of its
    limit is not started (a benchmark prints its figures at its end), and steps that no longer fit are skipped, each
    named in the summary; the check ends within its budget however slow the steps are."""
    run, _ = _run_check(tmp_path, seconds=2.0, budget=40)
    assert run.returncode == 0, run.stderr
    started = {line.split()[1]: int(line.split("(limit ")[1].rstrip("s) ="))
               for line in run.stdout.splitlines() if "(limit " in line}  # fmt: skip
    assert started and all(limit <= 30 for limit in started.values())
    assert "attention_backends" in started  # its 30 s limit, cut to under 30 s but not below half of it
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert re.search(r"=== vits14_bf16_compile: skipped, \d+ s of the 40 s budget left, under half its 150 s ===",
                     summary)  # fmt: skip
    assert "vitg14_bf16_ckpt: skipped" in summary and "budget left" in summary
    assert "step(s) not run, the budget spent: " in summary and summary.rstrip().endswith("vitg14_bf16_ckpt")
    assert int(run.stdout.split("gpu_check done in ")[1].split()[0]) <= 40


def test_gpu_check_torch_logs_names_are_known_to_torch() -> None:
    """Every TORCH_LOGS name that gpu_check.sh sets is one this torch knows (an unknown one stops the step at
    ``import torch``; the check's preflight tries them all on the GPU machine's torch too)."""
    script = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    names = sorted({name for value in re.findall(r" TORCH_LOGS=([a-z_,]+) ", script) for name in value.split(",")})
    assert {"recompiles", "cudagraphs"} <= set(names)
    env = {**os.environ, "TORCH_LOGS": ",".join(names)}
    run = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    env["TORCH_LOGS"] = "recompiles,no_such_log"  # (and the check above would see a misspelt one)
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, timeout=120).returncode


def test_gpu_check_runs_only_the_steps_named(tmp_path: Path) -> None:
    """GPU_CHECK_STEPS (spaces or commas) runs the steps named, in the script's order; a misspelt name is refused
    before anything runs, since a lent GPU's time is short."""
    run, calls = _run_check(tmp_path, steps="vitl14_bf16,vits14_bf16_compile")
    assert run.returncode == 0, run.stderr
    steps = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("=== ") and "(limit" in line]
    assert steps == ["vits14_bf16_compile", "vitl14_bf16"]
    benchmarks = [json.loads(line) for line in calls.read_text().splitlines() if "benchmark_train.py" in line]
    assert [argv[argv.index("--arch") + 1] for argv in benchmarks] == ["vit_small", "vit_large"]

    # names are compared as text: a pattern, or a name with a regex's dot, is no step either
    for i, (steps, message) in enumerate([("vits14_bf16_compile vitl14", "names vitl14, which is no step"),
                                          ("*", "names *, which is no step"),
                                          ("vitl14.bf16", "names vitl14.bf16, which is no step"),
                                          (" , ", "is set but names no step")]):  # fmt: skip
        (tmp_path / f"typo{i}").mkdir()
        refused, refused_calls = _run_check(tmp_path / f"typo{i}", steps=steps)
        assert refused.returncode == 2 and message in refused.stderr and "vitl14_bf16" in refused.stderr
        assert not refused_calls.exists() and not (tmp_path / f"typo{i}" / "logs").exists()


def test_gpu_check_summary_keeps_the_figures_and_the_exit_status_says_a_step_failed(tmp_path: Path) -> None:
    """A step's figures stay in summary.txt though the profiler's messages follow them, and a failed step makes the
    check's exit status 1 (the other steps still run), named at the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        f"#!{sys.executable}\nimport sys\n"
        "for i in range(25):\n    print(f'figure_{i}: {i}')\n"
        "print('USDT:2026-11-28 01:07:57 22772:22772 SyncActivityProfilerHandler.cpp:39] profiler_start')\n"
        "print('ERROR:2026-11-28 01:07:57 22772:22772 DeviceProperties.cpp:56] gpuGetDeviceCount failed')\n"
        "sys.exit(3 if any(a.endswith('benchmark_attention.py') for a in sys.argv) else 0)\n"
    )
    (bin_dir / "python").chmod(0o755)
    _recorder(bin_dir / "nvidia-smi", tmp_path / "calls.jsonl")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "GPU_CHECK_STEPS": "attention_backends vitl14_bf16"}  # fmt: skip
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "logs")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    vitl = summary.split("=== vitl14_bf16: exit 0")[1]
    assert "figure_0: 0" in vitl and "figure_24: 24" in vitl and "USDT" not in vitl and "gpuGetDeviceCount" not in vitl
    assert "=== attention_backends: exit 3" in summary
    assert summary.splitlines()[-1] == "gpu_check: 1 step(s) failed or ran out of time: attention_backends"


def test_gpu_check_writes_a_relative_log_dir_where_it_is_called(tmp_path: Path) -> None:
    """`bash path/to/scripts/gpu_check.sh logs` writes ./logs, not logs/ in the repository it moves to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "nvidia-smi"):
        _recorder(bin_dir / name, tmp_path / "calls.jsonl")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "GPU_CHECK_STEPS": "vitl14_bf16"}  # fmt: skip
    env.pop("OUT", None)
    name = f"rel_logs_{tmp_path.name}"
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), name], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / name / "summary.txt").is_file() and not (REPO_ROOT / name).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the preflight passes and the check would run")
def test_gpu_check_stops_when_the_preflight_fails(tmp_path: Path) -> None:
    """Without CUDA (or the carried packages) nothing is measured: the CPU fallback would spend the whole budget."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100, 81559 MiB'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "logs")],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1
    assert "no CUDA device" in run.stdout and "preflight failed" in run.stdout
    assert "=== vits14_torchrun_bf16" not in run.stdout


def test_gpu_check_help_and_a_mistyped_option_start_nothing(tmp_path: Path) -> None:
    """`--help` used to be taken as the log folder, and the check then spent a lent GPU's whole budget."""
    script = str(REPO_ROOT / "scripts" / "gpu_check.sh")
    shown = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "bash scripts/gpu_check.sh [LOG_DIR]" in shown.stdout
    refused = subprocess.run(["bash", script, "--log-dir"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown option --log-dir" in refused.stderr
    assert list(tmp_path.iterdir()) == [] and not (REPO_ROOT / "--log-dir").exists()
