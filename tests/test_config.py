from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trustfed.cli import main
from trustfed.config import load_federation_config
from trustfed.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "trustfed" / "examples" / "federation.toml"


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["trustfed", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_example_config_is_valid() -> None:
    cfg = load_federation_config(EXAMPLE)
    assert cfg.federation.participants == 5 and cfg.data.dataset == "digits"


BAD = """
[federation]
rounds = "ten"
participants = 0
colour = "blue"

[data]
dataset = "mnist"
path = "no/such/folder"
test_fraction = 1.5

[strategy]
name = "fedmagic"
min_participants = 3
"""


def test_bad_config_lists_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_federation_config(f)
    fields = {p.field for p in info.value.problems}
    assert {
        "federation.rounds",
        "federation.participants",
        "federation.colour",
        "data.path",
        "data.test_fraction",
        "strategy.name",
    } <= fields
    text = str(info.value)
    assert str(f) in text and "unknown key" in text and "folder does not exist" in text


def test_config_check_cli_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(BAD)
    assert run_cli(monkeypatch, "config", "check", str(f)) == 2
    err = capsys.readouterr().err
    assert "federation.colour" in err and "Traceback" not in err
    assert run_cli(monkeypatch, "config", "check", str(EXAMPLE)) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[federation\nrounds = 1", "invalid TOML"),
        ("[strategy]\nmin_participants = 9\n[federation]\nparticipants = 3", "strategy.min_participants"),
        ("[strategy]\naggregator = 'nope'", "unknown aggregator"),
        (  # a built-in aggregator's parameters are checked when the file is, not when the run starts
            "[strategy]\naggregator = 'centered_clipping'\naggregator_params = { weight_cap = 1.0 }",
            r"strategy\.aggregator_params: centered_clipping: need weight_cap",
        ),
        ("[strategy]\naggregator = 'centered_clipping'\naggregator_params = { rejct = 3.0 }", "rejct"),
        ("[strategy]\naggregator = 'trimmed_mean'\naggregator_params = { beta = 0.7 }", "strategy.aggregator_params"),
        ("[data]\ndataset = 'cifar10'", "needs a folder"),
        ("[model]\nhidden = [0]", "hidden widths"),
    ],
)
def test_impossible_values(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_federation_config(f)


def test_missing_file_and_relative_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_federation_config(tmp_path / "absent.toml")
    (tmp_path / "mnist").mkdir()
    f = tmp_path / "c.toml"
    f.write_text('[data]\ndataset = "mnist"\npath = "mnist"\n')
    assert load_federation_config(f).data.path == tmp_path / "mnist"


def test_bad_cli_flag_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, "demo", "--rounds", "0") == 2
    assert "Traceback" not in capsys.readouterr().err


def test_config_dump_is_json_serialisable() -> None:
    json.dumps(load_federation_config(EXAMPLE).model_dump(mode="json"))


def test_the_examples_optional_sections_validate_when_uncommented(tmp_path: Path) -> None:
    """The commented ``[ledger]``, ``[incentives]``, ``[secagg]`` and ``[tracking]`` blocks of the example stay valid."""
    import re

    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Optional sections"))
    on = [re.sub(r"^# (?=\[|\w+ = )", "", line) for line in lines[start + 1 :]]
    assert sum(line.startswith("[") for line in on) == 4
    f = tmp_path / "all.toml"
    f.write_text("\n".join(lines[:start] + on) + "\n", encoding="utf-8")
    cfg = load_federation_config(f)
    assert cfg.ledger.enabled and cfg.incentives.enabled and cfg.secagg.enabled and cfg.secagg.weighted
    assert cfg.tracking.tensorboard and cfg.tracking.mlflow
