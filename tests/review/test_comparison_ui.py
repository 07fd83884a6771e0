"""The comparison and review-queue pages: the jobs page links to them, the comparison shows
each job's scores with intervals, the queue lists items that open the trajectory at their step
with the queue kept, and `next` goes to the queue's best item once a step is labeled."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.conftest import Caller
from tests.review.test_comparison import _two_jobs
from tests.review.test_review_queue import _queue_setup


def test_the_jobs_page_offers_a_comparison_and_the_comparison_page_renders(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_a, job_b, _ = _two_jobs(client, caller, session)
    jobs = client.get("/ui/jobs", headers=caller.headers)
    assert jobs.status_code == 200
    assert '<form method="get" action="/ui/evaluate" id="compare"' in jobs.text
    assert f'name="job" value="{job_a}"' in jobs.text
    assert 'formaction="/ui/review-queue"' in jobs.text

    page = client.get(
        "/ui/evaluate",
        params={"job": [job_a, job_b], "mask": ["mistake", "bad"], "resamples": 100},
        headers=caller.headers,
    )
    assert page.status_code == 200, page.text
    html = page.text
    assert "<strong>5</strong> steps compared" in html
    assert "1 of 6 human-labeled steps left out" in html
    masked_row = re.search(r'<tr class="row-masked-f1">(.*?)</tr>', html, re.S)
    assert masked_row is not None
    cells = re.findall(r'<span class="score">([\d.]+)</span>', masked_row.group(1))
    assert cells == ["0.500", "1.000"]
    assert '<tr class="row-label" data-label="ok">' in html
    # Masks kappa between the two: 1/6.
    assert '<td class="kappa">0.167</td>' in html

    foreign = client.get("/ui/evaluate", params={"job": job_a}, headers={})
    assert foreign.status_code == 401
    unknown = client.get("/ui/evaluate", params={"job": "not-a-job"}, headers=caller.headers)
    assert unknown.status_code == 404
    none = client.get("/ui/evaluate", headers=caller.headers)
    assert none.status_code == 422
    assert "at least one job" in none.text


def test_the_queue_page_and_its_next_item(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_a, job_b, tid = _queue_setup(client, caller, session)
    page = client.get("/ui/review-queue", params={"job": [job_a, job_b]}, headers=caller.headers)
    assert page.status_code == 200, page.text
    steps = re.findall(
        r'<tr class="queue-item" data-trajectory="[^"]+" data-step="(\d+)">', page.text
    )
    assert steps == ["1", "2", "0", "3"]
    link = f"/ui/trajectories/{tid}?job={job_a}&amp;queue={job_a}&amp;queue={job_b}#step-1"
    assert link in page.text

    # The trajectory page opened from the queue knows where to go after a label.
    opened = client.get(
        f"/ui/trajectories/{tid}",
        params={"job": job_a, "queue": [job_a, job_b]},
        headers=caller.headers,
    )
    assert opened.status_code == 200
    next_url = f"/ui/review-queue/next?job={job_a}&amp;job={job_b}"
    assert f'data-queue-next="{next_url}"' in opened.text
    plain = client.get(f"/ui/trajectories/{tid}", headers=caller.headers)
    assert "data-queue-next" not in plain.text

    def follow_next() -> str:
        answer = client.get(
            "/ui/review-queue/next",
            params={"job": [job_a, job_b]},
            headers=caller.headers,
            follow_redirects=False,
        )
        assert answer.status_code == 303
        location: str = answer.headers["location"]
        return location

    first = urlsplit(follow_next())
    assert first.path == f"/ui/trajectories/{tid}"
    assert first.fragment == "step-1"
    assert parse_qs(first.query) == {"job": [job_a], "queue": [job_a, job_b]}
    # Label step 1 as the page's keyboard does: the next item is step 2.
    saved = client.post(
        f"/ui/trajectories/{tid}/steps/1/label",
        json={"label": "mistake"},
        headers=caller.headers,
    )
    assert saved.status_code == 200, saved.text
    assert urlsplit(follow_next()).fragment == "step-2"
    for step in (0, 2, 3):
        client.put(
            f"/v1/trajectories/{tid}/steps/{step}/human_label",
            json={"label": "good"},
            headers=caller.headers,
        )
    # Nothing left: back to the (empty) queue page.
    assert urlsplit(follow_next()).path == "/ui/review-queue"
