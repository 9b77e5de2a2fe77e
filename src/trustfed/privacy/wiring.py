"""Build private trainers and strategies from the ``[privacy]`` settings (used by trustfed.simulation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from trustfed.core.codec import ParamSpec
from trustfed.core.strategy import FedAvg, Strategy
from trustfed.data.datasets import Dataset
from trustfed.models.trainer import LocalTrainer, Trainer
from trustfed.models.training import TrainConfig
from trustfed.privacy.budget_state import BudgetStateFile
from trustfed.privacy.central import DPFedAvg
from trustfed.privacy.dpsgd import CentralBudgetTrainer, DPSGDTrainer
from trustfed.privacy.report import PRIVACY_FILE, PrivacyRecorder
from trustfed.privacy.settings import PrivacySettings


def build_private_trainer(
    s: PrivacySettings,
    pid: str,
    factory: Callable[[], nn.Module],
    spec: ParamSpec,
    data: Dataset,
    config: TrainConfig,
    seed: int,
    *,
    budget_state_dir: Path | None = None,
) -> Trainer:
    """A DP-SGD trainer (``mode = "local"``) or a central-DP budget guard around a plain one.

    ``budget_state_dir``: where the participant keeps its spend (``<id>.privacy-budget.json``) so that
    a restarted process resumes it; None keeps it in memory only (the in-process simulation)."""
    budget, delta = s.budget_for(pid)
    state = BudgetStateFile.in_dir(budget_state_dir, pid) if budget_state_dir is not None else None
    if s.mode == "local":
        return DPSGDTrainer(
            pid,
            factory,
            spec,
            data,
            config,
            seed,
            noise_multiplier=s.noise_multiplier,
            max_grad_norm=s.max_grad_norm,
            delta=delta,
            budget_epsilon=budget,
            sample_rate=s.sample_rate,
            accountant=s.accountant,
            secure_noise=s.secure_noise,
            budget_state=state,
        )
    return CentralBudgetTrainer(
        LocalTrainer(pid, factory, spec, data, config, seed), budget, delta, s.accountant, budget_state=state
    )


def build_central_strategy(s: PrivacySettings, inner: FedAvg, seed: int) -> Strategy:
    return DPFedAvg(
        inner,
        noise_multiplier=s.noise_multiplier,
        clip_norm=s.max_grad_norm,
        delta=s.delta,
        clipping=s.clipping,
        target_quantile=s.target_quantile,
        clip_learning_rate=s.clip_learning_rate,
        clip_count_stddev=s.clip_count_stddev,
        sampling_amplification=s.sampling_amplification,
        accountant=s.accountant,
        seed=seed,
        secure_noise=s.secure_noise,
    )


def privacy_recorder(s: PrivacySettings, out_dir: Path | None, *, resume: bool = False) -> list[PrivacyRecorder]:
    """The observer that writes ``OUT/privacy.jsonl`` (none when privacy is off or there is no run folder;
    ``resume``: append to the file of the run being resumed)."""
    if s.mode == "none" or out_dir is None:
        return []
    return [PrivacyRecorder(out_dir / PRIVACY_FILE, s.mode, s.accountant, resume=resume)]
