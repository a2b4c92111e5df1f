"""One module per paper experiment family; each is a config dataclass plus `run(config) -> dict`.

`EXPERIMENTS` maps the CLI name to a loader returning (config class, run, render), imported lazily
so `copra --help` stays fast.
"""

from __future__ import annotations

from typing import Callable


def _landscape():
    from copra.experiments import landscape

    return landscape.LandscapeConfig, landscape.run, landscape.render


def _federated():
    from copra.experiments import federated

    return federated.FederatedConfig, federated.run, federated.render


def _multitask():
    from copra.experiments import multitask

    return multitask.MultitaskConfig, multitask.run, multitask.render


def _pruning():
    from copra.experiments import pruning

    return pruning.PruningConfig, pruning.run, pruning.render


def _shapley():
    from copra.experiments import shapley_layers

    return shapley_layers.ShapleyConfig, shapley_layers.run, shapley_layers.render


def _sweep():
    from copra.experiments import sweep

    return sweep.SweepConfig, sweep.run, sweep.render


EXPERIMENTS: dict[str, Callable[[], tuple]] = {
    "landscape": _landscape,  # paper Fig. 3
    "federated": _federated,  # paper Table 1 (FL)
    "multitask": _multitask,  # paper Table 1 (MTL)
    "pruning": _pruning,  # paper Fig. 4
    "shapley": _shapley,  # paper Fig. 2
    "sweep": _sweep,  # paper Fig. 5 and 6 (lr, iterations, schedules, baselines, t-SNE)
}
