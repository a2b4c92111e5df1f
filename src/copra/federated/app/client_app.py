"""copra's ClientApp for Flower's deployment engine: one SuperNode = one partition of the few-shot data.

The SuperNode's `--node-config "partition-id=I num-partitions=K"` says which part it trains. The
deployment engine starts a fresh ClientApp process for every message, so everything is rebuilt
here from the run config and the message: the few-shot sample and split (seeded, identical on every
node), the round (`server-round`) and the start adapter (the message's arrays). Nothing is kept in
memory or closures between rounds.
"""

from __future__ import annotations

from copra.federated.flower import require_flwr

require_flwr()

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from copra.federated.app.settings import from_run_config  # noqa: E402
from copra.federated.protocol import split_clients  # noqa: E402
from copra.federated.simulation import train_reply  # noqa: E402
from copra.models.evaluation import prepare_data  # noqa: E402
from copra.utils.errors import UserError  # noqa: E402

app = ClientApp()


def node_partition(node_config: dict, clients: int) -> int:
    """The node's partition-id, checked against num-partitions and the run's client count."""
    try:
        partition, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise UserError('this SuperNode needs --node-config "partition-id=I num-partitions=K" (integers)') from None
    if total != clients:
        raise UserError(f"num-partitions={total} on this SuperNode, but the run has clients={clients}")
    if not 0 <= partition < clients:
        raise UserError(f"partition-id must be in 0..{clients - 1}, got {partition}")
    return partition


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's client for the message's round and reply with its adapter."""
    settings = from_run_config(dict(context.run_config))
    config = settings.federated()
    client = node_partition(dict(context.node_config), settings.clients)
    data = prepare_data(config.data_config(settings.seed))
    part = split_clients(data, settings.clients, settings.seed)[client]
    return train_reply(msg, config, settings.method, settings.seed, client, part)
