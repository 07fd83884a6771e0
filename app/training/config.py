"""The training configuration: one dataclass, from a YAML/JSON file and command-line options."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
# How the loss is computed (app/training/loss.py).
LOSS_IMPLEMENTATIONS = ("auto", "chunked", "liger", "logits")
REQUIRED = object()


def _option(default: Any, help: str, flag: str | None = None) -> Any:
    """A field that is also an `srft train` option: its help, and its flag if not --name.
    `REQUIRED` as the default: the field has none (the file or the command line gives it)."""
    metadata = {"help": help, "flag": flag}
    if default is REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every training option. `srft train` makes one command-line option of each field (its
    help and flag are the field's metadata); a config file may give any of them."""

    data: str = _option(REQUIRED, "Export folder (as `srft pull` writes it) or manifest.")
    model: str = _option(REQUIRED, "Base model: hub id or path.")
    output: str = _option(REQUIRED, "Checkpoints, metrics.jsonl and the final model go here.")
    tokenizer: str | None = _option(None, "For openai_jsonl exports; default: the model's.")
    epochs: float = _option(1.0, "Passes over the data.")
    max_steps: int | None = _option(None, "Optimizer steps; overrides --epochs.")
    lr: float = _option(1e-5, "Peak learning rate.")
    lr_schedule: str = _option("cosine", "cosine, linear or constant.")
    warmup_steps: int = _option(0, "Linear warm-up steps.")
    weight_decay: float = _option(0.0, "AdamW weight decay.")
    max_grad_norm: float = _option(1.0, "Gradient clipping norm.")
    tokens_per_micro_batch: int = _option(16_384, "Token budget of a micro-batch.")
    grad_accum: int = _option(1, "Micro-batches per optimizer step.")
    max_seq_len: int = _option(32_768, "Longest row, in tokens.")
    packing: bool = _option(True, "Pack rows into micro-batches.", "--packing/--no-packing")
    bf16: bool = _option(False, "Train in bfloat16.", "--bf16/--no-bf16")
    gradient_checkpointing: bool = _option(
        False,
        "Recompute activations in the backward pass.",
        "--gradient-checkpointing/--no-gradient-checkpointing",
    )
    fsdp: bool = _option(
        False,
        "With torchrun / accelerate launch: shard (FSDP2) instead of DDP.",
        "--fsdp/--no-fsdp",
    )
    # None: chosen (app/training/attention.py): with packing on CUDA a kernel that attends
    # within each row (flash_attention_2, else flex_attention); otherwise the model's default.
    attn_implementation: str | None = _option(
        None,
        "The model's attention kernel: sdpa, eager, flex_attention, flash_attention_2; "
        "default: chosen for the device and packing (logged).",
    )
    loss_implementation: str = _option(
        "auto",
        "auto, chunked (loss from hidden states, no full logits), liger (CUDA, the liger "
        "extra) or logits (the full logits).",
    )
    torch_compile: bool = _option(
        False, "torch.compile the decoder layers.", "--compile/--no-compile"
    )
    peak_tflops: float | None = _option(
        None, "The device's peak TFLOP/s for MFU; default: known GPUs in bf16."
    )
    seed: int = _option(0, "Seed of the data order, the split and the initialisation.")
    eval_fraction: float = _option(0.0, "Held-out share of rows.")
    eval_every: int = _option(
        0, "Evaluate every N optimizer steps; 0: at the end only (with an eval split)."
    )
    save_every: int = _option(0, "Checkpoint every N optimizer steps; 0: at the end only.")
    log_every: int = _option(1, "Log every N optimizer steps.")
    resume: bool = _option(False, "Continue from the latest checkpoint in --output.", "--resume")

    def __post_init__(self) -> None:
        problems = []
        if self.lr_schedule not in SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(SCHEDULES)}")
        for name in ("tokens_per_micro_batch", "grad_accum", "max_seq_len", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1")
        if self.epochs <= 0:
            problems.append("epochs must be positive")
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            problems.append(f"loss_implementation must be one of {', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            problems.append("peak_tflops must be positive")
        if not 0 <= self.eval_fraction < 1:
            problems.append("eval_fraction must be in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
        """A config file (YAML or JSON) with command-line values on top (None = not given)."""
        values: dict[str, Any] = {}
        if path is not None:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of option names to values")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown options {unknown}; known: {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"missing {missing}: give them as options or in the config file")
        return cls(**values)
