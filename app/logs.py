"""Logging set-up for the service and the workers."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Migrations at start-up are routine; say so only when something goes wrong.
    logging.getLogger("alembic").setLevel(logging.WARNING)
