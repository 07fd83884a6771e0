"""The `srft` command line: run the service, manage keys, upload trajectories."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from app.exports import formats as export_formats

app = typer.Typer(
    help="srft: critic labeling for Step Rejection Fine-Tuning.", no_args_is_help=True
)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
critic_app = typer.Typer(help="The critic endpoint.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(critic_app, name="critic")
app.add_typer(db_app, name="db")

UPLOAD_SUFFIXES = (".json", ".jsonl", ".traj", ".ndjson")
DEFAULT_URL = "http://127.0.0.1:8000"
UrlOption = Annotated[str, typer.Option(envvar="SRFT_URL", help="Service URL.")]
ApiKeyOption = Annotated[str, typer.Option(envvar="SRFT_API_KEY", help="API key.")]
WORKER_POOLS = ("prefork", "threads", "solo")


def _formats_taking(test: Callable[[export_formats.ExportFormat], bool]) -> str:
    return export_formats.or_list([f.name for f in export_formats.FORMATS if test(f)])


# The export command's help names the registered formats and what each takes.
FORMAT_HELP = (
    export_formats.or_list(
        [f"{f.name} ({f.label})" if f.label else f.name for f in export_formats.FORMATS]
    )
    + "."
)
TOKENIZER_HELP = (
    "Hub id of the tokenizer, or its path under the server's SRFT_TOKENIZER_DIRS "
    f"({_formats_taking(lambda f: f.tokenizer is export_formats.TokenizerUse.RENDERS)}; "
    f"{_formats_taking(lambda f: f.tokenizer is export_formats.TokenizerUse.MEASURES)} with "
    "--max-seq-len: measures the rows)."
)
SOFT_HELP = f"Soft weights ({_formats_taking(lambda f: f.soft_weights)})."


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


def _require_key(api_key: str) -> None:
    if not api_key:
        typer.echo("no API key: pass --api-key or set SRFT_API_KEY", err=True)
        raise typer.Exit(2)


def _collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and p.name.endswith(UPLOAD_SUFFIXES)
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise typer.BadParameter(f"{path} does not exist", param_hint="PATH")
    return files


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders of trajectory files.")],
    fmt: Annotated[str, typer.Option("--format", help="Source format, or auto.")] = "auto",
    resolved: Annotated[
        bool | None, typer.Option("--resolved/--unresolved", help="Resolution of every run.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Upload trajectory files over HTTP, one request per file, with a progress bar."""
    import httpx
    from rich.progress import Progress

    _require_key(api_key)
    files = _collect(paths)
    if not files:
        typer.echo("no trajectory files found", err=True)
        raise typer.Exit(2)
    params: dict[str, str] = {"format": fmt}
    if resolved is not None:
        params["resolved"] = "true" if resolved else "false"
    created = duplicates = failed = 0
    with (
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=300
        ) as client,
        Progress(transient=False) as progress,
    ):
        task = progress.add_task("uploading", total=len(files))
        for file in files:
            content_type = (
                "application/x-ndjson"
                if file.suffix in (".jsonl", ".ndjson")
                else "application/json"
            )
            response = client.post(
                "/v1/trajectories",
                params=params,
                content=file.read_bytes(),
                headers={"Content-Type": content_type, "X-Filename": file.name},
            )
            if response.status_code == 201:
                body = response.json()
                created += body["created"]
                duplicates += body["duplicates"]
            else:
                failed += 1
                progress.console.print(f"[red]{file}[/red]: {_describe_error(response)}")
            progress.advance(task)
    typer.echo(
        f"{len(files)} files: {created} trajectories created, {duplicates} duplicates, "
        f"{failed} files failed"
    )
    if failed:
        raise typer.Exit(1)


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
) -> None:
    """Serve the built-in rules critic (heuristics, not an LLM) as an OpenAI-compatible API."""
    from app.critic.rules_server import serve_rules

    serve_rules(host=host, port=port, latency_ms=latency_ms, faults_json=faults, api_key=api_key)


@app.command()
def label(
    scope: Annotated[str, typer.Option(help="unresolved (default) or all.")] = "unresolved",
    mode: Annotated[
        str, typer.Option(help="trajectory (one call per run) or step.")
    ] = "trajectory",
    model: Annotated[str | None, typer.Option(help="Critic model; server default.")] = None,
    votes: Annotated[int, typer.Option(help="Ask k times, keep the majority.")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.0,
    trajectory_id: Annotated[
        list[str] | None, typer.Option("--trajectory-id", help="Label only these (repeatable).")
    ] = None,
    source_format: Annotated[str | None, typer.Option(help="Only this source format.")] = None,
    task_id: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    cache: Annotated[bool, typer.Option(help="Reuse identical earlier verdicts.")] = True,
    wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Start a labeling job (and with --wait, follow it to the end)."""
    import httpx

    _require_key(api_key)
    selection: dict[str, object] = {}
    if trajectory_id:
        selection["trajectory_ids"] = trajectory_id
    if source_format:
        selection["source_format"] = source_format
    if task_id:
        selection["task_id"] = task_id
    body = {
        "selection": selection,
        "critic": {"mode": mode, "model": model, "votes": votes, "temperature": temperature},
        "scope": scope,
        "cache": cache,
    }
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
    ) as client:
        response = client.post("/v1/jobs", json=body)
        if response.status_code != 202:
            typer.echo(f"could not start the job: {_describe_error(response)}", err=True)
            raise typer.Exit(1)
        job = response.json()
        typer.echo(
            f"job {job['id']}: {job['counts']['steps']['total']} steps "
            f"in {job['counts']['trajectories']['total']} trajectories"
        )
        if wait:
            job = _follow(client, job)
        _print_job(job)
    if wait and job["status"] != "completed":
        raise typer.Exit(1)


def _follow(client: object, job: dict[str, Any]) -> dict[str, Any]:
    import time

    import httpx
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    assert isinstance(client, httpx.Client)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("labeling", total=job["counts"]["steps"]["total"])
        while True:
            steps = job["counts"]["steps"]
            progress.update(task, completed=steps["done"] + steps["failed"])
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(1.0)
            response = client.get(f"/v1/jobs/{job['id']}")
            if response.status_code == 200:
                job = response.json()


def _print_job(job: dict[str, Any]) -> None:
    steps = job["counts"]["steps"]
    labels = ", ".join(f"{k} {v}" for k, v in sorted(job["labels"].items())) or "none yet"
    usage = job["usage"]
    typer.echo(
        f"status {job['status']}: steps done {steps['done']} (cached {steps['cached']}), "
        f"failed {steps['failed']}, pending {steps['pending']}; labels: {labels}; tokens: "
        f"{usage['prompt_tokens']} prompt ({usage['cached_tokens']} cached), "
        f"{usage['completion_tokens']} completion"
    )


@app.command("export")
def export_command(
    job: Annotated[
        list[str], typer.Option("--job", help="Labeling job id (repeatable; later ones win).")
    ],
    policy: Annotated[
        str, typer.Option(help="sft, rft, srft (default), srft_unresolved or prefix.")
    ] = "srft",
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help=FORMAT_HELP,
        ),
    ] = "openai_jsonl",
    tokenizer: Annotated[
        str | None,
        typer.Option(help=TOKENIZER_HELP),
    ] = None,
    max_seq_len: Annotated[
        int | None, typer.Option(help="Longest row, in tokens of --tokenizer.")
    ] = None,
    overflow: Annotated[
        str,
        typer.Option(
            help="Rows over --max-seq-len: truncate (openai_jsonl: at the last step that fits), "
            "drop, or split at step boundaries."
        ),
    ] = "truncate",
    mask_label: Annotated[
        list[str] | None, typer.Option("--mask-label", help="Label to mask (repeatable).")
    ] = None,
    critique_resolved: Annotated[
        bool, typer.Option(help="Apply verdicts to resolved runs too.")
    ] = False,
    unlabeled: Annotated[
        str, typer.Option(help="Steps with no verdict: mask, train, drop.")
    ] = "mask",
    soft: Annotated[bool, typer.Option(help=SOFT_HELP)] = False,
    min_trained_steps: Annotated[int, typer.Option(help="Drop runs training fewer.")] = 1,
    seed: Annotated[int, typer.Option(help="Row order seed.")] = 0,
    shard_max_rows: Annotated[int, typer.Option(help="Rows per shard at most.")] = 50_000,
    wait: Annotated[bool, typer.Option(help="Show progress until the export ends.")] = False,
    output: Annotated[
        Path | None, typer.Option(help="With --wait: download the finished export here.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Build training shards from finished labeling jobs (and with --wait, follow it)."""
    import httpx

    _require_key(api_key)
    options: dict[str, object] = {
        "critique_resolved": critique_resolved,
        "unlabeled": unlabeled,
        "soft": soft,
        "min_trained_steps": min_trained_steps,
    }
    if mask_label:
        options["mask_labels"] = mask_label
    body: dict[str, object] = {
        "job_ids": job,
        "policy": policy,
        "format": format,
        "options": options,
        "tokenizer": tokenizer,
        "max_seq_len": max_seq_len,
        "overflow": overflow,
        "seed": seed,
        "shard_max_rows": shard_max_rows,
    }
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
    ) as client:
        response = client.post("/v1/exports", json=body)
        if response.status_code != 202:
            typer.echo(f"could not start the export: {_describe_error(response)}", err=True)
            raise typer.Exit(1)
        export = response.json()
        typer.echo(f"export {export['id']}: {export['status']}")
        if wait or output is not None:
            export = _follow_export(client, export)
            _print_export(export)
            if export["status"] != "completed":
                raise typer.Exit(1)
            if output is not None:
                _pull(client, export["id"], output)


def _follow_export(client: object, export: dict[str, Any]) -> dict[str, Any]:
    import time

    import httpx
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    assert isinstance(client, httpx.Client)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} trajectories"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("exporting", total=None)
        while export["status"] not in ("completed", "failed"):
            time.sleep(0.5)
            response = client.get(f"/v1/exports/{export['id']}")
            if response.status_code == 200:
                export = response.json()
            done = export["progress"]
            progress.update(
                task,
                total=done["trajectories_total"] or None,
                completed=done["trajectories_done"],
            )
    return export


def _print_export(export: dict[str, Any]) -> None:
    if export["status"] == "failed":
        error = export["error"] or {}
        typer.echo(f"export failed ({error.get('code')}): {error.get('message')}", err=True)
        return
    counts = export["manifest"]["counts"]
    rows, steps = counts["rows"], counts["steps"]
    tokens = counts["tokens"]["total"]
    typer.echo(
        f"completed: {rows['written']} rows in {len(export['manifest']['shards'])} shards"
        + (f", {tokens} tokens ({counts['tokens']['trained']} trained)" if tokens else "")
        + f"; steps trained {steps['steps_trained']}, masked {steps['steps_masked']}"
        + (f"; rows dropped {rows['dropped']}" if rows["dropped"] else "")
    )


def _pull(client: object, export_id: str, directory: Path) -> None:
    import httpx
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    from app.exports.pull import PullError, pull_export

    assert isinstance(client, httpx.Client)
    with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn()) as progress:
        task = progress.add_task("downloading", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            result = pull_export(client, export_id, directory, progress=advance)
        except PullError as error:
            progress.stop()
            typer.echo(f"pull failed: {error}", err=True)
            raise typer.Exit(1) from error
    typer.echo(
        f"{result.files} files verified in {result.directory} "
        f"({result.bytes_downloaded} bytes downloaded, {result.resumed} resumed, "
        f"{result.skipped} already there)"
    )


@app.command()
def pull(
    export_id: Annotated[str, typer.Argument(help="The export to download.")],
    directory: Annotated[Path, typer.Argument(help="Folder to download into.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Download a completed export: resumes a broken download, verifies every sha256."""
    import httpx

    _require_key(api_key)
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=300
    ) as client:
        _pull(client, export_id, directory)


@app.command()
def train(
    data: Annotated[
        str | None, typer.Option(help="Export folder (as `srft pull` writes it) or manifest.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model: hub id or path.")] = None,
    output: Annotated[str | None, typer.Option(help="Checkpoints, metrics, final model.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML or JSON with any options.")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="For openai_jsonl exports; default: the model's.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="cosine, linear or constant.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    tokens_per_micro_batch: Annotated[int | None, typer.Option(help="Token budget.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longest row, in tokens.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    fsdp: Annotated[bool | None, typer.Option("--fsdp/--no-fsdp", help="Shard (FSDP2).")] = None,
    attn_implementation: Annotated[
        str | None, typer.Option(help="sdpa, eager, flash_attention_2 (packing on GPU)...")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Held-out share of rows.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Log every N steps.")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Continue from the latest checkpoint.")
    ] = None,
) -> None:
    """Fine-tune a causal LM on an export with step-masked loss (needs the `train` extra)."""
    from app.logs import configure_logging

    try:
        from app.training.config import TrainConfig
        from app.training.data import DataError
        from app.training.trainer import train as run_training
    except ImportError as error:
        typer.echo(f"srft train needs the train extra: pip install 'srft[train]' ({error})")
        raise typer.Exit(2) from error
    configure_logging("INFO")
    overrides = {
        "data": data,
        "model": model,
        "output": output,
        "tokenizer": tokenizer,
        "max_steps": max_steps,
        "epochs": epochs,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps,
        "tokens_per_micro_batch": tokens_per_micro_batch,
        "grad_accum": grad_accum,
        "max_seq_len": max_seq_len,
        "packing": packing,
        "bf16": bf16,
        "gradient_checkpointing": gradient_checkpointing,
        "fsdp": fsdp,
        "attn_implementation": attn_implementation,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "eval_every": eval_every,
        "save_every": save_every,
        "log_every": log_every,
        "resume": resume,
    }
    try:
        settings = TrainConfig.load(config, overrides)
        result = run_training(settings)
    except (ValueError, DataError) as error:
        typer.echo(f"srft train: {error}", err=True)
        raise typer.Exit(2) from error
    state = "stopped (SIGTERM; --resume continues)" if result.stopped_early else "done"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    typer.echo(
        f"{state} at step {result.steps}: loss {last}; trained-token fraction "
        f"{result.trained_token_fraction:.3f}; output in {result.output}"
    )


@app.command()
def evaluate(
    job_id: Annotated[str, typer.Argument(help="The labeling job to score.")],
    mask_label: Annotated[
        list[str] | None,
        typer.Option("--mask-label", help="Label that masks a step (repeatable; default mistake)."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Score a job's critic against the human labels: per label, masked vs trained, confusion."""
    import httpx

    _require_key(api_key)
    # Only the scores are printed: one disagreement is the smallest page.
    params: dict[str, str | list[str]] = {"limit": "1", "mask_labels": mask_label or []}
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
    ) as client:
        response = client.get(f"/v1/jobs/{job_id}/evaluation", params=params)
    if response.status_code != 200:
        typer.echo(f"could not evaluate the job: {_describe_error(response)}", err=True)
        raise typer.Exit(1)
    result = response.json()
    typer.echo(
        f"{result['compared']} steps with both a verdict and a human label; "
        f"accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}"
    )
    width = max([len("label")] + [len(s["label"]) for s in result["per_label"]])
    typer.echo(f"{'label':<{width}}  precision  recall     f1  support")
    for score in result["per_label"]:
        typer.echo(
            f"{score['label']:<{width}}  {score['precision']:9.3f}  {score['recall']:6.3f}  "
            f"{score['f1']:5.3f}  {score['support']:7d}"
        )
    masked = result["masked_vs_trained"]
    counts = masked["counts"]
    typer.echo(
        f"masked ({', '.join(masked['mask_labels'])}) vs trained: precision "
        f"{masked['precision']:.3f}, recall {masked['recall']:.3f}, F1 {masked['f1']:.3f} "
        f"(TP {counts['true_positive']}, FP {counts['false_positive']}, "
        f"FN {counts['false_negative']}, TN {counts['true_negative']})"
    )
    confusion = result["confusion"]
    labels = confusion["labels"]
    cell = max([6] + [len(label) for label in labels])
    typer.echo("confusion (rows: human, columns: critic):")
    typer.echo(" " * (width + 2) + "".join(f"{label:>{cell + 1}}" for label in labels))
    for label, row in zip(labels, confusion["matrix"], strict=True):
        typer.echo(f"{label:<{width}}  " + "".join(f"{n:>{cell + 1}d}" for n in row))


def _describe_error(response: object) -> str:
    import httpx

    assert isinstance(response, httpx.Response)
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"
    where = f" at {error['location']}" if error.get("location") else ""
    return f"HTTP {response.status_code} {error['code']}{where}: {error['message']}"


def main() -> None:
    # Typer's rich tracebacks dump locals (which could include keys); keep them plain.
    os.environ.setdefault("_TYPER_STANDARD_TRACEBACK", "1")
    app(prog_name="srft")
    sys.exit(0)


if __name__ == "__main__":
    main()
