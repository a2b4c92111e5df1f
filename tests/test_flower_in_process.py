"""copra's deployment ServerApp and ClientApp in one process (a fake grid instead of a SuperLink): a DP run whose
ServerApp dies after round 2 resumes to the uninterrupted adapter, and knows its nodes' partitions after the resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from copra.adapters.io import load_adapter  # noqa: E402


class InProcessGrid:
    """Messages to node 1 or 2 go straight to copra's ClientApp handler for partition 0 or 1.

    Node 2 sends nothing in the rounds in `silent` (a dead SuperNode); the push of round `die_at`
    raises KeyboardInterrupt instead (the ServerApp process dies).
    """

    def __init__(self, run_config: dict, silent: set[int], die_at: int | None = None) -> None:
        self.run_config, self.silent, self.die_at = run_config, silent, die_at
        self.replies: dict[str, object] = {}

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def push_messages(self, messages) -> list[str]:
        from copra.federated.app.client_app import train

        ids = []
        for msg in messages:
            node, server_round = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
            if server_round == self.die_at:
                raise KeyboardInterrupt
            ids.append(f"r{server_round}n{node}")
            if node == 2 and server_round in self.silent:
                continue
            context = SimpleNamespace(
                run_config=self.run_config, node_config={"partition-id": node - 1, "num-partitions": 2}
            )
            metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=ids[-1])
            content = train(msg, context).content
            self.replies[ids[-1]] = SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content)
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def serve(run_config: dict, run_id: int, die_at: int | None = None) -> dict:
    from copra.federated.app.server_app import main

    main(InProcessGrid(run_config, silent={3}, die_at=die_at), SimpleNamespace(run_config=run_config, run_id=run_id))
    return json.loads((Path(run_config["output-dir"]) / "history.json").read_text())


def test_a_dp_server_killed_after_round_2_resumes_to_the_uninterrupted_adapter(tiny_text_model, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set before it builds Messages
        monkeypatch.setattr(TaskIdentity, name, 1)
    settings = {
        "model": tiny_text_model, "clients": 2, "rounds": 3, "shots": 2, "steps": 2, "batch-size": 4,
        "eval-examples": 20, "overrides": "max_length=16", "straggler-timeout": 0.2,
        "dp-noise-multiplier": 1.0, "dp-clip-norm": 1.0, "norm-factor": 0.0,
    }  # fmt: skip
    whole = serve(settings | {"output-dir": str(tmp_path / "whole")}, run_id=1)
    config = settings | {"output-dir": str(tmp_path / "killed")}
    with pytest.raises(KeyboardInterrupt):
        serve(config, run_id=2, die_at=3)
    stopped = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert len(stopped["rounds"]) == 2 and stopped["node_partitions"] == {"1": 0, "2": 1} and stopped["noise_rng"]
    resumed = serve(config, run_id=3)
    assert resumed["status"] == "finished" and resumed["resumes"][0]["after_round"] == 2
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    # node 2 is silent in round 3, the first after the resume: its failure still names its partition
    assert resumed["rounds"][2]["failed"] == [
        {"node_id": 2, "partition_id": 1, "reason": "no reply when the round closed (straggler-timeout 0.2 s)"}
    ]
    assert [r["dp"]["noise_std"] for r in resumed["rounds"]] == [0.5, 0.5, 1.0]  # z * clip / accepted replies
    assert [r["dp"] for r in resumed["rounds"]] == [r["dp"] for r in whole["rounds"]]
    assert resumed["settings"]["dp_noise_multiplier"] == 1.0 and resumed["noise_rng"] == whole["noise_rng"]
    mine, _ = load_adapter(tmp_path / "killed" / "adapter")
    theirs, _ = load_adapter(tmp_path / "whole" / "adapter")
    for key in theirs:  # round 3 drew its noise on from round 2's generator state
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0)
