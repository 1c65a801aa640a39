"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

DinoBloom ran ``sklearn.linear_model.LogisticRegression(C=C, max_iter=1000, multi_class="multinomial",
solver="lbfgs")`` with ``C = dim * classes / 100`` (classes of the training split), i.e. an L2
coefficient of ``100 / (dim * classes)``. scikit-learn minimises

    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2      (the bias is not penalised),

which has the same minimiser as ``mean_i CE + ||W||^2 / (2 C N)``; the torch backend
minimises the latter with full-batch L-BFGS (strong Wolfe line search) in float64 on any
device. With two classes both backends fit one logit vector (binomial loss; scikit-learn no
longer offers ``multi_class``), with ``2 C``: the two-row multinomial model DinoBloom fitted
has the same minimiser (its rows end up opposite, so its penalty is half the binomial one).
Both backends fit only the classes present in the training split; absent classes get
probability 0.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2.cli import non_negative_float, positive_float, positive_int
from dinov2.eval import protocol
from dinov2.logs import setup_logging

logger = logging.getLogger(__name__)

BACKENDS = ("sklearn", "torch")


def dinobloom_c(dim: int, num_classes: int) -> float:
    """DinoBloom's inverse regularisation strength ``C = dim * classes / 100``."""
    return dim * num_classes / 100.0


def _expand(probabilities: np.ndarray, present: np.ndarray, num_classes: int) -> np.ndarray:
    """Place the columns of the classes fitted into a (n, num_classes) array."""
    full = np.zeros((probabilities.shape[0], num_classes), dtype=np.float64)
    full[:, present] = probabilities
    return full


def _fitted_c(C: float | None, dim: int, present: np.ndarray) -> float:
    """The C of the fit: DinoBloom's multinomial C (default ``dim * classes / 100``), doubled for a binomial fit."""
    if C is not None and not C > 0:  # also rejects NaN
        raise ValueError(f"C must be > 0 (the inverse L2 strength), got {C}")
    C = dinobloom_c(dim, present.size) if C is None else C
    return 2.0 * C if present.size == 2 else C


def logreg_sklearn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    C: float | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> np.ndarray:
    """Class probabilities (n_test, num_classes) from scikit-learn's LogisticRegression (lbfgs).

    ``C`` is DinoBloom's multinomial C (default ``dim * classes / 100``); see the module docstring for two classes.
    The fit runs in float64, as DinoBloom's did (its features reached scikit-learn as Python lists): scikit-learn
    keeps float32 input in float32, and an L-BFGS that stops at ``max_iter`` then predicts some cells differently.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    present = protocol.require_two_classes(train_y, where=" in the training set")
    model = LogisticRegression(C=_fitted_c(C, train_x.shape[1], present), max_iter=max_iter, tol=tol, solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train_x, train_y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("scikit-learn L-BFGS stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    probabilities = model.predict_proba(test_x)
    if len(test_x) > 1 and np.unique(probabilities.argmax(axis=1)).size == 1:
        logger.warning(
            "the logistic probe predicts one class for all %d test samples: features that barely vary (standard "
            "deviation %.1e; a model that has barely trained?) leave it the class frequencies, a chance-level score",
            len(test_x), float(train_x.std(axis=0).mean()),
        )
    return _expand(probabilities, present, num_classes)


def fit_logreg_torch(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    C: float,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit weights (K', D) and bias (K') by full-batch L-BFGS; K' = classes - 1 for two classes, else K.

    Labels must be 0..K-1 (all present). The objective is mean cross-entropy plus
    ``||W||^2 / (2 C N)``; L-BFGS stops when the largest gradient entry is below ``tol``
    (scikit-learn's criterion on the same, mean-scaled, objective).
    """
    x = torch.as_tensor(train_x).to(device=device, dtype=torch.float64)
    y = torch.as_tensor(train_y, dtype=torch.int64).to(device)
    num_classes = int(y.max()) + 1
    binary = num_classes == 2
    rows = 1 if binary else num_classes
    weight = torch.zeros(rows, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(rows, dtype=torch.float64, device=device, requires_grad=True)
    l2 = 1.0 / (C * x.shape[0])
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = _logits(x, weight, bias, binary)
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[weight]["n_iter"]
    if iterations >= max_iter:
        logger.warning("torch L-BFGS stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    return weight.detach(), bias.detach()


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, binary: bool) -> torch.Tensor:
    """Class logits; in the binary case the first class's logit is fixed at 0."""
    z = x @ weight.T + bias
    return torch.cat([torch.zeros_like(z), z], dim=1) if binary else z


def logreg_torch(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    C: float | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class probabilities (n_test, num_classes) from the torch L-BFGS fit of scikit-learn's objective."""
    present = protocol.require_two_classes(train_y, where=" in the training set")
    dense_y = np.searchsorted(present, train_y)
    weight, bias = fit_logreg_torch(train_x, dense_y, _fitted_c(C, train_x.shape[1], present), max_iter, tol, device)
    x = torch.as_tensor(test_x).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        probabilities = torch.softmax(_logits(x, weight, bias, present.size == 2), dim=1)
    return _expand(probabilities.cpu().numpy(), present, num_classes)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m dinov2.eval.linear``."""
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.linear",
        description="Logistic-regression probe of a features file: 5-fold stratified CV, or --test-features.",
    )
    protocol.add_common_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="sklearn", help="sklearn (DinoBloom) or torch (GPU)")
    parser.add_argument("--C", type=positive_float, default=None,
                        help="inverse L2 strength of the multinomial model (default: dim * classes / 100)")
    parser.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations (default 1000)")
    parser.add_argument("--tol", type=non_negative_float, default=1e-4,
                        help="gradient tolerance (default 1e-4, sklearn's)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the linear-probe protocol and write results.json, results.md and figures to --output-dir."""
    parser = build_parser()
    args = protocol.parse_args_with_config(parser, argv)
    setup_logging()
    device = protocol.resolve_device(args.device)

    def predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int) -> dict:
        if args.backend == "sklearn":
            return {"logreg": logreg_sklearn(train_x, train_y, test_x, num_classes, args.C, args.max_iter, args.tol)}
        return {"logreg": logreg_torch(train_x, train_y, test_x, num_classes, args.C, args.max_iter, args.tol, device)}

    settings = {
        "backend": args.backend,
        "C": args.C if args.C is not None else "dim * classes / 100",
        "max_iter": args.max_iter,
        "tol": args.tol,
    }
    results = protocol.run_cli_protocol(args, predict, settings)
    print(Path(args.output_dir) / "results.json")
    return results


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
