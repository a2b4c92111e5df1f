"""Federated LoRA/CopRA on Flower (flwr >= 1.20 Message API): for users who outgrow one process.

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 3.1, Table 1 (left):
clients train adapters on random parts of the data with different seeds; the server merges them,
and CopRA's adapters merge far better than plain LoRA's. `copra.experiments.federated` runs that
protocol in one process; this module runs the very same protocol on Flower, so it can move to real
SuperNodes unchanged:

  * `client_app(...)`: a ClientApp whose `train` handler trains a copra adapter on the node's
    partition (`context.node_config["partition-id"]` -> `split_clients` part), starting from the
    server's adapter (an empty ArrayRecord in round 1 means "your own seeded init", the paper), and
    replies with the adapter (ArrayRecord keyed by PEFT names, sorted) and `num-examples`;
  * `FusionFedAvg`: Flower's FedAvg whose aggregation is `copra.adapters.merge.fusion` with weights
    n_i / N, so the merge formula lives in one place;
  * `run_flower_simulation(config)`: Flower's simulation engine (Ray, one CPU per client),
    returning the server's merged adapter and per-round metrics.

Client seeds, data and split are those of the in-process simulation, so both give the same
adapters. Flower is imported lazily: `import copra` never needs flwr. Unless the caller set
FLWR_TELEMETRY_ENABLED / FLWR_DISABLE_UPDATE_CHECK, Flower's telemetry and update check are switched
off before flwr is first imported.
`flwr.simulation.run_simulation` is deprecated in favour of `flwr run`; `copra.federated.app` is the
same protocol as a Flower app for the deployment engine (SuperLink + SuperNodes).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from copra.federated.flower import require_flwr
from copra.federated.privacy import GaussianNoise
from copra.federated.protocol import Adapter, FederatedConfig, initial_state, split_clients
from copra.federated.replies import (
    NUM_EXAMPLES,
    from_record,
    lora_settings,
    merge_replies,
    read_reply,
    screen_round,
    to_record,
)
from copra.federated.robust import Policy, apply_fault
from copra.models.evaluation import FewShotData, adapter_state, prepare_data, state_accuracy
from copra.training.loop import build_run, train


def client_app(config: FederatedConfig, method: str, seed: int, partitions: list[FewShotData]):
    """A Flower ClientApp: node with partition-id i trains client i of (method, seed) on partitions[i]."""
    require_flwr()
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        return train_reply(msg, config, method, seed, client, partitions[client])

    return app


def train_reply(msg, config: FederatedConfig, method: str, seed: int, client: int, part: FewShotData):
    """Train client `client` of (method, seed) on `part` for the message's round; the reply Message.

    The round comes from the message (`server-round`), the start from its arrays (empty: the
    client's own seeded init), so a fresh process per round (deployment engine) trains the same.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    round_index = int(msg.content["config"]["server-round"]) - 1
    arrays = msg.content["arrays"]
    start = from_record(arrays) if len(arrays) else None
    client_config = config.client_config(method, seed, round_index, client)
    result = train(client_config, data=part, initial_state=start)
    sent = apply_fault(result.state, config.fault_of(client, round_index))  # `faults`: a test client misbehaves
    metrics = MetricRecord({NUM_EXAMPLES: len(part.train_x), "accuracy": result.accuracy})
    return Message(
        RecordDict(
            {
                "arrays": to_record(sent),
                "metrics": metrics,
                "client": ConfigRecord({"partition-id": client}),
                "lora": ConfigRecord(lora_settings(client_config)),
            }
        ),
        reply_to=msg,
    )


_STRATEGY: type | None = None


def __getattr__(name: str):
    # `from copra.federated.simulation import FusionFedAvg` works, and still imports flwr only then
    if name == "FusionFedAvg":
        return fusion_strategy_class()
    raise AttributeError(f"module 'copra.federated.simulation' has no attribute {name!r}")


def fusion_strategy_class() -> type:
    """The FusionFedAvg class, defined on first use so that flwr is imported lazily."""
    global _STRATEGY
    if _STRATEGY is not None:
        return _STRATEGY
    require_flwr()
    from flwr.app import ArrayRecord, Message, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    class FusionFedAvg(FedAvg):
        """FedAvg that screens every reply and merges the accepted ones with `robust.aggregate` (default: fusion).

        `reference` (the round's adapter structure), `policy`, `expected_lora` (the LoRA settings
        replies must report) and `sizes` (example count per partition) set the screening
        (`copra.federated.replies.screen_round`). `history` keeps, per round, the accepted clients'
        adapters, sizes and accuracies (by partition id), the rejected replies with their reasons and
        the failures, for the caller to inspect. A DP `policy` draws from `noise` (the run's
        `privacy.GaussianNoise`); `dp_records[round]` is what each merge added.
        """

        def __init__(
            self,
            *args: Any,
            reference: Adapter | None = None,
            policy: Policy | None = None,
            expected_lora: dict | None = None,
            sizes: list[int] | None = None,
            noise: GaussianNoise | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.history: list[dict] = []
            self.reference, self.policy = reference, policy or Policy()
            self.expected_lora, self.sizes, self.noise = expected_lora, sizes, noise
            self.dp_records: dict[int, dict] = {}  # round -> the DP merge's record (clip, noise std, ...)
            self.starts: dict[int, Adapter | None] = {}  # round -> the adapter it sent (None: clients' own inits)

        def remember_start(self, server_round: int, arrays: ArrayRecord) -> None:
            self.starts[server_round] = from_record(arrays) if len(arrays) else None

        def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
            self.remember_start(server_round, arrays)
            return super().configure_train(server_round, arrays, config, grid)

        def node_of(self, server_round: int, msg: Message) -> int:
            return int(msg.metadata.src_node_id)

        def screen_replies(self, server_round: int, messages: list[Message]) -> tuple[list, list[dict]]:
            """(accepted `Reply`s by partition, rejected as {node_id, partition_id, reason}); never raises."""
            readable, rejected = [], []
            clients = None if self.sizes is None else len(self.sizes)
            for msg in messages:
                node = self.node_of(server_round, msg)
                got = read_reply(msg.content, node, clients)
                if isinstance(got, tuple):
                    rejected.append({"node_id": node, "partition_id": got[0], "reason": got[1]})
                else:
                    readable.append(got)
            accepted, refused = screen_round(
                readable, self.reference, self.policy, self.starts.get(server_round), self.expected_lora, self.sizes
            )
            rejected += [{"node_id": r.node_id, "partition_id": r.partition_id, "reason": why} for r, why in refused]
            return accepted, rejected

        def merge(self, server_round: int, accepted: list) -> tuple[ArrayRecord, MetricRecord]:
            """The accepted replies' aggregate, and their example-weighted accuracy."""
            merged, dp = merge_replies(accepted, self.policy, self.starts.get(server_round), self.noise)
            if dp is not None:
                self.dp_records[server_round] = dp
            total = sum(r.num_examples for r in accepted)
            accuracy = sum(r.num_examples * r.accuracy for r in accepted) / total
            return to_record(merged), MetricRecord({NUM_EXAMPLES: total, "accuracy": accuracy})

        def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            failures = [str(m.error.reason) for m in replies if m.has_error()]
            accepted, rejected = self.screen_replies(server_round, [m for m in replies if not m.has_error()])
            self.history.append({"round": server_round, "failures": failures, "rejected": rejected})
            if not accepted:
                return None, None
            self.history[-1].update(
                clients=[r.partition_id for r in accepted],
                client_states=[r.state for r in accepted],
                client_sizes=[r.num_examples for r in accepted],
                client_accuracy=[r.accuracy for r in accepted],
            )
            return self.merge(server_round, accepted)

    _STRATEGY = FusionFedAvg
    return FusionFedAvg


def server_app(
    config: FederatedConfig,
    data: FewShotData,
    classifier: torch.nn.Module,
    outcome: dict,
    initial: Adapter | None = None,
    sizes: list[int] | None = None,
    noise: GaussianNoise | None = None,
):
    """A Flower ServerApp running `config.rounds` rounds of FusionFedAvg; results go into `outcome`.

    `sizes`: the example count of each partition, which replies must report (None: not checked);
    `noise`: the run's DP noise source (needed when `config.policy().dp`).

    Merged adapters are evaluated centrally (every client shares the evaluation set): loaded into
    `classifier` and scored by `copra.models.evaluation.state_accuracy`, the one scoring path.
    """
    require_flwr()
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()
    evaluate = merged_accuracy(classifier, data)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = fusion_strategy_class()(
            fraction_evaluate=0.0,
            min_train_nodes=config.clients,
            min_available_nodes=config.clients,
            reference=adapter_state(classifier),
            policy=config.policy(),
            expected_lora=lora_settings(config.client_config(config.methods[0], config.seeds[0], 0, 0)),
            sizes=sizes,
            noise=noise,
        )
        outcome["strategy"] = strategy
        outcome["result"] = strategy.start(
            grid=grid,
            initial_arrays=to_record(initial) if initial else ArrayRecord(),
            num_rounds=config.rounds,
            evaluate_fn=evaluate,
        )

    return app


def merged_accuracy(classifier: torch.nn.Module, data: FewShotData):
    """The server's evaluate_fn: (round, merged ArrayRecord) -> MetricRecord with `accuracy` (None in round 0).

    The merged adapter is loaded into `classifier` and scored by `copra.models.evaluation.state_accuracy`.
    """
    require_flwr()
    from flwr.app import ArrayRecord, MetricRecord

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or not len(arrays):
            return None
        return MetricRecord({"accuracy": state_accuracy(classifier, from_record(arrays), data)})

    return evaluate


def run_flower_simulation(
    config: FederatedConfig,
    method: str | None = None,
    seed: int | None = None,
    backend_config: dict | None = None,
    data: FewShotData | None = None,
) -> dict:
    """One (method, seed) of `config` on Flower's Ray simulation engine; default: the first of each.

    Returns {"method", "seed", "merged_state", "rounds": [{round, clients, client_sizes,
    client_accuracy, merged_accuracy}], "client_states" (last round, by partition id), "seconds"}.
    `backend_config` replaces the default (1 CPU per client, Ray limited to min(clients, CPUs)).
    """
    require_flwr()
    import ray
    from flwr.simulation import run_simulation

    method = config.methods[0] if method is None else method
    seed = config.seeds[0] if seed is None else seed
    data = data or prepare_data(config.data_config(seed))
    partitions = split_clients(data, config.clients, seed)
    classifier, _ = build_run(config.client_config(method, seed, 0, 0), data)  # scores the merged adapters
    initial = None
    if config.shared_init:
        initial = initial_state(config, method, seed, data)
    noise = GaussianNoise(seed) if config.policy().dp else None
    cpus = min(config.clients, os.cpu_count() or 1)
    backend_config = backend_config or {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    outcome: dict = {}
    started_ray = not ray.is_initialized()
    start = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app(
                config, data, classifier, outcome, initial, [len(p.train_x) for p in partitions], noise
            ),
            client_app=client_app(config, method, seed, partitions),
            num_supernodes=config.clients,
            backend_config=backend_config,
        )
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without a result (see Flower's log above)")
    history = outcome["strategy"].history
    failed = [h for h in history if h["failures"] or len(h.get("clients", [])) + len(h["rejected"]) != config.clients]
    if failed:
        raise RuntimeError(
            f"round {failed[0]['round']}: {len(failed[0]['failures'])} client(s) failed: {failed[0]['failures'][:1]}"
        )
    result = outcome["result"]
    rounds = [
        {
            "round": h["round"],
            "clients": h["clients"],
            "client_sizes": h["client_sizes"],
            "client_accuracy": h["client_accuracy"],
            "rejected": h["rejected"],
            "merged_accuracy": float(result.evaluate_metrics_serverapp[h["round"]]["accuracy"]),
        }
        for h in history
    ]
    return {
        "method": method,
        "seed": seed,
        "merged_state": from_record(result.arrays),
        "rounds": rounds,
        "client_states": history[-1]["client_states"],
        "seconds": time.perf_counter() - start,
    }
