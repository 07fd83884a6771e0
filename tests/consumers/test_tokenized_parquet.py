"""A `tokenized_parquet` export trained on by its consumers, for real: TRL's `SFTTrainer`
(padded and packed), the Hugging Face `Trainer` with a padding collator, and `srft train`, each
for one epoch on a tiny random Llama. What reaches the model is counted batch by batch: every
export row once, its targets exactly the export's labels, which are exactly the assistant turns
the chat template marks and the verdicts keep, and in all the manifest's trained tokens.

Also the configurations the README warns against, failing as it says, and the counting itself
catching an export whose labels are shifted by one or that trains a masked turn."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.consumers.conftest import MAX_SEQ_LEN, ParquetExport
from tests.consumers.trained_tokens import (
    IGNORE_INDEX,
    check_one_epoch,
    count_targets,
    export_rows,
)

pytestmark = pytest.mark.slow

BATCH_SIZE = 2


class Recorder:
    """The keyword arguments of every forward call of a model (labels included), as given."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert not args, "inputs are passed by keyword"
        self.calls.append(
            {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        )


def _model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return model


def _dataset(data_files: str) -> Any:
    from datasets import load_dataset

    return load_dataset("parquet", data_files=data_files, split="train")


def _training_args(out: Path) -> dict[str, Any]:
    """What any run here needs on CPU, whatever the trainer."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH_SIZE,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _sft_trainer(
    export: ParquetExport, model_dir: Path, out: Path, dataset: Any = None, **config: Any
) -> tuple[Any, Recorder]:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = _model(model_dir)
    recorder = Recorder(model)
    # bf16 (TRL's default) fails on CPU; activation checkpointing (its default) only costs time.
    args = SFTConfig(
        **_training_args(out),
        bf16=False,
        activation_checkpointing=False,
        **config,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(export.data_files) if dataset is None else dataset,
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
    )
    return trainer, recorder


def _targets(rows: Any) -> int:
    return sum(sum(1 for label in row if label != IGNORE_INDEX) for row in rows)


def test_the_export_trains_the_turns_the_template_marks_and_the_verdicts_keep(
    parquet_export: ParquetExport,
) -> None:
    export = parquet_export
    counts = export.manifest["counts"]
    assert counts["rows"]["split_rows"] > 0  # split rows are among those checked
    assert counts["steps"]["steps_masked"] > 0
    assert counts["tokens"]["straddling_span_edges"] == 0
    assert sum(r.num_trained_tokens for r in export.rows) == export.trained_tokens
    assert sum(s["trained_tokens"] for s in export.manifest["shards"]) == export.trained_tokens
    for row in export.rows:
        assert row.trained == export.expected[row.key].trained, (row.trajectory_id, row.part)
        trained = sorted(row.trained)
        assert np.array_equal(row.labels[trained], row.input_ids[trained])  # not shifted
        assert len(row.input_ids) <= MAX_SEQ_LEN


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_trl_sft_trainer_trains_exactly_the_exported_tokens(
    parquet_export: ParquetExport, model_dir: Path, tmp_path: Path, packing: bool
) -> None:
    trainer, recorder = _sft_trainer(
        parquet_export,
        model_dir,
        tmp_path,
        assistant_only_loss=False,
        max_length=MAX_SEQ_LEN,
        packing=packing,
    )
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    tally = count_targets(recorder.calls)
    check_one_epoch(
        tally, parquet_export.rows, parquet_export.trained_tokens, parquet_export.expected
    )
    if not packing:
        assert tally.batches == -(-len(parquet_export.rows) // BATCH_SIZE)
        return
    # Best-fit decreasing packs whole rows into padding-free batches: position ids restart
    # per row (checked by the count), and no row attends to the one before it.
    assert trainer.args.packing_strategy == "bfd"
    assert tally.batches < len(parquet_export.rows) / BATCH_SIZE
    pack = max(recorder.calls, key=lambda call: int((call["position_ids"] == 0).sum()))
    assert "attention_mask" not in pack
    inputs = {k: v for k, v in pack.items() if k not in ("labels", "fused_lm_head")}
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        starts = [*torch.nonzero(pack["position_ids"][0] == 0).flatten().tolist(), packed.shape[0]]
        assert len(starts) > 2
        for start, end in itertools.pairwise(starts):
            alone = model(input_ids=pack["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)


def test_hf_trainer_with_a_padding_collator_trains_exactly_the_exported_tokens(
    parquet_export: ParquetExport, model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = _model(model_dir)
    recorder = Recorder(model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_training_args(tmp_path)),
        train_dataset=_dataset(parquet_export.data_files),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    tally = count_targets(recorder.calls)
    check_one_epoch(
        tally, parquet_export.rows, parquet_export.trained_tokens, parquet_export.expected
    )
    assert tally.batches == -(-len(parquet_export.rows) // BATCH_SIZE)
    # The default remove_unused_columns dropped the columns the model does not take.
    extra = {"assistant_masks", "trajectory_id", "part", "num_tokens", "num_trained_tokens"}
    assert not extra & {key for call in recorder.calls for key in call}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_srft_train_trains_exactly_the_exported_tokens(
    parquet_export: ParquetExport,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    packing: bool,
) -> None:
    from app.training import trainer as trainer_module
    from app.training.batching import MicroBatch, micro_batch_loss
    from app.training.config import TrainConfig

    batches: list[dict[str, Any]] = []

    def recording(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
        batches.append(
            {
                "input_ids": batch.input_ids,
                "labels": batch.labels,
                "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids,
            }
        )
        return micro_batch_loss(model, batch)

    monkeypatch.setattr(trainer_module, "micro_batch_loss", recording)
    config = TrainConfig(
        data=str(parquet_export.folder),
        model=str(model_dir),
        output=str(tmp_path / "run"),
        epochs=1,
        lr=1e-3,
        tokens_per_micro_batch=2 * MAX_SEQ_LEN,
        max_seq_len=MAX_SEQ_LEN,
        packing=packing,
        save_every=0,
    )
    result = trainer_module.train(config, progress=False)
    assert not result.stopped_early
    check_one_epoch(
        count_targets(batches),
        parquet_export.rows,
        parquet_export.trained_tokens,
        parquet_export.expected,
    )


def test_trl_settings_the_readme_warns_against(
    parquet_export: ParquetExport, model_dir: Path, tmp_path: Path
) -> None:
    # assistant_only_loss=True is for conversational rows, not pre-tokenized ones.
    with pytest.raises(ValueError, match="the dataset is not conversational"):
        _sft_trainer(parquet_export, model_dir, tmp_path, assistant_only_loss=True)
    # The default max_length (1024) cuts every longer row from the end and drops the rows
    # left with nothing trained: most of what the export trains is lost, silently.
    trainer, _ = _sft_trainer(parquet_export, model_dir, tmp_path)
    assert trainer.args.max_length == 1024
    prepared = trainer.train_dataset
    kept = _targets(prepared["labels"])
    assert len(prepared) < len(parquet_export.rows)
    assert kept < parquet_export.trained_tokens / 2


@pytest.mark.parametrize(
    ("with_tokenizer", "error"),
    [
        # default_data_collator: torch.tensor() of ragged lists.
        (False, "expected sequence of length"),
        # DataCollatorWithPadding: pads input_ids and attention_mask, not labels.
        (True, "Unable to create tensor.*`labels`"),
    ],
    ids=["no-tokenizer", "tokenizer"],
)
def test_hf_trainer_default_collators_fail_on_rows_of_unequal_length(
    parquet_export: ParquetExport,
    model_dir: Path,
    tmp_path: Path,
    with_tokenizer: bool,
    error: str,
) -> None:
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if with_tokenizer else None
    trainer = Trainer(
        model=_model(model_dir),
        args=TrainingArguments(**_training_args(tmp_path)),
        train_dataset=_dataset(parquet_export.data_files),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=error):
        trainer.train()


@pytest.fixture
def damaged_export(parquet_export: ParquetExport, tmp_path: Path) -> ParquetExport:
    """A copy of the export with two rows damaged, the manifest left as it was: in one the
    labels are shifted by one (pre-shifted, as for a trainer that does not shift), in the
    other a masked assistant turn is trained."""
    rows = parquet_export.rows
    unmasked = next(r for r in rows if parquet_export.expected[r.key].masked_turns)
    start, end = parquet_export.expected[unmasked.key].masked_turns[0]
    shifted = next(r for r in rows if r is not unmasked and r.trained)

    folder = tmp_path / "damaged"
    (folder / "data").mkdir(parents=True)
    for file in sorted((parquet_export.folder / "data").glob("*.parquet")):
        table = pq.read_table(file)
        labels = table.column("labels").to_pylist()
        for i, ids in enumerate(table.column("input_ids").to_pylist()):
            if tuple(ids) == shifted.key:
                labels[i] = [*labels[i][1:], IGNORE_INDEX]
            elif tuple(ids) == unmasked.key:
                labels[i][start:end] = ids[start:end]
        field = table.schema.field("labels")
        table = table.set_column(
            table.schema.get_field_index("labels"), field, pa.array(labels, type=field.type)
        )
        pq.write_table(table, folder / "data" / file.name)
    damaged = copy.copy(parquet_export)
    damaged.folder = folder
    damaged.rows = [r for r in export_rows(folder) if r.key in (shifted.key, unmasked.key)]
    assert len(damaged.rows) == 2
    return damaged


def test_the_count_catches_shifted_labels_and_a_trained_masked_turn(
    parquet_export: ParquetExport, damaged_export: ParquetExport, model_dir: Path, tmp_path: Path
) -> None:
    keys = {row.key for row in damaged_export.rows}
    dataset = _dataset(damaged_export.data_files).filter(lambda r: tuple(r["input_ids"]) in keys)
    trainer, recorder = _sft_trainer(
        damaged_export,
        model_dir,
        tmp_path,
        dataset=dataset,
        assistant_only_loss=False,
        max_length=MAX_SEQ_LEN,
    )
    trainer.train()
    manifest_count = sum(len(parquet_export.expected[key].trained) for key in keys)
    with pytest.raises(AssertionError) as caught:
        check_one_epoch(
            count_targets(recorder.calls),
            damaged_export.rows,
            manifest_count,
            damaged_export.expected,
        )
    message = str(caught.value)
    assert "(labels shifted by one)" in message
    assert "positions that the chat template and the verdicts do not" in message
    assert f"targets in one epoch, the manifest says {manifest_count}" in message
