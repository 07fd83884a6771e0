"""The review UI: server-rendered pages over jobs, trajectories and steps, behind the API keys.

A page accepts `Authorization: Bearer <key>` or the `srft_ui_session` cookie that
`POST /ui/login` sets: the random token of a server-side session (never the key), HttpOnly,
SameSite=Strict, path /ui, expiring with the session; `POST /ui/logout` deletes the session.
Without a valid key or session every page is the key prompt, never data. Everything from a
trajectory is escaped by Jinja2's autoescape. The label endpoints here authenticate the same
way, so the page's script needs no key. Every state-changing request from another origin is
refused (`refuse_cross_origin`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.critic.prompt import task_text
from app.deps import SessionDep, SettingsDep
from app.errors import InvalidCursorError, NotFoundError, SrftError, UnauthorizedError
from app.jobs import service as job_service
from app.models import Job
from app.recipe.masking import DEFAULT_MASK_LABELS, POLICIES, Policy, PolicyOptions, decide
from app.review import browser, evaluation, schemas
from app.review import service as review_service
from app.review.browser import UiCallerDep, require_ui_caller
from app.status import JOB_OPEN, LabelSource, TrainingOutcome
from app.trajectories import service as trajectory_service

REFRESH_S = 3
MAX_JOBS = 100
# Trajectories a job's page lists at a time (the next ones are a link away).
JOB_PAGE_TRAJECTORIES = 100
# The preview masks what an export masks by default (FastAPI copies a list default per request).
DEFAULT_MASK = list(DEFAULT_MASK_LABELS)
# No jobs named (FastAPI copies a list default per request).
NO_QUEUE: list[str] = []
# Items the review-queue page lists.
QUEUE_PAGE_ITEMS = 50
# Observations longer than this are collapsed; the full text stays in the page.
LONG_TEXT_CHARS = 1500
LONG_TEXT_LINES = 25
_PACKAGE = Path(__file__).resolve().parent.parent
STATIC_DIR = _PACKAGE / "static"
STATIC_FILES = {"review.js": "text/javascript", "review.css": "text/css"}
# Scripts and styles only from our own files: even a value that escaped escaping runs nothing.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # No URL leaves for another site; our own forms and fetches keep their Origin (under
    # no-referrer, browsers send `Origin: null`, which refuse_cross_origin refuses).
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_PACKAGE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


class BadRequestError(SrftError):
    status_code = 400
    code = "bad_request"


router = APIRouter(
    prefix="/ui",
    tags=["ui"],
    include_in_schema=False,
    dependencies=[Depends(browser.refuse_cross_origin)],
)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind the login form sends)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {name: values[0] for name, values in parse_qs(body).items() if values}


# ---------------------------------------------------------------------- rendering


def _page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=_HEADERS)


def _prompt(error: str | None = None, status_code: int = 401) -> HTMLResponse:
    return _page("login.html", status_code, error=error, signed_in=False)


def _error_page(error: SrftError) -> HTMLResponse:
    """A page naming the caller's mistake (a bad query, an id not found), never data."""
    return _page("not_found.html", error.status_code, message=error.message, signed_in=True)


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFoundError(f"{what} {raw} not found") from None


def is_long(text: str) -> bool:
    return len(text) > LONG_TEXT_CHARS or text.count("\n") > LONG_TEXT_LINES


@dataclass(frozen=True)
class Preview:
    """The export a page previews: a policy and its options, from the page's query."""

    policy: Policy
    options: PolicyOptions

    def context(self, session: Session, project_id: uuid.UUID) -> dict[str, Any]:
        """What the page's preview form shows."""
        return {
            "policy": self.policy,
            "policies": POLICIES,
            "mask": sorted(self.options.mask_labels),
            "labels": review_service.known_labels(session, project_id),
        }


def _preview_query(
    policy: str = "srft", mask: Annotated[list[str], Query()] = DEFAULT_MASK
) -> tuple[str, list[str]]:
    return policy, mask


PreviewQueryDep = Annotated[tuple[str, list[str]], Depends(_preview_query)]


def _preview(query: tuple[str, list[str]]) -> Preview:
    policy, mask = query
    if policy not in POLICIES:
        raise BadRequestError(
            f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}",
            location="query.policy",
        )
    names = {name.strip() for raw in mask for name in raw.split(",") if name.strip()}
    return Preview(cast(Policy, policy), PolicyOptions(mask_labels=frozenset(names)))


# ---------------------------------------------------------------------- sign-in


@router.get("/", response_class=HTMLResponse)
def prompt(caller: UiCallerDep) -> Response:
    """The key prompt; a signed-in reviewer goes on to the jobs."""
    if caller is not None:
        return RedirectResponse("/ui/jobs", status_code=status.HTTP_303_SEE_OTHER)
    return _prompt(status_code=200)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    form: Annotated[dict[str, str], Depends(_form)],
) -> Response:
    """Check the key and open a session; the cookie holds only the session's random token."""
    key = form.get("key", "").strip()
    if not key:
        return _prompt("enter an API key")
    try:
        api_key = auth_service.authenticate_key(session, f"Bearer {key}")
    except UnauthorizedError:
        return _prompt("invalid or revoked API key")
    previous = request.cookies.get(browser.COOKIE)
    if previous:
        auth_service.end_ui_session(session, previous)
    token = auth_service.start_ui_session(session, api_key, settings.ui_session_ttl_s)
    response = RedirectResponse("/ui/jobs", status_code=status.HTTP_303_SEE_OTHER)
    secure = browser.cookie_secure(request, settings)
    response.set_cookie(
        browser.COOKIE,
        token,
        max_age=settings.ui_session_ttl_s,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    response.delete_cookie(browser.LEGACY_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """End the session: its cookie no longer signs anyone in, even if replayed."""
    token = request.cookies.get(browser.COOKIE)
    if token:
        auth_service.end_ui_session(session, token)
    response = RedirectResponse("/ui/", status_code=status.HTTP_303_SEE_OTHER)
    secure = browser.cookie_secure(request, settings)
    response.delete_cookie(
        browser.COOKIE, path="/ui", httponly=True, samesite="strict", secure=secure
    )
    response.delete_cookie(browser.LEGACY_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    """The page's script and stylesheet."""
    if name not in STATIC_FILES:
        return Response(status_code=404)
    return FileResponse(
        STATIC_DIR / name,
        media_type=STATIC_FILES[name],
        headers={"X-Content-Type-Options": "nosniff"},
    )


# ---------------------------------------------------------------------- pages


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(session: SessionDep, caller: UiCallerDep) -> Response:
    """The project's jobs, newest first, with progress, labels and usage."""
    if caller is None:
        return _prompt()
    jobs, _ = job_service.list_jobs(session, caller.project_id, limit=MAX_JOBS, before=None)
    described = [job_service.describe(session, job) for job in jobs]
    refresh = any(job.status in JOB_OPEN for job in described)
    return _page(
        "jobs.html",
        jobs=described,
        refresh=REFRESH_S if refresh else None,
        caller=caller,
        signed_in=True,
        max_jobs=MAX_JOBS,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    job_id: str,
    session: SessionDep,
    caller: UiCallerDep,
    query: PreviewQueryDep,
    cursor: str | None = None,
) -> Response:
    """A job's summary and a page of its trajectories, with the steps each masks under the
    policy."""
    if caller is None:
        return _prompt()
    try:
        job = job_service.get_job(session, caller.project_id, _uuid(job_id, "job"))
        preview = _preview(query)
        listed_rows, next_cursor = review_service.job_trajectories(
            session, job.id, limit=JOB_PAGE_TRAJECTORIES, cursor=cursor
        )
    except (NotFoundError, BadRequestError, InvalidCursorError) as exc:
        return _error_page(exc)
    summary = job_service.describe(session, job)

    # What an export of this job would read: the preview is that export's decisions.
    step_labels = review_service.step_labels(
        session, {row.trajectory.id: row.trajectory.num_steps for row in listed_rows}, [job.id]
    )
    listed: list[dict[str, Any]] = []
    for row in listed_rows:
        trajectory = row.trajectory
        labels = step_labels[trajectory.id]
        decision = decide(preview.policy, trajectory.resolved, labels, preview.options)
        listed.append(
            {
                "id": trajectory.id,
                "task_id": trajectory.task_id,
                "resolved": trajectory.resolved,
                "steps": trajectory.num_steps,
                "trained": sum(1 for s in decision.steps if s.outcome == TrainingOutcome.TRAINED),
                "masked": sum(1 for s in decision.steps if s.outcome == TrainingOutcome.MASKED),
                "cut": sum(1 for s in decision.steps if s.outcome == TrainingOutcome.CUT),
                "human": sum(1 for label in labels if label.source == LabelSource.HUMAN),
                "kept": decision.kept,
                "drop_reason": decision.drop_reason,
            }
        )
    return _page(
        "job.html",
        job=summary,
        trajectories=listed,
        next_cursor=next_cursor,
        **preview.context(session, caller.project_id),
        refresh=REFRESH_S if summary.status in JOB_OPEN else None,
        signed_in=True,
    )


@router.get("/trajectories/{trajectory_id}", response_class=HTMLResponse)
def trajectory_page(
    trajectory_id: str,
    session: SessionDep,
    caller: UiCallerDep,
    query: PreviewQueryDep,
    job: str | None = None,
    queue: Annotated[list[str], Query()] = NO_QUEUE,
) -> Response:
    """Every step of a trajectory as a card: text, label, reason, and the export preview;
    opened from the review queue (`queue`: its jobs), a saved label goes on to the next item."""
    if caller is None:
        return _prompt()
    try:
        trajectory = trajectory_service.get_trajectory(
            session, caller.project_id, _uuid(trajectory_id, "trajectory")
        )
        job_row = (
            job_service.get_job(session, caller.project_id, _uuid(job, "job")) if job else None
        )
        preview = _preview(query)
        queue_jobs = [_uuid(raw, "job") for raw in queue]
    except (NotFoundError, BadRequestError) as exc:
        return _error_page(exc)

    job_id = job_row.id if job_row is not None else None
    steps = review_service.step_cards(session, trajectory, job_id)
    # The export of the chosen job, or of every job that labeled the run, oldest first.
    if job_id is not None:
        job_ids = [job_id]
    else:
        job_ids = review_service.labeling_jobs(session, trajectory.id)
    (labels,) = review_service.step_labels(session, {trajectory.id: len(steps)}, job_ids).values()
    decision = decide(preview.policy, trajectory.resolved, labels, preview.options)
    for card, label, decided in zip(steps, labels, decision.steps, strict=True):
        card.label, card.source = label.label, label.source
        card.outcome, card.weight = decided.outcome, decided.weight
    return _page(
        "trajectory.html",
        trajectory=trajectory,
        task=task_text(trajectory.messages),
        steps=steps,
        decision=decision,
        job_id=job_id,
        is_long=is_long,
        queue_next=f"/ui/review-queue/next?{_jobs_query(queue_jobs)}" if queue_jobs else None,
        **preview.context(session, caller.project_id),
        signed_in=True,
    )


# ---------------------------------------------------------------------- comparing critics


def _jobs_query(job_ids: list[uuid.UUID]) -> str:
    return urlencode([("job", str(job_id)) for job_id in job_ids])


def _compared(session: Session, project_id: uuid.UUID, job: list[str]) -> list[Job]:
    return review_service.compared_jobs(session, project_id, [_uuid(raw, "job") for raw in job])


@router.get("/evaluate", response_class=HTMLResponse)
def evaluate_page(
    session: SessionDep,
    caller: UiCallerDep,
    job: Annotated[list[str], Query()] = NO_QUEUE,
    mask: Annotated[list[str], Query()] = DEFAULT_MASK,
    resamples: Annotated[int, Query(ge=1, le=evaluation.MAX_RESAMPLES)] = (
        evaluation.DEFAULT_RESAMPLES
    ),
) -> Response:
    """Jobs' critics side by side on the same human-labeled steps, with 95% intervals."""
    if caller is None:
        return _prompt()
    try:
        jobs = _compared(session, caller.project_id, job)
        masked = review_service.mask_labels_of(session, caller.project_id, jobs, mask)
    except SrftError as exc:
        return _error_page(exc)
    result = review_service.comparison(
        session, caller.project_id, jobs, masked, resamples=resamples
    )
    labels = list(
        dict.fromkeys(score["label"] for found in result["jobs"] for score in found["per_label"])
    )
    per_label = [
        (
            label,
            [
                next((s for s in found["per_label"] if s["label"] == label), None)
                for found in result["jobs"]
            ],
        )
        for label in labels
    ]
    return _page(
        "evaluate.html",
        result=result,
        per_label=per_label,
        jobs_query=_jobs_query([j.id for j in jobs]),
        labels=review_service.known_labels(session, caller.project_id),
        signed_in=True,
    )


@router.get("/review-queue", response_class=HTMLResponse)
def review_queue_page(
    session: SessionDep,
    caller: UiCallerDep,
    job: Annotated[list[str], Query()] = NO_QUEUE,
    cursor: str | None = None,
) -> Response:
    """The unlabeled steps worth labeling next for the jobs' comparison, best first."""
    if caller is None:
        return _prompt()
    try:
        jobs = _compared(session, caller.project_id, job)
        items, scanned, next_cursor = review_service.review_queue(
            session, jobs, limit=QUEUE_PAGE_ITEMS, cursor=cursor
        )
    except SrftError as exc:
        return _error_page(exc)
    query = _jobs_query([j.id for j in jobs])
    return _page(
        "review_queue.html",
        items=items,
        scanned=scanned,
        next_cursor=next_cursor,
        jobs=jobs,
        jobs_query=query,
        first_job=jobs[0].id,
        signed_in=True,
    )


@router.get("/review-queue/next")
def review_queue_next(
    session: SessionDep,
    caller: UiCallerDep,
    job: Annotated[list[str], Query()] = NO_QUEUE,
) -> Response:
    """The queue's best item now (the step just labeled has left it), opened at its step with
    the queue kept; the queue page when it is empty."""
    if caller is None:
        return _prompt()
    try:
        jobs = _compared(session, caller.project_id, job)
        items, _, _ = review_service.review_queue(session, jobs, limit=1, cursor=None)
    except SrftError as exc:
        return _error_page(exc)
    query = _jobs_query([j.id for j in jobs])
    if not items:
        return RedirectResponse(f"/ui/review-queue?{query}", status_code=status.HTTP_303_SEE_OTHER)
    item = items[0]
    target = (
        f"/ui/trajectories/{item.trajectory_id}?job={jobs[0].id}&"
        f"{urlencode([('queue', str(j.id)) for j in jobs])}#step-{item.step_index}"
    )
    return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)


# ---------------------------------------------------------------------- label endpoints


@router.post(
    "/trajectories/{trajectory_id}/steps/{step_index}/label",
    response_model=schemas.HumanLabelOut,
)
def post_label(
    trajectory_id: uuid.UUID,
    step_index: int,
    body: schemas.HumanLabelPut,
    session: SessionDep,
    caller: Annotated[auth_service.Caller, Depends(require_ui_caller)],
) -> schemas.HumanLabelOut:
    """Set a step's human label from the page (authenticated by the cookie)."""
    found = review_service.set_label(
        session, caller, trajectory_id, step_index, body.label, body.note
    )
    return schemas.HumanLabelOut.model_validate(found)


@router.delete(
    "/trajectories/{trajectory_id}/steps/{step_index}/label",
    status_code=status.HTTP_204_NO_CONTENT,
)
def delete_label(
    trajectory_id: uuid.UUID,
    step_index: int,
    session: SessionDep,
    caller: Annotated[auth_service.Caller, Depends(require_ui_caller)],
) -> Response:
    """Remove a step's human label from the page."""
    review_service.remove_label(session, caller.project_id, trajectory_id, step_index)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
