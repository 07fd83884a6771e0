"""The export formats, registered once: what each one is and what it takes.

An `ExportFormat` says how its rows are built from a trajectory and its policy decision (and
so which shard files it writes, with what suffix and media type), what it takes of a request
(a tokenizer, `max_seq_len`, soft weights) and how the trainer reads it. The builder, the
API's checks, the download media types, the CLI's help and the trainer all read `FORMATS`, so
a new format is a row function (in `rows.py`, or a module of its own) and one entry below.
Pure: no database, HTTP, torch or pyarrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from app.exports import rows
from app.exports.rows import Source
from app.exports.tokenize import Example
from app.exports.writers.shards import JSONL, PARQUET, ShardFiles
from app.recipe.masking import TrajectoryDecision

RowBuilder = Callable[[Source, TrajectoryDecision], dict[str, Any] | None]


class TokenizerUse(Enum):
    """What a format does with a request's `tokenizer`, and so with its `max_seq_len`."""

    NONE = "none"  # rows are text, tokenized by the trainer: neither is taken
    MEASURES = "measures"  # optional: measures rows against max_seq_len, so both or neither
    RENDERS = "renders"  # required: renders rows into tokens; max_seq_len optional


class TrainerReads(Enum):
    """How `app.training.data` reads a format's shards."""

    TOKEN_ROWS = "token_rows"  # the Parquet token rows, used as written
    MESSAGES = "messages"  # rows of messages, tokenized with the exporter's span code


@dataclass(frozen=True)
class TextRows:
    """One JSON object per row, from a pure row function; None: nothing trained, dropped."""

    files: ClassVar[ShardFiles] = JSONL
    build: RowBuilder


@dataclass(frozen=True)
class MessageRows:
    """`{"messages", "tools"}` rows with a 0/1 `weight` on assistant messages. A tokenizer, if
    given, measures them against `max_seq_len` (splits, drops or cuts at a step boundary).
    `fine_tune`: fitted to the fine-tuning format and checked against it (`finetune.py`)."""

    files: ClassVar[ShardFiles] = JSONL
    build: RowBuilder
    fine_tune: bool = False


@dataclass(frozen=True)
class TokenRows:
    """Conversations rendered with the tokenizer's chat template into token rows (ids, labels,
    weights), in the tokenizing processes."""

    files: ClassVar[ShardFiles] = PARQUET
    example: Callable[[Source, TrajectoryDecision], Example]


RowKind = TextRows | MessageRows | TokenRows


@dataclass(frozen=True)
class ExportFormat:
    name: str
    rows: RowKind
    tokenizer: TokenizerUse
    soft_weights: bool  # rows carry float loss weights (else 0/1)
    trainer: TrainerReads | None  # None: the trainer cannot read it
    label: str = ""  # what the CLI's help says of it, if anything

    def __post_init__(self) -> None:
        # Combinations no builder path or reader handles are refused when registered.
        tokens = isinstance(self.rows, TokenRows)
        if tokens != (self.tokenizer is TokenizerUse.RENDERS):
            raise ValueError(f"{self.name}: token rows, and only they, need a tokenizer")
        if self.tokenizer is TokenizerUse.MEASURES and not isinstance(self.rows, MessageRows):
            raise ValueError(f"{self.name}: a tokenizer measures only rows of messages")
        if self.soft_weights and not tokens:
            raise ValueError(f"{self.name}: only token rows carry float weights")
        readable = {TrainerReads.TOKEN_ROWS: TokenRows, TrainerReads.MESSAGES: MessageRows}
        if self.trainer is not None and not isinstance(self.rows, readable[self.trainer]):
            raise ValueError(f"{self.name}: the trainer cannot read these rows that way")

    @property
    def files(self) -> ShardFiles:
        return self.rows.files


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(
        "openai_jsonl",
        MessageRows(rows.openai_row, fine_tune=True),
        TokenizerUse.MEASURES,
        soft_weights=False,
        trainer=TrainerReads.MESSAGES,
        label="fine-tuning format",
    ),
    ExportFormat(
        "openai_jsonl_raw",
        MessageRows(rows.openai_row),
        TokenizerUse.MEASURES,
        soft_weights=False,
        trainer=TrainerReads.MESSAGES,
        label="canonical messages",
    ),
    ExportFormat(
        "tokenized_parquet",
        TokenRows(rows.example),
        TokenizerUse.RENDERS,
        soft_weights=True,
        trainer=TrainerReads.TOKEN_ROWS,
    ),
    ExportFormat(
        "prm_jsonl",
        TextRows(rows.prm_row),
        TokenizerUse.NONE,
        soft_weights=False,
        trainer=None,
    ),
)
NAMES: tuple[str, ...] = tuple(f.name for f in FORMATS)
_BY_NAME = {f.name: f for f in FORMATS}
if len(_BY_NAME) != len(FORMATS):
    raise ValueError("two export formats are registered under one name")


class UnknownExportFormatError(LookupError):
    def __init__(self, name: object) -> None:
        super().__init__(f"unknown export format {name!r}; registered formats: {or_list(NAMES)}")
        self.name = name


def get_format(name: object) -> ExportFormat:
    """The registered format `name`; UnknownExportFormatError for anything else."""
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        raise UnknownExportFormatError(name)
    return found


def or_list(items: Sequence[str]) -> str:
    """`a`, `a or b`, `a, b or c`: for messages and help text."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} or {items[-1]}"
