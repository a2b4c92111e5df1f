"""One-shot federated merges for the merge map and protocol: clients' shares of a run's few-shot sample.

Every client starts from the run's own LoRA init (the same seed: the server's broadcast) and trains on its
share; the server fuses the clients once at equal weights. Shares are IID (every class dealt round-robin)
or label-skewed by a Dirichlet(alpha) draw per class, the usual non-IID setting of FL research (alpha 0.1:
most clients see few classes; alpha 1: mild skew). Shares depend only on (labels, clients, seed, alpha).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion
from copra.core.config import TrainConfig
from copra.data.fewshot import prepare_data
from copra.experiments.runner.common import Adapter
from copra.experiments.runner.runs import finished
from copra.utils.errors import UserError


def iid_shares(labels: Sequence[int], clients: int, seed: int) -> list[list[int]]:
    """Indices of each client's share: every class's examples shuffled (seeded) and dealt round-robin."""
    rng = random.Random(f"clients-{seed}")
    shares: list[list[int]] = [[] for _ in range(clients)]
    turn = 0
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        for i in members:
            shares[turn % clients].append(i)
            turn += 1
    return [sorted(s) for s in shares]


def dirichlet_shares(labels: Sequence[int], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label-skewed shares: each class split over clients by proportions ~ Dirichlet(alpha, ..., alpha).

    No client is left empty (an empty client cannot train): one example moves to it from the largest share.
    """
    if not alpha > 0:
        raise UserError(f"the Dirichlet alpha must be > 0, got {alpha!r}")
    if len(labels) < clients:
        raise UserError(f"{len(labels)} training examples cannot be shared by {clients} clients")
    rng = np.random.default_rng([seed, clients, int(round(alpha * 1e6))])
    shares: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(np.array(members), cuts)):
            shares[client] += part.tolist()
    for client in range(clients):
        if not shares[client]:
            donor = max(range(clients), key=lambda c: len(shares[c]))
            shares[client].append(shares[donor].pop())
    return [sorted(s) for s in shares]


def partition_alpha(partition: str) -> float | None:
    """The Dirichlet alpha a partition name gives ("dirichlet_0.1" -> 0.1), None for "iid"; else a UserError."""
    if partition == "iid":
        return None
    if partition.startswith("dirichlet_"):
        try:
            alpha = float(partition.removeprefix("dirichlet_"))
        except ValueError:
            alpha = float("nan")
        if alpha > 0:
            return alpha
    raise UserError(f"unknown client partition {partition!r}; use iid or dirichlet_<alpha> (e.g. dirichlet_0.1)")


def shares_of(partition: str, labels: Sequence[int], clients: int, seed: int) -> list[list[int]]:
    """`partition` is "iid" or "dirichlet_<alpha>" (e.g. dirichlet_0.1)."""
    alpha = partition_alpha(partition)
    return iid_shares(labels, clients, seed) if alpha is None else dirichlet_shares(labels, clients, alpha, seed)


def client_configs(base: TrainConfig, clients: int, steps: int | None = None, distinct_inits: bool = False):
    """Each client's TrainConfig: `steps` optimizer steps (default: base.steps / clients, at least 1: a client
    holds about 1/clients of the data); with `distinct_inits`, client k's own seed base.seed * 1000 + k + 1."""
    shared = base.replace(steps=steps or max(1, base.steps // clients))
    if not distinct_inits:
        return [shared] * clients
    return [shared.replace(seed=base.seed * 1000 + k + 1) for k in range(clients)]


def one_shot_fl(
    base: TrainConfig,
    folder: Path,
    clients: int,
    partition: str = "iid",
    steps: int | None = None,
    distinct_inits: bool = False,
) -> Adapter:
    """The server's one fusion of `clients` adapters, each trained from `base`'s init on its share.

    Clients train `steps` optimizer steps (default: base.steps / clients, at least 1: a client holds about
    1/clients of the data) into `folder/client<k>of<n>[-<partition>][-own-init]`; finished clients are reused.
    `distinct_inits`: client k starts from its own init (seed base.seed * 1000 + k + 1; also its batch order),
    the control for what a shared init buys; the data stay the shares of `base`'s few-shot sample.
    """
    configs = client_configs(base, clients, steps, distinct_inits)
    data = prepare_data(configs[0].replace(seed=base.seed))  # the shares are of base's few-shot sample
    suffix = ("" if partition == "iid" else f"-{partition}") + ("-own-init" if distinct_inits else "")
    states = []
    for k, (share, mine) in enumerate(zip(shares_of(partition, data.train_y, clients, base.seed), configs)):
        where = folder / f"client{k}of{clients}{suffix}"
        result = finished(mine, where)
        if result is None:
            from copra.training.loop import train

            part = replace(
                data, train_x=tuple(data.train_x[i] for i in share), train_y=tuple(data.train_y[i] for i in share)
            )
            result = train(mine, data=part, output_dir=where)
        states.append(load_adapter(result.adapter_dir)[0])
    return fusion(states, [1 / len(states)] * len(states))
