"""Batch delivery: a job's requests through the OpenAI Batch API instead of one call at a time.

The pipeline, each step a task (`app.worker.tasks`) that the sweeper sends again when it is lost:

1. Submit (`submit`). The job's pending steps are claimed, a whole trajectory at a time, and
   their requests (the bodies the online path posts: `app.critic.client.request_body` with the
   Judge's prompts, one line per request per vote) are streamed into JSONL files within the
   provider's limits (`SRFT_BATCH_MAX_REQUESTS`, `SRFT_BATCH_MAX_BYTES`). Each file becomes a
   `job_batches` row, status `submitting`, written in the transaction that claims its steps under
   the row's claim token. Only then is the file uploaded and the batch created, with the row's
   id in the batch's `metadata`; the row gets the provider's ids in the next transaction. A
   submission cut short between the two is resumed from the row: the provider's batch list is
   searched for that metadata first, so a restart never creates the batch twice, and the file is
   written again from the steps claimed under the token if none is found.
2. Poll (`poll`): a task per live batch, queued again `SRFT_BATCH_POLL_S` later; the sweeper
   queues a poll for a batch not polled within the stale time (a worker or broker restart). A
   poll claims its turn (`polled_at`), so duplicate polls fade out instead of multiplying.
3. Collect, when the batch has ended: its output and error files are streamed to disk and read
   line by line; each request's votes are parsed and decided by the online path's own functions
   (`parse_*_answer`, `judge.decide`, usage split over a window's steps), and the outcomes are
   written by `workqueue.record_outcomes` under the batch's claim, marked `batch`. Requests that
   failed, did not parse or were never answered (an expired or failed batch) are claimed by a
   follow-up batch (round + 1, up to `SRFT_BATCH_MAX_ROUNDS`; in the last round each step is
   decided on the votes it has, or fails with the error), or, when the job says
   `online_fallback`, released to the online label tasks.
4. Cancel (`cancel`): a cancelled or deleted job's live batches are cancelled at the provider.

Claims: a batch's claim lives until the batch is collected; `workqueue.held_by_live_batch` keeps
the sweeper and the online claim rule off it however old it is.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import openai
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.critic.batch import BatchClient, RemoteBatch, read_lines
from app.critic.client import (
    RequestEncoder,
    parse_completion,
    refuses_response_format,
    request_body,
)
from app.critic.judge import (
    JudgeConfig,
    JudgeFailedError,
    StepOutcome,
    Usage,
    answer_tokens,
    decide,
    prompt_layout,
)
from app.critic.parse import CriticAnswerError, Judgment, parse_step_answer, parse_trajectory_answer
from app.critic.prompt import (
    CriticRequest,
    PromptTooLargeError,
    StepRequests,
    format_indices,
    parse_indices,
    trajectory_windows,
)
from app.db import Database
from app.jobs import queue as job_queue
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.labeling import Tokenizers, judge_config
from app.models import Job, JobBatch, Trajectory, Verdict, utcnow
from app.recipe.steps import split_steps
from app.status import (
    JOB_FINISHED,
    BatchStatus,
    Delivery,
    ErrorKind,
    JobMode,
    JobStatus,
    VerdictStatus,
)

log = logging.getLogger("srft.worker")

ID_CHUNK = 1000
# Trajectories whose messages are loaded at once while a file is written.
LOAD_CHUNK = 50


def is_batch(job: Job) -> bool:
    return bool(job.critic_options.get("delivery") == Delivery.BATCH)


# ---------------------------------------------------------------------- requests


def custom_id(job_id: uuid.UUID, trajectory_id: uuid.UUID, key: str, vote: int) -> str:
    """A request line's id: job, trajectory, which request (`t<targets>` for a trajectory
    window, `s<step>` for a step) and vote."""
    return f"{job_id.hex}:{trajectory_id.hex}:{key}:{vote}"


@dataclass(frozen=True)
class LineId:
    job_id: uuid.UUID
    trajectory_id: uuid.UUID
    key: str
    vote: int

    @property
    def targets(self) -> tuple[int, ...]:
        """The steps the request asked about (all of a window's, claimed or not)."""
        return parse_indices(self.key[1:])


def parse_custom_id(value: Any) -> LineId | None:
    if not isinstance(value, str):
        return None
    parts = value.split(":")
    if len(parts) != 4 or parts[2][:1] not in ("t", "s"):
        return None
    try:
        return LineId(uuid.UUID(parts[0]), uuid.UUID(parts[1]), parts[2], int(parts[3]))
    except ValueError:
        return None


def requests_for(
    mode: str, config: JudgeConfig, trajectory: Trajectory, wanted: set[int]
) -> Iterator[tuple[str, CriticRequest]]:
    """The Judge's requests for the `wanted` steps of one trajectory, keyed for `custom_id`:
    its trajectory windows (those with a wanted target) or one request per wanted step."""
    messages = trajectory.messages
    steps = split_steps(messages)
    if mode == JobMode.TRAJECTORY:
        for window in trajectory_windows(
            messages, steps, trajectory.resolved, **prompt_layout(config)
        ):
            if wanted.intersection(window.target_indices):
                yield f"t{format_indices(window.target_indices)}", window
    else:
        requests = StepRequests(messages, steps, trajectory.resolved, **prompt_layout(config))
        for index in sorted(wanted):
            yield f"s{index}", requests.request(index)


def request_lines(
    job: Job, config: JudgeConfig, trajectory_id: uuid.UUID, key: str, request: CriticRequest
) -> bytes:
    """The input-file lines of one request, one per vote, with the online path's body."""
    body = request_body(
        model=config.model,
        messages=request.messages,
        temperature=config.temperature,
        max_tokens=answer_tokens(request, config),
        response_format=request.response_format,
        options=config.endpoint,
    )
    encoded = RequestEncoder().encode(body)
    lines = []
    for vote in range(config.votes):
        head = json.dumps(
            {
                "custom_id": custom_id(job.id, trajectory_id, key, vote),
                "method": "POST",
                "url": "/v1/chat/completions",
            },
            separators=(",", ":"),
        )
        lines.append(head[:-1].encode() + b',"body":' + encoded + b"}\n")
    return b"".join(lines)


@dataclass
class _File:
    """An input file being written, and the verdict rows its requests cover."""

    path: Path
    handle: IO[bytes]
    requests: int = 0
    size: int = 0
    rows: list[int] = field(default_factory=list)


class _Files:
    """Input files written one after another, each within the provider's limits."""

    def __init__(self, workdir: Path, max_requests: int, max_bytes: int) -> None:
        self._workdir = workdir
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self.done: list[_File] = []
        self._current: _File | None = None

    def add(self, lines: bytes, requests: int, rows: list[int]) -> None:
        current = self._current
        if current is not None and (
            current.requests + requests > self._max_requests
            or current.size + len(lines) > self._max_bytes
        ):
            self.close()
            current = None
        if current is None:
            path = self._workdir / f"input-{len(self.done)}.jsonl"
            current = self._current = _File(path, path.open("wb"))
        current.handle.write(lines)
        current.requests += requests
        current.size += len(lines)
        current.rows += rows

    def close(self) -> list[_File]:
        if self._current is not None:
            self._current.handle.close()
            self.done.append(self._current)
            self._current = None
        return self.done


def _trajectories(session: Session, ids: Sequence[uuid.UUID]) -> Iterator[Trajectory]:
    for start in range(0, len(ids), LOAD_CHUNK):
        chunk = ids[start : start + LOAD_CHUNK]
        found = {
            t.id: t for t in session.scalars(select(Trajectory).where(Trajectory.id.in_(chunk)))
        }
        for trajectory_id in chunk:
            if trajectory_id in found:
                yield found[trajectory_id]


def _fail_steps(
    session: Session, job: Job, items: list[tuple[uuid.UUID, int, int]], error: str
) -> None:
    """Fail steps that cannot be asked at all (their prompt never fits): claimed under a
    token of their own and written failed, as the online path fails them."""
    token = str(uuid.uuid4())
    _claim(session, [row_id for _, _, row_id in items], token)
    outcomes = [
        (job.id, trajectory_id, token, _failure(step, error, ErrorKind.REJECTED))
        for trajectory_id, step, _ in items
    ]
    workqueue.record_outcomes(session, outcomes)


def _failure(index: int, error: str, kind: ErrorKind) -> StepOutcome:
    return StepOutcome(
        index, None, None, None, [], Usage(), error=error, error_kind=kind, delivery=Delivery.BATCH
    )


def _claim(session: Session, row_ids: Sequence[int], token: str) -> None:
    now = utcnow()
    for start in range(0, len(row_ids), ID_CHUNK):
        session.execute(
            update(Verdict)
            .where(Verdict.id.in_(row_ids[start : start + ID_CHUNK]))
            .values(status=VerdictStatus.RUNNING, claim_token=token, claimed_at=now)
            .execution_options(synchronize_session=False)
        )


def _write_requests(
    session: Session,
    job: Job,
    config: JudgeConfig,
    items: dict[uuid.UUID, dict[int, int]],
    files: _Files,
) -> None:
    """Write the requests of `items` (trajectory -> step -> verdict row id) into `files`; steps
    whose prompt cannot be built fail at once."""
    for trajectory in _trajectories(session, list(items)):
        rows = items[trajectory.id]
        try:
            for key, request in requests_for(job.mode, config, trajectory, set(rows)):
                covered = [rows[i] for i in request.target_indices if i in rows]
                lines = request_lines(job, config, trajectory.id, key, request)
                files.add(lines, config.votes, covered)
        except PromptTooLargeError as exc:
            _fail_steps(
                session, job, [(trajectory.id, step, row) for step, row in rows.items()], str(exc)
            )


# ---------------------------------------------------------------------- submit


@dataclass(frozen=True)
class _Claimed:
    batches: list[tuple[uuid.UUID, Path]]
    cursor: uuid.UUID | None
    more: bool


def _claim_next(
    session: Session,
    settings: Settings,
    job_id: uuid.UUID,
    cursor: uuid.UUID | None,
    workdir: Path,
    tokenizers: Tokenizers | None,
) -> _Claimed | None:
    """Claim the job's next pending steps (whole trajectories, after `cursor`) into new
    batches, their input files written under `workdir`; None when nothing is pending."""
    job = session.get(Job, job_id)
    if job is None or job.status in JOB_FINISHED:
        return None
    limit = settings.batch_max_requests
    query = (
        select(Verdict.id, Verdict.trajectory_id, Verdict.step_index)
        .where(Verdict.job_id == job_id, Verdict.status == VerdictStatus.PENDING)
        .order_by(Verdict.trajectory_id, Verdict.step_index)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if cursor is not None:
        query = query.where(Verdict.trajectory_id > cursor)
    rows = session.execute(query).all()
    if not rows:
        return None
    more = len(rows) == limit
    next_cursor = cursor  # a trajectory longer than the limit is read again, from its rest
    if more and rows[0].trajectory_id != rows[-1].trajectory_id:
        # Whole trajectories only: the last one may go on past the limit.
        last = rows[-1].trajectory_id
        rows = [row for row in rows if row.trajectory_id != last]
        next_cursor = rows[-1].trajectory_id
    items: dict[uuid.UUID, dict[int, int]] = defaultdict(dict)
    for row in rows:
        items[row.trajectory_id][row.step_index] = row.id
    config = judge_config(job, settings, tokenizers)
    files = _Files(workdir, settings.batch_max_requests, settings.batch_max_bytes)
    _write_requests(session, job, config, items, files)
    now = utcnow()
    made: list[tuple[uuid.UUID, Path]] = []
    for written in files.close():
        batch = JobBatch(
            job_id=job.id,
            round=1,
            status=BatchStatus.SUBMITTING,
            claim_token=str(uuid.uuid4()),
            requests_total=written.requests,
        )
        session.add(batch)
        session.flush()
        _claim(session, written.rows, batch.claim_token)
        made.append((batch.id, written.path))
    if made and job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
        job.started_at = now
    session.flush()
    return _Claimed(made, next_cursor, more)


def submit(
    database: Database,
    settings: Settings,
    client: BatchClient,
    job_id: uuid.UUID,
    tokenizers: Tokenizers | None = None,
) -> int:
    """Submit the job's batches cut short, then its pending steps as new batches; return how
    many batches were submitted. `tokenizers`: as the online path measures prompts, so both
    lay out the same requests."""
    with database.transaction() as session:
        waiting = list(
            session.scalars(
                select(JobBatch.id)
                .where(JobBatch.job_id == job_id, JobBatch.status == BatchStatus.SUBMITTING)
                .order_by(JobBatch.created_at)
            )
        )
    submitted = sum(
        _submit_one(database, settings, client, batch_id, None, tokenizers) for batch_id in waiting
    )
    cursor: uuid.UUID | None = None
    while True:
        with tempfile.TemporaryDirectory(prefix="srft-batch-") as folder:
            with database.transaction() as session:
                claimed = _claim_next(session, settings, job_id, cursor, Path(folder), tokenizers)
                workqueue.finish_if_done(session, job_id)
            if claimed is None:
                return submitted
            for batch_id, path in claimed.batches:
                submitted += _submit_one(database, settings, client, batch_id, path, tokenizers)
        if not claimed.more:
            return submitted
        cursor = claimed.cursor


def _rebuild(
    session: Session,
    settings: Settings,
    job: Job,
    batch: JobBatch,
    path: Path,
    tokenizers: Tokenizers | None,
) -> int:
    """The input file of a batch whose submission was cut short, written again from the steps
    claimed under its token; return its requests."""
    rows = session.execute(
        select(Verdict.id, Verdict.trajectory_id, Verdict.step_index).where(
            Verdict.job_id == job.id,
            Verdict.claim_token == batch.claim_token,
            Verdict.status == VerdictStatus.RUNNING,
        )
    ).all()
    items: dict[uuid.UUID, dict[int, int]] = defaultdict(dict)
    for row in rows:
        items[row.trajectory_id][row.step_index] = row.id
    # One file whatever the limits: these steps were one batch's.
    files = _Files(path.parent, 2**62, 2**62)
    config = judge_config(job, settings, tokenizers)
    if not batch.structured:
        config = replace(config, endpoint=replace(config.endpoint, structured_output=False))
    _write_requests(session, job, config, dict(items), files)
    written = files.close()
    if not written:
        return 0
    written[0].path.rename(path)
    return written[0].requests


def _submit_one(
    database: Database,
    settings: Settings,
    client: BatchClient,
    batch_id: uuid.UUID,
    path: Path | None,
    tokenizers: Tokenizers | None,
) -> int:
    """Upload and create one `submitting` batch (found at the provider instead if a cut-short
    submission made it: `path` is None then); 1 if this call submitted it."""
    with tempfile.TemporaryDirectory(prefix="srft-batch-") as folder:
        return _submit_locked(database, settings, client, batch_id, path, Path(folder), tokenizers)


def _submit_locked(
    database: Database,
    settings: Settings,
    client: BatchClient,
    batch_id: uuid.UUID,
    path: Path | None,
    folder: Path,
    tokenizers: Tokenizers | None,
) -> int:
    with database.transaction() as session:
        # Locked while at the provider: a second submitter of the same row skips it.
        batch = session.scalars(
            select(JobBatch)
            .where(JobBatch.id == batch_id, JobBatch.status == BatchStatus.SUBMITTING)
            .with_for_update(skip_locked=True)
        ).first()
        if batch is None:
            return 0
        job = session.get(Job, batch.job_id)
        if job is None:
            return 0
        remote = None if path is not None else client.find(str(batch.id), batch.created_at)
        if remote is None and job.status in JOB_FINISHED:
            _close(batch, BatchStatus.CANCELLED, "the job ended before the batch was submitted")
            return 0
        if remote is None:
            if path is None:
                path = folder / "input.jsonl"
                batch.requests_total = _rebuild(session, settings, job, batch, path, tokenizers)
                if not batch.requests_total:
                    _close(batch, BatchStatus.CANCELLED, "no request left to submit")
                    return 0
            file_id = client.upload(path, f"srft-{batch.id}.jsonl")
            remote = client.create(file_id, str(batch.id))
            log.info("job %s: batch %s submitted as %s", job.id, batch.id, remote.id)
        _apply(batch, remote)
        now = utcnow()
        batch.submitted_at = batch.polled_at = now
        status = session.scalar(select(Job.status).where(Job.id == job.id))
        if status in JOB_FINISHED:
            # Cancelled while we were at the provider.
            job_queue.enqueue_cancel_after_commit(session, settings.broker_url, job.id)
        else:
            job_queue.enqueue_poll_after_commit(
                session, settings.broker_url, batch.id, settings.batch_poll_s
            )
        session.flush()
        return 1


def _apply(batch: JobBatch, remote: RemoteBatch) -> None:
    batch.remote_id = remote.id
    batch.input_file_id = remote.input_file_id
    batch.status = remote.status
    batch.output_file_id = remote.output_file_id
    batch.error_file_id = remote.error_file_id
    batch.requests_total = remote.total or batch.requests_total
    batch.requests_completed = remote.completed
    batch.requests_failed = remote.failed
    batch.error = remote.errors


def _close(batch: JobBatch, status: BatchStatus, error: str | None = None) -> None:
    batch.status = status
    batch.collected_at = utcnow()
    batch.error = error or batch.error


# ---------------------------------------------------------------------- poll and collect


def poll(database: Database, settings: Settings, client: BatchClient, batch_id: uuid.UUID) -> None:
    """Poll one batch; collect it when it has ended, else poll again later."""
    now = utcnow()
    with database.transaction() as session:
        # This poll's turn: none if another poll of the batch ran within half the interval.
        remote_id = session.scalar(
            update(JobBatch)
            .where(
                JobBatch.id == batch_id,
                JobBatch.collected_at.is_(None),
                JobBatch.remote_id.is_not(None),
                or_(
                    JobBatch.polled_at.is_(None),
                    JobBatch.polled_at < now - timedelta(seconds=settings.batch_poll_s / 2),
                ),
            )
            .values(polled_at=now)
            .returning(JobBatch.remote_id)
            .execution_options(synchronize_session=False)
        )
    if remote_id is None:
        return
    try:
        remote = client.retrieve(remote_id)
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        # Polled again later; a batch at the provider is never lost by a failed poll.
        log.warning("could not poll batch %s (%s); polling again later", remote_id, exc)
        with database.transaction() as session:
            job_queue.enqueue_poll_after_commit(
                session, settings.broker_url, batch_id, settings.batch_poll_s
            )
        return
    with tempfile.TemporaryDirectory(prefix="srft-batch-") as folder:
        _poll_locked(database, settings, client, batch_id, remote, Path(folder))


def _poll_locked(
    database: Database,
    settings: Settings,
    client: BatchClient,
    batch_id: uuid.UUID,
    remote: RemoteBatch,
    folder: Path,
) -> None:
    with database.transaction() as session:
        batch = session.scalars(
            select(JobBatch)
            .where(JobBatch.id == batch_id, JobBatch.collected_at.is_(None))
            .with_for_update(skip_locked=True)
        ).first()
        if batch is None:
            return
        _apply(batch, remote)
        job = session.get(Job, batch.job_id)
        if job is None:
            return
        if not remote.ended:
            if job.status in JOB_FINISHED:
                job_queue.enqueue_cancel_after_commit(session, settings.broker_url, job.id)
            else:
                job_queue.enqueue_poll_after_commit(
                    session, settings.broker_url, batch.id, settings.batch_poll_s
                )
            return
        _collect(session, settings, client, job, batch, remote, folder)


@dataclass
class _Request:
    """The answered lines of one request: each vote's judgment (None: failed or unparseable)."""

    line: LineId
    judgments: dict[int, Any] = field(default_factory=dict)
    errors: list[JudgeFailedError] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


def _line_error(line: dict[str, Any]) -> tuple[str, ErrorKind]:
    error = line.get("error") if isinstance(line.get("error"), dict) else None
    response = line.get("response") if isinstance(line.get("response"), dict) else None
    status = response.get("status_code") if response else None
    if error is not None:
        code = str(error.get("code") or "error")
        kind = ErrorKind.TIMEOUT if code == "batch_expired" else ErrorKind.SERVER_ERROR
        return f"batch line {code}: {error.get('message') or ''}".strip(), kind
    body = response.get("body") if response else None
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or "")
    if isinstance(status, int) and status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif isinstance(status, int) and 400 <= status < 500:
        kind = ErrorKind.REJECTED
    else:
        kind = ErrorKind.SERVER_ERROR
    return f"{status} from critic (batch): {message}".strip(), kind


def _read_answers(
    client: BatchClient,
    remote: RemoteBatch,
    job: Job,
    config: JudgeConfig,
    workdir: Path,
) -> dict[tuple[uuid.UUID, str], _Request]:
    """Every line of the batch's output and error files, parsed, grouped by request."""
    requests: dict[tuple[uuid.UUID, str], _Request] = {}
    for number, file_id in enumerate((remote.output_file_id, remote.error_file_id)):
        if not file_id:
            continue
        path = workdir / f"answers-{number}.jsonl"
        client.download(file_id, path)
        for raw in read_lines(path):
            try:
                line = json.loads(raw)
            except ValueError:
                log.warning("batch %s: a line of file %s is not JSON", remote.id, file_id)
                continue
            found = parse_custom_id(line.get("custom_id")) if isinstance(line, dict) else None
            if found is None or found.job_id != job.id or not 0 <= found.vote < config.votes:
                continue
            request = requests.setdefault((found.trajectory_id, found.key), _Request(found))
            if found.vote in request.judgments:
                continue  # a duplicate line
            _read_line(request, found, line, job.mode, config)
    return requests


def _read_line(
    request: _Request, found: LineId, line: dict[str, Any], mode: str, config: JudgeConfig
) -> None:
    response = line.get("response") if isinstance(line.get("response"), dict) else None
    if line.get("error") is None and response is not None and response.get("status_code") == 200:
        completion = parse_completion(response.get("body"))
        usage = Usage(attempts=1)
        usage.add(completion)
        request.usage.merge(usage)
        try:
            judgment: Any
            if mode == JobMode.TRAJECTORY:
                judgment = parse_trajectory_answer(
                    completion.text, list(found.targets), config.labels
                )
            else:
                judgment = parse_step_answer(completion.text, found.targets[0], config.labels)
        except CriticAnswerError as exc:
            request.judgments[found.vote] = None
            request.errors.append(
                JudgeFailedError(f"unparseable answer: {exc}", ErrorKind.UNPARSEABLE, usage)
            )
            return
        request.judgments[found.vote] = judgment
        return
    message, kind = _line_error(line)
    request.judgments[found.vote] = None
    request.errors.append(JudgeFailedError(message, kind, Usage(attempts=1)))


def _step_judgments(mode: str, judgments: list[Any], index: int) -> list[Judgment | None]:
    if mode == JobMode.TRAJECTORY:
        return [j.get(index) if j is not None else None for j in judgments]
    return list(judgments)


def _unanswered(remote: RemoteBatch) -> tuple[str, ErrorKind]:
    if remote.status == BatchStatus.EXPIRED:
        return "the batch expired before this request was answered", ErrorKind.TIMEOUT
    if remote.status == BatchStatus.FAILED:
        return f"the batch failed: {remote.errors or 'no reason given'}", ErrorKind.REJECTED
    if remote.status == BatchStatus.CANCELLED:
        return "the batch was cancelled before this request was answered", ErrorKind.MISSING
    return "the batch gave no answer for this request", ErrorKind.MISSING


def _collect(
    session: Session,
    settings: Settings,
    client: BatchClient,
    job: Job,
    batch: JobBatch,
    remote: RemoteBatch,
    workdir: Path,
) -> None:
    """Record an ended batch's answers under its claim; hand what it did not answer to a
    follow-up batch (or online); close the batch."""
    if job.status in JOB_FINISHED:
        _close(batch, remote.status)
        return
    claimed = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(
            Verdict.job_id == job.id,
            Verdict.claim_token == batch.claim_token,
            Verdict.status == VerdictStatus.RUNNING,
        )
    ).all()
    open_steps: dict[uuid.UUID, set[int]] = defaultdict(set)
    for row in claimed:
        open_steps[row.trajectory_id].add(row.step_index)
    config = judge_config(job, settings)
    final = batch.round >= settings.batch_max_rounds
    answers = _read_answers(client, remote, job, config, workdir)
    outcomes: list[tuple[uuid.UUID, uuid.UUID, str, StepOutcome]] = []
    for (trajectory_id, _), request in sorted(answers.items(), key=lambda kv: kv[0][1]):
        steps = open_steps.get(trajectory_id, set())
        targets = request.line.targets
        wanted = [i for i in targets if i in steps]
        votes = [request.judgments.get(vote) for vote in range(config.votes)]
        complete = all(v is not None for v in votes)
        if not wanted or not (complete or final):
            continue
        for position, index in enumerate(wanted):
            outcome = decide(
                index,
                _step_judgments(job.mode, votes, index),
                request.usage,
                request.errors,
                position,
                len(targets),
            )
            outcome.delivery = Delivery.BATCH
            outcomes.append((job.id, trajectory_id, batch.claim_token, outcome))
            steps.discard(index)
    if final:
        error, kind = _unanswered(remote)
        for trajectory_id, steps in open_steps.items():
            for index in sorted(steps):
                outcomes.append(
                    (job.id, trajectory_id, batch.claim_token, _failure(index, error, kind))
                )
    for start in range(0, len(outcomes), ID_CHUNK):
        workqueue.record_outcomes(session, outcomes[start : start + ID_CHUNK])
    _close(batch, remote.status)
    # A provider that refuses the schema refuses every line for it: ask without it from now.
    refused_schema = any(
        error.kind == ErrorKind.REJECTED and refuses_response_format(str(error))
        for request in answers.values()
        for error in request.errors
    )
    _follow_up(session, settings, job, batch, structured=batch.structured and not refused_schema)
    session.flush()
    workqueue.finish_if_done(session, job.id)


def _follow_up(
    session: Session, settings: Settings, job: Job, batch: JobBatch, *, structured: bool
) -> None:
    """The steps still claimed by a collected batch (failed, unparseable, unanswered): to a
    follow-up batch (asking for a `response_format` only if `structured`), or online when the
    job allows it."""
    if job_service.critic_options(job).online_fallback:
        released = session.execute(
            update(Verdict)
            .where(
                Verdict.job_id == job.id,
                Verdict.claim_token == batch.claim_token,
                Verdict.status == VerdictStatus.RUNNING,
            )
            .values(
                status=VerdictStatus.PENDING,
                claim_token=None,
                claimed_at=None,
                enqueued_at=utcnow(),
            )
            .returning(Verdict.trajectory_id, Verdict.step_index)
            .execution_options(synchronize_session=False)
        ).all()
        if released:
            log.warning("job %s: %d steps of batch %s go online", job.id, len(released), batch.id)
            units = workqueue.units_of(
                job, [(r.trajectory_id, r.step_index) for r in released], settings.step_chunk_size
            )
            job_queue.enqueue_online_after_commit(session, settings.broker_url, units)
        return
    follow = JobBatch(
        job_id=job.id,
        round=batch.round + 1,
        status=BatchStatus.SUBMITTING,
        claim_token=str(uuid.uuid4()),
        structured=structured,
    )
    session.add(follow)
    session.flush()
    moved = session.execute(
        update(Verdict)
        .where(
            Verdict.job_id == job.id,
            Verdict.claim_token == batch.claim_token,
            Verdict.status == VerdictStatus.RUNNING,
        )
        .values(claim_token=follow.claim_token, claimed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    count = int(getattr(moved, "rowcount", 0) or 0)
    if count:
        log.warning(
            "job %s: %d steps of batch %s go to follow-up batch %s (round %d)",
            job.id,
            count,
            batch.id,
            follow.id,
            follow.round,
        )
        job_queue.enqueue_submit_after_commit(session, settings.broker_url, job.id)
    else:
        session.delete(follow)


# ---------------------------------------------------------------------- cancel and sweep


def cancel(
    database: Database, client: BatchClient, job_id: uuid.UUID, remote_ids: Sequence[str] = ()
) -> int:
    """Cancel a finished job's live batches at the provider (best effort: one that has ended
    meanwhile is left as it is), and `remote_ids`; return how many were cancelled."""
    cancelled = 0
    with database.transaction() as session:
        job = session.get(Job, job_id)
        if job is not None and job.status not in JOB_FINISHED:
            return 0
        live = list(
            session.scalars(
                select(JobBatch)
                .where(JobBatch.job_id == job_id, JobBatch.collected_at.is_(None))
                .with_for_update(skip_locked=True)
            )
        )
        targets = [b.remote_id for b in live if b.remote_id] + list(remote_ids)
        for batch in live:
            _close(batch, BatchStatus.CANCELLED)
        for remote_id in dict.fromkeys(targets):
            try:
                client.cancel(remote_id)
                cancelled += 1
            except openai.APIStatusError as exc:
                log.warning("could not cancel batch %s: %s", remote_id, exc.message)
    return cancelled


def live_remote_ids(session: Session, job_id: uuid.UUID) -> list[str]:
    """The provider ids of a job's live batches (read before the job is deleted)."""
    return [
        remote_id
        for remote_id in session.scalars(
            select(JobBatch.remote_id).where(
                JobBatch.job_id == job_id,
                JobBatch.collected_at.is_(None),
                JobBatch.remote_id.is_not(None),
            )
        )
        if remote_id
    ]


@dataclass(frozen=True)
class Lost:
    """What the sweeper hands on: batches to poll, jobs whose submission to resume, jobs whose
    batches to cancel."""

    polls: list[uuid.UUID]
    submits: list[uuid.UUID]
    cancels: list[uuid.UUID]


def sweep(session: Session, settings: Settings, stale_after_s: float) -> Lost:
    """Live batches not polled within `stale_after_s` (their poll chain was lost with a worker
    or the broker), batches still `submitting` after it, and live batches of jobs that have
    ended. Each is marked so that the next sweep leaves it for another timeout."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    ended = select(Job.id).where(Job.status.in_(JOB_FINISHED)).scalar_subquery()
    cancels = list(
        session.scalars(
            select(JobBatch.job_id)
            .where(
                JobBatch.collected_at.is_(None),
                JobBatch.job_id.in_(ended),
                JobBatch.updated_at < stale,
            )
            .distinct()
        )
    )
    if cancels:
        session.execute(
            update(JobBatch)
            .where(JobBatch.collected_at.is_(None), JobBatch.job_id.in_(cancels))
            .values(updated_at=now)
            .execution_options(synchronize_session=False)
        )
    polls = list(
        session.scalars(
            update(JobBatch)
            .where(
                JobBatch.collected_at.is_(None),
                JobBatch.remote_id.is_not(None),
                JobBatch.status != BatchStatus.SUBMITTING,
                or_(JobBatch.polled_at.is_(None), JobBatch.polled_at < stale),
            )
            # Old enough for the poll to take its turn, recent enough for the next sweep.
            .values(polled_at=now - timedelta(seconds=settings.batch_poll_s))
            .returning(JobBatch.id)
            .execution_options(synchronize_session=False)
        )
    )
    submits = list(
        dict.fromkeys(
            session.scalars(
                update(JobBatch)
                .where(JobBatch.status == BatchStatus.SUBMITTING, JobBatch.updated_at < stale)
                .values(updated_at=now)
                .returning(JobBatch.job_id)
                .execution_options(synchronize_session=False)
            )
        )
    )
    return Lost(polls, submits, cancels)


def requeue_after_commit(session: Session, settings: Settings, lost: Lost) -> None:
    for batch_id in lost.polls:
        job_queue.enqueue_poll_after_commit(session, settings.broker_url, batch_id, 0)
    for job_id in lost.submits:
        job_queue.enqueue_submit_after_commit(session, settings.broker_url, job_id)
    for job_id in lost.cancels:
        job_queue.enqueue_cancel_after_commit(session, settings.broker_url, job_id)
