"""Pruning LoRA adapters: pure functions from a PEFT adapter state dict to one PEFT still loads.

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 4 / Fig. 4. Because
CopRA trains with layers randomly switched off, its adapters degrade gracefully when parts of them
are removed afterwards; the paper measures that by structured pruning (keep every other layer, only
the low / middle / high third of the layers, or only the query / key / value / output projection)
and by unstructured magnitude pruning. Pruned parts are zeroed, never deleted, so every key and shape
is kept and `set_peft_model_state_dict` loads the result into the original LoRA model.

An adapter is a state dict keyed as PEFT saves it: `<module>.lora_A.weight` [r, in] and
`<module>.lora_B.weight` [out, r] (also `lora_embedding_A/B`). A layer (a player, as in copra.core.gates)
is the key prefix up to and including a block index, `...layer.3`, `...layers.3`, `...h.3`,
`...block(s).3`; models with several towers (CLIP's text_model and vision_model) have one list of
blocks per tower. LoRA modules outside any block are no player: layer schemes leave them as they are.
Other keys (biases, DoRA magnitudes) are copied unchanged. Inputs are never modified.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+))(?:\.|$)")
_MATRICES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# Canonical projection -> module-name endings that mean it (BERT, CLIP/OPT/LLaMA, T5).
PROJECTIONS = {
    "query": ("query", "q_proj", "q"),
    "key": ("key", "k_proj", "k"),
    "value": ("value", "v_proj", "v"),
    "output": ("attention.output.dense", "out_proj", "o_proj", "o"),
}
LAYER_SCHEMES = ("all", "every_other", "low", "middle", "high")
KEEP_SCHEMES = ("every_other", "low", "middle", "high")  # fixed choices of K players, for any K
_PEFT = re.compile(r"^base_model\.model\.")
STRUCTURED = LAYER_SCHEMES + tuple(PROJECTIONS)
SCOPES = ("matrix", "global")


def _module(key: str) -> str | None:
    """The LoRA module a key belongs to if it is an A/B matrix, else None."""
    parts = key.split(".")
    hits = [i for i, part in enumerate(parts) if part in _MATRICES]
    return ".".join(parts[: hits[-1]]) if hits else None


def _lora_module(key: str) -> str:
    """The LoRA module of a key known to be an A/B matrix (from `_lora_keys`, or one `_zeroed` passes to `drop`)."""
    module = _module(key)
    assert module is not None, key
    return module


def _lora_keys(adapter: Adapter) -> list[str]:
    keys = [k for k in adapter if _module(k) is not None]
    if not keys:
        raise UserError(f"the adapter has no lora_A/lora_B tensors (keys: {list(adapter)[:5]}...)")
    return keys


def _block(key: str) -> tuple[str, str, int] | None:
    """(block prefix, tower, index) of a key, or None outside any block."""
    match = _BLOCK.match(key)
    if not match:
        return None
    prefix = match.group(1)
    return prefix, prefix[: -len(match.group(2)) - 1], int(match.group(2))


def _towers(adapter: Adapter) -> list[list[str]]:
    """Block prefixes of each tower (towers in order of first appearance, blocks numerically)."""
    towers: dict[str, dict[str, int]] = {}
    for key in _lora_keys(adapter):
        found = _block(key)
        if found:
            towers.setdefault(found[1], {})[found[0]] = found[2]
    if not towers:
        raise UserError(
            "no layer index in the adapter's LoRA keys (expected `layer.N`, `layers.N`, `h.N` or `blocks.N`)"
        )
    return [sorted(blocks, key=blocks.__getitem__) for blocks in towers.values()]


def layer_ids(adapter: Adapter) -> list[str]:
    """The players: block prefixes, tower by tower in order of first appearance, numerically within one."""
    return [block for tower in _towers(adapter) for block in tower]


def _zeroed(adapter: Adapter, drop: Callable[[str], bool]) -> Adapter:
    """A copy of `adapter` with the A/B matrices whose key satisfies `drop` set to zero."""
    out = {}
    for key, value in adapter.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif _module(key) is not None and drop(key):
            out[key] = torch.zeros_like(value)
        else:
            out[key] = value.detach().clone()
    return out


def _drop_blocks(adapter: Adapter, blocks: set[str]) -> Adapter:
    return _zeroed(adapter, lambda key: (_block(key) or ("",))[0] in blocks)


def drop_layers(adapter: Adapter, layers: Iterable[str | int]) -> Adapter:
    """Zero the A and B of the given layers: block prefixes, or ints indexing each tower's blocks.

    An int is a position in each tower's sorted block list (so 0 is the first adapted block, and
    -1 the last), applied to every tower that has it.
    """
    towers = _towers(adapter)
    known = {block for tower in towers for block in tower}
    drop: set[str] = set()
    for layer in layers:
        if isinstance(layer, str):
            if layer not in known:
                raise UserError(f"unknown layer {layer!r}; the adapter's layers are {layer_ids(adapter)}")
            drop.add(layer)
            continue
        try:
            index = operator.index(layer)
            if isinstance(layer, bool):
                raise TypeError
        except TypeError:
            raise UserError(f"a layer is a block prefix (str) or an index (int), got {layer!r}") from None
        hits = [tower[index] for tower in towers if -len(tower) <= index < len(tower)]
        if not hits:
            sizes = [len(t) for t in towers]
            raise UserError(f"layer index {layer!r} is out of range for towers of {sizes} blocks")
        drop.update(hits)
    return _drop_blocks(adapter, drop)


def projection_of(module: str) -> str | None:
    """'query' / 'key' / 'value' / 'output' for an attention projection's module name, else None."""
    for name, endings in PROJECTIONS.items():
        if any(module == e or module.endswith("." + e) for e in endings):
            return name
    return None


def projections(adapter: Adapter) -> list[str]:
    """The attention projections that have LoRA modules in `adapter`, in PROJECTIONS order."""
    present = {projection_of(_lora_module(key)) for key in _lora_keys(adapter)}
    return [name for name in PROJECTIONS if name in present]


def _canonical(names: Iterable[str] | str) -> set[str]:
    names = [names] if isinstance(names, str) else list(names)
    alias = {e: name for name, endings in PROJECTIONS.items() for e in (name, *endings)}
    unknown = [n for n in names if n not in alias]
    if unknown or not names:
        raise UserError(f"unknown projection {unknown[0] if unknown else names!r}; choose from {list(alias)}")
    return {alias[n] for n in names}


def _select(adapter: Adapter, names: Iterable[str] | str, keep: bool) -> Adapter:
    wanted = _canonical(names)
    present = projections(adapter)
    if not wanted & set(present):
        raise UserError(f"the adapter has no {sorted(wanted)} LoRA modules; its projections are {present}")
    return _zeroed(adapter, lambda key: (projection_of(_lora_module(key)) in wanted) != keep)


def keep_projections(adapter: Adapter, names: Iterable[str] | str) -> Adapter:
    """Keep only these projections' LoRA modules (query/key/value/output or an alias such as q_proj)."""
    return _select(adapter, names, keep=True)


def drop_projections(adapter: Adapter, names: Iterable[str] | str) -> Adapter:
    """Zero these projections' LoRA modules, keep every other module."""
    return _select(adapter, names, keep=False)


def _third(blocks: Sequence[str], which: int) -> list[str]:
    """Blocks of third `which` (0 low, 1 middle, 2 high); with L % 3 != 0 the lower thirds are larger."""
    return list(np.array_split(np.array(blocks, dtype=object), 3)[which])


def structured(adapter: Adapter, scheme: str) -> Adapter:
    """Structured pruning as in the paper's Fig. 4: the scheme names the part that is retained.

    all: unchanged; every_other: zero odd-indexed blocks of each tower; low / middle / high: keep only
    that third of each tower's blocks; query / key / value / output: keep only that projection.
    """
    if scheme not in STRUCTURED:
        raise UserError(f"unknown structured pruning scheme {scheme!r}; choose from {list(STRUCTURED)}")
    _lora_keys(adapter)  # refuse a state dict with no LoRA in it, whatever the scheme
    if scheme in PROJECTIONS:
        return keep_projections(adapter, scheme)
    if scheme == "all":
        return _zeroed(adapter, lambda key: False)
    towers = _towers(adapter)
    if scheme == "every_other":
        return _drop_blocks(adapter, {b for tower in towers for b in tower[1::2]})
    which = ("low", "middle", "high").index(scheme)
    keep = {b for tower in towers for b in _third(tower, which)}
    return _drop_blocks(adapter, {b for tower in towers for b in tower} - keep)


def _count(sparsity: float, numel: int) -> int:
    """floor(sparsity * numel), forgiving float rounding (0.29 * 100 is 28.999999999999996)."""
    x = sparsity * numel
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 1e-9 * max(1.0, x) else math.floor(x)


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest |values| (1-D); ties go to the lower index."""
    return torch.argsort(values.abs(), stable=True)[:k]


def magnitude(adapter: Adapter, sparsity: float, scope: str = "matrix") -> Adapter:
    """Unstructured pruning: zero the `sparsity` fraction of A/B entries with the smallest |x|.

    scope "matrix": floor(sparsity * numel) entries of every matrix; "global": floor(sparsity * total)
    entries under one threshold over all A/B entries. Entries already zero count among the smallest.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise UserError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise UserError(f"sparsity must be in [0, 1) (the fraction of entries zeroed), got {sparsity!r}")
    if scope not in SCOPES:
        raise UserError(f"unknown magnitude-pruning scope {scope!r}; choose from {list(SCOPES)}")
    keys = _lora_keys(adapter)
    for key in keys:
        if not bool(torch.isfinite(adapter[key]).all()):
            raise UserError(f"adapter tensor {key!r} has NaN or inf entries; refusing to prune it")
    out = _zeroed(adapter, lambda key: False)
    flats = [adapter[key].detach().reshape(-1).clone() for key in keys]  # fresh, contiguous copies
    if scope == "matrix":
        for flat in flats:
            flat[_smallest(flat, _count(float(sparsity), flat.numel()))] = 0
    else:
        joined = torch.cat([f.to(torch.float64) for f in flats])
        chosen = torch.zeros(joined.numel(), dtype=torch.bool)
        chosen[_smallest(joined, _count(float(sparsity), joined.numel()))] = True
        for flat, mask in zip(flats, torch.split(chosen, [f.numel() for f in flats])):
            flat[mask] = 0
    for key, flat in zip(keys, flats):
        out[key] = flat.reshape(adapter[key].shape)
    return out


# -- keeping K players: by value (Shapley-guided) or by a fixed scheme ------------------------------
def _strip(name: str) -> str:
    return _PEFT.sub("", name)


def players_of(adapter: Adapter, granularity: str = "layer") -> list[str]:
    """The adapter's players as copra.core.gates names them (no PEFT prefix): blocks, or single LoRA modules.

    "layer": every block (tower by tower, numerically), then each LoRA module outside any block on
    its own (as gates.player_of does); "module": every LoRA module, grouped by block in that order.
    """
    if granularity not in ("layer", "module"):
        raise UserError(f"unknown granularity {granularity!r}; choose layer or module")
    modules = list(dict.fromkeys(_lora_module(k) for k in _lora_keys(adapter)))
    rank = {block: i for i, block in enumerate(layer_ids(adapter))} if any(_block(m) for m in modules) else {}
    position = lambda m: rank.get((_block(m) or ("",))[0], len(rank))  # noqa: E731
    modules.sort(key=position)  # stable: key order inside a block
    names = [m if granularity == "module" else (_block(m) or (m,))[0] for m in modules]
    return [_strip(n) for n in dict.fromkeys(names)]


def check_k(k, n: int) -> int:
    """K as an int in [1, n] (how many of n players to keep), else UserError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise UserError(f"keep K must be an integer from 1 to {n} (the number of players), got {k!r}")
    return int(k)


def top_k(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k highest values, in increasing index order (ties go to the lower index)."""
    k = check_k(k, len(values))
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return sorted(order[:k])


def fixed_subset(scheme: str, n: int, k: int) -> list[int]:
    """Indices of the k of n players (model order) a fixed scheme keeps, for any k.

    every_other: k evenly spaced from the first (k = n/2 gives 0, 2, 4, ...); low / high: the first /
    last k; middle: k centred (lower side when n - k is odd). At k = n/3 these are Fig. 4's thirds.
    """
    if scheme not in KEEP_SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose from {list(KEEP_SCHEMES)}")
    k = check_k(k, n)
    start = {"low": 0, "middle": (n - k) // 2, "high": n - k}.get(scheme)
    return [i * n // k for i in range(k)] if start is None else list(range(start, start + k))


def keep_players(adapter: Adapter, players: Iterable[str]) -> Adapter:
    """Zero the A/B of every player not in `players` (names as `players_of` gives them, either granularity)."""
    players = [_strip(p) for p in players]
    for granularity in ("layer", "module"):
        known = players_of(adapter, granularity)
        if set(players) <= set(known):
            break
    else:
        unknown = next(p for p in players if p not in players_of(adapter, "module"))
        raise UserError(f"unknown player {unknown!r}; the adapter's layers are {players_of(adapter)}")
    keep = set(players)
    name = (lambda m: _strip(m)) if granularity == "module" else (lambda m: _strip((_block(m) or (m,))[0]))
    return _zeroed(adapter, lambda key: name(_module(key)) not in keep)


def sparsity_of(adapter: Adapter) -> float:
    """Fraction of zero entries over all lora_A/lora_B matrices."""
    keys = _lora_keys(adapter)
    zeros = sum(int((adapter[k] == 0).sum()) for k in keys)
    return zeros / sum(adapter[k].numel() for k in keys)


__all__ = [
    "KEEP_SCHEMES",
    "PROJECTIONS",
    "SCOPES",
    "STRUCTURED",
    "check_k",
    "drop_layers",
    "drop_projections",
    "fixed_subset",
    "keep_players",
    "keep_projections",
    "layer_ids",
    "magnitude",
    "players_of",
    "projection_of",
    "projections",
    "sparsity_of",
    "structured",
    "top_k",
]
