"""copra's ServerApp for Flower's deployment engine: fusion rounds, results on disk after every round.

Output folder (run config `output-dir`, on the machine that runs the ServerApp):

    history.json                       status (running / finished / failed), error, settings, and per
                                       round: nodes asked, clients that answered (partition, examples,
                                       accuracy), nodes that failed (reason), merged accuracy, seconds
    adapter/                           the merged adapter of the last kept round (PEFT folder)
    clients/round-R/partition-I/       what client I sent in round R (PEFT folder)

Everything is written atomically after each round, so a killed server leaves the last complete
round behind. The merged adapter is evaluated on the server (the run's fixed evaluation subset).
"""

from __future__ import annotations

import time
from pathlib import Path

from copra.federated.simulation import _require_flwr

_require_flwr()

from flwr.app import ArrayRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from copra.adapters.io import save_peft_model  # noqa: E402
from copra.federated.app.settings import DeploySettings, from_run_config  # noqa: E402
from copra.federated.app.strategy import DeploymentFusion  # noqa: E402
from copra.federated.protocol import initial_state, split_clients  # noqa: E402
from copra.federated.simulation import from_record, to_record  # noqa: E402
from copra.models.evaluation import adapter_state, load_adapter_state, prepare_data, state_accuracy  # noqa: E402
from copra.training.loop import build_run  # noqa: E402
from copra.utils.atomic import write_json  # noqa: E402

HISTORY_FILE = "history.json"
ADAPTER_DIR = "adapter"

app = ServerApp()


class RunRecord:
    """The run's history.json and adapters, rewritten after each round."""

    def __init__(self, settings: DeploySettings, out: Path, run_id: int) -> None:
        self.settings, self.out, self.started = settings, out, time.monotonic()
        self.data = {
            "run_id": run_id,
            "status": "running",
            "error": None,
            "settings": settings.to_dict(),
            "output_dir": str(out),
            "rounds": [],
            "wall_seconds": 0.0,
        }
        self.write()

    def write(self) -> None:
        self.data["wall_seconds"] = time.monotonic() - self.started
        write_json(self.out / HISTORY_FILE, self.data)

    def add_round(self, entry: dict, evaluator, accuracy: float) -> None:
        """Save the round's client adapters and merged adapter (loaded in `evaluator`), then history."""
        states = entry.pop("client_states")
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
            "merge": "fusion",
            "federated": True,
            "round": entry["round"],
            "accuracy": accuracy,
            "clients": [a["partition_id"] for a in entry["answered"]],
            "settings": self.settings.to_dict(),
        }
        save_peft_model(evaluator.encoder, self.out / ADAPTER_DIR, meta)
        keep = ("round", "sent_to", "answered", "failed", "seconds")
        self.data["rounds"].append({k: entry[k] for k in keep} | {"merged_accuracy": accuracy})
        self.write()

    def finish(self, error: BaseException | None = None) -> None:
        self.data["status"] = "failed" if error else "finished"
        self.data["error"] = f"{type(error).__name__}: {error}" if error else None
        self.write()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `rounds` rounds of DeploymentFusion; history and adapters go to the run's output folder."""
    settings = from_run_config(dict(context.run_config))
    record = RunRecord(settings, settings.output(context.run_id), context.run_id)
    strategy = DeploymentFusion(settings)
    try:
        config = settings.federated()
        data = prepare_data(config.data_config(settings.seed))
        split_clients(data, settings.clients, settings.seed)  # enough examples for the clients?
        evaluator, _ = build_run(config.client_config(settings.method, settings.seed, 0, 0), data)
        start = initial_state(config, settings.method, settings.seed, data) if settings.shared_init else None

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            accuracy = state_accuracy(evaluator, from_record(arrays), data)
            record.add_round(strategy.history[-1], evaluator, accuracy)
            return MetricRecord({"accuracy": accuracy})

        # the reply wait is DeploymentFusion.gather's (round-timeout, straggler-timeout), not start's `timeout`
        strategy.start(
            grid=grid,
            initial_arrays=to_record(start) if start else ArrayRecord(),
            num_rounds=settings.rounds,
            evaluate_fn=evaluate,
        )
    except BaseException as error:
        record.data["failed_round"] = strategy.stopped  # the round that stopped the run, if one did
        record.finish(error)
        raise
    record.finish()
