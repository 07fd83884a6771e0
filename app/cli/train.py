"""`srft train`: one option per `TrainConfig` field, made from the field (its type, default
and help), so the command and the config file never disagree."""

from __future__ import annotations

import inspect
import types
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import typer

from app.cli import app
from app.training.config import TrainConfig


def _option_type(hint: Any) -> Any:
    """The field's type without None: every option may be absent (None: not given)."""
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
    return hint


def _parameters() -> list[inspect.Parameter]:
    hints = get_type_hints(TrainConfig)
    config = typer.Option(help="YAML or JSON with any of the options below.")
    parameters = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, config],
        )
    ]
    for field in fields(TrainConfig):
        declared = [field.metadata["flag"]] if field.metadata.get("flag") else []
        option = typer.Option(*declared, help=field.metadata["help"])
        parameters.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_option_type(hints[field.name]) | None, option],
            )
        )
    return parameters


def train(config: Path | None = None, **options: Any) -> None:
    """Fine-tune a causal LM on an export with step-masked loss (needs the `train` extra)."""
    from app.logs import configure_logging

    try:
        from app.training.data import DataError
        from app.training.trainer import train as run_training
    except ImportError as error:
        typer.echo(f"srft train needs the train extra: pip install 'srft[train]' ({error})")
        raise typer.Exit(2) from error
    configure_logging("INFO")
    try:
        settings = TrainConfig.load(config, options)
        result = run_training(settings)
    except (ValueError, DataError) as error:
        typer.echo(f"srft train: {error}", err=True)
        raise typer.Exit(2) from error
    ended = "stopped (SIGTERM; --resume continues) at" if result.stopped_early else "done at"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    typer.echo(
        f"{ended} step {result.steps}: loss {last}; trained-token fraction "
        f"{result.trained_token_fraction:.3f}; output in {result.output}"
    )


_signature = inspect.Signature(_parameters(), return_annotation=None)
train.__signature__ = _signature  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in _signature.parameters.values()}
app.command()(train)
