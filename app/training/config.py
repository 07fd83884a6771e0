"""The training configuration: one dataclass, from a YAML/JSON file and command-line options."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    data: str  # an export folder (as `srft pull` writes it) or its manifest.json
    model: str  # hub id or local path of the base model
    output: str  # checkpoints, metrics.jsonl and the final model go here
    tokenizer: str | None = None  # for openai_jsonl exports; defaults to the model's
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 1e-5
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    tokens_per_micro_batch: int = 16_384
    grad_accum: int = 1
    max_seq_len: int = 32_768
    packing: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # with torchrun / accelerate launch: shard (FSDP2) instead of DDP
    # The model's attention kernel (transformers' attn_implementation). With packing,
    # "flash_attention_2" (GPU) attends within each row only; the default (sdpa/eager) builds
    # a dense block-diagonal mask and pays for the whole pack (bench/train.py).
    attn_implementation: str | None = None
    seed: int = 0
    eval_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps; 0 = at the end only (if there is an eval split)
    save_every: int = 0  # optimizer steps; 0 = at the end only
    log_every: int = 1
    resume: bool = False  # continue from the latest checkpoint in `output`

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
        missing = [name for name in ("data", "model", "output") if name not in values]
        if missing:
            raise ValueError(f"missing {missing}: give them as options or in the config file")
        return cls(**values)
