"""The trainer on real exports with a tiny random Llama: the loss falls; masked tokens get no
gradient at all; the loss is normalised per trained token over the accumulated batch; packed
and padded batches agree; a resumed run ends bit-for-bit where an uninterrupted one does; a
tampered shard is refused; openai_jsonl rows tokenize exactly as tokenized_parquet rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.training.batching import collate, forward, loss_sum
from app.training.config import TrainConfig
from app.training.data import IGNORE_INDEX, DataError, Row, load_rows
from app.training.loss import install
from app.training.trainer import Distributed, _step, train
from tests.exports.conftest import Corpus

pytestmark = pytest.mark.slow


def _config(
    corpus: Corpus, export: dict[str, Any], model_dir: Path, out: Path, **kw: Any
) -> TrainConfig:
    values: dict[str, Any] = {
        "data": str(corpus.path(export)),
        "model": str(model_dir),
        "output": str(out),
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 1,
        "tokens_per_micro_batch": 4096,
        "grad_accum": 2,
        "max_seq_len": 4096,
    }
    return TrainConfig(**(values | kw))


def _model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return model.train()


def _rows(corpus: Corpus, export: dict[str, Any]) -> list[Row]:
    rows = load_rows(corpus.path(export), tokenizer=None, max_seq_len=4096)
    return sorted(rows, key=lambda r: len(r.input_ids))


def test_training_on_an_srft_export_lowers_the_loss(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, tmp_path: Path
) -> None:
    config = _config(corpus, export_folder, model_dir, tmp_path / "run", max_steps=8)
    result = train(config, progress=False)
    assert result.steps == 8
    assert not result.stopped_early
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(m["trained_tokens"] < m["tokens"] for m in metrics)
    assert {"loss", "lr", "tokens_per_s", "trained_tokens_per_s"} <= set(metrics[0])
    # Checkpoints carry their config and step; the final model loads.
    state = torch.load(tmp_path / "run" / "checkpoint-8" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 8
    assert state["config"]["max_steps"] == 8
    assert 0 < result.trained_token_fraction < 1
    _model(tmp_path / "run" / "final")


@pytest.mark.parametrize("loss_kind", ["logits", "chunked"])
def test_masked_tokens_get_exactly_no_gradient(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, loss_kind: str
) -> None:
    row = next(r for r in _rows(corpus, export_folder) if 0 < r.num_trained < len(r.labels) // 2)
    masked = np.flatnonzero(row.labels == IGNORE_INDEX)[1:]  # position 0 is never a target
    trained = np.flatnonzero(row.labels != IGNORE_INDEX)

    def grads(targets: np.ndarray) -> tuple[float, list[torch.Tensor]]:
        # Every position carries a target; masking is the weight alone, as soft rows do.
        weights = (row.labels != IGNORE_INDEX).astype(np.float32)
        batch = collate([Row("r", row.input_ids, targets, weights)], packing=True)
        model = _model(model_dir)
        install(model, loss_kind)
        loss, _, _ = _step(
            model, [batch], TrainConfig("d", "m", "o"), Distributed(), torch.device("cpu")
        )
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    targets = row.input_ids.copy()
    base_loss, base = grads(targets)
    changed = targets.copy()
    changed[masked] = (changed[masked] + 17) % 4000
    loss, after = grads(changed)
    assert loss == base_loss
    assert all(torch.equal(a, b) for a, b in zip(base, after, strict=True))
    # A trained target is another matter.
    changed = targets.copy()
    changed[trained[len(trained) // 2]] = (changed[trained[len(trained) // 2]] + 17) % 4000
    loss, after = grads(changed)
    assert loss != base_loss
    assert not all(torch.equal(a, b) for a, b in zip(base, after, strict=True))


def test_loss_is_the_mean_over_trained_tokens_of_the_whole_accumulated_batch(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path
) -> None:
    rows = _rows(corpus, export_folder)
    few = min((r for r in rows if r.num_trained > 0), key=lambda r: r.num_trained)
    many = max(rows, key=lambda r: r.num_trained)
    assert many.num_trained > 5 * few.num_trained
    batches = [collate([few], packing=True), collate([many], packing=True)]
    model = _model(model_dir)
    loss, _, trained = _step(
        model, batches, TrainConfig("d", "m", "o"), Distributed(), torch.device("cpu")
    )
    got = [p.grad.clone() for p in model.parameters()]

    # By hand: -log p(target) summed over every trained target of both, over their count.
    reference = _model(model_dir)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    per_batch = []
    for row in (few, many):
        logits = reference(input_ids=torch.from_numpy(row.input_ids)[None]).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        positions = [t for t in range(1, len(row.labels)) if row.labels[t] != IGNORE_INDEX]
        terms = torch.stack([-logp[t - 1, int(row.labels[t])] for t in positions])
        total = total + terms.sum()
        count += len(positions)
        per_batch.append(float(terms.detach().mean()))
    assert trained == count
    by_hand = total / count
    assert loss == pytest.approx(float(by_hand.detach()), rel=1e-6)
    # Not the mean of the two micro-batch means: that would over-weight the short one.
    # (A random model's per-token losses are close, so the two differ only in the 5th digit;
    # the loss itself is checked to 1e-6 above.)
    assert loss != pytest.approx(sum(per_batch) / 2, rel=1e-5)
    by_hand.float().backward()
    for mine, theirs in zip(got, (p.grad for p in reference.parameters()), strict=True):
        assert theirs is not None
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_packed_and_padded_batches_give_the_same_loss(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path
) -> None:
    rows = [r for r in _rows(corpus, export_folder) if r.num_trained > 0][:4]
    model = _model(model_dir).eval()
    with torch.no_grad():
        packed = collate(rows, packing=True)
        padded = collate(rows, packing=False)
        assert packed.num_trained == padded.num_trained
        assert packed.input_ids.shape[0] == 1
        assert padded.input_ids.shape[0] == len(rows)
        a = float(loss_sum(forward(model, packed), packed))
        b = float(loss_sum(forward(model, padded), padded))
        alone = sum(
            float(loss_sum(forward(model, collate([r], True)), collate([r], True))) for r in rows
        )
    assert a == pytest.approx(b, rel=1e-5)
    assert a == pytest.approx(alone, rel=1e-5), "no attention across packed rows"


def test_a_resumed_run_ends_with_the_same_weights(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, tmp_path: Path
) -> None:
    straight = train(_config(corpus, export_folder, model_dir, tmp_path / "a"), progress=False)
    interrupted = train(
        _config(corpus, export_folder, model_dir, tmp_path / "b"), stop_after=3, progress=False
    )
    assert interrupted.stopped_early
    assert interrupted.steps == 3
    resumed = train(
        _config(corpus, export_folder, model_dir, tmp_path / "b", resume=True), progress=False
    )
    assert resumed.steps == straight.steps == 6
    assert resumed.losses == straight.losses[3:]
    a = _model(tmp_path / "a" / "final").state_dict()
    b = _model(tmp_path / "b" / "final").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tampered_shard_is_refused_naming_the_file(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "export"
    shutil.copytree(corpus.path(export_folder), copy)
    shard = copy / export_folder["manifest"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=shard.name):
        load_rows(copy, tokenizer=None, max_seq_len=4096)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "train",
            "--data",
            str(copy),
            "--model",
            str(model_dir),
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert shard.name in run.stderr
    assert "sha256" in run.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_openai_jsonl_rows_tokenize_as_the_exporter_does(
    corpus: Corpus, tokenizers: dict[str, Path], short_ids: list[str], export_folder: dict[str, Any]
) -> None:
    body = {
        "job_ids": [corpus.job_id],
        "policy": "srft",
        "selection": {"trajectory_ids": short_ids},
    }
    # The raw variant: the canonical messages, as tokenized_parquet renders them (the
    # fine-tuning profile of openai_jsonl derives tools and cuts tails, on purpose).
    jsonl = corpus.export(body | {"format": "openai_jsonl_raw"})
    parquet = corpus.export(
        body | {"format": "tokenized_parquet", "tokenizer": str(tokenizers["llama3"])}
    )
    assert jsonl["status"] == parquet["status"] == "completed"
    from_jsonl = load_rows(
        corpus.path(jsonl), tokenizer=str(tokenizers["llama3"]), max_seq_len=10**6
    )
    from_parquet = load_rows(corpus.path(parquet), tokenizer=None, max_seq_len=10**6)

    def key(r: Row) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(r.input_ids.tolist()), tuple(r.labels.tolist())

    assert sorted(map(key, from_jsonl)) == sorted(map(key, from_parquet))


def test_the_cli_trains_and_writes_metrics(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("lr: 0.003\ntokens_per_micro_batch: 4096\nmax_seq_len: 4096\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "train",
            "--config",
            str(config),
            "--data",
            str(corpus.path(export_folder) / "manifest.json"),
            "--model",
            str(model_dir),
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "2",
            "--no-packing",
            "--attn-implementation",
            "eager",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "done at step 2" in run.stdout
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    saved = json.loads((tmp_path / "out" / "final" / "srft_train_config.json").read_text())
    assert saved["packing"] is False
    assert saved["attn_implementation"] == "eager"
    assert saved["lr"] == 0.003


def test_no_packed_row_learns_from_the_row_before_it(model_dir: Path) -> None:
    """Even a row whose first token carries a label: in a pack nothing predicts it, as
    nothing does when the row is alone."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (40, 55, 30):
        ids = rng.integers(10, 3000, size=n).astype(np.int64)
        rows.append(Row(f"r{n}", ids, ids.copy(), None))  # every label set, the first too
    model = _model(model_dir).eval()
    with torch.no_grad():
        packed = collate(rows, packing=True)
        together = float(loss_sum(forward(model, packed), packed))
        alone = sum(
            float(loss_sum(forward(model, b), b)) for b in (collate([r], True) for r in rows)
        )
    assert packed.num_trained == sum(len(r.input_ids) - 1 for r in rows)
    assert together == pytest.approx(alone, rel=1e-5)
