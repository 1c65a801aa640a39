"""``scripts/gpu_check.sh`` calls each benchmark with options that it accepts (a GPU session is too short to
lose a step to a typo): the check runs here with recording stand-ins for python, torchrun and nvidia-smi."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")  # fmt: skip


def _recorder(path: Path, log: Path) -> None:
    """An executable that appends its arguments to ``log`` as one JSON line and succeeds."""
    path.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv) + '\\n')\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_gpu_check_passes_options_each_benchmark_accepts(
    tmp_path: Path, load_script: Callable[[str], ModuleType]
) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("python", "torchrun", "nvidia-smi"):
        _recorder(bin_dir / name, calls)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "logs")],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "gpu_check done" in run.stdout

    benchmarks = []
    for line in calls.read_text().splitlines():
        argv = json.loads(line)[1:]
        script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
        if script is not None:  # python scripts/X.py ... or torchrun [options] scripts/X.py ...
            benchmarks.append((Path(argv[script]).stem, argv[script + 1 :]))
    steps = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("=== ") and "(limit" in line]
    assert len(benchmarks) == len(steps) >= 10 and len(set(steps)) == len(steps)
    for name, args in benchmarks:
        parser = load_script(name).build_parser()
        parser.exit_on_error = False
        try:
            parser.parse_intermixed_args(args)
        except (SystemExit, Exception) as err:  # argparse reports unknown options by exiting
            pytest.fail(f"gpu_check.sh calls {name}.py with options it rejects: {args} ({err})")
