"""Every policy over the real corpus: which runs become rows and which steps are trained, checked
against expectations computed here from the stored verdicts and resolutions (not by the code
under test), and masked steps still present in the rows' context. The rows checked are the
canonical ones (`openai_jsonl_raw`); test_finetune checks that `openai_jsonl` rows are exactly
these, fitted to the fine-tuning format."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.exports.conftest import Corpus

POLICIES = ("sft", "rft", "srft", "srft_unresolved", "prefix")
RAW = "openai_jsonl_raw"  # the canonical messages, with their weights


def _labels(corpus: Corpus, jobs: list[str]) -> dict[tuple[str, int], str]:
    """Per step, the label of the last listed job that has one."""
    labels: dict[tuple[str, int], str] = {}
    for job_id in jobs:
        for key, verdict in corpus.verdicts(job_id).items():
            if verdict["status"] == "done":
                labels[key] = verdict["label"]
    return labels


def expected_weights(
    policy: str,
    detail: dict[str, Any],
    labels: dict[tuple[str, int], str],
    mask: set[str],
    *,
    critique_resolved: bool = False,
    unlabeled: str = "mask",
) -> list[int] | None:
    """The weights a row should carry for its steps (shorter under prefix), or None if the
    trajectory must not appear, from the policy definitions."""
    resolved = detail["resolved"] is True
    n = detail["num_steps"]
    if policy == "sft" or (policy == "rft" and resolved):
        return [1] * n
    if policy == "rft" or (policy == "srft_unresolved" and resolved):
        return None
    if resolved and not critique_resolved:
        return [1] * n
    step_labels = [labels.get((detail["id"], k)) for k in range(n)]
    if unlabeled == "drop" and None in step_labels:
        return None
    weights = [
        0 if (label in mask if label is not None else unlabeled == "mask") else 1
        for label in step_labels
    ]
    if policy == "prefix" and 0 in weights:
        weights = weights[: weights.index(0)]
    return weights if any(weights) else None


def _rows(corpus: Corpus, export: dict[str, Any]) -> list[dict[str, Any]]:
    root = corpus.path(export)
    rows: list[dict[str, Any]] = []
    for shard in export["manifest"]["shards"]:
        rows += [json.loads(line) for line in (root / shard["path"]).read_text().splitlines()]
    return rows


def _owner(corpus: Corpus, row: dict[str, Any]) -> dict[str, Any]:
    """The trajectory a row was made from: its messages, less the weights, are a prefix."""
    shown = [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]]
    owners = [d for d in corpus.trajectories.values() if d["messages"][: len(shown)] == shown]
    assert len(owners) == 1, "every row comes from exactly one trajectory"
    return owners[0]


def _check(
    corpus: Corpus,
    export: dict[str, Any],
    policy: str,
    jobs: list[str],
    mask: set[str],
    **options: Any,
) -> dict[str, list[int]]:
    assert export["status"] == "completed", export
    labels = _labels(corpus, jobs)
    expected = {
        tid: w
        for tid, detail in corpus.trajectories.items()
        if (w := expected_weights(policy, detail, labels, mask, **options)) is not None
    }
    got: dict[str, list[int]] = {}
    for row in _rows(corpus, export):
        detail = _owner(corpus, row)
        assistants = [m for m in row["messages"] if m["role"] == "assistant"]
        assert all(m["weight"] in (0, 1) for m in assistants)
        assert all("weight" not in m for m in row["messages"] if m["role"] != "assistant")
        got[detail["id"]] = [m["weight"] for m in assistants]
        if policy != "prefix":
            # Masked steps stay in the context: the row is the whole run.
            assert len(row["messages"]) == len(detail["messages"])
        if detail["tools"]:
            assert row["tools"] == detail["tools"]
    assert got == expected
    steps = export["manifest"]["counts"]["steps"]
    assert steps["steps_trained"] == sum(sum(w) for w in expected.values())
    assert steps["steps_masked"] == sum(len(w) - sum(w) for w in expected.values())
    assert export["manifest"]["counts"]["rows"]["written"] == len(expected)
    return got


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_trains_exactly_the_expected_steps(corpus: Corpus, policy: str) -> None:
    export = corpus.export({"job_ids": [corpus.job_id], "policy": policy, "format": RAW})
    got = _check(corpus, export, policy, [corpus.job_id], {"mistake"})
    resolved = {t for t, d in corpus.trajectories.items() if d["resolved"] is True}
    if policy in ("rft",):
        assert set(got) <= resolved
    if policy == "srft_unresolved":
        assert not set(got) & resolved
    if policy == "srft":
        # The corpus has mistakes to mask, or this test would prove nothing.
        assert any(0 in w for w in got.values())
    manifest = export["manifest"]
    assert manifest["policy"]["name"] == policy
    assert manifest["source_job_ids"] == [corpus.job_id]
    assert manifest["critic"][0]["model"] == "rules"
    assert len(manifest["critic"][0]["prompt_hash"]) == 64


def test_options_change_exactly_what_they_say(corpus: Corpus) -> None:
    mask = {"mistake", "unnecessary"}
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": RAW,
            "options": {"mask_labels": sorted(mask), "critique_resolved": True},
        }
    )
    # critique_resolved with a job that labeled only unresolved runs: resolved steps are
    # unlabeled, hence masked, hence resolved runs have no trained step and no row.
    got = _check(corpus, export, "srft", [corpus.job_id], mask, critique_resolved=True)
    assert not {t for t in got if corpus.trajectories[t]["resolved"] is True}
    dropped = export["manifest"]["counts"]["trajectories"]["dropped"]
    assert dropped["too_few_trained_steps"] >= 1

    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": RAW,
            "options": {"critique_resolved": True, "unlabeled": "train"},
        }
    )
    _check(
        corpus,
        export,
        "srft",
        [corpus.job_id],
        {"mistake"},
        critique_resolved=True,
        unlabeled="train",
    )

    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": RAW,
            "options": {"critique_resolved": True, "unlabeled": "drop"},
        }
    )
    _check(
        corpus,
        export,
        "srft",
        [corpus.job_id],
        {"mistake"},
        critique_resolved=True,
        unlabeled="drop",
    )
    assert export["manifest"]["counts"]["trajectories"]["dropped"]["unlabeled"] == sum(
        1 for d in corpus.trajectories.values() if d["resolved"] is True
    )


def test_a_later_job_overrides_an_earlier_one(corpus: Corpus) -> None:
    jobs = [corpus.job_id, corpus.override_job_id]
    mask = {"mistake", "unnecessary"}
    export = corpus.export(
        {
            "job_ids": jobs,
            "policy": "srft",
            "format": RAW,
            "options": {"mask_labels": sorted(mask), "unlabeled": "train"},
        }
    )
    got = _check(corpus, export, "srft", jobs, mask, unlabeled="train")
    # The override job called every step of its runs unnecessary: unresolved ones are gone
    # (nothing left to train), resolved ones are still trained in full.
    for tid in corpus.override_ids:
        if corpus.trajectories[tid]["resolved"] is True:
            assert got[tid] == [1] * corpus.trajectories[tid]["num_steps"]
        else:
            assert tid not in got
    steps = export["manifest"]["counts"]["steps"]
    assert steps["steps_by_source"]["critic"] > 0


def test_prm_rows_label_each_step_as_the_policy_trains_it(corpus: Corpus) -> None:
    export = corpus.export({"job_ids": [corpus.job_id], "policy": "srft", "format": "prm_jsonl"})
    assert export["status"] == "completed", export
    labels = _labels(corpus, [corpus.job_id])
    rows = _rows(corpus, export)
    expected = {
        tid: w
        for tid, d in corpus.trajectories.items()
        if (w := expected_weights("srft", d, labels, {"mistake"})) is not None
    }
    assert {r["trajectory_id"] for r in rows} == set(expected)
    for row in rows:
        detail = corpus.trajectories[row["trajectory_id"]]
        assert row["labels"] == [bool(w) for w in expected[row["trajectory_id"]]]
        assert len(row["completions"]) == detail["num_steps"]
        first = detail["messages"][detail["steps"][0]["message_index"]]
        if first.get("content"):
            assert row["completions"][0].startswith(first["content"])
        task = next(m for m in detail["messages"] if m["role"] == "user")
        assert task["content"] in row["prompt"]


def test_an_export_whose_worker_died_is_taken_over_and_rebuilt(corpus: Corpus) -> None:
    """A worker killed mid-export leaves a `running` row with a stopped heartbeat and a
    half-written building folder: the sweeper re-enqueues it, the next worker claims it,
    removes the leftovers and publishes a complete export."""
    from app.exports import service as export_service
    from app.exports.builder import build_export, building_root
    from app.exports.schemas import ExportCreate
    from app.models import Job

    settings = corpus.api.settings
    with corpus.api.database.transaction() as session:
        # Written but not queued: no other worker may pick it up behind the test's back.
        job = session.get(Job, uuid.UUID(corpus.job_id))
        assert job is not None
        body = ExportCreate(job_ids=[job.id])
        export_id = export_service.create_export(session, job.project_id, body, settings).id
    with corpus.api.database.transaction() as session:
        token = export_service.claim(session, export_id, settings.stale_after_s)
        assert token is not None
        # A second claim while the first is alive gets nothing.
        assert export_service.claim(session, export_id, settings.stale_after_s) is None
    leftover = building_root(settings) / f"{export_id}-{token}"
    (leftover / "data").mkdir(parents=True)
    (leftover / "data" / "half.jsonl").write_text('{"messages": [')

    assert build_export(corpus.api.database, settings, export_id) is None  # still claimed
    later = settings.model_copy(update={"stale_after_s": 0.0})
    with corpus.api.database.transaction() as session:
        assert export_id in export_service.sweep(session, later.stale_after_s)
    assert build_export(corpus.api.database, later, export_id) == "completed"
    assert not leftover.exists()
    export = corpus.api.get(f"/v1/exports/{export_id}").json()
    assert export["status"] == "completed"
    names = {p.name for p in (corpus.path(export) / "data").iterdir()}
    assert names == {Path(s["path"]).name for s in export["manifest"]["shards"]}


def test_human_labels_win_over_verdicts_and_are_counted(corpus: Corpus) -> None:
    labels = _labels(corpus, [corpus.job_id])
    tid = next(
        t
        for t, d in corpus.trajectories.items()
        if d["resolved"] is not True
        and d["num_steps"] >= 3
        and labels.get((t, 0)) != "mistake"
        and labels.get((t, 1)) == "good"
    )
    url = f"/v1/trajectories/{tid}/steps/{{}}/human_label"
    headers = corpus.api.headers
    for step, label in ((0, "mistake"), (1, "unnecessary")):
        response = corpus.api.client.put(url.format(step), json={"label": label}, headers=headers)
        assert response.status_code == 200, response.text
    try:
        export = corpus.export({"job_ids": [corpus.job_id], "policy": "srft", "format": RAW})
        labels[(tid, 0)] = "mistake"
        labels[(tid, 1)] = "unnecessary"
        got = {
            _owner(corpus, row)["id"]: [
                m["weight"] for m in row["messages"] if m["role"] == "assistant"
            ]
            for row in _rows(corpus, export)
        }
        expected = expected_weights("srft", corpus.trajectories[tid], labels, {"mistake"})
        assert got[tid] == expected
        assert got[tid][0] == 0
        assert got[tid][1] == 1
        assert export["manifest"]["counts"]["steps"]["steps_by_source"]["human"] == 2
    finally:
        for step in (0, 1):
            corpus.api.client.delete(url.format(step), headers=headers)
