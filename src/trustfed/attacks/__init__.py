"""Attacks for evaluating robust aggregation (simulation only), behind one open interface.

An attack subclasses :class:`Attack` (``craft`` the attackers' deltas from an :class:`AttackContext`;
optionally ``poison_data``, ``trains``, ``knowledge``) and registers by name with
:func:`register_attack`. The federation file's ``[attack]`` section (:class:`AttackSettings`) selects
one by ``kind``, from the user's ``module`` when it is not built in. Built in:

* data poisoning: label flip, scaling backdoor (trigger + boosted delta);
* local model poisoning: sign flip, Gaussian noise, free rider;
* omniscient model poisoning on the collected deltas: ALIE, IPM, min-max, min-sum, Fang's trimmed-mean attack;
* adaptive (:mod:`trustfed.attacks.adaptive_attacks`): Fang's Krum attack, mimic, the aggregator-tailored
  attack, and attacks at the edges of the default rule (clipping radius, rejection distance, copies cosine);
* backdoors within norm bounds (:mod:`trustfed.attacks.backdoors`): constrain-and-scale, DBA, Neurotoxin.
"""

from trustfed.attacks import adaptive_attacks as adaptive_attacks
from trustfed.attacks import backdoors as backdoors
from trustfed.attacks import builtin as builtin
from trustfed.attacks.api import Attack, AttackContext, AttackError, Knowledge, craft_checked
from trustfed.attacks.data_poisoning import apply_trigger, apply_trigger_part, backdoor, backdoor_success, flip_labels
from trustfed.attacks.model_poisoning import (
    LOCAL,
    OMNISCIENT_FNS,
    alie,
    alie_z,
    boost,
    fang_trimmed_mean,
    free_ride,
    gaussian_noise,
    ipm,
    min_max,
    min_sum,
    sign_flip,
)
from trustfed.attacks.registry import attack_class, available_attacks, build_attack, register_attack
from trustfed.attacks.settings import AttackKind, AttackSettings
from trustfed.attacks.trainers import CraftingTrainer, IdleTrainer, MaliciousTrainer

__all__ = [
    "LOCAL",
    "OMNISCIENT_FNS",
    "Attack",
    "AttackContext",
    "AttackError",
    "AttackKind",
    "AttackSettings",
    "CraftingTrainer",
    "IdleTrainer",
    "Knowledge",
    "MaliciousTrainer",
    "alie",
    "alie_z",
    "apply_trigger",
    "apply_trigger_part",
    "attack_class",
    "available_attacks",
    "backdoor",
    "backdoor_success",
    "boost",
    "build_attack",
    "craft_checked",
    "fang_trimmed_mean",
    "flip_labels",
    "free_ride",
    "gaussian_noise",
    "ipm",
    "min_max",
    "min_sum",
    "register_attack",
    "sign_flip",
]
