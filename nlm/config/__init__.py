"""Settings, their sources, path safety and secret redaction."""

from nlm.config.settings import DistillationConfig, LoRAConfig, TrainingConfig

__all__ = ["DistillationConfig", "LoRAConfig", "TrainingConfig"]
