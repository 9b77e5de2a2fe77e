"""The ``[attack]`` section of a federation file: which attack, how many malicious participants.

Simulation only: the chosen share of participants turns malicious (chosen from ``seed``, the same in
every process). Default: no attack. ``kind`` names a registered attack (:mod:`trustfed.attacks.registry`):
a built-in one, or one that ``module`` registers, imported from ``path`` (default: the federation file's
folder) or the environment.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trustfed.attacks.api import Attack, AttackError
from trustfed.attacks.registry import attack_class, build_attack, import_attack_module
from trustfed.errors import ConfigProblem

#: Kept for callers that typed attack kinds: any registered name is a kind now.
AttackKind = str

_DOTTED = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class AttackSettings(BaseModel):
    """``kind`` of attack, ``fraction`` of participants that are malicious, attack ``params``, ``seed``;
    ``module`` (and ``path``) when the attack is the user's own; ``claim``: the example count every
    attacker claims (simulation: rules that weigh updates by their counts see it; default its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field("none", description="'none' or a registered attack's name")
    module: str | None = Field(None, pattern=_DOTTED, description="the user's module that registers the attack")
    path: Path | None = Field(None, description="folder to import module from (default: the federation file's)")
    fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of participants that are malicious")
    params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="chooses the malicious participants and the attack's randomness")
    claim: int | None = Field(
        None, ge=1, description="examples every attacker claims (default: its own count; rules weighing counts see it)"
    )

    def malicious(self, participant_ids: list[str]) -> list[str]:
        """The malicious participants: ``round(fraction * n)`` of them, a seeded sample."""
        if self.kind == "none":
            return []
        k = round(self.fraction * len(participant_ids))
        return sorted(random.Random(f"{self.seed}:malicious").sample(sorted(participant_ids), k))

    def build(self) -> Attack:
        """The attack this section selects (its module imported first); an :class:`AttackError` if none."""
        if self.module is not None:
            import_attack_module(self.module, self.path)
        if self.kind == "none":
            raise AttackError("attack kind 'none' builds no attack")
        return build_attack(self.kind, self.params)

    def problems(self) -> list[ConfigProblem]:
        """What is wrong with the section: a module that does not import, an unknown kind (listing the
        known ones), parameters the attack does not take or cannot use."""
        if self.module is not None:
            try:
                import_attack_module(self.module, self.path)
            except AttackError as exc:
                return [ConfigProblem("attack.module", str(exc), repr(self.module))]
        if self.kind == "none":
            return []
        try:
            attack_class(self.kind)
        except AttackError as exc:
            return [ConfigProblem("attack.kind", str(exc), repr(self.kind))]
        try:
            build_attack(self.kind, self.params)
        except AttackError as exc:
            return [ConfigProblem("attack.params", str(exc))]
        return []

    def record(self, participant_ids: list[str]) -> dict[str, Any]:
        """What metrics.json says about the attack that ran: its name, the class that implements it (module
        and name), its parameters and who was malicious; ``{"kind": "none", ...}`` when no attack ran."""
        if self.kind == "none":
            return {"kind": "none", "summary": "no attack"}
        attack = self.build()
        cls = type(attack)
        return {
            "kind": self.kind,
            "module": cls.__module__,
            "implementation": f"{cls.__module__}:{cls.__qualname__}",
            "knowledge": cls.knowledge,
            "params": dict(self.params),
            "fraction": self.fraction,
            "seed": self.seed,
            "claim": self.claim,
            "malicious": self.malicious(participant_ids),
        }
