"""Operations on adapter folders: `copra merge` and `copra prune` as library functions.

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 3.1: CopRA adapters are
meant to be merged. `merge_folders` turns PEFT adapter folders into one PEFT adapter folder:

    fusion   B = sum_i w_i B_i, A = sum_i w_i A_i          (same rank r, same adapter_config)
    mixture  B A = sum_i w_i B_i A_i, exactly             (rank n*r, adapter_config from `mixture_config`)
    linear, cat, svd, ties, dare_*, magnitude_prune(_svd)  PEFT's add_weighted_adapter (`copra.adapters.peft_merge`)

with optional LoRA Align of every adapter to the first before a fusion. Why a separate function: the
result must be loadable by plain `PeftModel.from_pretrained`, and a bad input must never leave a
partial folder, so everything (folders, weights, ranks, targets, finiteness) is checked in memory
before anything is written, and the folder itself is written atomically by `save_adapter`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from copra.adapters.io import finite_or_none, load_adapter, read_metadata, save_adapter
from copra.adapters.merge import check_compatible, check_weights
from copra.adapters.peft_merge import MERGE_METHODS, PEFT_METHODS, check_inputs, check_options, merge_states
from copra.adapters.prune import STRUCTURED, check_k, keep_players, magnitude, players_of, structured, top_k
from copra.utils.errors import UserError
from copra.utils.locks import locks_output


def _describe(folders: Sequence[Path]) -> str:
    return ", ".join(f"adapter {i} = {f}" for i, f in enumerate(folders))


def _metadata(folder: Path) -> dict:
    try:
        return read_metadata(folder)
    except ValueError as error:
        raise UserError(f"{folder / 'copra.json'}: not valid JSON ({error})") from None


@locks_output  # one writer per output folder, from the existence check to the rename
def merge_folders(
    folders: Sequence[str | Path],
    method: str = "fusion",
    weights: Sequence[float] | None = None,
    align: bool = False,
    *,
    output: str | Path,
    align_steps: int = 200,
    overwrite: bool = False,
    density: float | None = None,
    majority_sign_method: str | None = None,
    seed: int = 0,
) -> Path:
    """Merge PEFT LoRA adapter folders into the PEFT folder `output`; returns its path.

    `method`: copra's fusion or mixture, or one of PEFT's combination types (`peft_merge.PEFT_METHODS`,
    computed by PEFT's add_weighted_adapter on a skeleton, no base model needed; `density` for TIES /
    DARE / magnitude merges, `majority_sign_method` for TIES, `seed` for DARE's random drops).
    `weights`: one per adapter (default 1/n each; they need not sum to 1). `align`: LoRA Align every
    adapter to the first before merging (changes factor-wise methods; mixture and cat are exact either
    way). Writes `copra.json` with the inputs, weights, method and the bound D_upper (alpha = 0.5) of
    each adapter against the first, before and after alignment. UserError on any bad input, nothing written.
    """
    from copra.adapters.align import align_many, bound

    paths = [Path(f) for f in folders]
    output = Path(output)
    if len(paths) < 2:
        raise UserError(f"merging needs at least two adapter folders, got {len(paths)}")
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
    if method in PEFT_METHODS:
        check_options(method, density, majority_sign_method)
    elif density is not None or majority_sign_method is not None:
        raise UserError(f"density and majority sign method apply to PEFT's methods, not to {method!r}")
    if not isinstance(align, bool):
        raise UserError(f"align must be true or false, got {align!r}")
    if isinstance(align_steps, bool) or not isinstance(align_steps, int) or align_steps < 1:
        raise UserError(f"align steps must be a positive integer, got {align_steps!r}")
    resolved = [f.resolve() for f in paths]
    if output.resolve() in resolved:
        raise UserError(f"output {output} is one of the input adapters; choose another folder")
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; remove it or pass overwrite")
    w = check_weights(weights, len(paths))
    loaded = [load_adapter(f) for f in paths]  # UserError names the folder or file
    inputs_meta = [_metadata(f) for f in paths]
    states, configs = [s for s, _ in loaded], [c for _, c in loaded]
    try:
        if method in PEFT_METHODS and not align:
            check_inputs(states, configs, method)  # PEFT's rules: ranks may differ for cat / SVD
        else:
            check_compatible(states, configs)
    except UserError as error:
        raise UserError(f"{error} ({_describe(paths)})") from None
    same_shape = all(s[k].shape == v.shape for s in states for k, v in states[0].items() if k in s)
    before = [bound(states[0], s) for s in states[1:]] if same_shape else None
    after = None
    if align:
        states = [states[0], *align_many(states[0], states[1:], steps=align_steps)]
        after = [bound(states[0], s) for s in states[1:]]
    merged, config = merge_states(
        method, states, configs, w, density=density, majority_sign_method=majority_sign_method, seed=seed
    )
    metadata = {
        "merged": True,
        "method": method,
        "weights": w,
        "align": align,
        "inputs": [str(f) for f in resolved],
        "input_metadata": [{k: m.get(k) for k in ("method", "task", "seed", "accuracy")} for m in inputs_meta],
        "bound_alpha": 0.5,
        "bound_before_align": None if before is None else [finite_or_none(b) for b in before],
        "bound_after_align": None if after is None else [finite_or_none(b) for b in after],
    }
    if method in PEFT_METHODS:
        metadata["peft"] = {
            "combination_type": method,
            "density": density,
            "seed": seed,
            "majority_sign_method": majority_sign_method,
        }
    return save_adapter(merged, config, output, metadata)  # refuses NaN/inf before writing; atomic


@locks_output
def prune_folder(
    folder: str | Path,
    *,
    output: str | Path,
    scheme: str | None = None,
    sparsity: float | None = None,
    scope: str = "matrix",
    keep_values: str | Path | tuple | None = None,
    keep: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Prune a PEFT adapter folder into `output` (still a PEFT folder): a structured scheme, magnitude
    sparsity, or the `keep` players with the highest Shapley values (`keep_values`: a VALUES.json as
    `copra shapley` writes it, or a (players, values) pair already computed).

    Structured schemes zero whole layers or projections (keys kept, so PEFT loads it); `sparsity`
    zeroes that fraction of the smallest-magnitude A/B entries. UserError on bad input, nothing written.
    """
    folder, output = Path(folder), Path(output)
    if sum(x is not None for x in (scheme, sparsity, keep_values)) != 1:
        raise UserError("prune needs exactly one of a scheme, a sparsity or Shapley values to keep by")
    if (keep_values is None) != (keep is None):
        raise UserError("keeping by Shapley values needs both the values and K (--keep-by-shapley with --keep)")
    if scheme is not None and scheme not in STRUCTURED:
        raise UserError(f"unknown pruning scheme {scheme!r}; choose from {list(STRUCTURED)}")
    check_output(folder, output, overwrite)
    if keep_values is not None and not isinstance(keep_values, tuple):
        keep_values = Path(keep_values)
    state, config = load_adapter(folder)
    metadata = {
        "pruned": True,
        "input": str(folder.resolve()),
        "scheme": scheme,
        "sparsity": sparsity,
        "scope": scope if sparsity is not None else None,
        "input_metadata": {k: _metadata(folder).get(k) for k in ("method", "task", "seed", "accuracy")},
    }
    if keep_values is not None:
        players, values = keep_values if isinstance(keep_values, tuple) else read_player_values(keep_values, folder)
        players, values = list(players), list(values)
        assert keep is not None  # checked above: K comes with the values
        kept = choose_players(state, players, values, keep)
        pruned = keep_players(state, kept)
        metadata["keep_by_shapley"] = {
            "source": "auto" if isinstance(keep_values, tuple) else str(keep_values.resolve()),
            "keep": keep,
            "kept": kept,
            "players": players,
            "values": values,
        }
    elif scheme is not None:
        pruned = structured(state, scheme)
    else:
        assert sparsity is not None  # checked above: exactly one of scheme, sparsity, keep_values
        pruned = magnitude(state, sparsity, scope)
    return save_adapter(pruned, config, output, metadata)


def check_output(folder: Path, output: Path, overwrite: bool) -> None:
    """UserError if `output` is the input or (without overwrite) already exists."""
    if output.resolve() == folder.resolve():
        raise UserError(f"output {output} is the input adapter; choose another folder")
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; remove it or pass overwrite")


def choose_players(state: dict, players: list[str], values: list[float], keep: int) -> list[str]:
    """The `keep` players with the highest values, after checking they are exactly the adapter's players."""
    for granularity in ("layer", "module"):
        if sorted(players) == sorted(players_of(state, granularity)):
            break
    else:
        raise UserError(
            f"the Shapley values are for players {players[:3]}... ({len(players)}), not for this "
            f"adapter's layers {players_of(state)} or its {len(players_of(state, 'module'))} modules"
        )
    return [players[i] for i in top_k(values, check_k(keep, len(players)))]


def read_player_values(path: str | Path, adapter: Path) -> tuple[list[str], list[float]]:
    """(players, values) from a VALUES.json: {"players", "values"}, or a `copra shapley` summary.

    From a summary: the run whose folder is `adapter`; else the mean over seeds of the method the
    adapter was trained with (its copra.json); else the only run in the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Shapley values file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read Shapley values from {path}: {error}") from None
    row = _values_row(data, adapter, path) if isinstance(data, dict) and "methods" in data else data
    players, values = (
        (row.get("players"), row.get("values", row.get("mean"))) if isinstance(row, dict) else (None, None)
    )
    if not (
        isinstance(players, list)
        and isinstance(values, list)
        and len(players) == len(values) > 0
        and all(isinstance(p, str) for p in players)
        and len(set(players)) == len(players)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise UserError(
            f"{path}: expected distinct player names and one finite value each "
            '(a `copra shapley` summary or {"players": [...], "values": [...]})'
        )
    return players, [float(v) for v in values]


def _values_row(summary: dict, adapter: Path, path: Path) -> dict:
    methods = summary.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(m, dict) for m in methods.values()):
        raise UserError(f"{path}: 'methods' must map each training method to its Shapley values")
    runs = [run for m in methods.values() for run in m.get("runs") or [] if isinstance(run, dict)]
    mine = [r for r in runs if isinstance(r.get("folder"), str) and Path(r["folder"]).resolve() == adapter.resolve()]
    if mine:
        return mine[0]
    method = _metadata(adapter).get("method")
    if method in methods:
        return methods[method]
    if len(runs) == 1:
        return runs[0]
    raise UserError(
        f"{path} holds Shapley values of {len(runs)} adapters, none of them {adapter}, and the "
        f"adapter's training method ({method!r}) is not among {sorted(methods)}"
    )
