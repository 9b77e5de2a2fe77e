from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustfed import cli
from trustfed.data import (
    Dataset,
    train_test_split,
)
from trustfed.errors import DataError

CSV = "f1,f2,label\n1,2.5,cat\n3,4,dog\n5,6,cat\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- errors at the CLI
def test_data_errors_reach_the_cli_as_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_app() -> None:
        raise DataError("/d/[x].csv: needs pip install 'trustfed[data]'")

    monkeypatch.setattr(cli, "app", failing_app)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2 == DataError.exit_code
    err = " ".join(capsys.readouterr().err.split())
    assert "/d/[x].csv" in err and "'trustfed[data]'" in err and "Traceback" not in err


# ---------------------------------------------------------------- regression datasets
def test_regression_dataset_rules_and_split() -> None:
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(DataError, match="regression targets"):
        Dataset("r", x, np.zeros(10, np.int64), 0)
    with pytest.raises(DataError, match="regression targets"):
        Dataset("r", x, np.zeros((10, 1), np.float32), 0)
    with pytest.raises(DataError, match="num_classes"):
        Dataset("r", x, np.zeros(10, np.int64), -1)
    ds = Dataset("r", x, np.arange(10, dtype=np.float32), 0)
    train, test = train_test_split(ds, 0.3, seed=1)
    assert len(train) == 7 and len(test) == 3 and train.is_regression
    assert sorted(np.concatenate([train.y, test.y]).tolist()) == list(range(10))
    again, _ = train_test_split(ds, 0.3, seed=1)
    assert np.array_equal(again.y, train.y)
