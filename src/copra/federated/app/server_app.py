"""copra's ServerApp for Flower's deployment engine: fusion rounds, results on disk after every round.

Output folder (run config `output-dir`, on the machine that runs the ServerApp):

    history.json                       status (running / finished / failed), error, settings, resumes,
                                       and per round: nodes asked, replies accepted (node, partition,
                                       examples, accuracy), replies rejected (node, partition, reason),
                                       nodes that failed (reason), merged accuracy, seconds, the DP
                                       record (clip, noise std); node_partitions and noise_rng (the DP
                                       noise generator's state) as of the last round, for a resume
    adapter/                           the merged adapter of the last kept round (PEFT folder)
    merged/round-R/                    the merged adapter of round R (what a resumed run starts from)
    clients/round-R/partition-I/       what client I sent in round R, if it was accepted (PEFT folder)

Everything is written atomically after each round (merged/round-R before the history that counts
it), so a killed server leaves the last complete round behind. Started again with the same settings
and output-dir (`flwr run` again), the ServerApp continues after the last round in history.json from
merged/round-R; other settings are refused with one line, nothing written. The merged adapter is
evaluated on the server (the run's fixed evaluation subset).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from copra.federated.flower import require_flwr

require_flwr()

from flwr.app import ArrayRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from copra.adapters.io import load_adapter, save_peft_model  # noqa: E402
from copra.federated.app.settings import DeploySettings, from_run_config  # noqa: E402
from copra.federated.app.strategy import DeploymentFusion  # noqa: E402
from copra.federated.protocol import initial_state, split_clients  # noqa: E402
from copra.federated.replies import from_record, lora_settings, to_record  # noqa: E402
from copra.federated.resume import refuse_other_settings  # noqa: E402
from copra.models.evaluation import adapter_state, load_adapter_state, prepare_data, state_accuracy  # noqa: E402
from copra.training.loop import build_run  # noqa: E402
from copra.utils.atomic import write_json  # noqa: E402
from copra.utils.errors import UserError  # noqa: E402

HISTORY_FILE = "history.json"
ADAPTER_DIR = "adapter"
RESUMED = ("node_partitions", "noise_rng")  # carried over to a resumed run with the rounds

app = ServerApp()


class RunRecord:
    """The run's history.json and adapters, rewritten after each round; a folder's earlier run is continued."""

    def __init__(self, settings: DeploySettings, out: Path, run_id: int) -> None:
        self.settings, self.out, self.started = settings, out, time.monotonic()
        previous = _previous(out)
        if previous is not None:  # refused before anything is written
            refuse_other_settings(previous.get("settings", {}), json.loads(json.dumps(settings.to_dict())), out)
        self.done = 0 if previous is None else len(previous["rounds"])
        self.data: dict[str, Any] = {
            "run_id": run_id,
            "status": "running",
            "error": None,
            "settings": settings.to_dict(),
            "output_dir": str(out),
            "resumes": [],
            "rounds": [],
            "wall_seconds": 0.0,
        }
        if previous is not None:
            stop = {k: previous.get(k) for k in ("run_id", "status", "error", "failed_round")}
            self.data |= {
                "rounds": previous["rounds"],
                "resumes": previous.get("resumes", []) + [stop | {"after_round": self.done, "by_run_id": run_id}],
            } | {k: previous[k] for k in RESUMED if k in previous}
            self.base_seconds = float(previous.get("wall_seconds", 0.0))
        else:
            self.base_seconds = 0.0
        self.write()

    def start_state(self) -> dict | None:
        """The merged adapter the next round starts from: that of the last recorded round (None: none yet)."""
        if not self.done:
            return None
        folder = self.out / "merged" / f"round-{self.done}"
        state, _ = load_adapter(folder)
        return state

    def node_partitions(self) -> dict[int, int]:
        """Node id -> partition id, as far as the recorded rounds' replies told (JSON keys are strings)."""
        return {int(node): partition for node, partition in self.data.get("node_partitions", {}).items()}

    def noise_state(self) -> dict | None:
        """The DP noise generator's state after the last recorded round (None: no DP, or no round yet)."""
        return self.data.get("noise_rng")

    def write(self) -> None:
        self.data["wall_seconds"] = self.base_seconds + time.monotonic() - self.started
        write_json(self.out / HISTORY_FILE, self.data)

    def add_round(self, entry: dict, evaluator, accuracy: float) -> None:
        """Save the round's client adapters and merged adapter (loaded in `evaluator`), then history."""
        states = entry["client_states"]
        merged = adapter_state(evaluator)
        for answer, state in zip(entry["answered"], states):
            load_adapter_state(evaluator, state)
            save_peft_model(
                evaluator.encoder,
                self.out / "clients" / f"round-{entry['round']}" / f"partition-{answer['partition_id']}",
                {"round": entry["round"], **answer},
            )
        load_adapter_state(evaluator, merged)
        meta = {
            "merge": self.settings.aggregate,
            "federated": True,
            "round": entry["round"],
            "accuracy": accuracy,
            "clients": [a["partition_id"] for a in entry["answered"]],
            "settings": self.settings.to_dict(),
        }
        save_peft_model(evaluator.encoder, self.out / "merged" / f"round-{entry['round']}", meta)
        keep = ("round", "sent_to", "answered", "rejected", "failed", "seconds")
        row = {k: entry[k] for k in keep} | {"merged_accuracy": accuracy}
        self.data["rounds"].append(row | ({"dp": entry["dp"]} if entry.get("dp") else {}))
        self.data["node_partitions"] = {str(n): p for n, p in entry.get("node_partitions", {}).items()}
        if entry.get("noise_rng") is not None:
            self.data["noise_rng"] = entry["noise_rng"]  # written with the round it follows, so they resume together
        self.write()
        save_peft_model(evaluator.encoder, self.out / ADAPTER_DIR, meta)

    def finish(self, error: BaseException | None = None) -> None:
        self.data["status"] = "failed" if error else "finished"
        self.data["error"] = f"{type(error).__name__}: {error}" if error else None
        self.write()


def _previous(out: Path) -> dict | None:
    """The history.json an earlier run left in `out`, if any."""
    path = out / HISTORY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot continue from it ({type(error).__name__}); use another output-dir") from None
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise UserError(f"{path}: not a copra history; use another output-dir")
    return data


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds left of DeploymentFusion; history and adapters go to the run's output folder."""
    settings = from_run_config(dict(context.run_config))
    record = RunRecord(settings, settings.output(context.run_id), context.run_id)
    strategy = None
    try:
        config = settings.federated()
        data = prepare_data(config.data_config(settings.seed))
        parts = split_clients(data, settings.clients, settings.seed)  # enough examples for the clients?
        first = config.client_config(settings.method, settings.seed, 0, 0)
        evaluator, _ = build_run(first, data)
        strategy = DeploymentFusion(
            settings,
            reference=adapter_state(evaluator),  # keys, shapes and dtypes every reply must have
            expected_lora=lora_settings(first),
            sizes=[len(p.train_x) for p in parts],
            first_round=record.done + 1,
            noise_state=record.noise_state(),
            partition_of=record.node_partitions(),
        )
        start = record.start_state()
        if start is None and settings.shared_init:
            start = initial_state(config, settings.method, settings.seed, data)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            accuracy = state_accuracy(evaluator, from_record(arrays), data)
            record.add_round(strategy.history[-1], evaluator, accuracy)
            return MetricRecord({"accuracy": accuracy})

        if record.done < settings.rounds:
            # the reply wait is DeploymentFusion.gather's (round-timeout, straggler-timeout), not start's `timeout`
            strategy.start(
                grid=grid,
                initial_arrays=to_record(start) if start else ArrayRecord(),
                num_rounds=settings.rounds - record.done,
                evaluate_fn=evaluate,
            )
    except BaseException as error:
        record.data["failed_round"] = strategy.stopped if strategy else None  # the round that stopped the run
        record.finish(error)
        raise
    record.finish()
