"""Where the training metrics go: ``training_metrics.json`` always, TensorBoard and Weights & Biases when asked.

Only rank 0 writes. TensorBoard and W&B are imported only when the config switches them on
(``tracking.tensorboard``, ``tracking.wandb``), so neither is needed otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from dinov2.configs import ConfigError
from dinov2.files import atomic_write_text

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"


def _iteration_of(line: str, path: Path) -> float:
    """The iteration of one line of ``training_metrics.json``; inf for a blank or unreadable line (a killed write)."""
    try:
        return json.loads(line)["iteration"] if line.strip() else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        logger.warning("%s: dropping an unreadable line (a write cut short?): %.80r", path, line)
        return math.inf


class Tracker(Protocol):
    """A destination of metric records (``{"iteration": int, name: number, ...}``)."""

    def log(self, record: dict[str, Any]) -> None:
        """Send one record."""

    def close(self, failed: bool) -> None:
        """Flush and release; ``failed`` when the run ends with an error."""


class MetricsFile:
    """One JSON line per record in ``training_metrics.json``."""

    def __init__(self, path: Path, start_iteration: int) -> None:
        self.path = path
        if path.exists():
            # Drop records past the checkpoint being resumed, so the file tells one consistent story.
            kept = [line for line in path.read_text().splitlines() if _iteration_of(line, path) < start_iteration]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, failed: bool) -> None:
        """Nothing to release: every record is written when it is logged."""


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a record, without its iteration."""
    return {
        k: float(v) for k, v in record.items()
        if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardTracker:
    """Scalars in ``<output-dir>/tensorboard``; a resumed run hides the events logged after its checkpoint."""

    def __init__(self, log_dir: Path, start_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_iteration or None)

    def log(self, record: dict[str, Any]) -> None:
        """One scalar per numeric entry, at step ``record["iteration"]``."""
        for name, value in _scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["iteration"]))

    def close(self, failed: bool) -> None:
        """Flush the event file."""
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run; a resumed training continues the same run (its id is kept in the output folder)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, start_iteration: int) -> None:
        import wandb

        id_file = output_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if start_iteration > 0 and id_file.is_file() else None
        run_id = run_id or secrets.token_hex(4)
        settings = cfg.tracking
        try:
            self.run = wandb.init(
                project=settings.wandb_project,
                entity=settings.wandb_entity or None,
                name=settings.wandb_name or output_dir.name,
                id=run_id,
                resume="allow",
                dir=str(output_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                allow_val_change=True,  # a resumed run may change settings (they are listed in the log)
            )
        except Exception as err:  # wandb raises several types (no login, no network, bad entity)
            raise ConfigError(
                f"tracking.wandb=true: could not start a W&B run ({type(err).__name__}: {err}); log in with "
                "`wandb login`, or set WANDB_MODE=offline to log locally and `wandb sync` later"
            ) from err
        id_file.write_text(run_id + "\n")
        logger.info("W&B run %s (project %s)", run_id, settings.wandb_project)

    def log(self, record: dict[str, Any]) -> None:
        """Log the numeric entries at step ``record["iteration"]``, unless a run before the resume already did."""
        step = int(record["iteration"])
        if step < self.run.step:  # logged before the checkpoint was resumed; W&B refuses steps that go back
            return
        self.run.log(_scalars(record), step=step)

    def close(self, failed: bool) -> None:
        """Finish the run (marked failed when the training ended with an error)."""
        self.run.finish(exit_code=1 if failed else 0)


def check_tracking(cfg: DictConfig) -> None:
    """Fail early, with the command that fixes it, when a tracker the config asks for is not installed."""
    for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if cfg.tracking[key] and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"tracking.{key}=true needs the {module} package: pip install {module} "
                "(or pip install -e '.[tracking]')"
            )


class MetricsLog:
    """Every metric record of a run, sent to each of its trackers (rank 0); the other ranks send nothing."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def from_config(cls, cfg: DictConfig, output_dir: Path, is_main: bool, start_iteration: int) -> MetricsLog:
        """The JSON-lines file plus the trackers that ``cfg.tracking`` switches on (none but on the main process)."""
        if not is_main:
            return cls([])
        trackers: list[Tracker] = [MetricsFile(output_dir / "training_metrics.json", start_iteration)]
        if cfg.tracking.tensorboard:
            trackers.append(TensorBoardTracker(output_dir / TENSORBOARD_DIR, start_iteration))
        if cfg.tracking.wandb:
            trackers.append(WandbTracker(cfg, output_dir, start_iteration))
        return cls(trackers)

    def log(self, record: dict[str, Any], *, to_file: bool = True) -> None:
        """Send ``record`` to every tracker (``to_file=False``: not to ``training_metrics.json``)."""
        for tracker in self.trackers:
            if to_file or not isinstance(tracker, MetricsFile):
                tracker.log(record)

    def close(self, failed: bool = False) -> None:
        """Close every tracker."""
        for tracker in self.trackers:
            tracker.close(failed)
