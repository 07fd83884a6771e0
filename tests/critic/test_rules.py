"""The rules critic's logic: failure signals, each rule, precedence, reading prompts back."""

from __future__ import annotations

from collections import Counter
from functools import cache

import pytest

from app.critic import prompt, rules
from app.critic.labels import DEFAULT_LABELS, LabelSet
from app.critic.prompt import StepText
from app.critic.rules import Outcome
from app.recipe.steps import Step, split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.formats.base import Trajectory
from tests.helpers import all_trajectory_files, trajectory_file

NAMES = DEFAULT_LABELS.names


@cache
def real(relative: str) -> list[tuple[Trajectory, list[Step]]]:
    runs = parse_upload(trajectory_file(relative).read_bytes())
    return [(t, split_steps(t.messages)) for t in runs]


def step(index: int, action: str | None, observation: str | None = "ok") -> StepText:
    return StepText(index, f"thinking about {index}", action, observation)


def outcomes(*steps: StepText) -> list[Outcome]:
    return [v.outcome for v in rules.judge_steps(steps, NAMES)]


# ---------------------------------------------------------------------------- failure signals


@pytest.mark.parametrize(
    ("observation", "signal"),
    [
        ("<returncode>1</returncode>\n<output>\n</output>", "exit code 1"),
        ("<returncode>-9</returncode>", "exit code -9"),
        ("ls: x\n[The command completed with exit code 2.]", "exit code 2"),
        ("out\n[Command finished with exit code 127]", "exit code 127"),
        ("make: *** Error\nexit status 3", "exit code 3"),
        ("Exit code: 1", "exit code 1"),
        ("exit code 0\nexit code 4", "exit code 4"),
        (
            'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no',
            "a Python traceback",
        ),
        ('  File "x.py", line 3\n    def f(:\nSyntaxError: invalid syntax', "a syntax error"),
        ("IndentationError: unexpected indent", "a syntax error"),
        ("bash: -c: line 1: syntax error near unexpected token `)'", "a syntax error"),
        (
            "Your proposed edit has introduced new syntax error(s). Please read this error "
            "message carefully",
            "a rejected edit",
        ),
        ("Your changes have NOT been applied. Please fix your edit command", "a rejected edit"),
        ("ERROR:\nNo replacement was performed, old_str `x` did not appear", "a rejected edit"),
        ("The edit was not applied.", "a rejected edit"),
        ("/bin/bash: line 4: javac: command not found", "'command not found'"),
    ],
)
def test_failing_observations_are_recognised(observation: str, signal: str) -> None:
    assert rules.failure_signal(observation) == signal


@pytest.mark.parametrize(
    "observation",
    [
        None,
        "",
        "<returncode>0</returncode>\n<output>\nall fine\n</output>",
        "[The command completed with exit code 0.]",
        "    raise SyntaxError(msg)",  # reading source code is not a failure
        "the program sets a nonzero exit status on failure",
        "File created successfully at: /testbed/x.py",
    ],
)
def test_succeeding_observations_are_not_failures(observation: str | None) -> None:
    assert rules.failure_signal(observation) is None


# ---------------------------------------------------------------------------- each rule


def test_each_rule_gives_its_label_and_names_itself() -> None:
    verdicts = rules.judge_steps(
        [
            step(0, "ls"),
            step(1, "python x.py", "<returncode>1</returncode>"),
            step(2, "vim x.py"),
            step(3, "ls"),
        ],
        NAMES,
    )
    assert [(v.index, v.label) for v in verdicts] == [
        (0, "good"),
        (1, "mistake"),
        (2, "recover"),
        (3, "unnecessary"),
    ]
    assert verdicts[0].reason == "Default rule: no failure, exact repeat or recovery was found."
    assert verdicts[1].reason == "Failing-observation rule: the output shows exit code 1."
    assert verdicts[2].reason == (
        "Recovery rule: the step succeeds right after the mistake in step 1."
    )
    assert verdicts[3].reason == "Exact-repeat rule: the action repeats step 0 exactly."


def test_a_failing_repeat_is_a_mistake() -> None:
    failing = "<returncode>2</returncode>"
    assert outcomes(step(0, "make", failing), step(1, "make", failing)) == [
        Outcome.MISTAKE,
        Outcome.MISTAKE,
    ]


def test_a_repeat_right_after_a_mistake_is_unnecessary_not_recover() -> None:
    assert outcomes(
        step(0, "ls"), step(1, "cat y", "cat: y: No such file\nexit code 1"), step(2, "ls")
    ) == [Outcome.GOOD, Outcome.MISTAKE, Outcome.UNNECESSARY]


def test_a_failure_after_a_mistake_is_another_mistake() -> None:
    failing = "Traceback (most recent call last):"
    assert outcomes(step(0, "a", failing), step(1, "b", failing), step(2, "c")) == [
        Outcome.MISTAKE,
        Outcome.MISTAKE,
        Outcome.RECOVER,
    ]


def test_recovery_only_directly_after_the_mistake() -> None:
    assert outcomes(step(0, "a", "exit code 1"), step(1, "b"), step(2, "c"), step(3, "d")) == [
        Outcome.MISTAKE,
        Outcome.RECOVER,
        Outcome.GOOD,
        Outcome.GOOD,
    ]


def test_repeats_compare_stripped_actions_and_ignore_missing_ones() -> None:
    assert outcomes(
        step(0, None, None), step(1, None, None), step(2, " ls\n"), step(3, "ls"), step(4, "ls -a")
    ) == [Outcome.GOOD, Outcome.GOOD, Outcome.GOOD, Outcome.UNNECESSARY, Outcome.GOOD]


def test_a_repeat_names_the_first_step_that_did_it() -> None:
    verdicts = rules.judge_steps([step(5, "ls"), step(6, "ls"), step(7, "ls")], NAMES)
    assert verdicts[2].reason == "Exact-repeat rule: the action repeats step 5 exactly."


def test_custom_label_sets_get_matching_names_or_the_first_label() -> None:
    steps = [step(0, "a"), step(1, "b", "exit code 1"), step(2, "c"), step(3, "a")]
    matching = rules.judge_steps(steps, ("mistake", "good"))
    assert [v.label for v in matching] == ["good", "mistake", "mistake", "mistake"]
    assert [v.outcome for v in matching] == [
        Outcome.GOOD,
        Outcome.MISTAKE,
        Outcome.RECOVER,
        Outcome.UNNECESSARY,
    ]
    other = rules.judge_steps(steps, ("keep", "drop"))
    assert {v.label for v in other} == {"keep"}


# ---------------------------------------------------------------------------- reading prompts


def test_parse_prompt_reads_back_a_trajectory_request() -> None:
    ((trajectory, steps),) = real("swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj")
    labels = LabelSet.from_request({"keep": "a useful step", "skip": "anything else"})
    (request,) = prompt.trajectory_windows(trajectory.messages, steps, None, labels, 128_000)
    parsed = rules.parse_prompt(request.messages)
    assert parsed.mode == "trajectory"
    assert parsed.label_names == ("keep", "skip")
    assert parsed.asked_index is None
    assert parsed.target_indices == tuple(range(len(steps)))
    expected = [
        StepText(
            t.index,
            prompt.neutralise(t.thought),
            None if t.action is None else prompt.neutralise(t.action),
            None if t.observation is None else prompt.neutralise(t.observation),
        )
        for t in prompt.step_texts(trajectory.messages, steps)
    ]
    assert list(parsed.steps) == expected


def test_parse_prompt_reads_back_a_step_request_and_its_reask() -> None:
    ((trajectory, steps),) = real(
        "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json"
    )
    request = prompt.step_request(trajectory.messages, steps, 4, True, DEFAULT_LABELS, 128_000)
    parsed = rules.parse_prompt(request.messages)
    assert (parsed.mode, parsed.asked_index, parsed.target_indices) == ("step", 4, (4,))
    assert parsed.label_names == NAMES
    assert len(parsed.steps) == len(steps)
    bad = '<question step="9">\n{"index": 9}'
    again = prompt.reask_messages(request, bad, "step 9 was not asked for")
    assert rules.parse_prompt(again) == parsed


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Labels:\n- good: fine"},
            {
                "role": "user",
                "content": '<task>\nx\n</task>\n<trajectory steps="1">\n<step index="0">',
            },
        ],
        [
            {"role": "system", "content": "Labels:\n- good: fine"},
            {
                "role": "user",
                "content": '<task>\nx\n</task>\n<trajectory steps="0">\n</trajectory>',
            },
            {"role": "user", "content": "Which step is best?"},
        ],
    ],
)
def test_other_prompts_are_rejected(messages: list[dict[str, str]]) -> None:
    with pytest.raises(rules.PromptFormatError):
        rules.answer_prompt(rules.parse_prompt(messages))


def test_the_rules_through_a_prompt_equal_the_rules_on_the_trajectory() -> None:
    """Every real run: judging what one unshortened prompt shows gives the prescribed labels."""
    checked = 0
    for path in all_trajectory_files():
        for trajectory, steps in real(str(path.relative_to(trajectory_file("")))):
            (request,) = prompt.trajectory_windows(
                trajectory.messages, steps, trajectory.resolved, DEFAULT_LABELS, 10**7
            )
            assert request.observation_cap is None
            via_prompt = rules.answer_prompt(rules.parse_prompt(request.messages))
            assert via_prompt == rules.label_trajectory(trajectory.messages, steps, DEFAULT_LABELS)
            checked += len(steps)
    assert checked == 864  # every step of every real run (27 runs)


def test_real_runs_get_the_labels_their_outputs_call_for() -> None:
    ((gym, gym_steps), *_) = real("openai-messages/adp__swe-gym-openhands__sample_raw@68dc74c.json")
    labels = [v.label for v in rules.label_trajectory(gym.messages, gym_steps, DEFAULT_LABELS)]
    # The agent viewed the same directory six times.
    assert labels == ["good"] + ["unnecessary"] * 5
    ponyc = real(
        "openhands/openhands-v0__multi-swe-bench-example__llama-4-maverick__ponyc.output.jsonl"
    )
    verdicts = [
        v
        for trajectory, steps in ponyc
        for v in rules.label_trajectory(trajectory.messages, steps, DEFAULT_LABELS)
    ]
    reasons = Counter(v.reason for v in verdicts if v.outcome is Outcome.MISTAKE)
    assert reasons["Failing-observation rule: the output shows exit code 2."] > 0
    assert all(
        verdicts[i + 1].outcome in (Outcome.MISTAKE, Outcome.RECOVER, Outcome.UNNECESSARY)
        for i in range(len(verdicts) - 1)
        if verdicts[i].outcome is Outcome.MISTAKE and verdicts[i + 1].index == verdicts[i].index + 1
    )


@pytest.mark.parametrize(
    ("observation", "signal"),
    [
        ("<returncode>" + "9" * 5000 + "</returncode>", "exit code " + "9" * 20),
        ("exit code -" + "1" * 5000, "exit code -" + "1" * 19),
    ],
)
def test_exit_codes_of_any_length_are_read(observation: str, signal: str) -> None:
    # int() refuses more than 4,300 digits; a failure is still a failure.
    assert rules.failure_signal(observation) == signal
    assert rules.failure_signal("<returncode>" + "0" * 5000 + "</returncode>") is None
