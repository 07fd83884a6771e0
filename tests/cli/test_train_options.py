"""`srft train` makes its options from `TrainConfig`: every field is an option, with its flag,
and what the command line gives (over a config file) is what the trainer gets."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from app import cli
from app.training import config as train_config
from app.training.config import TrainConfig


def _options() -> dict[str, list[str]]:
    command = typer.main.get_command(cli.app)
    train = command.commands["train"]  # type: ignore[attr-defined]
    return {p.name: list(p.opts) + list(p.secondary_opts) for p in train.params}


def test_every_config_field_is_an_option_with_its_flag() -> None:
    options = _options()
    assert set(options) == {"config"} | {f.name for f in fields(TrainConfig)}
    assert options["packing"] == ["--packing", "--no-packing"]
    assert options["resume"] == ["--resume"]
    assert options["tokens_per_micro_batch"] == ["--tokens-per-micro-batch"]
    assert options["torch_compile"] == ["--compile", "--no-compile"]
    assert options["loss_implementation"] == ["--loss-implementation"]
    assert options["peak_tflops"] == ["--peak-tflops"]


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The configs `srft train` builds; the trainer itself is not run."""
    seen: list[TrainConfig] = []

    def fake_load(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
        settings = real_load(path, overrides)
        seen.append(settings)
        raise ValueError("stop before training")

    real_load = TrainConfig.load
    monkeypatch.setattr(train_config.TrainConfig, "load", staticmethod(fake_load))
    return seen


def test_command_line_values_override_the_file(loaded: list[TrainConfig], tmp_path: Path) -> None:
    file = tmp_path / "train.yaml"
    file.write_text("lr: 0.003\nweight_decay: 0.1\ndata: from-file\nmodel: m\noutput: o\n")
    result = CliRunner().invoke(
        cli.app,
        ["train", "--config", str(file), "--data", "d", "--no-packing", "--max-grad-norm", "0.5"],
    )
    assert result.exit_code == 2, result.output
    (settings,) = loaded
    assert settings.data == "d"  # the command line wins
    assert settings.lr == 0.003  # the file's, not the default
    assert settings.weight_decay == 0.1
    assert settings.packing is False
    assert settings.max_grad_norm == 0.5
    assert settings.seed == 0  # neither: the default


def test_required_fields_are_named_when_missing() -> None:
    result = CliRunner().invoke(cli.app, ["train", "--data", "d"])
    assert result.exit_code == 2
    assert "missing ['model', 'output']" in result.output


def test_an_unknown_loss_implementation_is_refused_naming_the_choices() -> None:
    result = CliRunner().invoke(
        cli.app,
        ["train", "--data", "d", "--model", "m", "--output", "o", "--loss-implementation", "fused"],
    )
    assert result.exit_code == 2
    assert "loss_implementation must be one of auto, chunked, liger, logits" in result.output
