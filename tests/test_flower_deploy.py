"""copra's Flower app on the deployment engine: settings, failure policy, TLS + SuperNode auth, a killed node."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict, validate_config  # noqa: E402

from copra.errors import UserError  # noqa: E402
from copra.flower import FLOWER_ENV, to_record  # noqa: E402
from copra.flower_app import APP_DIR, launch  # noqa: E402
from copra.flower_app.client_app import node_partition  # noqa: E402
from copra.flower_app.settings import DeploySettings, from_run_config  # noqa: E402
from copra.flower_app.strategy import DeploymentFusion, RoundFailed  # noqa: E402
from copra.merge import fusion  # noqa: E402


def app_pyproject() -> dict:
    return tomllib.loads((APP_DIR / "pyproject.toml").read_text())


def test_app_pyproject_is_valid_and_its_defaults_are_the_settings():
    config = app_pyproject()
    assert validate_config(config)[0]
    assert from_run_config(flatten_dict(config["tool"]["flwr"]["app"]["config"])) == DeploySettings()
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "copra.flower_app.server_app:app", "clientapp": "copra.flower_app.client_app:app"}


@pytest.mark.parametrize("bad", [{"epochs": 3}, {"rounds": "2"}, {"round-timeout": 0.0}, {"node-wait-timeout": -1},
                                 {"min-reply-fraction": 0.0}, {"min-reply-fraction": 1.5}, {"output-dir": "relative/out"},
                                 {"clients": 0}, {"method": "sgd"}, {"train-sets": "seed=3"}, {"min-train-nodes": -1}])
def test_settings_refuse_bad_run_config(bad):
    with pytest.raises(UserError):
        from_run_config(bad)


def test_settings_give_the_in_process_protocol_and_the_policy():
    s = from_run_config({"clients": 5, "eval-examples": 0, "train-sets": "max_length=32 rank=4", "lr": 1})
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
    for node_config in ({"partition-id": 0}, {"partition-id": 0, "num-partitions": 3}, {"partition-id": 2, "num-partitions": 2}):
        with pytest.raises(UserError):
            node_partition(node_config, 2)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 4, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}


def _reply(node: int, partition: int | None = None, n: int = 0, state=None, error: str | None = None):
    """A stand-in for a Flower reply Message (real ones need a running Flower run)."""
    if error is not None:
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: True,
                               error=SimpleNamespace(reason=error))
    content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord({"num-examples": n, "accuracy": 0.5}),
                          "client": ConfigRecord({"partition-id": partition})})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content)


def test_strategy_merges_who_answered_records_who_failed_and_stops_below_the_fraction():
    strategy = DeploymentFusion(DeploySettings(clients=3))  # needs ceil(0.5 * 3) = 2 answers
    a, b = _state(1), _state(2)
    strategy.sent[1], strategy.round_started[1] = [10, 11, 12], time.monotonic()
    arrays, _ = strategy.aggregate_train(1, [_reply(11, 1, 5, b), _reply(12, error="boom"), _reply(10, 0, 3, a)])
    merged = arrays.to_torch_state_dict()
    for key, value in fusion([a, b], [3 / 8, 5 / 8]).items():
        torch.testing.assert_close(merged[key], value)
    entry = strategy.history[-1]
    assert [x["partition_id"] for x in entry["answered"]] == [0, 1] and entry["clients"] == [0, 1]
    assert entry["failed"] == [{"node_id": 12, "partition_id": None, "reason": "error reply: boom"}]
    strategy.sent[2], strategy.round_started[2] = [10, 11, 12], time.monotonic()
    with pytest.raises(RoundFailed, match="1 of 3 clients answered, 2 needed"):
        strategy.aggregate_train(2, [_reply(10, 0, 3, a)])
    failed = {f["node_id"]: f for f in strategy.stopped["failed"]}
    assert failed[11]["partition_id"] == 1 and "no reply within round-timeout" in failed[11]["reason"]
    assert len(strategy.history) == 1  # the failed round is not merged


def test_strategy_refuses_two_nodes_for_one_partition():
    strategy = DeploymentFusion(DeploySettings(clients=2))
    strategy.sent[1], strategy.round_started[1] = [10, 11], time.monotonic()
    with pytest.raises(RoundFailed, match="partition-id 0"):
        strategy.aggregate_train(1, [_reply(10, 0, 3, _state(1)), _reply(11, 0, 3, _state(2))])


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
    assert config["superlink"] == {"default": "lab", "lab": {"address": "10.0.0.1:9093", "root-certificates": str(tls.ca_cert)}}


def test_self_made_certificate_and_node_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    tls = launch.make_tls(tmp_path / "tls")
    check = subprocess.run(["openssl", "verify", "-CAfile", str(tls.ca_cert), str(tls.server_cert)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tls.server_cert), "-noout", "-text"], capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    private, public = launch.make_node_key(tmp_path / "node")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_a_node_gone_before_the_round_counts_as_failed():
    strategy = DeploymentFusion(DeploySettings(clients=2))
    for server_round, sent in ((1, [10, 11]), (2, [10])):
        strategy.sent[server_round], strategy.round_started[server_round] = sent, time.monotonic()
        replies = [_reply(node, node - 10, 3, _state(node)) for node in sent]
        strategy.aggregate_train(server_round, replies)
    assert strategy.history[-1]["failed"] == [
        {"node_id": 11, "partition_id": 1, "reason": "answered before, not connected when the round started"}]


# --- the deployment engine itself: SuperLink + SuperNodes on loopback (slow: ~1-3 min each) ---------------------

TINY_RUN = {"shots": 2, "steps": 4, "batch-size": 4, "eval-examples": 20, "train-sets": "max_length=16", "clients": 2,
            "method": "copra", "seed": 0, "node-wait-timeout": 30.0}


@pytest.fixture
def cluster(tmp_path):
    from flower_cluster import Cluster

    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()  # every process by PID, also when the test failed


def start_federation(cluster, tls=None, keys=(None, None), register=False) -> str:
    """SuperLink (+ registered node keys) and one SuperNode per partition; returns the SuperLink address."""
    from flower_cluster import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster.start("superlink", launch.superlink_command(port, tls=tls, node_auth=register))
    launch.write_connection(cluster.home, "local", address, tls.ca_cert if tls else None)
    cluster.wait("the SuperLink", lambda: cluster.ready("superlink", "Uvicorn running"), 60)
    if register:
        for key in keys:
            done = cluster.flwr("supernode", "register", str(key.with_name(key.name + ".pub")), "local")
            assert done.returncode == 0, done.stdout + done.stderr
    for i, key in enumerate(keys):
        cluster.start(f"node{i}", launch.supernode_command(address, free_port(), i, len(keys),
                                                           root_cert=tls.ca_cert if tls else None, private_key=key))
    for i in range(len(keys)):
        cluster.wait(f"SuperNode {i}", lambda i=i: cluster.ready(f"node{i}", "SuperNode ID:"), 60)
    return address


def flwr_run(cluster, model: str, out, **values) -> None:
    from flower_cluster import write_run_config

    config = write_run_config(cluster.folder / "run.toml", {**TINY_RUN, "model": model, "output-dir": str(out), **values})
    done = cluster.flwr("run", str(APP_DIR), "local", "-c", str(config))
    assert done.returncode == 0 and "Successfully started run" in done.stdout, done.stdout + done.stderr


def in_process_rounds(model: str, survivors_in_round_2: list[int]):
    """What the federation should produce, computed here: round 1 with both clients, round 2 with the survivors."""
    from copra.evaluation import prepare_data
    from copra.experiments.federated import FederatedConfig, split_clients
    from copra.training import train

    config = FederatedConfig(task="bbc_news", model=model, clients=2, rounds=2, seeds=[0], methods=["copra"], shots=2,
                             steps=4, batch_size=4, eval_examples=20, train_overrides={"max_length": 16}, progress=False)
    data = prepare_data(config.data_config(0))
    parts = split_clients(data, 2, 0)
    sizes = [len(p.train_x) for p in parts]
    round1 = [train(config.client_config("copra", 0, 0, i), data=parts[i]).state for i in range(2)]
    merged1 = fusion(round1, [n / sum(sizes) for n in sizes])
    round2 = {i: train(config.client_config("copra", 0, 1, i), data=parts[i], initial_state=merged1).state
              for i in survivors_in_round_2}
    total = sum(sizes[i] for i in round2)
    return round2, fusion(list(round2.values()), [sizes[i] / total for i in round2])


@pytest.mark.slow
def test_deployment_run_survives_a_supernode_killed_in_the_last_round(cluster, tiny_text_model, tmp_path):
    from copra.adapters import load_adapter
    from flower_cluster import read_history

    out = tmp_path / "out"
    start_federation(cluster)
    started = time.monotonic()
    flwr_run(cluster, tiny_text_model, out, rounds=2, **{"round-timeout": 90.0})
    cluster.wait("round 1", lambda: (h := read_history(out)) and (h["rounds"] or h["status"] != "running"), 300, 0.05)
    assert read_history(out)["status"] == "running", read_history(out)
    cluster.kill("node1")  # SIGKILL SuperNode 1 and its processes while round 2 runs
    killed = time.monotonic()
    history = cluster.wait("the run's end", lambda: (h := read_history(out)) and h["status"] != "running" and h, 400, 0.5)
    print(f"\ndeployment run: {time.monotonic() - started:.1f} s, round 2 ended {time.monotonic() - killed:.1f} s "
          f"after the kill; rounds: {[(r['round'], r['seconds']) for r in history['rounds']]}")
    assert history["status"] == "finished", history
    one, two = history["rounds"]
    assert [a["partition_id"] for a in one["answered"]] == [0, 1] and one["failed"] == []
    assert [a["partition_id"] for a in two["answered"]] == [0]
    (failed,) = two["failed"]
    assert failed["partition_id"] == 1 and failed["node_id"] == one["answered"][1]["node_id"], failed
    print("node 1 recorded as:", failed["reason"])
    sent, expected = in_process_rounds(tiny_text_model, [0])
    merged, _ = load_adapter(out / "adapter")
    survivor, _ = load_adapter(out / "clients" / "round-2" / "partition-0")
    assert set(merged) == set(expected) == set(survivor)
    for key in expected:
        torch.testing.assert_close(survivor[key], sent[0][key], atol=1e-6, rtol=0)  # the survivor sent this
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)  # = fusion of the survivor alone
    assert not (out / "clients" / "round-2" / "partition-1").exists()


@pytest.mark.slow
def test_tls_and_supernode_auth_admit_registered_nodes_only(cluster, tiny_text_model, tmp_path):
    from flower_cluster import free_port, read_history

    tls = launch.make_tls(tmp_path / "tls")
    keys = [launch.make_node_key(tmp_path / "keys" / f"node{i}")[0] for i in range(2)]
    rogue, _ = launch.make_node_key(tmp_path / "keys" / "rogue")  # never registered
    address = start_federation(cluster, tls=tls, keys=keys, register=True)
    intruder = cluster.start("rogue", launch.supernode_command(address, free_port(), 0, 2, root_cert=tls.ca_cert,
                                                               private_key=rogue, max_wait=10))
    cluster.wait("the unregistered SuperNode to give up", lambda: intruder.poll() is not None, 120)
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in cluster.log("rogue"), cluster.log("rogue")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")
    out = tmp_path / "out"
    flwr_run(cluster, tiny_text_model, out, rounds=1, **{"round-timeout": 300.0})
    history = cluster.wait("the run's end", lambda: (h := read_history(out)) and h["status"] != "running" and h, 400, 0.5)
    assert history["status"] == "finished", history
    (only,) = history["rounds"]
    assert [a["partition_id"] for a in only["answered"]] == [0, 1] and only["failed"] == []
    listed = cluster.flwr("supernode", "ls", "local", "--format", "json")
    nodes = {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}
    assert set(nodes) == {a["node_id"] for a in only["answered"]} and set(nodes.values()) == {"online"}
