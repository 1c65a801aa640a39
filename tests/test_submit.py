"""Tests of the submitit launcher (dinov2/run/submit.py) and the plain sbatch example."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import submitit

from dinov2.configs import load_config
from dinov2.distributed import slurm_master_port
from dinov2.run import submit as launcher

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "dinov2" / "configs" / "train" / "demo.yaml"
SBATCH_SCRIPT = REPO_ROOT / "scripts" / "sbatch_train.sh"
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _preempt_signal_variable_stays_in_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit` exports SUBMITIT_PREEMPT_SIGNAL for the jobs it starts; set here, monkeypatch removes it afterwards,
    so that it does not reach the processes of later tests."""
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", launcher.PREEMPT_SIGNAL)


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


# ----------------------------------------------------------------------------- unit tests


def test_training_arguments_are_split_from_launcher_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    request = launcher.parse_request(
        [
            "--nodes", "2",
            "--config-file", str(DEMO_CONFIG),
            "optim.epochs=2",
            "--ngpus", "4",
            "--output-dir", str(out),
            "--partition", "gpu",
            "--no-resume",
            "train.seed=7",
            "--timeout", "30",
        ]
    )  # fmt: skip
    assert request.train_argv == [
        "--config-file", str(DEMO_CONFIG), "--output-dir", str(out), "--no-resume", "optim.epochs=2", "train.seed=7",
    ]  # fmt: skip
    assert request.settings["nodes"] == 2 and request.settings["ngpus"] == 4
    assert request.settings["partition"] == "gpu" and request.settings["timeout"] == 30
    # untouched keys keep the values of configs/slurm/default.yaml
    assert request.settings["cpus_per_task"] == 10 and request.settings["mem_gb"] == 0
    assert request.job_dir == out / "slurm" / "%j"
    assert request.local is False

    # without --output-dir, train.py uses the config's train.output_dir; the launcher puts its logs there too
    request = launcher.parse_request(["--local", "--ngpus", "1", "--config-file", str(DEMO_CONFIG), "train.seed=7"])
    assert request.train_argv == ["--config-file", str(DEMO_CONFIG), "train.seed=7"]
    assert request.output_dir == Path(load_config(DEMO_CONFIG).train.output_dir)
    assert request.job_dir == request.output_dir / "slurm" / "%j"
    assert request.local is True


@pytest.mark.parametrize(("gpus", "flag", "ranks"), [(0, [], 1), (3, [], 3), (0, ["--ngpus", "2"], 2)])
def test_local_runs_one_rank_per_gpu_of_this_machine(
    monkeypatch: pytest.MonkeyPatch, gpus: int, flag: list[str], ranks: int
) -> None:
    """--local without --ngpus: this machine's GPUs (one rank on a CPU), not the cluster default of 8."""
    monkeypatch.setattr(launcher.torch.cuda, "device_count", lambda: gpus)
    request = launcher.parse_request(["--local", *flag, "--config-file", str(DEMO_CONFIG), "--output-dir", "o"])
    assert request.settings["ngpus"] == ranks
    assert launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o"]).settings["ngpus"] == 8


def test_executor_parameters_map_gpus_to_tasks_and_pin_the_signal(tmp_path: Path) -> None:
    request = launcher.parse_request(
        ["--nodes", "3", "--ngpus", "2", "--qos", "high",
         "--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path)]  # fmt: skip
    )
    params = launcher.executor_parameters(request)
    assert params["nodes"] == 3 and params["tasks_per_node"] == 2 and params["gpus_per_node"] == 2
    assert params["timeout_min"] == 2880 and params["slurm_signal_delay_s"] == 120
    assert params["slurm_additional_parameters"] == {"signal": "USR1@120"}
    assert params["slurm_qos"] == "high"
    assert "slurm_partition" not in params  # null in the yaml: the cluster's default partition


def test_sbatch_file_gives_tasks_their_cpus_and_ends_the_step_on_a_failed_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit only checks that SLURM's tools exist
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    request = launcher.parse_request(["--nodes", "2", "--ngpus", "4", "--config-file", str(DEMO_CONFIG),
                                      "--output-dir", str(tmp_path / "run")])  # fmt: skip
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**launcher.executor_parameters(request))
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    assert "#SBATCH --cpus-per-task=10" in text
    setup = text.index("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK")
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and setup < text.index(srun[0])


def test_local_run_keeps_the_callers_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--local", "--ngpus", "2", "--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    params = launcher.local_executor_parameters(launcher.parse_request(argv))
    assert params["visible_gpus"] == [4, 5] and params["tasks_per_node"] == 2
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(**params)
    assert executor.parameters["visible_gpus"] == [4, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    with pytest.raises(launcher.LaunchError, match="--ngpus 2 but CUDA_VISIBLE_DEVICES lists only 1"):
        launcher.local_executor_parameters(launcher.parse_request(argv))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3f2a")
    with pytest.raises(launcher.LaunchError, match="GPU indices"):
        launcher.local_executor_parameters(launcher.parse_request(argv))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden: the two ranks stay on the CPU
    params = launcher.local_executor_parameters(launcher.parse_request(argv))
    assert params["gpus_per_node"] == 0 and params["tasks_per_node"] == 2 and "visible_gpus" not in params
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "visible_gpus" not in launcher.local_executor_parameters(launcher.parse_request(argv))


def test_requeued_job_resumes_whatever_started_it_afresh() -> None:
    """--no-resume and train.resume=false (command line or config file) started the job afresh; its requeued job
    must resume, or every preemption would throw the progress away."""
    argv = ["--config-file", "c.yaml", "--output-dir", "out", "--no-resume", "optim.epochs=3", "train.resume=false"]
    job = launcher.TrainingJob(argv)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, launcher.TrainingJob)
    assert delayed.function.argv == [
        "--config-file", "c.yaml", "--output-dir", "out", "optim.epochs=3", "train.resume=false", "train.resume=true"
    ]  # fmt: skip
    assert delayed.args == () and delayed.kwargs == {}
    assert job.argv == argv  # the running job keeps its own arguments
    assert launcher.resuming(delayed.function.argv) == delayed.function.argv  # requeued again: the same arguments


def test_torchrun_env_from_job_environment() -> None:
    def fake_env(job_id: str, rank: int, local_rank: int) -> SimpleNamespace:
        return SimpleNamespace(
            job_id=job_id, global_rank=rank, local_rank=local_rank, num_tasks=8, num_nodes=2,
            hostnames=["gpu-a17", "gpu-b03"],
        )  # fmt: skip

    env = launcher.torchrun_env(fake_env("4242", 5, 1))
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu-a17",
    }  # fmt: skip
    port = int(env["MASTER_PORT"])
    assert 10_000 <= port < 30_000  # below the ports Linux gives outgoing connections (32768 on)
    # every task of a job agrees on the port (it must not depend on the rank or on Python's hash seed)
    assert launcher.torchrun_env(fake_env("4242", 0, 0))["MASTER_PORT"] == env["MASTER_PORT"]
    other = subprocess.run(
        [sys.executable, "-c", "from dinov2.run.submit import torchrun_env; from types import SimpleNamespace as N; "
         "print(torchrun_env(N(job_id='4242', global_rank=7, local_rank=3, num_tasks=8, num_nodes=2, "
         "hostnames=['a', 'b']))['MASTER_PORT'])"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert int(other.stdout) == port
    assert launcher.torchrun_env(fake_env("4243", 0, 0))["MASTER_PORT"] != env["MASTER_PORT"]


def test_training_job_sets_env_then_calls_train_main(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_main(argv: list[str]) -> int:
        seen["argv"] = argv
        seen["env"] = {k: os.environ.get(k) for k in TORCHRUN_VARS}
        return 0

    for name in TORCHRUN_VARS:  # set, then delete: monkeypatch removes what the job sets at teardown
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    fake_module = ModuleType("dinov2.train.train")
    fake_module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dinov2.train.train", fake_module)
    job_env = SimpleNamespace(job_id="99", global_rank=3, local_rank=3, num_tasks=4, num_nodes=1, hostnames=["node7"])
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: job_env)

    assert launcher.TrainingJob(["--config-file", "c.yaml", "a.b=1"])() == 0
    assert seen["argv"] == ["--config-file", "c.yaml", "a.b=1"]
    assert seen["env"] == {
        "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node7",
        "MASTER_PORT": str(slurm_master_port("99")),
    }  # fmt: skip

    # a job that SLURM requeued by itself must resume, not start over
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    launcher.TrainingJob(["--config-file", "c.yaml", "--no-resume", "a.b=1"])()
    assert seen["argv"] == ["--config-file", "c.yaml", "a.b=1", "train.resume=true"]

    fake_module.main = lambda argv: 1  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="exit status 1"):
        launcher.TrainingJob(["--config-file", "c.yaml"])()


def test_slurm_submission_writes_the_expected_sbatch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
    sbatch = f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    _write_executable(bin_dir / "sbatch", sbatch)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "run"

    launcher.main(
        ["--nodes", "2", "--ngpus", "8", "--partition", "gpu", "--account", "hema", "--no-path-check",
         "--config-file", str(DEMO_CONFIG), "--output-dir", str(out), "--no-resume", "optim.epochs=2"]
    )  # fmt: skip

    printed = capsys.readouterr().out
    assert "Submitted job 4242" in printed and str(out / "slurm" / "4242") in printed
    sbatch = (tmp_path / "submitted.sh").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=hema",
        "#SBATCH --time=2880",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=0GB",
        "#SBATCH --signal=USR1@120",
        "export SUBMITIT_PREEMPT_SIGNAL=USR1",
        f"#SBATCH --output={out}/slurm/%j/%j_0_log.out",
    ):
        assert line in sbatch.splitlines(), f"missing {line!r} in\n{sbatch}"
    assert sbatch.count("--signal=") == 1
    delayed = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4242" / "4242_submitted.pkl")
    assert delayed.function.argv == [
        "--config-file", str(DEMO_CONFIG), "--output-dir", str(out), "--no-resume", "optim.epochs=2",
    ]  # fmt: skip


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    command = [sys.executable, "-m", "dinov2.run.submit", "--config-file", str(missing), "--output-dir", str(tmp_path)]
    # the command as a user runs it: one error line, exit status 2, and the traceback on request, as every command
    for show_traceback in (False, True):
        env = {**os.environ, "DINOBLOOM_TRACEBACK": "1" if show_traceback else ""}
        run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
        assert run.returncode != 0 and f"--config-file {missing}: no such file" in run.stderr
        if show_traceback:
            assert "Traceback" in run.stderr and "LaunchError" in run.stderr
        else:
            assert run.returncode == 2 and run.stderr.strip() == f"error: --config-file {missing}: no such file"

    slurm_yaml = tmp_path / "cluster.yaml"
    slurm_yaml.write_text("partition: gpu\ncpus_per_tsk: 8\n")
    expected = r"cluster.yaml: unknown key 'cpus_per_tsk'; did you mean 'cpus_per_task'"
    with pytest.raises(launcher.LaunchError, match=expected):
        launcher.parse_request(["--slurm-config", str(slurm_yaml), "--config-file", str(DEMO_CONFIG)])
    slurm_yaml.write_text("partition: [gpu\n")
    with pytest.raises(launcher.LaunchError, match=r"cluster.yaml: cannot parse the YAML"):
        launcher.parse_request(["--slurm-config", str(slurm_yaml), "--config-file", str(DEMO_CONFIG)])
    slurm_yaml.write_text("timeout: two days\n")
    with pytest.raises(launcher.LaunchError, match=r"'timeout' must be int or null, got 'two days'"):
        launcher.parse_request(["--slurm-config", str(slurm_yaml), "--config-file", str(DEMO_CONFIG)])
    # A cluster file naming only what it changes keeps the packaged defaults for the rest; ranges are checked.
    slurm_yaml.write_text("partition: gpu\nmem_gb: 200\n")
    request = launcher.parse_request(["--slurm-config", str(slurm_yaml), "--config-file", str(DEMO_CONFIG)])
    packaged = launcher.load_slurm_settings(launcher.DEFAULT_SLURM_CONFIG)
    assert request.settings == {**packaged, "partition": "gpu", "mem_gb": 200}
    for bad, message in (("cpus_per_task: 0", "cpus_per_task must be at least 1"),
                         ("mem_gb: -5", "mem_gb must be at least 0"),
                         ("max_num_timeout: -1", "max_num_timeout must be at least 0")):  # fmt: skip
        slurm_yaml.write_text(bad + "\n")
        with pytest.raises(launcher.LaunchError, match=message):
            launcher.parse_request(["--slurm-config", str(slurm_yaml), "--config-file", str(DEMO_CONFIG)])
    with pytest.raises(launcher.LaunchError, match=r"absent\.yaml not found; pass --slurm-config FILE$"):
        launcher.parse_request(["--slurm-config", str(tmp_path / "absent.yaml"), "--config-file", str(DEMO_CONFIG)])
    # an installed (not editable) package has no configs/ folder: the error says where the default was
    with monkeypatch.context() as patched:
        patched.setattr(launcher, "DEFAULT_SLURM_CONFIG", tmp_path / "site-packages" / "configs" / "default.yaml")
        with pytest.raises(launcher.LaunchError, match=r"repository's configs/slurm/default\.yaml.*--slurm-config"):
            launcher.parse_request(["--config-file", str(DEMO_CONFIG)])

    with pytest.raises(launcher.LaunchError, match="--local runs on this machine only: --nodes must be 1, got 2"):
        launcher.parse_request(["--local", "--nodes", "2", "--config-file", str(DEMO_CONFIG), "--output-dir", "o"])
    with pytest.raises(launcher.LaunchError, match="overrides must be key=value, got: optim.epochs"):
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o", "optim.epochs"])
    with pytest.raises(launcher.LaunchError, match=r"--config-file .*demo.yaml: .*optim\.epochz"):
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o", "optim.epochz=3"])
    # what the job would only find when it starts: no data set, a misspelt DinoBloom data set, no output folder
    with pytest.raises(launcher.LaunchError, match=r"^train.dataset_path is empty: name a folder of \.txt image lists"):
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o", "train.dataset_path="])
    with pytest.raises(launcher.LaunchError, match=r"train.dataset_path: .*unknown option\(s\) \['shufle'\]"):
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o",
                                f"train.dataset_path=HemaStandardDataset:root={tmp_path}:shufle=1"])  # fmt: skip
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    for flag, folder, message in (("--output-dir", blocker, f"{blocker}: it"),
                                  ("--output-dir", blocker / "run", f"{blocker / 'run'}: {blocker}"),
                                  ("--job-dir", blocker / "%j", f"{blocker}: it")):  # fmt: skip
        extra = ["--output-dir", str(tmp_path / "run")] if flag == "--job-dir" else []
        with pytest.raises(launcher.LaunchError, match=f"^{re.escape(f'{flag} {message} is a file, not a folder')}$"):
            launcher.parse_request(["--config-file", str(DEMO_CONFIG), *extra, flag, str(folder)])
    if sys.platform == "linux":  # a folder that cannot be made, though no file is in the way
        with pytest.raises(launcher.LaunchError, match=r"^--output-dir /proc/x: the folder /proc/x cannot be made"):
            launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "/proc/x"])
    assert not (tmp_path / "run").exists()  # the probes leave nothing behind
    # an environment variable that only the job will have (node-local scratch) is not resolved on the login node
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    request = launcher.parse_request(
        ["--config-file", str(DEMO_CONFIG), "--output-dir", "o", "train.dataset_path=${oc.env:SLURM_TMPDIR}/lists"]
    )
    assert "train.dataset_path=${oc.env:SLURM_TMPDIR}/lists" in request.train_argv
    # ... also where a checked setting needs one (the job checks it), but not where the launcher itself needs it
    monkeypatch.delenv("JOB_BATCH", raising=False)
    request = launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o",
                                      "train.batch_size_per_gpu=${oc.decode:${oc.env:JOB_BATCH}}"])  # fmt: skip
    assert "train.batch_size_per_gpu=${oc.decode:${oc.env:JOB_BATCH}}" in request.train_argv
    # one that resolves here is type-checked here: a job that could only fail in the queue is not sent
    with pytest.raises(launcher.LaunchError, match="train.batch_size_per_gpu must be an integer, got '/"):
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir", "o",
                                "train.batch_size_per_gpu=${oc.env:HOME}"])  # fmt: skip
    with pytest.raises(launcher.LaunchError, match=r"train.output_dir=\$\{oc.env:SLURM_TMPDIR\}/run cannot be "
                       r"resolved here .*pass --output-dir"):  # fmt: skip
        launcher.parse_request(["--config-file", str(DEMO_CONFIG), "train.output_dir=${oc.env:SLURM_TMPDIR}/run"])

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: not a SLURM cluster
    with pytest.raises(launcher.LaunchError, match="pass --local to run on this machine"):
        launcher.submit(["--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run")])


def test_a_job_whose_data_or_weights_are_missing_is_not_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It would wait in the queue for hours, then fail at once. Paths resolved only in the job (${...}) and URLs are
    not checked, and --no-path-check submits anyway (data that only the compute nodes see)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
    _write_executable(bin_dir / "sbatch", '#!/bin/sh\necho "Submitted batch job 4242"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    base = ["--config-file", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run")]
    absent_data, absent_weights = tmp_path / "no_lists", tmp_path / "dinov2_vits14_pretrain.pth"

    argv = [*base, f"train.dataset_path=HemaStandardDataset:root={absent_data}:shuffle=1",
            f"student.pretrained_weights={absent_weights}", f"evaluation.knn_data={tmp_path / 'no_cells'}"]  # fmt: skip
    with pytest.raises(launcher.LaunchError) as raised:
        launcher.main(argv)
    error = str(raised.value)
    assert (f"train.dataset_path={absent_data}, evaluation.knn_data={tmp_path / 'no_cells'}, "
            f"student.pretrained_weights={absent_weights}: not found") in error  # fmt: skip
    assert "--no-path-check" in error and not (tmp_path / "run" / "slurm").exists()
    # nor is a --local one, which would fail in the background while the command reported it started
    with pytest.raises(launcher.LaunchError) as raised:
        launcher.main([*argv, "--local"])
    error = str(raised.value)
    assert "not found on this machine" in error and "--no-path-check" not in error
    assert not (tmp_path / "run" / "slurm").exists()

    launcher.main([*argv, "--no-path-check"])
    assert "Submitted job 4242" in capsys.readouterr().out
    later = [*base, "train.dataset_path=${oc.env:SLURM_TMPDIR}/lists",
             "evaluation.knn_data=${oc.env:SLURM_TMPDIR}/knn",
             "student.pretrained_weights=https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"]
    launcher.main(later)
    assert "Submitted job 4242" in capsys.readouterr().out


def test_missing_submitit_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "submitit" or m.startswith("submitit.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "dinov2.run.submit")
    with pytest.raises(ModuleNotFoundError, match="pip install submitit"):
        importlib.import_module("dinov2.run.submit")


@pytest.mark.parametrize("torchrun_version", ["2.14", "2.11", "2.8"])
def test_sbatch_script_checkpoints_before_requeue(tmp_path: Path, torchrun_version: str) -> None:
    log = tmp_path / "events.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun",
                      f'#!/bin/bash\nopts=()\nwhile [[ $1 == --* ]]; do opts+=("$1"); shift; done\n'
                      f'echo "srun ${{opts[*]}}" >> {log}\nexec "$@"\n')  # fmt: skip
    _write_executable(
        bin_dir / "scontrol",
        # (a pause between the host names, as a long node list has: reading only the first must not kill scontrol)
        f'#!/bin/bash\nif [[ $1 == show ]]; then echo node1; sleep 0.3; echo node2; else echo "scontrol $*" >> {log}; fi\n',
    )
    # Stands in for torchrun + train.py: saves a "checkpoint" on SIGUSR1, then exits non-zero as train.py does.
    # Its help lists the options of that PyTorch version: 2.14 has both, 2.11 no --shutdown-timeout, 2.8 neither.
    options = {"2.14": "  --signals-to-handle S\n  --shutdown-timeout SHUTDOWN_TIMEOUT", "2.11": "  --signals-to-handle S",
               "2.8": "  --nnodes NNODES"}[torchrun_version]
    _write_executable(
        bin_dir / "torchrun",
        f'#!/bin/bash\nif [[ $1 == --help ]]; then echo "{options}"; exit 0; fi\n'
        f'echo "torchrun $*" >> {log}\necho "srun cpus ${{SRUN_CPUS_PER_TASK:-unset}}" >> {log}\n'
        f'trap \'echo checkpoint saved >> {log}; exit 1\' USR1\necho started >> {log}\n'
        "while true; do sleep 0.05; done\n",
    )
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO_ROOT),
        SLURM_CPUS_PER_TASK="80",
    )  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(SBATCH_SCRIPT), "cfg.yaml", "/scratch/run1", "optim.epochs=2"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Generous limits: they only matter on a machine too busy to start a few shell processes promptly.
        _wait_for(lambda: log.exists() and "started" in log.read_text(), 60, "the fake training to start")
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    events = log.read_text().splitlines()
    # one torchrun per machine, whatever --ntasks-per-node the job has
    assert events.pop(0) == "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1"
    assert events[0] == (
        "torchrun --nnodes 2 --nproc_per_node 4 --rdzv_id 77 --rdzv_backend c10d --rdzv_endpoint node1:10077 "
        + ("--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 " if torchrun_version != "2.8" else "")
        + ("--shutdown-timeout 100 " if torchrun_version == "2.14" else "")
        + "dinov2/train/train.py --config-file cfg.yaml --output-dir /scratch/run1 optim.epochs=2"
    )
    assert ("has no --shutdown-timeout" in output) == (torchrun_version != "2.14")
    assert ("cannot forward SIGUSR1" in output) == (torchrun_version == "2.8")
    # the rendezvous port is the job's own (10000 + id % 20000); srun passes sbatch's CPUs per task on
    assert events[1:] == ["srun cpus 80", "started", "checkpoint saved", "scontrol requeue 77"]
    assert "requeueing job 77" in output


@pytest.mark.parametrize("restart_count", ["0", "1"])
def test_sbatch_script_resumes_a_requeued_job(tmp_path: Path, restart_count: str) -> None:
    """A run started afresh (--no-resume, train.resume=false) must resume once requeued (SLURM_RESTART_COUNT > 0),
    or every preemption or time limit would start it over."""
    log = tmp_path / "torchrun.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    _write_executable(bin_dir / "scontrol", "#!/bin/bash\necho node1\n")
    _write_executable(bin_dir / "torchrun", f'#!/bin/bash\n[[ $1 == --help ]] && exit 0\necho "$*" >> {log}\n')
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node1",
        SLURM_NNODES="1", SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(REPO_ROOT), SLURM_RESTART_COUNT=restart_count,
    )  # fmt: skip
    args = ["cfg.yaml", "/scratch/run1", "--no-resume", "optim.epochs=2", "train.resume=false"]
    result = subprocess.run(["bash", str(SBATCH_SCRIPT), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    training_args = log.read_text().split("dinov2/train/train.py ")[1].split()
    if restart_count == "0":
        assert training_args[4:] == ["--no-resume", "optim.epochs=2", "train.resume=false"]
    else:
        assert training_args[4:] == ["optim.epochs=2", "train.resume=false", "train.resume=true"]


def test_sbatch_script_refuses_several_tasks_per_node(tmp_path: Path) -> None:
    """One torchrun per node starts the node's processes; with --ntasks-per-node=8 (one task per GPU, as submitit
    asks) each torchrun would get one task's CPUs and GPU: refused, with the two ways that work, before any srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun", f"#!/bin/bash\ntouch {tmp_path / 'srun_ran'}\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_NTASKS_PER_NODE="8")  # fmt: skip
    result = subprocess.run(["bash", str(SBATCH_SCRIPT), "cfg.yaml", "/scratch/run1"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "submit it with --ntasks-per-node=1" in result.stderr
    assert "srun python dinov2/train/train.py" in result.stderr and not (tmp_path / "srun_ran").exists()


# ----------------------------------------------------------------------------- end to end, submitit's LocalExecutor


@pytest.fixture(scope="module")
def demo_lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic blood-smear dataset; returns the folder of file lists that training reads."""
    from dinov2.data.demo import generate_demo_dataset

    dataset = generate_demo_dataset(tmp_path_factory.mktemp("demo"), images_per_class=6, image_size=64, num_workers=0)
    return dataset.lists_dir


def _tiny_demo_overrides(lists_dir: Path, epoch_length: int, epochs: int) -> list[str]:
    """demo.yaml shrunk further so that two CPU processes train a few iterations per second."""
    return [
        f"train.dataset_path={lists_dir}",
        f"train.OFFICIAL_EPOCH_LENGTH={epoch_length}",
        f"optim.epochs={epochs}",
        "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1",
        "train.batch_size_per_gpu=4",
        "train.num_workers=0",
        "train.log_period=1",
        f"train.checkpoint_period={epoch_length}",
        "crops.global_crops_size=28",
        "student.depth=2",
        "dino.head_n_prototypes=64",
        "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64",
        "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16",
        "evaluation.eval_period_iterations=0",
        "evaluation.knn_data=''",
    ]


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "training_metrics.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _job_logs(job: submitit.Job) -> str:
    """stdout and stderr of every task (training logs go to stdout, submitit's to stderr)."""
    return f"{job.stdout() or ''}\n{job.stderr() or ''}"


@pytest.mark.slow
def test_local_job_trains_to_the_end_on_two_ranks(
    tmp_path: Path, demo_lists: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger=launcher.__name__):
        job = launcher.submit(
            ["--local", "--ngpus", "2", "--timeout", "10", "--config-file", str(DEMO_CONFIG), "--output-dir",
             str(out), *_tiny_demo_overrides(demo_lists, epoch_length=3, epochs=2)]
        )  # fmt: skip
    # the command returns at once: it says where to follow the run
    expected = f"runs in the background on this machine (process {job.job_id}); its training log: {out / 'log.txt'}"
    assert expected in caplog.text
    try:
        assert job.results() == [0, 0], _job_logs(job)
    finally:
        job.cancel()
    logs = _job_logs(job)
    # two ranks formed one process group from the variables TrainingJob set (torchrun's names)
    assert "rank 0/2 on cpu (torchrun)" in logs
    iterations = [record["iteration"] for record in _metrics(out)]
    assert iterations == list(range(6))
    assert (out / "checkpoints" / "000000005").is_dir()
    assert (out / "slurm").is_dir() and any((out / "slurm").glob("*/*_0_log.out"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's task processes through /proc")
def test_local_job_preempted_is_requeued_and_resumes(tmp_path: Path, demo_lists: Path) -> None:
    out = tmp_path / "run"
    epoch_length, epochs = 10, 2
    job = launcher.submit(
        ["--local", "--ngpus", "2", "--timeout", "10", "--config-file", str(DEMO_CONFIG), "--output-dir", str(out),
         "--no-resume", *_tiny_demo_overrides(demo_lists, epoch_length, epochs)]
    )  # fmt: skip
    try:
        _wait_for(lambda: any(r["iteration"] >= 1 for r in _metrics(out)), 150, "the first training iterations")
        # What SLURM does before a time limit or a preemption: SIGUSR1 to every task of the job.
        tasks = _child_pids(job._process.pid)
        assert len(tasks) == 2, f"expected the controller {job._process.pid} to run 2 tasks, found {tasks}"
        for pid in tasks:
            os.kill(pid, signal.SIGUSR1)
        assert job.results() == [0, 0], _job_logs(job)
    finally:
        job.cancel()
    logs = _job_logs(job)
    assert "Requeued job" in logs, logs
    stopped = re.search(r"stopping after the checkpoint of iteration (\d+)", logs)
    assert stopped, logs
    stop_iteration = int(stopped.group(1))
    assert stop_iteration < epoch_length * epochs - 1, "the signal arrived after training had finished"
    # the requeued job dropped --no-resume and continued from the checkpoint written on the signal
    resumed = re.search(r"resuming at iteration (\d+) from (\S+)", logs)
    assert resumed, logs
    assert int(resumed.group(1)) == stop_iteration + 1
    assert resumed.group(2).endswith(f"{stop_iteration:09d}")
    assert f"training iterations {stop_iteration + 1} -> {epoch_length * epochs}" in logs
    assert logs.count("training iterations 0 ->") == 1
    iterations = [record["iteration"] for record in _metrics(out)]
    assert iterations == list(range(epoch_length * epochs))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the controller's open files through /proc")
def test_local_submission_returns_while_the_job_runs(tmp_path: Path, demo_lists: Path) -> None:
    """Captured output (a notebook's `!`, `$(...)`) must not keep the command waiting for the whole training."""
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "dinov2.run.submit", "--local", "--ngpus", "1", "--config-file", str(DEMO_CONFIG),
         "--output-dir", str(out), *_tiny_demo_overrides(demo_lists, epoch_length=500, epochs=1)],
        capture_output=True, text=True, timeout=90, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    controller = int(re.search(r"in the background on this machine \(process (\d+)\)", run.stderr).group(1))
    try:
        for fd in (1, 2):  # the controller writes to its own log, not to the caller's pipe
            assert os.readlink(f"/proc/{controller}/fd/{fd}") == str(out / "slurm" / "local_controller.log")
    finally:
        for pid in [*_child_pids(controller), controller]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_home_relative_output_dir_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output-dir=~/run1` reaches the launcher unexpanded (bash expands ~ only at a word's start): the job, its
    logs and the training must all use the home folder, never a folder literally named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    request = launcher.parse_request(["--config-file", str(DEMO_CONFIG), "--output-dir=~/run1"])
    assert request.output_dir == tmp_path / "run1"
    assert request.job_dir == tmp_path / "run1" / "slurm" / "%j"
    assert request.train_argv[2:4] == ["--output-dir", str(tmp_path / "run1")]


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_folder_that_a_training_holds_is_refused_before_submission(tmp_path: Path, demo_lists: Path) -> None:
    """The job would stop at its start, its error only in the job's own log: the launcher names the holder now, and
    submits once the holder is gone."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    argv = ["--local", "--config-file", str(DEMO_CONFIG), "--output-dir", str(out),
            *_tiny_demo_overrides(demo_lists, epoch_length=2, epochs=1)]  # fmt: skip
    with (out / ".lock").open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("process 4242 on node7, since 2026-11-28T10:00:00\n")
        holder.flush()
        with pytest.raises(launcher.LaunchError, match=r"run is in use by another training \(process 4242 on node7, "):
            launcher.main(argv)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    job = launcher.submit(argv)
    job.wait()
    assert job.state == "FINISHED" and (out / "checkpoints").is_dir()
