"""The value of a coalition of LoRA layers, v(C), for many coalitions at once, and Shapley values of a model.

CopRA (Zhuang et al., 2024, Sec. 2.2-3) makes every LoRA layer a player of a cooperative game: v(C)
is the quality of the model with only the adapters of the players in C switched on. Here v(C) is the
accuracy (or minus the mean cross-entropy, `metric="neg_loss"`) on the run's fixed evaluation set,
with the players switched through CopRA's gate controller (`gates.active(mask)`).

Why a dedicated evaluator: Shapley estimates need up to 2^n coalitions, and one full forward per
coalition repeats most of the work. Coalitions that agree on the gates of the first k blocks have
identical hidden states after block k, so `CoalitionEvaluator.values` walks the prefix trie of the
requested masks depth-first, running every block once per distinct prefix (models.layer_runner).
For all 2^n coalitions that is 2^(l+1) runs of block l, 2^(n+1) - 2 in all instead of n 2^n; and
sibling branches, which feed one hidden state to a block under different gates, compute the frozen
projections that read it (BERT's query/key/value, where LoRA sits) once (`reuse_base_outputs`). The
class prompts go through the same trie in a first pass (they are few), then the evaluation texts in
chunks of `batch_size`, with correct counts / loss sums accumulated per coalition, so memory stays
that of n + 1 hidden states of one chunk. Players may be whole blocks (granularity "layer") or single
modules; each must sit inside one block of a single-tower BERT-like PromptClassifier. Anything else
(e.g. CLIP's two towers) falls back to `naive_values`: one full forward per coalition, which is also
the reference the fast path is tested against. `shapley_for_model` wires either into copra.shapley,
whose `Game` caches v so no coalition is evaluated twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from copra.compat import memoized_forward
from copra.errors import UserError
from copra.evaluation import FewShotData, accuracy, length_order
from copra.gates import CopRA, lora_modules, player_of
from copra.precision import autocast_of
from copra.shapley import ESTIMATORS, Game, ShapleyResult

METRICS = ("accuracy", "neg_loss")


class CoalitionEvaluator:
    """v(mask) for coalitions of `gates.players` on `data`'s evaluation set; `values` is the batched form."""

    def __init__(self, classifier: nn.Module, gates: CopRA, data: FewShotData, metric: str = "accuracy",
                 batch_size: int = 64):
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not data.eval_x or len(data.eval_x) != len(data.eval_y):
            raise UserError("the evaluation set is empty (or its examples and labels differ in number)")
        self.classifier, self.gates, self.data = classifier, gates, data
        self.metric, self.batch_size = metric, batch_size
        self.players = list(gates.players)
        self.labels = torch.tensor(list(data.eval_y), dtype=torch.long)
        self.runner, self.block_players = self._layout()
        self._chunks: list[tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None
        self._prompts: dict[str, torch.Tensor] | None = None

    @property
    def fast(self) -> bool:
        """True when coalitions share block prefixes; False: one full forward per coalition."""
        return self.runner is not None

    def _layout(self):
        """(runner, players of each block) for a single-tower BERT-like PromptClassifier, else (None, None)."""
        from copra.models.layer_runner import LayerRunner
        from copra.models.text import PromptClassifier

        if not isinstance(self.classifier, PromptClassifier):
            return None, None
        try:
            runner = LayerRunner(self.classifier.encoder)
        except UserError:
            return None, None
        block_of_player: dict[str, int] = {}
        self.block_modules: list[list[LoraLayer]] = [[] for _ in range(runner.num_layers)]
        for name, module in lora_modules(self.classifier.encoder):
            player, block = player_of(name, self.gates.granularity), runner.block_of(module)
            if block is None or block_of_player.setdefault(player, block) != block:
                return None, None  # a LoRA module outside the blocks, or a player spanning two blocks
            self.block_modules[block].append(module)
        if sorted(block_of_player) != sorted(self.players):
            return None, None
        blocks: list[list[int]] = [[] for _ in range(runner.num_layers)]
        for index, player in enumerate(self.players):
            blocks[block_of_player[player]].append(index)
        return runner, blocks

    # -- public API ------------------------------------------------------------------------------
    def value(self, mask: Sequence[bool]) -> float:
        """v(C) for one coalition (a bool per player)."""
        return float(self.values(np.asarray([list(mask)], dtype=bool))[0])

    def values(self, masks: np.ndarray) -> np.ndarray:
        """v of every row of `masks` [m, n] (bool), sharing block prefixes between coalitions."""
        masks = self._check(masks)
        if not self.fast or not len(masks):
            return self.naive_values(masks)
        return self._fast_values(masks)

    def naive_values(self, masks: np.ndarray) -> np.ndarray:
        """The reference: one full forward of the evaluation set per coalition, under `gates.active(mask)`."""
        masks = self._check(masks)
        out = np.empty(len(masks))
        for row, mask in enumerate(masks.tolist()):
            with self.gates.active(mask):
                if self.metric == "accuracy":  # count / N exactly (accuracy() rounds it to float32)
                    share = accuracy(self.classifier, self.data.eval_x, self.data.eval_y, self.batch_size)
                    out[row] = round(share * len(self.labels)) / len(self.labels)
                else:
                    out[row] = -self._naive_loss()
        return out

    # -- the reference path ------------------------------------------------------------------------
    @torch.inference_mode()
    def _naive_loss(self) -> float:
        classifier, was_training = self.classifier, self.classifier.training
        classifier.eval()
        try:
            device = next(classifier.parameters()).device
            prompts = classifier.class_embeddings()  # [C, H]
            total = 0.0
            for start in range(0, len(self.data.eval_x), self.batch_size):
                inputs = classifier.inputs_for(list(self.data.eval_x[start : start + self.batch_size]))
                texts = classifier.embed(**{k: v.to(device) for k, v in inputs.items()})
                logits = classifier.scale * texts @ prompts.T
                labels = self.labels[start : start + self.batch_size].to(device)
                total += float(F.cross_entropy(logits, labels, reduction="sum"))
            return total / len(self.data.eval_x)
        finally:
            classifier.train(was_training)

    # -- the prefix-sharing path ---------------------------------------------------------------------
    def _check(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(self.players):
            raise UserError(f"coalition masks must have shape [m, {len(self.players)}], got {list(masks.shape)}")
        return masks

    def _inputs(self) -> tuple[dict[str, torch.Tensor], list[tuple[dict[str, torch.Tensor], torch.Tensor]]]:
        """Tokenized prompts and evaluation chunks (formed by input length and padded per chunk, as
        `copra.evaluation.predict` does)."""
        if self._chunks is None:
            classifier = self.classifier
            if not getattr(classifier, "prompts", None):
                classifier.set_prompts(list(self.data.prompts))
            self._prompts = classifier.tokenize(list(classifier.prompts))
            order = length_order(classifier, self.data.eval_x)
            chunks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            self._chunks = [(classifier.inputs_for([self.data.eval_x[i] for i in rows]), self.labels[rows])
                            for rows in chunks]
        return self._prompts, self._chunks

    @torch.no_grad()  # not inference_mode: reuse_base_outputs guards its memo by version counters,
    def _fast_values(self, masks: np.ndarray) -> np.ndarray:  # which inference tensors do not keep
        from copra.models.text import mean_pool

        classifier, was_training = self.classifier, self.classifier.training
        classifier.eval()
        try:
            prompt_inputs, chunks = self._inputs()
            device = next(classifier.parameters()).device
            rows = np.arange(len(masks))
            prompts: list[torch.Tensor | None] = [None] * len(masks)  # [C, H] per coalition

            def keep_prompts(hidden: torch.Tensor, attention: torch.Tensor, leaf_rows: np.ndarray) -> None:
                embedded = F.normalize(mean_pool(hidden.float(), attention), dim=-1)
                for r in leaf_rows.tolist():
                    prompts[r] = embedded

            self._walk(prompt_inputs, device, masks, rows, keep_prompts)
            score = np.zeros(len(masks))
            for inputs, labels in chunks:
                labels = labels.to(device)

                def add_chunk(hidden: torch.Tensor, attention: torch.Tensor, leaf_rows: np.ndarray) -> None:
                    texts = F.normalize(mean_pool(hidden.float(), attention), dim=-1)  # [B, H]
                    for r in leaf_rows.tolist():
                        if self.metric == "accuracy":
                            score[r] += int(((texts @ prompts[r].T).argmax(-1) == labels).sum())
                        else:
                            logits = classifier.scale * texts @ prompts[r].T
                            score[r] -= float(F.cross_entropy(logits, labels, reduction="sum"))

                self._walk(inputs, device, masks, rows, add_chunk)
            return score / len(self.data.eval_x)
        finally:
            classifier.train(was_training)

    def _walk(self, inputs: dict[str, torch.Tensor], device: torch.device, masks: np.ndarray, rows: np.ndarray,
              leaf) -> None:
        """Depth-first over the prefix trie of masks[rows]; leaf(last hidden, attention mask, rows) per coalition."""
        attention = inputs["attention_mask"].to(device)
        with autocast_of(self.classifier, device):  # blocks in the classifier's precision, scores in fp32
            hidden, layer_mask = self.runner.start(inputs["input_ids"].to(device), attention)
        self._descend(hidden, layer_mask, attention, masks, rows, 0, leaf)

    def _descend(self, hidden, layer_mask, attention, masks, rows, depth, leaf) -> None:
        if depth == self.runner.num_layers:
            leaf(hidden, attention, rows)
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
            self._descend(out, layer_mask, attention, masks, branch, depth + 1, leaf)


def reuse_base_outputs(modules: Sequence[LoraLayer]):
    """Inside, the frozen base layer of each LoRA module returns its last output again when it is
    called again on the very same, unmodified input tensor (copra.compat.memoized_forward).

    Sibling branches of the trie feed one hidden state to a block under different gates; the base
    projections that read it directly (BERT's query/key/value) are then computed once, not once per
    branch. Nested tuner layers run as they are.
    """
    bases = [getattr(m, "base_layer", None) for m in modules]
    return memoized_forward([b for b in bases if b is not None and not isinstance(b, LoraLayer)])


@dataclass
class ModelShapleyResult(ShapleyResult):
    """A ShapleyResult with the names of the players (model order) and the metric behind v."""

    players: list[str] = field(default_factory=list)
    metric: str = "accuracy"


def shapley_for_model(classifier: nn.Module, gates: CopRA, data: FewShotData, method: str = "multilinear",
                      samples: int = 64, seed: int = 0, metric: str = "accuracy", batch_size: int = 64,
                      game: Game | None = None, **options) -> ModelShapleyResult:
    """Per-player Shapley values of `classifier` on data's evaluation set (paper Eq. 3 with "multilinear").

    `game` (a copra.shapley.Game over the same players, weights and data) shares its cache of v
    across calls; by default a fresh one is made. `options` go to the estimator (e.g. antithetic).
    """
    if method not in ESTIMATORS:
        raise UserError(f"unknown Shapley method {method!r}; choose one of {list(ESTIMATORS)}")
    n = len(gates.players)
    if game is None:
        game = Game(values=CoalitionEvaluator(classifier, gates, data, metric, batch_size).values, n=n)
    if method == "exact":
        result = ESTIMATORS[method](game, n, **options)
    else:
        result = ESTIMATORS[method](game, n, samples, seed, **options)
    return ModelShapleyResult(**vars(result), players=list(gates.players), metric=metric)


__all__ = ["METRICS", "CoalitionEvaluator", "ModelShapleyResult", "shapley_for_model"]
