"""Low-bit AdamW optimizers (8-bit, 4-bit, 4-bit factored): drop-in replacements for torch.optim.AdamW."""

from slimlm.optim.adamw import STATE_FORMAT_VERSION, LowBitAdamW
from slimlm.optim.memory import optimizer_state_bytes
from slimlm.optim.variants import AdamW4bit, AdamW8bit, AdamWFactor4bit

__all__ = [
    "STATE_FORMAT_VERSION",
    "AdamW4bit",
    "AdamW8bit",
    "AdamWFactor4bit",
    "LowBitAdamW",
    "optimizer_state_bytes",
]
