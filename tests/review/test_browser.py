"""The review UI in a real browser: headless Chromium (Debian's, driven by Playwright) against
`srft serve` on the embedded default. A reviewer signs in, opens a labeled job and a
trajectory, relabels a step from the keyboard, and the export preview follows; a script
planted in an observation shows as text and never runs. A page of another origin cannot sign
the reviewer in as someone else."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.builders import make_trajectory
from tests.servers import free_port
from tests.test_embedded import KEY, SRFT, Served, _env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PLANTED = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path)
    server.start()
    yield server
    server.stop()


def _labeled(served: Served, headers: dict[str, str]) -> tuple[str, str]:
    """Upload an unresolved run with a planted script and label it with the rules critic."""
    run = make_trajectory(3, resolved=False)
    run["messages"][3]["content"] = f"listing {PLANTED} done"  # step 0's observation
    created = httpx.post(
        f"{served.url}/v1/trajectories",
        content=json.dumps(run),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert created.status_code == 201, created.text
    trajectory_id: str = created.json()["trajectories"][0]["id"]
    job = httpx.post(
        f"{served.url}/v1/jobs",
        json={"selection": {"trajectory_ids": [trajectory_id]}},
        headers=headers,
    )
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    deadline = time.monotonic() + 120
    state: dict[str, Any] = job.json()
    while state["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {state['status']}: {state}"
        time.sleep(0.2)
        state = httpx.get(f"{served.url}/v1/jobs/{job_id}", headers=headers).json()
    assert state["status"] == "completed", state
    assert state["labels"] == {"good": 3}, "the rules critic finds nothing wrong in this run"
    return trajectory_id, job_id


def _require_browser() -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
            ".ci/run installs it"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")


def test_a_reviewer_relabels_a_step_from_the_keyboard(served: Served) -> None:
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    key = KEY.findall(served.log.read_text())[0]
    trajectory_id, job_id = _labeled(served, {"Authorization": f"Bearer {key}"})
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "review.png"
    screenshot.unlink(missing_ok=True)

    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

            page.goto(f"{served.url}/ui/jobs")
            expect(page.locator("#login")).to_be_visible()  # no key, no data
            page.fill("input[name=key]", key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served.url}/ui/jobs")
            page.click(f"a[href='/ui/jobs/{job_id}']")
            page.wait_for_url(f"{served.url}/ui/jobs/{job_id}")
            page.click(f"tr[data-trajectory='{trajectory_id}'] a")
            page.wait_for_url(f"{served.url}/ui/trajectories/{trajectory_id}?*")

            first = page.locator("#step-0")
            badge = first.locator("[data-testid=badge]")
            expect(badge).to_have_text("trained")
            expect(first.locator("pre.observation")).to_have_text(f"listing {PLANTED} done")

            page.keyboard.press("j")
            expect(first).to_have_class("step label-good outcome-trained focused")
            page.keyboard.press("3")  # the third label of the project: mistake
            expect(badge).to_have_text("masked")
            expect(first.locator("[data-testid=human-label]")).to_have_text("mistake")
            expect(first).to_have_class("step label-mistake outcome-masked focused")
            assert page.url.endswith("#step-0"), "the reload keeps the reviewer's place"

            page.keyboard.press("m")  # masked steps only
            expect(page.locator("#step-1")).to_be_hidden()
            expect(first).to_be_visible()
            page.keyboard.press("m")
            expect(page.locator("#step-1")).to_be_visible()

            page.select_option("#policy", "sft")  # the preview follows the policy
            expect(page.locator("#step-0 [data-testid=badge]")).to_have_text("trained")
            page.select_option("#policy", "srft")
            expect(page.locator("#step-0 [data-testid=badge]")).to_have_text("masked")
            expect(page.locator("#step-0")).to_have_class(
                "step label-mistake outcome-masked focused"
            )

            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert dialogs == [], f"a planted script ran: {dialogs}"
    stored = httpx.get(
        f"{served.url}/v1/trajectories/{trajectory_id}", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert stored["steps"][0]["human_label"]["label"] == "mistake"
    assert stored["steps"][0]["human_label"]["author"] == "bootstrap"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000


def _queued_job(served: Served, headers: dict[str, str], salt: str) -> tuple[str, str]:
    """Upload a run and start a job over it (not waited for: the jobs list shows it at once)."""
    created = httpx.post(
        f"{served.url}/v1/trajectories",
        json=make_trajectory(2, resolved=False, salt=salt),
        headers=headers,
    )
    assert created.status_code == 201, created.text
    trajectory_id: str = created.json()["trajectories"][0]["id"]
    job = httpx.post(
        f"{served.url}/v1/jobs",
        json={"selection": {"trajectory_ids": [trajectory_id]}},
        headers=headers,
    )
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    return trajectory_id, job_id


@contextmanager
def _attacker_site(html: str) -> Iterator[str]:
    """Another origin (same host, another port: same-site, so SameSite=Strict cookies still
    go along) serving one page; its URL."""
    body = html.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # quiet: the test output is enough
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_another_sites_page_cannot_sign_the_reviewer_in_as_the_attacker(served: Served) -> None:
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    victim_key = KEY.findall(served.log.read_text())[0]
    victim = {"Authorization": f"Bearer {victim_key}"}
    made = subprocess.run(
        [*SRFT, "keys", "create", "mallory", "--project", "attacker"],
        cwd=served.workdir,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    attacker_key = made.stdout.strip().splitlines()[-1]
    assert KEY.fullmatch(attacker_key)
    trajectory_id, victim_job = _queued_job(served, victim, "victim")
    _, attacker_job = _queued_job(served, {"Authorization": f"Bearer {attacker_key}"}, "mallory")

    # Login CSRF: the page signs the visitor in with the attacker's key, so that the labels
    # the visitor goes on to set land in the attacker's project.
    attack = f"""<!doctype html><title>cute cats</title>
<form id="f" method="post" action="{served.url}/ui/login">
<input type="hidden" name="key" value="{attacker_key}"></form>
<script>document.getElementById("f").submit();</script>"""

    with sync_playwright() as playwright, _attacker_site(attack) as attacker_url:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/ui/")
            page.fill("input[name=key]", victim_key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served.url}/ui/jobs")  # same-origin sign-in works
            expect(page.locator(f"a[href='/ui/jobs/{victim_job}']")).to_be_visible()

            with page.expect_response(f"{served.url}/ui/login") as forged:
                page.goto(attacker_url)
            assert forged.value.status == 403
            assert forged.value.json()["error"]["code"] == "forbidden"

            page.goto(f"{served.url}/ui/jobs")
            expect(page.locator(f"a[href='/ui/jobs/{victim_job}']")).to_be_visible()
            assert attacker_job not in page.content()
            # A label set from the page now still lands in the victim's project.
            labeled = page.evaluate(
                """async (url) => {
                    const response = await fetch(url, {
                        method: "POST",
                        credentials: "same-origin",
                        headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({label: "mistake", note: null}),
                    });
                    return response.status;
                }""",
                f"{served.url}/ui/trajectories/{trajectory_id}/steps/0/label",
            )
            assert labeled == 200
        finally:
            browser.close()

    stored = httpx.get(f"{served.url}/v1/trajectories/{trajectory_id}", headers=victim).json()
    assert stored["steps"][0]["human_label"]["label"] == "mistake"
    assert stored["steps"][0]["human_label"]["author"] == "bootstrap"


def test_a_reviewer_works_through_the_review_queue_from_the_keyboard(served: Served) -> None:
    _require_browser()
    import re

    from playwright.sync_api import expect, sync_playwright

    key = KEY.findall(served.log.read_text())[0]
    headers = {"Authorization": f"Bearer {key}"}
    trajectory_id, job_id = _labeled(served, headers)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{served.url}/ui/")
            page.fill("input[name=key]", key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served.url}/ui/jobs")
            # The jobs page's compare form: check the job, ask for its review queue.
            page.check(f"input[name=job][value='{job_id}']")
            page.click("button[formaction='/ui/review-queue']")
            page.wait_for_url(f"{served.url}/ui/review-queue?*")
            expect(page.locator("tr.queue-item")).to_have_count(3)

            page.click("a.start")
            expect(page).to_have_url(re.compile(r"#step-0$"))
            expect(page.locator("#step-0")).to_have_class(re.compile("focused"))
            page.keyboard.press("3")  # mistake: saved, and the next item opens
            expect(page).to_have_url(re.compile(r"#step-1$"))
            expect(page.locator("#step-1")).to_have_class(re.compile("focused"))
            expect(page.locator("#step-0 [data-testid=human-label]")).to_have_text("mistake")
            page.keyboard.press("1")
            expect(page).to_have_url(re.compile(r"#step-2$"))
            page.keyboard.press("1")
            # Nothing left to label: back to the queue, empty.
            page.wait_for_url(f"{served.url}/ui/review-queue?*")
            expect(page.locator("tr.queue-item")).to_have_count(0)
        finally:
            browser.close()

    stored = httpx.get(f"{served.url}/v1/trajectories/{trajectory_id}", headers=headers).json()
    assert [s["human_label"]["label"] for s in stored["steps"]] == ["mistake", "good", "good"]
