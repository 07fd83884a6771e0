"""Settings: one pydantic-settings class, every variable prefixed `SRFT_`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SRFT_", extra="ignore")

    # Embedded default: a SQLite file under the working directory and a broker that needs no
    # server, with the worker inside the API process. Production sets both to real servers.
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{Path('var') / 'srft.sqlite3'}",
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db",
    )
    broker_url: str = "memory://localhost/"
    max_upload_bytes: int = 64 * MiB
    # A key to create for project `default` on first start instead of a random one (for
    # deployments that provision secrets up front). Never stored in clear.
    bootstrap_api_key: str | None = None
    log_level: str = "INFO"

    @property
    def embedded_worker(self) -> bool:
        """True when work is queued in memory, so a worker must run inside this process."""
        return self.broker_url.startswith("memory://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
