"""The recipe check's teachers: scripted agents of different quality, and their runs as files.

Pure. Each teacher reads the observations it gets (closed loop) and has systematic,
state-dependent habits, as weak agents do, besides a little noise:

- **wrong first guess** (`wrong_guess`): the first move is an edit of the file the function's
  verb suggests (`GUESSES`: `parse_*` in util.py, `load_*`/`save_*` in io.py, `check_*` in
  core.py) without looking: always wrong for `parse_*` (the environment never puts one in
  util.py), mostly wrong otherwise, and the file may not even exist;
- **a command that always fails** (`pytest`): right after an edit, `pytest` (command not
  found), then `test`;
- **premature submit** (`premature_submit`): right after an edit, `submit` without testing
  (a failure when the edit was the wrong guess);
- **giving up** (`give_up`): after a failed test, `submit`.

Otherwise, after a failed test they look the function up and recover. Runs are written as canonical
OpenAI-style chat items (`messages`, `tools`, `resolved`, `task_id`, `metadata`), one JSON line
each, which `srft ingest` reads; the true labels are kept apart, keyed by the run's task id.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from bench.recipe_env import MAX_STEPS, SYSTEM_PROMPT, TOOL_NAME, Episode, Task, label_run


@dataclass(frozen=True)
class Teacher:
    name: str
    share: float  # of the teachers' runs
    wrong_guess: float
    pytest: float
    premature_submit: float
    give_up: float
    ls_first: float
    retest: float  # noise: test again after a pass


TEACHERS = (
    Teacher("careful", 0.2, wrong_guess=0.0, pytest=0.0, premature_submit=0.0, give_up=0.0,
            ls_first=0.2, retest=0.1),
    Teacher("hasty", 0.4, wrong_guess=0.8, pytest=0.1, premature_submit=0.5, give_up=0.5,
            ls_first=0.0, retest=0.0),
    Teacher("sloppy", 0.4, wrong_guess=0.4, pytest=0.8, premature_submit=0.4, give_up=0.5,
            ls_first=0.4, retest=0.3),
)  # fmt: skip
# The wrong first guess: the file a function's verb suggests.
GUESSES = {"parse": "util.py", "load": "io.py", "save": "io.py", "check": "core.py"}


def guessed_edit(task: Task) -> str:
    """The edit the wrong-first-guess habit makes on `task`."""
    return f"edit {GUESSES[task.function.split('_', 1)[0]]}"


def pick_teacher(rng: random.Random) -> Teacher:
    return rng.choices(TEACHERS, [t.share for t in TEACHERS])[0]


def teacher_commands(teacher: Teacher, task: Task, rng: random.Random) -> list[str]:
    """Play `task` as `teacher` would; the commands in order."""
    episode = Episode(task)
    located: str | None = None
    last = ""
    for _ in range(MAX_STEPS):
        command = _next_command(teacher, task, episode, located, last, rng)
        observation = episode.step(command)
        if command.startswith("grep ") and ": def " in observation:
            located = observation.split(":", 1)[0]
        last = command
        if episode.done:
            break
    return [command for command, _ in episode.history]


def _next_command(
    teacher: Teacher,
    task: Task,
    episode: Episode,
    located: str | None,
    last: str,
    rng: random.Random,
) -> str:
    history = episode.history
    if not history and rng.random() < teacher.ls_first:
        return "ls"
    edits = [c for c, _ in history if c.startswith("edit ")]
    if not edits and located is None and rng.random() < teacher.wrong_guess:
        return guessed_edit(task)
    if last.startswith("edit "):
        if rng.random() < teacher.premature_submit:
            return "submit"
        if rng.random() < teacher.pytest:
            return "pytest"
        return "test"
    if last == "pytest":
        return "test"
    last_observation = history[-1][1] if history else ""
    if last == "test" and last_observation == "PASS":
        return "test" if rng.random() < teacher.retest else "submit"
    if last == "test" and rng.random() < teacher.give_up:
        return "submit"
    if located is None:
        return f"grep {task.function}"
    if not episode.fixed:
        return f"edit {located}"
    return "submit"


def run_item(task: Task, commands: list[str], resolved: bool, teacher: str) -> dict[str, Any]:
    """A run as a canonical chat item that `srft ingest` stores."""
    episode = Episode(task)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task.prompt},
    ]
    for number, command in enumerate(commands):
        call_id = f"call_{number}"
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": TOOL_NAME,
                            "arguments": json.dumps({"command": command}),
                        },
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": episode.step(command)})
    return {
        "messages": messages,
        # No `tools`: the system prompt names the commands, and a declared tool would add its
        # schema to every rendered row, a third of its tokens, for a tiny model to read.
        "resolved": resolved,
        "task_id": task.task_id,
        "metadata": {"teacher": teacher},
    }


@dataclass(frozen=True)
class TeacherRun:
    task: Task
    teacher: str
    commands: list[str]
    labels: list[str]
    resolved: bool

    def item(self) -> dict[str, Any]:
        return run_item(self.task, self.commands, self.resolved, self.teacher)


def teacher_runs(tasks: list[Task], seed: int) -> list[TeacherRun]:
    """One run per task by a teacher drawn from the population."""
    rng = random.Random(f"recipe-teachers:{seed}")
    runs: list[TeacherRun] = []
    for task in tasks:
        teacher = pick_teacher(rng)
        commands = teacher_commands(teacher, task, rng)
        labels, resolved = label_run(task, commands)
        runs.append(TeacherRun(task, teacher.name, commands, labels, resolved))
    return runs


def write_runs(runs: list[TeacherRun], path: Any) -> None:
    """The runs as JSON Lines (the file `srft ingest` reads)."""
    with open(path, "w", encoding="utf-8") as handle:
        for run in runs:
            handle.write(json.dumps(run.item()) + "\n")
