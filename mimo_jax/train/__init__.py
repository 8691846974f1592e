"""Training: config and presets, the MTP + balance loss, AdamW, Orbax checkpoints, the loop.

The loop (and with it the Grain data pipeline) is imported on first use, so the step, loss
and optimiser modules work on images without the training-only dependencies (grain).
"""

from typing import TYPE_CHECKING, Any

from mimo_jax.train.config import PRESETS, DataConfig, TrainConfig

if TYPE_CHECKING:
    from mimo_jax.train.loop import TrainResult, load_checkpoint, train

_FROM_LOOP = ("TrainResult", "load_checkpoint", "train")


def __getattr__(name: str) -> Any:
    if name in _FROM_LOOP:
        from mimo_jax.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'mimo_jax.train' has no attribute {name!r}")


__all__ = ["PRESETS", "DataConfig", "TrainConfig", "TrainResult", "load_checkpoint", "train"]
