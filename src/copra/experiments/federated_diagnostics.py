"""Why `copra federated`'s merge loses what it loses (issue 23): the last round's fusion beside its controls.

The server fuses the N accepted clients' adapters at weights w_i = n_i / N, so

    B_f A_f = (sum_i w_i B_i)(sum_j w_j A_j) = sum_i w_i^2 B_i A_i + sum_{i != j} w_i w_j B_i A_j

keeps w_i^2 of each client's own update (shrinkage) and adds cross terms (misalignment). Scored beside
the fused adapter (`runner.diagnostics.client_merge_diagnostics`): each client alone, the exact mixture
sum_i w_i B_i A_i, each client at w_i^2, and the fused update x lambda, lambda picked on a validation
set drawn from the training pool (`prepare_shared_validation`: none of any seed's few-shot sample, never
the test split). barrier = mean client - fused = averaging (client - mixture) + misalignment (mixture - fused).

The controls decompose a fusion, so they are computed when the server's merge is one: not with DP
(a noised mean of clipped updates), a robust `aggregate`, a PEFT `merge_method` or `clip_norm`.
"""

from __future__ import annotations

from typing import Any

import torch

from copra.data.fewshot import prepare_shared_validation
from copra.experiments.runner.common import Evaluator
from copra.experiments.runner.diagnostics import client_merge_diagnostics, summarise_clients
from copra.federated.protocol import FederatedConfig
from copra.models.evaluation import FewShotData


def skipped(config: FederatedConfig) -> str | None:
    """Why the last merge of `config`'s runs is not a plain fusion the controls decompose (None: it is)."""
    if config.policy().dp:
        return "differential privacy: the merge is a noised mean of clipped updates, not their fusion"
    for name in ("aggregate", "merge_method"):
        if getattr(config, name) != "fusion":
            return f"{name}={getattr(config, name)}: the merge is not a fusion"
    if config.clip_norm:
        return "clip_norm: the merge fuses clipped updates, not the clients' adapters"
    return None


def peft_settings(classifier: torch.nn.Module) -> dict[str, Any]:
    """The clients' PEFT adapter_config (sets as sorted lists), as the merges and the evaluator read it."""
    config = classifier.encoder.peft_config["default"].to_dict()  # type: ignore[union-attr,index]
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


class MergeControls:
    """Scores every (method, seed)'s last merge beside its controls; one evaluator and validation set for all."""

    def __init__(self, config: FederatedConfig, classifier: torch.nn.Module) -> None:
        self.config, self.adapter_config = config, peft_settings(classifier)
        self.evaluator = Evaluator(config.client_config(config.methods[0], config.seeds[0], 0, 0))
        self.validation: FewShotData | None = None
        if config.scales:
            configs = [config.data_config(seed) for seed in config.seeds]
            self.validation = prepare_shared_validation(configs, config.validation_examples)

    def __call__(self, rounds: list[dict], client_states: list, client_sizes: list[int], data: FewShotData) -> dict:
        """The last round's accepted clients (`members`), fused at n_i / N over them, beside the controls;
        {"skipped": why} when that round's client adapters were not kept (progress recorded before copra kept them)."""
        if not client_states:
            return {
                "skipped": "the last round's client adapters were not kept (progress recorded before copra kept them)"
            }
        members = rounds[-1]["accepted"]
        sizes = [client_sizes[i] for i in members]
        weights = [n / sum(sizes) for n in sizes]
        states = [client_states[i] for i in members]
        scales, validation = self.config.scales, self.validation
        out = client_merge_diagnostics(self.evaluator, data, states, weights, self.adapter_config, scales, validation)
        return {"members": members} | out


def summarise(per_seed: list[dict]) -> dict[str, float] | None:
    """Means over seeds (`summarise_clients`), or None when a seed has no diagnostics."""
    if not per_seed or any("skipped" in d for d in per_seed):
        return None
    return summarise_clients(per_seed)
