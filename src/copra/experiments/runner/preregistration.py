"""Pre-registration: fix the analysis (primary endpoints, their order, the correction, alpha, seeds, tasks)
before any result exists, and let the report show whether it changed.

A spec is any JSON-able dict the suite gives. Its fingerprint is the sha256 of its canonical JSON
(sorted keys, no whitespace, UTF-8; list order counts, so reordering the primary endpoints is a change;
1 and 1.0 differ). `register` writes `<folder>/preregistration.json` = {"spec", "sha256",
"registered_at"} atomically (`copra.utils.atomic.write_json`):

* absent: written;
* present, same hash: left as it is (the first registration time stays);
* present, another hash, and the folder already holds results: refused with a UserError naming both
  hashes, the file unchanged: an analysis chosen after seeing results is not pre-registered;
* present, another hash, no results yet: replaced (nothing was seen yet).

What counts as a result: any `*.json` file under the folder, at any depth (the report finds summaries
there the same way), other than preregistration.json itself and hidden files or folders (the atomic
writers' temporaries, locks). That includes a suite's `suite.json`: once a suite has started, its
pre-registration is fixed. The rule is deliberately wide: a false "results exist" costs a new folder;
a false "none yet" would let an analysis change after its results were seen.

`check` is for the report: the registered hash, whether the spec in hand matches it, when it was
registered, and a one-line problem when it does not match (never raises on a bad file).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from copra.utils.atomic import write_json
from copra.utils.errors import UserError

FILENAME = "preregistration.json"


def canonical(spec: dict) -> str:
    """The canonical JSON of `spec`: sorted keys, separators without spaces, non-ASCII kept; UserError if not JSON-able."""
    if not isinstance(spec, dict):
        raise UserError(f"a pre-registration spec must be a dict, got {type(spec).__name__}")
    try:
        return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise UserError(f"the pre-registration spec is not plain JSON: {error}") from None


def fingerprint(spec: dict) -> str:
    """sha256 hex digest of `canonical(spec)`: the same for the same content, whatever the key order."""
    return hashlib.sha256(canonical(spec).encode("utf-8")).hexdigest()


def has_results(folder: str | Path) -> bool:
    """True when `folder` holds a result: a `*.json` at any depth other than preregistration.json, not hidden."""
    root = Path(folder)
    if not root.is_dir():
        return False
    for path in root.rglob("*.json"):
        relative = path.relative_to(root)
        if relative != Path(FILENAME) and not any(part.startswith(".") for part in relative.parts):
            return True
    return False


def _read(path: Path) -> dict:
    """The registration in `path`; UserError (one line) when it is unreadable or its hash does not fit its spec."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("spec"), dict) or "sha256" not in saved:
        raise UserError(f"{path} is not a pre-registration (needs a 'spec' dict and a 'sha256')")
    if fingerprint(saved["spec"]) != saved["sha256"]:
        raise UserError(f"{path} was edited: its spec no longer hashes to its sha256 {saved['sha256']}")
    return saved


def _changed_keys(old: dict, new: dict) -> str:
    """The top-level keys whose values differ between two specs, for the messages."""
    before, after = json.loads(canonical(old)), json.loads(canonical(new))  # as registered: JSON types, str keys
    keys = before.keys() | after.keys()
    changed = sorted(k for k in keys if k not in before or k not in after or before[k] != after[k])
    return ", ".join(changed) or "number types (1 and 1.0 hash differently)"


def register(folder: str | Path, spec: dict) -> str:
    """Register `spec` in `folder` (see the module docstring for the four cases); returns its sha256."""
    path, digest = Path(folder) / FILENAME, fingerprint(spec)
    if path.exists():
        saved = _read(path)
        if saved["sha256"] == digest:
            return digest
        if has_results(folder):
            raise UserError(
                f"refused: {path} registered sha256 {saved['sha256']}, this spec hashes to {digest} "
                f"(changed: {_changed_keys(saved['spec'], spec)}) and {folder} already holds results; "
                "restore the registered spec or use a new output folder"
            )
    record: dict[str, Any] = {
        "spec": json.loads(canonical(spec)),
        "sha256": digest,
        "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(path, record)
    return digest


def check(folder: str | Path, spec: dict) -> dict:
    """For the report: {"sha256": registered hash or None, "current": the spec's hash, "matches": bool,
    "registered_at": ISO time or None, "problem": None or one line (not registered, unreadable, changed)}."""
    path, current = Path(folder) / FILENAME, fingerprint(spec)
    found: dict[str, Any] = {"sha256": None, "current": current, "matches": False, "registered_at": None}
    if not path.exists():
        return {**found, "problem": f"not pre-registered: no {FILENAME} in {folder}"}
    try:
        saved = _read(path)
    except UserError as error:
        return {**found, "problem": str(error)}
    found.update(sha256=saved["sha256"], registered_at=saved.get("registered_at"), matches=saved["sha256"] == current)
    problem = None
    if not found["matches"]:
        changed = _changed_keys(saved["spec"], spec)
        problem = (
            f"the spec changed since its registration: sha256 {saved['sha256'][:12]} -> {current[:12]} ({changed})"
        )
    return {**found, "problem": problem}
