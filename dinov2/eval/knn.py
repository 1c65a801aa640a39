"""k-nearest-neighbour evaluation of frozen features, batched in torch on CPU or GPU.

DinoBloom ran ``sklearn.neighbors.KNeighborsClassifier(n_neighbors=k)`` with its
defaults: Euclidean distance, uniform votes, k = 1 and 20. ``knn_probabilities`` with
``metric="euclidean", weighting="uniform"`` reproduces scikit-learn's predictions
exactly, ties included, for features wider than 15 (every backbone's): there scikit-learn's
``predict`` runs a brute-force ``ArgKmin`` search (narrower features get a KD-tree, which
breaks ties its own way) and takes the ``mode`` of the neighbours' labels, so:

* distances are computed as scikit-learn does, ``(|x|^2 + (-2 x.y)) + |y|^2`` in float64;
* among equal vote counts the smaller class index wins;
* when several training samples tie across the k-th distance, the ones kept are those
  scikit-learn's fixed-size max-heap keeps (it only admits strictly smaller distances
  and may be split over OpenMP threads); such rows are rare and are replayed exactly.

The one residual difference: distances that are equal in exact arithmetic but differ in
the last bit inside scikit-learn's BLAS (e.g. duplicated training samples landing in
different GEMM tiles) can tie for one implementation and not for the other.

The query set is processed in chunks; memory is O(chunk x n_train), never n x n.
Options: cosine distance (``1 - cos``, ties again to the smaller index), and DINOv2's
temperature-weighted vote, as DINOv2's: the weights are the softmax of cosine similarity / T over the neighbours
of the largest k asked for, and each k sums the weights of its k nearest per class. (A softmax over the k alone
would scale the scores, not change the prediction.) It requires ``metric="cosine"``, which the command line picks
for it by default.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dinov2.cli import positive_float, positive_int
from dinov2.eval import protocol
from dinov2.logs import setup_logging

logger = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
WEIGHTINGS = ("uniform", "temperature")
# Neighbours kept beyond k_max, so that a tie across the k-th distance is seen.
_CANDIDATE_MARGIN = 1
# scikit-learn's defaults for its pairwise-distance reductions.
_SKLEARN_CHUNK = 256
_DBL_MAX = float(np.finfo(np.float64).max)


def _heap_push(values: list[float], indices: list[int], value: float, index: int) -> None:
    """Push onto a fixed-size max-heap exactly as scikit-learn's ``heap_push`` does (ties stay out)."""
    size = len(values)
    if value >= values[0]:
        return
    current = 0
    while True:
        left = 2 * current + 1
        right = left + 1
        if left >= size:
            break
        if right >= size:
            if values[left] > value:
                swap = left
            else:
                break
        elif values[left] >= values[right]:
            if value < values[left]:
                swap = left
            else:
                break
        elif value < values[right]:
            swap = right
        else:
            break
        values[current] = values[swap]
        indices[current] = indices[swap]
        current = swap
    values[current] = value
    indices[current] = index


def _replay_heap(distances: np.ndarray, k: int, start: int, stop: int) -> tuple[list[float], list[int]]:
    """The heap left after pushing training samples ``start..stop-1`` in order onto an empty heap.

    Only samples closer than the heap's current maximum change it; they are found vectorised.
    """
    values = [_DBL_MAX] * k
    indices = [-1] * k
    position = start
    while True:
        closer = np.flatnonzero(distances[position:stop] < values[0])
        if closer.size == 0:
            return values, indices
        position += int(closer[0])
        _heap_push(values, indices, float(distances[position]), position)
        position += 1


def _sklearn_heap_neighbours(distances: np.ndarray, k: int, n_queries: int, n_threads: int) -> np.ndarray:
    """The k neighbours scikit-learn's brute-force ``ArgKmin`` keeps for one query's distance row.

    Which of several samples tied at the k-th distance survive depends on the heap
    evictions and on how scikit-learn splits the training set over its OpenMP threads
    (its "parallel_on_Y" strategy when the query set is small), so both are replayed.
    """
    n_train = distances.shape[0]
    chunk = min(n_train, _SKLEARN_CHUNK)
    on_y = not (n_train < n_queries or 4 * _SKLEARN_CHUNK * n_threads < n_queries)
    if not on_y:
        return np.asarray(_replay_heap(distances, k, 0, n_train)[1], dtype=np.int64)
    n_chunks = -(-n_train // chunk)
    threads = min(n_chunks, n_threads)
    per_thread, extra = divmod(n_chunks, threads)
    values, indices = [_DBL_MAX] * k, [-1] * k
    first = 0
    for thread in range(threads):
        # OpenMP static schedule (libgomp): the first `extra` threads take one chunk more.
        count = per_thread + (thread < extra)
        thread_values, thread_indices = _replay_heap(distances, k, first * chunk, min((first + count) * chunk, n_train))
        for value, index in zip(thread_values, thread_indices):
            _heap_push(values, indices, value, index)
        first += count
    return np.asarray(indices, dtype=np.int64)


def _sklearn_n_threads() -> int:
    """The OpenMP thread count scikit-learn's neighbour search uses on this machine."""
    try:
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
    except ImportError:
        return os.cpu_count() or 1
    return int(_openmp_effective_n_threads())


def _neighbour_sets(
    queries: torch.Tensor,
    train64: torch.Tensor,
    train_unit: torch.Tensor,
    train_sq_norms: torch.Tensor,
    ks: Sequence[int],
    metric: str,
    n_queries: int,
    n_threads: int,
) -> dict[int, torch.Tensor]:
    """For each k, the indices (b, k) of the k nearest training samples of every query.

    ``train64`` is the training set in float64, ``train_unit`` its rows normalised and
    ``train_sq_norms`` its squared row norms. Distances are float64: scikit-learn's
    ``(|x|^2 + (-2 x.y)) + |y|^2`` (clipped at 0) for Euclidean, ``1 - cos`` for cosine. A row whose samples tie
    across the k-th distance is resolved on its full distance row: Euclidean replays scikit-learn's heap, cosine
    takes the smaller index (scikit-learn's cosine search leaves that order to ``np.argpartition``).
    """
    n_train = train64.shape[0]
    q64 = queries.to(torch.float64)
    if metric == "cosine":
        distances = 1.0 - torch.nn.functional.normalize(q64, dim=1) @ train_unit.T
    else:
        middle = -2.0 * (q64 @ train64.T)
        distances = ((q64.square().sum(1, keepdim=True) + middle) + train_sq_norms).clamp_min_(0.0)
    m = min(n_train, max(ks) + _CANDIDATE_MARGIN)
    nearest, index = torch.topk(distances, m, dim=1, largest=False)
    index, by_index = torch.sort(index, dim=1)
    nearest, order = torch.sort(torch.gather(nearest, 1, by_index), dim=1, stable=True)
    index = torch.gather(index, 1, order)

    result = {}
    for k in ks:
        result[k] = index[:, :k].clone()
        if k == n_train:
            continue
        # The k-th and (k+1)-th distances tie (k < m always holds here, m = min(n, k_max + margin)).
        for row in torch.nonzero(nearest[:, k] == nearest[:, k - 1]).flatten().tolist():
            row_distances = distances[row]
            if metric == "euclidean":
                chosen = _sklearn_heap_neighbours(row_distances.cpu().numpy(), k, n_queries, n_threads)
                result[k][row] = torch.as_tensor(chosen, device=index.device)
            else:
                result[k][row] = torch.sort(row_distances, stable=True).indices[:k]
    return result


def knn_probabilities(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 20),
    num_classes: int | None = None,
    metric: str = "euclidean",
    weighting: str = "uniform",
    temperature: float = 0.07,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    sklearn_threads: int | None = None,
) -> dict[int, np.ndarray]:
    """Class scores (n_test, num_classes) for each k; ``argmax`` (first maximum) is the prediction.

    Uniform weighting gives vote fractions (scikit-learn's ``predict_proba``); temperature
    weighting gives DINOv2's softmax(cos / T)-weighted class scores. ``sklearn_threads``
    (default: scikit-learn's OpenMP thread count here) only matters for samples tied
    across the k-th distance, whose choice in scikit-learn depends on its threading.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "temperature" and metric != "cosine":
        raise ValueError(
            f"temperature weighting is DINOv2's vote over the nearest neighbours by cosine similarity; it needs the "
            f"cosine metric, not {metric!r} (leave --metric out, or use --weighting uniform for {metric} neighbours)"
        )
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    train = torch.as_tensor(train_features).to(device)
    test = torch.as_tensor(test_features).to(device=device, dtype=train.dtype)
    labels = torch.as_tensor(train_labels, dtype=torch.int64).to(device)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be 2-D with equal widths, got {tuple(train.shape)} and {tuple(test.shape)}")
    if labels.shape != (train.shape[0],):
        raise ValueError(f"{labels.shape[0]} labels for {train.shape[0]} training features")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > train.shape[0]:
        raise ValueError(f"k must lie in [1, {train.shape[0]}] (the number of training images of this split or fold), "
                         f"got {ks}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"training labels must lie in [0, {num_classes}), found {labels.unique().tolist()}")

    if sklearn_threads is None:
        sklearn_threads = _sklearn_n_threads()
    train64 = train.to(torch.float64)
    train_sq_norms = train64.square().sum(1)
    train_unit = torch.nn.functional.normalize(train64, dim=1)
    scores = {k: torch.zeros(test.shape[0], num_classes, dtype=torch.float64, device=device) for k in ks}
    starts = range(0, test.shape[0], batch_size)
    for start in tqdm(starts, desc=f"kNN ({metric}, {weighting})", disable=not progress, leave=False):
        queries = test[start : start + batch_size]
        neighbours = _neighbour_sets(
            queries, train64, train_unit, train_sq_norms, ks, metric, test.shape[0], sklearn_threads
        )
        if weighting == "temperature":
            q_unit = torch.nn.functional.normalize(queries.to(torch.float64), dim=1)
            # The softmax's normaliser runs over the neighbours of the largest k, for every k (DINOv2's scores).
            log_norm = torch.logsumexp(_similarities(q_unit, train_unit, neighbours[ks[-1]]) / temperature, dim=1)
        for k, nearest in neighbours.items():
            one_hot = torch.nn.functional.one_hot(labels[nearest], num_classes).to(torch.float64)
            if weighting == "uniform":
                votes = one_hot.sum(1) / k
            else:
                weights = torch.exp(_similarities(q_unit, train_unit, nearest) / temperature - log_norm[:, None])
                votes = (one_hot * weights[..., None]).sum(1)
            scores[k][start : start + queries.shape[0]] = votes
    return {k: v.cpu().numpy() for k, v in scores.items()}


def _similarities(queries_unit: torch.Tensor, train_unit: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query (unit rows) to its neighbours ``nearest`` (query x k indices)."""
    return torch.einsum("bd,bkd->bk", queries_unit, train_unit[nearest])


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m dinov2.eval.knn``."""
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.knn",
        description="k-NN evaluation of a features file: 5-fold stratified CV, or train/test with --test-features.",
    )
    protocol.add_common_arguments(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20], help="neighbour counts (default: 1 20)")
    parser.add_argument(
        "--metric", choices=METRICS, default=None,
        help="distance (default: set by --weighting: euclidean for uniform votes, cosine for temperature)",
    )
    parser.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="uniform",
        help="uniform votes (sklearn, DinoBloom) or DINOv2's softmax(cos/T) weights",
    )
    parser.add_argument("--temperature", type=positive_float, default=0.07,
                        help="T of temperature weighting (default 0.07)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="queries per chunk (default 256)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the kNN protocol and write results.json, results.md and figures to --output-dir."""
    parser = build_parser()
    args = protocol.parse_args_with_config(parser, argv)
    setup_logging()
    device = protocol.resolve_device(args.device)
    metric = args.metric or ("cosine" if args.weighting == "temperature" else "euclidean")

    def predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int) -> dict:
        scores = knn_probabilities(
            train_x,
            train_y,
            test_x,
            ks=args.k,
            num_classes=num_classes,
            metric=metric,
            weighting=args.weighting,
            temperature=args.temperature,
            batch_size=args.batch_size,
            device=device,
            progress=True,
        )
        return {f"knn_{k}": s for k, s in scores.items()}

    settings = {
        "k": sorted(set(args.k)),
        "metric": metric,
        "weighting": args.weighting,
        "temperature": args.temperature if args.weighting == "temperature" else None,
    }
    results = protocol.run_cli_protocol(args, predict, settings)
    print(Path(args.output_dir) / "results.json")
    return results


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
