"""Experiment trackers (`report_to`): each one the library's own Lightning logger, behind one small
interface the monitor (train/monitor.py) drives on rank 0: open with the resolved configuration,
log each metrics.jsonl record at its step, close with the run's outcome.

tensorboard and csv are lightning.fabric's loggers; wandb and mlflow are Lightning's WandbLogger and
MLFlowLogger, which need only their `log_*` calls (no Trainer) and so work under Fabric too; swanlab
is SwanLab's own Lightning logger (swanlab 0.5.x: its later releases pin protobuf < 7, which the
other trackers' packages outgrew).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

# tracker -> (the package it imports, how to install it: wandb and mlflow are bumblecore's extras)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'bumblecore[wandb]'"),
    "mlflow": ("mlflow", "pip install 'bumblecore[mlflow]'"),
    "swanlab": ("swanlab", "pip install 'bumblecore[swanlab]'"),
}
# The scalars the TensorBoard HParams table shows beside the configuration.
HPARAMS_METRICS = ("train/loss", "eval/loss")


def check_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is missing, naming the extra, before the run writes anything."""
    import importlib

    for name in names:
        if name not in PACKAGES:
            continue
        package, install = PACKAGES[name]
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(f"report_to {name}: the {package} package is not installed; {install}") from None


def tracker_key(key: str) -> str:
    """metrics.jsonl's `loss` is `train/loss` in a tracker (grouped like `eval/loss`); `loss/<source>` stays."""
    return key if "/" in key else f"train/{key}"


def scalars(record: dict) -> dict:
    """The record's finite numbers under their tracker names (a skipped non-finite step stays in metrics.jsonl)."""
    return {
        tracker_key(key): float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
    }


def _tensorboard(output_dir: Path, run_name: str, project: str, resume_step: Optional[int]):
    from lightning.fabric.loggers import TensorBoardLogger

    # A resumed run drops the events after its checkpoint, as metrics.jsonl drops those lines.
    purge = {} if resume_step is None else {"purge_step": resume_step + 1}
    return TensorBoardLogger(output_dir, name="runs", version="", default_hp_metric=False, **purge)


def _csv(output_dir: Path, run_name: str, project: str, resume_step: Optional[int]):
    from lightning.fabric.loggers import CSVLogger

    # One file per attempt: a resumed run's rows (after its checkpoint) go beside the first attempt's.
    version = "" if resume_step is None else f"resumed_at_step_{resume_step}"
    return CSVLogger(output_dir, name="csv", version=version, flush_logs_every_n_steps=1)


def _wandb(output_dir: Path, run_name: str, project: str, resume_step: Optional[int]):
    from lightning.pytorch.loggers import WandbLogger

    # WANDB_MODE (offline, disabled) and WANDB_DIR are wandb's own; the run files default to output_dir.
    return WandbLogger(name=run_name, project=project, save_dir=os.environ.get("WANDB_DIR") or str(output_dir))


def _mlflow(output_dir: Path, run_name: str, project: str, resume_step: Optional[int]):
    from lightning.pytorch.loggers import MLFlowLogger

    # MLFLOW_TRACKING_URI (a server, a database) when set; else a database in output_dir.
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    return MLFlowLogger(experiment_name=project, run_name=run_name, tracking_uri=tracking_uri)


def _swanlab(output_dir: Path, run_name: str, project: str, resume_step: Optional[int]):
    from swanlab.integration.pytorch_lightning import SwanLabLogger

    # SWANLAB_MODE (cloud, local, disabled) is swanlab's own. A local run's files go to output_dir/swanlog
    # (not SWANLAB_LOG_DIR: swanlab sets it to the first run's directory for the rest of the process).
    return SwanLabLogger(project=project, experiment_name=run_name, logdir=str(output_dir / "swanlog"))


OPEN = {"tensorboard": _tensorboard, "csv": _csv, "wandb": _wandb, "mlflow": _mlflow, "swanlab": _swanlab}


class Trackers:
    """The run's trackers, opened on rank 0 only (the monitor is disabled elsewhere)."""

    def __init__(
        self,
        names: list[str],
        output_dir,
        hyperparameters: dict,
        run_name: Optional[str] = None,
        project: str = "bumblecore",
        resume_step: Optional[int] = None,
    ):
        output_dir = Path(output_dir)
        run_name = run_name or output_dir.resolve().name
        self.loggers = {}
        try:
            for name in names:  # each logger starts its run at its first call (W&B: wandb.init)
                logger = self.loggers[name] = OPEN[name](output_dir, run_name, project, resume_step)
                if name == "tensorboard":
                    self._tensorboard_hparams(logger, hyperparameters)
                elif name != "csv":  # csv: the configuration is training_args.yaml, beside it
                    logger.log_hyperparams(hyperparameters)
        except BaseException:  # say, W&B without a login: the trackers opened so far do not stay open
            self.close("failed")
            raise

    @staticmethod
    def _tensorboard_hparams(logger, hyperparameters: dict) -> None:
        """The configuration in TensorBoard's HParams table, linked to the run's loss curves. (Lightning's
        log_hyperparams would also log a placeholder `hp_metric` scalar; this writes the same summary without it.)"""
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()}
        for summary in hparams(params, dict.fromkeys(HPARAMS_METRICS, 0.0)):  # the values are not written
            logger.experiment.file_writer.add_summary(summary)

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            for logger in self.loggers.values():
                logger.log_metrics(values, step=record["step"])

    def close(self, status: str = "success") -> None:
        """status: success, failed (an error) or killed (an interrupt): the run's state where the tracker has one."""
        loggers, self.loggers = self.loggers, {}
        for name, logger in loggers.items():
            if name == "wandb":  # WandbLogger.finalize leaves the run open (wandb finishes it at exit)
                logger.experiment.finish(exit_code=0 if status == "success" else 1)
            elif name == "mlflow":
                logger.finalize({"success": "success", "failed": "failed", "killed": "KILLED"}[status])
            elif name == "swanlab":  # SwanLabLogger.finalize leaves the run open, as W&B's does
                import swanlab

                if swanlab.get_run() is not None:
                    crashed = (swanlab.State.CRASHED, f"the run {status}")
                    swanlab.finish(*((swanlab.State.SUCCESS, None) if status == "success" else crashed))
            else:
                logger.finalize(status)
