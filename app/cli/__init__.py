"""The `srft` command line. Server-side commands (serve, worker, beat, db, keys, the rules
critic) are `app.cli.server`; commands that talk to a running service over HTTP (label,
export, exports, pull, evaluate, gold, delete) are `app.cli.client`, and `srft ingest` (streaming,
batching, resuming) is `app.cli.ingest`; `srft train` is `app.cli.train`."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    help="srft: critic labeling for Step Rejection Fine-Tuning.", no_args_is_help=True
)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
critic_app = typer.Typer(help="The critic endpoint.", no_args_is_help=True)
delete_app = typer.Typer(
    help="Delete an export (and its files), a job or a trajectory.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(critic_app, name="critic")
app.add_typer(db_app, name="db")
gold_app = typer.Typer(
    help="Gold sets: the project's human labels as a JSON Lines file.", no_args_is_help=True
)
app.add_typer(delete_app, name="delete")
app.add_typer(gold_app, name="gold")

# The commands register themselves on the apps above, in the order `srft --help` lists them.
# isort: off
from app.cli import server, client, ingest, train  # noqa: E402
# isort: on

__all__ = ["app", "client", "ingest", "main", "server", "train"]


def main() -> None:
    # Typer's rich tracebacks dump locals (which could include keys); keep them plain.
    os.environ.setdefault("_TYPER_STANDARD_TRACEBACK", "1")
    app(prog_name="srft")
    sys.exit(0)
