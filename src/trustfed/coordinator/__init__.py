"""Coordinator runtime: the round loop over a Transport."""

from trustfed.coordinator.engine import Coordinator, History
from trustfed.core.rounds import RoundObserver, RoundRecord, Transport

__all__ = ["Coordinator", "History", "RoundObserver", "RoundRecord", "Transport"]
