"""Attacks for evaluating robust aggregation (simulation only).

* data poisoning: label flip, scaling backdoor (trigger + boosted delta);
* local model poisoning: sign flip, Gaussian noise, free rider;
* omniscient model poisoning on the collected deltas: ALIE, IPM, min-max, min-sum.

Select one in the federation file's ``[attack]`` section (:class:`AttackSettings`).
"""

from trustfed.attacks.data_poisoning import apply_trigger, backdoor, backdoor_success, flip_labels
from trustfed.attacks.model_poisoning import (
    LOCAL,
    OMNISCIENT_FNS,
    AttackError,
    alie,
    alie_z,
    boost,
    free_ride,
    gaussian_noise,
    ipm,
    min_max,
    min_sum,
    sign_flip,
)
from trustfed.attacks.settings import OMNISCIENT, AttackKind, AttackSettings
from trustfed.attacks.trainers import MaliciousTrainer

__all__ = [
    "LOCAL",
    "OMNISCIENT",
    "OMNISCIENT_FNS",
    "AttackError",
    "AttackKind",
    "AttackSettings",
    "MaliciousTrainer",
    "alie",
    "alie_z",
    "apply_trigger",
    "backdoor",
    "backdoor_success",
    "boost",
    "flip_labels",
    "free_ride",
    "gaussian_noise",
    "ipm",
    "min_max",
    "min_sum",
    "sign_flip",
]
