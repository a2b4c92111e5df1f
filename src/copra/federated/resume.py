"""Continuing a federated run from its output folder: the last completed round, the same settings only.

Federated rounds are deterministic given the settings (client seeds are `client_seed(seed, round,
client)`, the split and the few-shot sample come from the run seed, aggregation has no randomness but
the DP noise, whose generator state is saved with each round), so what a round leaves behind (the
merged adapter, the round records, the noise state) is all the state there is:
a run started again with the same settings continues after the last completed round and ends with
the adapter an uninterrupted run gives. Settings that differ are refused with one line, before
anything is written.

`copra federated` keeps, under `<output_dir>/progress/`:

    settings.json                        the run's settings (what must match to continue)
    <method>-seed<S>.json                {"rounds": [...], "adapter": "<method>-seed<S>-round<R>.safetensors",
                                          "clients": "<method>-seed<S>-round<R>-clients.safetensors",
                                          "noise_rng": the DP noise generator's state (with DP only)}
    <method>-seed<S>-round<R>.safetensors  the merged adapter after round R (safetensors, never pickle)
    <method>-seed<S>-round<R>-clients.safetensors  what each client sent in round R ("<i>/<key>"), for the
                                          merge diagnostics of a run that is only re-summarised

The adapters of round R are written (atomically) before the record that names them, and the older ones
are removed after, so a kill at any point leaves a record whose adapters exist. The deployment ServerApp
keeps the same things in its own layout (history.json, merged/round-R/) and checks settings with
`first_difference`. Both were recorded before the DP settings existed; such a record reads them as off
(`RECORDED_BEFORE`), so those runs still continue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save

from copra.adapters.io import read_safetensors
from copra.utils.atomic import write_bytes, write_json
from copra.utils.errors import UserError

SETTINGS_FILE = "settings.json"
# Settings added after runs were first recorded, as those runs used them: the DP keys did not exist, and DP was off
RECORDED_BEFORE: dict[str, Any] = {"dp_noise_multiplier": 0.0, "dp_clip_norm": 0.0}


def recorded(saved: dict[str, Any], key: str) -> Any:
    """The value of `key` in a run's saved settings; a key recorded before it existed reads as `RECORDED_BEFORE`."""
    return saved.get(key, RECORDED_BEFORE.get(key, "<unset>"))


def first_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first key (sorted) whose value differs between saved and current settings, else None."""
    for key in sorted(set(saved) | set(now)):
        if recorded(saved, key) != now.get(key, "<unset>"):
            return key
    return None


def refuse_other_settings(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """UserError naming the first setting that differs from the run recorded in `where`."""
    key = first_difference(saved, now)
    if key is not None:
        raise UserError(
            f"{where} holds a federated run with {key}={recorded(saved, key)!r}, now {now.get(key, '<unset>')!r}; "
            "continue it with the same settings or use another output folder"
        )


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot resume from it ({type(error).__name__}); use another output folder") from None


class Saved(NamedTuple):
    """What `Progress.load` gives back of a run: nothing (no round yet) or its state after its last round."""

    rounds: list[dict]  # the completed rounds' records
    merged: dict[str, torch.Tensor] | None  # the merged adapter after the last of them
    noise_rng: dict | None  # the DP noise generator's state then (None: no DP)
    clients: list[dict[str, torch.Tensor]]  # what each client sent in that round ([]: recorded before copra kept it)


class Progress:
    """The resumable state of `copra federated` runs in `folder` (`<output_dir>/progress`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def check(self, settings: dict[str, Any]) -> None:
        """Refuse a folder holding another run's progress (nothing is written here)."""
        path = self.folder / SETTINGS_FILE
        if path.exists():
            refuse_other_settings(_json(path), json.loads(json.dumps(settings)), self.folder.parent)

    def start(self, settings: dict[str, Any]) -> None:
        """Check the settings, then record them (first start only)."""
        self.check(settings)
        if not (self.folder / SETTINGS_FILE).exists():
            write_json(self.folder / SETTINGS_FILE, settings)

    def load(self, name: str) -> Saved:
        """Run `name` as its last completed round left it."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return Saved([], None, None, [])
        record = _json(path)
        clients: list[dict[str, torch.Tensor]] = []
        if record.get("clients"):
            flat = read_safetensors(self.folder / record["clients"])
            for key, value in flat.items():
                i, name_in_adapter = key.split("/", 1)
                clients += [{} for _ in range(int(i) + 1 - len(clients))]
                clients[int(i)][name_in_adapter] = value
        return Saved(
            record["rounds"], read_safetensors(self.folder / record["adapter"]), record.get("noise_rng"), clients
        )

    def save(
        self,
        name: str,
        rounds: list[dict],
        merged: dict[str, torch.Tensor],
        noise_rng: dict | None = None,
        clients: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Record run `name` after its round len(rounds): the adapters first (merged, and what each client sent),
        then the record (with the DP noise generator's state, if any), then drop the old adapters."""
        stem = f"{name}-round{len(rounds)}"
        write_bytes(self.folder / f"{stem}.safetensors", save(_cpu(merged)))
        record: dict[str, Any] = {"rounds": rounds, "adapter": f"{stem}.safetensors"}
        if clients:
            flat = {f"{i}/{k}": v for i, state in enumerate(clients) for k, v in state.items()}
            write_bytes(self.folder / f"{stem}-clients.safetensors", save(_cpu(flat)))
            record["clients"] = f"{stem}-clients.safetensors"
        if noise_rng is not None:
            record["noise_rng"] = noise_rng
        write_json(self.folder / f"{name}.json", record)
        old = f"{name}-round{len(rounds) - 1}"
        for path in (self.folder / f"{old}.safetensors", self.folder / f"{old}-clients.safetensors"):
            path.unlink(missing_ok=True)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
