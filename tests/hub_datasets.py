"""The shared real dataset rows (tests/data/trajectories, JSON arrays) written as the Hugging Face
Hub serves those datasets: Parquet shards `data/train-0000i-of-0000n.parquet`, with the Hub's
column names and Arrow types.

Where the types come from:
- nebius/SWE-agent-trajectories: the dataset card's `dataset_info` (README at a8a64e5):
  `instance_id`, `model_name` string, `target` bool, `trajectory` list of structs
  {cutoff_date string, mask bool, role string, system_prompt string, text string},
  `exit_status`, `generated_patch`, `eval_logs` string.
- SWE-bench/SWE-smith-trajectories: the Hub's viewer lists `messages` as a *string* (7.95k to
  664k characters: the JSON text of the list), `instance_id` string, `resolved` bool, `model`
  string, `traj_id` string, `patch` string; agent-data-protocol's converter decodes `messages`
  from a string for the same reason. The sample's extra `id` column is the converter's own.
- SWE-Gym/OpenHands-Sampled-Trajectories: the card lists no types; the rows were read from the
  Hub with `datasets`, so their nulls are the Arrow ones (every message has `function_call`,
  `name`, `tool_call_id`; every tool schema lists every tool's properties). The types are
  inferred from the rows, as `datasets` infers them from JSON.
- nebius/SWE-rebench-openhands-trajectories: the Hub's viewer lists `trajectory_id`,
  `instance_id`, `repo` string, `trajectory` list (chat messages: `role`, `content`,
  `tool_calls`, `name`, `tool_call_id`, as its card's loading example reads them), `tools`
  list, `model_patch`, `exit_status` string, `resolved` int64 (0 or 1), `gen_tests_correct`,
  `pred_passes_gen_tests` float64. No row of it is among the shared samples, so
  `swe_rebench_table` lays the real SWE-Gym OpenHands rows out in those columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import trajectory_file

NEBIUS = "nebius-swe-agent/adp__nebius-swe-agent-trajectories__sample_raw@51905b6.json"
SWE_SMITH = "openai-messages/adp__swe-smith__sample_raw@dc1a8b7.json"
SWE_GYM = "openai-messages/adp__swe-gym-openhands__sample_raw@68dc74c.json"

NEBIUS_SCHEMA = pa.schema(
    [
        ("instance_id", pa.string()),
        ("model_name", pa.string()),
        ("target", pa.bool_()),
        (
            "trajectory",
            pa.list_(
                pa.struct(
                    [
                        ("cutoff_date", pa.string()),
                        ("mask", pa.bool_()),
                        ("role", pa.string()),
                        ("system_prompt", pa.string()),
                        ("text", pa.string()),
                    ]
                )
            ),
        ),
        ("exit_status", pa.string()),
        ("generated_patch", pa.string()),
        ("eval_logs", pa.string()),
    ]
)
SWE_SMITH_SCHEMA = pa.schema(
    [
        ("messages", pa.string()),
        ("instance_id", pa.string()),
        ("resolved", pa.bool_()),
        ("model", pa.string()),
        ("traj_id", pa.string()),
        ("patch", pa.string()),
    ]
)


def json_rows(relative: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(trajectory_file(relative).read_bytes())
    return rows


def hub_table(relative: str) -> pa.Table:
    """The sample's rows as the Hub's Parquet holds them."""
    rows = json_rows(relative)
    if relative == NEBIUS:
        return pa.Table.from_pylist(rows, schema=NEBIUS_SCHEMA)
    if relative == SWE_SMITH:
        hub_rows = [
            {
                name: json.dumps(row["messages"]) if name == "messages" else row.get(name)
                for name in SWE_SMITH_SCHEMA.names
            }
            for row in rows
        ]
        return pa.Table.from_pylist(hub_rows, schema=SWE_SMITH_SCHEMA)
    return pa.Table.from_pylist(rows)


def write_shards(
    table: pa.Table, folder: Path, shards: int = 2, row_group_size: int = 1
) -> list[Path]:
    """`folder/data/train-0000i-of-0000n.parquet`, as `huggingface-cli download` leaves them."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    per_shard = -(-table.num_rows // shards)
    paths = []
    for shard in range(shards):
        path = folder / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet"
        pq.write_table(
            table.slice(shard * per_shard, per_shard), path, row_group_size=row_group_size
        )
        paths.append(path)
    return paths


SWE_REBENCH_MESSAGE = pa.struct(
    [
        ("content", pa.string()),
        ("name", pa.string()),
        ("role", pa.string()),
        ("tool_call_id", pa.string()),
        (
            "tool_calls",
            pa.list_(
                pa.struct(
                    [
                        (
                            "function",
                            pa.struct([("arguments", pa.string()), ("name", pa.string())]),
                        ),
                        ("id", pa.string()),
                        ("type", pa.string()),
                    ]
                )
            ),
        ),
    ]
)


def swe_rebench_table(resolved: list[int]) -> pa.Table:
    """The SWE-Gym sample's runs in nebius/SWE-rebench-openhands-trajectories' columns."""
    gym = json_rows(SWE_GYM)
    tools = pa.Table.from_pylist(gym).schema.field("tools").type
    schema = pa.schema(
        [
            ("trajectory_id", pa.string()),
            ("instance_id", pa.string()),
            ("repo", pa.string()),
            ("trajectory", pa.list_(SWE_REBENCH_MESSAGE)),
            ("tools", tools),
            ("model_patch", pa.string()),
            ("exit_status", pa.string()),
            ("resolved", pa.int64()),
            ("gen_tests_correct", pa.float64()),
            ("pred_passes_gen_tests", pa.float64()),
        ]
    )
    rows = [
        {
            "trajectory_id": f"chatcmpl-{n}",
            "instance_id": row["instance_id"],
            "repo": "getmoto/moto",
            "trajectory": [
                {name: message.get(name) for name in SWE_REBENCH_MESSAGE.names}
                for message in row["messages"]
            ],
            "tools": row["tools"],
            "model_patch": row["test_result"]["git_patch"],
            "exit_status": "submit",
            "resolved": flag,
            "gen_tests_correct": None,
            "pred_passes_gen_tests": float("nan"),
        }
        for n, (row, flag) in enumerate(zip(gym, resolved, strict=True))
    ]
    return pa.Table.from_pylist(rows, schema=schema)
