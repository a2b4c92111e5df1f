"""Flower's deployment engine on loopback: a SuperLink and SuperNodes as real processes (slow: 2-5 min each).

Every process is started by `flower_cluster.Cluster` and stopped by PID in the fixture's finalizer,
also when a test fails. Ports are free loopback ports; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("flwr")

from copra.adapters.merge import fusion  # noqa: E402
from copra.federated.app import APP_DIR, launch  # noqa: E402

from flower_cluster import Cluster, free_port, read_history, write_run_config  # noqa: E402

TINY_RUN = {
    "shots": 2,
    "steps": 4,
    "batch-size": 4,
    "eval-examples": 20,
    "overrides": "max_length=16",
    "clients": 2,
    "method": "copra",
    "seed": 0,
    "node-wait-timeout": 30.0,
}


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()  # every process by PID, also when the test failed


def start_federation(cluster, tls=None, keys=(None, None), register=False) -> str:
    """SuperLink (+ registered node keys) and one SuperNode per partition; returns the SuperLink address."""
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
        cluster.start(
            f"node{i}",
            launch.supernode_command(
                address, free_port(), i, len(keys), root_cert=tls.ca_cert if tls else None, private_key=key
            ),
        )
    for i in range(len(keys)):
        cluster.wait(f"SuperNode {i}", lambda i=i: cluster.ready(f"node{i}", "SuperNode ID:"), 60)
    return address


def flwr_run(cluster, model: str, out, **values) -> None:
    config = write_run_config(
        cluster.folder / "run.toml", {**TINY_RUN, "model": model, "output-dir": str(out), **values}
    )
    done = cluster.flwr("run", str(APP_DIR), "local", "-c", str(config))
    assert done.returncode == 0 and "Successfully started run" in done.stdout, done.stdout + done.stderr


def in_process_rounds(model: str, survivors_in_round_2: list[int]):
    """What the federation should produce, computed here: round 1 with both clients, round 2 with the survivors."""
    from copra.experiments.federated import FederatedConfig, split_clients
    from copra.models.evaluation import prepare_data
    from copra.training.loop import train

    config = FederatedConfig(
        task="bbc_news",
        model=model,
        clients=2,
        rounds=2,
        seeds=[0],
        methods=["copra"],
        shots=2,
        steps=4,
        batch_size=4,
        eval_examples=20,
        overrides={"max_length": 16},
        progress=False,
    )
    data = prepare_data(config.data_config(0))
    parts = split_clients(data, 2, 0)
    sizes = [len(p.train_x) for p in parts]
    round1 = [train(config.client_config("copra", 0, 0, i), data=parts[i]).state for i in range(2)]
    merged1 = fusion(round1, [n / sum(sizes) for n in sizes])
    round2 = {
        i: train(config.client_config("copra", 0, 1, i), data=parts[i], initial_state=merged1).state
        for i in survivors_in_round_2
    }
    total = sum(sizes[i] for i in round2)
    return round2, fusion(list(round2.values()), [sizes[i] / total for i in round2])


@pytest.mark.slow
@pytest.mark.deployment
def test_deployment_run_survives_a_supernode_killed_in_the_last_round(cluster, tiny_text_model, tmp_path):
    from copra.adapters.io import load_adapter

    out = tmp_path / "out"
    start_federation(cluster)
    started = time.monotonic()
    flwr_run(cluster, tiny_text_model, out, rounds=2, **{"round-timeout": 300.0, "straggler-timeout": 20.0})
    cluster.wait("round 1", lambda: (h := read_history(out)) and (h["rounds"] or h["status"] != "running"), 300, 0.05)
    assert read_history(out)["status"] == "running", read_history(out)
    cluster.kill("node1")  # SIGKILL SuperNode 1 and its processes while round 2 runs
    killed = time.monotonic()
    history = cluster.wait(
        "the run's end", lambda: (h := read_history(out)) and h["status"] != "running" and h, 400, 0.5
    )
    print(
        f"\ndeployment run: {time.monotonic() - started:.1f} s, round 2 ended {time.monotonic() - killed:.1f} s "
        f"after the kill; rounds: {[(r['round'], r['seconds']) for r in history['rounds']]}"
    )
    assert history["status"] == "finished", history
    one, two = history["rounds"]
    assert [a["partition_id"] for a in one["answered"]] == [0, 1] and one["failed"] == []
    assert [a["partition_id"] for a in two["answered"]] == [0]
    assert len(two["failed"]) == 1, two
    (failed,) = two["failed"]
    assert failed["partition_id"] == 1 and failed["node_id"] == one["answered"][1]["node_id"], failed
    # whichever came first: the straggler timeout after the survivor answered, or Flower's heartbeat
    assert "Node Unavailable" in failed["reason"] or "(straggler-timeout 20 s)" in failed["reason"], failed
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
@pytest.mark.deployment
def test_tls_and_supernode_auth_admit_registered_nodes_only(cluster, tiny_text_model, tmp_path):
    tls = launch.make_tls(tmp_path / "tls")
    keys = [launch.make_node_key(tmp_path / "keys" / f"node{i}")[0] for i in range(2)]
    rogue, _ = launch.make_node_key(tmp_path / "keys" / "rogue")  # never registered
    address = start_federation(cluster, tls=tls, keys=keys, register=True)
    intruder = cluster.start(
        "rogue",
        launch.supernode_command(address, free_port(), 0, 2, root_cert=tls.ca_cert, private_key=rogue, max_wait=10),
    )
    cluster.wait("the unregistered SuperNode to give up", lambda: intruder.poll() is not None, 120)
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in cluster.log("rogue"), cluster.log("rogue")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")
    out = tmp_path / "out"
    flwr_run(cluster, tiny_text_model, out, rounds=1, **{"round-timeout": 300.0})
    history = cluster.wait(
        "the run's end", lambda: (h := read_history(out)) and h["status"] != "running" and h, 400, 0.5
    )
    assert history["status"] == "finished", history
    (only,) = history["rounds"]
    assert [a["partition_id"] for a in only["answered"]] == [0, 1] and only["failed"] == []
    listed = cluster.flwr("supernode", "ls", "local", "--format", "json")
    assert listed.returncode == 0 and listed.stdout.strip(), listed
    nodes = {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}
    assert set(nodes) == {a["node_id"] for a in only["answered"]} and set(nodes.values()) == {"online"}
