"""Participant runtime: local trainers (and, with the transport, the pull-based client)."""

from trustfed.models.trainer import LocalTrainer, Trainer, round_seed

__all__ = ["LocalTrainer", "Trainer", "round_seed"]
