"""FusionFedAvg with a failure policy for real machines: every wait has a deadline, every failure a record.

Flower's own FedAvg waits for `min_available_nodes` without a time limit (`sample_nodes` loops on
`sleep(1)`), so a node that dies before a round starts stalls the run forever. Here:

  * a round waits at most `node_wait_timeout` for `min_available_nodes` connected nodes, then goes
    on with the connected ones if there are at least `min_train_nodes`, else the run stops;
  * the server pulls replies until all came, or `round_timeout` passed, or `straggler_timeout` passed
    since enough clients answered (a dead node then costs seconds, not Flower's 35-60 s heartbeat
    patience); a node that sent nothing by then, or replied with an error, is recorded as failed;
  * every reply is screened (`FusionFedAvg.screen_replies`: partition claims, example counts, keys,
    shapes, dtypes, LoRA settings, finite values, update norm); a rejected one is recorded (node,
    partition, reason) and not merged;
  * a round is merged (the settings' `aggregate`, fusion weights n_i / N over the accepted replies)
    when at least ceil(min_reply_fraction * clients) replies were accepted, else the run stops
    (`RoundFailed`).
  * `first_round` > 1 continues a run (the ServerApp's resume): Flower's round r is the run's round
    r + first_round - 1, in the clients' messages and in every record; `noise_state` (the DP noise
    generator's) and `partition_of` (node id -> partition, for the failure records) continue too.
"""

from __future__ import annotations

import time

from copra.federated.flower import require_flwr
from copra.federated.simulation import fusion_strategy_class

require_flwr()

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from copra.federated.app.settings import DeploySettings  # noqa: E402
from copra.federated.privacy import GaussianNoise  # noqa: E402
from copra.federated.protocol import Adapter  # noqa: E402


class RoundFailed(RuntimeError):
    """Too few nodes connected or answered for a round to count; the run stops (history says why)."""


class DeploymentFusion(fusion_strategy_class()):
    """FusionFedAvg with deadlines and a per-round record of who was asked, who answered, who failed."""

    def __init__(
        self,
        settings: DeploySettings,
        reference: Adapter | None = None,
        expected_lora: dict | None = None,
        sizes: list[int] | None = None,
        first_round: int = 1,
        noise_state: dict | None = None,
        partition_of: dict[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.min_train = settings.min_train_nodes or settings.needed_replies
        policy = settings.policy()
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=self.min_train,
            min_available_nodes=settings.wanted_nodes,
            reference=reference,
            policy=policy,
            expected_lora=expected_lora,
            sizes=sizes,
            noise=GaussianNoise(settings.seed, noise_state) if policy.dp else None,
        )
        self.offset = first_round - 1  # a resumed run: Flower counts from 1, the run from first_round
        self.sent: dict[int, list[int]] = {}  # round -> node ids asked
        self.asked: dict[int, dict[str, int]] = {}  # round -> {message id: node id}
        self.closed: dict[int, str] = {}  # round -> why the reply wait ended
        self.partition_of = dict(partition_of or {})  # node id -> partition id, learnt from replies (and resumed)
        self.round_started: dict[int, float] = {}
        self.stopped: dict | None = None  # the round record that stopped the run

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids once `min_available_nodes` are there, or what is there at the deadline."""
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.settings.wanted_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
        if len(nodes) < self.min_train:
            self.stopped = {"round": len(self.sent) + 1 + self.offset, "connected": nodes}
            raise RoundFailed(
                f"{len(nodes)} node(s) connected after {self.settings.node_wait_timeout:g} s, "
                f"min-train-nodes is {self.min_train}"
            )
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_started[server_round] = time.monotonic()
        self.remember_start(server_round, arrays)
        nodes = self.wait_for_nodes(grid)
        self.sent[server_round] = nodes
        config["server-round"] = server_round + self.offset  # the clients' seeds follow the run's round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]

    def start(self, grid: Grid, *args, **kwargs):
        """Flower's round loop, with this strategy's reply wait (`gather`) instead of the grid's."""
        return super().start(_RoundGrid(grid, self), *args, **kwargs)

    def gather(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Push the round's messages; pull replies until all came, round-timeout passed, or straggler-timeout
        passed since enough replies that pass the screening came."""
        if not messages:
            return []
        server_round = max(self.sent)
        ids = list(grid.push_messages(messages))
        self.asked[server_round] = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
        waiting, replies, quorum_at = set(ids), [], None
        start = time.monotonic()
        self.closed[server_round] = "all nodes replied"
        while waiting:
            got = list(grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            now = time.monotonic()
            if quorum_at is None and got and self._accepted(server_round, replies) >= self.settings.needed_replies:
                quorum_at = now  # enough replies that would be merged, not just any replies
            if waiting and now - start >= self.settings.round_timeout:
                self.closed[server_round] = f"round-timeout {self.settings.round_timeout:g} s"
                break
            if waiting and quorum_at is not None and now - quorum_at >= self.settings.straggler_timeout:
                self.closed[server_round] = f"straggler-timeout {self.settings.straggler_timeout:g} s"
                break
            if waiting:
                time.sleep(0.5)
        return replies

    def _accepted(self, server_round: int, replies: list[Message]) -> int:
        return len(self.screen_replies(server_round, [m for m in replies if not m.has_error()])[0])

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted, rejected = self.screen_replies(server_round, [m for m in replies if not m.has_error()])
        for reply in accepted:
            self.partition_of[reply.node_id] = reply.partition_id
        failed = self.failures(server_round, replies)
        answered = [
            {
                "node_id": r.node_id,
                "partition_id": r.partition_id,
                "num_examples": r.num_examples,
                "accuracy": r.accuracy,
            }
            for r in accepted
        ]
        record = {
            "round": server_round + self.offset,
            "sent_to": self.sent[server_round],
            "answered": answered,
            "rejected": rejected,
            "failed": failed,
        }
        if len(accepted) < self.settings.needed_replies:
            self.stopped = record
            raise RoundFailed(
                f"round {server_round + self.offset}: {len(accepted)} of {self.settings.clients} clients' replies "
                f"accepted, {self.settings.needed_replies} needed (min-reply-fraction "
                f"{self.settings.min_reply_fraction:g}); rejected: {rejected}; failed: {failed}"
            )
        arrays, metrics = self.merge(server_round, accepted)
        self.history.append(
            record
            | {
                "clients": [r.partition_id for r in accepted],
                "client_states": [r.state for r in accepted],
                "seconds": time.monotonic() - self.round_started[server_round],
                "dp": self.dp_records.get(server_round),
                "noise_rng": None if self.noise is None else self.noise.state(),  # what a resumed run draws on from
                "node_partitions": dict(self.partition_of),
            }
        )
        return arrays, metrics

    def node_of(self, server_round: int, msg: Message) -> int:
        # the SuperLink's own error replies (e.g. a node's heartbeat stopped) come from node 0: find the
        # node from the message they answer
        return int(self.asked.get(server_round, {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))

    def failures(self, server_round: int, replies: list[Message]) -> list[dict]:
        """Who failed: an error reply, no reply by the round's end, or gone since an earlier round."""
        failed, seen = [], set()
        for msg in replies:
            node = self.node_of(server_round, msg)
            seen.add(node)
            if msg.has_error():
                failed.append(self._failure(node, f"error reply: {msg.error.reason}"))
        for node in self.sent[server_round]:
            if node not in seen:
                failed.append(self._failure(node, f"no reply when the round closed ({self.closed.get(server_round)})"))
        for node in sorted(set(self.partition_of) - set(self.sent[server_round]) - seen):
            failed.append(self._failure(node, "answered before, not connected when the round started"))
        return failed

    def _failure(self, node: int, reason: str) -> dict:
        return {"node_id": node, "partition_id": self.partition_of.get(node), "reason": reason}


class _RoundGrid:
    """Flower's grid as `Strategy.start` sees it, with the strategy's bounded reply wait."""

    def __init__(self, grid: Grid, strategy: DeploymentFusion) -> None:
        self._grid, self._strategy = grid, strategy

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return self._strategy.gather(self._grid, list(messages))
