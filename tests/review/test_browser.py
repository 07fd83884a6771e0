"""The review UI in a real browser: headless Chromium (Debian's, driven by Playwright) against
`srft serve` on the embedded default. A reviewer signs in, opens a labeled job and a
trajectory, relabels a step from the keyboard, and the export preview follows; a script
planted in an observation shows as text and never runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.builders import make_trajectory
from tests.test_embedded import KEY, Served

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


def test_a_reviewer_relabels_a_step_from_the_keyboard(served: Served) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
            ".ci/run installs it"
        )
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")

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
