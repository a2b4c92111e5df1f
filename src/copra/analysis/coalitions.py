"""The value of a coalition of LoRA layers, v(C), for many coalitions at once, and Shapley values of a model.

CopRA (Zhuang et al., 2024, Sec. 2.2-3) makes every LoRA layer a player of a cooperative game: v(C)
is the quality of the model with only the adapters of the players in C switched on. Here v(C) is the
accuracy (or minus the mean cross-entropy, `metric="neg_loss"`) on the run's fixed evaluation set,
with the players switched through CopRA's gate controller (`gates.active(mask)`), scored by the one
scoring path (`copra.models.evaluation`, the classifier's `scores_of` / `logits_of`): v(all on) is exactly
`copra.models.evaluation.accuracy` of the full model.

Why a dedicated evaluator: Shapley estimates need up to 2^n coalitions, and one full forward per
coalition repeats most of the work. This module is model-agnostic: when the classifier offers
`prefix_sharing(gates)` (the text encoder does: `copra.models.coalition_runner`), that model part
hands back the embeddings of a batch under every coalition, computing each shared block prefix once;
the class prompts go through it in a first pass (they are few), then the evaluation set in the
batches `evaluation.eval_batches` forms, with predictions / loss sums kept per coalition. Without it
(e.g. CLIP's two towers) `naive_values` runs one full forward per coalition, which is also the
reference the fast path is tested against. `shapley_for_model` wires either into copra.analysis.shapley,
whose `Game` caches v so no coalition is evaluated twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from copra.analysis.shapley import ESTIMATORS, Game, ShapleyResult
from copra.core.gates import CopRA
from copra.models.evaluation import Batch, FewShotData, accuracy, eval_batches, evaluating, fraction_correct
from copra.utils.errors import UserError

METRICS = ("accuracy", "neg_loss")


class _Scoring(Protocol):
    """What the evaluator calls on a classifier besides nn.Module's (PromptScoring's methods, and set_prompts)."""

    def set_prompts(self, prompts: list[str]) -> None: ...
    def class_embeddings(self) -> torch.Tensor: ...
    def logits(self, inputs: dict[str, Any], classes: torch.Tensor | None = None) -> torch.Tensor: ...
    def scores_of(self, embedded: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor: ...
    def logits_of(self, embedded: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor: ...


class CoalitionEvaluator:
    """v(mask) for coalitions of `gates.players` on `data`'s evaluation set; `values` is the batched form."""

    def __init__(
        self, classifier: nn.Module, gates: CopRA, data: FewShotData, metric: str = "accuracy", batch_size: int = 64
    ):
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not data.eval_x or len(data.eval_x) != len(data.eval_y):
            raise UserError("the evaluation set is empty (or its examples and labels differ in number)")
        self.classifier, self.gates, self.data = classifier, gates, data
        # the classifier itself, typed by what is called on it: nn.Module's types give those methods as Tensor | Module
        self._scoring = cast(_Scoring, classifier)
        self.metric, self.batch_size = metric, batch_size
        self.players = list(gates.players)
        self.labels = torch.tensor(list(data.eval_y), dtype=torch.long)
        make = getattr(classifier, "prefix_sharing", None)
        self.sharing = make(gates) if callable(make) else None  # the model part of the fast path, or None
        self._batches: list[Batch] | None = None

    @property
    def fast(self) -> bool:
        """True when coalitions share block prefixes; False: one full forward per coalition."""
        return self.sharing is not None

    @property
    def block_players(self) -> list[list[int]] | None:
        """Per block of the encoder, the indices of the players inside it (None without the fast path)."""
        return self.sharing.block_players if self.sharing is not None else None

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
                if self.metric == "accuracy":
                    out[row] = accuracy(
                        self.classifier, self.data.eval_x, self.data.eval_y, self.batch_size, self._eval_batches()
                    )
                else:
                    out[row] = -self._naive_loss()
        return out

    # -- the reference path ------------------------------------------------------------------------
    @torch.inference_mode()
    def _naive_loss(self) -> float:
        classifier, scoring = self.classifier, self._scoring
        with evaluating(classifier):
            prompts = scoring.class_embeddings()  # [C, H]
            total = 0.0
            for rows, inputs in self._eval_batches():
                logits = scoring.logits(inputs, prompts)
                total += float(F.cross_entropy(logits, self.labels[rows].to(logits.device), reduction="sum"))
            return total / len(self.data.eval_x)

    # -- the prefix-sharing path ---------------------------------------------------------------------
    def _check(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(self.players):
            raise UserError(f"coalition masks must have shape [m, {len(self.players)}], got {list(masks.shape)}")
        return masks

    def _eval_batches(self) -> list[Batch]:
        """The evaluation set as `copra.models.evaluation.eval_batches`, collated once for every coalition."""
        if self._batches is None:
            if not getattr(self.classifier, "prompts", None):
                self._scoring.set_prompts(list(self.data.prompts))
            self._batches = list(eval_batches(self.classifier, self.data.eval_x, self.batch_size))
        return self._batches

    @torch.no_grad()  # not inference_mode: the model part memoizes by version counters (coalition_runner)
    def _fast_values(self, masks: np.ndarray) -> np.ndarray:
        classifier, scoring, sharing = self.classifier, self._scoring, self.sharing
        assert sharing is not None  # values() comes here only when self.fast
        with evaluating(classifier):
            batches = self._eval_batches()
            device = next(classifier.parameters()).device
            prompts = self._class_embeddings(masks)
            accurate = self.metric == "accuracy"
            predicted = torch.empty((len(masks) if accurate else 0, len(self.labels)), dtype=torch.long)
            loss = np.zeros(len(masks))  # neg_loss: summed cross-entropy per coalition
            for examples, inputs in batches:
                labels = self.labels[examples].to(device)

                def score(texts: torch.Tensor, rows: np.ndarray) -> None:
                    for r in rows.tolist():
                        if accurate:
                            predicted[r, examples] = scoring.scores_of(texts, prompts[r]).argmax(-1).cpu()
                        else:
                            logits = scoring.logits_of(texts, prompts[r])
                            loss[r] += float(F.cross_entropy(logits, labels, reduction="sum"))

                sharing.embeddings(inputs, masks, score)
            if accurate:
                return np.array([fraction_correct(row, self.labels) for row in predicted])
            return -loss / len(self.data.eval_x)

    def _class_embeddings(self, masks: np.ndarray) -> list[torch.Tensor]:
        """The class-prompt embeddings [C, H] under each coalition (the prompts are few: one pass)."""
        prompts: list[torch.Tensor | None] = [None] * len(masks)

        def keep(embedded: torch.Tensor, rows: np.ndarray) -> None:
            for r in rows.tolist():
                prompts[r] = embedded

        assert self.sharing is not None  # only _fast_values comes here
        self.sharing.class_embeddings(masks, keep)
        return cast("list[torch.Tensor]", prompts)  # the sharing calls keep for every row: none is left None


@dataclass
class ModelShapleyResult(ShapleyResult):
    """A ShapleyResult with the names of the players (model order) and the metric behind v."""

    players: list[str] = field(default_factory=list)
    metric: str = "accuracy"


def shapley_for_model(
    classifier: nn.Module,
    gates: CopRA,
    data: FewShotData,
    method: str = "multilinear",
    samples: int = 64,
    seed: int = 0,
    metric: str = "accuracy",
    batch_size: int = 64,
    game: Game | None = None,
    **options,
) -> ModelShapleyResult:
    """Per-player Shapley values of `classifier` on data's evaluation set (paper Eq. 3 with "multilinear").

    `game` (a copra.analysis.shapley.Game over the same players, weights and data) shares its cache of v
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


def __getattr__(name: str):
    # the model glue moved to copra.models.coalition_runner; the old name still imports from here
    if name == "reuse_base_outputs":
        from copra.models.coalition_runner import reuse_base_outputs

        return reuse_base_outputs
    raise AttributeError(f"module 'copra.analysis.coalitions' has no attribute {name!r}")


__all__ = ["METRICS", "CoalitionEvaluator", "ModelShapleyResult", "shapley_for_model"]
