"""What a run folder holds: a finished run, a checkpoint of this same run to resume, or nothing usable.

Shared by `runs` (which runs to reuse, which to train) and by `ray_runs`' tasks (each decides for
itself whether to resume, so a retried task continues), so neither of those imports the other's module.
"""

from __future__ import annotations

from pathlib import Path

from copra.core.config import TrainConfig
from copra.training.run_folder import RunResult, resume_point
from copra.utils.errors import UserError
from copra.utils.locks import FolderInUse, folder_lock


def run_state(config: TrainConfig, output_dir: str | Path) -> RunResult | bool:
    """The finished run in `output_dir`, else whether a checkpoint of this same run lets training resume.

    Files of another run (another config, a corrupt record) count as nothing: training starts over
    there and clears them.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return False
    try:
        with folder_lock(out):  # resume_point clears leftovers: not while another process trains there
            point = resume_point(out, config)
    except FolderInUse:
        raise
    except UserError:
        return False
    if isinstance(point, RunResult):
        point.adapter_dir = str(out / "adapter")  # where it is now, even if the results folder moved
        point.early_dir = str(out / "early") if point.early_dir else None
        return point
    return point is not None
