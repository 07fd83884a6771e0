"""The recipe check's environment: a tiny repository with one planted bug, fixed through tools.

Pure and deterministic: a task is generated from (seed, number); an episode applies commands and
returns observations. The right edit depends on what an earlier `grep` (or `cat`) showed, so
the task cannot be solved open-loop. The environment also knows the true label of every step
(`label_step`), which never appears in the trajectory text.

Commands: `ls`, `grep NAME`, `cat FILE`, `edit FILE`, `test`, `submit`; anything else is
"command not found". The task is solved when `submit` comes after an `edit` of the file that
defines the broken function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

VERBS = ("parse", "load", "save", "check")
STEMS = ("date", "user", "path", "config", "token", "price")
FILES = ("core.py", "io.py", "api.py", "db.py", "cli.py")
# Every repository has util.py; the environment never puts a `parse_*` function there (the
# teachers' wrong first guess relies on this being a recognisable, always-wrong guess).
UTIL = "util.py"
SYSTEM_PROMPT = "You fix bugs. Tools: ls, grep NAME, cat FILE, edit FILE, test, submit."
TOOL_NAME = "bash"
MAX_STEPS = 10  # the students' bound; teachers stop by themselves well before it

GOOD, UNNECESSARY, MISTAKE, RECOVER = "good", "unnecessary", "mistake", "recover"


@dataclass(frozen=True)
class Task:
    task_id: str
    function: str  # the broken function
    files: tuple[str, ...]  # as `ls` lists them
    contents: tuple[tuple[str, tuple[str, ...]], ...]  # (file, functions defined), per file
    buggy_file: str

    @property
    def prompt(self) -> str:
        # Only the function. A task number here gave every run a text of its own, and the
        # students spent their few hundred steps on it (held-out tasks reuse the numbers)
        # instead of reading the name. Runs of different tasks may now read the same; srft
        # stores such a text once, as it would any repeated run.
        return f"Fix the bug in {self.function}."

    @property
    def key(self) -> tuple[str, tuple[str, ...], str]:
        """What makes two tasks the same problem (held-out tasks avoid the training keys)."""
        return (self.function, self.files, self.buggy_file)

    def functions_in(self, name: str) -> tuple[str, ...] | None:
        for file, functions in self.contents:
            if file == name:
                return functions
        return None


def make_task(seed: int, number: int) -> Task:
    """Task `number` of the stream of `seed`: util.py plus three other files, four to six
    functions spread over them, one of them broken."""
    rng = random.Random(f"recipe-task:{seed}:{number}")
    names = [f"{verb}_{stem}" for verb in VERBS for stem in STEMS]
    others = rng.sample(FILES, 3)
    files = tuple(sorted([UTIL, *others]))
    function = rng.choice(names)
    candidates = list(others) if function.startswith("parse_") else list(files)
    buggy_file = rng.choice(candidates)
    decoys = rng.sample([n for n in names if n != function and not n.startswith("parse_")], 4)
    placed: dict[str, list[str]] = {file: [] for file in files}
    placed[buggy_file].append(function)
    for decoy in decoys:
        placed[rng.choice(files)].append(decoy)
    contents = tuple((file, tuple(sorted(placed[file]))) for file in files)
    return Task(f"recipe-{seed}-{number}", function, files, contents, buggy_file)


@dataclass
class Episode:
    """One attempt at a task: the commands so far, their observations, and the state."""

    task: Task
    history: list[tuple[str, str]] = field(default_factory=list)
    fixed: bool = False
    submitted: bool = False

    @property
    def success(self) -> bool:
        return self.submitted and self.fixed

    @property
    def done(self) -> bool:
        return self.submitted

    def step(self, command: str) -> str:
        """Apply `command`; its observation."""
        if self.submitted:
            raise RuntimeError("the episode is over")
        observation = observe(self.task, command.strip(), self)
        self.history.append((command.strip(), observation))
        return observation


def observe(task: Task, command: str, episode: Episode) -> str:
    words = command.split()
    verb, argument = (words[0], " ".join(words[1:])) if words else ("", "")
    if verb == "ls" and not argument:
        return " ".join(task.files)
    if verb == "grep" and argument:
        hits = [file for file, functions in task.contents if argument in functions]
        return "\n".join(f"{file}: def {argument}" for file in hits) or "no match"
    if verb in ("cat", "edit") and argument:
        functions = task.functions_in(argument)
        if functions is None:
            return f"{verb}: {argument}: no such file (exit code 1)"
        if verb == "cat":
            return "\n".join(f"def {name}" for name in functions) or "(empty file)"
        if argument == task.buggy_file:
            episode.fixed = True
        return f"edited {argument}"
    if verb == "test" and not argument:
        return "PASS" if episode.fixed else f"FAIL {task.function}"
    if verb == "submit" and not argument:
        episode.submitted = True
        return "submitted"
    return f"bash: {verb or command}: command not found"


# ------------------------------------------------------------------------ true labels


@dataclass
class Knowledge:
    """What the agent has been shown so far: enough to judge each next step."""

    located: bool = False  # a grep or cat has shown where the broken function is
    tested_since_edit: bool = False
    edited: bool = False
    fixed: bool = False
    seen_cats: set[str] = field(default_factory=set)


def label_run(task: Task, commands: list[str]) -> tuple[list[str], bool]:
    """The true label of every step of a run of `commands`, and whether it resolved the task.

    - `mistake`: a command that fails (not found, no such file), an edit of a file that does
      not define the broken function, a submit before the bug is fixed;
    - `unnecessary`: a step that shows nothing new: `ls`, a grep or cat after the location is
      known, a cat repeated, a test run again with no edit since, a test before any edit;
    - `recover`: the first step after a mistake that is neither;
    - `good`: the rest (finding the location, the right edit, testing it, submitting a fix).
    """
    episode = Episode(task)
    knowledge = Knowledge()
    labels: list[str] = []
    for command in commands:
        label = _judge(task, command, knowledge, episode)
        if label not in (MISTAKE, UNNECESSARY) and labels and labels[-1] == MISTAKE:
            label = RECOVER
        labels.append(label)
        episode.step(command)
        if episode.done:
            break
    return labels, episode.success


def _judge(task: Task, command: str, knowledge: Knowledge, episode: Episode) -> str:
    words = command.split()
    verb, argument = (words[0], " ".join(words[1:])) if words else ("", "")
    probe = Episode(task, fixed=episode.fixed)
    observation = observe(task, command, probe)
    if "command not found" in observation or "no such file" in observation:
        return MISTAKE
    if verb == "ls":
        return UNNECESSARY
    if verb == "grep":
        if knowledge.located:
            return UNNECESSARY
        knowledge.located = argument == task.function
        return GOOD if knowledge.located else UNNECESSARY
    if verb == "cat":
        repeated = argument in knowledge.seen_cats
        knowledge.seen_cats.add(argument)
        if knowledge.located or repeated:
            return UNNECESSARY
        knowledge.located = argument == task.buggy_file
        return GOOD
    if verb == "edit":
        knowledge.edited = True
        knowledge.tested_since_edit = False
        if argument != task.buggy_file:
            return MISTAKE
        knowledge.fixed = True
        return GOOD if not episode.fixed else UNNECESSARY
    if verb == "test":
        if not knowledge.edited or knowledge.tested_since_edit:
            return UNNECESSARY
        knowledge.tested_since_edit = True
        return GOOD
    if verb == "submit":
        return GOOD if episode.fixed else MISTAKE
    return MISTAKE
