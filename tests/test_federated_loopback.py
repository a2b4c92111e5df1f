"""Issue 26 on loopback (slow, several minutes): a bad node, a killed and restarted node, a killed and resumed ServerApp.

3 SuperNodes, 4 rounds. Node 2 sends a NaN adapter in round 2 and a x100 one in round 3 (run config
`faults`); the ServerApp is SIGKILLed once round 2 is recorded, honest node 1 is SIGKILLed and
restarted while the server is down, and `flwr run` starts the same run again, which continues after
round 2. The merged adapter must equal the in-process protocol's with the same faults (whose screening
rejects the same replies), and history.json must list every round once with its rejections.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from test_flower_engine import flwr_run  # noqa: E402

from copra.federated.app import launch  # noqa: E402

from flower_cluster import Cluster, free_port, read_history  # noqa: E402

FAULTS = "2=nan@2 2=scale100@3"


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def start_node(cluster, address: str, i: int, name: str | None = None) -> None:
    cluster.start(name or f"node{i}", launch.supernode_command(address, free_port(), i, 3))
    cluster.wait(f"SuperNode {i}", lambda: cluster.ready(name or f"node{i}", "SuperNode ID:"), 60)


def serverapps(cluster) -> list:
    cluster.track()
    return [p for p in cluster.seen.values() if _alive(p) and "flwr-serverapp" in " ".join(_cmdline(p))]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def in_process(model: str):
    from copra.experiments.federated import FederatedConfig, simulate

    config = FederatedConfig(
        task="bbc_news", model=model, clients=3, rounds=4, seeds=[0], methods=["copra"], shots=2, steps=4,
        batch_size=4, eval_examples=20, overrides={"max_length": 16}, faults=FAULTS.split(), progress=False,
    )  # fmt: skip
    return simulate(config, "copra", 0)


@pytest.mark.slow
@pytest.mark.deployment
def test_bad_node_killed_node_and_killed_server_leave_the_honest_robust_merge(cluster, tiny_text_model, tmp_path):
    import signal

    from copra.adapters.io import load_adapter

    out = tmp_path / "out"
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster.start("superlink", launch.superlink_command(port, database=tmp_path / "superlink.db"))
    launch.write_connection(cluster.home, "local", address)
    cluster.wait("the SuperLink", lambda: cluster.ready("superlink", "Uvicorn running"), 60)
    for i in range(3):
        start_node(cluster, address, i)
    values = {"clients": 3, "rounds": 4, "faults": FAULTS, "round-timeout": 300.0, "straggler-timeout": 20.0}
    flwr_run(cluster, tiny_text_model, out, **values)
    cluster.wait(
        "round 2", lambda: (h := read_history(out)) and (len(h["rounds"]) >= 2 or h["status"] != "running"), 500, 0.05
    )
    (server,) = cluster.wait("the ServerApp process", lambda: serverapps(cluster), 30)
    server.send_signal(signal.SIGKILL)  # the ServerApp dies after round 2
    cluster.kill("node1")  # and an honest SuperNode dies while it is down ...
    start_node(cluster, address, 1, "node1-again")  # ... and comes back (a new node id, partition 1)
    assert read_history(out)["status"] == "running" and len(read_history(out)["rounds"]) == 2
    flwr_run(cluster, tiny_text_model, out, **values)  # the same run again: continues after round 2
    history = cluster.wait(
        "the run's end", lambda: (h := read_history(out)) and h["status"] != "running" and h, 600, 0.5
    )
    assert history["status"] == "finished", history
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4]  # no round lost or counted twice
    (resume,) = history["resumes"]
    assert resume["after_round"] == 2 and resume["status"] == "running"  # killed: it never wrote an end
    for r in history["rounds"]:
        answered = [a["partition_id"] for a in r["answered"]]
        rejected = {x["partition_id"]: x["reason"] for x in r["rejected"]}
        if r["round"] in (2, 3):
            assert answered == [0, 1] and set(rejected) == {2}, r
        else:
            assert answered == [0, 1, 2] and rejected == {}, r
    assert "NaN or inf" in history["rounds"][1]["rejected"][0]["reason"]
    assert "by more than x10" in history["rounds"][2]["rejected"][0]["reason"]
    print("\nfailures recorded:", [(r["round"], r["failed"]) for r in history["rounds"]])
    # every failed node had answered before (node 1's old id): its partition is known, after the resume too
    assert all(f["partition_id"] is not None for r in history["rounds"] for f in r["failed"])
    want = in_process(tiny_text_model)  # the same faults, screened the same way, in one process
    assert [r["accepted"] for r in want.rounds] == [[0, 1, 2], [0, 1], [0, 1], [0, 1, 2]]
    merged, _ = load_adapter(out / "adapter")
    assert set(merged) == set(want.merged_state)
    for key, value in want.merged_state.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=0)
