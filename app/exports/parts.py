"""An export built by many workers, in parts: the plan, and what a part hands the final task.

How it runs. The task that takes a queued export (`builder.build_export`) streams its
trajectory ids in the export's order and cuts them into parts of
`SRFT_EXPORT_PART_TRAJECTORIES` consecutive trajectories (`plan_parts`), stored as
`export_parts` rows (index, position of the first trajectory, count, first and last id). Each
part is a task any worker may run (`builder.build_part`): it claims its row like an export
(claim token, heartbeat), reads its trajectories (by keyset, between its first and last id),
applies the policy, tokenizes, and writes its rows under the export's building folder on the
shared export storage, plus `part.json` (`PartResult`: its counts, the outliers it dropped,
its files with sizes, sha256 and rows). The last part to finish queues the final task
(`builder.finish_export`), which checks that every part's result is there and matches its
files, adds the counts up, writes the shards and the manifest and publishes, as a one-task
build did. A part whose worker died goes back to the queue by the sweeper; only that part is
built again. An export of one part (the default part size covers small exports) is built
whole by the task that planned it, as before.

Why parts write rows, not shards (the decision). The shards must be byte-identical to a
one-worker build whatever the part size. Where a shard ends depends on everything before it:
a JSON Lines shard closes at `shard_max_rows` rows or before the line that would take it past
`shard_max_bytes`, a Parquet shard once its file (compressed row groups, themselves cut by the
pending rows and tokens) reaches `shard_max_bytes`; a trajectory gives zero, one or several
rows (dropped, split). So no trajectory count maps to whole shards, and a part cannot know
where the shards before it ended. Renumbering part shards would change the bytes. Instead a
part writes its rows exactly as the shard writer takes them: JSON Lines rows as the very lines
the shards will hold (`rows.jsonl`), tokenized rows as an Arrow file of (trajectory id, part,
input ids, weights) in full precision (`rows.arrow`). The final task replays the parts' rows,
in part order, through the same shard writer a one-worker build uses, so the shards, their
numbering and the manifest are the same by construction. The expensive work (reading,
rendering, tokenizing, fitting) is spread over the workers; the final task only copies lines
or re-encodes Parquet, streaming, in memory that does not grow with the export.

Seeded exports (`seed`) are shuffled as a whole, as before: each part of one reads the whole
id list, shuffles it and takes its slice (its memory grows with the id list, as a one-worker
build's did). Unseeded ones never hold more than a batch of ids.

Pure: no database, queue or files.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.exports.finetune import ProfileCounts
from app.exports.tokenize import PREFIX_TOO_LONG, Tokenized
from app.recipe.masking import PolicyCounts
from app.recipe.render import SpanStats

# Rows dropped because of what one trajectory is, not because the request asked for it.
OUTLIER_REASONS = frozenset({PREFIX_TOO_LONG})
MAX_LISTED_OUTLIERS = 10_000
RESULT = "part.json"
# Bumped when what a part writes changes: a final task never mixes parts of two layouts.
LAYOUT = 1


@dataclass(frozen=True)
class PartSpan:
    """`count` consecutive trajectories of the export's order, from position `start`."""

    index: int
    start: int
    count: int
    first_id: uuid.UUID
    last_id: uuid.UUID


def plan_parts(ids: Iterable[uuid.UUID], size: int) -> Iterator[PartSpan]:
    """Cut `ids` (the export's trajectories, in its order) into parts of `size`; the last may
    be smaller. Streams: holds one part's ends, never the ids."""
    if size < 1:
        raise ValueError("a part holds at least one trajectory")
    index = start = count = 0
    ends: tuple[uuid.UUID, uuid.UUID] | None = None
    for trajectory_id in ids:
        ends = (trajectory_id, trajectory_id) if ends is None else (ends[0], trajectory_id)
        count += 1
        if count == size:
            yield PartSpan(index, start, count, *ends)
            index, start, count, ends = index + 1, start + count, 0, None
    if ends is not None:
        yield PartSpan(index, start, count, *ends)


@dataclass
class RowCounts:
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    split_rows: int = 0  # rows that are a piece of a split conversation

    # The trajectories of rows dropped as outliers (not by the request's own choice), by
    # reason, so that a big export's few odd rows can be found; at most MAX_LISTED_OUTLIERS.
    outliers: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def absorb(self, result: Tokenized) -> None:
        """Count what tokenizing one trajectory cut and dropped."""
        self.truncated += result.truncated
        for reason, count in result.dropped.items():
            self.drop(reason, count)
            if reason in OUTLIER_REASONS:
                listed = self.outliers.setdefault(reason, [])
                if len(listed) < MAX_LISTED_OUTLIERS:
                    listed.append(result.key)

    def add(self, later: RowCounts) -> None:
        """Add the counts of the rows that came after these (the next part's): the listed
        outliers are those a single pass would have listed, the first ones in order."""
        self.written += later.written
        self.truncated += later.truncated
        self.split_rows += later.split_rows
        for reason, count in later.dropped.items():
            self.drop(reason, count)
        for reason, keys in later.outliers.items():
            listed = self.outliers.setdefault(reason, [])
            listed.extend(keys[: max(0, MAX_LISTED_OUTLIERS - len(listed))])


def add_counts(total: Any, more: Any) -> None:
    """Add a dataclass of counters (ints, and dicts of ints by name) into another of its
    class: PolicyCounts, SpanStats, ProfileCounts."""
    for spec in dataclasses.fields(total):
        mine, theirs = getattr(total, spec.name), getattr(more, spec.name)
        if isinstance(mine, dict):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        else:
            setattr(total, spec.name, mine + theirs)


@dataclass(frozen=True)
class PartFile:
    """A file a part wrote: its name in the part's folder, size, sha256 and rows."""

    name: str
    bytes: int
    sha256: str
    rows: int


@dataclass
class PartResult:
    """What one part built: written to its folder as `part.json`, read by the final task."""

    export_id: str
    index: int
    trajectories: int
    policy: PolicyCounts
    rows: RowCounts
    stats: SpanStats
    profile: ProfileCounts | None
    tokenizer: dict[str, Any] | None
    files: list[PartFile]

    def as_dict(self) -> dict[str, Any]:
        return {
            "layout": LAYOUT,
            "export_id": self.export_id,
            "index": self.index,
            "trajectories": self.trajectories,
            "policy": dataclasses.asdict(self.policy),
            "rows": dataclasses.asdict(self.rows),
            "stats": dataclasses.asdict(self.stats),
            "profile": dataclasses.asdict(self.profile) if self.profile is not None else None,
            "tokenizer": self.tokenizer,
            "files": [dataclasses.asdict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartResult:
        """Raises ValueError when `data` is not a part result of this layout."""
        if not isinstance(data, dict) or data.get("layout") != LAYOUT:
            raise ValueError("not a part result of this version")
        try:
            profile = data["profile"]
            return cls(
                export_id=str(data["export_id"]),
                index=int(data["index"]),
                trajectories=int(data["trajectories"]),
                policy=PolicyCounts(**data["policy"]),
                rows=RowCounts(**data["rows"]),
                stats=SpanStats(**data["stats"]),
                profile=ProfileCounts(**profile) if profile is not None else None,
                tokenizer=data["tokenizer"],
                files=[PartFile(**f) for f in data["files"]],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"a part result is incomplete: {error}") from error


@dataclass
class Totals:
    """The parts' results added up, in part order: what one pass would have counted."""

    trajectories: int = 0
    policy: PolicyCounts = field(default_factory=PolicyCounts)
    rows: RowCounts = field(default_factory=RowCounts)
    stats: SpanStats = field(default_factory=SpanStats)
    profile: ProfileCounts | None = None
    tokenizer: dict[str, Any] | None = None


def add_up(results: Sequence[PartResult]) -> Totals:
    """Raises ValueError when the parts disagree on what only the request decides (the
    tokenizer they loaded, whether rows were fitted to the fine-tuning format)."""
    totals = Totals()
    for number, result in enumerate(results):
        if number == 0:
            totals.tokenizer = result.tokenizer
            totals.profile = ProfileCounts() if result.profile is not None else None
        elif result.tokenizer != totals.tokenizer:
            raise ValueError(
                f"part {result.index} was built with another tokenizer than part 0 "
                f"({result.tokenizer} != {totals.tokenizer})"
            )
        elif (result.profile is None) != (totals.profile is None):
            raise ValueError(f"part {result.index} was built in another format than part 0")
        totals.trajectories += result.trajectories
        add_counts(totals.policy, result.policy)
        totals.rows.add(result.rows)
        add_counts(totals.stats, result.stats)
        if totals.profile is not None and result.profile is not None:
            add_counts(totals.profile, result.profile)
    return totals
