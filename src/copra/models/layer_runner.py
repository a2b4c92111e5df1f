"""Run a BERT-like transformers encoder block by block, so callers can share and reuse prefixes.

CopRA (Zhuang et al., 2024, Sec. 2.2) scores a coalition C of LoRA layers by the model with only the
adapters in C switched on, and estimating per-layer Shapley values needs many such coalitions. Two
coalitions that agree on the gates of the first k blocks compute identical hidden states up to
block k, so running the encoder one block at a time lets a coalition evaluator compute each shared
prefix once (copra.analysis.coalitions) and lets training cache the hidden states of a frozen prefix.

`LayerRunner(encoder)` accepts a transformers model with `.embeddings` and `.encoder.layer` (an
nn.ModuleList of blocks called as `block(hidden, attention_mask=...)`), e.g. BertModel, RobertaModel or
an all-MiniLM checkpoint, optionally wrapped in a PeftModel. The attention mask is built by
transformers' public API (`masking_utils.create_bidirectional_mask`, else the legacy
`get_extended_attention_mask`; see copra.utils.compat), so it has the form that the configured attention
implementation (eager, sdpa, ...) expects, and blocks are called with keywords. LoRA modules inside a block are ordinary submodules, so
CopRA's gate hooks apply as in a full forward. The runner adds no grad mode of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from copra.utils.compat import attention_mask_builder
from copra.utils.errors import UserError


def unwrap(encoder: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (LoRA layers still injected), or `encoder` itself."""
    get_base = getattr(encoder, "get_base_model", None)
    return get_base() if callable(get_base) else encoder


class LayerRunner:
    """Embeddings, attention mask and blocks of a BERT-like encoder, callable one range at a time.

    `run(*start(input_ids, attention_mask), 0, runner.num_layers)` equals
    `encoder(input_ids=..., attention_mask=...).last_hidden_state`.
    """

    def __init__(self, encoder: nn.Module):
        model = unwrap(encoder)
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList) or not len(layers):
            raise UserError(
                f"cannot run {type(model).__name__} layer by layer: it needs `.embeddings` and a "
                "`.encoder.layer` ModuleList of blocks (a BERT-like encoder)"
            )
        config = getattr(model, "config", None)
        if config is None or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise UserError(
                f"cannot run {type(model).__name__} layer by layer: only bidirectional encoders are supported"
            )
        self.model = model
        self.embeddings: nn.Module = model.embeddings
        self.layers: nn.ModuleList = layers
        self._mask_fn = self._pick_mask_builder(model)
        self._blocks: dict[int, int] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- attention mask -----------------------------------------------------------------------
    @staticmethod
    def _pick_mask_builder(model: nn.Module):
        build = attention_mask_builder(model)
        if build is None:
            raise UserError(f"cannot build the attention mask of {type(model).__name__} for a layer-by-layer run")
        return build

    # -- running --------------------------------------------------------------------------------
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(hidden states after the embeddings [B, T, H], the mask every block takes)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.embeddings(**kwargs)
        return hidden, self._mask_fn(hidden, attention_mask.to(hidden.device))

    def run(self, hidden: torch.Tensor, layer_mask: Any, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks start..stop-1 applied to `hidden` (stop=None: to the last block)."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise UserError(f"layer range [{start}, {stop}) is outside the {self.num_layers} blocks")
        for index in range(start, stop):
            out = self.layers[index](hidden, attention_mask=layer_mask)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return hidden

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state [B, T, H], like `encoder(...).last_hidden_state`."""
        hidden, mask = self.start(input_ids, attention_mask)
        return self.run(hidden, mask)

    def block_of(self, module: nn.Module) -> int | None:
        """Index of the block containing `module`, or None when it lies outside every block."""
        if self._blocks is None:
            self._blocks = {id(m): i for i, block in enumerate(self.layers) for m in block.modules()}
        return self._blocks.get(id(module))


__all__ = ["LayerRunner", "unwrap"]
