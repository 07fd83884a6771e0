"""The recipe check (`bench/recipe.py`): its pure parts (environment, true labels, teachers, the
oracle critics, the habit metric), the whole pipeline's wiring (`--quick`), and the mechanism on
the oracle critic at a small budget (`srft` repeats the masked habits less than `sft`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.critic import rules
from app.critic.labels import DEFAULT_LABELS
from app.critic.prompt import trajectory_windows
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from bench.common import child_env
from bench.recipe_critics import TrueLabels, corrupted_model
from bench.recipe_env import Episode, label_run, make_task
from bench.recipe_eval import habit_counts
from bench.recipe_teachers import teacher_runs

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_a_task_is_solved_only_by_editing_the_file_grep_names() -> None:
    task = make_task(0, 3)
    episode = Episode(task)
    found = episode.step(f"grep {task.function}")
    assert found == f"{task.buggy_file}: def {task.function}"
    wrong = next(f for f in task.files if f != task.buggy_file)
    episode.step(f"edit {wrong}")
    assert episode.step("test") == f"FAIL {task.function}"
    episode.step(f"edit {found.split(':')[0]}")
    assert episode.step("test") == "PASS"
    episode.step("submit")
    assert episode.success


def test_true_labels_mark_mistakes_recoveries_and_waste() -> None:
    task = make_task(0, 3)
    wrong = next(f for f in task.files if f != task.buggy_file)
    commands = ["ls", f"edit {wrong}", "test", f"grep {task.function}", "pytest",
                f"edit {task.buggy_file}", "test", "test", "submit"]  # fmt: skip
    labels, resolved = label_run(task, commands)
    assert labels == ["unnecessary", "mistake", "recover", "good", "mistake", "recover",
                      "good", "unnecessary", "good"]  # fmt: skip
    assert resolved
    assert label_run(task, [f"edit {wrong}", "submit"]) == (["mistake", "mistake"], False)


def test_teachers_habits_are_state_dependent_and_they_recover() -> None:
    runs = teacher_runs([make_task(0, n) for n in range(300)], seed=0)
    resolved = [run for run in runs if run.resolved]
    assert 0.4 < len(resolved) / len(runs) < 0.9
    # Mistakes in runs that still resolved: the teachers recover.
    assert any("mistake" in run.labels for run in resolved)
    # The wrong first guess on parse_* tasks is always util.py, and always a mistake.
    guesses = [
        r for r in runs if r.task.function.startswith("parse_") and r.commands[0] == "edit util.py"
    ]
    assert guesses
    assert all(r.labels[0] == "mistake" for r in guesses)
    # pytest is only ever run right after an edit.
    for run in runs:
        for position, command in enumerate(run.commands):
            if command == "pytest":
                assert run.commands[position - 1].startswith("edit ")


def _prompt(run_item: dict[str, object]) -> list[dict[str, object]]:
    (parsed,) = parse_upload(json.dumps(run_item).encode(), "auto")
    (request,) = trajectory_windows(
        parsed.messages, split_steps(parsed.messages), parsed.resolved, DEFAULT_LABELS, 128_000
    )
    return request.messages


def test_oracle_answers_true_labels_and_the_corrupted_one_its_precision_and_recall() -> None:
    runs = teacher_runs([make_task(0, n) for n in range(400)], seed=0)
    oracle = TrueLabels.of(runs)
    assert oracle.conflicts == 0
    unresolved = [run for run in runs if not run.resolved]
    model = corrupted_model(0.7, 0.6, 1)
    true_positive = false_positive = false_negative = 0
    for run in unresolved:
        messages = _prompt(run.item())
        prefix = rules.read_prefix(messages)
        exact = oracle("oracle", messages, prefix)
        assert exact is not None
        assert [v.label for v in exact] == run.labels
        noisy = oracle(model, messages, prefix)
        assert noisy is not None
        for truth, said in zip(run.labels, (v.label for v in noisy), strict=True):
            true_positive += truth == said == "mistake"
            false_positive += said == "mistake" != truth
            false_negative += truth == "mistake" != said
        assert oracle("rules", messages, prefix) is None
    precision = true_positive / (true_positive + false_positive)
    recall = true_positive / (true_positive + false_negative)
    assert precision == pytest.approx(0.7, abs=0.08)
    assert recall == pytest.approx(0.6, abs=0.08)


def test_habit_counts_find_each_habit_state() -> None:
    task = next(t for t in (make_task(0, n) for n in range(100)) if t.function.startswith("parse_"))
    counts = habit_counts(task, ["edit util.py", "submit"])
    assert counts.states == {"wrong_guess": 1, "pytest": 1, "premature_submit": 1, "give_up": 0}
    assert counts.repeats == {"wrong_guess": 1, "pytest": 0, "premature_submit": 1, "give_up": 0}
    clean = habit_counts(
        task, [f"grep {task.function}", f"edit {task.buggy_file}", "test", "submit"]
    )
    assert sum(clean.repeats.values()) == 0


def _run_recipe(tmp_path: Path, *args: str, timeout: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.recipe", "--out", str(tmp_path), *args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report: dict[str, object] = json.loads((tmp_path / "recipe.json").read_text())
    return report


@pytest.mark.slow
def test_quick_run_goes_through_the_service(tmp_path: Path) -> None:
    report = _run_recipe(tmp_path, "--quick", "--eval-tasks", "10", timeout=900)
    assert report["problems"] == []
    critics = report["critics"]
    assert isinstance(critics, dict)
    assert critics["oracle"]["f1"] == 1.0
    table = report["table"]
    assert isinstance(table, list)
    assert [(row["policy"], row["critic"]) for row in table] == [("sft", "-"), ("srft", "oracle")]
    sft, srft = table
    # The export masked the oracle's mistakes: fewer trained tokens than sft, same steps.
    assert srft["export_trained_tokens"] < sft["export_trained_tokens"]
    for row in table:
        assert row["rollouts"] == 10
        assert all(tokens > 0 for tokens in row["trained_tokens_per_seed"])
        assert row["habit_repeat"]["states"] >= 10  # every first step is a habit state


@pytest.mark.slow
def test_srft_student_repeats_the_masked_habits_less_than_sft(tmp_path: Path) -> None:
    """The mechanism, on the oracle critic at a small budget: the `srft` student, trained on the
    same steps with the oracle's mistakes masked, repeats the teachers' habits (in the states
    where they had them) less often than the `sft` student, by a margin that one seed's noise
    does not explain (one-sided two-proportion z of at least 2).

    `SRFT_RECIPE_SHIFT_MASKS=1` trains on the export's weights moved one assistant turn late
    (`--shift-masks`): a mask off by one turn, which this test must catch (README: Recipe check).
    """
    shifted = ("--shift-masks",) if os.environ.get("SRFT_RECIPE_SHIFT_MASKS") == "1" else ()
    report = _run_recipe(
        tmp_path,
        "--policies", "sft,srft", "--critics", "oracle", "--seeds", "1",
        "--train-runs", "800", "--steps", "400", "--eval-tasks", "100",
        *shifted,
        timeout=1200,
    )  # fmt: skip
    assert report["problems"] == []
    table = report["table"]
    assert isinstance(table, list)
    habits = {row["policy"]: row["habit_repeat"] for row in table}
    sft, srft = habits["sft"], habits["srft"]
    # The students act in the environment: each passed through habit states, and sft (which
    # trains on every habit) repeats some of them.
    assert sft["states"] >= 100, habits
    assert srft["states"] >= 100, habits
    assert sft["repeats"] > 0, habits
    z = _two_proportion_z(sft["repeats"], sft["states"], srft["repeats"], srft["states"])
    assert srft["rate"] < sft["rate"], habits
    assert z >= 2.0, (habits, z)


def _two_proportion_z(hits_a: int, total_a: int, hits_b: int, total_b: int) -> float:
    """z of the difference of two proportions (a minus b), with the pooled standard error."""
    pooled = (hits_a + hits_b) / (total_a + total_b)
    error = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    return (hits_a / total_a - hits_b / total_b) / error if error else 0.0
