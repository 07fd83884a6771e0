"""The review UI over HTTP: the key prompt guards every page, pages show only the caller's
project, trajectory text is escaped, the export preview follows the policy, and the page's
label endpoints work with the cookie and only with it. The cookie holds a server-side session
(never the key) that expires, ends at sign-out or with its key; state-changing requests from
another origin are refused."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth.service import hash_key
from app.config import Settings
from app.models import ApiKey, HumanLabel, UiSession, utcnow
from app.review import ui
from app.review.browser import COOKIE
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record

PLANTED = "<script>alert(1)</script>"
# What a browser sends with a form or fetch of the page itself (TestClient's host: testserver).
SAME_ORIGIN = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
CROSS_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
# Another port of the same host: SameSite=Strict still sends the cookie there.
SAME_SITE = {"Origin": "http://testserver:8081", "Sec-Fetch-Site": "same-site"}


def _trajectory(steps: int = 3, *, salt: str = "") -> dict[str, Any]:
    item = make_trajectory(steps, resolved=False, salt=salt)
    item["messages"][3]["content"] = f"output {PLANTED} & more"  # step 0's observation
    return item


def _upload(client: TestClient, caller: Caller, body: dict[str, Any]) -> str:
    response = client.post("/v1/trajectories", json=body, headers=caller.headers)
    assert response.status_code == 201, response.text
    trajectory_id: str = response.json()["trajectories"][0]["id"]
    return trajectory_id


def _labeled_job(
    client: TestClient, session: Session, caller: Caller, trajectory_id: str, labels: list[str]
) -> str:
    """A job over one trajectory whose verdicts are written as the critic would."""
    job = client.post(
        "/v1/jobs", json={"selection": {"trajectory_ids": [trajectory_id]}}, headers=caller.headers
    )
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    prepare_job(session, job_id)
    outcomes = [
        outcome(
            step,
            label,
            reason=f"critic says {label} <b>bold</b>",
            votes=[label, "good"] if step == 0 else [label],
            agreement=1.0 if step else 0.5,
            prompt_tokens=7,
        )
        for step, label in enumerate(labels)
    ]
    record(session, job_id, {trajectory_id: outcomes})  # closes it once every step is done
    return job_id


def _signed_in(client: TestClient, caller: Caller) -> str:
    """Sign in through the form as the page does; the client keeps the cookie. The token."""
    client.cookies.clear()
    response = client.post(
        "/ui/login", data={"key": caller.key}, headers=SAME_ORIGIN, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    token: str = response.cookies[COOKIE]
    return token


def _sessions(session: Session, caller: Caller) -> list[UiSession]:
    return list(
        session.scalars(
            select(UiSession)
            .join(ApiKey, UiSession.api_key_id == ApiKey.id)
            .where(ApiKey.project_id == caller.project_id)
        )
    )


def _badges(html: str) -> list[str]:
    marker = 'data-testid="badge">'
    return [part.split("<", 1)[0] for part in html.split(marker)[1:]]


@pytest.fixture
def stored(client: TestClient, session: Session, caller: Caller) -> tuple[str, str]:
    trajectory_id = _upload(client, caller, _trajectory())
    job_id = _labeled_job(client, session, caller, trajectory_id, ["good", "good", "mistake"])
    return trajectory_id, job_id


def test_without_a_key_every_page_is_the_prompt(
    client: TestClient, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    for path in ("/ui/jobs", f"/ui/jobs/{job_id}", f"/ui/trajectories/{trajectory_id}"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert 'action="/ui/login"' in response.text
        assert trajectory_id not in response.text
        assert job_id not in response.text
    first = client.get("/ui/")
    assert first.status_code == 200
    assert 'name="key"' in first.text


def test_a_bad_key_shows_the_prompt_with_an_error(
    client: TestClient, stored: tuple[str, str]
) -> None:
    response = client.post("/ui/login", data={"key": "srft_not-a-key"}, follow_redirects=False)
    assert response.status_code == 401
    assert "invalid or revoked API key" in response.text
    assert COOKIE not in response.headers.get("set-cookie", "")
    client.cookies.set(COOKIE, "srft_not-a-key")
    forged = client.get("/ui/jobs")
    assert forged.status_code == 401
    assert stored[1] not in forged.text


def test_login_sets_an_httponly_strict_cookie_and_logout_clears_it(
    client: TestClient, caller: Caller, settings: Settings, stored: tuple[str, str]
) -> None:
    response = client.post("/ui/login", data={"key": caller.key}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/jobs"
    (cookie,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(COOKIE)]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    assert f"Max-Age={settings.ui_session_ttl_s}" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get a secure cookie
    jobs = client.get("/ui/jobs")
    assert jobs.status_code == 200
    assert stored[1] in jobs.text
    assert "script-src 'self'" in jobs.headers["content-security-policy"]
    # Not no-referrer: under it browsers send `Origin: null` with the page's own forms.
    assert jobs.headers["referrer-policy"] == "same-origin"
    out = client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303
    assert f'{COOKIE}=""' in out.headers["set-cookie"]


def test_a_bearer_header_works_like_the_cookie(
    client: TestClient, caller: Caller, stored: tuple[str, str]
) -> None:
    response = client.get("/ui/jobs", headers=caller.headers)
    assert response.status_code == 200
    assert stored[1] in response.text


def test_jobs_lists_only_the_callers_jobs_newest_first(
    client: TestClient,
    session: Session,
    caller: Caller,
    other_caller: Caller,
    stored: tuple[str, str],
) -> None:
    _, first_job = stored
    second = _upload(client, caller, _trajectory(2, salt="second"))
    second_job = _labeled_job(client, session, caller, second, ["good"])  # one step left open
    foreign = _upload(client, other_caller, _trajectory(2, salt="other"))
    foreign_job = _labeled_job(client, session, other_caller, foreign, ["mistake", "good"])

    _signed_in(client, caller)
    html = client.get("/ui/jobs").text
    assert first_job in html
    assert second_job in html
    assert foreign_job not in html
    assert html.index(second_job) < html.index(first_job)
    assert 'http-equiv="refresh"' in html  # the second job is still queued
    assert '<progress value="3" max="3">' in html
    assert '<progress value="1" max="2">' in html
    assert "mistake 1" in html  # the first job's histogram
    assert "21 in / 0 out" in html  # its token usage


def test_another_projects_job_and_trajectory_are_404_pages(
    client: TestClient, other_caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    _signed_in(client, other_caller)
    for path in (
        f"/ui/jobs/{job_id}",
        f"/ui/trajectories/{trajectory_id}",
        f"/ui/trajectories/{uuid.uuid4()}",
        "/ui/jobs/not-a-uuid",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "Not found" in response.text
        assert "output" not in response.text
        assert "critic says" not in response.text
    # Nor may the job of another project choose the verdicts shown on one's own trajectory.
    own = _upload(client, other_caller, _trajectory(2, salt="own"))
    assert client.get(f"/ui/trajectories/{own}?job={job_id}").status_code == 404


def test_the_job_page_lists_its_trajectories_with_masked_counts(
    client: TestClient, caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    _signed_in(client, caller)
    html = client.get(f"/ui/jobs/{job_id}").text
    assert f"/ui/trajectories/{trajectory_id}?job={job_id}&amp;policy=srft&amp;mask=mistake" in html
    assert '<td class="masked-count">1</td>' in html
    sft = client.get(f"/ui/jobs/{job_id}", params={"policy": "sft"}).text
    assert '<td class="masked-count">0</td>' in sft


def test_the_job_page_lists_a_large_job_a_page_at_a_time(
    client: TestClient, session: Session, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui, "JOB_PAGE_TRAJECTORIES", 2)
    ids = sorted(_upload(client, caller, _trajectory(2, salt=f"page-{n}")) for n in range(5))
    job = client.post("/v1/jobs", json={"selection": {}}, headers=caller.headers).json()
    prepare_job(session, job["id"])
    _signed_in(client, caller)
    listed: list[str] = []
    url: str | None = f"/ui/jobs/{job['id']}?policy=sft"
    while url is not None:
        html = client.get(url).text
        rows = re.findall(r'data-trajectory="([^"]+)"', html)
        assert len(rows) <= 2
        listed += rows
        found = re.search(r'class="next-page" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else None
        if url is not None:
            assert "policy=sft" in url  # the preview's choices travel with the pages
    assert listed == ids
    broken = client.get(f"/ui/jobs/{job['id']}", params={"cursor": "???"})
    assert broken.status_code == 422
    assert "invalid cursor" in broken.text


def test_trajectory_text_is_escaped(
    client: TestClient, caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    _signed_in(client, caller)
    response = client.get(f"/ui/trajectories/{trajectory_id}", params={"job": job_id})
    assert response.status_code == 200
    html = response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert "<script>alert(1)" not in html
    assert "critic says good &lt;b&gt;bold&lt;/b&gt;" in html
    assert "fix the bug" in html  # the task
    assert "bash(ls 1)" in html  # the tool call
    assert "agreement 50% (good, good)" in html


def test_the_preview_badge_follows_the_policy_and_the_human_label(
    client: TestClient, caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    _signed_in(client, caller)
    page = f"/ui/trajectories/{trajectory_id}"
    assert _badges(client.get(page, params={"job": job_id}).text) == [
        "trained",
        "trained",
        "masked",
    ]
    prefix = client.get(page, params={"job": job_id, "policy": "prefix"}).text
    assert _badges(prefix) == ["trained", "trained", "cut"]

    labeled = client.post(f"{page}/steps/0/label", json={"label": "mistake", "note": "<i>n</i>"})
    assert labeled.status_code == 200, labeled.text
    assert labeled.json()["author"] == "tests"
    srft = client.get(page, params={"job": job_id, "policy": "srft"}).text
    assert _badges(srft) == ["masked", "trained", "masked"]
    assert 'data-testid="human-label">mistake<' in srft
    assert "&lt;i&gt;n&lt;/i&gt;" in srft
    sft = client.get(page, params={"job": job_id, "policy": "sft"}).text
    assert _badges(sft) == ["trained", "trained", "trained"]
    # prefix ends the row before the first masked step: here nothing is left to train.
    prefix = client.get(page, params={"job": job_id, "policy": "prefix"}).text
    assert _badges(prefix) == ["cut", "cut", "cut"]
    assert "dropped from the export (too_few_trained_steps)" in prefix
    none_masked = client.get(page, params={"job": job_id, "mask": "unnecessary"}).text
    assert _badges(none_masked) == ["trained", "trained", "trained"]
    bad = client.get(page, params={"policy": "everything"})
    assert bad.status_code == 400
    assert "unknown policy" in bad.text


def test_label_endpoints_work_with_the_cookie_and_refuse_without_it(
    client: TestClient, caller: Caller, other_caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, _ = stored
    url = f"/ui/trajectories/{trajectory_id}/steps/1/label"
    assert client.post(url, json={"label": "mistake"}).status_code == 401
    assert client.delete(url).status_code == 401
    client.cookies.set(COOKIE, "srft_nope")
    forged = client.post(url, json={"label": "mistake"})
    assert forged.status_code == 401

    _signed_in(client, caller)
    assert client.post(url, json={"label": "recover", "note": None}).status_code == 200
    detail = client.get(f"/v1/trajectories/{trajectory_id}", headers=caller.headers).json()
    assert detail["steps"][1]["human_label"]["label"] == "recover"
    unknown = client.post(url, json={"label": "meh"})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_label"
    assert client.delete(url).status_code == 204
    detail = client.get(f"/v1/trajectories/{trajectory_id}", headers=caller.headers).json()
    assert detail["steps"][1]["human_label"] is None

    _signed_in(client, other_caller)
    assert client.post(url, json={"label": "good"}).status_code == 404
    assert client.delete(url).status_code == 404


# ---------------------------------------------------------------------- sessions and origins


@pytest.mark.parametrize(
    "headers",
    [
        CROSS_SITE,
        SAME_SITE,
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a data: page
        {"Origin": "https://testserver"},  # another scheme is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_cross_origin_login_is_refused_and_keeps_the_victims_session(
    client: TestClient,
    session: Session,
    caller: Caller,
    other_caller: Caller,
    stored: tuple[str, str],
    headers: dict[str, str],
) -> None:
    token = _signed_in(client, caller)
    # Another site's page submits a form with the attacker's key (login CSRF).
    forged = client.post(
        "/ui/login", data={"key": other_caller.key}, headers=headers, follow_redirects=False
    )
    assert forged.status_code == 403
    assert forged.json()["error"]["code"] == "forbidden"
    assert "set-cookie" not in forged.headers
    assert _sessions(session, other_caller) == []
    assert client.cookies[COOKIE] == token
    jobs = client.get("/ui/jobs")
    assert jobs.status_code == 200
    assert stored[1] in jobs.text  # still the victim's project


@pytest.mark.parametrize(
    "headers",
    [
        SAME_ORIGIN,
        {"Sec-Fetch-Site": "none"},  # typed or bookmarked, no page involved
        {"Origin": "http://testserver:80"},
        {},  # curl or a script: no browser, nothing to forge
    ],
)
def test_a_same_origin_login_works(
    client: TestClient,
    session: Session,
    caller: Caller,
    stored: tuple[str, str],
    headers: dict[str, str],
) -> None:
    response = client.post(
        "/ui/login", data={"key": caller.key}, headers=headers, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    (row,) = _sessions(session, caller)
    assert row.token_hash == hash_key(response.cookies[COOKIE])
    assert stored[1] in client.get("/ui/jobs").text


@pytest.mark.parametrize("headers", [CROSS_SITE, SAME_SITE])
def test_cross_origin_logout_and_label_changes_are_refused(
    client: TestClient,
    session: Session,
    caller: Caller,
    stored: tuple[str, str],
    headers: dict[str, str],
) -> None:
    trajectory_id, job_id = stored
    token = _signed_in(client, caller)
    url = f"/ui/trajectories/{trajectory_id}/steps/1/label"
    assert client.post(url, json={"label": "recover"}, headers=SAME_ORIGIN).status_code == 200

    out = client.post("/ui/logout", headers=headers, follow_redirects=False)
    assert out.status_code == 403
    assert out.json()["error"]["code"] == "forbidden"
    assert "set-cookie" not in out.headers
    assert [s.token_hash for s in _sessions(session, caller)] == [hash_key(token)]
    relabel = client.post(url, json={"label": "mistake"}, headers=headers)
    assert relabel.status_code == 403
    assert relabel.json()["error"]["code"] == "forbidden"
    assert client.delete(url, headers=headers).status_code == 403

    label = session.scalar(
        select(HumanLabel).where(HumanLabel.trajectory_id == uuid.UUID(trajectory_id))
    )
    assert label is not None
    assert (label.step_index, label.label) == (1, "recover")
    assert job_id in client.get("/ui/jobs").text  # still signed in


def test_the_cookie_holds_a_random_token_never_the_key(
    client: TestClient, session: Session, caller: Caller, settings: Settings
) -> None:
    settings.ui_session_ttl_s = 600
    first = _signed_in(client, caller)
    # Signing in again from the same browser ends the session its cookie held.
    again = client.post(
        "/ui/login", data={"key": caller.key}, headers=SAME_ORIGIN, follow_redirects=False
    )
    assert again.status_code == 303
    assert "Max-Age=600" in again.headers["set-cookie"]
    second = again.cookies[COOKIE]
    assert first != second  # random per sign-in, so no function of the key
    for token in (first, second):
        assert caller.key not in token
        assert token not in (hash_key(caller.key), caller.key[len("srft_") :])
    (row,) = _sessions(session, caller)
    assert row.token_hash == hash_key(second)  # only the token's hash is stored
    assert row.expires_at - row.created_at == timedelta(seconds=600)
    stored_values = set(session.scalars(select(UiSession.token_hash)))
    assert not stored_values & {first, second, caller.key}


def test_logout_revokes_the_session(
    client: TestClient, session: Session, caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    token = _signed_in(client, caller)
    out = client.post("/ui/logout", headers=SAME_ORIGIN, follow_redirects=False)
    assert out.status_code == 303
    assert f'{COOKIE}=""' in out.headers["set-cookie"]
    assert _sessions(session, caller) == []

    client.cookies.set(COOKIE, token)  # a copy of the old cookie, replayed
    replayed = client.get("/ui/jobs")
    assert replayed.status_code == 401
    assert 'action="/ui/login"' in replayed.text
    assert job_id not in replayed.text
    url = f"/ui/trajectories/{trajectory_id}/steps/1/label"
    assert client.post(url, json={"label": "mistake"}).status_code == 401


def test_an_expired_session_is_refused_and_removed(
    client: TestClient, session: Session, caller: Caller, stored: tuple[str, str]
) -> None:
    _signed_in(client, caller)
    assert client.get("/ui/jobs").status_code == 200
    session.execute(
        update(UiSession)
        .where(
            UiSession.api_key_id.in_(
                select(ApiKey.id).where(ApiKey.project_id == caller.project_id)
            )
        )
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    expired = client.get("/ui/jobs")
    assert expired.status_code == 401
    assert stored[1] not in expired.text
    assert _sessions(session, caller) == []


def test_revoking_the_key_ends_its_sessions(
    client: TestClient, session: Session, caller: Caller, stored: tuple[str, str]
) -> None:
    trajectory_id, job_id = stored
    _signed_in(client, caller)
    assert len(_sessions(session, caller)) == 1
    session.execute(
        update(ApiKey).where(ApiKey.project_id == caller.project_id).values(revoked_at=utcnow())
    )
    refused = client.get("/ui/jobs")
    assert refused.status_code == 401
    assert job_id not in refused.text
    url = f"/ui/trajectories/{trajectory_id}/steps/1/label"
    assert client.post(url, json={"label": "mistake"}).status_code == 401
    assert _sessions(session, caller) == []


@pytest.mark.parametrize(
    ("cookie_secure", "base", "secure"),
    [
        (True, "http://testserver", True),  # TLS ends at a proxy: the app sees http
        (None, "http://testserver", False),
        (None, "https://testserver", True),
        (False, "https://testserver", False),
    ],
)
def test_the_cookie_is_secure_as_configured(
    client: TestClient,
    caller: Caller,
    settings: Settings,
    cookie_secure: bool | None,
    base: str,
    secure: bool,
) -> None:
    settings.cookie_secure = cookie_secure
    response = client.post(f"{base}/ui/login", data={"key": caller.key}, follow_redirects=False)
    assert response.status_code == 303
    (cookie,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(COOKIE)]
    assert ("; Secure" in cookie) is secure
