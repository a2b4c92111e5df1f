"""Importing Flower: lazily, quietly (no telemetry or update check), with a one-line error when it is missing.

`import copra` never needs flwr; the modules that do call `require_flwr()` first. Unless the caller set
FLWR_TELEMETRY_ENABLED / FLWR_DISABLE_UPDATE_CHECK, both are switched off before flwr is first imported.
"""

from __future__ import annotations

import os

from copra.utils.errors import UserError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no phoning home


def require_flwr() -> None:
    """Import flwr (telemetry and update check off unless set); UserError naming the extra if it is missing."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise UserError("the Flower integration needs flwr: pip install 'copra-lora[federated]'") from None
