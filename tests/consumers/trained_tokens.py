"""What a consumer trains on, counted from the batches that reach the model, and what it should
train on, worked out without srft's span code.

The reference (`reference_rows`): every export row rendered again by the tokenizer's own chat
template through `transformers` (`apply_chat_template(..., return_assistant_tokens_mask=True)`,
the `{% generation %}` markers), with the assistant turns the policy keeps: all of them in a
resolved run, all but the steps the critic called a mistake otherwise (`srft`'s default). A
split row is the task prefix and a run of whole steps, found by rendering.

The count (`count_targets`): Hugging Face causal LMs shift inside the model, so position `t`
is a target when `labels[t] != -100`, predicted from position `t - 1`; the first position of a
row never is. A target whose label is not the token at its own position (labels shifted by
one) is an error; so is a target on padding or on a row's first token inside a pack.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

IGNORE_INDEX = -100
Key = tuple[int, ...]  # a row's input_ids: how a row is recognised inside a batch


@dataclass(frozen=True)
class ExportRow:
    trajectory_id: str
    part: int
    input_ids: np.ndarray
    labels: np.ndarray
    num_trained_tokens: int

    @property
    def key(self) -> Key:
        return tuple(int(t) for t in self.input_ids)

    @property
    def trained(self) -> frozenset[int]:
        return frozenset(int(t) for t in np.flatnonzero(self.labels != IGNORE_INDEX))


def export_rows(folder: Path) -> list[ExportRow]:
    rows: list[ExportRow] = []
    for file in sorted((folder / "data").glob("*.parquet")):
        for row in pq.read_table(file).to_pylist():
            rows.append(
                ExportRow(
                    row["trajectory_id"],
                    row["part"],
                    np.asarray(row["input_ids"], dtype=np.int64),
                    np.asarray(row["labels"], dtype=np.int64),
                    row["num_trained_tokens"],
                )
            )
    return rows


def kept_steps(
    resolved: bool | None, labels: Sequence[str | None], masked: Collection[str] = ("mistake",)
) -> list[bool]:
    """The `srft` policy with default options, step by step: a resolved run trains every
    step; another trains the steps with a verdict that is not masked."""
    return [resolved is True or (label is not None and label not in masked) for label in labels]


def reference_rows(
    tokenizer: Any,
    rows: Sequence[ExportRow],
    trajectories: Mapping[str, Mapping[str, Any]],
    keep: Mapping[str, Sequence[bool]],
) -> dict[Key, Reference]:
    """The positions each row should train, by the template's own assistant masks."""
    expected: dict[Key, Reference] = {}
    by_run: dict[str, list[ExportRow]] = {}
    for row in rows:
        by_run.setdefault(row.trajectory_id, []).append(row)
    for trajectory_id, run_rows in by_run.items():
        detail = trajectories[trajectory_id]
        messages, tools = detail["messages"], detail.get("tools")
        steps = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        bounds = [*steps, len(messages)]
        prefix = messages[: steps[0]]
        first = 0
        for row in sorted(run_rows, key=lambda r: r.part):
            found = None
            # A piece with nothing trained is not written: its successor starts further on.
            for a in range(first, len(steps)):
                for b in range(a + 1, len(steps) + 1):
                    # Steps a..b-1, with or without what answers the last of them.
                    for end in (bounds[b], steps[b - 1] + 1):
                        rendered = tokenizer.apply_chat_template(
                            prefix + messages[bounds[a] : end],
                            tools=tools,
                            tokenize=True,
                            return_dict=True,
                            return_assistant_tokens_mask=True,
                        )
                        if list(rendered["input_ids"]) == row.input_ids.tolist():
                            found = (a, b, np.asarray(rendered["assistant_masks"], dtype=bool))
                            break
                    if found or len(rendered["input_ids"]) > len(row.input_ids):
                        break
                if found:
                    break
            assert found, (
                f"{trajectory_id} part {row.part}: no run of whole steps after step {first} "
                "renders to the row's input_ids with the chat template"
            )
            a, b, mask = found
            turns = _runs(mask)
            assert len(turns) == b - a, f"{trajectory_id}: {len(turns)} assistant spans"
            kept = keep[trajectory_id][a:b]
            trained = {t for (s, e), k in zip(turns, kept, strict=True) if k for t in range(s, e)}
            masked = tuple(turn for turn, k in zip(turns, kept, strict=True) if not k)
            expected[row.key] = Reference(frozenset(trained), masked)
            first = b
    return expected


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


@dataclass(frozen=True)
class Reference:
    """What a row should train by the template and the verdicts, and the turns it masks."""

    trained: frozenset[int]
    masked_turns: tuple[tuple[int, int], ...]  # [start, end) token spans


@dataclass
class Tally:
    """Targets seen, per row (by its input_ids) and in all; what was wrong, in words."""

    per_row: dict[Key, list[frozenset[int]]] = field(default_factory=dict)
    total: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def count_targets(batches: Iterable[Mapping[str, Any]], tally: Tally | None = None) -> Tally:
    """Targets in batches as the model got them: `input_ids`, `labels`, and `attention_mask`
    (padded rows) or `position_ids` restarting at 0 (packed rows), as tensors or arrays."""
    tally = tally or Tally()
    for batch in batches:
        tally.batches += 1
        ids = _array(batch["input_ids"])
        labels = _array(batch["labels"])
        mask = _array(batch.get("attention_mask"))
        positions = _array(batch.get("position_ids"))
        for i in range(ids.shape[0]):
            row_labels = labels[i]
            if mask is not None:
                real = mask[i].astype(bool)
                if (row_labels[~real] != IGNORE_INDEX).any():
                    tally.errors.append(f"batch {tally.batches}: a target on padding")
                segments = [(np.flatnonzero(real)[0], np.flatnonzero(real)[-1] + 1)]
            elif positions is not None:
                starts = np.flatnonzero(positions[i] == 0)
                segments = list(zip(starts, [*starts[1:], len(ids[i])], strict=True))
            else:
                segments = [(0, len(ids[i]))]
            for start, end in segments:
                _count_row(tally, ids[i][start:end], row_labels[start:end], positions, i, start)
    return tally


def _count_row(
    tally: Tally,
    ids: np.ndarray,
    labels: np.ndarray,
    positions: np.ndarray | None,
    i: int,
    start: int,
) -> None:
    where = f"batch {tally.batches}, row at {start}"
    if positions is not None and not np.array_equal(
        positions[i][start : start + len(ids)], np.arange(len(ids))
    ):
        tally.errors.append(f"{where}: position ids do not count 0, 1, 2... within the row")
    if labels[0] != IGNORE_INDEX:
        tally.errors.append(f"{where}: the row's first token is a target (of the row before)")
    targets = np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1
    wrong = targets[labels[targets] != ids[targets]]
    if len(wrong):
        shifted = np.array_equal(labels[wrong], ids[np.minimum(wrong + 1, len(ids) - 1)])
        tally.errors.append(
            f"{where}: {len(wrong)} targets are not the token at their own position"
            + (" (labels shifted by one)" if shifted else "")
        )
    tally.per_row.setdefault(tuple(int(t) for t in ids), []).append(
        frozenset(int(t) for t in targets)
    )
    tally.total += len(targets)


def _array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array[None] if array.ndim == 1 else array


def check_one_epoch(
    tally: Tally,
    rows: Sequence[ExportRow],
    trained_tokens: int,
    expected: Mapping[Key, Reference],
) -> None:
    """One epoch trained exactly what the export says (`trained_tokens`: the manifest's
    count) and what the template and verdicts say: every row once, the same positions."""
    problems = list(tally.errors)
    by_key = {row.key: row for row in rows}
    unknown = [k for k in tally.per_row if k not in by_key]
    if unknown:
        problems.append(
            f"{len(unknown)} rows reached the model that the export does not have "
            f"(cut or merged?), lengths {sorted(len(k) for k in unknown)}"
        )
    for row in rows:
        seen = tally.per_row.get(row.key, [])
        name = f"{row.trajectory_id} part {row.part}"
        if len(seen) != 1:
            problems.append(f"{name}: reached the model {len(seen)} times in one epoch")
            continue
        if seen[0] != row.trained:
            problems.append(
                f"{name}: {len(seen[0])} targets, the export's labels have {len(row.trained)} "
                f"({len(seen[0] - row.trained)} extra, {len(row.trained - seen[0])} missing)"
            )
        if row.trained != expected[row.key].trained:
            extra = row.trained - expected[row.key].trained
            missing = expected[row.key].trained - row.trained
            problems.append(
                f"{name}: the export trains {len(extra)} positions that the chat template and the "
                f"verdicts do not (masked turn or shifted labels?) and misses {len(missing)}"
            )
        if row.num_trained_tokens != len(row.trained):
            problems.append(f"{name}: num_trained_tokens {row.num_trained_tokens}")
    if tally.total != trained_tokens:
        problems.append(
            f"{tally.total} targets in one epoch, the manifest says {trained_tokens} trained tokens"
        )
    assert not problems, "\n".join(problems)
