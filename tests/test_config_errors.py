"""A federation file with type errors and rule errors gets every problem in one report, exit 2, the
section names readable in the terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustfed.cli import main


def test_type_and_rule_problems_come_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = tmp_path / "federation.toml"
    fed.write_text(
        """
[federation]
participants = 3
[training]
lr = "fast"
[strategy]
min_participants = 5
aggregator = "nope"
[privacy]
mode = "local"
noise_multiplier = 1.0
max_grad_norm = 1.0
[privacy.budgets.p009]
epsilon = 3.0
[incentives]
enabled = true
""",
        encoding="utf-8",
    )
    monkeypatch.setattr("sys.argv", ["trustfed", "config", "check", str(fed)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training.lr" in err  # the type error
    assert "strategy.min_participants" in err and "strategy.aggregator" in err  # rules, in the same report
    assert "privacy.budgets" in err
    assert "needs [ledger] enabled = true" in err  # a section name printed as text, not eaten as markup
