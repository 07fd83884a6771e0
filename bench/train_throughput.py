"""Training throughput: the loss without full logits, and MFU of real model shapes.

Run from the repository root (through bench/train.py, which hands these two on):

    .venv/bin/python bench/train.py loss            # chunked vs full-logits loss, 152k vocab
    .venv/bin/python bench/train.py mfu --shape 0.5b --budget 1024
    .venv/bin/python bench/train.py mfu --shape 1.5b --device cuda --budget 8192

`loss`: a Llama of --hidden x --layers (default 64 x 2, as small as the issue's example)
with a --vocab-token vocabulary (default 152,064, Qwen2's), one packed micro-batch of each
size in --tokens (chunked loss) and --plain-tokens (full logits), every size in a process of
its own so that each peak is its own: --steps optimizer steps after one warm-up step, each as
the trainer's loop runs it (`trainer._step`, clipping, AdamW). Rows of 500-4,000 random ids,
the second half of each trained. It prints the logits the full-logits path holds (tokens x
vocabulary x 4 bytes in float32), each run's peak memory (RSS sampled every 10 ms on the CPU,
`max_memory_allocated` on CUDA), tokens/s, and for the sizes run both ways how far the peak
fell, against the logits' size.

`mfu`: a Qwen2-0.5B- or 1.5B-shaped model (random weights, bf16 as `bf16: true` trains) on
packed micro-batches of --budget tokens, the chunked loss, the model FLOPs and MFU exactly as
`srft train` logs them (`app/training/throughput.py`), against --peak-tflops; on the CPU, by
default, against the bf16 matrix-multiply rate measured on this machine at start (there is
no data-sheet peak for a shared CPU), so "MFU" there reads as a share of what a large matmul
gets.
"""

# ruff: noqa: E402

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch

from app.training import throughput
from app.training.batching import MicroBatch, collate
from app.training.config import TrainConfig
from app.training.data import IGNORE_INDEX, Row
from app.training.loss import install
from app.training.trainer import Distributed, _step
from bench.common import exit_status, machine_facts, write_report

MiB = 1024 * 1024
GiB = 1024 * MiB
# name: hidden, layers, heads, KV heads, MLP width (Qwen2-0.5B and Qwen2-1.5B)
SHAPES = {
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}
QWEN2_VOCAB = 151_936


def _rows(tokens: int, vocab: int, seed: int, longest: int = 4000) -> list[Row]:
    """Rows of 500-`longest` random ids, `tokens` in all, the second half of each trained."""
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    left = tokens
    while left > 0:
        n = min(left, int(rng.integers(min(500, longest), longest + 1)))
        ids = rng.integers(0, vocab, size=n).astype(np.int64)
        labels = ids.copy()
        labels[: n // 2] = IGNORE_INDEX
        rows.append(Row(f"r{len(rows)}", ids, labels, None))
        left -= n
    return rows


class _Stepper:
    """One model and AdamW, stepped as the trainer's loop steps them, timed."""

    def __init__(self, model: Any, device: torch.device, bf16: bool) -> None:
        self.model = model
        self.device = device
        self.config = TrainConfig(data="-", model="-", output="-", bf16=bf16)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    def step(self, batches: list[MicroBatch]) -> dict[str, float]:
        clock = throughput.StepClock(self.device)
        clock.start()
        _step(self.model, batches, self.config, Distributed(), self.device)
        clock.lap("forward_backward")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        return dict(clock.seconds)


def _peak_sampler(device: torch.device) -> Any:
    from bench.train import Memory

    return Memory(device)


# ------------------------------------------------------------------------ loss


def loss_case(kind: str, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run (in its own process): the peak memory and speed of `kind` at `tokens`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 32)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(8192, tokens),
        tie_word_embeddings=False,
    )
    with device:
        model = LlamaForCausalLM(config).train()
    install(model, kind)
    batch = collate(_rows(tokens, args.vocab, args.seed), packing=True)
    stepper = _Stepper(model, device, bf16=False)
    memory = _peak_sampler(device)
    try:
        stepper.step([batch])  # warm-up: AdamW's state, allocator pools
        seconds = []
        memory.reset()
        for _ in range(args.steps):
            seconds.append(sum(stepper.step([batch]).values()))
        peak, _ = memory.peak()
    finally:
        memory.close()
    return {
        "kind": kind,
        "tokens": tokens,
        "trained": batch.num_trained,
        "median_s": statistics.median(seconds),
        "tokens_per_s": tokens / statistics.median(seconds),
        "peak_bytes": peak,
        "logits_bytes": tokens * args.vocab * 4,
    }


def loss_suite(args: argparse.Namespace) -> int:
    machine = machine_facts()
    print(
        f"loss without full logits: Llama {args.hidden} x {args.layers}, vocabulary "
        f"{args.vocab:,}, float32, {args.device}; one packed micro-batch a step, {args.steps} "
        f"timed step(s) after one warm-up, each size in its own process",
        flush=True,
    )
    cases = [("logits", t) for t in args.plain_tokens] + [("chunked", t) for t in args.tokens]
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    for kind, tokens in cases:
        command = [
            sys.executable,
            str(Path(__file__).resolve().parent / "train.py"),
            "loss",
            "--case",
            f"{kind}:{tokens}",
            *_forwarded(args),
        ]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"{kind} at {tokens:,} tokens failed: {run.stderr[-2000:]}")
            print(f"  {kind:<8} {tokens:>7,} tokens: FAILED", flush=True)
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"  {kind:<8} {tokens:>7,} tokens: peak {result['peak_bytes'] / MiB:>8,.0f} MiB, "
            f"{result['tokens_per_s']:>7,.0f} tokens/s ({result['median_s']:.2f} s a step)",
            flush=True,
        )
    print()
    header = (
        f"{'loss':<8} {'tokens':>7} {'trained':>7} {'logits (fp32)':>13} {'peak MiB':>9} "
        f"{'tokens/s':>9} {'s/step':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['kind']:<8} {r['tokens']:>7,} {r['trained']:>7,} "
            f"{r['logits_bytes'] / MiB:>9,.0f} MiB {r['peak_bytes'] / MiB:>9,.0f} "
            f"{r['tokens_per_s']:>9,.0f} {r['median_s']:>7.2f}"
        )
    falls = []
    for plain in (r for r in results if r["kind"] == "logits"):
        chunked = next(
            (r for r in results if r["kind"] == "chunked" and r["tokens"] == plain["tokens"]),
            None,
        )
        if chunked is None:
            continue
        fall = plain["peak_bytes"] - chunked["peak_bytes"]
        falls.append(
            {
                "tokens": plain["tokens"],
                "fall_bytes": fall,
                "logits_bytes": plain["logits_bytes"],
                "speed_ratio": chunked["tokens_per_s"] / plain["tokens_per_s"],
            }
        )
        met = fall >= plain["logits_bytes"]
        print(
            f"at {plain['tokens']:,} tokens: peak fell by {fall / MiB:,.0f} MiB "
            f"({plain['peak_bytes'] / max(chunked['peak_bytes'], 1):.1f}x lower), the logits "
            f"are {plain['logits_bytes'] / MiB:,.0f} MiB: fall >= logits "
            f"{'met' if met else 'NOT met'}; chunked/full tokens/s "
            f"{chunked['tokens_per_s'] / plain['tokens_per_s']:.2f}"
        )
        if not met:
            problems.append(f"at {plain['tokens']} tokens the peak fell less than the logits")
    print(f"machine: {machine['cpu_model'] or 'unknown CPU'}, {machine['usable_cpus']} CPUs")
    if args.json_path is not None:
        write_report(
            args.json_path,
            {"suite": "loss", "machine": machine, "runs": results, "falls": falls},
        )
    return exit_status(problems)


def _forwarded(args: argparse.Namespace) -> list[str]:
    return [
        *["--device", args.device, "--hidden", str(args.hidden), "--layers", str(args.layers)],
        *["--vocab", str(args.vocab), "--steps", str(args.steps), "--seed", str(args.seed)],
    ]


# ------------------------------------------------------------------------ MFU


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What a 4096^3 matrix multiply reaches here (the best of three)."""
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    b = torch.randn(4096, 4096, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return 2 * 4096**3 / best / 1e12


def mfu_suite(args: argparse.Namespace) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(args.device)
    machine = machine_facts()
    hidden, layers, heads, kv_heads, mlp = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    measured = matmul_tflops(device, dtype)
    known = throughput.peak_tflops(None, device, args.bf16)
    peak = args.peak_tflops or known or measured
    source = "given" if args.peak_tflops else "data sheet" if known else "measured matmul"
    config = Qwen2Config(
        vocab_size=QWEN2_VOCAB,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(32768, args.budget),
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    with device:
        model = Qwen2ForCausalLM._from_config(
            config, attn_implementation=args.attn, dtype=dtype
        ).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    install(model, args.loss)
    shape = throughput.model_shape(model)
    rows = _rows(args.budget * (args.steps + 2), QWEN2_VOCAB, args.seed, min(4000, args.budget))
    from app.training.batching import plan

    groups = plan([len(r.input_ids) for r in rows], list(range(len(rows))), args.budget, True)
    batches = [collate([rows[i] for i in g], packing=True).to(device) for g in groups]
    stepper = _Stepper(model, device, bf16=args.bf16)
    memory = _peak_sampler(device)
    print(
        f"MFU: Qwen2-{args.shape}-shaped, {sum(p.numel() for p in model.parameters()) / 1e6:,.0f}"
        f" M parameters ({shape.matmul_parameters / 1e6:,.0f} M that multiply), "
        f"{'bf16' if args.bf16 else 'float32'}, {model.config._attn_implementation}, loss "
        f"{args.loss}, {args.device}; packed micro-batches of <= {args.budget:,} tokens; peak "
        f"{peak:.3f} TFLOP/s ({source}; a {dtype} 4096^3 matmul reaches {measured:.3f} here)",
        flush=True,
    )
    records = []
    try:
        for index, batch in enumerate(batches[: args.steps + 1]):
            memory.reset()
            split = stepper.step([batch])
            seconds = sum(split.values())
            rates = throughput.throughput(
                shape, batch.num_tokens, batch.num_trained, batch.attention_square, seconds, peak
            )
            peak_bytes, _ = memory.peak()
            record = {
                "step": index,
                "warm_up": index == 0,
                "tokens": batch.num_tokens,
                **rates,
                **{f"{k}_s": v for k, v in split.items()},
                "peak_bytes": peak_bytes,
            }
            records.append(record)
            print(
                f"  {'warm-up' if index == 0 else 'step'} {index}: {batch.num_tokens:,} tokens "
                f"in {seconds:.2f} s (forward/backward {split['forward_backward']:.2f}, "
                f"optimizer {split['optimizer']:.2f}): {rates['tokens_per_s']:,.0f} tokens/s, "
                f"{rates['model_tflops_per_s']:.3f} model TFLOP/s, MFU "
                f"{100 * (rates['mfu'] or 0):.1f}%, peak {peak_bytes / GiB:.1f} GiB",
                flush=True,
            )
    finally:
        memory.close()
    timed = [r for r in records if not r["warm_up"]]
    mfu = statistics.median(r["mfu"] for r in timed)
    speed = statistics.median(r["tokens_per_s"] for r in timed)
    print(f"median of {len(timed)} step(s): {speed:,.0f} tokens/s, MFU {100 * mfu:.1f}%")
    print(f"machine: {machine['cpu_model'] or 'unknown CPU'}, {machine['usable_cpus']} CPUs")
    if args.json_path is not None:
        write_report(
            args.json_path,
            {
                "suite": "mfu",
                "shape": args.shape,
                "machine": machine,
                "peak_tflops": peak,
                "matmul_tflops": measured,
                "steps": records,
            },
        )
    return 0


# ------------------------------------------------------------------------ main


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(suite: str, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"bench/train.py {suite}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    parser.add_argument("--json", type=Path, dest="json_path")
    if suite == "loss":
        parser.add_argument("--hidden", type=int, default=64)
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--vocab", type=int, default=152_064)
        parser.add_argument(
            "--tokens", type=_sizes, default=[8192, 16384, 32768], help="chunked-loss sizes"
        )
        parser.add_argument(
            "--plain-tokens",
            type=_sizes,
            default=[4096, 8192],
            help="full-logits sizes (mind the memory: ~3 x tokens x vocab x 4 bytes)",
        )
        parser.add_argument("--case", help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        if args.case:
            kind, tokens = args.case.split(":")
            print(json.dumps(loss_case(kind, int(tokens), args)))
            return 0
        return loss_suite(args)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--budget", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--loss", default="chunked", help="chunked, liger or logits")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    return mfu_suite(parser.parse_args(argv))
