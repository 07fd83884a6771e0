"""Which tokenizer names a request may give: a Hugging Face Hub id, or an absolute path inside a
directory the operator allows (SRFT_TOKENIZER_DIRS). Decided on the text alone, so a refusal
says the same whatever exists on the server. Exports (`app.exports.tokenize`, which loads them)
and jobs (a critic's tokenizer) check names here when the request arrives."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

# The Hub's own rule (huggingface_hub `validate_repo_id`): `name` or `namespace/name`, each 1-96
# of [A-Za-z0-9_.-], starting and ending with a letter, digit or '_'; no '--' or '..'; no
# trailing '.git'.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")
# A branch, tag or commit: parts of [A-Za-z0-9_.-] separated by '/' (`refs/pr/1`), none
# starting with '.' or '-', no '..'. Nothing that could climb out of the Hub cache's refs/.
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
MAX_REVISION_CHARS = 128
MAX_PATH_CHARS = 4096

INVALID_TOKENIZER = (
    "`tokenizer` must be a Hugging Face Hub id (`name` or `org/name`: letters, digits, '-', "
    "'_' and '.', at most 96 of them each) or an absolute path inside a directory this server "
    "allows for tokenizers (SRFT_TOKENIZER_DIRS)"
)
INVALID_REVISION = (
    f"`tokenizer_revision` must be a branch, tag or commit of the Hub repository: letters, "
    f"digits, '-', '_' and '.', parts separated by '/', at most {MAX_REVISION_CHARS} characters"
)


def is_hub_id(name: str) -> bool:
    """Whether `name` is shaped like a Hugging Face Hub repository id."""
    return (
        _HUB_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def revision_allowed(revision: str) -> bool:
    return (
        len(revision) <= MAX_REVISION_CHARS
        and _REVISION.fullmatch(revision) is not None
        and ".." not in revision
    )


def tokenizer_allowed(name: str, roots: Sequence[Path]) -> bool:
    """A Hub id, or an absolute path that lies, as written, inside one of `roots`.

    Decided on the text alone (no file is looked at), so the answer never depends on what
    exists. Loading checks again with symlinks resolved."""
    if is_hub_id(name):
        return True
    if not path_shaped(name):
        return False
    path = Path(os.path.normpath(name))
    return any(path.is_relative_to(root) for root in roots)


def roots_as_written(dirs: str) -> list[Path]:
    """`SRFT_TOKENIZER_DIRS` made absolute without resolving symlinks, so a path written under
    a configured directory is accepted as written (touches no file)."""
    return [
        Path(os.path.abspath(os.path.expanduser(part)))
        for part in dirs.split(os.pathsep)
        if part.strip()
    ]


def path_shaped(name: str) -> bool:
    """Absolute, bounded, no '..' part, no control characters or backslashes."""
    return (
        len(name) <= MAX_PATH_CHARS
        and os.path.isabs(name)
        and ".." not in name.split("/")
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    )


def request_allows(name: str, resolved_roots: Sequence[Path], dirs: str) -> bool:
    """Whether a request may name this tokenizer: `tokenizer_allowed` against the operator's
    directories both as resolved (`Settings.tokenizer_roots`) and as written (`dirs`)."""
    return tokenizer_allowed(name, [*resolved_roots, *roots_as_written(dirs)])
