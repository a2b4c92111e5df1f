"""copra: CopRA (Cooperative LoRA), a progressive, randomly gated LoRA training strategy.

Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024). Each LoRA layer is switched on
per optimizer step with probability p(t) = min(4t/3T, 1); the adapters that come out merge, prune
and share credit (Shapley values) better than plain LoRA's. See docs/architecture.md for the map.
"""

from copra.errors import UserError
from copra.gates import CopRA
from copra.schedule import keep_probability

__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer callback pulls in transformers' Trainer machinery; import it only when asked.
    if name == "CopRACallback":
        from copra.callback import CopRACallback

        return CopRACallback
    raise AttributeError(f"module 'copra' has no attribute {name!r}")


__all__ = ["CopRA", "CopRACallback", "UserError", "keep_probability", "__version__"]
