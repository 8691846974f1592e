"""Training: config and presets, the MTP + balance loss, AdamW, Orbax checkpoints, the loop."""

from mimo_jax.train.config import PRESETS, DataConfig, TrainConfig
from mimo_jax.train.loop import TrainResult, load_checkpoint, train

__all__ = ["PRESETS", "DataConfig", "TrainConfig", "TrainResult", "load_checkpoint", "train"]
