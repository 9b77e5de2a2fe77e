"""Pure federated-learning math: codec, aggregators, strategies. No I/O."""

from trustfed.core.aggregator import (
    AggregateResult,
    Aggregator,
    available_aggregators,
    get_aggregator,
    register_aggregator,
    weighted_mean,
)
from trustfed.core.codec import ParamSpec, TensorSpec, flatten, from_bytes, model_hash, to_bytes, unflatten
from trustfed.core.strategy import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedOpt,
    FedProx,
    FedYogi,
    RoundPlan,
    RoundResult,
    Strategy,
    Update,
)

__all__ = [
    "STRATEGIES",
    "AggregateResult",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "ParamSpec",
    "RoundPlan",
    "RoundResult",
    "Strategy",
    "TensorSpec",
    "Update",
    "available_aggregators",
    "flatten",
    "from_bytes",
    "get_aggregator",
    "model_hash",
    "register_aggregator",
    "to_bytes",
    "unflatten",
    "weighted_mean",
]
