"""The model part of the coalition evaluator: embed a batch under many coalitions, sharing block prefixes.

Coalitions that agree on the gates of the first k blocks have identical hidden states after block
k, so `PrefixSharing.embeddings` walks the prefix trie of the requested masks depth-first, running
every block once per distinct prefix (models.layer_runner). For all 2^n coalitions that is 2^(l+1)
runs of block l, 2^(n+1) - 2 in all instead of n 2^n; and sibling branches, which feed one hidden
state to a block under different gates, compute the frozen projections that read it (BERT's
query/key/value, where LoRA sits) once (`reuse_base_outputs`). Memory stays that of n + 1 hidden
states of one batch.

Players may be whole blocks (granularity "layer") or single modules; each must sit inside one block
of a single-tower BERT-like `PromptClassifier` (`PromptClassifier.prefix_sharing(gates)` builds one).
`copra.analysis.coalitions` knows none of this: it asks the classifier for a `prefix_sharing` and scores the
embeddings it hands back, or runs one full forward per coalition when there is none (CLIP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from copra.core.gates import CopRA, lora_modules, player_of
from copra.models.layer_runner import LayerRunner
from copra.models.scoring import sentence_embedding
from copra.utils.compat import memoized_forward
from copra.utils.errors import UserError
from copra.utils.precision import autocast_of

Leaf = Callable[[torch.Tensor, np.ndarray], None]  # (unit-norm embeddings [B, H], the coalitions' rows)


class PrefixSharing:
    """Embeddings of one batch under every row of a mask matrix, each shared block prefix run once.

    Call under `torch.no_grad()` (not inference_mode: `reuse_base_outputs` guards its memo by
    version counters, which inference tensors do not keep) with the classifier in eval mode.
    """

    def __init__(
        self,
        classifier: nn.Module,
        gates: CopRA,
        runner: LayerRunner,
        block_players: list[list[int]],
        block_modules: list[list[LoraLayer]],
    ):
        self.classifier, self.gates, self.runner = classifier, gates, runner
        self.block_players = block_players  # per block: indices of the players inside it
        self.block_modules = block_modules  # per block: its LoRA modules

    def class_embeddings(self, masks: np.ndarray, leaf: Leaf) -> None:
        """leaf(class-prompt embeddings [C, H], rows) for every coalition in `masks`."""
        self.embeddings(self.classifier.tokenize(list(self.classifier.prompts)), masks, leaf)

    def embeddings(self, inputs: dict[str, torch.Tensor], masks: np.ndarray, leaf: Leaf) -> None:
        """leaf(embeddings of `inputs` [B, H], rows) for every coalition in `masks` [m, n]."""
        device = next(self.classifier.parameters()).device
        attention = inputs["attention_mask"].to(device)
        with autocast_of(self.classifier, device):  # blocks in the classifier's precision, embeddings in fp32
            hidden, layer_mask = self.runner.start(inputs["input_ids"].to(device), attention)
        self._descend(
            hidden,
            layer_mask,
            masks,
            np.arange(len(masks)),
            0,
            lambda last, rows: leaf(sentence_embedding(last, attention), rows),
        )

    def _descend(self, hidden, layer_mask, masks: np.ndarray, rows: np.ndarray, depth: int, leaf) -> None:
        if depth == self.runner.num_layers:
            leaf(hidden, rows)
            return
        columns = self.block_players[depth]
        if columns:
            _, group = np.unique(masks[rows][:, columns], axis=0, return_inverse=True)
            branches = [rows[group.reshape(-1) == g] for g in range(int(group.max()) + 1)]
        else:
            branches = [rows]  # no adapter in this block: one branch for every coalition
        outs: list[torch.Tensor | None] = []
        with reuse_base_outputs(self.block_modules[depth] if len(branches) > 1 else []):
            for branch in branches:
                with self.gates.active(masks[branch[0]].tolist()), autocast_of(self.classifier, hidden.device):
                    outs.append(self.runner.run(hidden, layer_mask, depth, depth + 1))
        for index, branch in enumerate(branches):
            out, outs[index] = outs[index], None
            self._descend(out, layer_mask, masks, branch, depth + 1, leaf)


def prefix_sharing(classifier: nn.Module, gates: CopRA) -> PrefixSharing | None:
    """A PrefixSharing for `classifier.encoder` (BERT-like, every player inside one block), else None."""
    try:
        runner = LayerRunner(classifier.encoder)
    except UserError:
        return None
    players = list(gates.players)
    block_of_player: dict[str, int] = {}
    block_modules: list[list[LoraLayer]] = [[] for _ in range(runner.num_layers)]
    for name, module in lora_modules(classifier.encoder):
        player, block = player_of(name, gates.granularity), runner.block_of(module)
        if block is None or block_of_player.setdefault(player, block) != block:
            return None  # a LoRA module outside the blocks, or a player spanning two blocks
        block_modules[block].append(module)
    if sorted(block_of_player) != sorted(players):
        return None
    block_players: list[list[int]] = [[] for _ in range(runner.num_layers)]
    for index, player in enumerate(players):
        block_players[block_of_player[player]].append(index)
    return PrefixSharing(classifier, gates, runner, block_players, block_modules)


def reuse_base_outputs(modules: Sequence[LoraLayer]):
    """Inside, the frozen base layer of each LoRA module returns its last output again when it is
    called again on the very same, unmodified input tensor (copra.utils.compat.memoized_forward).

    Sibling branches of the trie feed one hidden state to a block under different gates; the base
    projections that read it directly (BERT's query/key/value) are then computed once, not once per
    branch. Nested tuner layers run as they are.
    """
    bases = [getattr(m, "base_layer", None) for m in modules]
    return memoized_forward([b for b in bases if b is not None and not isinstance(b, LoraLayer)])


__all__ = ["PrefixSharing", "prefix_sharing", "reuse_base_outputs"]
