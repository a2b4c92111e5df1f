"""Fuzzed replies through copra's deployment ServerApp (issue 26, item 5): one node sends hypothesis-made garbage
every round while two train honestly; each bad reply is rejected with a reason in history.json, every round merges
the honest replies, and the ServerApp never raises. Both apps run in one process through a fake grid."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from copra.adapters.io import load_adapter  # noqa: E402
from copra.adapters.merge import fusion  # noqa: E402
from copra.federated.replies import from_record, to_record  # noqa: E402

BAD_NODE, BAD_PARTITION = 3, 2  # nodes 1 and 2 train partitions 0 and 1
SIZES = [4, 3, 3]  # bbc_news: 5 classes x 2 shots split over 3 clients
HONEST: dict[tuple, object] = {}  # (round, node, start digest) -> reply content: honest clients train once per start

# what the recorded reason of each kind of bad reply must say (any one of them)
REASONS = {
    "missing": ("key(s) missing",),
    "extra": ("unexpected key",),
    "shape": ("shape", "rank"),
    "rank": ("rank",),
    "dtype": ("dtype", "unreadable reply"),
    "nonfinite": ("NaN or inf",),
    "huge": ("NaN or inf", "update norm"),
    "empty": ("unreadable reply", "key(s) missing"),
    "records": ("unreadable reply",),
    "non_array": ("unreadable reply",),
    "partition": ("partition-id",),
    "count": ("num-examples",),
    "lora": ("LoRA setting",),
    "accuracy": ("accuracy",),
}
DTYPES = [np.float64, np.float16, np.int8, np.int64, np.uint8, np.bool_, np.complex64]
EVERY_KIND = [  # one ServerApp run with one bad reply of each kind per round, beside the drawn ones
    ("missing", {"pick": 0}), ("extra", {"pick": 0, "name": "m.lora_C.weight"}), ("shape", {"pick": 1, "shape": [2]}),
    ("rank", {"pick": 0, "delta": 1}), ("dtype", {"pick": 0, "dtype": np.float64}),
    ("nonfinite", {"pick": 7, "value": math.inf}), ("huge", {"pick": 0, "factor": 1e6}),
    ("empty", {"pick": 0, "which": 0}), ("records", {"pick": 0, "which": "metrics"}),
    ("non_array", {"pick": 0, "which": 1}), ("partition", {"pick": 0, "value": 3}),
    ("count", {"pick": 0, "value": 30}), ("lora", {"pick": 0, "setting": "lora-alpha"}),
    ("accuracy", {"pick": 0, "value": "high"}),
]  # fmt: skip


@st.composite
def bad_reply(draw) -> tuple[str, dict]:
    """(kind, what to draw it from): applied to an honest reply of the round by `corrupt`."""
    kind = draw(st.sampled_from(sorted(REASONS)))
    pick = draw(st.integers(0, 10**6))  # which key / coordinate, modulo what there is
    p: dict = {"pick": pick}
    if kind == "extra":
        p["name"] = draw(st.text(min_size=1, max_size=12))
    elif kind == "shape":
        p["shape"] = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    elif kind == "rank":
        p["delta"] = draw(st.sampled_from([-1, 1, 2, 5]))
    elif kind == "dtype":
        p["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "nonfinite":
        p["value"] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "huge":
        p["factor"] = draw(st.floats(1e4, 1e38))
    elif kind in ("empty", "records", "non_array"):
        p["which"] = draw(st.sampled_from(["arrays", "metrics", "client"] if kind == "records" else [0, 1]))
    elif kind == "partition":
        p["value"] = draw(
            st.one_of(st.integers(max_value=-1), st.integers(min_value=3), st.text(max_size=3), st.booleans())
        )
    elif kind == "count":
        p["value"] = draw(
            st.one_of(st.integers(max_value=2), st.integers(min_value=4), st.floats().filter(lambda x: x != 3))
        )
    elif kind == "lora":
        p["setting"] = draw(st.sampled_from(["rank", "lora-alpha", "use-rslora", "target-modules"]))
    elif kind == "accuracy":
        p["value"] = draw(st.text(max_size=4))
    return kind, p


def corrupt(kind: str, p: dict, honest: RecordDict) -> RecordDict:
    """Partition 2's reply, made from an honest reply with exactly one thing wrong."""
    state, lora = from_record(honest["arrays"]), dict(honest["lora"])
    keys, pick = sorted(state), p["pick"]
    arrays: ArrayRecord | ConfigRecord | MetricRecord | None = None
    client = ConfigRecord({"partition-id": BAD_PARTITION})
    metrics: MetricRecord | ConfigRecord = MetricRecord({"num-examples": SIZES[BAD_PARTITION], "accuracy": 0.5})
    if kind == "missing":
        state.pop(keys[pick % len(keys)])
    elif kind == "extra":
        state[p["name"] if p["name"] not in state else p["name"] + "+"] = torch.zeros(2)
    elif kind == "shape":
        key = keys[pick % len(keys)]
        shape = p["shape"] if p["shape"] != list(state[key].shape) else [*p["shape"], 1]
        state[key] = torch.randn(shape)
    elif kind == "rank":  # every factor of another rank: shapes consistent with each other, rank wrong
        rank = lora["rank"] + p["delta"]
        for key, v in state.items():
            if "lora_A" in key:
                state[key] = torch.randn(rank, v.shape[1])
            elif "lora_B" in key:
                state[key] = torch.randn(v.shape[0], rank)
    elif kind == "dtype":
        arrays = ArrayRecord({k: Array(v.numpy().astype(p["dtype"])) for k, v in state.items()})
    elif kind == "nonfinite":
        flat = state[keys[pick % len(keys)]].view(-1)
        flat[pick % flat.numel()] = p["value"]
    elif kind == "huge":
        state = {k: v * p["factor"] for k, v in state.items()}
    elif kind == "empty":
        if p["which"] == 0:
            return RecordDict()
        arrays = ArrayRecord()
    elif kind == "non_array":
        arrays = ConfigRecord({"arrays": "none"}) if p["which"] == 0 else MetricRecord({"m.lora_A.weight": 1.0})
    elif kind == "partition":
        client = ConfigRecord({"partition-id": p["value"]})
    elif kind == "count":
        metrics = MetricRecord({"num-examples": p["value"], "accuracy": 0.5})
    elif kind == "lora":
        other = {
            "rank": lora["rank"] + 1,
            "lora-alpha": lora["lora-alpha"] + 1.0,
            "use-rslora": not lora["use-rslora"],
        }
        lora[p["setting"]] = other.get(p["setting"], ["other_module"])
    elif kind == "accuracy":
        metrics = ConfigRecord({"num-examples": SIZES[BAD_PARTITION], "accuracy": p["value"]})
    records = {
        "arrays": to_record(state) if arrays is None else arrays,
        "metrics": metrics,
        "client": client,
        "lora": ConfigRecord(lora),
    }
    if kind == "records":
        records.pop(p["which"])
    return RecordDict(records)


def digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode() + arrays[key].numpy().tobytes())
    return h.hexdigest()


class FuzzGrid:
    """Nodes 1 and 2 answer through copra's ClientApp (partitions 0 and 1); node 3 sends the round's bad reply."""

    def __init__(self, run_config: dict, bad: list[tuple[str, dict]]) -> None:
        self.run_config, self.bad, self.replies = run_config, bad, {}

    def get_node_ids(self) -> list[int]:
        return [1, 2, BAD_NODE]

    def push_messages(self, messages) -> list[str]:
        from copra.federated.app.client_app import train

        ids, honest = [], {}
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node, server_round = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
            ids.append(f"r{server_round}n{node}")
            if node == BAD_NODE:
                kind, p = self.bad[server_round - 1]
                content = corrupt(kind, p, honest[1])
            else:
                key = (server_round, node, digest(msg.content["arrays"]))
                if key not in HONEST:
                    context = SimpleNamespace(
                        run_config=self.run_config, node_config={"partition-id": node - 1, "num-partitions": 3}
                    )
                    HONEST[key] = train(msg, context).content
                content = honest[node] = HONEST[key]
            metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=ids[-1])
            self.replies[ids[-1]] = SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content)
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def flower_messages(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set before it builds Messages
        monkeypatch.setattr(TaskIdentity, name, 1)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(bad=st.lists(bad_reply(), min_size=1, max_size=3))
@example(bad=EVERY_KIND)
def test_every_fuzzed_reply_is_rejected_with_its_reason_and_the_honest_ones_merge(
    tiny_text_model, flower_messages, bad
):
    from copra.federated.app.server_app import main

    with tempfile.TemporaryDirectory() as folder:
        run_config = {
            "model": tiny_text_model, "clients": 3, "rounds": len(bad), "shots": 2, "steps": 1, "batch-size": 4,
            "eval-examples": 20, "overrides": "max_length=16", "straggler-timeout": 0.2, "output-dir": folder,
        }  # fmt: skip
        main(FuzzGrid(run_config, bad), SimpleNamespace(run_config=run_config, run_id=1))  # never raises
        history = json.loads((Path(folder) / "history.json").read_text())
        assert history["status"] == "finished" and len(history["rounds"]) == len(bad)
        for (kind, _), entry in zip(bad, history["rounds"]):
            assert [a["partition_id"] for a in entry["answered"]] == [0, 1] and entry["failed"] == []
            (rejected,) = entry["rejected"]
            assert rejected["node_id"] == BAD_NODE, (kind, rejected)
            assert any(why in rejected["reason"] for why in REASONS[kind]), (kind, rejected)
            assert math.isfinite(entry["merged_accuracy"])
            clients = Path(folder) / "clients" / f"round-{entry['round']}"
            states = [load_adapter(clients / f"partition-{i}")[0] for i in (0, 1)]
            merged, _ = load_adapter(Path(folder) / "merged" / f"round-{entry['round']}")
            for key, value in fusion(states, [4 / 7, 3 / 7]).items():  # the honest replies, weights n_i / N
                torch.testing.assert_close(merged[key], value)


def test_the_explicit_example_covers_every_kind():
    assert sorted(kind for kind, _ in EVERY_KIND) == sorted(REASONS)
