"""Skip the frozen lower blocks during CopRA training by reusing their hidden states.

When CopRA gates off the adapters of blocks 0..k-1 (often, early in training), those blocks compute
exactly the frozen base model. Few-shot training sees the same few examples (and the same class
prompts) every epoch, so their hidden states after block k-1 are the same every time: compute them
once (no grad), keep them per input row, and start the forward at block k. Autograd already stops
the backward at the lowest active adapter; this removes the forward of the frozen prefix too.

Exact only when the backbone is deterministic (backbone dropout 0, the default) and inputs repeat
(text: yes; CLIP images with random augmentation: no, so only the text classifier uses it). Rows
are keyed by their token ids, so padding and batch composition do not matter: a real token never
attends to padding, and padded positions are filled with zeros, which no real token reads. Each row
is computed alone and unpadded, so its cached states are bit-for-bit a function of its tokens (a
resumed run, which fills the cache in other groupings, gets the very same numbers).
"""

from __future__ import annotations

import torch
from torch import nn

from copra.core.gates import CopRA
from copra.models.layer_runner import LayerRunner


class FrozenPrefixCache:
    """Per-row hidden states of the frozen prefix, for one encoder under one CopRA controller."""

    def __init__(self, encoder: nn.Module, gates: CopRA, max_rows: int = 4096):
        self.runner = LayerRunner(encoder)
        self.gates = gates
        self.max_rows = max_rows
        # lowest block touched by each player's LoRA modules (None: outside every block)
        self._first_block = []
        for index in range(len(gates.players)):
            blocks = [self.runner.block_of(m) for m in gates.modules_of(index)]
            self._first_block.append(None if None in blocks else min(blocks))
        self._rows: dict[bytes, list[torch.Tensor]] = {}  # key -> [after embeddings, after block 0, ...]
        self.hits = 0  # blocks skipped, summed over rows (for benchmarks and tests)

    def frozen_blocks(self) -> int:
        """How many leading blocks have every adapter off under the current training gates."""
        lowest = self.runner.num_layers
        for index, block in enumerate(self._first_block):
            if self.gates.is_on(index, training=True):
                if block is None:
                    return 0  # an active adapter outside the blocks (e.g. embeddings): nothing is frozen
                lowest = min(lowest, block)
        return lowest

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Like `encoder(...).last_hidden_state`, starting at the first block with an active adapter."""
        frozen = self.frozen_blocks()
        hidden, layer_mask = self.runner.start(input_ids, attention_mask)  # [B, T, H]; cheap next to a block
        if frozen == 0:
            return self.runner.run(hidden, layer_mask)
        lengths = attention_mask.sum(1).tolist()
        keys = [input_ids[r, : lengths[r]].cpu().numpy().tobytes() for r in range(len(lengths))]
        missing = [r for r, key in enumerate(keys) if len(self._rows.get(key, ())) <= frozen]
        if missing:
            self._fill(input_ids, missing, keys, lengths, frozen)
        start = torch.zeros_like(hidden)
        for r, key in enumerate(keys):
            start[r, : lengths[r]] = self._rows[key][frozen]
        self.hits += frozen * len(keys)
        return self.runner.run(start, layer_mask, frozen)

    @torch.no_grad()
    def _fill(self, input_ids, rows: list[int], keys: list[bytes], lengths: list[int], depth: int) -> None:
        """Run each missing row on its own, unpadded, through blocks 0..depth-1 (adapters there are off).

        One row at a time, so a cached state is a function of the row's tokens alone: CPU matmuls
        can differ in the last bits with the batch shape, and a resumed run fills the cache with other
        row groupings than the uninterrupted one. Rows already cached to a shallower depth continue
        from there (the same function, computed once).
        """
        if len(self._rows) + len(rows) > self.max_rows:
            self._rows.clear()  # inputs do not repeat as expected: stay bounded
        for r in rows:
            ids = input_ids[r : r + 1, : lengths[r]]
            states, mask = self.runner.start(ids, torch.ones_like(ids))
            per_depth = self._rows.get(keys[r])
            if per_depth:
                states = per_depth[-1].unsqueeze(0)
            else:
                per_depth = [states[0].clone()]
            for block in range(len(per_depth) - 1, depth):
                states = self.runner.run(states, mask, block, block + 1)
                per_depth.append(states[0].clone())
            self._rows[keys[r]] = per_depth
