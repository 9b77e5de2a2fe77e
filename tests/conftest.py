"""Shared test setup: one torch thread (the CI machine has 2 cores shared by test processes)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
