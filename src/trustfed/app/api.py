"""The federation app: the user's own model, data and training code, run by trustfed.

A federation file names it with ``[app] target = "package.module:app"``; ``[app.config]`` holds
free-form values handed to every hook as :attr:`AppContext.config`, as Flower's run config.

```python
from trustfed.app import App, AppContext, DataSpec, LocalData

def model(ctx: AppContext) -> torch.nn.Module: ...
def data(spec: DataSpec, ctx: AppContext) -> LocalData: ...   # the participant's own [data]

app = App(model=model, data=data)        # optional: train=, evaluate=, server_evaluate=,
                                         # strategies={name: factory}, aggregators={name: factory}
```

The built-in datasets and models are apps on the same seam (:mod:`trustfed.apps`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from trustfed.data.datasets import Dataset as ArrayDataset
from trustfed.errors import DataError

#: What a data loader may hand back for training or evaluation: trustfed's in-memory arrays (the fast
#: path, and what DP-SGD and the simulated attacks need), any map-style torch Dataset yielding
#: ``(input, target)`` pairs, or a ready DataLoader (the app's own batching).
TrainData: TypeAlias = ArrayDataset | TorchDataset[Any] | DataLoader[Any]


@dataclass(frozen=True)
class AppContext:
    """What every hook receives: the federation's ``[app.config]``, its seed, and who is calling."""

    config: Mapping[str, Any]
    seed: int
    participant_id: str | None = None  # None on the coordinator


@dataclass(frozen=True)
class DataSpec:
    """A participant's own ``[data]`` section: ``path`` (resolved against its file) and every other key."""

    path: Path | None
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<data>"  # the file (or simulation entry) it came from, for error messages

    def require_path(self) -> Path:
        if self.path is None:
            raise DataError(f"{self.source}: [data] needs path = the folder or file with this participant's data")
        return self.path


@dataclass(frozen=True)
class LocalData:
    """A participant's data: what it trains on and, optionally, its held-out evaluation data.

    ``files``: the files this data came from, for the participant's data manifest (names, sizes and
    hashes, never the data); None: every file under ``DataSpec.path``."""

    train: TrainData
    eval: TrainData | None = None
    files: Sequence[Path] | None = None


@dataclass(frozen=True)
class TrainContext:
    """One round of local training: the round's settings after the coordinator's overrides."""

    round: int
    seed: int  # per (run, round, participant): the same in every process
    epochs: int
    batch_size: int
    lr: float
    participant_id: str
    app: AppContext


ModelFactory: TypeAlias = Callable[[AppContext], nn.Module]
DataLoaderFn: TypeAlias = Callable[[DataSpec, AppContext], LocalData]
TrainFn: TypeAlias = Callable[[nn.Module, TrainData, TrainContext], Mapping[str, float]]
EvaluateFn: TypeAlias = Callable[[nn.Module, TrainData, AppContext], Mapping[str, float]]
ServerEvaluateFn: TypeAlias = Callable[[nn.Module, AppContext], Mapping[str, float]]
ExchangeFn: TypeAlias = Callable[[nn.Module], Mapping[str, Any]]
ExampleLossFn: TypeAlias = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class App:
    """A federation app. ``model`` and ``data`` are required; the rest default to trustfed's own.

    - ``train(model, data, ctx)`` trains ``model`` in place for one round and returns its metrics;
      default: the built-in loop with ``[training]``'s loss, optimiser and metrics.
    - ``evaluate(model, data, ctx)`` scores the global model on a participant's held-out data; it may
      return ``num_examples`` (default: ``len(data)``); default: the built-in evaluation.
    - ``server_evaluate(model, ctx)`` scores it on data the coordinator holds (optional: a real
      coordinator usually holds none).
    - ``strategies`` / ``aggregators``: the app's own algorithms by name, selected by
      ``[strategy] name`` / ``aggregator`` as the built-in ones are.
    - ``exchange(model)``: the part of the model's state that travels and is aggregated (default:
      the whole state dict). A LoRA app returns its adapter tensors only; the rest of the model
      stays as every participant built it.
    - ``example_loss(model, batch)``: one loss per example of a batch of the app's training data
      (a tensor ``[B]``; the batch as torch's ``default_collate`` builds it from the dataset's items).
      With it, ``[privacy] mode = "local"`` trains the app with DP-SGD (Poisson-sampled batches, each
      example's gradient of the trainable parameters clipped, Gaussian noise, the budget enforced)
      in place of its ``train``; without it only array data on the built-in loop can.
    """

    model: ModelFactory
    data: DataLoaderFn
    train: TrainFn | None = None
    evaluate: EvaluateFn | None = None
    server_evaluate: ServerEvaluateFn | None = None
    strategies: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    aggregators: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    exchange: ExchangeFn | None = None
    example_loss: ExampleLossFn | None = None
