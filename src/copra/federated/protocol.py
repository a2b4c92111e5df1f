"""The federated protocol both runners share: the config, the client split, the client seeds, the round-0 init.

Paper: Zhuang et al., "CopRA" (2024), Sec. 3.1, Table 1 (left): the few-shot sample is split at
random over the clients, each trains with its own seed, the server merges. `copra.experiments.federated`
runs the protocol in one process and `copra.federated.simulation` on Flower; both take these definitions from
here (training layer), so the Flower runner never imports an experiment.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from copra.adapters.peft_merge import setting_options
from copra.core.config import RESERVED_KEYS, PerMethodLR, TrainConfig, check_lrs, make_config
from copra.federated.robust import FAULTS, Policy
from copra.models.evaluation import FewShotData, adapter_state
from copra.training.loop import build_run
from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]
RANK_CHANGING = ("mixture", "cat")  # merges whose rank differs from the clients': no next round from them
MAX_CLIENTS = MAX_ROUNDS = 100  # client_seed packs round and client into two decimal digits each


def split_clients(data: FewShotData, clients: int, seed: int) -> list[FewShotData]:
    """Split the training set at random into `clients` disjoint parts (sizes differ by at most one).

    Every part keeps the full evaluation set, prompts and class names. Indices keep their original
    order inside a part; `seed` alone decides the split.
    """
    n = len(data.train_x)
    if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= n:
        raise UserError(f"clients must be an integer from 1 to the number of training examples ({n}), got {clients!r}")
    order = np.random.default_rng(seed).permutation(n)
    parts = [sorted(int(i) for i in part) for part in np.array_split(order, clients)]
    return [
        dataclasses.replace(
            data, train_x=tuple(data.train_x[i] for i in part), train_y=tuple(data.train_y[i] for i in part)
        )
        for part in parts
    ]


def client_seed(seed: int, round_index: int, client: int) -> int:
    """TrainConfig seed of `client` in round `round_index` (0-based) of the run with seed `seed`."""
    return seed * 10_000 + round_index * 100 + client


@dataclass
class FederatedConfig(PerMethodLR):
    """Federated LoRA vs CopRA: who trains what, for how long, and where results go."""

    task: str = "bbc_news"  #: task name (as TrainConfig.task)
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: methods compared (paired)
    clients: int = 5  #: clients K; the few-shot sample is split into K random parts (paper: 5)
    rounds: int = 1  #: communication rounds; 1 = one-shot merging, the paper's setting
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: run seeds: few-shot sample, split, client seeds
    shots: int = 16  #: examples per class in the whole federation, before the split
    steps: int = 30  #: optimizer steps per client per round
    batch_size: int = 16  #: examples per step
    lr: float = 5e-3  #: peak learning rate, same for every method (unless `lrs` names it)
    lrs: dict[str, float] = field(default_factory=dict)  #: peak lr per method (e.g. from lr_select); others use lr
    eval_examples: int | None = 240  #: fixed evaluation subset (None: the whole test split)
    model: str = "embedded:minilm"  #: backbone, as TrainConfig.model
    shared_init: bool = False  #: round 0 starts every client from one LoRA init (classic FedAvg), not its own
    merge_method: str = "fusion"  #: server aggregation: fusion (FedAvg of A and B) or a rank-keeping PEFT method (ties, dare_ties, svd, ...)
    merge_density: float = 0.5  #: density of TIES / DARE / magnitude merges (unused by the other methods)
    aggregate: str = "fusion"  #: how the server combines accepted replies: fusion (as merge_method says), trimmed_mean, median or krum
    clip_norm: float = (
        0.0  #: scale each client's update (adapter minus the round's start) down to this L2 norm first (0: off)
    )
    norm_factor: float = (
        10.0  #: reject a reply whose update norm is off the round's median by more than this factor (0: off)
    )
    num_malicious: int = 1  #: bad replies trimmed_mean and krum withstand (cut per end; Krum's f)
    dp_noise_multiplier: float = (
        0.0  #: differential privacy: Gaussian noise on the merge, std z * dp_clip_norm / m (0: off)
    )
    dp_clip_norm: float = 0.0  #: differential privacy: each update clipped to this L2 norm before the unweighted mean
    min_reply_fraction: float = (
        0.5  #: a round is kept when at least this fraction of the clients' replies was accepted
    )
    faults: list[str] = field(
        default_factory=list
    )  #: test clients that misbehave: "CLIENT=FAULT" or "CLIENT=FAULT@ROUND" (nan, scale100)
    overrides: dict[str, Any] = field(default_factory=dict)  #: other TrainConfig fields for every client
    diagnostics: bool = (
        True  #: also the last merge's controls (mixture, shrinkage, validated lambda; runner.diagnostics)
    )
    scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0]
    )  #: lambda grid for the fused update in the diagnostics ([]: none)
    validation_examples: int = 200  #: drawn from the training pool to pick lambda (never the test split)
    output_dir: str = "results/federated"  #: where federated.json/.md/.png and merged adapters go
    progress: bool = True  #: progress bars

    def __post_init__(self) -> None:
        if not self.methods or not self.seeds:
            raise UserError("a federated run needs at least one method and one seed")
        for name, values in (("methods", self.methods), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise UserError(f"{name} has duplicates: {values!r}")
        for name, limit in (("clients", MAX_CLIENTS), ("rounds", MAX_ROUNDS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise UserError(f"{name} must be an integer from 1 to {limit}, got {value!r}")
        setting_options(self.merge_method, self.merge_density)
        if self.merge_method in RANK_CHANGING:
            raise UserError(
                f"merge_method {self.merge_method!r} changes the rank; the next round trains from the "
                "merged adapter, so federated learning needs a rank-keeping method"
            )
        policy = self.policy()  # aggregate, clip_norm, norm_factor, num_malicious, the DP settings
        if policy.aggregate != "fusion" and self.merge_method != "fusion":
            raise UserError(
                f"aggregate {self.aggregate!r} replaces merge_method {self.merge_method!r}; set one of them to fusion"
            )
        if policy.dp and self.merge_method != "fusion":
            raise UserError(
                f"differential privacy adds noise to a mean: merge_method must be fusion, not {self.merge_method!r}"
            )
        if isinstance(self.min_reply_fraction, bool) or not 0 < self.min_reply_fraction <= 1:
            raise UserError(f"min_reply_fraction must be in (0, 1], got {self.min_reply_fraction!r}")
        parse_faults(self.faults, self.clients, self.rounds)
        if not isinstance(self.diagnostics, bool):
            raise UserError(f"diagnostics must be true or false, got {self.diagnostics!r}")
        scales = self.scales if isinstance(self.scales, list) else [None]
        if len(set(map(repr, scales))) != len(scales) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in scales
        ):
            raise UserError(f"scales must be a list of distinct positive numbers, got {self.scales!r}")
        n = self.validation_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"validation_examples must be a positive integer, got {n!r}")
        if not isinstance(self.overrides, dict):
            raise UserError(f"overrides must be a mapping, got {self.overrides!r}")
        check_lrs(self.lrs, self.methods)
        owned = sorted(set(self.overrides) & (set(self._shared()) | set(RESERVED_KEYS)))
        if owned:
            raise UserError(f"overrides sets {owned[0]!r}; set it on the federated config instead")
        for method in self.methods:  # TrainConfig validates the rest (method names, shots, lr, ...)
            self.client_config(method, self.seeds[0], 0, 0)

    def policy(self) -> Policy:
        """How the server screens and aggregates replies (validated there)."""
        return Policy.of(self)

    @property
    def needed_replies(self) -> int:
        """Accepted replies a round needs: ceil(min_reply_fraction * clients), at least 1."""
        return max(1, math.ceil(self.min_reply_fraction * self.clients - 1e-9))

    def fault_of(self, client: int, round_index: int) -> str | None:
        """The fault test client `client` injects in round `round_index` (0-based), if any."""
        faults = parse_faults(self.faults, self.clients, self.rounds)
        return faults.get((client, round_index + 1), faults.get((client, None)))

    def _shared(self) -> dict[str, Any]:
        return dict(
            task=self.task,
            shots=self.shots,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_examples=self.eval_examples,
            model=self.model,
            progress=self.progress,
        )

    def client_config(self, method: str, seed: int, round_index: int, client: int) -> TrainConfig:
        """The TrainConfig of one client's local training in one round."""
        return make_config(
            {
                **self.overrides,
                **self._shared(),
                "method": method,
                "lr": self.lr_of(method),
                "seed": client_seed(seed, round_index, client),
            }
        )

    def data_config(self, seed: int) -> TrainConfig:
        """The config whose seed draws the run's few-shot sample (before the split)."""
        return make_config({**self.overrides, **self._shared(), "method": self.methods[0], "seed": seed})


def parse_faults(faults: list[str], clients: int, rounds: int) -> dict[tuple[int, int | None], str]:
    """{(client, round or None for every round): fault} from "CLIENT=FAULT[@ROUND]" items; one-line UserErrors."""
    if not isinstance(faults, list):
        raise UserError(f"faults must be a list of CLIENT=FAULT[@ROUND] items, got {faults!r}")
    out: dict[tuple[int, int | None], str] = {}
    for item in faults:
        match = re.fullmatch(r"(\d+)=(\w+)(?:@(\d+))?", item) if isinstance(item, str) else None
        if match is None:
            raise UserError(f"faults: {item!r} is not CLIENT=FAULT or CLIENT=FAULT@ROUND (e.g. 2=scale100@3)")
        client, fault, round_ = int(match[1]), match[2], None if match[3] is None else int(match[3])
        if fault not in FAULTS:
            raise UserError(f"faults: unknown fault {fault!r} in {item!r}; choose from {', '.join(FAULTS)}")
        if client >= clients or (round_ is not None and not 1 <= round_ <= rounds):
            raise UserError(f"faults: {item!r} names client {client} or round {round_} outside the run")
        out[(client, round_)] = fault
    return out


def initial_state(config: FederatedConfig, method: str, seed: int, data: FewShotData) -> Adapter:
    """The shared round-0 LoRA init (`shared_init`): client 0's fresh init."""
    classifier, _ = build_run(config.client_config(method, seed, 0, 0), data)
    return adapter_state(classifier)
