"""A vision federation app: each site trains one digit classifier on its own image folders.

Each site's ``[data] path`` holds ``train/`` and ``eval/`` in the ImageFolder layout: one sub-folder
per class (``0`` … ``9``) with that class's images (PNG, JPEG, …), resized to ``[app.config] size``.
"""

from __future__ import annotations

from torch import nn

from trustfed.app import App, AppContext, DataSpec, LocalData
from trustfed.data.loaders import load_image_folder

CLASSES = [str(d) for d in range(10)]  # every site maps folder "7" to class 7, even one without any 7s


def model(ctx: AppContext) -> nn.Module:
    width = int(ctx.config.get("channels", 16))
    side = int(ctx.config.get("size", 8))
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (side // 2) ** 2, len(CLASSES)),
    )


def data(spec: DataSpec, ctx: AppContext) -> LocalData:
    """This site's ``train/`` and ``eval/`` image folders."""
    folder = spec.require_path()
    side = int(ctx.config.get("size", 8))
    train = load_image_folder(folder / "train", size=(side, side), grayscale=True, classes=CLASSES)
    held_out = load_image_folder(folder / "eval", size=(side, side), grayscale=True, classes=CLASSES)
    return LocalData(train=train, eval=held_out, files=[folder / "train", folder / "eval"])


app = App(model=model, data=data)
