"""Fine-tuning: data formats, LoRA / QLoRA / full training, checkpoints, PEFT adapters, merging.

from slimlm.train import TrainConfig, train
result = train(TrainConfig(data=["chats.jsonl"], output_dir="runs/x", method="lora"))
"""

from slimlm.train.config import TrainConfig
from slimlm.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
