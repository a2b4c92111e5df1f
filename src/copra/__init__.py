"""copra: CopRA (Cooperative LoRA), a progressive, randomly gated LoRA training strategy.

Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024). Each LoRA layer is switched on
per optimizer step with probability p(t) = min(4t/3T, 1); the adapters that come out merge, prune
and share credit (Shapley values) better than plain LoRA's. docs/architecture.md has the layers,
docs/paper-map.md where each idea of the paper lives.

The public surface is `__all__`. Names that pull in heavy machinery (transformers' Trainer, the
training loop) are imported on first use, so `import copra` and `copra --help` stay fast.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from copra.adapters import merge
from copra.analysis import shapley, stats
from copra.core.gates import CopRA
from copra.core.schedule import GateSchedule, keep_probability
from copra.utils.errors import UserError

try:
    __version__ = version("copra-lora")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# Module paths that earlier releases of the docs published (`copra.merge.fusion`, `copra.shapley.multilinear`,
# `copra.stats.compare`): each is the one module of that name, registered under its short path as well.
for _module in (merge, shapley, stats):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module

_LAZY = {
    "CopRACallback": "copra.core.callback",
    "TrainConfig": "copra.core.config",
    "load_config": "copra.core.config",
    "train": "copra.training.loop",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'copra' has no attribute {name!r}")


__all__ = [
    "CopRA",
    "CopRACallback",
    "GateSchedule",
    "TrainConfig",
    "UserError",
    "__version__",
    "keep_probability",
    "load_config",
    "merge",
    "shapley",
    "stats",
    "train",
]
