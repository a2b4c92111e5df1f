"""The run config of copra's Flower app: what to train, where the server writes, the failure policy.

Flower passes `[tool.flwr.app.config]` of the app's `pyproject.toml` (with `flwr run -c` overrides)
to every ServerApp and ClientApp process as `context.run_config`, a flat dict of TOML scalars. Both
sides rebuild the same `FederatedConfig` from it, so nothing needs to survive in memory between the
fresh ClientApp processes of successive rounds.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from copra.federated.protocol import FederatedConfig
from copra.federated.robust import Policy
from copra.utils.errors import UserError
from copra.utils.settings import parse_sets


@dataclass(frozen=True)
class DeploySettings:
    """One federated run on Flower's deployment engine (run-config keys are the field names, `-` for `_`)."""

    model: str = FederatedConfig.model  #: backbone, as TrainConfig.model; must exist on every machine
    task: str = FederatedConfig.task  #: task name, as TrainConfig.task
    method: str = "copra"  #: "lora" or "copra"
    seed: int = 0  #: run seed: few-shot sample, split and client seeds (`client_seed`)
    clients: int = 2  #: partitions K; each SuperNode's node_config gives partition-id < K, num-partitions = K
    rounds: int = 2  #: server rounds
    shots: int = FederatedConfig.shots  #: examples per class in the whole federation, before the split
    steps: int = FederatedConfig.steps  #: optimizer steps per client per round
    batch_size: int = FederatedConfig.batch_size  #: examples per step
    lr: float = FederatedConfig.lr  #: peak learning rate
    eval_examples: int = 240  #: server-side evaluation subset (0: the whole test split)
    shared_init: bool = FederatedConfig.shared_init  #: round 1 starts every client from one LoRA init
    overrides: str = ""  #: other TrainConfig fields, "key=value key=value" (e.g. "max_length=32")
    output_dir: str = ""  #: absolute folder on the ServerApp's machine ("": ~/copra-flower/run-<run id>)
    min_available_nodes: int = 0  #: connected nodes a round waits for (0: clients)
    min_train_nodes: int = 0  #: nodes a round trains on at least (0: clients)
    node_wait_timeout: float = 300.0  #: seconds a round waits for min_available_nodes before it goes on or stops
    round_timeout: float = 600.0  #: seconds a round waits for replies at most; late or dead nodes count as failed
    straggler_timeout: float = 120.0  #: seconds a round still waits for the others once enough clients answered
    min_reply_fraction: float = (
        0.5  #: a round is kept when at least this fraction of the clients' replies was accepted
    )
    aggregate: str = FederatedConfig.aggregate  #: fusion, trimmed_mean, median or krum (copra.federated.robust)
    clip_norm: float = (
        FederatedConfig.clip_norm
    )  #: each update scaled down to this L2 norm before aggregating (0: off)
    norm_factor: float = (
        FederatedConfig.norm_factor
    )  #: reject a reply whose update norm is off the round's median by more than this factor (0: off)
    num_malicious: int = FederatedConfig.num_malicious  #: bad replies trimmed_mean and krum withstand
    dp_noise_multiplier: float = FederatedConfig.dp_noise_multiplier  #: DP noise, std z * dp-clip-norm / m (0: off)
    dp_clip_norm: float = (
        FederatedConfig.dp_clip_norm
    )  #: DP: each update clipped to this L2 norm (copra.federated.privacy)
    faults: str = (
        ""  #: test clients that misbehave, "CLIENT=FAULT[@ROUND] ..." (nan, scale100); for trying the defence
    )

    def __post_init__(self) -> None:
        for name in ("node_wait_timeout", "round_timeout", "straggler_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
        if not 0 < self.min_reply_fraction <= 1:
            raise UserError(f"min-reply-fraction must be in (0, 1], got {self.min_reply_fraction!r}")
        if self.clip_norm < 0 or not math.isfinite(self.clip_norm):
            raise UserError(f"clip-norm must be a finite number >= 0 (0: off), got {self.clip_norm!r}")
        for name in ("min_available_nodes", "min_train_nodes", "eval_examples"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if self.output_dir and not Path(self.output_dir).expanduser().is_absolute():
            raise UserError(f"output-dir must be an absolute path on the ServerApp's machine, got {self.output_dir!r}")
        self.federated()  # FederatedConfig and TrainConfig check the rest

    def federated(self) -> FederatedConfig:
        """The in-process protocol's config: clients and rounds train exactly as `experiments.federated`."""
        return FederatedConfig(
            task=self.task,
            methods=[self.method],
            clients=self.clients,
            rounds=self.rounds,
            seeds=[self.seed],
            shots=self.shots,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_examples=self.eval_examples or None,
            model=self.model,
            shared_init=self.shared_init,
            overrides=parse_sets(shlex.split(self.overrides)),
            aggregate=self.aggregate,
            clip_norm=self.clip_norm,
            norm_factor=self.norm_factor,
            num_malicious=self.num_malicious,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_clip_norm=self.dp_clip_norm,
            min_reply_fraction=self.min_reply_fraction,
            faults=self.faults.split(),
            output_dir=self.output_dir or ".",
            progress=False,
        )

    @property
    def wanted_nodes(self) -> int:
        """Connected nodes a round waits for (up to node_wait_timeout)."""
        return self.min_available_nodes or self.clients

    @property
    def needed_replies(self) -> int:
        """Replies a round needs to be kept: ceil(min_reply_fraction * clients), at least 1."""
        return max(1, math.ceil(self.min_reply_fraction * self.clients - 1e-9))

    def policy(self) -> Policy:
        """How the ServerApp screens and aggregates replies."""
        return Policy.of(self)

    def output(self, run_id: int) -> Path:
        return (
            Path(self.output_dir).expanduser() if self.output_dir else Path.home() / "copra-flower" / f"run-{run_id}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_run_config(run_config: dict[str, Any]) -> DeploySettings:
    """Settings from Flower's run config; unknown keys and wrong types are one-line UserErrors."""
    known = {f.name: f for f in fields(DeploySettings)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"unknown run-config key {key!r}; known: {sorted(k.replace('_', '-') for k in known)}")
        values[name] = _typed(key, value, type(getattr(DeploySettings, name)))
    return DeploySettings(**values)


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise UserError(f"run-config {key} must be a {kind.__name__}, got {value!r}")
    return value
