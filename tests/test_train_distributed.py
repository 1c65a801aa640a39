"""The trainer on 2 ranks (gloo, CPU): equal to 1 rank with the same global batch, resumable across rank counts and
after a SIGKILL in the middle of a checkpoint, and initialised from a backbone file without a full copy per rank.

Terms that are per-rank by design are switched off where 2 ranks are compared with 1 rank, because 2 ranks with B
images each cannot compute them like 1 rank with 2B images:

* KoLeo (``dino.koleo_loss_weight=0``): nearest neighbours are searched within a rank's batch;
* iBOT masks (``ibot.mask_sample_probability=0``): each rank draws the masks of its own batch, so the masked
  patches differ; with probability 0 no patch is masked, the iBOT code path still runs (heads, centering,
  Sinkhorn-Knopp over zero rows) and its term is exactly 0;
* stochastic depth (``student.drop_path_rate=0``, demo.yaml's value): each rank draws its own random numbers.

Sinkhorn-Knopp and softmax centering reduce over all ranks and stay on (both are compared, with LayerScale 1 so that
one rank's rows and all rows give different statistics: without either reduction the comparison fails). The data
are the same: the sampler gives 1 rank with batch 2B exactly [rank 0's B, rank 1's B] and every sample's augmentation
is seeded by the sample, and the DINO loss pairs each image's student crop with the teacher's other crop of the same
image (a mean over rows, so the row order does not matter).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import dinov2.train.ssl_meta_arch as meta_arch
from conftest import spawn_ranks
from dinov2 import distributed
from dinov2.checkpoint import find_latest_checkpoint
from dinov2.configs import TRAIN_CONFIG_DIR, apply_scaling_rules_to_cfg, load_config
from dinov2.models import DinoVisionTransformer
from dinov2.train.train import build_training_state, main

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = TRAIN_CONFIG_DIR / "demo.yaml"
WORLD, B = 2, 4
EPOCHS, EPOCH_LENGTH = 2, 4
N_ITER = EPOCHS * EPOCH_LENGTH
TINY = [
    "train.num_workers=0",
    "train.log_period=1",
    "crops.global_crops_size=56",
    "student.embed_dim=64",
    "student.depth=2",
    "student.num_heads=1",
    "dino.head_n_prototypes=256",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=256",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
    "evaluation.knn_data=''",
    f"optim.epochs={EPOCHS}",
    f"train.OFFICIAL_EPOCH_LENGTH={EPOCH_LENGTH}",
    f"evaluation.eval_period_iterations={N_ITER}",
    "train.checkpoint_period=4",
    "train.keep_last_checkpoints=3",
    "evaluation.rankme_period_iterations=4",  # RankMe at iterations 1 and 5, from the Gram matrices of both ranks
    "evaluation.rankme_batches=2",
    # per-rank by design, see the module docstring
    "dino.koleo_loss_weight=0",
    "ibot.mask_sample_probability=0",
    "student.drop_path_rate=0",
    # LayerScale 1 (demo.yaml: 1e-5) makes the images' outputs differ from the start, so that a statistic of one rank's
    # rows (a centre, a Sinkhorn-Knopp mass) differs from the statistic of all rows, and a missing reduction shows
    "student.layerscale=1.0",
]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")  # fmt: skip
TOLERANCE = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """48 synthetic 64 px blood-cell images (lists/train.txt)."""
    from dinov2.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), images_per_class=6, image_size=64, num_workers=0)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process trains alone, on one thread; the ranks are child processes."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    for _ in range(200):
        port = random.randrange(20000, 40000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _join_group(rank: int, port: int) -> None:
    """Set the torchrun variables of ``rank`` in this (child) process."""
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)


def _rank_main(rank: int, port: int, argv: list[str]) -> None:
    _join_group(rank, port)
    main(argv)


def _argv(output_dir: Path, dataset: Path, batch: int, *extra: str) -> list[str]:
    return ["--config-file", str(DEMO_CONFIG), "--output-dir", str(output_dir), f"train.dataset_path={dataset}", *TINY,
            f"train.batch_size_per_gpu={batch}", *extra]  # fmt: skip


def _train_two_ranks(output_dir: Path, dataset: Path, *extra: str) -> None:
    spawn_ranks(_rank_main, (_free_port(), _argv(output_dir, dataset, B, *extra)), WORLD)


def _train_one_rank(output_dir: Path, dataset: Path, *extra: str) -> None:
    main(_argv(output_dir, dataset, WORLD * B, *extra))


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "training_metrics.json").read_text().splitlines()]


def _teacher(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "eval" / f"training_{N_ITER - 1}" / "teacher_checkpoint.pth")["teacher"]


def _assert_same_losses(a: Path, b: Path) -> float:
    """Equal iterations and loss terms (to float tolerance); returns the largest difference."""
    ra, rb = _metrics(a), _metrics(b)
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb] == list(range(N_ITER))
    worst = 0.0
    for x, y in zip(ra, rb):
        losses = [k for k in x if k.endswith("_loss")]
        assert losses == [k for k in y if k.endswith("_loss")] and "dino_global_crops_loss" in losses
        for key in losses:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["iteration"], key)
            worst = max(worst, abs(x[key] - y[key]))
    return worst


def _assert_same_teacher(a: Path, b: Path) -> float:
    """Equal exported teachers (to float tolerance); returns the largest difference."""
    ta, tb = _teacher(a), _teacher(b)
    assert list(ta) == list(tb)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], **TOLERANCE, msg=key)
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


@pytest.fixture(scope="module")
def sinkhorn_runs(demo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same Sinkhorn-Knopp run on 1 rank (batch 2B) and on 2 ranks (batch B), uninterrupted."""
    root = tmp_path_factory.mktemp("sinkhorn")
    one, two = root / "one_rank", root / "two_ranks"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_one_rank(one, demo.lists_dir)
    finally:
        torch.set_num_threads(threads)
    _train_two_ranks(two, demo.lists_dir)
    return one, two


def test_two_ranks_equal_one_rank_with_sinkhorn_knopp(sinkhorn_runs: tuple[Path, Path]) -> None:
    one, two = sinkhorn_runs
    assert "8 images per step on 2 rank(s)" in (two / "log.txt").read_text()
    loss_diff = _assert_same_losses(one, two)
    teacher_diff = _assert_same_teacher(one, two)
    rankme = [[(r["iteration"], r["rankme"], r["rankme_crops"]) for r in _metrics(run) if "rankme" in r]
              for run in (one, two)]  # fmt: skip
    assert [(it, n) for it, _, n in rankme[0]] == [(it, n) for it, _, n in rankme[1]] == [(1, 32), (5, 32)]
    assert [v - 1 for _, v, _ in rankme[1]] == pytest.approx([v - 1 for _, v, _ in rankme[0]], rel=1e-3)
    print(f"sinkhorn_knopp: max |loss 1 rank - 2 ranks| {loss_diff:.2e}, max |teacher diff| {teacher_diff:.2e}")
    # The run learned something: the comparison is not between two untouched initialisations.
    initial = meta_arch.initial_student_state(load_config(one / "config.yaml"))
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(_teacher(one)[key], initial[key])


def test_two_ranks_equal_one_rank_with_softmax_centering(tmp_path: Path, demo) -> None:
    """Also runs the kNN monitor on the sharded teacher before and after training."""
    one, two = tmp_path / "one_rank", tmp_path / "two_ranks"
    _train_one_rank(one, demo.lists_dir, "train.centering=centering")
    _train_two_ranks(two, demo.lists_dir, "train.centering=centering", f"evaluation.knn_data={demo.images_dir}")
    loss_diff = _assert_same_losses(one, two)
    teacher_diff = _assert_same_teacher(one, two)
    print(f"centering: max |loss 1 rank - 2 ranks| {loss_diff:.2e}, max |teacher diff| {teacher_diff:.2e}")
    knn = json.loads((two / "knn_monitor.json").read_text())
    assert [(r["stage"], r["iteration"]) for r in knn] == [("initialisation", 0), ("end of training", N_ITER)]


def _interrupted_copy(run: Path, target: Path, keep_iteration: int) -> Path:
    """``run`` as it was when the checkpoint of ``keep_iteration`` was its newest (metrics past it left in)."""
    shutil.copytree(run, target)
    for folder in (target / "checkpoints").iterdir():
        if folder.is_dir() and int(folder.name) > keep_iteration:
            shutil.rmtree(folder)
    shutil.rmtree(target / "eval")
    return target


def test_two_rank_checkpoint_resumes_on_one_and_on_two_ranks(
    tmp_path: Path, demo, sinkhorn_runs: tuple[Path, Path]
) -> None:
    _, two = sinkhorn_runs
    on_one = _interrupted_copy(two, tmp_path / "resumed_on_one", keep_iteration=3)
    on_two = _interrupted_copy(two, tmp_path / "resumed_on_two", keep_iteration=3)
    _train_one_rank(on_one, demo.lists_dir)
    _train_two_ranks(on_two, demo.lists_dir)
    for resumed in (on_one, on_two):
        assert "resuming at iteration 4 from" in (resumed / "log.txt").read_text()
        _assert_same_losses(two, resumed)  # also: one record per iteration, none duplicated
        _assert_same_teacher(two, resumed)
    # Same ranks, same shards, same order of reductions: the resumed 2-rank run is the uninterrupted one, bit for bit.
    assert all(torch.equal(v, _teacher(on_two)[k]) for k, v in _teacher(two).items())


def _build_worker(rank: int, port: int, overrides: list[str], result_dir: str) -> None:
    """Build the training state on 2 ranks; rank 0 saves the full student and teacher, each rank its build calls."""
    _join_group(rank, port)
    info = distributed.enable_distributed(device="cpu")
    try:
        calls = []
        original = meta_arch.initial_student_state
        meta_arch.initial_student_state = lambda cfg: calls.append(rank) or original(cfg)
        cfg = apply_scaling_rules_to_cfg(load_config(DEMO_CONFIG, overrides), WORLD)
        model, _, _ = build_training_state(cfg, info.device)
        assert all(isinstance(p, DTensor) for p in model.parameters()), "the model is not sharded"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        student = get_model_state_dict(model.student, options=options)
        teacher = get_model_state_dict(model.teacher, options=options)
        torch.save({"calls": calls, "student": student, "teacher": teacher}, Path(result_dir) / f"rank{rank}.pt")
        distributed.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        distributed.destroy()


def _rank_recording_its_error(rank: int, port: int, argv: list[str], result_dir: str) -> None:
    """Run a training rank; write the error it ends with (its type and message, or "no error") to rank<N>.txt."""
    _join_group(rank, port)
    try:
        main(argv)
        outcome = "no error"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    (Path(result_dir) / f"rank{rank}.txt").write_text(outcome)


def test_an_output_folder_rank_0_cannot_take_stops_every_rank_with_the_error(tmp_path: Path, demo) -> None:
    """A folder rank 0 cannot lock (here `.lock` is a folder) ends every rank with a config error; the other rank
    does not wait for rank 0 at a collective or die of its closed connection."""
    out = tmp_path / "run"
    (out / ".lock").mkdir(parents=True)
    spawn_ranks(_rank_recording_its_error, (_free_port(), _argv(out, demo.lists_dir, B), str(tmp_path)), WORLD)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD))
    assert rank0.startswith(f"ConfigError: --output-dir (train.output_dir) {out}: Is a directory: {out / '.lock'}")
    assert rank1 == f"ConfigError: --output-dir {out} cannot be used (rank 0 says why)"


def test_a_start_from_weights_that_rank_0_cannot_read_stops_every_rank_with_its_error(tmp_path: Path, demo) -> None:
    """Rank 0 alone reads student.pretrained_weights: its error (a missing file, a file of another architecture)
    ends every rank, where the other rank died of its closed connection in the weights' broadcast."""
    missing = tmp_path / "absent.pth"
    argv = _argv(tmp_path / "run", demo.lists_dir, B, f"student.pretrained_weights={missing}")
    spawn_ranks(_rank_recording_its_error, (_free_port(), argv, str(tmp_path)), WORLD)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert outcomes == [f"CheckpointError: weights file not found: {missing}"] * WORLD


def test_sharded_start_from_a_backbone_file(tmp_path: Path, demo) -> None:
    """Rank 0 alone builds the initial weights (pretrained backbone included) and broadcasts them into the shards;
    the student, the teacher and the 1-rank build are the same."""
    torch.manual_seed(123)
    pretrained = DinoVisionTransformer(
        img_size=112, patch_size=14, embed_dim=64, depth=2, num_heads=1, init_values=1e-5
    )
    weights = tmp_path / "backbone.pth"
    torch.save(pretrained.state_dict(), weights)  # 8 x 8 patches: resized to the 4 x 4 of 56 px crops when loaded
    overrides = [*TINY, f"train.dataset_path={demo.lists_dir}", f"student.pretrained_weights={weights}",
                 f"train.batch_size_per_gpu={B}", "compute_precision.student.dino_head.sharding_strategy=NO_SHARD",
                 "compute_precision.teacher.dino_head.sharding_strategy=NO_SHARD"]  # fmt: skip
    spawn_ranks(_build_worker, (_free_port(), overrides, str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["calls"] == [0] and ranks[1]["calls"] == [], "a rank other than 0 built the full weights"

    expected = meta_arch.initial_student_state(load_config(DEMO_CONFIG, overrides))
    single_cfg = apply_scaling_rules_to_cfg(load_config(DEMO_CONFIG, overrides), 1)
    single, _, _ = build_training_state(single_cfg, torch.device("cpu"))
    built = {
        "2-rank student": ranks[0]["student"],
        "2-rank teacher": ranks[0]["teacher"],
        "1-rank student": single.student.state_dict(),
        "1-rank teacher": single.teacher.state_dict(),
    }
    for name, state in built.items():
        assert list(state) == list(expected), name
        unequal = [k for k in expected if not torch.equal(state[k], expected[k])]
        assert not unequal, f"{name}: {unequal}"
    file_state = pretrained.state_dict()
    for key, value in file_state.items():
        if key != "pos_embed":
            assert torch.equal(expected[f"backbone.{key}"], value), key
    assert expected["backbone.pos_embed"].shape == (1, 17, 64)


WRAPPER = '''
"""train.py, except that DCP's save of checkpoint folder {hang_in} hangs after writing its files."""
import os
import sys
import time
from pathlib import Path

import torch.distributed.checkpoint as dcp

from dinov2.train.train import main

# torchrun starts each rank in a session of its own: the test kills the ranks by these pids.
(Path(r"{pid_dir}") / f"rank{{os.environ['RANK']}}.pid").write_text(str(os.getpid()))

original_save = dcp.save


def save_then_hang(state_dict, *, checkpoint_id, **kwargs):
    result = original_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
    if Path(checkpoint_id).name == "{hang_in}":
        print("hanging in", checkpoint_id, flush=True)
        time.sleep(600)
    return result


dcp.save = save_then_hang
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_while_checkpointing_leaves_a_resumable_run(
    tmp_path: Path, demo, sinkhorn_runs: tuple[Path, Path]
) -> None:
    """Both ranks are killed after DCP wrote checkpoint 5's files, before it became a checkpoint; the same command
    then resumes from checkpoint 3 and ends where the uninterrupted run ended."""
    out = tmp_path / "run"
    wrapper = tmp_path / "hanging_train.py"
    wrapper.write_text(WRAPPER.format(hang_in="tmp-000000005", pid_dir=tmp_path))
    log_path = tmp_path / "torchrun.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    argv = _argv(out, demo.lists_dir, B, "train.checkpoint_period=2")
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
             str(wrapper), *argv],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        metadata = out / "checkpoints" / "tmp-000000005" / ".metadata"
        while not metadata.is_file():
            assert job.poll() is None, f"the run ended (status {job.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint 5 in time:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:  # the launcher and both ranks, as a dying node would
        os.killpg(job.pid, signal.SIGKILL)
        for pid_file in tmp_path.glob("rank*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        job.wait()
    assert find_latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "000000003"
    assert (out / "checkpoints" / "tmp-000000005").is_dir()
    assert [r["iteration"] for r in _metrics(out)] == list(range(6))

    _train_two_ranks(out, demo.lists_dir, "train.checkpoint_period=2")
    assert "resuming at iteration 4 from" in (out / "log.txt").read_text()
    assert not (out / "checkpoints" / "tmp-000000005").exists()  # the next save removed the leftover
    assert find_latest_checkpoint(out / "checkpoints") == out / "checkpoints" / f"{N_ITER - 1:09d}"
    _, uninterrupted = sinkhorn_runs
    _assert_same_losses(uninterrupted, out)
    _assert_same_teacher(uninterrupted, out)


def _uneven_sinkhorn_worker(rank: int, port: int, result_dir: str, compiled: bool) -> None:
    """One rank's Sinkhorn-Knopp targets for its rows of a shared set of logits (5 rows on rank 0, 3 on rank 1);
    ``compiled``: with the compiled passes that ``train.compile`` runs on CUDA, here on the CPU."""
    from dinov2.loss import DINOLoss, centering

    _join_group(rank, port)
    distributed.enable_distributed(device="cpu")
    try:
        logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        rows = logits[:5] if rank == 0 else logits[5:]
        loss = DINOLoss(16)
        if compiled:
            centering.compiled_sinkhorn_knopp_pays = lambda logits: True
            loss.compile_sinkhorn_knopp = True
        torch.save(loss.sinkhorn_knopp_teacher(rows, teacher_temp=0.1), Path(result_dir) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


@pytest.mark.parametrize("compiled", [False, True], ids=["stored", "compiled"])
def test_sinkhorn_knopp_over_ranks_with_unequal_rows_equals_one_rank(tmp_path: Path, compiled: bool) -> None:
    """A rank that dropped unreadable images holds fewer rows: the targets still equal those of all rows on 1 rank,
    also with the compiled passes, whose per-prototype sums are all-reduced between the compiled kernels."""
    from dinov2.loss import DINOLoss

    if compiled and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++ or c++), and none is on PATH")
    spawn_ranks(_uneven_sinkhorn_worker, (_free_port(), str(tmp_path), compiled), WORLD)
    two_ranks = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)])
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    one_rank = DINOLoss(16).sinkhorn_knopp_teacher(logits, teacher_temp=0.1)
    # The compiled passes fold the maximum and the prototype weights into one exponent: float32 rounding of 1e-5.
    torch.testing.assert_close(two_ranks, one_rank, rtol=0 if not compiled else 1e-5, atol=1e-7)
