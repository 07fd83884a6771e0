"""Commands that run the service's processes or act on its database directly."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli import app, critic_app, db_app, keys_app

WORKER_POOLS = ("prefork", "threads", "solo")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    migrate: Annotated[bool, typer.Option(help="Apply database migrations first.")] = True,
    workers: Annotated[int, typer.Option(help="Server processes (each a full API).")] = 1,
    proxy_headers: Annotated[
        bool,
        typer.Option(
            help="Take the client address and scheme from X-Forwarded-For/-Proto, when sent "
            "by a trusted proxy (--forwarded-allow-ips)."
        ),
    ] = True,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated proxy addresses (or '*') whose X-Forwarded-* headers are "
            "trusted; default: $FORWARDED_ALLOW_IPS, else 127.0.0.1. Behind a TLS-terminating "
            "proxy, name it so the review UI sees https (Secure cookie, Origin check)."
        ),
    ] = None,
) -> None:
    """Run the API (and, on the embedded default, the worker inside it)."""
    import uvicorn

    from app.config import get_settings
    from app.db import upgrade_database
    from app.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    if migrate:
        upgrade_database(settings.database_url)
    if settings.embedded_worker:
        typer.echo("srft: embedded mode: worker runs inside this process (broker memory://)")
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        log_level="info",
    )


@app.command()
def worker(
    concurrency: Annotated[
        int, typer.Option(help="Tasks run at once: threads, or processes with --pool prefork.")
    ] = 8,
    pool: Annotated[
        str,
        typer.Option(
            help="Celery pool: prefork (a process per task), threads (one process, whose "
            "event loop and critic client serve all its tasks: many calls in flight on few "
            "cores) or solo."
        ),
    ] = "threads",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    queues: Annotated[
        str,
        typer.Option(
            help="Comma-separated queues to consume: `celery` (labeling and exports) and "
            "`srft.sweeps` (the sweeper's). Every deployment needs a worker on each; with long "
            "labeling tasks, give sweeps a worker of their own (--queues srft.sweeps "
            "--concurrency 1) so they never wait for a free slot."
        ),
    ] = "celery,srft.sweeps",
) -> None:
    """Run a Celery worker against SRFT_BROKER_URL (Redis in production)."""
    from app.broker import celery_for
    from app.config import get_settings

    if get_settings().embedded_worker:
        typer.echo(
            "srft worker needs a shared broker: set SRFT_BROKER_URL=redis://... "
            "(the embedded default runs its worker inside `srft serve`)",
            err=True,
        )
        raise typer.Exit(2)
    if pool not in WORKER_POOLS:
        typer.echo(f"--pool must be one of: {', '.join(WORKER_POOLS)}", err=True)
        raise typer.Exit(2)
    celery_for(get_settings().broker_url).worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            f"--queues={queues}",
            "--without-gossip",
        ]
    )


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Run Celery beat: the periodic jobs (sweepers) of a Redis deployment. Run exactly one."""
    from app.broker import celery_for
    from app.config import get_settings

    if get_settings().embedded_worker:
        typer.echo("srft beat needs SRFT_BROKER_URL=redis://...", err=True)
        raise typer.Exit(2)
    celery_for(get_settings().broker_url).start(["beat", f"--loglevel={loglevel}"])


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from app.config import get_settings
    from app.db import upgrade_database

    upgrade_database(get_settings().database_url, revision)
    typer.echo(f"database at {revision}")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A label for the key, e.g. who uses it.")],
    project: Annotated[str, typer.Option(help="Project (created if missing).")] = "default",
) -> None:
    """Create an API key; the key itself is the last line printed, and is shown only once."""
    from app.auth import service as auth_service
    from app.config import get_settings
    from app.db import Database, upgrade_database

    settings = get_settings()
    upgrade_database(settings.database_url)
    database = Database(settings.database_url)
    try:
        with database.transaction() as session:
            new_key = auth_service.create_key(session, name, project_name=project)
    finally:
        database.dispose()
    typer.echo(f"created key {name!r} for project {new_key.project_name!r}; store it now:")
    typer.echo(new_key.key)


@critic_app.command("serve-rules")
def critic_serve_rules(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    latency_ms: Annotated[int, typer.Option(help="Added latency per answer.")] = 0,
    faults: Annotated[
        str | None, typer.Option(help="A fault plan as JSON (see POST /admin/faults).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SRFT_RULES_API_KEY", help="Require this key.")
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Emulate a serving stack (repeatable): reasoning_content, reasoning, "
            "think_tags, think_open, no_response_format, json_schema, max_completion_tokens, "
            "context_vllm, context_sglang, context_openai."
        ),
    ] = None,
    context_tokens: Annotated[
        int | None, typer.Option(help="The context of the context_* variants.")
    ] = None,
    batch_delay_s: Annotated[
        float, typer.Option(help="Seconds before a batch (POST /v1/batches) completes.")
    ] = 0.0,
) -> None:
    """Serve the built-in rules critic (heuristics, not an LLM) as an OpenAI-compatible API."""
    from app.critic.rules_server import serve_rules

    serve_rules(
        host=host,
        port=port,
        latency_ms=latency_ms,
        faults_json=faults,
        api_key=api_key,
        variants=variant or (),
        context_tokens=context_tokens,
        batch_delay_s=batch_delay_s,
    )
