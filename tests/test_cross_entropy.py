"""The students' cross-entropy (DINO and iBOT losses): its hand-written backward against autograd's."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from dinov2.loss.cross_entropy import SoftCrossEntropy


def _composed(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """The same quantity from autograd's primitives, in float64."""
    return torch.sum(teacher.double() * F.log_softmax(student.double() / temp, dim=-1), dim=-1)


def _inputs(rows: int, prototypes: int, seed: int, teachers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.rand(rows, prototypes, generator=generator, dtype=torch.float64) - 1
    shape = (rows, prototypes) if teachers is None else (teachers, rows, prototypes)
    teacher = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64) / 0.3, dim=-1)
    return student, teacher


@pytest.mark.parametrize("teachers", [None, 2], ids=["one teacher", "two stacked teachers"])
def test_backward_passes_gradcheck(teachers: int | None) -> None:
    student, teacher = _inputs(5, 7, seed=0, teachers=teachers)
    teacher = teacher * 1.3  # rows that do not sum to 1: the backward must not assume they do
    student.requires_grad_()
    loss = SoftCrossEntropy()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, 0.1), (student,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teachers", [None, 2], ids=["one teacher", "two stacked teachers"])
def test_matches_autograd_in_each_dtype(dtype: torch.dtype, teachers: int | None) -> None:
    """Values and gradients equal float64 autograd's; gradients come back in the scores' dtype."""
    student64, teacher64 = _inputs(40, 4096, seed=1, teachers=teachers)
    weights = torch.rand(teacher64.shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    student = student64.to(dtype).requires_grad_()
    teacher = teacher64.float()

    value = SoftCrossEntropy()(student, teacher, 0.1)
    (value * weights.float()).sum().backward()

    reference_student = student.detach().double().requires_grad_()  # the rounded scores the function saw
    expected = _composed(reference_student, teacher, 0.1)
    (expected * weights).sum().backward()
    assert value.dtype == torch.float32 and student.grad.dtype == dtype
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    # float32: t - p * sum(t) cancels where the student already matches, so the error is relative to the
    # largest gradient (autograd's own float32 version is 8e-8 to 1e-7 off); bf16 adds its rounding (2^-9).
    atol = 2e-7 * reference_student.grad.abs().max().item()
    rtol = 0.0 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(student.grad.double(), reference_student.grad, rtol=rtol, atol=atol)


def test_same_result_under_autocast() -> None:
    student64, teacher64 = _inputs(16, 512, seed=3)
    results = []
    for autocast in (False, True):
        student = student64.to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = SoftCrossEntropy()(student, teacher64.float(), 0.1)
            value.sum().backward()
        results.append((value, student.grad))
    assert results[1][0].dtype == torch.float32
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_no_rows() -> None:
    student = torch.zeros(0, 64, requires_grad=True)
    value = SoftCrossEntropy()(student, torch.zeros(0, 64), 0.1)
    value.sum().backward()
    assert value.shape == (0,) and student.grad.shape == (0, 64)


def test_teacher_with_gradient_is_refused() -> None:
    student, teacher = _inputs(3, 8, seed=4)
    with pytest.raises(ValueError, match="must not require grad"):
        SoftCrossEntropy()(student, teacher.requires_grad_(), 0.1)


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compiled"])
def test_loss_benchmark_smoke(
    capsys: pytest.CaptureFixture, load_script: Callable[[str], ModuleType], compile_flag: list[str]
) -> None:
    if compile_flag and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++ or c++), and none is on PATH")
    script = load_script("benchmark_loss")
    masks = script.random_masks(tokens=37, crops=3, seed=0)
    assert masks.shape == (3, 256) and int(masks.sum()) == 37
    args = ["--tokens", "37", "--crops", "3", "--prototypes", "64", "--warmup", "1", "--iters", "2", *compile_flag]
    results = script.main(args)
    assert set(results) == {"sinkhorn", "cross_entropy", "step"} and all(v > 0 for v in results.values())
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("ms_per_step=") and "sinkhorn_ms=" in last_line and "cross_entropy_ms=" in last_line


def test_gpu_operation_order_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU half-precision scores are upcast inside the division (and Sinkhorn-Knopp's subtraction); run that
    path here on the CPU: values, gradients and targets must equal the CPU path's bit for bit."""
    import dinov2.loss.cross_entropy as cross_entropy
    import dinov2.loss.centering as centering

    student64, teacher64 = _inputs(24, 1024, seed=5)
    results = []
    for gpu_order in (False, True):
        monkeypatch.setattr(cross_entropy, "fuses_mixed_dtypes", lambda x: gpu_order)
        monkeypatch.setattr(centering, "fuses_mixed_dtypes", lambda x: gpu_order)
        student = student64.to(torch.bfloat16).requires_grad_()
        targets = centering.sinkhorn_knopp(teacher64.to(torch.bfloat16), 0.07, n_samples=24)
        value = SoftCrossEntropy()(student, targets, 0.1)
        value.sum().backward()
        results.append((targets, value, student.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
