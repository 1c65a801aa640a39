"""Shared test fixtures: the location of ../shared and small helpers."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import dinov2  # noqa: F401, I001  before torch, as in the commands: it sets OpenMP's wait policy

import torch  # noqa: E402, I001
import torch.multiprocessing as mp  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DINOBLOOM_SHARED", REPO_ROOT.parent / "shared"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set DINOBLOOM_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The reference DINOv2 / DinoBloom outputs in ../shared/conformance."""
    return _require(SHARED_DIR / "conformance", "conformance fixtures")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real labelled blood-cell images in ../shared/data."""
    return _require(SHARED_DIR / "data", "real blood-cell images")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """A loader of ``scripts/<name>.py`` as a module (the scripts are not a package)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def spawn_ranks(worker: Callable[..., None], args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing`` processes running ``worker(rank, *args)``, each leaving without the interpreter's
    teardown once its worker has returned: in about one of forty runs of these tests, a worker aborted there
    (SIGABRT, "terminate called without an active exception") after its work, barrier and ``destroy_process_group``
    had passed, a C++ thread of PyTorch's distributed back end torn down with the interpreter (as in
    pytorch/pytorch#179291). A worker's exception still fails the test with its traceback."""
    mp.start_processes(_run_then_leave, args=(worker, *args), nprocs=nprocs, start_method="spawn")


def _run_then_leave(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """``worker(rank, *args)``, then the process ends at once, its output flushed (see :func:`spawn_ranks`)."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
