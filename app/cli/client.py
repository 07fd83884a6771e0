"""Commands that talk to a running service over HTTP, with `--url` and `--api-key`."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.cli import app, delete_app
from app.exports import formats as export_formats
from app.exports.pull import PullError, pull_export
from app.status import (
    EXPORT_FINISHED,
    JOB_FINISHED,
    VERDICT_FINISHED,
    ExportStatus,
    JobStatus,
    VerdictStatus,
)

DEFAULT_URL = "http://127.0.0.1:8000"
UrlOption = Annotated[str, typer.Option(envvar="SRFT_URL", help="Service URL.")]
ApiKeyOption = Annotated[str, typer.Option(envvar="SRFT_API_KEY", help="API key.")]


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


def _client(url: str, api_key: str, timeout: float) -> httpx.Client:
    """An HTTP client of the service at `url`, with the key (exits 2 without one)."""
    if not api_key:
        typer.echo("no API key: pass --api-key or set SRFT_API_KEY", err=True)
        raise typer.Exit(2)
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
    )


def _start(client: httpx.Client, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
    """POST `body` to start a job or an export (202); exits 1 with the error otherwise."""
    response = client.post(path, json=body)
    if response.status_code != 202:
        typer.echo(f"could not start the {what}: {_describe_error(response)}", err=True)
        raise typer.Exit(1)
    started: dict[str, Any] = response.json()
    return started


def _follow(
    client: httpx.Client,
    item: dict[str, Any],
    path: str,
    *,
    finished: Collection[str],
    what: str,
    progress_of: Callable[[dict[str, Any]], tuple[int | None, int]],
    interval_s: float,
) -> dict[str, Any]:
    """Poll `path` until the item's status is one of `finished`, showing its progress
    (`progress_of`: total, or None while unknown, and completed)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + what),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("following", total=None)
        while True:
            total, completed = progress_of(item)
            progress.update(task, total=total, completed=completed)
            if item["status"] in finished:
                return item
            time.sleep(interval_s)
            response = client.get(path)
            if response.status_code == 200:
                item = response.json()


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
    with _client(url, api_key, timeout=120) as client:
        job = _start(client, "/v1/jobs", body, "job")
        typer.echo(
            f"job {job['id']}: {job['counts']['steps']['total']} steps "
            f"in {job['counts']['trajectories']['total']} trajectories"
        )
        if wait:
            job = _follow(
                client,
                job,
                f"/v1/jobs/{job['id']}",
                finished=JOB_FINISHED,
                what="steps",
                progress_of=lambda job: (
                    job["counts"]["steps"]["total"],
                    sum(job["counts"]["steps"][s] for s in VERDICT_FINISHED),
                ),
                interval_s=1.0,
            )
        _print_job(job)
    if wait and job["status"] != JobStatus.COMPLETED:
        raise typer.Exit(1)


def _print_job(job: dict[str, Any]) -> None:
    steps = job["counts"]["steps"]
    labels = ", ".join(f"{k} {v}" for k, v in sorted(job["labels"].items())) or "none yet"
    usage = job["usage"]
    typer.echo(
        f"status {job['status']}: steps done {steps[VerdictStatus.DONE]} "
        f"(cached {steps['cached']}), failed {steps[VerdictStatus.FAILED]}, "
        f"pending {steps[VerdictStatus.PENDING]}; labels: {labels}; tokens: "
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
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "openai_jsonl",
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
    strict: Annotated[
        bool,
        typer.Option(
            help="Fail on a row whose task alone is longer than --max-seq-len (default: drop "
            "it, counted and named in the manifest)."
        ),
    ] = False,
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
        "format": fmt,
        "options": options,
        "tokenizer": tokenizer,
        "max_seq_len": max_seq_len,
        "overflow": overflow,
        "strict": strict,
        "seed": seed,
        "shard_max_rows": shard_max_rows,
    }
    with _client(url, api_key, timeout=120) as client:
        export = _start(client, "/v1/exports", body, "export")
        typer.echo(f"export {export['id']}: {export['status']}")
        if wait or output is not None:
            export = _follow(
                client,
                export,
                f"/v1/exports/{export['id']}",
                finished=EXPORT_FINISHED,
                what="trajectories",
                progress_of=lambda export: (
                    export["progress"]["trajectories_total"] or None,
                    export["progress"]["trajectories_done"],
                ),
                interval_s=0.5,
            )
            _print_export(export)
            if export["status"] != ExportStatus.COMPLETED:
                raise typer.Exit(1)
            if output is not None:
                _pull(client, export["id"], output)


def _print_export(export: dict[str, Any]) -> None:
    if export["status"] == ExportStatus.FAILED:
        error = export["error"] or {}
        typer.echo(f"export failed ({error.get('code')}): {error.get('message')}", err=True)
        return
    counts = export["manifest"]["counts"]
    rows, steps = counts["rows"], counts["steps"]
    tokens = counts["tokens"]["total"]
    typer.echo(
        f"completed: {rows['written']} rows in {len(export['manifest']['shards'])} shards"
        + f" ({human_bytes(export['size_bytes'])})"
        + (f", {tokens} tokens ({counts['tokens']['trained']} trained)" if tokens else "")
        + f"; steps trained {steps['steps_trained']}, masked {steps['steps_masked']}"
        + (f"; rows dropped {rows['dropped']}" if rows["dropped"] else "")
    )


def human_bytes(size: int) -> str:
    """`size` bytes in binary units, as `ls -h` shows them: 512 B, 3.4 KiB, 12.0 GiB."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@app.command("exports")
def list_exports(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 50,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List the project's exports, newest first: status, format, size on disk, creation."""
    shown: list[dict[str, Any]] = []
    cursor: str | None = None
    with _client(url, api_key, timeout=60) as client:
        while len(shown) < limit:
            params = {"limit": str(min(100, limit - len(shown)))}
            response = client.get(
                "/v1/exports", params=params | ({"cursor": cursor} if cursor else {})
            )
            if response.status_code != 200:
                typer.echo(f"could not list the exports: {_describe_error(response)}", err=True)
                raise typer.Exit(1)
            page = response.json()
            shown += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    for export in shown:
        size = export["size_bytes"]
        typer.echo(
            f"{export['id']}  {export['status']:<9}  {export['format']:<17}  "
            f"{human_bytes(size) if size is not None else '-':>10}  {export['created_at']}"
        )
    total = sum(export["size_bytes"] or 0 for export in shown)
    more = " (more: raise --limit)" if cursor else ""
    plural = "" if len(shown) == 1 else "s"
    typer.echo(f"{len(shown)} export{plural}{more}, {human_bytes(total)} of files")


def _delete(path: str, what: str, url: str, api_key: str) -> None:
    with _client(url, api_key, timeout=300) as client:
        response = client.delete(path)
    if response.status_code != 204:
        typer.echo(f"could not delete the {what}: {_describe_error(response)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"deleted {what} {path.rsplit('/', 1)[-1]}")


@delete_app.command("export")
def delete_export(
    export_id: Annotated[str, typer.Argument(help="The export to delete.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Delete a finished export and its files (refused while it is being built)."""
    _delete(f"/v1/exports/{export_id}", "export", url, api_key)


@delete_app.command("job")
def delete_job(
    job_id: Annotated[str, typer.Argument(help="The labeling job to delete.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Delete a finished job and its verdicts (finished exports of it keep their files)."""
    _delete(f"/v1/jobs/{job_id}", "job", url, api_key)


@delete_app.command("trajectory")
def delete_trajectory(
    trajectory_id: Annotated[str, typer.Argument(help="The trajectory to delete.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Delete a trajectory, its verdicts and human labels (refused while work needs it)."""
    _delete(f"/v1/trajectories/{trajectory_id}", "trajectory", url, api_key)


def _pull(client: httpx.Client, export_id: str, directory: Path) -> None:
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
    with _client(url, api_key, timeout=300) as client:
        _pull(client, export_id, directory)


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
    # Only the scores are printed: one disagreement is the smallest page.
    params: dict[str, str | list[str]] = {"limit": "1", "mask_labels": mask_label or []}
    with _client(url, api_key, timeout=120) as client:
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


def _describe_error(response: httpx.Response, *, one_row: bool = False) -> str:
    """The error of a response as one line. `one_row`: the body was one row of a file, whose
    place the caller names, so the `line 1` of the location is left out."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"
    location = error.get("location") or ""
    if one_row:
        location = re.sub(r"^line 1(?:: |, |$)", "", location)
    where = f" at {location}" if location else ""
    return f"HTTP {response.status_code} {error['code']}{where}: {error['message']}"
