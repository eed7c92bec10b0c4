"""`slimlm plan`: memory plans for inference and training (see docs/plan.md).

Only the exact byte arithmetic the engine shares is imported here, so importing it stays cheap:
`weight_bytes`, `kv_bytes_per_token`, `kv_block_bytes`. Plans: `slimlm.plan.serving.plan_inference`,
`slimlm.plan.training.plan_training`; inputs: `slimlm.plan.models.resolve_model`,
`slimlm.plan.devices.describe_device`.
"""

from slimlm.plan.inference import kv_block_bytes, kv_bytes_per_token, weight_bytes

__all__ = ["kv_block_bytes", "kv_bytes_per_token", "weight_bytes"]
