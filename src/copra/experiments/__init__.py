"""One module per paper experiment family, each with one shape (`Experiment`).

A module holds a config dataclass (one `#:` comment per field: `--help` and the docs show them),
`run(config) -> dict` (writes its JSON, Markdown and PNG through `runner.common.write_outputs`, the one
shared ending) and `render(summary) -> str`. `EXPERIMENTS` maps the CLI name to a loader returning its
`Experiment`, imported lazily so `copra --help` stays fast. The `run` it returns holds the lock of
`config.output_dir` (`copra.utils.locks`) for the whole experiment: the CLI and the suite both go through it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple


class Experiment(NamedTuple):
    """What the CLI, the suite and the report need of an experiment."""

    config: type  # its config dataclass
    run: Callable[[Any], dict]  # run(config) -> summary, holding the output folder's lock
    render: Callable[[dict], str]  # render(summary) -> Markdown


def _loader(module: str, config_class: str) -> Callable[[], Experiment]:
    def load() -> Experiment:
        loaded = importlib.import_module(f"copra.experiments.{module}")
        return Experiment(getattr(loaded, config_class), locked(loaded.run), loaded.render)

    return load


def locked(run: Callable) -> Callable:
    """`run(config)` holding the lock of `config.output_dir` (FolderInUse if another process has it)."""

    @functools.wraps(run)
    def run_locked(config, *args, **kwargs):
        from copra.utils.locks import folder_lock

        with folder_lock(config.output_dir):
            return run(config, *args, **kwargs)

    return run_locked


EXPERIMENTS: dict[str, Callable[[], Experiment]] = {
    "landscape": _loader("landscape", "LandscapeConfig"),
    "federated": _loader("federated", "FederatedConfig"),
    "multitask": _loader("multitask", "MultitaskConfig"),
    "pruning": _loader("pruning", "PruningConfig"),
    "shapley": _loader("shapley_layers", "ShapleyConfig"),
    "sweep": _loader("sweep", "SweepConfig"),
    "lr_select": _loader("lr_select", "LrSelectConfig"),
    "merge_map": _loader("merge_map", "MergeMapConfig"),
    "merge_protocol": _loader("merge_protocol", "MergeProtocolConfig"),
}
# what each one is, for `copra --help`
SUMMARIES = {
    "landscape": "paper Fig. 3: accuracy along the merge of two seeds' adapters (fusion, mixture, LoRA Align)",
    "federated": "paper Table 1 (FL): federated LoRA vs CopRA, client and merged accuracy",
    "multitask": "paper Table 1 (MTL): one adapter per task, merged into one",
    "pruning": "paper Fig. 4: structured and unstructured pruning of trained adapters",
    "shapley": "paper Fig. 2: Shapley values of the LoRA layers",
    "sweep": "paper Fig. 5 and 6: lr, iterations, schedules, baselines, t-SNE",
    "lr_select": "each method's own lr, chosen on a validation split of the training pool",
    "merge_map": "where LoRA's merges break: seed-pair merge barrier over lr, length, rank, targets, depth",
    "merge_protocol": "pre-registered CopRA vs LoRA: seed fusion, one-shot FL, MTL retention, pruning (Holm)",
}
