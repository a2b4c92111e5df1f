"""Experiment tracking for copra's training loop through Accelerate's trackers (`TrainConfig.report_to`).

Each optimizer step t logs, at step t (0-based, the step the gates were drawn for):

    train/loss              the step's training loss (mean over its micro-batches)
    train/lr                the lr the step ran with
    copra/keep_probability  p(t) of the run's GateSchedule (1 for LoRA: every adapter on)
    copra/active_fraction   the fraction of players the step's gates kept on (1 for LoRA)

and the run config once, as hyperparameters. TensorBoard writes its event files into
`output_dir/logs/copra`; MLflow uses `output_dir/logs` as the experiment's artifact location and logs
the metrics to its own tracking URI (`MLFLOW_TRACKING_URI`, else MLflow's default). Only the main
process logs (Accelerate's trackers are main-process only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from copra.core.config import TrainConfig
from copra.training.run_folder import LOGS_DIR
from copra.utils.errors import UserError

PROJECT = "copra"  # TensorBoard's folder under logs/, MLflow's experiment name


def check_tracker(report_to: str, out: Path | None) -> None:
    """UserError before any work if `report_to` cannot log: no output folder, or its package missing.

    Accelerate itself would only skip a tracker whose package is missing (a debug message), so a run
    asked to log would log nothing without saying so."""
    if report_to == "none":
        return
    if out is None:
        raise UserError(f"report_to={report_to} logs into the run's output folder; give the run one")
    from accelerate.utils import is_mlflow_available, is_tensorboard_available

    available = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available}[report_to]
    if not available():
        raise UserError(f"report_to={report_to} needs the {report_to} package: pip install {report_to}")


def accelerator_options(report_to: str, out: Path | None) -> dict[str, Any]:
    """The `Accelerator(...)` keywords that make it log to `report_to` under `out/logs` ({} for none)."""
    if report_to == "none" or out is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": report_to,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS_DIR)),
    }


def start_tracking(accelerator, config: TrainConfig) -> None:
    """Open the trackers (after the run folder is cleared) and record the run config as hyperparameters."""
    if not accelerator.log_with:
        return
    run_name = f"{config.method}-{config.task}-seed{config.seed}"
    accelerator.init_trackers(PROJECT, config=hyperparameters(config), init_kwargs={"mlflow": {"run_name": run_name}})


def hyperparameters(config: TrainConfig) -> dict[str, bool | int | float | str]:
    """The run config as trackers take it: scalars as they are, lists joined, None as "null"."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        flat[key] = "null" if value is None else value
    return flat


def log_step(accelerator, step: int, loss: float, lr: float, keep_probability: float, active: float) -> None:
    """One optimizer step's values, at `step` (see the module docstring)."""
    if accelerator.log_with:
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "copra/keep_probability": keep_probability,
            "copra/active_fraction": active,
        }
        accelerator.log(values, step=step)


def end_tracking(accelerator) -> None:
    """Close every tracker (TensorBoard's writer flushes; MLflow's run ends).

    Not `accelerator.end_training()`: it also destroys the process group, which a distributed launch
    still needs for its next run."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
