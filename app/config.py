"""Settings: one pydantic-settings class, every variable prefixed `SRFT_`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
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
    # Request bodies: trajectory uploads may be large; every other body is a small JSON (or
    # form) control body. A body past its limit is refused with 413 before it is read further.
    max_upload_bytes: int = 64 * MiB
    max_body_bytes: int = 256 * 1024
    # A key to create for project `default` on first start instead of a random one (for
    # deployments that provision secrets up front). Never stored in clear.
    bootstrap_api_key: str | None = None
    log_level: str = "INFO"

    # The critic: any OpenAI-compatible endpoint. Without a base URL, the built-in rules critic
    # (heuristics, not an LLM) is started inside the worker process, with a warning.
    critic_base_url: str | None = None
    # A secret: never stored, echoed by the API or logged (SecretStr hides it in reprs).
    critic_api_key: SecretStr | None = None
    critic_model: str = "rules"
    critic_context_tokens: int = 128_000
    critic_max_concurrency: int = 16
    critic_rpm: int = 0  # requests per minute across all workers; 0 = no limit
    critic_tpm: int = 0  # prompt tokens per minute across all workers; 0 = no limit
    critic_timeout_s: float = 120.0
    critic_max_attempts: int = 6
    critic_backoff_base_s: float = 1.0
    critic_backoff_max_s: float = 60.0
    critic_max_answer_tokens: int = 8192
    # The critic model's tokenizer (a Hugging Face Hub id or a local folder), to measure
    # prompts with instead of the characters / 3.5 estimate; loaded once per worker process.
    # A job may name its own (`critic.tokenizer`, a Hub id or a folder under
    # SRFT_TOKENIZER_DIRS). Needs the `transformers` package; without it, or when the tokenizer
    # cannot be loaded, the worker logs it once and keeps the estimate.
    critic_tokenizer: str | None = None
    # Latency of the built-in rules critic when it is started automatically (for demos).
    rules_critic_latency_ms: int = 0

    # Batch delivery (`"critic": {"delivery": "batch"}`): the provider's limits per input
    # file (a job's requests are split over as many batches as they need), how often a live
    # batch is polled, and how many rounds of follow-up batches failed or expired requests get
    # before their steps fail.
    batch_max_requests: int = Field(default=50_000, ge=1)
    batch_max_bytes: int = Field(default=190_000_000, ge=1024)
    batch_poll_s: float = Field(default=60.0, gt=0)
    batch_max_rounds: int = Field(default=3, ge=1)

    # Step mode: how many steps of one trajectory one task judges (each step is its own call).
    # Large enough that a task keeps many calls in flight (bench/labeling.py: 50 steps per
    # task reached 90% of the endpoint's limit, 16 only 81%), small enough to spread a long
    # run over several workers.
    step_chunk_size: int = 50
    # A new job's verdict rows are written by a worker, this many trajectories per
    # transaction (about 25,000 rows at 50 steps a run): its first tasks start after the first
    # batch, and a request never waits for a million rows.
    job_prepare_batch: int = 500
    # The sweeper re-enqueues work claimed longer ago than this (a dead or stuck worker), and
    # pending work not picked up within it (a lost broker message).
    stale_after_s: float = 900.0
    sweep_interval_s: float = 30.0

    # Exports: files under this folder (published atomically from a `.building` folder on the
    # same filesystem). Tokenizing runs in this many processes (0: one per core).
    export_dir: Path = Path("var") / "exports"
    # Directories an export's `tokenizer` may name a local path under (separated by the OS path
    # separator, ':' on Linux). Empty: tokenizers are Hugging Face Hub ids only, never paths.
    tokenizer_dirs: str = ""
    export_processes: int = 0
    export_batch_size: int = 32
    # An export is built in parts of this many trajectories, each a task any worker may run
    # (app/exports/parts.py); an export no larger is one part, built in one task as before.
    # The part size never changes a byte of the export.
    export_part_trajectories: int = Field(default=2000, ge=1)

    # The review UI's sign-in: a server-side session (the cookie holds only its random id) that
    # expires after this long and that sign-out revokes. `cookie_secure`: mark the cookie
    # Secure; None = only when the request itself came over https. Behind a TLS-terminating
    # proxy run `srft serve --forwarded-allow-ips=<proxy ip>` so that the request's scheme is
    # the proxy's (the review pages' same-origin check needs it too), or set it to true.
    ui_session_ttl_s: int = 12 * 3600
    cookie_secure: bool | None = None

    @property
    def embedded_worker(self) -> bool:
        """True when work is queued in memory, so a worker must run inside this process."""
        return self.broker_url.startswith("memory://")

    @property
    def tokenizer_roots(self) -> list[Path]:
        """`tokenizer_dirs` as absolute paths, symlinks resolved."""
        return [
            Path(part).expanduser().resolve()
            for part in self.tokenizer_dirs.split(os.pathsep)
            if part.strip()
        ]


@lru_cache
def get_settings() -> Settings:
    return Settings()
