"""Differential privacy with enforced, auditable budgets.

- :mod:`trustfed.privacy.settings`: the ``[privacy]`` section of the federation file.
- :mod:`trustfed.privacy.accounting`: epsilon of composed subsampled Gaussian mechanisms
  (Google dp-accounting RDP/PLD, Opacus PRV).
- :mod:`trustfed.privacy.per_sample`: fast per-example clipped gradient sums.
- :mod:`trustfed.privacy.dpsgd`: the DP-SGD participant trainer and the central-DP budget guard.
- :mod:`trustfed.privacy.budget`: per-participant budgets; :class:`BudgetExhausted`.
- :mod:`trustfed.privacy.budget_state`: a participant's spend in its own JSON state file (resumed on restart).
- :mod:`trustfed.privacy.central`: DP-FedAvg (fixed / adaptive clipping) as a Strategy wrapper.
- :mod:`trustfed.privacy.report`: ``privacy.jsonl`` recorder, re-derivation and plot.
- :mod:`trustfed.privacy.inversion`: a gradient-inversion attack (DLG/iDLG) to test the protection.

This package's ``__init__`` imports nothing, so ``trustfed.config`` can load the settings model cheaply.
"""
