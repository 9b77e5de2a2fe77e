"""Reference models and local train/eval loops."""

from trustfed.models.reference import MLP, MODELS, SmallCNN, build_model
from trustfed.models.training import EvalResult, TrainConfig, evaluate, train_epochs

__all__ = [
    "MLP",
    "MODELS",
    "EvalResult",
    "SmallCNN",
    "TrainConfig",
    "build_model",
    "evaluate",
    "train_epochs",
]
