"""The federation app seam: the user's own model, data and training code (see :mod:`trustfed.app.api`)."""

from trustfed.app.api import App, AppContext, DataSpec, LocalData, TrainContext, TrainData

__all__ = ["App", "AppContext", "DataSpec", "LocalData", "TrainContext", "TrainData"]
