"""Labeling end to end: the shared e2e fixtures."""

from tests.e2e import (  # noqa: F401
    api,
    e2e_database_url,
    e2e_redis,
    export_dir,
    rules_critic,
    workers,
)
