"""Factories predict machine faults together without sharing their sensor logs."""
