"""Federated learning with LoRA vs CopRA adapters: clients train, the server merges (FedAvg of A and B).

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 3.1 and Table 1
(left): "In FL, the dataset is randomly split into five subsets, each assigned to an independent
client that trains its sub-model using different seeds. The server then merges the five trained
sub-models." The clients' own accuracies are similar for LoRA and CopRA, but the merged model is much
better for CopRA (dtd: 54.37 vs 64.07), because CopRA's random layer gating makes independently
trained adapters linearly mode-connected, so averaging their factors (`copra.adapters.merge.fusion`) works.

Protocol, per method and run seed s (methods share data, split and client seeds, so they are paired):
  * the few-shot sample of seed s (`shots` per class) is split at random into `clients` parts;
  * round r (0-based), client i trains `steps` steps with TrainConfig seed `client_seed(s, r, i)`
    = 10000 s + 100 r + i, from its own fresh seeded LoRA init in round 0 (the paper; or one shared
    init with `shared_init`) and from the server's merged adapter in later rounds;
  * the server merges with `fusion`, weights n_i / N (client example counts): FedAvg of A and B
    (`merge_method` swaps in a rank-keeping PEFT method, e.g. ties or dare_ties, with the same weights;
    `dp_noise_multiplier` and `dp_clip_norm` make it differentially private, `copra.federated.privacy`);
  * each client model and the merged model are evaluated on the run's fixed evaluation subset.
    The last merge is also scored beside its controls (mixture, shrinkage, a validated lambda:
    `copra.experiments.federated_diagnostics`), to tell why it loses what it loses.
`rounds=1` is the paper's one-shot setting. In multi-round mode each round is a full local run:
the cosine LR, AdamW state and (CopRA) the keep-probability ramp restart every round.
Everything runs in one process here; `copra.federated.simulation` runs the same protocol on Flower. The config, split,
client seeds and shared init live in `copra.federated.protocol` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from copra.adapters.io import save_peft_model
from copra.adapters.peft_merge import lora_scaling, merge_states, rescaled, setting_options
from copra.experiments import federated_diagnostics
from copra.experiments.federated_diagnostics import MergeControls, peft_settings
from copra.experiments.federated_render import draw, plot, render, table
from copra.experiments.runner.common import mean_std, write_outputs
from copra.federated import robust
from copra.federated.privacy import GaussianNoise, dp_merge
from copra.federated.protocol import (
    MAX_CLIENTS,
    MAX_ROUNDS,
    RANK_CHANGING,
    Adapter,
    FederatedConfig,
    client_seed,
    initial_state,
    split_clients,
)
from copra.federated.resume import Progress
from copra.models.evaluation import FewShotData, adapter_state, load_adapter_state, prepare_data, state_accuracy
from copra.training.loop import build_run, train
from copra.utils.errors import UserError

__all__ = [
    "MAX_CLIENTS",
    "MAX_ROUNDS",
    "RANK_CHANGING",
    "Adapter",
    "FederatedConfig",
    "FederatedRun",
    "aggregate",
    "client_seed",
    "draw",
    "initial_state",
    "plot",
    "render",
    "resume_settings",
    "run",
    "save_merged",
    "simulate",
    "size_weights",
    "split_clients",
    "summarize",
    "table",
]


def size_weights(parts: list[FewShotData]) -> list[float]:
    """FedAvg weights: each client's share n_i / N of the training examples."""
    total = sum(len(p.train_x) for p in parts)
    return [len(p.train_x) / total for p in parts]


@dataclass
class FederatedRun:
    """One (method, seed): per-round accuracies, and the last round's client and merged adapters."""

    method: str
    seed: int
    client_sizes: list[int]
    rounds: list[dict] = field(default_factory=list)  #: {round, client_accuracy, client_mean, merged_accuracy}
    client_states: list[Adapter] = field(default_factory=list, repr=False)
    merged_state: Adapter | None = field(default=None, repr=False)


def simulate(
    config: FederatedConfig,
    method: str,
    seed: int,
    data: FewShotData | None = None,
    classifier: torch.nn.Module | None = None,
    progress: Progress | None = None,
) -> FederatedRun:
    """Run the federated protocol for one method and seed in this process.

    Each round the server screens the replies (`copra.federated.robust.screen`: keys, shapes, dtypes,
    finite values, update norm), merges the accepted ones (with DP: `copra.federated.privacy.dp_merge`)
    and records the rejected ones. With `progress`, the run continues after its last recorded round
    (adapter, records, DP noise state) and records each round it completes.
    """
    data = data or prepare_data(config.data_config(seed))
    parts = split_clients(data, config.clients, seed)
    sizes = [len(p.train_x) for p in parts]
    if classifier is None:
        classifier, _ = build_run(config.client_config(method, seed, 0, 0), data)
    reference = adapter_state(classifier)  # the keys, shapes and dtypes every reply must have
    start_state = initial_state(config, method, seed, data) if config.shared_init else None
    run = FederatedRun(method, seed, sizes)
    name, policy, noise_state = f"{method}-seed{seed}", config.policy(), None
    if progress is not None:
        saved = progress.load(name)
        run.rounds, noise_state, run.client_states = saved.rounds, saved.noise_rng, saved.clients
        if saved.merged is not None:
            start_state = run.merged_state = saved.merged
    noise = GaussianNoise(seed, noise_state) if policy.dp else None  # where the stopped run's noise stood
    for r in range(len(run.rounds), config.rounds):
        results = [
            train(config.client_config(method, seed, r, i), data=part, initial_state=start_state)
            for i, part in enumerate(parts)
        ]
        # `faults`: a test client misbehaves; a result without its state would be screened out (keys missing)
        sent = [robust.apply_fault(res.state or {}, config.fault_of(i, r)) for i, res in enumerate(results)]
        reasons = robust.screen(reference, sent, policy, start=start_state)
        accepted = [i for i, why in enumerate(reasons) if why is None]
        rejected = [{"client": i, "reason": why} for i, why in enumerate(reasons) if why is not None]
        if len(accepted) < config.needed_replies:
            raise UserError(
                f"{method} seed {seed} round {r + 1}: {len(accepted)} of {config.clients} replies accepted, "
                f"{config.needed_replies} needed (min_reply_fraction {config.min_reply_fraction:g}); "
                f"first rejected: {rejected[0]}"
            )
        total, states, dp = sum(sizes[i] for i in accepted), [sent[i] for i in accepted], None
        run.client_states = sent
        if noise is not None:  # differential privacy: the noised mean of clipped updates
            merged, dp = dp_merge(states, start_state, policy.dp_clip_norm, policy.dp_noise_multiplier, noise)
        else:
            merged = aggregate(config, classifier, states, [sizes[i] / total for i in accepted], start_state)
        start_state = run.merged_state = merged
        accs = [res.accuracy for res in results]
        run.rounds.append(
            {
                "round": r + 1,
                "client_accuracy": accs,
                "client_mean": statistics.fmean(accs),
                "merged_accuracy": state_accuracy(classifier, run.merged_state, data),
                "client_converged": [res.converged for res in results],  # the plateau test per client
                "client_final_loss": [res.final_loss for res in results],
                "accepted": accepted,
                "rejected": rejected,
            }
            | ({} if dp is None else {"dp": dp})
        )
        if progress is not None:
            progress.save(name, run.rounds, merged, noise.state() if noise else None, sent)
    return run


def aggregate(
    config: FederatedConfig,
    classifier: torch.nn.Module,
    states: list[Adapter],
    weights: list[float],
    start: Adapter | None = None,
) -> Adapter:
    """The server's merge of the accepted client adapters, in the clients' own LoRA scaling (so round r+1 starts from it).

    `config.aggregate` other than fusion is a robust rule (`copra.federated.robust.aggregate`); fusion
    is FedAvg of A and B unless `merge_method` names a PEFT method, whose merged adapter has scaling 1,
    so its B is rescaled to the clients' alpha/r (or alpha/sqrt(r)): the same update, in the shape the
    clients train. `clip_norm` clips each update (adapter minus `start`) first.
    """
    if config.aggregate != "fusion" or config.merge_method == "fusion":
        return robust.aggregate(states, weights, config.aggregate, config.clip_norm, start, config.num_malicious)
    states = [robust.clip_update(s, start, config.clip_norm) for s in states]
    client = peft_settings(classifier)
    merged, merged_config = merge_states(
        config.merge_method,
        states,
        [client] * len(states),
        weights,
        **setting_options(config.merge_method, config.merge_density),
    )
    return rescaled(merged, lora_scaling(merged_config) / lora_scaling(client))


def summarize(runs: dict[str, list[dict]], rounds: int) -> dict[str, dict]:
    """Per method: last-round client mean and merged accuracy (mean, std over seeds), merged by round."""
    out = {}
    for method, per_seed in runs.items():
        client = mean_std([r["rounds"][-1]["client_mean"] for r in per_seed])
        merged = mean_std([r["rounds"][-1]["merged_accuracy"] for r in per_seed])
        by_round = [mean_std([r["rounds"][k]["merged_accuracy"] for r in per_seed]) for k in range(rounds)]
        out[method] = {
            "client_mean": client[0],
            "client_std": client[1],
            "merged_mean": merged[0],
            "merged_std": merged[1],
            "merged_by_round": [m for m, _ in by_round],
            "merged_by_round_std": [s for _, s in by_round],
        }
    return out


def run(config: FederatedConfig) -> dict:
    """Every (method, seed) in process; writes federated.json/.md/.png and the merged adapters.

    Started again on the same `output_dir` with the same settings, it continues after the last round
    recorded in `output_dir/progress` (`copra.federated.resume`); other settings are refused.
    """
    out = Path(config.output_dir)
    started = time.perf_counter()
    datas = {seed: prepare_data(config.data_config(seed)) for seed in config.seeds}  # fail before any training
    for seed, data in datas.items():
        split_clients(data, config.clients, seed)
    classifier, _ = build_run(config.client_config(config.methods[0], config.seeds[0], 0, 0), datas[config.seeds[0]])
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "task": datas[config.seeds[0]].task,
        "eval_examples": len(datas[config.seeds[0]].eval_x),
        "runs": {},
    }
    progress = Progress(out / "progress")
    progress.start(resume_settings(config))  # another run's progress there: refused before anything is written
    skipped = federated_diagnostics.skipped(config) if config.diagnostics else "diagnostics=false"
    controls = MergeControls(config, classifier) if skipped is None else None
    for method in config.methods:
        summary["runs"][method] = []
        for seed in config.seeds:
            fed = simulate(config, method, seed, datas[seed], classifier, progress)
            folder = save_merged(classifier, fed, out / "adapters" / method / f"seed{seed}", config)
            entry = {"seed": seed, "client_sizes": fed.client_sizes, "rounds": fed.rounds, "adapter_dir": str(folder)}
            if controls is not None:  # the last merge beside its controls (issue 23)
                entry["diagnostics"] = controls(fed.rounds, fed.client_states, fed.client_sizes, datas[seed])
            summary["runs"][method].append(entry)
    summary["summary"] = summarize(summary["runs"], config.rounds)
    if controls is None:
        summary["diagnostics_skipped"] = skipped
    for method, runs in summary["runs"].items():
        diagnostics = federated_diagnostics.summarise([r["diagnostics"] for r in runs if "diagnostics" in r])
        if diagnostics is not None:
            summary["summary"][method]["diagnostics"] = diagnostics
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, "federated", summary, plot, render)
    return summary


NOT_RESUMED = ("progress", "output_dir", "diagnostics", "scales", "validation_examples")  # change no round


def resume_settings(config: FederatedConfig) -> dict[str, Any]:
    """The settings a run in the same output folder must share to continue it: all that change a round's outcome."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_RESUMED}


def save_merged(classifier: torch.nn.Module, fed: FederatedRun, folder: Path, config: FederatedConfig) -> Path:
    """Write the final merged adapter as a PEFT folder (PEFT's own save_pretrained, so from_pretrained loads it)."""
    if fed.merged_state is None:
        raise ValueError(f"{fed.method} seed {fed.seed}: no round merged yet, nothing to save")
    load_adapter_state(classifier, fed.merged_state)
    meta = {
        "method": fed.method,
        "task": config.task,
        "seed": fed.seed,
        "federated": True,
        "merge": config.merge_method,
        "clients": config.clients,
        "rounds": config.rounds,
        "client_sizes": fed.client_sizes,
        "accuracy": fed.rounds[-1]["merged_accuracy"],
        "config": dataclasses.asdict(config),
    }
    return save_peft_model(classifier.encoder, folder, meta)
