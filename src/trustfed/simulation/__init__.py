"""Simulation: N virtual participants in one process or a pool of processes."""

from trustfed.simulation.runner import SimulationResult, run_simulation

__all__ = ["SimulationResult", "run_simulation"]
