"""The deployment ServerApp's reply screening, robust merge and resume, on constructed Flower replies."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from copra.adapters.merge import fusion  # noqa: E402
from copra.federated.app.settings import DeploySettings, from_run_config  # noqa: E402
from copra.federated.app.strategy import DeploymentFusion, RoundFailed  # noqa: E402
from copra.federated.privacy import GaussianNoise, dp_merge  # noqa: E402
from copra.federated.replies import read_reply, to_record  # noqa: E402
from copra.federated.robust import apply_fault  # noqa: E402
from copra.utils.errors import UserError  # noqa: E402

LORA = {"rank": 2, "lora-alpha": 1.0, "use-rslora": True, "target-modules": ["query"]}
SIZES = [3, 5, 4, 4]


def state(seed: int, start: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {"m.lora_A.weight": torch.randn(2, 4, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}
    return s if start is None else {k: start[k] + 0.1 * v for k, v in s.items()}


START = state(99)


def content(partition, n, arrays, lora=LORA, accuracy=0.5) -> RecordDict:
    return RecordDict(
        {
            "arrays": arrays if isinstance(arrays, ArrayRecord) else to_record(arrays),
            "metrics": MetricRecord({"num-examples": n, "accuracy": accuracy}),
            "client": ConfigRecord({"partition-id": partition}),
            "lora": ConfigRecord(lora),
        }
    )


def reply(node: int, body: RecordDict, server_round: int = 1):
    metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=f"r{server_round}n{node}")
    return SimpleNamespace(metadata=metadata, has_error=lambda: False, content=body)


def strategy_for(round_: int = 1, nodes=(10, 11, 12, 13), **settings) -> DeploymentFusion:
    s = DeploymentFusion(
        DeploySettings(clients=len(SIZES), **settings), reference=START, expected_lora=LORA, sizes=SIZES
    )
    s.sent[round_], s.round_started[round_], s.starts[round_] = list(nodes), 0.0, START
    s.asked[round_] = {f"r{round_}n{node}": node for node in nodes}
    s.closed[round_] = "all nodes replied"
    return s


def test_a_nan_and_a_x100_reply_are_rejected_with_node_partition_and_reason():
    honest = {p: state(p, START) for p in range(4)}
    strategy = strategy_for()
    replies = [
        reply(10, content(0, 3, honest[0])),
        reply(11, content(1, 5, apply_fault(honest[1], "nan"))),
        reply(12, content(2, 4, honest[2])),
        reply(13, content(3, 4, {k: START[k] + 100 * (v - START[k]) for k, v in honest[3].items()})),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    entry = strategy.history[-1]
    assert [a["partition_id"] for a in entry["answered"]] == [0, 2]
    rejected = {r["partition_id"]: r for r in entry["rejected"]}
    assert set(rejected) == {1, 3} and rejected[1]["node_id"] == 11 and rejected[3]["node_id"] == 13
    assert "NaN or inf" in rejected[1]["reason"] and "by more than x10" in rejected[3]["reason"]
    merged = arrays.to_torch_state_dict()
    for key, value in fusion([honest[0], honest[2]], [3 / 7, 4 / 7]).items():
        torch.testing.assert_close(merged[key], value)
    assert metrics["num-examples"] == 7


@pytest.mark.parametrize("aggregate", ["trimmed_mean", "median", "krum"])
def test_robust_aggregates_merge_the_accepted_replies_as_the_pure_function_does(aggregate):
    from copra.federated import robust

    honest = {p: state(p, START) for p in range(4)}
    strategy = strategy_for(aggregate=aggregate)
    arrays, _ = strategy.aggregate_train(1, [reply(10 + p, content(p, SIZES[p], honest[p])) for p in range(4)])
    want = robust.aggregate([honest[p] for p in range(4)], [n / 16 for n in SIZES], aggregate, 0.0, START, 1)
    merged = arrays.to_torch_state_dict()
    for key in want:
        torch.testing.assert_close(merged[key], want[key])


def test_claims_counts_and_lora_settings_that_do_not_fit_are_rejected():
    honest = {p: state(p, START) for p in range(4)}
    strategy = strategy_for(min_reply_fraction=0.25)
    replies = [
        reply(10, content(0, 3, honest[0])),
        reply(11, content(0, 3, honest[1])),  # a second node claims partition 0
        reply(12, content(2, 400, honest[2])),  # inflates its weight
        reply(13, content(3, 4, honest[3], lora=LORA | {"lora-alpha": 16.0})),  # another LoRA setup
    ]
    with pytest.raises(RoundFailed, match="0 of 4 clients' replies accepted"):
        strategy.aggregate_train(1, replies)
    reasons = {r["node_id"]: r["reason"] for r in strategy.stopped["rejected"]}
    assert reasons[10] == reasons[11] == "partition-id 0 claimed by nodes [10, 11]"
    assert reasons[12] == "num-examples 400, the split gives 4"
    assert reasons[13] == "LoRA setting lora-alpha = 16.0, expected 1.0"
    assert strategy.stopped["failed"] == [] and strategy.history == []


def test_a_resumed_strategy_numbers_rounds_from_first_round(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set before it builds Messages
        monkeypatch.setattr(TaskIdentity, name, 1)
    strategy = DeploymentFusion(DeploySettings(clients=1, min_train_nodes=1), first_round=3)
    grid = SimpleNamespace(get_node_ids=lambda: [7])
    (message,) = strategy.configure_train(1, to_record(START), ConfigRecord(), grid)
    assert message.content["config"]["server-round"] == 3  # the clients train round 3's seeds
    strategy.asked[1] = {"r1n7": 7}
    strategy.aggregate_train(1, [reply(7, content(0, 3, state(1, START)))])
    assert strategy.history[-1]["round"] == 3


def test_the_settings_validate_the_robust_keys():
    s = from_run_config({"aggregate": "krum", "clip-norm": 2, "norm-factor": 0.0, "faults": "1=nan@2"})
    fed = s.federated()
    assert (fed.aggregate, fed.clip_norm, fed.norm_factor, fed.faults) == ("krum", 2.0, 0.0, ["1=nan@2"])
    assert fed.fault_of(1, 1) == "nan" and fed.fault_of(1, 0) is None
    for bad in ({"aggregate": "mean"}, {"clip-norm": -1.0}, {"norm-factor": 0.5}, {"faults": "5=nan"}):
        with pytest.raises(UserError):
            from_run_config(bad)
    dp = from_run_config({"dp-noise-multiplier": 1.0, "dp-clip-norm": 0.5, "norm-factor": 0.0})
    assert dp.policy().dp and (dp.federated().dp_noise_multiplier, dp.federated().dp_clip_norm) == (1.0, 0.5)
    for bad in ({"dp-noise-multiplier": 1.0, "norm-factor": 0.0}, {"dp-clip-norm": -1.0}, {"dp-clip-norm": 1.0}):
        with pytest.raises(UserError, match="dp_"):
            from_run_config(bad)


def test_a_dp_server_screens_first_then_merges_the_noised_mean_of_clipped_updates():
    strategy = strategy_for(dp_noise_multiplier=0.7, dp_clip_norm=0.05, norm_factor=0.0)
    good = [state(i, START) for i in range(3)]  # updates of norm ~0.4: all clipped to 0.05
    wrong_shape = good[0] | {"m.lora_B.weight": torch.zeros(4, 3)}  # Flower's own wrapper would raise on it
    replies = [reply(10 + i, content(i, SIZES[i], good[i])) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, [*replies, reply(13, content(3, SIZES[3], wrong_shape))])
    entry = strategy.history[-1]
    assert [r["partition_id"] for r in entry["rejected"]] == [3] and entry["clients"] == [0, 1, 2]
    noise = GaussianNoise(0)  # the run seed's generator, its first draw
    want, record = dp_merge(good, START, 0.05, 0.7, noise)
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], want[k]) for k in want)
    assert entry["dp"] == record and record["noise_std"] == pytest.approx(0.7 * 0.05 / 3) and record["clipped"] == 3
    assert entry["noise_rng"] == noise.state() != GaussianNoise(0).state()  # what a resumed server draws on from


# --- fuzzed replies: each one rejected with a recorded reason, never a crash --------------------------------

_DTYPES = [np.float64, np.float16, np.int8, np.int64, np.uint8, np.bool_, np.complex64]


@st.composite
def bad_content(draw):
    good = state(draw(st.integers(0, 5)), START)
    kind = draw(st.sampled_from(["keys", "shape", "dtype", "huge", "nan", "partition", "count", "records", "lora"]))
    arrays: dict | ArrayRecord = good
    partition, n, lora = 1, SIZES[1], LORA
    if kind == "keys":
        arrays = {draw(st.text(min_size=1, max_size=8)): good["m.lora_A.weight"]}
    elif kind == "shape":
        arrays = good | {"m.lora_B.weight": torch.zeros(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))}
        if list(arrays["m.lora_B.weight"].shape) == [4, 2]:
            arrays["m.lora_B.weight"] = torch.zeros(4, 3)
    elif kind == "dtype":
        dtype = draw(st.sampled_from(_DTYPES))
        arrays = ArrayRecord({k: Array(v.numpy().astype(dtype)) for k, v in good.items()})
    elif kind == "huge":
        arrays = {k: v * draw(st.floats(1e4, 1e30)) for k, v in good.items()}
    elif kind == "nan":
        arrays = apply_fault(good, "nan")
    elif kind == "partition":
        partition = draw(st.one_of(st.integers().filter(lambda p: not 0 <= p < 4), st.text(max_size=3), st.booleans()))
    elif kind == "count":
        n = draw(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True).filter(lambda x: x != SIZES[1])))
    elif kind == "lora":
        lora = LORA | {"rank": draw(st.integers().filter(lambda r: r != 2))}
    if kind == "records":
        body = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
    else:
        body = content(partition, n, arrays, lora)
    return kind, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_content())
def test_every_fuzzed_reply_is_rejected_with_a_reason_never_a_crash(case):
    kind, body = case
    strategy = strategy_for(nodes=(10, 11, 12))
    honest = [reply(10, content(0, 3, state(0, START))), reply(12, content(2, 4, state(2, START)))]
    arrays, _ = strategy.aggregate_train(1, [*honest, reply(11, body)])
    entry = strategy.history[-1]
    assert [a["partition_id"] for a in entry["answered"]] == [0, 2], (kind, entry["rejected"])
    (rejected,) = entry["rejected"]
    assert rejected["node_id"] == 11 and isinstance(rejected["reason"], str) and rejected["reason"]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def test_read_reply_never_raises_on_garbage():
    for body in (None, 3, "x", {}, RecordDict(), {"client": {"partition-id": 0}}):
        got = read_reply(body, 1, 4)
        assert isinstance(got, tuple) and isinstance(got[1], str)


# --- the ServerApp's record: resume, refusal ------------------------------------------------------------------


def test_server_record_resumes_after_the_last_round_and_refuses_other_settings(tmp_path, tiny_text_model):
    from copra.federated.app.server_app import RunRecord
    from copra.models.evaluation import adapter_state, prepare_data
    from copra.training.loop import build_run

    settings = DeploySettings(
        model=tiny_text_model, clients=2, rounds=3, shots=2, steps=2, batch_size=4, eval_examples=20,
        overrides="max_length=16", output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    out = settings.output(1)
    record = RunRecord(settings, out, run_id=1)
    assert record.done == 0 and record.start_state() is None
    config = settings.federated()
    evaluator, _ = build_run(config.client_config("copra", 0, 0, 0), prepare_data(config.data_config(0)))
    merged = adapter_state(evaluator)
    for r in (1, 2):
        entry = {"round": r, "sent_to": [5, 6], "answered": [], "rejected": [], "failed": [], "seconds": 1.0}
        record.add_round(entry | {"client_states": []}, evaluator, 0.5)
    record.finish(RuntimeError("ServerApp killed"))
    again = RunRecord(settings, out, run_id=2)
    assert again.done == 2 and [r["round"] for r in again.data["rounds"]] == [1, 2]
    assert again.data["resumes"] == [
        {"run_id": 1, "status": "failed", "error": "RuntimeError: ServerApp killed", "failed_round": None,
         "after_round": 2, "by_run_id": 2}
    ]  # fmt: skip
    start = again.start_state()
    assert all(torch.equal(start[k], merged[k]) for k in merged)
    before = (out / "history.json").read_bytes()
    changed = DeploySettings(**(settings.to_dict() | {"aggregate": "median"}))
    with pytest.raises(UserError, match=r"holds a federated run with aggregate='fusion', now 'median'"):
        RunRecord(changed, out, run_id=3)
    assert (out / "history.json").read_bytes() == before
    assert json.loads(before)["status"] == "running"


def test_a_resumed_server_keeps_the_node_partitions_and_the_dp_noise_state(tmp_path, tiny_text_model):
    from copra.federated.app.server_app import RunRecord
    from copra.models.evaluation import prepare_data
    from copra.training.loop import build_run

    settings = DeploySettings(
        model=tiny_text_model, clients=2, rounds=3, shots=2, steps=2, batch_size=4, eval_examples=20,
        overrides="max_length=16", output_dir=str(tmp_path / "out"), dp_noise_multiplier=1.0, dp_clip_norm=1.0,
        norm_factor=0.0,
    )  # fmt: skip
    out = settings.output(1)
    config = settings.federated()
    evaluator, _ = build_run(config.client_config("copra", 0, 0, 0), prepare_data(config.data_config(0)))
    noise = GaussianNoise(0)
    noise.normal(1.0, (3,))
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.0, "noise_std": 0.5, "replies": 2, "clipped": 2}
    entry = {"round": 1, "sent_to": [5, 6], "answered": [], "rejected": [], "failed": [], "seconds": 1.0}
    extra = {"client_states": [], "dp": dp, "noise_rng": noise.state(), "node_partitions": {5: 0, 6: 1}}
    RunRecord(settings, out, run_id=1).add_round(entry | extra, evaluator, 0.5)
    history = json.loads((out / "history.json").read_text())
    assert history["settings"]["dp_noise_multiplier"] == 1.0 and history["rounds"][0]["dp"] == dp
    again = RunRecord(settings, out, run_id=2)  # the ServerApp killed after round 1, started again
    assert again.node_partitions() == {5: 0, 6: 1} and again.noise_state() == noise.state()
    strategy = DeploymentFusion(
        settings, first_round=2, noise_state=again.noise_state(), partition_of=again.node_partitions()
    )
    assert strategy.noise.state() == noise.state()
    strategy.sent[1], strategy.asked[1], strategy.closed[1] = [5, 6], {}, "round-timeout 600 s"
    failed = strategy.failures(1, [])  # neither node answers the resumed round: both failures name their partition
    assert [(f["node_id"], f["partition_id"]) for f in failed] == [(5, 0), (6, 1)]
