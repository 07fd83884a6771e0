"""The review pages' export preview is the export: over the shared real runs, labeled by the
rules critic (with three votes on every third step) and relabeled by a reviewer through the
API, the trajectory page and the job page show for every policy and mask exactly the steps an
export of the same jobs trains, masks and cuts, and the runs it drops."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest

from tests.e2e import api, e2e_database_url, e2e_redis, export_dir  # noqa: F401
from tests.exports.conftest import Corpus, corpus  # noqa: F401

POLICIES = ("sft", "rft", "srft", "srft_unresolved", "prefix")
MASKS = (("mistake",), ("mistake", "unnecessary"))
# What an export says of one run: None when it is dropped, else each step's outcome.
States = dict[str, list[str] | None]


@pytest.fixture(scope="module")
def reviewed(corpus: Corpus) -> tuple[Corpus, dict[str, dict[int, str]]]:  # noqa: F811
    """The corpus with a reviewer's labels on unresolved, unknown and resolved runs: a step the
    critic called good called a mistake, a mistake with votes called good, one unnecessary."""
    verdicts = corpus.verdicts(corpus.job_id)
    by_run: dict[str, dict[int, dict[str, Any]]] = {}
    for (tid, step), verdict in verdicts.items():
        by_run.setdefault(tid, {})[step] = verdict
    chosen: dict[str, dict[int, str]] = {}
    for resolved in (False, None):
        tid, steps = next(
            (t, s)
            for t, s in sorted(by_run.items())
            if corpus.trajectories[t]["resolved"] is resolved
            and t not in corpus.override_ids
            and any(v["label"] == "mistake" and v["vote_labels"] for v in s.values())
            and any(v["label"] == "good" for v in s.values())
        )
        voted_mistake = min(
            k for k, v in steps.items() if v["label"] == "mistake" and v["vote_labels"]
        )
        first_good = min(k for k, v in steps.items() if v["label"] == "good")
        unnecessary = next(k for k in sorted(steps) if k not in (voted_mistake, first_good))
        chosen[tid] = {voted_mistake: "good", first_good: "mistake", unnecessary: "unnecessary"}
    resolved_run = next(t for t, d in sorted(corpus.trajectories.items()) if d["resolved"] is True)
    chosen[resolved_run] = {0: "mistake"}
    # A run the job selected as resolved, then found unresolved: only the override job labeled
    # it, so an export of the job alone has no verdict for its steps.
    relabeled = next(t for t in corpus.override_ids if corpus.trajectories[t]["resolved"] is True)
    response = corpus.api.client.patch(
        f"/v1/trajectories/{relabeled}", json={"resolved": False}, headers=corpus.api.headers
    )
    assert response.status_code == 200, response.text
    corpus.trajectories[relabeled]["resolved"] = False
    for tid, labels in chosen.items():
        for step, label in labels.items():
            response = corpus.api.client.put(
                f"/v1/trajectories/{tid}/steps/{step}/human_label",
                json={"label": label},
                headers=corpus.api.headers,
            )
            assert response.status_code == 200, response.text
    # Votes are present where no reviewer spoke (and the reviewer overrode a voted mistake).
    assert any(
        len(v["vote_labels"] or ()) == 3 and step not in chosen.get(tid, {})
        for (tid, step), v in verdicts.items()
    )
    return corpus, chosen


def _query(policy: str, mask: tuple[str, ...], job: str | None = None) -> list[tuple[str, str]]:
    return [("policy", policy), *(("mask", m) for m in mask), *([("job", job)] if job else [])]


def _exported(
    shared: Corpus, job_ids: list[str], policy: str, mask: tuple[str, ...]
) -> tuple[States, dict[str, Any]]:
    """Each run's step outcomes in the export of `job_ids` (PRM rows: a label per step in the
    row, the steps past a prefix cut left out), and the manifest."""
    export = shared.export(
        {
            "job_ids": job_ids,
            "policy": policy,
            "format": "prm_jsonl",
            "options": {"mask_labels": list(mask)},
        }
    )
    assert export["status"] == "completed", export
    root = shared.path(export)
    states: States = dict.fromkeys(shared.trajectories)
    for shard in export["manifest"]["shards"]:
        for line in (root / shard["path"]).read_text().splitlines():
            row = json.loads(line)
            tid, labels = row["trajectory_id"], row["labels"]
            cut = shared.trajectories[tid]["num_steps"] - len(labels)
            states[tid] = ["trained" if trained else "masked" for trained in labels] + ["cut"] * cut
    return states, export["manifest"]


def _trajectory_page(shared: Corpus, tid: str, query: list[tuple[str, str]]) -> tuple[str, Any]:
    """(drop reason or "kept", each step's badge) as the trajectory page shows them."""
    response = shared.api.get(f"/ui/trajectories/{tid}", params=query)
    assert response.status_code == 200, response.text
    html = response.text
    outcomes = [o for _, o in re.findall(r'data-step="(\d+)" data-outcome="(\w+)"', html)]
    assert len(outcomes) == shared.trajectories[tid]["num_steps"]
    dropped = re.search(r"dropped from the export \((\w+)\)", html)
    return (dropped.group(1) if dropped else "kept"), outcomes


def _job_page(shared: Corpus, job_id: str, query: list[tuple[str, str]]) -> dict[str, Any]:
    """Per listed run: (trained, masked, cut, human labels, drop reason or "kept")."""
    response = shared.api.get(f"/ui/jobs/{job_id}", params=query)
    assert response.status_code == 200, response.text
    rows: dict[str, Any] = {}
    pattern = r'<tr class="trajectory" data-trajectory="([^"]+)">(.*?)</tr>'
    for tid, row in re.findall(pattern, response.text, re.DOTALL):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
        dropped = re.search(r"dropped \((\w+)\)", cells[8])
        trained, masked, cut, human = (int(c) for c in cells[4:8])
        rows[tid] = (trained, masked, cut, human, dropped.group(1) if dropped else "kept")
    return rows


def _check_trajectory_pages(
    shared: Corpus,
    states: States,
    manifest: dict[str, Any],
    query: list[tuple[str, str]],
) -> Counter[str]:
    """Every run's page against the export; the outcomes of the kept runs' steps, counted."""
    reasons: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    for tid, exported in states.items():
        reason, outcomes = _trajectory_page(shared, tid, query)
        assert (reason == "kept") == (exported is not None), (tid, query)
        if exported is None:
            reasons[reason] += 1
            continue
        assert outcomes == exported, (tid, query)
        steps.update(outcomes)
    counts = manifest["counts"]
    assert dict(reasons) == counts["trajectories"]["dropped"]
    assert steps["trained"] == counts["steps"]["steps_trained"]
    assert steps["masked"] == counts["steps"]["steps_masked"]
    assert steps["cut"] == counts["steps"]["steps_cut"]
    return steps


@pytest.mark.parametrize("policy", POLICIES)
def test_the_pages_of_a_job_preview_its_export(
    reviewed: tuple[Corpus, dict[str, dict[int, str]]], policy: str
) -> None:
    shared, _ = reviewed
    job_id = shared.job_id
    labeled = {t for t, _ in shared.verdicts(job_id)}
    for mask in MASKS:
        states, manifest = _exported(shared, [job_id], policy, mask)
        query = _query(policy, mask, job_id)
        steps = _check_trajectory_pages(shared, states, manifest, query)
        if policy in ("srft", "srft_unresolved", "prefix"):
            # The corpus and the reviewer's labels give this policy something to mask or cut.
            assert steps["cut" if policy == "prefix" else "masked"] > 0

        listed = _job_page(shared, job_id, query)
        # The job page lists the runs the job labeled (the unresolved and unknown ones).
        assert set(listed) == labeled
        assert sum(row[3] for row in listed.values()) == 6  # the reviewer's labels shown
        for tid, (trained, masked, cut, _, reason) in listed.items():
            exported = states[tid]
            assert (reason == "kept") == (exported is not None), (tid, query)
            if exported is not None:
                assert (trained, masked, cut) == (
                    exported.count("trained"),
                    exported.count("masked"),
                    exported.count("cut"),
                ), (tid, query)


@pytest.mark.parametrize("mask", MASKS)
def test_without_a_job_the_page_previews_the_export_of_every_job_oldest_first(
    reviewed: tuple[Corpus, dict[str, dict[int, str]]], mask: tuple[str, ...]
) -> None:
    shared, _ = reviewed
    for policy in POLICIES:
        # The override job came second: its verdicts win where both labeled a step.
        jobs = [shared.job_id, shared.override_job_id]
        states, manifest = _exported(shared, jobs, policy, mask)
        _check_trajectory_pages(shared, states, manifest, _query(policy, mask))


def test_the_reviewers_labels_win_in_the_preview_and_the_export_alike(
    reviewed: tuple[Corpus, dict[str, dict[int, str]]],
) -> None:
    """The checks above are not vacuous: where the reviewer overrode the critic, both the page
    and the export follow the reviewer (srft masks the mistakes of unresolved runs)."""
    shared, chosen = reviewed
    seen: Counter[str] = Counter()
    for mask in MASKS:
        states, _ = _exported(shared, [shared.job_id], "srft", mask)
        for tid, labels in chosen.items():
            reason, outcomes = _trajectory_page(shared, tid, _query("srft", mask, shared.job_id))
            assert (reason == "kept") == (states[tid] is not None)
            assert states[tid] is None or outcomes == states[tid]
            if shared.trajectories[tid]["resolved"] is True:
                continue  # not critiqued under srft: trained in full, whatever the labels
            for step, label in labels.items():
                if label in mask:
                    assert outcomes[step] == "masked", (tid, step)
                    seen["masked"] += 1
                elif reason == "kept":
                    assert outcomes[step] == "trained", (tid, step)
                    seen["trained"] += 1
    assert seen["masked"]
    assert seen["trained"]
