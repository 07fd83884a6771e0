"""Label sets: the names a critic may answer with and what each one means.

Pure. The default set is docs/recipe.md's "Labels"; a job may bring its own, validated here so
a bad set is the caller's 422, never a worker's failure halfway through a job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.errors import SrftError

MIN_LABELS = 2
MAX_LABELS = 16
MAX_DEFINITION_CHARS = 2000
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class InvalidLabelSetError(SrftError):
    status_code = 422
    code = "invalid_labels"


@dataclass(frozen=True)
class LabelSet:
    """Ordered (name, definition) pairs. Order matters: prompts list labels in this order."""

    labels: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.labels)

    def definition(self, name: str) -> str:
        for label, definition in self.labels:
            if label == name:
                return definition
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def lookup(self, raw: str) -> str | None:
        """The label `raw` names, ignoring case and surrounding whitespace; else None."""
        wanted = raw.strip().lower()
        return wanted if wanted in self.names else None

    def to_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @classmethod
    def from_request(cls, obj: Any) -> LabelSet:
        """Validate a user-supplied `{"name": "definition", ...}` mapping.

        `None` means "not given" and yields the default set.
        """
        if obj is None:
            return DEFAULT_LABELS
        if not isinstance(obj, Mapping):
            raise InvalidLabelSetError(
                'labels must be an object {"name": "definition", ...}',
                location="critic.labels",
            )
        if not MIN_LABELS <= len(obj) <= MAX_LABELS:
            raise InvalidLabelSetError(
                f"a label set needs {MIN_LABELS} to {MAX_LABELS} labels, got {len(obj)}",
                location="critic.labels",
            )
        return cls(tuple(_checked_label(name, definition) for name, definition in obj.items()))


def _checked_label(name: Any, definition: Any) -> tuple[str, str]:
    where = f"critic.labels.{name}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidLabelSetError(
            f"label name {name!r} must match [a-z][a-z0-9_]{{0,31}} "
            "(lowercase letter first, then up to 31 lowercase letters, digits or _)",
            location=where,
        )
    if not isinstance(definition, str) or not definition.strip():
        raise InvalidLabelSetError(
            f"label {name!r} needs a non-empty definition (a string)", location=where
        )
    if len(definition) > MAX_DEFINITION_CHARS:
        raise InvalidLabelSetError(
            f"the definition of {name!r} has {len(definition)} characters; "
            f"at most {MAX_DEFINITION_CHARS} are allowed",
            location=where,
        )
    if "\x00" in definition:
        raise InvalidLabelSetError(
            f"the definition of {name!r} contains a NUL byte", location=where
        )
    return name, definition


# docs/recipe.md, "Labels". The critic's prompt, the rules critic, review and critic
# evaluation all read these, so a number means the same everywhere.
DEFAULT_LABELS = LabelSet(
    (
        (
            "good",
            "a reasonable step that moves the task forward given what the agent knew: "
            "exploring the repository, reading relevant code, reproducing the bug, a correct "
            "or plausible edit, running tests, a sound conclusion.",
        ),
        (
            "unnecessary",
            "harmless but not useful: redundant repeats, irrelevant exploration, re-reading "
            "what was already seen. Training on it teaches no error, only waste.",
        ),
        (
            "mistake",
            "wrong and not to be imitated: an incorrect or breaking edit, a malformed command "
            "caused by the agent, misreading an observation, a hallucinated or unjustified "
            "claim, a wrong submission, giving up when progress was possible.",
        ),
        (
            "recover",
            "a step whose main purpose is to notice and fix or undo an earlier mistake.",
        ),
    )
)
