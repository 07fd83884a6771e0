"""`openai_jsonl` rows fit the chat fine-tuning format: over the shared real runs none of the
problems a session found with OpenAI fine-tuning remains, every row passes the exporter's
validator, and the rows train exactly the steps of the canonical `openai_jsonl_raw` rows; the
raw variant keeps the canonical messages byte for byte; an invalid row fails the export, listed;
with a tokenizer and max_seq_len, rows are measured with its chat template and split, dropped or
cut at step boundaries to fit (what Axolotl needs at a `sequence_len`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from app.exports.finetune import ProfileCounts, fit_row, problems
from app.exports.writers.jsonl import dump_line
from tests.exports.conftest import Corpus, _label
from tests.exports.test_policies import POLICIES, _labels, _rows, expected_weights

# Fine-tuning message keys by role (OpenAI's FineTuneChatRequestInput), written out here.
SCHEMA_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "weight"},
    "tool": {"role", "content", "tool_call_id"},
}


def format_issues(rows: list[dict[str, Any]]) -> dict[str, int]:
    """What the session counted in the rows it gave to OpenAI fine-tuning. Today's code (before
    the profile), policy sft, 27 rows: 9 ending on an unanswered call, 5 calling functions
    with no `tools`, 5 tools whose parameters are no object schema (3 null, 2 missing), 189
    tool messages with keys beyond the schema (`name`), 8 ending on tool or user messages."""
    issues = {
        "ends_on_unanswered_call": 0,
        "unanswered_call_before_the_end": 0,
        "calls_without_tools": 0,
        "tools_without_object_parameters": 0,
        "messages_with_keys_beyond_the_schema": 0,
        "not_ending_on_assistant": 0,
    }
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
            issues["ends_on_unanswered_call"] += 1
        for index, message in enumerate(messages[:-1]):
            if message["role"] != "assistant":
                continue
            ids = [c["id"] for c in message.get("tool_calls") or []]
            answers = []
            for later in messages[index + 1 :]:
                if later["role"] != "tool":
                    break
                answers.append(later["tool_call_id"])
            if sorted(answers) != sorted(ids):
                issues["unanswered_call_before_the_end"] += 1
        if any(m.get("tool_calls") for m in messages) and not row.get("tools"):
            issues["calls_without_tools"] += 1
        for tool in row.get("tools") or []:
            parameters = tool["function"].get("parameters")
            if not isinstance(parameters, dict) or parameters.get("type") != "object":
                issues["tools_without_object_parameters"] += 1
        issues["messages_with_keys_beyond_the_schema"] += sum(
            1 for m in messages if set(m) - SCHEMA_KEYS[m["role"]]
        )
        if messages[-1]["role"] != "assistant":
            issues["not_ending_on_assistant"] += 1
    return issues


def _last_assistant(row: dict[str, Any]) -> int:
    return max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")


def expected_fitted(raw: dict[str, Any]) -> dict[str, Any]:
    """A canonical row as the fine-tuning format wants it, by the rules of the README: ends on
    its last assistant message, keys of the schema only, tools present when called."""
    kept = [
        {k: v for k, v in m.items() if k in SCHEMA_KEYS[m["role"]]}
        for m in raw["messages"][: _last_assistant(raw) + 1]
    ]
    tools = []
    for tool in raw.get("tools") or []:
        function = dict(tool["function"])
        if function.get("parameters") is None:
            function["parameters"] = {"type": "object", "properties": {}}
        tools.append({**tool, "function": function})
    declared = {t["function"]["name"] for t in tools}
    for message in kept:
        for call in message.get("tool_calls") or []:
            name = call["function"]["name"]
            if name not in declared:
                declared.add(name)
                tools.append(
                    {
                        "type": "function",
                        "function": {
                            "name": name,
                            "parameters": {"type": "object", "properties": {}},
                        },
                    }
                )
    return {"messages": kept, "tools": tools} if tools else {"messages": kept}


@pytest.mark.parametrize("policy", POLICIES)
def test_the_shared_runs_fit_the_fine_tuning_format(corpus: Corpus, policy: str) -> None:
    body = {"job_ids": [corpus.job_id], "policy": policy, "seed": None}
    fitted = corpus.export(body)
    raw = corpus.export(body | {"format": "openai_jsonl_raw"})
    assert fitted["status"] == raw["status"] == "completed", fitted["error"]
    rows, raw_rows = _rows(corpus, fitted), _rows(corpus, raw)
    before, after = format_issues(raw_rows), format_issues(rows)
    print(f"{policy}: {len(raw_rows)} rows; raw {before}; openai_jsonl {after}")
    if policy == "sft":
        assert len(rows) == 27
        assert before == {
            "ends_on_unanswered_call": 9,
            "unanswered_call_before_the_end": 0,
            "calls_without_tools": 5,
            "tools_without_object_parameters": 5,
            "messages_with_keys_beyond_the_schema": 189,
            "not_ending_on_assistant": 8,
        }
        # The 4 runs whose last call was answered now end on that call too.
        assert after == {
            "ends_on_unanswered_call": 13,
            "unanswered_call_before_the_end": 0,
            "calls_without_tools": 0,
            "tools_without_object_parameters": 0,
            "messages_with_keys_beyond_the_schema": 0,
            "not_ending_on_assistant": 0,
        }
    assert after["calls_without_tools"] == 0
    assert after["tools_without_object_parameters"] == 0
    assert after["messages_with_keys_beyond_the_schema"] == 0
    assert after["not_ending_on_assistant"] == 0
    # Only the last message may call without an answer: that is how a row teaches a call.
    assert after["unanswered_call_before_the_end"] == 0
    for row in rows:
        assert problems(row) == []
    # The same rows, in the same order, training the same steps: only the format changed.
    assert rows == [expected_fitted(r) for r in raw_rows]
    weights = [[m["weight"] for m in r["messages"] if m["role"] == "assistant"] for r in rows]
    assert weights == [
        [m["weight"] for m in r["messages"] if m["role"] == "assistant"] for r in raw_rows
    ]
    profile = fitted["manifest"]["counts"]["profile"]
    ends = [_last_assistant(r) for r in raw_rows]
    tails = [len(r["messages"]) - 1 - end for r, end in zip(raw_rows, ends, strict=True)]
    assert profile["rows_ending_after_last_assistant"] == sum(1 for t in tails if t)
    assert profile["messages_after_last_assistant"] == sum(tails)
    assert profile["rows_with_tools_derived"] == before["calls_without_tools"]
    assert profile["tool_parameters_made_object"] == before["tools_without_object_parameters"]
    names = sum(
        1
        for r, end in zip(raw_rows, ends, strict=True)
        for m in r["messages"][: end + 1]
        if m["role"] == "tool" and "name" in m
    )
    assert profile["keys_removed"] == ({"tool.name": names} if names else {})
    assert raw["manifest"]["counts"]["profile"] is None
    assert fitted["manifest"]["counts"]["steps"] == raw["manifest"]["counts"]["steps"]


def test_the_raw_variant_keeps_the_canonical_messages_byte_for_byte(corpus: Corpus) -> None:
    export = corpus.export({"job_ids": [corpus.job_id], "format": "openai_jsonl_raw", "seed": None})
    assert export["status"] == "completed", export["error"]
    labels = _labels(corpus, [corpus.job_id])
    expected: list[bytes] = []
    for tid in sorted(corpus.trajectories):
        detail = corpus.trajectories[tid]
        weights = expected_weights("srft", detail, labels, {"mistake"})
        if weights is None:
            continue
        steps = {s["message_index"]: w for s, w in zip(detail["steps"], weights, strict=True)}
        messages = [
            {**m, "weight": steps[i]} if m["role"] == "assistant" else m
            for i, m in enumerate(detail["messages"])
        ]
        row = (
            {"messages": messages, "tools": detail["tools"]}
            if detail["tools"]
            else {"messages": messages}
        )
        expected.append(dump_line(row))
    root = corpus.path(export)
    written = b"".join((root / s["path"]).read_bytes() for s in export["manifest"]["shards"])
    assert written == b"".join(expected)
    assert b'"name":' in written  # tool messages keep their canonical `name`


def test_the_profile_counts_what_it_changes() -> None:
    counts = ProfileCounts()
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    row = fit_row(
        [
            {"role": "user", "content": "fix it", "name": "me"},
            {"role": "assistant", "content": None, "tool_calls": [call], "weight": 1, "extra": 1},
            {"role": "tool", "content": "ok", "tool_call_id": "c1", "name": "bash"},
            {"role": "user", "content": "[exit]"},
        ],
        [{"type": "function", "function": {"name": "edit", "parameters": None}}],
        counts,
    )
    assert row == {
        "messages": [
            {"role": "user", "content": "fix it", "name": "me"},
            {"role": "assistant", "content": None, "tool_calls": [call], "weight": 1},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "edit", "parameters": {"type": "object", "properties": {}}},
            },
            {
                "type": "function",
                "function": {"name": "bash", "parameters": {"type": "object", "properties": {}}},
            },
        ],
    }
    assert problems(row) == []
    assert counts.as_dict() == {
        "rows_ending_after_last_assistant": 1,
        "messages_after_last_assistant": 2,
        "keys_removed": {"assistant.extra": 1},
        "rows_with_tools_derived": 0,
        "tools_added": 1,
        "tool_parameters_made_object": 1,
    }
    assert (
        fit_row(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}],
            None,
            counts,
        )
        is None
    )


def _call(call_id: str, name: str = "bash") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


BASH = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": []}, "messages: must be a non-empty list"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 2},
                ]
            },
            "messages[1].weight: must be 0 or 1, not 2",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": True},
                ]
            },
            "messages[1].weight: must be 0 or 1, not True",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[1].weight: must be 0 or 1, not None",
        ),
        (
            {"messages": [{"role": "developer", "content": "x"}]},
            "messages[0].role: 'developer' is not system, user, assistant or tool",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": None, "tool_calls": [_call("a")], "weight": 1},
                    {"role": "tool", "content": "ok", "tool_call_id": "a", "name": "bash"},
                    {"role": "assistant", "content": "done", "weight": 1},
                ],
                "tools": BASH,
            },
            "messages[2].name: not a key of a tool message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": None, "tool_calls": [_call("a")], "weight": 1},
                ]
            },
            "messages[1].tool_calls[0].function.name: 'bash' is not declared in tools",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 1},
                ],
                "tools": [{"type": "function", "function": {"name": "bash", "parameters": None}}],
            },
            "tools[0].function.parameters: must be a JSON Schema of type object",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": None, "tool_calls": [_call("a")], "weight": 1},
                    {"role": "user", "content": "interrupting"},
                    {"role": "assistant", "content": "done", "weight": 1},
                ],
                "tools": BASH,
            },
            "messages[1].tool_calls: ['a'] not answered before messages[2]",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": None, "tool_calls": [_call("a")], "weight": 1},
                    {"role": "tool", "content": "ok", "tool_call_id": "a"},
                    {"role": "tool", "content": "again", "tool_call_id": "a"},
                    {"role": "assistant", "content": "done", "weight": 1},
                ],
                "tools": BASH,
            },
            "messages[3].tool_call_id: 'a' answers a call already answered",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "content": "ok", "tool_call_id": "zz"},
                    {"role": "assistant", "content": "done", "weight": 1},
                ]
            },
            "messages[1].tool_call_id: 'zz' answers no call",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 1},
                    {"role": "user", "content": "thanks"},
                ]
            },
            "messages[2].role: the last message must be the assistant's",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 0},
                ]
            },
            "messages: no assistant message has weight 1",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": None, "weight": 1},
                ]
            },
            "messages[1].content: must be a string (or null with tool_calls)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "weight": 1},
                ],
                "trajectory_id": "t",
            },
            "trajectory_id: not a key of a fine-tuning example",
        ),
    ],
)
def test_the_validator_says_what_is_wrong_and_where(row: dict[str, Any], problem: str) -> None:
    assert problem in problems(row)


def test_a_final_call_with_no_answer_is_valid() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "look", "tool_calls": [_call("a")], "weight": 0},
            {"role": "tool", "content": "ok", "tool_call_id": "a"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("b"), _call("c")],
                "weight": 1,
            },
        ],
        "tools": BASH,
    }
    assert problems(row) == []


# ---------------------------------------------------------------- measured with a tokenizer


def _render_length(tokenizer: Any, row: dict[str, Any]) -> int:
    text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _task(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages = row["messages"]
    return messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]


def _assistants(rows: list[dict[str, Any]], weight: int | None = None) -> list[dict[str, Any]]:
    return [
        m
        for r in rows
        for m in r["messages"]
        if m["role"] == "assistant" and (weight is None or m["weight"] == weight)
    ]


@pytest.mark.parametrize(
    ("fmt", "policy"),
    [("openai_jsonl", "sft"), ("openai_jsonl", "srft"), ("openai_jsonl_raw", "srft")],
)
def test_split_rows_fit_repeat_the_task_and_train_each_turn_once(
    corpus: Corpus,
    tokenizers: dict[str, Path],
    fmt: str,
    policy: str,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["chatml"]))
    limit = 8192
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": policy,
            "format": fmt,
            "tokenizer": str(tokenizers["chatml"]),
            "max_seq_len": limit,
            "overflow": "split",
            "seed": None,
        }
    )
    assert export["status"] == "completed", export["error"]
    manifest = export["manifest"]
    assert manifest["tokenizer"]["chat_template_sha256"]
    rows = _rows(corpus, export)
    full = corpus.export(
        {"job_ids": [corpus.job_id], "policy": policy, "format": fmt, "seed": None}
    )
    sources = _rows(corpus, full)
    assert all(_render_length(tokenizer, r) <= limit for r in rows)
    if fmt == "openai_jsonl":
        assert all(problems(r) == [] for r in rows)
    too_long = [s for s in sources if _render_length(tokenizer, s) > limit]
    assert too_long, "some real runs are longer than 8192 tokens"
    print(f"{fmt} {policy}: {len(too_long)} of {len(sources)} rows over {limit} tokens")
    # Rows are in id order, pieces in order: a run's pieces come one after another, and
    # every trained turn of the run is trained in exactly one of them, in order.
    groups: list[list[dict[str, Any]]] = []
    position = 0
    for source in sources:
        want = _assistants([source], weight=1)
        group: list[dict[str, Any]] = []
        got: list[dict[str, Any]] = []
        while position < len(rows) and len(got) < len(want):
            group.append(rows[position])
            got += _assistants([rows[position]], weight=1)
            position += 1
        assert got == want
        for piece in group:
            assert _task(piece) == _task(source), "each piece repeats the task"
            assert piece.get("tools") == source.get("tools")
            assert any(m.get("weight") == 1 for m in piece["messages"])
            if len(group) > 1:  # a piece ends on its last step's turn (raw rows left whole don't)
                assert piece["messages"][-1]["role"] == "assistant"
        groups.append(group)
    assert position == len(rows)
    split_rows = sum(len(g) for g in groups if len(g) > 1)
    assert split_rows > 0
    assert manifest["counts"]["rows"]["split_rows"] == split_rows
    assert manifest["counts"]["rows"]["truncated"] == 0


def test_measured_rows_are_the_same_whatever_the_processes(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    body = {
        "job_ids": [corpus.job_id],
        "tokenizer": str(tokenizers["llama3"]),
        "max_seq_len": 8192,
        "overflow": "split",
        "shard_max_rows": 16,
    }
    one, two = corpus.export(body, processes=1), corpus.export(body, processes=2)
    assert one["status"] == two["status"] == "completed", one["error"]
    assert one["manifest"] == two["manifest"]
    assert one["manifest"]["counts"]["rows"]["split_rows"] > 0
    for shard in one["manifest"]["shards"]:
        path = shard["path"]
        assert (corpus.path(one) / path).read_bytes() == (corpus.path(two) / path).read_bytes()


@pytest.mark.parametrize("overflow", ["drop", "truncate"])
def test_rows_over_the_limit_are_dropped_or_cut_at_the_last_step_that_fits(
    corpus: Corpus, tokenizers: dict[str, Path], overflow: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["llama3"]))
    limit = 8192
    body = {"job_ids": [corpus.job_id], "policy": "sft", "seed": None}
    sources = _rows(corpus, corpus.export(body))
    export = corpus.export(
        body | {"tokenizer": str(tokenizers["llama3"]), "max_seq_len": limit, "overflow": overflow}
    )
    assert export["status"] == "completed", export["error"]
    rows = _rows(corpus, export)
    counts = export["manifest"]["counts"]["rows"]
    fits = [_render_length(tokenizer, s) <= limit for s in sources]
    assert not all(fits)
    if overflow == "drop":
        assert rows == [s for s, fit in zip(sources, fits, strict=True) if fit]
        assert counts["dropped"] == {"too_long": fits.count(False)}
        assert counts["truncated"] == 0
        return
    assert len(rows) == len(sources)
    assert counts["truncated"] == fits.count(False)
    assert counts["dropped"] == {}
    for row, source, fit in zip(rows, sources, fits, strict=True):
        if fit:
            assert row == source
            continue
        head = row["messages"]
        assert head == source["messages"][: len(head)]
        assert head[-1]["role"] == "assistant"
        assert problems(row) == []
        assert _render_length(tokenizer, row) <= limit
        # The next step would not have fitted.
        following = next(
            i
            for i, m in enumerate(source["messages"])
            if i >= len(head) and m["role"] == "assistant"
        )
        longer = {**source, "messages": source["messages"][: following + 1]}
        assert _render_length(tokenizer, longer) > limit


def test_an_invalid_row_fails_the_export_and_is_listed(corpus: Corpus) -> None:
    """A run the fine-tuning format cannot hold (a call left unanswered mid-run, a tool whose
    parameters are not an object schema) fails the export instead of being written."""
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    run = {
        "messages": [
            {"role": "user", "content": "an invalid run for the fine-tuning format"},
            {"role": "assistant", "content": "look", "tool_calls": [call]},
            {"role": "user", "content": "interrupting before the call is answered"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "bash", "parameters": {"type": "string"}}}
        ],
        "resolved": True,
    }
    [uploaded] = corpus.api.upload(json.dumps(run).encode())
    job = corpus.api.start_job(
        {"selection": {"trajectory_ids": [uploaded["id"]]}, "scope": "all", "cache": False}
    )
    _label(corpus.api, job["id"], lambda tid, detail, step: ("good", None))
    export = corpus.export({"job_ids": [job["id"]], "policy": "sft"})
    assert export["status"] == "failed"
    error = export["error"]
    assert error["code"] == "invalid_rows"
    assert uploaded["id"] in error["message"]
    [listed] = error["details"]["rows"]
    assert listed["trajectory_id"] == uploaded["id"]
    assert listed["part"] == 0
    assert (
        "tools[0].function.parameters: must be a JSON Schema of type object" in listed["problems"]
    )
    assert "messages[1].tool_calls: ['c1'] not answered before messages[2]" in listed["problems"]
    assert export["manifest"] is None
    assert not corpus.path(export).exists()
    # The canonical messages are still there for whoever wants them.
    raw = corpus.export({"job_ids": [job["id"]], "policy": "sft", "format": "openai_jsonl_raw"})
    assert raw["status"] == "completed", raw["error"]
    [row] = _rows(corpus, raw)
    assert row["tools"] == run["tools"]


def test_a_tokenizer_is_loaded_only_through_the_checks(
    corpus: Corpus, tokenizer_root: Path, tmp_path: Path
) -> None:
    body = {"job_ids": [corpus.job_id], "max_seq_len": 4096, "overflow": "split"}
    outside = corpus.api.post("/v1/exports", json=body | {"tokenizer": str(tmp_path / "tok")})
    assert outside.status_code == 422
    assert outside.json()["error"]["code"] == "invalid_tokenizer"
    missing = corpus.export(body | {"tokenizer": str(tokenizer_root / "srft-missing")})
    assert missing["status"] == "failed"
    assert missing["error"]["code"] == "tokenizer_unavailable"


def test_the_trainer_reads_the_raw_variant_as_the_exporter_tokenizes(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    from app.training.data import Row, load_rows

    short = sorted(corpus.trajectories, key=lambda t: len(str(corpus.trajectories[t])))[:4]
    body = {"job_ids": [corpus.job_id], "selection": {"trajectory_ids": short}}
    raw = corpus.export(body | {"format": "openai_jsonl_raw"})
    parquet = corpus.export(
        body | {"format": "tokenized_parquet", "tokenizer": str(tokenizers["llama3"])}
    )
    fitted = corpus.export(body)
    tokenizer = str(tokenizers["llama3"])

    def key(r: Row) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(r.input_ids.tolist()), tuple(r.labels.tolist())

    from_raw = load_rows(corpus.path(raw), tokenizer=tokenizer, max_seq_len=10**6)
    from_parquet = load_rows(corpus.path(parquet), tokenizer=None, max_seq_len=10**6)
    assert sorted(map(key, from_raw)) == sorted(map(key, from_parquet))
    from_fitted = load_rows(corpus.path(fitted), tokenizer=tokenizer, max_seq_len=10**6)
    trained = sorted(int((r.labels != -100).sum()) for r in from_fitted)
    assert trained == sorted(int((r.labels != -100).sum()) for r in from_parquet)


def test_rows_whose_task_prefix_cannot_fit_are_dropped_and_listed_unless_strict(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    """On 80k runs one task longer than max_seq_len is certain: it is dropped, counted and
    named in the manifest, and the export completes; `strict` fails it as before."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["chatml"]))

    def prefix_tokens(detail: dict[str, Any]) -> int:
        task = _task(detail)
        text = tokenizer.apply_chat_template(
            task, tools=detail.get("tools"), tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lengths = sorted((prefix_tokens(d), tid) for tid, d in corpus.trajectories.items())
    # A limit in the widest gap between two runs' prefixes: some fit, some cannot.
    gap, limit = max(
        (b[0] - a[0], (a[0] + b[0]) // 2) for a, b in itertools.pairwise(lengths) if a[0] >= 16
    )
    assert gap > 40
    too_long = {tid for n, tid in lengths if n > limit}
    assert too_long
    assert len(too_long) < len(lengths)
    body = {
        "job_ids": [corpus.job_id],
        "policy": "sft",
        "format": "openai_jsonl_raw",
        "tokenizer": str(tokenizers["chatml"]),
        "max_seq_len": limit,
        "overflow": "split",
    }
    export = corpus.export(body)
    assert export["status"] == "completed", export["error"]
    rows = export["manifest"]["counts"]["rows"]
    assert rows["dropped"]["prefix_too_long"] == len(too_long)
    assert set(rows["dropped_trajectories"]["prefix_too_long"]) == too_long

    strict = corpus.export(body | {"strict": True})
    assert strict["status"] == "failed"
    assert strict["error"]["code"] == "prefix_too_long"
