"""copra's Flower app on the deployment engine: settings, failure policy, TLS + SuperNode auth, a killed node."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest
import tomllib
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict, validate_config  # noqa: E402

from copra.adapters.merge import fusion  # noqa: E402
from copra.federated.app import APP_DIR, launch  # noqa: E402
from copra.federated.app.client_app import node_partition  # noqa: E402
from copra.federated.app.settings import DeploySettings, from_run_config  # noqa: E402
from copra.federated.app.strategy import DeploymentFusion, RoundFailed  # noqa: E402
from copra.federated.flower import FLOWER_ENV  # noqa: E402
from copra.federated.replies import to_record  # noqa: E402
from copra.utils.errors import UserError  # noqa: E402


def app_pyproject() -> dict:
    return tomllib.loads((APP_DIR / "pyproject.toml").read_text())


def test_app_pyproject_is_valid_and_its_defaults_are_the_settings():
    config = app_pyproject()
    assert validate_config(config)[0]
    assert from_run_config(flatten_dict(config["tool"]["flwr"]["app"]["config"])) == DeploySettings()
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "copra.federated.app.server_app:app",
        "clientapp": "copra.federated.app.client_app:app",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 3},
        {"rounds": "2"},
        {"round-timeout": 0.0},
        {"node-wait-timeout": -1},
        {"min-reply-fraction": 0.0},
        {"min-reply-fraction": 1.5},
        {"output-dir": "relative/out"},
        {"clients": 0},
        {"method": "sgd"},
        {"overrides": "seed=3"},
        {"min-train-nodes": -1},
    ],
)
def test_settings_refuse_bad_run_config(bad):
    with pytest.raises(UserError):
        from_run_config(bad)


def test_settings_give_the_in_process_protocol_and_the_policy():
    s = from_run_config({"clients": 5, "eval-examples": 0, "overrides": "max_length=32 rank=4", "lr": 1})
    fed = s.federated()
    assert (fed.clients, fed.methods, fed.seeds, fed.eval_examples, fed.lr) == (5, ["copra"], [0], None, 1.0)
    assert fed.client_config("copra", 0, 0, 0).max_length == 32 and fed.client_config("copra", 0, 0, 0).rank == 4
    assert (s.wanted_nodes, s.needed_replies) == (5, 3)  # all clients wanted, ceil(0.5 * 5) needed
    assert DeploySettings(clients=4, min_reply_fraction=1.0).needed_replies == 4
    assert DeploySettings(clients=4, min_reply_fraction=0.01, min_available_nodes=2).needed_replies == 1
    assert DeploySettings(clients=4, min_available_nodes=2).wanted_nodes == 2
    assert DeploySettings().output(7).name == "run-7"


def test_node_config_gives_the_partition():
    assert node_partition({"partition-id": 1, "num-partitions": 2}, 2) == 1
    for node_config in (
        {"partition-id": 0},
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 2, "num-partitions": 2},
    ):
        with pytest.raises(UserError):
            node_partition(node_config, 2)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 4, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}


def _ask(strategy: DeploymentFusion, server_round: int, nodes: list[int]) -> None:
    """What configure_train + the grid leave behind: the nodes asked and the messages' ids."""
    strategy.sent[server_round], strategy.round_started[server_round] = nodes, time.monotonic()
    strategy.asked[server_round] = {f"r{server_round}n{node}": node for node in nodes}
    strategy.closed[server_round] = "round-timeout 600 s"


def _reply(
    node: int,
    partition: int | None = None,
    n: int = 0,
    state=None,
    error: str | None = None,
    server_round: int = 1,
    src: int | None = None,
):
    """A stand-in for a Flower reply Message (real ones need a running Flower run)."""
    metadata = SimpleNamespace(src_node_id=node if src is None else src, reply_to_message_id=f"r{server_round}n{node}")
    if error is not None:
        return SimpleNamespace(metadata=metadata, has_error=lambda: True, error=SimpleNamespace(reason=error))
    content = RecordDict(
        {
            "arrays": to_record(state),
            "metrics": MetricRecord({"num-examples": n, "accuracy": 0.5}),
            "client": ConfigRecord({"partition-id": partition}),
        }
    )
    return SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content)


def test_strategy_merges_who_answered_records_who_failed_and_stops_below_the_fraction():
    strategy = DeploymentFusion(DeploySettings(clients=3))  # needs ceil(0.5 * 3) = 2 answers
    a, b = _state(1), _state(2)
    _ask(strategy, 1, [10, 11, 12])
    arrays, _ = strategy.aggregate_train(
        1, [_reply(11, 1, 5, b), _reply(12, error="boom", src=0), _reply(10, 0, 3, a)]
    )
    merged = arrays.to_torch_state_dict()
    for key, value in fusion([a, b], [3 / 8, 5 / 8]).items():
        torch.testing.assert_close(merged[key], value)
    entry = strategy.history[-1]
    assert [x["partition_id"] for x in entry["answered"]] == [0, 1] and entry["clients"] == [0, 1]
    assert entry["failed"] == [{"node_id": 12, "partition_id": None, "reason": "error reply: boom"}]
    _ask(strategy, 2, [10, 11, 12])
    with pytest.raises(RoundFailed, match=r"1 of 3 clients' replies accepted, 2 needed"):
        strategy.aggregate_train(2, [_reply(10, 0, 3, a, server_round=2)])
    failed = {f["node_id"]: f for f in strategy.stopped["failed"]}
    assert (
        failed[11]["partition_id"] == 1
        and failed[11]["reason"] == "no reply when the round closed (round-timeout 600 s)"
    )
    assert len(strategy.history) == 1  # the failed round is not merged


def test_strategy_refuses_two_nodes_for_one_partition():
    strategy = DeploymentFusion(DeploySettings(clients=2))
    _ask(strategy, 1, [10, 11])
    with pytest.raises(RoundFailed, match="partition-id 0"):
        strategy.aggregate_train(1, [_reply(10, 0, 3, _state(1)), _reply(11, 0, 3, _state(2))])


class FakeGrid:
    """Node 10 answers at once, node 11 never (a SIGKILLed SuperNode before Flower's heartbeat notices)."""

    def __init__(self):
        self.replies = {"id10": _reply(10, 0, 3, _state(1)), "id11": None}
        self.replies["id10"].metadata.reply_to_message_id = "id10"

    def push_messages(self, messages):
        return [f"id{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        got = [self.replies[i] for i in ids if self.replies[i] is not None]
        for i in ids:
            self.replies[i] = None  # each reply is pulled once
        return got


@pytest.mark.parametrize(
    "settings, closed",
    [
        (dict(straggler_timeout=0.01), "straggler-timeout 0.01 s"),
        (dict(min_reply_fraction=1.0, round_timeout=0.6), "round-timeout 0.6 s"),
    ],
)
def test_the_reply_wait_ends_at_a_deadline(settings, closed):
    strategy = DeploymentFusion(DeploySettings(clients=2, **settings))
    strategy.sent[1] = [10, 11]
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in (10, 11)]
    replies = strategy.gather(FakeGrid(), messages)
    assert [r.metadata.src_node_id for r in replies] == [10]
    assert strategy.asked[1] == {"id10": 10, "id11": 11} and strategy.closed[1] == closed


def test_waiting_for_nodes_has_a_deadline():
    grid = SimpleNamespace(get_node_ids=lambda: [5])
    # 2 wanted, 1 connected: after the deadline the round goes on with it (1 needed) ...
    assert DeploymentFusion(DeploySettings(clients=2, node_wait_timeout=0.01)).wait_for_nodes(grid) == [5]
    # ... unless min-train-nodes asks for more: the run stops instead of waiting forever
    strict = DeploymentFusion(DeploySettings(clients=2, node_wait_timeout=0.01, min_train_nodes=2))
    with pytest.raises(RoundFailed, match="1 node"):
        strict.wait_for_nodes(grid)
    assert strict.stopped == {"round": 1, "connected": [5]}


def test_launch_commands_and_environment(tmp_path):
    env = launch.flower_env(tmp_path, base={"PATH": "/usr/bin", "FLWR_TELEMETRY_ENABLED": "1"})
    assert env | FLOWER_ENV == env and env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_HOME"] == str(tmp_path)
    assert "--insecure" in launch.superlink_command(9000)
    tls = launch.Tls(tmp_path / "ca", tmp_path / "cert", tmp_path / "key")
    secure = launch.superlink_command(9000, tls=tls, node_auth=True)
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure and str(tls.server_key) in secure
    node = launch.supernode_command("127.0.0.1:9000", 9001, 1, 2, root_cert=tls.ca_cert, private_key=tmp_path / "k")
    assert "partition-id=1 num-partitions=2" in node and str(tls.ca_cert) in node and "--insecure" not in node
    config = tomllib.loads(launch.write_connection(tmp_path, "lab", "10.0.0.1:9093", tls.ca_cert).read_text())
    assert config["superlink"] == {
        "default": "lab",
        "lab": {"address": "10.0.0.1:9093", "root-certificates": str(tls.ca_cert)},
    }


def test_self_made_certificate_and_node_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    tls = launch.make_tls(tmp_path / "tls")
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls.ca_cert), str(tls.server_cert)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tls.server_cert), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    private, public = launch.make_node_key(tmp_path / "node")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_a_node_gone_before_the_round_counts_as_failed():
    strategy = DeploymentFusion(DeploySettings(clients=2))
    for server_round, sent in ((1, [10, 11]), (2, [10])):
        _ask(strategy, server_round, sent)
        replies = [_reply(node, node - 10, 3, _state(node), server_round=server_round) for node in sent]
        strategy.aggregate_train(server_round, replies)
    assert strategy.history[-1]["failed"] == [
        {"node_id": 11, "partition_id": 1, "reason": "answered before, not connected when the round started"}
    ]
