"""Distributed data-parallel training under torchrun: launching the workers, their provenance and its
anchoring on a ledger."""
