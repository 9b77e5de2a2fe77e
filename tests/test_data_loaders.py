from __future__ import annotations

from pathlib import Path

import pytest

from trustfed import cli
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
