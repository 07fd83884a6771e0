"""`tokenized_parquet` over the real corpus with two chat-template families (ChatML with tools,
and Llama-3 style), on a tokenizer built locally: the shards load with `datasets`, the trained
tokens decode to exactly the trained assistant turns and their end-of-turn token, masked turns
stay in the context, and a tiny causal LM's loss equals a hand computation over exactly the
trained tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.exports.conftest import Corpus
from tests.exports.test_policies import _labels, expected_weights

FAMILIES = ("chatml", "llama3")


def trained_text(family: str, message: dict[str, Any]) -> str:
    """What the model writes for an assistant message in each family, end of turn included:
    written out here from the templates' formats, not rendered by the code under test."""
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if family == "chatml":
        blocks = "".join(
            f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": '
            f"{c['function']['arguments']}}}\n</tool_call>"
            for c in calls
        )
        return content + blocks + "<|im_end|>"
    blocks = "".join(
        f'{{"name": "{c["function"]["name"]}", "parameters": {c["function"]["arguments"]}}}'
        for c in calls
    )
    return content + blocks + "<|eot_id|>"


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    current: list[int] = []
    for token, on in zip(ids, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _dataset(corpus: Corpus, export: dict[str, Any]) -> Any:
    import datasets

    root = corpus.path(export)
    files = [str(root / s["path"]) for s in export["manifest"]["shards"]]
    return datasets.load_dataset("parquet", data_files=files, split="train")


@pytest.fixture(scope="module")
def srft_exports(corpus: Corpus, tokenizers: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {
        family: corpus.export(
            {
                "job_ids": [corpus.job_id],
                "policy": "srft",
                "format": "tokenized_parquet",
                "tokenizer": str(tokenizers[family]),
                "shard_max_rows": 10,
            }
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_tokens_are_exactly_the_trained_turns(
    corpus: Corpus,
    tokenizers: dict[str, Path],
    srft_exports: dict[str, dict[str, Any]],
    family: str,
) -> None:
    from transformers import AutoTokenizer

    export = srft_exports[family]
    assert export["status"] == "completed", export
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers[family]))
    rows = _dataset(corpus, export)
    assert set(rows.column_names) >= {
        "input_ids",
        "attention_mask",
        "labels",
        "assistant_masks",
        "trajectory_id",
        "num_tokens",
        "num_trained_tokens",
    }
    manifest = export["manifest"]
    assert len(manifest["shards"]) == -(-len(rows) // 10), "shard_max_rows=10"
    assert manifest["tokenizer"]["chat_template_sha256"]
    assert manifest["counts"]["tokens"]["trained"] == sum(rows["num_trained_tokens"])
    assert manifest["counts"]["tokens"]["straddling_span_edges"] == 0
    assert manifest["counts"]["tokens"]["turns_without_end_token"] == 0

    labels = _labels(corpus, [corpus.job_id])
    expected = {
        tid: w
        for tid, d in corpus.trajectories.items()
        if (w := expected_weights("srft", d, labels, {"mistake"})) is not None
    }
    assert sorted(rows["trajectory_id"]) == sorted(expected)
    masked_seen = 0
    for row in rows:
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert row["labels"] == [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        assert row["attention_mask"] == [1] * len(ids)
        assert row["num_tokens"] == len(ids)
        assert row["num_trained_tokens"] == sum(mask)
        detail = corpus.trajectories[row["trajectory_id"]]
        assistants = [detail["messages"][s["message_index"]] for s in detail["steps"]]
        weights = expected[row["trajectory_id"]]
        want = [trained_text(family, m) for m, w in zip(assistants, weights, strict=True) if w]
        got = [tokenizer.decode(run) for run in _runs(ids, mask)]
        assert got == want
        # Masked turns are still in the context the model reads.
        context = tokenizer.decode(ids)
        for message, weight in zip(assistants, weights, strict=True):
            if not weight and message.get("content"):
                assert message["content"] in context
                masked_seen += 1
    assert masked_seen > 0


def test_loss_of_a_tiny_lm_is_the_mean_over_trained_tokens(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["llama3"]),
        }
    )
    assert export["status"] == "completed", export["error"]
    rows = _dataset(corpus, export)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=export["manifest"]["tokenizer"]["vocab_size"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=65536,
        )
    ).eval()
    checked = 0
    shortest = sorted(range(len(rows)), key=lambda i: rows[i]["num_tokens"])[:6]
    for row in rows.select(shortest):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        # By hand: position t predicts token t + 1; only trained targets count.
        targets = row["input_ids"][1:]
        trained = [t for t in range(len(targets)) if row["assistant_masks"][t + 1]]
        assert len(trained) == row["num_trained_tokens"], "the first token is never trained"
        by_hand = -sum(float(logp[t, targets[t]]) for t in trained) / len(trained)
        assert float(out.loss) == pytest.approx(by_hand, rel=1e-5)
        checked += 1
    assert checked > 0


def test_soft_weights_are_the_share_of_votes_that_did_not_mask(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft_unresolved",
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["chatml"]),
            "options": {"soft": True},
        }
    )
    assert export["status"] == "completed", export
    rows = _dataset(corpus, export)
    verdicts = corpus.verdicts(corpus.job_id)
    seen: set[float] = set()
    for row in rows:
        detail = corpus.trajectories[row["trajectory_id"]]
        expected = []
        for step in range(detail["num_steps"]):
            verdict = verdicts[(detail["id"], step)]
            votes = verdict["vote_labels"] or [verdict["label"]]
            share = sum(v != "mistake" for v in votes) / len(votes)
            if share:
                expected.append(share)
        runs = _runs(row["loss_weights"], [w > 0 for w in row["loss_weights"]])
        got = [run[0] for run in runs]
        assert all(len(set(run)) == 1 for run in runs), "one weight per turn"
        assert got == pytest.approx(expected)
        seen |= {round(w, 3) for w in got}
    assert {0.333, 0.667, 1.0} <= seen


def test_exporting_twice_gives_identical_bytes_whatever_the_processes(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    body = {
        "job_ids": [corpus.job_id],
        "policy": "srft",
        "format": "tokenized_parquet",
        "tokenizer": str(tokenizers["chatml"]),
        "max_seq_len": 8192,
        "overflow": "split",
        "shard_max_rows": 16,
        "seed": 7,
    }
    first = corpus.export(body, processes=1)
    second = corpus.export(body, processes=2)
    assert first["status"] == second["status"] == "completed"
    assert first["id"] != second["id"]
    assert first["manifest"] == second["manifest"]
    one, two = corpus.path(first), corpus.path(second)
    names = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["counts"]["rows"]["split_rows"] > 0
    # A different seed orders rows differently: the order is the seed's, not an accident.
    third = corpus.export(body | {"seed": 8})
    assert third["manifest"]["shards"][0]["sha256"] != first["manifest"]["shards"][0]["sha256"]


def test_split_rows_repeat_the_task_and_fit(corpus: Corpus, tokenizers: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["chatml"]))
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "sft",
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["chatml"]),
            "max_seq_len": 8192,
            "overflow": "split",
        }
    )
    assert export["status"] == "completed", export
    rows = _dataset(corpus, export)
    assert max(rows["num_tokens"]) <= 8192
    # No step of these runs is longer alone than 8192 tokens after its task: nothing is cut
    # (pieces used to end with their last step's observation, cut when long, and counted).
    assert export["manifest"]["counts"]["rows"]["truncated"] == 0
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["trajectory_id"], []).append(row)
    split = {t: parts for t, parts in by_run.items() if len(parts) > 1}
    assert split, "some real runs are longer than 8192 tokens"
    for tid, parts in split.items():
        detail = corpus.trajectories[tid]
        task = next(m for m in detail["messages"] if m["role"] == "user")["content"][:200]
        for part in parts:
            assert task in tokenizer.decode(part["input_ids"])
        # Under sft every step is trained once, whole, in whichever piece holds it.
        got = [
            tokenizer.decode(run)
            for p in parts
            for run in _runs(p["input_ids"], p["assistant_masks"])
        ]
        want = [
            trained_text("chatml", detail["messages"][s["message_index"]]) for s in detail["steps"]
        ]
        assert got == want
        # A piece ends on its last step's turn: the observation after it trains nothing there.
        for part in parts:
            assert part["labels"][-1] != -100


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"tokenizer": "chatml_drops_past_thoughts"}, "template_not_prefix_stable"),
        ({"tokenizer": "chatml", "max_seq_len": 16, "strict": True}, "prefix_too_long"),
        (
            {"tokenizer": "chatml", "max_seq_len": 16, "overflow": "split", "strict": True},
            "prefix_too_long",
        ),
        ({"tokenizer": "chatml", "max_seq_len": 16, "overflow": "drop"}, "no_rows"),
        # Not strict: every row's task is longer than 16 tokens, so every row is dropped.
        ({"tokenizer": "chatml", "max_seq_len": 16}, "no_rows"),
    ],
)
def test_exports_that_cannot_be_right_fail_with_a_reason_and_no_files(
    corpus: Corpus, tokenizers: dict[str, Path], body: dict[str, Any], code: str
) -> None:
    body = body | {"tokenizer": str(tokenizers[body["tokenizer"]])}
    export = corpus.export(
        {"job_ids": [corpus.job_id], "format": "tokenized_parquet", "policy": "sft"} | body
    )
    assert export["status"] == "failed"
    assert export["error"]["code"] == code
    assert export["manifest"] is None
    assert not corpus.path(export).exists()
    assert not list((corpus.api.settings.export_dir / ".building").glob(f"{export['id']}*"))
    if code == "template_not_prefix_stable":
        assert "prefix-stable" in export["error"]["message"]
        listed = export["error"]["details"]["rows"]
        assert listed
        assert all(r["trajectory_id"] in corpus.trajectories for r in listed)
    if code == "prefix_too_long":
        assert "max_seq_len 16" in export["error"]["message"]
    files = corpus.api.get(f"/v1/exports/{export['id']}/files/manifest.json")
    assert files.status_code == 409
