"""The training loop: step-masked loss, accumulated batches, checkpoints that resume exactly.

Loss: cross-entropy over the tokens whose label is not -100 (times their soft weight), divided
by the number of such tokens in the whole accumulated batch, on every rank together: masked
steps contribute exactly nothing, and a long trajectory's tokens weigh what a short one's do.

Runs on one CPU, one GPU, or many under `torchrun` / `accelerate launch` (DDP, or FSDP2 with
`fsdp: true`): the same command, no launcher of ours. SIGTERM (preemption) finishes the step,
saves a checkpoint and exits; `--resume` continues from it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.training import throughput
from app.training.attention import choose_attention, kernels_available
from app.training.batching import MicroBatch, collate, micro_batch_loss, plan
from app.training.config import TrainConfig
from app.training.data import Row, load_rows, split_eval
from app.training.loss import choose_loss, head_supported, install, liger_installed

log = logging.getLogger("srft.train")
STATE = "trainer_state.pt"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Distributed(torch.distributed.get_rank(), world, local)


def _all_sum(value: float, dist: Distributed, device: torch.device) -> float:
    if dist.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    output: Path
    stopped_early: bool
    trained_token_fraction: float


class _Stop:
    """SIGTERM: finish the current step, save, exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_: Any) -> None:
        self.requested = True


def lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, total - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_batches(rows: list[Row], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: rows shuffled by (seed, epoch), grouped by budget."""
    order = np.random.default_rng([config.seed, epoch]).permutation(len(rows)).tolist()
    lengths = [len(r.input_ids) for r in rows]
    return plan(lengths, order, config.tokens_per_micro_batch, config.packing)


def latest_checkpoint(output: Path) -> Path | None:
    found = [
        (int(p.name.split("-")[1]), p)
        for p in output.glob("checkpoint-*")
        if p.is_dir() and (p / STATE).is_file() and p.name.split("-")[1].isdigit()
    ]
    return max(found)[1] if found else None


def train(
    config: TrainConfig,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train as configured. `stop_after`: behave as if stopped (SIGTERM) after that step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = setup_distributed()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    _seed_everything(config.seed)

    tokenizer_name = config.tokenizer or config.model
    rows = load_rows(Path(config.data), tokenizer=tokenizer_name, max_seq_len=config.max_seq_len)
    train_rows, eval_rows = split_eval(rows, config.eval_fraction, config.seed)
    if not train_rows:
        raise ValueError(f"{config.data}: no rows to train on")
    total_tokens = sum(len(r.input_ids) for r in train_rows)
    trained_fraction = sum(r.num_trained for r in train_rows) / max(1, total_tokens)

    checkpoint = latest_checkpoint(output) if config.resume else None
    source = str(checkpoint / "model") if checkpoint else config.model
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model: Any = _load_model(AutoModelForCausalLM, source, dtype, config, device, dist)
    model = model.to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    loss_kind = choose_loss(
        config.loss_implementation, device.type, liger_installed(), head_supported(model)
    )
    install(model, loss_kind)
    if dist.main:
        log.info("loss: %s (asked: %s)", loss_kind, config.loss_implementation)
    if config.torch_compile:
        _compile_layers(model)
    shape = throughput.model_shape(model)
    peak = throughput.peak_tflops(config.peak_tflops, device, config.bf16)
    if dist.main:
        log.info(
            "model: %.1f M parameters that multiply, %d layers; peak for MFU: %s",
            shape.matmul_parameters / 1e6,
            shape.layers,
            "unknown (--peak-tflops)" if peak is None else f"{peak:g} TFLOP/s per device",
        )
    wrapped = _wrap(model, config, dist)
    optimizer = torch.optim.AdamW(
        wrapped.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )

    per_step = config.grad_accum * dist.world
    per_epoch = math.ceil(len(epoch_batches(train_rows, config, 0)) / per_step)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total))
    step, epoch, cursor = 0, 0, 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE, weights_only=False)
        if config.fsdp and dist.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                wrapped,
                optimizer,
                state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, cursor = state["step"], state["epoch"], state["cursor"]
        _set_rng_state(state["rng"][dist.rank] if isinstance(state["rng"], list) else state["rng"])
        if dist.main:
            log.info("resumed from %s at step %d", checkpoint, step)

    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop) if _in_main_thread() else None
    metrics_path = output / "metrics.jsonl"
    losses: list[float] = []
    bar = _progress_bar(total, step) if progress and dist.main else None
    batches = epoch_batches(train_rows, config, epoch)

    def save_checkpoint() -> None:
        _save(
            output / f"checkpoint-{step}",
            model,
            optimizer,
            scheduler,
            config,
            step,
            epoch,
            cursor,
            dist,
        )

    clock = throughput.StepClock(device)
    try:
        while step < total:
            clock.start()
            throughput.reset_peak_memory(device)
            group: list[list[int]] = []
            # Always a full group, crossing into the next epoch if need be: every rank must
            # run the same number of forward/backward passes (DDP and FSDP synchronise them).
            while len(group) < per_step:
                if cursor >= len(batches):
                    epoch, cursor = epoch + 1, 0
                    batches = epoch_batches(train_rows, config, epoch)
                group.append(batches[cursor])
                cursor += 1
            mine = [
                collate([train_rows[i] for i in g], config.packing)
                for g in group[dist.rank :: dist.world]
            ]
            square = _all_sum(sum(b.attention_square for b in mine), dist, device)
            clock.lap("data")
            loss, tokens, trained = _step(wrapped, mine, config, dist, device)
            clock.lap("forward_backward")
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            clock.lap("optimizer")
            step += 1
            losses.append(loss)
            rates = throughput.throughput(
                shape,
                tokens,
                trained,
                int(square),
                clock.total,
                None if peak is None else peak * dist.world,
            )
            if dist.main and (step % config.log_every == 0 or step == total):
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens": tokens,
                    "trained_tokens": trained,
                    **rates,
                    "trained_token_fraction": trained / max(1, tokens),
                    "step_s": clock.total,
                    **{f"{phase}_s": seconds for phase, seconds in clock.seconds.items()},
                    "peak_memory_mib": throughput.peak_memory_bytes(device) / 2**20,
                }
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                log.info(
                    "step %d/%d loss %.4f lr %.2e tokens/s %.0f trained tokens/s %.0f MFU %s "
                    "data/fwd-bwd/optimizer %.3f/%.3f/%.3f s peak memory %.0f MiB",
                    step,
                    total,
                    loss,
                    record["lr"],
                    record["tokens_per_s"],
                    record["trained_tokens_per_s"],
                    _percent(rates["mfu"]),
                    clock.seconds["data"],
                    clock.seconds["forward_backward"],
                    clock.seconds["optimizer"],
                    record["peak_memory_mib"],
                )
            if bar is not None:
                bar(step, loss, rates["tokens_per_s"] or 0.0, rates["mfu"])
            if eval_rows and config.eval_every and step % config.eval_every == 0:
                _evaluate(wrapped, eval_rows, config, dist, device, step, metrics_path)
            stopping = stop.requested or (stop_after is not None and step >= stop_after)
            if stopping or (config.save_every and step % config.save_every == 0):
                save_checkpoint()
            if stopping:
                return TrainResult(step, losses, output, True, trained_fraction)
        if eval_rows:
            _evaluate(wrapped, eval_rows, config, dist, device, step, metrics_path)
        save_checkpoint()
        final_state = _full_model_state(model, config, dist)  # collective under FSDP
        if dist.main:
            model.save_pretrained(output / "final", state_dict=final_state)
            try:
                AutoTokenizer.from_pretrained(tokenizer_name).save_pretrained(output / "final")
            except (OSError, ValueError):
                log.warning("could not save the tokenizer %s with the model", tokenizer_name)
            (output / "final" / "srft_train_config.json").write_text(
                json.dumps(config.as_dict(), indent=2)
            )
        return TrainResult(step, losses, output, False, trained_fraction)
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _load_model(
    auto: Any,
    source: str,
    dtype: torch.dtype,
    config: TrainConfig,
    device: torch.device,
    dist: Distributed,
) -> Any:
    """The model with the attention kernel chosen for the device and packing (the first of
    the candidates it loads with), logged."""
    flash, flex = kernels_available()
    choice = choose_attention(config.attn_implementation, config.packing, device.type, flash, flex)
    failures: list[str] = []
    for candidate in choice.candidates:
        extra = {} if candidate is None else {"attn_implementation": candidate}
        try:
            model = auto.from_pretrained(source, dtype=dtype, **extra)
        except (ValueError, ImportError) as error:
            if len(choice.candidates) == 1:
                raise
            failures.append(f"{candidate}: {error}")
            continue
        if dist.main:
            log.info(
                "attention: %s (%s)%s",
                model.config._attn_implementation,
                choice.reason,
                f"; not usable: {'; '.join(failures)}" if failures else "",
            )
        return model
    raise ValueError(f"no attention kernel loads: {'; '.join(failures)}")


def _compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place: the parameter names (checkpoints) and the
    output layer's loss are untouched, and FSDP2 shards the same modules."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("--compile: the model has no decoder layers at model.layers")
    for layer in layers:
        layer.compile()


def _wrap(model: torch.nn.Module, config: TrainConfig, dist: Distributed) -> torch.nn.Module:
    if dist.world == 1:
        return model
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", model), "layers", [])
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=ids)


def _step(
    model: torch.nn.Module,
    batches: list[MicroBatch],
    config: TrainConfig,
    dist: Distributed,
    device: torch.device,
) -> tuple[float, int, int]:
    """Forward and backward over this rank's micro-batches; returns (loss, tokens, trained)
    for the whole accumulated batch (all ranks)."""
    trained = _all_sum(sum(b.num_trained for b in batches), dist, device)
    tokens = _all_sum(sum(b.num_tokens for b in batches), dist, device)
    # DDP and FSDP average gradients over ranks; the loss is a global sum, so undo that.
    scale = dist.world / max(1.0, trained)
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            summed = micro_batch_loss(model, batch)
        (summed * scale).backward()  # type: ignore[no-untyped-call]
        total += float(summed.detach())
    total = _all_sum(total, dist, device)
    return total / max(1.0, trained), int(tokens), int(trained)


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module,
    rows: list[Row],
    config: TrainConfig,
    dist: Distributed,
    device: torch.device,
    step: int,
    metrics_path: Path,
) -> float:
    model.eval()
    groups = plan(
        [len(r.input_ids) for r in rows],
        list(range(len(rows))),
        config.tokens_per_micro_batch,
        config.packing,
    )
    summed = count = 0.0
    for group in groups[dist.rank :: dist.world]:
        batch = collate([rows[i] for i in group], config.packing).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            summed += float(micro_batch_loss(model, batch))
        count += batch.num_trained
    summed, count = _all_sum(summed, dist, device), _all_sum(count, dist, device)
    model.train()
    loss = summed / max(1.0, count)
    if dist.main:
        with metrics_path.open("a") as handle:
            handle.write(
                json.dumps({"step": step, "eval_loss": loss, "eval_trained_tokens": count}) + "\n"
            )
        log.info("step %d eval loss %.4f", step, loss)
    return loss


def _save(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    step: int,
    epoch: int,
    cursor: int,
    dist: Distributed,
) -> None:
    """Model, optimizer, schedule, data position, RNG of every rank, and the config."""
    rngs: list[Any] = [_rng_state()]
    if dist.world > 1:
        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    model_state = _full_model_state(model, config, dist)
    if config.fsdp and dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        optimizer_state = optimizer.state_dict()
    if not dist.main:
        return
    path.mkdir(parents=True, exist_ok=True)
    target: Any = model
    target.save_pretrained(path / "model", state_dict=model_state)
    torch.save(
        {
            "step": step,
            "epoch": epoch,
            "cursor": cursor,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs if dist.world > 1 else rngs[0],
            "config": config.as_dict(),
        },
        path / STATE,
    )
    (path / "srft_train_config.json").write_text(json.dumps(config.as_dict(), indent=2))


def _full_model_state(
    model: torch.nn.Module, config: TrainConfig, dist: Distributed
) -> dict[str, Any] | None:
    """Under FSDP the parameters are shards: gather full ones (every rank must call this).
    Otherwise None: save_pretrained reads the model itself."""
    if not (config.fsdp and dist.world > 1):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    return state


def _progress_bar(total: int, start: int) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tokens/s"),
        TextColumn("MFU {task.fields[mfu]}"),
        TimeRemainingColumn(),
    )
    progress.start()
    task = progress.add_task("train", total=total, completed=start, loss="-", speed="-", mfu="-")

    class Bar:
        def __call__(self, step: int, loss: float, speed: float, mfu: float | None) -> None:
            progress.update(
                task, completed=step, loss=f"{loss:.4f}", speed=f"{speed:,.0f}", mfu=_percent(mfu)
            )

        def close(self) -> None:
            progress.stop()

    return Bar()
