"""A Flower server's view of a round's replies: read each one without trusting it, screen, merge the accepted.

A reply is data from another machine: any record may be missing, any value of any type, the arrays of
any dtype or shape. `read_reply` turns one reply's content into a `Reply` or a reason; `screen_round`
rejects, with a reason each, replies that claim a partition another node claims too, report another
example count than the server's split gives, or fail `copra.federated.robust.screen` (keys, shapes,
dtypes, LoRA settings, finite values, update norm); `merge_replies` aggregates the rest with the
round's `robust.Policy` (with DP, through `copra.federated.privacy`). Nothing here raises on a bad reply.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from copra.core.config import TrainConfig
from copra.federated import robust
from copra.federated.privacy import GaussianNoise, dp_merge

Adapter = dict[str, torch.Tensor]
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key


def to_record(state: Adapter):
    """An adapter state dict as a Flower ArrayRecord (numpy arrays, keys sorted)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: state[k].detach().cpu().contiguous() for k in sorted(state)})


def from_record(record) -> Adapter:
    """A Flower ArrayRecord back to an adapter state dict (torch tensors)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def lora_settings(config: TrainConfig) -> dict[str, Any]:
    """What a client reports of its LoRA setup (a Flower ConfigRecord), and what the server expects."""
    return {
        "rank": config.rank,
        "lora-alpha": float(config.lora_alpha),
        "use-rslora": bool(config.use_rslora),
        "target-modules": list(config.target_modules),
    }


@dataclass
class Reply:
    """One readable reply: who sent it, for which partition, how many examples, the adapter."""

    node_id: int
    partition_id: int
    num_examples: int
    accuracy: float
    state: Adapter = field(repr=False)
    lora: dict[str, Any] = field(default_factory=dict)


def read_reply(content: Any, node_id: int, clients: int | None = None) -> Reply | tuple[int | None, str]:
    """A `Reply` from a reply's content (RecordDict), or (partition id if readable, reason)."""
    partition = None
    try:
        partition = content["client"]["partition-id"]
        if isinstance(partition, bool) or not isinstance(partition, int):
            return None, f"partition-id {partition!r} is not an integer"
        if clients is not None and not 0 <= partition < clients:
            return None, f"partition-id {partition} outside 0..{clients - 1}"
        metrics = content["metrics"]
        n, accuracy = metrics[NUM_EXAMPLES], metrics.get("accuracy", float("nan"))
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0 or n != int(n):
            return partition, f"{NUM_EXAMPLES} {n!r} is not a positive whole number"
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
            return partition, f"accuracy {accuracy!r} is not a number"
        state = from_record(content["arrays"])
        lora = dict(content["lora"]) if "lora" in content else {}
    except Exception as error:  # whatever the content is, it is a reason, not a crash of the server
        return (
            partition if isinstance(partition, int) else None
        ), f"unreadable reply ({type(error).__name__}: {error})"[:300]
    return Reply(node_id, partition, int(n), float(accuracy), state, lora)


def screen_round(
    replies: Sequence[Reply],
    reference: Adapter | None,
    policy: robust.Policy,
    start: Adapter | None = None,
    expected_lora: dict[str, Any] | None = None,
    sizes: Sequence[int] | None = None,
) -> tuple[list[Reply], list[tuple[Reply, str]]]:
    """(accepted replies by partition id, [(rejected reply, reason)]).

    `reference` is the round's adapter structure (None: the lowest partition's reply, a weaker test
    for callers without a model); `sizes[i]` the example count the server's split gives partition i.
    """
    claims = Counter(r.partition_id for r in replies)
    rejected: list[tuple[Reply, str]] = []
    left: list[Reply] = []
    for r in replies:
        if claims[r.partition_id] > 1:
            nodes = sorted(x.node_id for x in replies if x.partition_id == r.partition_id)
            rejected.append((r, f"partition-id {r.partition_id} claimed by nodes {nodes}"))
        elif sizes is not None and r.num_examples != sizes[r.partition_id]:
            rejected.append((r, f"{NUM_EXAMPLES} {r.num_examples}, the split gives {sizes[r.partition_id]}"))
        else:
            left.append(r)
    left.sort(key=lambda r: r.partition_id)
    if not left:
        return [], rejected
    reasons = robust.screen(
        left[0].state if reference is None else reference,
        [r.state for r in left],
        policy,
        start,
        [r.lora for r in left],
        expected_lora,
    )
    rejected += [(r, why) for r, why in zip(left, reasons) if why is not None]
    return [r for r, why in zip(left, reasons) if why is None], rejected


def merge_replies(
    accepted: Sequence[Reply],
    policy: robust.Policy,
    start: Adapter | None = None,
    noise: GaussianNoise | None = None,
) -> tuple[Adapter, dict | None]:
    """(the accepted replies aggregated with `policy`, the round's DP record or None).

    Fusion weights are n_i / N over the accepted replies; with DP (`policy.dp`, drawing from `noise`)
    the noised unweighted mean of clipped updates (`copra.federated.privacy.dp_merge`).
    """
    if policy.dp:
        if noise is None:
            raise ValueError("a differentially private merge needs the run's GaussianNoise")
        states = [r.state for r in accepted]
        return dp_merge(states, start, policy.dp_clip_norm, policy.dp_noise_multiplier, noise)
    total = sum(r.num_examples for r in accepted)
    merged = robust.aggregate(
        [r.state for r in accepted],
        [r.num_examples / total for r in accepted],
        policy.aggregate,
        policy.clip_norm,
        start,
        policy.num_malicious,
    )
    return merged, None
