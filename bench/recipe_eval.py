"""The recipe check's evaluation: held-out tasks, students rolled out in the environment, and the
mechanism metric.

- **Held-out tasks**: tasks of another seed's stream whose problem (function, files, buggy
  file) no training task has.
- **Rollouts**: the student writes each step with the same chat template and tokenizer it was
  trained on (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`), sampled at
  `TEMPERATURE` with a seeded generator, at most `STEP_TOKENS` tokens a step and `MAX_STEPS`
  steps; the command is read from its tool call (an answer without one is run as the raw text,
  which the environment answers "command not found"). All tasks are rolled out together, one
  batch per step (left padding).
- **Mechanism metric**: in each state where the teachers had a mistake habit, how often the
  student does the same: `wrong_guess` (first step: the edit the function's verb suggests),
  `pytest` (right after an edit), `premature_submit` (right after an edit that did not fix the
  bug), `give_up` (right after a failed test: submit). The repeat rate is repeats over the
  times the student was in such a state, all habits pooled; per habit too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.recipe_env import MAX_STEPS, SYSTEM_PROMPT, TOOL_NAME, Episode, Task, make_task
from bench.recipe_teachers import guessed_edit

TEMPERATURE = 0.7
STEP_TOKENS = 40
HABITS = ("wrong_guess", "pytest", "premature_submit", "give_up")
_CALL = re.compile(r'"arguments":\s*(\{.*?\})\s*\}', re.DOTALL)


def held_out_tasks(seed: int, count: int, training: Iterable[Task]) -> list[Task]:
    """`count` tasks of stream `seed` whose problem no training task has."""
    seen = {task.key for task in training}
    tasks: list[Task] = []
    number = 0
    while len(tasks) < count:
        task = make_task(seed, number)
        number += 1
        if task.key not in seen:
            seen.add(task.key)
            tasks.append(task)
    return tasks


@dataclass
class HabitCounts:
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HABITS, 0))
    repeats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HABITS, 0))

    def add(self, other: HabitCounts) -> None:
        for habit in HABITS:
            self.states[habit] += other.states[habit]
            self.repeats[habit] += other.repeats[habit]

    @property
    def rate(self) -> float:
        states = sum(self.states.values())
        return sum(self.repeats.values()) / states if states else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "states": sum(self.states.values()),
            "repeats": sum(self.repeats.values()),
            "by_habit": {
                habit: {"states": self.states[habit], "repeats": self.repeats[habit]}
                for habit in HABITS
            },
        }


def habit_counts(task: Task, commands: list[str]) -> HabitCounts:
    """The habit states a run of `commands` passed through, and where it repeated the habit."""
    counts = HabitCounts()
    episode = Episode(task)
    previous: tuple[str, str] | None = None
    for position, command in enumerate(commands):
        states: list[tuple[str, bool]] = []
        if position == 0:
            states.append(("wrong_guess", command == guessed_edit(task)))
        if previous is not None and previous[0].startswith("edit "):
            states.append(("pytest", command == "pytest"))
            if not episode.fixed:
                states.append(("premature_submit", command == "submit"))
        if previous is not None and previous[0] == "test" and previous[1].startswith("FAIL"):
            states.append(("give_up", command == "submit"))
        for habit, repeated in states:
            counts.states[habit] += 1
            counts.repeats[habit] += int(repeated)
        previous = (command, episode.step(command))
        if episode.done:
            break
    return counts


def command_of(answer: str) -> str:
    """The command of a student's answer: its tool call's, else the raw text."""
    match = _CALL.search(answer)
    if match is not None:
        try:
            command = json.loads(match.group(1)).get("command")
        except (json.JSONDecodeError, AttributeError):
            command = None
        if isinstance(command, str) and command.strip():
            return command.strip()
    return answer.strip().replace("\n", " ")[:80] or "(nothing)"


def assistant_turn(command: str, number: int) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": f"call_{number}",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": json.dumps({"command": command})},
            }
        ],
    }


@dataclass
class Rollout:
    task: Task
    commands: list[str]
    success: bool


def rollout(model: Any, tokenizer: Any, tasks: list[Task], seed: int) -> list[Rollout]:
    """Every task played by the student, all together, one batched generation per step."""
    import torch

    generator_seed = seed
    torch.manual_seed(generator_seed)
    episodes = [Episode(task) for task in tasks]
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.prompt}]
        for task in tasks
    ]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    tokenizer.padding_side = "left"
    model.eval()
    for number in range(MAX_STEPS):
        live = [n for n, episode in enumerate(episodes) if not episode.done]
        if not live:
            break
        prompts = [
            tokenizer.apply_chat_template(
                conversations[n], tokenize=False, add_generation_prompt=True
            )
            for n in live
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=STEP_TOKENS,
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                top_p=1.0,
                eos_token_id=end_id,
                pad_token_id=pad_id,
            )
        new = output[:, batch["input_ids"].shape[1] :]
        for row, n in enumerate(live):
            answer = tokenizer.decode(new[row], skip_special_tokens=False).split("<|im_end|>")[0]
            command = command_of(answer)
            observation = episodes[n].step(command)
            conversations[n].append(assistant_turn(command, number))
            conversations[n].append(
                {"role": "tool", "tool_call_id": f"call_{number}", "content": observation}
            )
    return [
        Rollout(episode.task, [c for c, _ in episode.history], episode.success)
        for episode in episodes
    ]


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def seed_interval(rates: list[float]) -> tuple[float, float]:
    """The 95% t interval of the mean of per-seed rates (clipped to [0, 1]): the spread between
    training seeds, which the pooled rollouts' Wilson interval does not see."""
    if len(rates) < 2:
        return (0.0, 1.0)
    mean = sum(rates) / len(rates)
    variance = sum((rate - mean) ** 2 for rate in rates) / (len(rates) - 1)
    quantile = _T95[len(rates) - 2] if len(rates) - 1 <= len(_T95) else 1.96
    half = quantile * math.sqrt(variance / len(rates))
    return (max(0.0, mean - half), min(1.0, mean + half))


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if total == 0:
        return (0.0, 1.0)
    share = successes / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))
