"""Commands that talk to a running service over HTTP, with `--url` and `--api-key`."""

from __future__ import annotations

import json
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

from app.cli import app, delete_app, gold_app
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


def _interval(score: dict[str, float]) -> str:
    return f"{score['value']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


def _print_comparison(result: dict[str, Any]) -> None:
    """The jobs side by side: a row per score, a column per job, each `value [low, high]`."""
    jobs = result["jobs"]
    left = result["left_out"]
    typer.echo(
        f"{result['compared']} steps compared (a human label and a done verdict of every job); "
        f"{left} human-labeled step{'' if left == 1 else 's'} left out (some job has no "
        f"verdict there); {result['bootstrap']['confidence']:.0%} intervals from "
        f"{result['bootstrap']['resamples']} bootstrap resamples"
    )
    rows: list[tuple[str, list[str]]] = [
        ("accuracy", [_interval(job["accuracy"]) for job in jobs]),
        ("macro F1", [_interval(job["macro_f1"]) for job in jobs]),
    ]
    for name in ("f1", "precision", "recall"):
        rows.append(
            (
                f"masked {name if name != 'f1' else 'F1'}",
                [_interval(job["masked_vs_trained"][name]) for job in jobs],
            )
        )
    labels = list(dict.fromkeys(s["label"] for job in jobs for s in job["per_label"]))
    for label in labels:
        cells, support = [], 0
        for job in jobs:
            found = [s for s in job["per_label"] if s["label"] == label]
            cells.append(_interval(found[0]["f1"]) if found else "-")
            support = max([support] + [s["support"] for s in found])
        rows.append((f"{label} F1 ({support} human)", cells))
    rows.append(
        (
            "tokens/step",
            [
                f"{job['cost']['prompt_tokens_per_step']:.0f} in / "
                f"{job['cost']['completion_tokens_per_step']:.0f} out"
                for job in jobs
            ],
        )
    )
    if any(job["cost"]["usd_per_step"] is not None for job in jobs):
        rows.append(("$/step", [f"{job['cost']['usd_per_step']:.6f}" for job in jobs]))
    width = max(len(name) for name, _ in rows)
    cell = max(len(c) for _, cells in rows for c in cells)
    masks = ", ".join(result["mask_labels"])
    typer.echo(
        f"{'score':<{width}}  "
        + "  ".join(f"{'job …' + job['job_id'][-8:]:<{cell}}" for job in jobs)
        + f"   (masked: {masks})"
    )
    for name, cells in rows:
        typer.echo(f"{name:<{width}}  " + "  ".join(f"{c:<{cell}}" for c in cells).rstrip())
    for pair in result["agreement"]:
        first, second = ("…" + job_id[-8:] for job_id in pair["job_ids"])
        typer.echo(
            f"{first} vs {second}: label kappa {pair['label_kappa']:.3f}, masked kappa "
            f"{pair['mask_kappa']:.3f}; difference in macro F1 "
            f"{_interval(pair['macro_f1_difference'])}, in masked F1 "
            f"{_interval(pair['mask_f1_difference'])}"
        )
    if len(jobs) == 1:
        confusion = jobs[0]["confusion"]
        names = confusion["labels"]
        size = max([6] + [len(label) for label in names])
        typer.echo("confusion (rows: human, columns: critic):")
        typer.echo(" " * (size + 2) + "".join(f"{label:>{size + 1}}" for label in names))
        for label, row in zip(names, confusion["matrix"], strict=True):
            typer.echo(f"{label:<{size}}  " + "".join(f"{n:>{size + 1}d}" for n in row))


@app.command()
def evaluate(
    job_ids: Annotated[
        list[str], typer.Argument(metavar="JOB...", help="The labeling jobs to compare (1-8).")
    ],
    mask_label: Annotated[
        list[str] | None,
        typer.Option("--mask-label", help="Label that masks a step (repeatable; default mistake)."),
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    price_prompt: Annotated[
        float | None, typer.Option(help="Dollars per million prompt tokens.")
    ] = None,
    price_completion: Annotated[
        float | None, typer.Option(help="Dollars per million completion tokens.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Score jobs' critics against the human labels, side by side on the same steps, with 95%
    bootstrap intervals, Cohen's kappa between them and their cost per step."""
    params: dict[str, Any] = {
        "job_id": job_ids,
        "mask_labels": mask_label or [],
        "resamples": str(resamples),
    }
    if price_prompt is not None:
        params["price_prompt_per_mtok"] = str(price_prompt)
    if price_completion is not None:
        params["price_completion_per_mtok"] = str(price_completion)
    with _client(url, api_key, timeout=300) as client:
        response = client.get("/v1/evaluations", params=params)
    if response.status_code != 200:
        typer.echo(f"could not evaluate: {_describe_error(response)}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(response.json(), indent=2))
        return
    _print_comparison(response.json())


@gold_app.command("export")
def gold_export(url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = "") -> None:
    """Write the project's human labels to stdout, one JSON line each (a gold-set file)."""
    with (
        _client(url, api_key, timeout=300) as client,
        client.stream("GET", "/v1/human-labels/export") as response,
    ):
        if response.status_code != 200:
            response.read()
            typer.echo(f"could not export: {_describe_error(response)}", err=True)
            raise typer.Exit(1)
        for chunk in response.iter_bytes():
            typer.echo(chunk, nl=False)


@gold_app.command("import")
def gold_import(
    path: Annotated[Path, typer.Argument(help="A gold-set file (JSON Lines).")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Store a gold-set file's labels on this project's steps (matched by content hash); all
    or nothing: a bad line stores none."""
    with _client(url, api_key, timeout=300) as client:
        response = client.post(
            "/v1/human-labels/import",
            content=path.read_bytes(),
            headers={"Content-Type": "application/x-ndjson"},
        )
    if response.status_code != 200:
        typer.echo(f"could not import {path}: {_describe_error(response)}", err=True)
        raise typer.Exit(1)
    counts = response.json()
    lines = counts["unmatched_lines"]
    typer.echo(
        f"{counts['imported']} imported, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged, {counts['unmatched']} unmatched"
        + (
            f" (trajectories not in this project; lines {', '.join(map(str, lines))}"
            + (", ..." if counts["unmatched"] > len(lines) else "")
            + ")"
            if lines
            else ""
        )
    )


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
