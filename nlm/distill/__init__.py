"""Distillation: the divergences, the combined loss, and the teachers that supply target distributions."""

from nlm.distill.loss import LossParts, distillation_loss

__all__ = ["LossParts", "distillation_loss"]
