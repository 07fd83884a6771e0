"""Training step cost: SRFT step masking next to plain assistant-only SFT on the same batches,
and packed micro-batches next to padded ones on the same rows.

Run from the repository root:

    .venv/bin/python bench/train.py                      # tiny random Llama on the CPU
    .venv/bin/python bench/train.py --quick              # a quick look
    .venv/bin/python bench/train.py --json train.json    # also write the numbers
    .venv/bin/python bench/train.py --device cuda --model-size small-real   # a GPU
    .venv/bin/python bench/train.py --packed-attn flex_attention   # + packed, flex_attention
    .venv/bin/python bench/train.py loss    # chunked vs full-logits loss (train_throughput.py)
    .venv/bin/python bench/train.py mfu     # MFU of a 0.5B/1.5B shape (train_throughput.py)

What it does:

1. not timed: builds the ChatML test tokenizer (`tests/chat_tokenizers.py`, no downloads) and a
   causal LM with random weights: `tiny` is a Llama of --hidden x --layers (default 64 x 2),
   `small-real` a Qwen2-0.5B-shaped model (896 x 24, 14 heads, 2 KV heads, 151,936 tokens,
   tied embeddings) in bf16 as the trainer runs it with `bf16: true`;
2. not timed: --rows synthetic rows (no database) of --min-len..--max-len tokens (log-uniform):
   a system and a user turn, then assistant and tool turns in ChatML framing, with random ids.
   Two variants share the ids: (B) plain assistant-only SFT, every assistant turn's content and
   `<|im_end|>` trained; (A) SRFT step masking, the same but --mask-share of the assistant turns
   (seeded) masked to -100, as an `srft` export writes mistakes;
3. checks: the packed and padded forward over the same rows give the same `loss_sum` total
   (relative 1e-4, float32, before any step) and the same trained-token count;
4. step masking: the trainer's plan (`epoch_batches`, packing as the trainer's default) cut
   into steps of --accum micro-batches; A and B run the same steps alternately (AB, BA, AB...)
   on one model and optimizer: `trainer._step` (forward and backward, global normalisation,
   world 1), `clip_grad_norm_`, AdamW's step and `zero_grad`, as the trainer's loop does.
   --warmup steps of each are not timed. It prints the median and mean step time of both and
   A/B (target: within 3%), with the median of the paired ratios and its bootstrap 95% interval;
5. packing vs padding: the same rows (variant A) planned packed and padded under the same
   --budget; every pass is one optimizer step over all rows, the gradient accumulated over the
   micro-batches; passes alternate (packed, padded, padded, packed...), --passes of each after
   a warm-up step. It prints real tokens/s (padding not counted), padded/packed ratio, padding
   waste and how full the micro-batches are;
   With --packed-attn, the packed batches also run on a copy of the model with that
   attention kernel: a third training run on CUDA; on the CPU, where flex_attention has no
   backward, a forward-only comparison of padded, packed sdpa and packed with that kernel;
6. peak memory of each run: the process's RSS sampled every 10 ms on the CPU,
   `torch.cuda.max_memory_allocated` (and reserved) on CUDA.

It exits 1 if a check fails (a loss not finite, A not training fewer tokens than B, A and B
batches with different ids, packed and padded losses or counts differing). Missing the 3%
target does not fail the run; it is printed.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch

from app.training.batching import MicroBatch, collate, forward, loss_sum, micro_batch_loss
from app.training.config import TrainConfig
from app.training.data import IGNORE_INDEX, Row
from app.training.loss import choose_loss, install, liger_installed
from app.training.trainer import Distributed, _step, epoch_batches
from bench.common import (
    exit_status,
    machine_facts,
    options_for_json,
    run_cleaning_up,
    write_report,
)
from tests.chat_tokenizers import build_tokenizer

TARGET_TOLERANCE = 0.03  # |A/B - 1| at most this
LOSS_TOLERANCE = 1e-4  # relative, packed vs padded loss_sum total
SAMPLE_S = 0.01  # RSS sampling period on the CPU
BOOTSTRAP = 2000
MiB = 1024 * 1024
SIZES = ("tiny", "small-real")

# Per model size: hidden, layers, rows, budget, steps, warmup, passes, bf16.
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden": 64,
        "layers": 2,
        "rows": 48,
        "budget": 4096,
        "steps": 60,
        "warmup": 3,
        "passes": 3,
        "bf16": False,
    },
    "small-real": {
        "hidden": 896,
        "layers": 24,
        "rows": 96,
        "budget": 8192,
        "steps": 30,
        "warmup": 3,
        "passes": 3,
        "bf16": True,
    },
}
QUICK = {"rows": 10, "steps": 6, "warmup": 1, "passes": 1}


# ------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    device: str
    model_size: str
    hidden: int
    layers: int
    attn: str
    bf16: bool
    rows: int
    min_len: int
    max_len: int
    mask_share: float
    budget: int
    accum: int
    steps: int
    warmup: int
    passes: int
    lr: float
    seed: int
    json_path: Path | None
    packed_attn: str | None = None
    loss: str = "auto"


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Step time of SRFT step masking vs plain assistant-only SFT on the same batches, "
            "and tokens/s of packed vs padded micro-batches, on a random causal LM."
        )
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--model-size",
        choices=SIZES,
        default="tiny",
        help="tiny: a small Llama (--hidden x --layers); small-real: Qwen2-0.5B-shaped, bf16 "
        "(default tiny)",
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="hidden size (default 64 tiny, 896 small-real)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="layers (default 2 tiny, 24 small-real)"
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        help="attn_implementation of the model (default sdpa, what the trainer gets)",
    )
    parser.add_argument(
        "--packed-attn",
        default=None,
        help="also run the packed batches on a copy of the model with this attn_implementation "
        "(flex_attention: attention within each row only)",
    )
    parser.add_argument(
        "--loss",
        default="auto",
        help="the trainer's loss_implementation (default auto: chunked on the CPU)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 weights and autocast, as the trainer's bf16: true (default: on for "
        "small-real only)",
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="synthetic rows (default 48 tiny, 96 small-real)"
    )
    parser.add_argument(
        "--min-len", type=int, default=500, help="shortest row in tokens (default 500)"
    )
    parser.add_argument(
        "--max-len", type=int, default=4000, help="longest row in tokens (default 4000)"
    )
    parser.add_argument(
        "--mask-share",
        type=float,
        default=0.2,
        help="share of assistant turns masked in the SRFT variant (default 0.2)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="tokens_per_micro_batch (default 4096 tiny, 8192 small-real)",
    )
    parser.add_argument(
        "--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps of each variant, A and B (default 60 tiny, 30 small-real)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps of each first (default 3)"
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=None,
        help="timed passes over all rows, packed and padded each (default 3)",
    )
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quick look: 10 rows, 6 steps, 1 warm-up step, 1 pass unless given",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and weights seed (default 0)")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the numbers here")
    args = parser.parse_args(argv)

    base = dict(DEFAULTS[args.model_size])
    if args.quick:
        base.update(QUICK)

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here")
    if device != "cpu" and not device.startswith("cuda"):
        parser.error("--device must be cpu, cuda or cuda:N")
    options = Options(
        device=device,
        model_size=args.model_size,
        hidden=pick("hidden"),
        layers=pick("layers"),
        attn=args.attn,
        bf16=pick("bf16"),
        rows=pick("rows"),
        min_len=args.min_len,
        max_len=args.max_len,
        mask_share=args.mask_share,
        budget=pick("budget"),
        accum=args.accum,
        steps=pick("steps"),
        warmup=pick("warmup"),
        passes=pick("passes"),
        lr=args.lr,
        seed=args.seed,
        json_path=args.json_path,
        packed_attn=args.packed_attn,
        loss=args.loss,
    )
    if min(options.rows, options.steps, options.passes, options.accum, options.budget) < 1:
        parser.error("--rows, --steps, --passes, --accum and --budget must be at least 1")
    if options.warmup < 0 or options.layers < 1 or options.hidden < 32:
        parser.error("--warmup must be >= 0, --layers >= 1, --hidden >= 32")
    if not 16 <= options.min_len <= options.max_len:
        parser.error("need 16 <= --min-len <= --max-len")
    if not 0 < options.mask_share < 1:
        parser.error("--mask-share must be between 0 and 1")
    return options


# ------------------------------------------------------------------------ data


@dataclass
class Data:
    masked: list[Row]  # A: SRFT step masking
    plain: list[Row]  # B: every assistant turn trained
    assistant_turns: int
    masked_turns: int

    @property
    def tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.plain)


class Framing:
    """ChatML ids around each turn, from the test tokenizer: `<|im_start|>role\\n` before,
    `<|im_end|>` and `\\n` after; the content ids are random."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        def encode(text: str) -> np.ndarray:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return np.asarray(ids, dtype=np.int64)

        self.heads = {
            role: encode(f"<|im_start|>{role}\n")
            for role in ("system", "user", "assistant", "tool")
        }
        self.end = encode("<|im_end|>")
        self.newline = encode("\n")
        self.content_low = max(tokenizer.all_special_ids) + 1
        self.vocab = vocab


class _RowParts:
    """The turns of one row so far: ids, B's labels and A's labels."""

    def __init__(self, framing: Framing, rng: np.random.Generator) -> None:
        self.framing = framing
        self.rng = rng
        self.ids: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []  # B: every assistant turn
        self.kept: list[np.ndarray] = []  # A: masked turns left out
        self.size = 0

    def add(self, role: str, content: int, train: bool = False, mask: bool = False) -> None:
        framing = self.framing
        body = self.rng.integers(framing.content_low, framing.vocab, content, dtype=np.int64)
        head = framing.heads[role]
        piece = np.concatenate([head, body, framing.end, framing.newline])
        label = np.full(len(piece), IGNORE_INDEX, dtype=np.int64)
        if train:  # the generation block: the content and <|im_end|>
            span = slice(len(head), len(head) + content + len(framing.end))
            label[span] = piece[span]
        self.ids.append(piece)
        self.trained.append(label)
        self.kept.append(np.full(len(piece), IGNORE_INDEX, dtype=np.int64) if mask else label)
        self.size += len(piece)


def make_data(options: Options, framing: Framing) -> Data:
    """--rows rows of ChatML-framed random ids, log-uniform lengths, in both label variants."""
    rng = np.random.default_rng(options.seed)

    def sized(low: int, high: int) -> int:
        return round(math.exp(rng.uniform(math.log(low), math.log(high))))

    masked: list[Row] = []
    plain: list[Row] = []
    turns = masked_turns = 0
    for number in range(options.rows):
        length = sized(options.min_len, options.max_len)
        parts = _RowParts(framing, rng)
        parts.add("system", sized(80, 250))
        parts.add("user", sized(30, 150))
        while parts.size < length:
            mask = bool(rng.random() < options.mask_share)
            turns += 1
            masked_turns += mask
            parts.add("assistant", sized(20, 300), train=True, mask=mask)
            if parts.size < length:
                parts.add("tool", sized(30, 800))
        ids = np.concatenate(parts.ids)[:length]
        key = f"bench-{number}:0"
        plain.append(Row(key, ids, np.concatenate(parts.trained)[:length], None))
        masked.append(Row(key, ids, np.concatenate(parts.kept)[:length], None))
    return Data(masked, plain, turns, masked_turns)


# ------------------------------------------------------------------------ model


def build_model(options: Options, vocab: int, device: torch.device) -> Any:
    """A causal LM with random weights (float32; the caller casts to bf16 after the checks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config: Any
    if options.model_size == "tiny":
        heads = max(1, options.hidden // 32)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=options.hidden,
            intermediate_size=4 * options.hidden,
            num_hidden_layers=options.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max(8192, options.max_len, options.budget),
            tie_word_embeddings=False,
        )
    else:  # Qwen2-0.5B's shape; --hidden/--layers change it (heads of 64 dims, 7:1 GQA)
        heads = max(1, options.hidden // 64)
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=options.hidden,
            intermediate_size=4864 if options.hidden == 896 else 11 * options.hidden // 2,
            num_hidden_layers=options.layers,
            num_attention_heads=heads,
            num_key_value_heads=2 if heads % 2 == 0 else 1,
            max_position_embeddings=max(32768, options.max_len, options.budget),
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
        )
    torch.manual_seed(options.seed)
    with device:
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=options.attn, dtype=torch.float32
        )
    model.train()
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ memory and time


class Memory:
    """Peak memory since the last `reset`: the process's RSS sampled every 10 ms on the CPU,
    torch's allocator high-water marks on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not self.cuda:
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            current = self.rss()
            with self._lock:
                self._peak = max(self._peak, current)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with self._lock:
            self._peak = self.rss()

    def peak(self) -> tuple[int, int | None]:
        """(peak: RSS or allocated, reserved on CUDA or None)."""
        if self.cuda:
            return (
                torch.cuda.max_memory_allocated(self.device),
                torch.cuda.max_memory_reserved(self.device),
            )
        with self._lock:
            return max(self._peak, self.rss()), None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Run:
    name: str
    seconds: list[float] = field(default_factory=list)  # per timed step (or pass)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # real tokens per timed unit, summed over units
    trained: int = 0
    slots: int = 0  # tokens including padding, summed over units
    micro_batches: int = 0  # per unit
    peak: int = 0
    reserved: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.seconds)
        return self.tokens / total if total else 0.0

    @property
    def trained_per_second(self) -> float:
        total = sum(self.seconds)
        return self.trained / total if total else 0.0

    def report(self) -> dict[str, Any]:
        return asdict(self) | {
            "median_s": self.median,
            "mean_s": self.mean,
            "tokens_per_second": self.tokens_per_second,
            "trained_tokens_per_second": self.trained_per_second,
        }


def train_config(options: Options, packing: bool) -> TrainConfig:
    """The trainer's configuration for these runs (data, model and output are not used)."""
    return TrainConfig(
        data="-",
        model="-",
        output="-",
        lr=options.lr,
        tokens_per_micro_batch=options.budget,
        packing=packing,
        bf16=options.bf16,
        seed=options.seed,
    )


class Trainer:
    """One model and AdamW, stepped exactly as the trainer's loop steps them."""

    def __init__(self, model: Any, options: Options, device: torch.device, memory: Memory):
        self.model = model
        self.device = device
        self.memory = memory
        self.config = train_config(options, packing=True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0)
        self.dist = Distributed()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batches: list[MicroBatch], run: Run | None) -> float:
        """One optimizer step over `batches`; timed and recorded into `run` unless None."""
        self.memory.reset()
        self._sync()
        began = time.perf_counter()
        loss, tokens, trained = _step(self.model, batches, self.config, self.dist, self.device)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - began
        if run is not None:
            peak, reserved = self.memory.peak()
            run.seconds.append(seconds)
            run.losses.append(loss)
            run.tokens += tokens
            run.trained += trained
            run.slots += sum(b.input_ids.numel() for b in batches)
            run.micro_batches = len(batches)
            run.peak = max(run.peak, peak)
            if reserved is not None:
                run.reserved = max(run.reserved or 0, reserved)
        return seconds


# ------------------------------------------------------------------------ the measurements


@torch.no_grad()
def loss_totals(
    model: Any, rows: list[Row], groups: list[list[int]], packing: bool, device: torch.device
) -> tuple[float, int]:
    """Sum of `loss_sum` over all micro-batches in float64, and the trained targets."""
    model.eval()
    total = 0.0
    trained = 0
    for group in groups:
        batch = collate([rows[i] for i in group], packing).to(device)
        total += float(loss_sum(forward(model, batch), batch).double())
        trained += batch.num_trained
    model.train()
    return total, trained


@torch.no_grad()
def forward_pass(
    model: Any, batches: list[MicroBatch], run: Run | None, memory: Memory, bf16: bool
) -> float:
    """One forward (the loss, no backward) over every micro-batch; timed into `run`."""
    model.eval()
    memory.reset()
    began = time.perf_counter()
    for batch in batches:
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            micro_batch_loss(model, batch)
    seconds = time.perf_counter() - began
    model.train()
    if run is not None:
        run.seconds.append(seconds)
        run.tokens += sum(b.num_tokens for b in batches)
        run.trained += sum(b.num_trained for b in batches)
        run.slots += sum(b.input_ids.numel() for b in batches)
        run.micro_batches = len(batches)
        run.peak = max(run.peak, memory.peak()[0])
    return seconds


def bootstrap_median(values: list[float], seed: int) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of `values`."""
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    picks = rng.integers(0, len(data), (BOOTSTRAP, len(data)))
    medians = np.median(data[picks], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def alternate(count: int, first: Callable[[int], None], second: Callable[[int], None]) -> None:
    """Run first(i) and second(i) for every i, in the order AB, BA, AB... to cancel drift."""
    for index in range(count):
        pair = (first, second) if index % 2 == 0 else (second, first)
        for call in pair:
            call(index)


# ------------------------------------------------------------------------ report


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def masking_table(runs: list[Run], reference: Run, memory_label: str) -> str:
    header = (
        f"{'run':<44} {'steps':>5} {'tokens/step':>11} {'trained/step':>12} {'median s':>9} "
        f"{'mean s':>8} {'ratio':>6} {'tokens/s':>9} {memory_label:>10}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        steps = len(run.seconds)
        lines.append(
            f"{run.name:<44} {steps:>5} {run.tokens / steps:>11,.0f} "
            f"{run.trained / steps:>12,.0f} {run.median:>9.3f} {run.mean:>8.3f} "
            f"{run.median / reference.median:>6.3f} {run.tokens_per_second:>9,.0f} "
            f"{_mib(run.peak):>10}"
        )
    return "\n".join(lines)


def packing_table(runs: list[Run], reference: Run, budget: int, memory_label: str) -> str:
    header = (
        f"{'run':<20} {'micro-batches':>13} {'real tokens':>11} {'with padding':>12} "
        f"{'padding':>8} {'fill':>6} {'median s':>9} {'tokens/s':>9} {'ratio':>6} "
        f"{memory_label:>10}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        passes = len(run.seconds)
        real = run.tokens // passes
        slots = run.slots // passes
        waste = 1 - real / slots if slots else 0.0
        fill = real / (run.micro_batches * budget)
        lines.append(
            f"{run.name:<20} {run.micro_batches:>13} {real:>11,} {slots:>12,} "
            f"{waste:>7.1%} {fill:>6.1%} {run.median:>9.2f} {real / run.median:>9,.0f} "
            f"{(real / run.median) / (reference.tokens // passes / reference.median):>6.3f} "
            f"{_mib(run.peak):>10}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ main


def benchmark(options: Options) -> int:
    device = torch.device(options.device)
    machine = machine_facts()
    machine["torch"] = torch.__version__
    machine["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    problems: list[str] = []
    print(
        f"srft training benchmark: {options.model_size} model on {options.device}"
        f"{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, {options.rows} rows of "
        f"{options.min_len}-{options.max_len} tokens, budget {options.budget:,} tokens per "
        f"micro-batch, seed {options.seed}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="srft-bench-train-"))
    memory = Memory(device)
    try:
        from transformers import AutoTokenizer

        began = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(
            str(build_tokenizer(workdir / "tokenizer", "chatml"))
        )
        vocab = len(tokenizer) if options.model_size == "tiny" else 151_936
        data = make_data(options, Framing(tokenizer, vocab))
        model = build_model(options, vocab, device)
        parameters = parameter_count(model)
        lengths = [len(r.input_ids) for r in data.plain]
        trained_b = sum(r.num_trained for r in data.plain)
        trained_a = sum(r.num_trained for r in data.masked)
        print(
            f"  setup {time.perf_counter() - began:.1f} s: {parameters / 1e6:,.2f} M parameters "
            f"({model.config.model_type}, hidden {options.hidden}, {options.layers} layers, "
            f"vocab {vocab:,}, attention {model.config._attn_implementation}, "
            f"{'bf16' if options.bf16 else 'float32'}); {data.tokens:,} tokens, rows "
            f"{min(lengths):,}-{max(lengths):,} (mean {statistics.fmean(lengths):,.0f}); "
            f"{data.assistant_turns} assistant turns, {data.masked_turns} masked in A; trained "
            f"tokens B {trained_b:,} ({trained_b / data.tokens:.1%}), A {trained_a:,} "
            f"({trained_a / data.tokens:.1%})",
            flush=True,
        )
        if trained_a >= trained_b:
            problems.append(f"A trains {trained_a} tokens, not fewer than B's {trained_b}")

        # -- check: packed and padded forward agree (float32, before any step)
        packed_groups = epoch_batches(data.masked, train_config(options, packing=True), 0)
        padded_groups = epoch_batches(data.masked, train_config(options, packing=False), 0)
        began = time.perf_counter()
        packed_loss, packed_trained = loss_totals(model, data.masked, packed_groups, True, device)
        padded_loss, padded_trained = loss_totals(model, data.masked, padded_groups, False, device)
        difference = abs(packed_loss - padded_loss) / max(abs(padded_loss), 1e-30)
        loss_check = {
            "packed_loss_sum": packed_loss,
            "padded_loss_sum": padded_loss,
            "relative_difference": difference,
            "packed_trained": packed_trained,
            "padded_trained": padded_trained,
            "tolerance": LOSS_TOLERANCE,
        }
        print(
            f"  check, float32 forward over the same rows: loss_sum packed {packed_loss:,.4f}, "
            f"padded {padded_loss:,.4f} (relative difference {difference:.2e}, tolerance "
            f"{LOSS_TOLERANCE:.0e}); trained targets {packed_trained:,} / {padded_trained:,} "
            f"({time.perf_counter() - began:.1f} s)",
            flush=True,
        )
        if not math.isfinite(difference) or difference > LOSS_TOLERANCE:
            problems.append(
                f"packed and padded loss_sum differ: {packed_loss} vs {padded_loss} "
                f"(relative {difference:.2e} > {LOSS_TOLERANCE:.0e})"
            )
        if packed_trained != padded_trained:
            problems.append(
                f"packed and padded batches train {packed_trained} vs {padded_trained} targets"
            )
        second: Any = None
        if options.packed_attn:
            second = build_model(replace(options, attn=options.packed_attn), vocab, device)
            second.load_state_dict(model.state_dict())
        loss_kind = choose_loss(options.loss, device.type, liger_installed(), None)
        for each in (model, second):
            if each is not None:
                install(each, loss_kind)
                if options.bf16:
                    each.to(torch.bfloat16)
        trainer = Trainer(model, options, device, memory)

        # -- step masking (A) vs plain assistant-only SFT (B): the same micro-batches
        needed = (options.warmup + options.steps) * options.accum
        batch_groups = [packed_groups[i % len(packed_groups)] for i in range(needed)]
        batches_a = [collate([data.masked[i] for i in g], True) for g in batch_groups]
        batches_b = [collate([data.plain[i] for i in g], True) for g in batch_groups]
        for a, b in zip(batches_a, batches_b, strict=True):
            if not torch.equal(a.input_ids, b.input_ids) or a.num_tokens != b.num_tokens:
                problems.append("A and B micro-batches differ in their ids")
                break

        run_b = Run("B plain assistant-only SFT (all turns)")
        run_a = Run(f"A SRFT step masking ({data.masked_turns}/{data.assistant_turns} masked)")
        print(
            f"  step masking: {options.warmup} warm-up + {options.steps} timed steps each of "
            f"{options.accum} packed micro-batch(es), A and B alternating ...",
            flush=True,
        )
        began = time.perf_counter()

        def step_of(batches: list[MicroBatch], run: Run) -> Callable[[int], None]:
            def call(index: int) -> None:
                chunk = batches[index * options.accum : (index + 1) * options.accum]
                trainer.step(chunk, run if index >= options.warmup else None)

            return call

        alternate(
            options.warmup + options.steps, step_of(batches_a, run_a), step_of(batches_b, run_b)
        )
        masking_s = time.perf_counter() - began
        for run in (run_a, run_b):
            bad = [loss for loss in run.losses if not math.isfinite(loss)]
            if bad:
                problems.append(f"{run.name}: {len(bad)} losses not finite")
        if run_a.trained >= run_b.trained:
            problems.append(
                f"A trained {run_a.trained} tokens in its steps, not fewer than B's {run_b.trained}"
            )
        pairs = [a / b for a, b in zip(run_a.seconds, run_b.seconds, strict=True)]
        ratio = run_a.median / run_b.median
        mean_ratio = run_a.mean / run_b.mean
        paired = statistics.median(pairs)
        low, high = bootstrap_median(pairs, options.seed)
        met = abs(paired - 1) <= TARGET_TOLERANCE

        # -- packing vs padding: the same rows, one optimizer step per pass
        packed_batches = [collate([data.masked[i] for i in g], True) for g in packed_groups]
        padded_batches = [collate([data.masked[i] for i in g], False) for g in padded_groups]
        run_packed = Run("packed")
        run_padded = Run("padded")
        trains_second = second is not None and device.type == "cuda"
        run_second = Run(f"packed, {options.packed_attn}") if trains_second else None
        print(
            f"  packing vs padding: {len(packed_batches)} packed and {len(padded_batches)} "
            f"padded micro-batches, one optimizer step a pass, {options.passes} pass(es) each "
            "after a warm-up step ...",
            flush=True,
        )
        began = time.perf_counter()
        warm = max(1, min(options.warmup, 2))
        trainer.step(padded_batches[:warm], None)
        trainer.step(packed_batches[:warm], None)
        second_trainer = None
        compile_s = 0.0
        # flex_attention has no backward on the CPU (torch 2.13): there the kernels are
        # compared on the forward alone, below.
        if trains_second:
            # One untimed pass over every packed micro-batch: flex_attention is compiled
            # for each new pack length (then for dynamic shapes).
            second_trainer = Trainer(second, options, device, memory)
            compile_s = second_trainer.step(packed_batches, None)
            print(
                f"  {options.packed_attn}: warm-up pass (compiling) {compile_s:.1f} s", flush=True
            )

        def pass_of(batches: list[MicroBatch], run: Run) -> Callable[[int], None]:
            def call(_: int) -> None:
                trainer.step(batches, run)

            return call

        if second_trainer is not None and run_second is not None:

            def second_pass(_: int) -> None:
                second_trainer.step(packed_batches, run_second)

            for index in range(options.passes):  # rotate the order of the three
                calls = [
                    pass_of(packed_batches, run_packed),
                    pass_of(padded_batches, run_padded),
                    second_pass,
                ]
                for call in calls[index % 3 :] + calls[: index % 3]:
                    call(index)
        else:
            alternate(
                options.passes,
                pass_of(packed_batches, run_packed),
                pass_of(padded_batches, run_padded),
            )
        packing_s = time.perf_counter() - began
        for run in (run_packed, run_padded, *([run_second] if run_second else [])):
            if not all(math.isfinite(loss) for loss in run.losses):
                problems.append(f"{run.name} pass: a loss is not finite")
        packing_ratio = run_padded.median / run_packed.median  # the same real tokens

        forward_runs: list[Run] = []
        if second is not None and device.type != "cuda":
            forward_runs = [
                Run("padded, sdpa"),
                Run("packed, sdpa"),
                Run(f"packed, {options.packed_attn}"),
            ]
            plans = [
                (model, padded_batches),
                (model, packed_batches),
                (second, packed_batches),
            ]
            print(
                f"  forward only (no backward for {options.packed_attn} on the CPU): "
                f"{options.passes} pass(es) of each after a warm-up pass (compiling) ...",
                flush=True,
            )
            compile_s = forward_pass(second, packed_batches, None, memory, options.bf16)
            forward_pass(model, padded_batches, None, memory, options.bf16)
            forward_pass(model, packed_batches, None, memory, options.bf16)
            for index in range(options.passes):  # rotate the order of the three
                order = list(range(3))[index % 3 :] + list(range(3))[: index % 3]
                for which in order:
                    each, batches = plans[which]
                    forward_pass(each, batches, forward_runs[which], memory, options.bf16)
    finally:
        memory.close()
        shutil.rmtree(workdir, ignore_errors=True)

    memory_label = "peak MiB" if device.type == "cuda" else "RSS MiB"
    print()
    print(
        f"step masking vs plain SFT: the same {options.steps} steps each "
        f"({options.accum} packed micro-batch(es) of <= {options.budget:,} tokens), "
        f"after {options.warmup} warm-up, interleaved AB/BA ({masking_s:.0f} s in all)"
    )
    print(masking_table([run_b, run_a], run_b, memory_label))
    print(
        f"A/B step time: {paired:.3f}, the median of the {len(pairs)} paired steps' ratios "
        f"(95% bootstrap interval {low:.3f}-{high:.3f}); target within "
        f"{TARGET_TOLERANCE:.0%}: {_met(met)}. Ratio of the means {mean_ratio:.3f}, of the "
        f"medians {ratio:.3f} (steps differ in size: a pair compares the same micro-batches)"
    )
    print()
    print(
        f"packing vs padding: all {options.rows} rows (variant A) under a budget of "
        f"{options.budget:,} tokens, one optimizer step a pass, {options.passes} pass(es) each, "
        f"interleaved ({packing_s:.0f} s in all); tokens/s counts real tokens only"
    )
    packing_runs = [run_padded, run_packed, *([run_second] if run_second else [])]
    print(packing_table(packing_runs, run_padded, options.budget, memory_label))
    print(f"packed/padded tokens/s: {packing_ratio:.3f}")
    second_ratio = None
    if forward_runs:
        print()
        print(
            f"forward only, the same rows and budget, {options.passes} pass(es) each "
            f"({options.packed_attn} has no backward on the CPU); tokens/s counts real tokens"
        )
        print(packing_table(forward_runs, forward_runs[0], options.budget, memory_label))
        second_ratio = forward_runs[0].median / forward_runs[2].median
        print(
            f"forward tokens/s over padded: packed sdpa "
            f"{forward_runs[0].median / forward_runs[1].median:.3f}, packed "
            f"{options.packed_attn} {second_ratio:.3f}; its warm-up pass (compiling) took "
            f"{compile_s:.1f} s"
        )
    if run_second is not None:
        second_ratio = run_padded.median / run_second.median
        print(
            f"packed ({options.packed_attn})/padded tokens/s: {second_ratio:.3f}; its warm-up "
            f"pass (compiling) took {compile_s:.1f} s"
        )
    if device.type == "cuda":
        print(
            f"memory: torch.cuda.max_memory_allocated per run; reserved: A "
            f"{_mib(run_a.reserved)}, B {_mib(run_b.reserved)}, packed "
            f"{_mib(run_packed.reserved)}, padded {_mib(run_padded.reserved)} MiB"
        )
    else:
        rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"memory: the process's RSS sampled every {SAMPLE_S * 1000:.0f} ms, peak over each "
            f"run's steps (model, optimizer state, data included); process high-water mark "
            f"{_mib(rusage)} MiB"
        )
    print(
        f"machine: {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs "
        f"({machine['cpu_model'] or 'unknown CPU'}), {machine['platform']}, Python "
        f"{machine['python']}, torch {machine['torch']} with {machine['torch_threads']} threads"
        f"{'; GPU ' + machine['gpu'] if 'gpu' in machine else ''}"
    )

    if options.json_path is not None:
        report = {
            "options": options_for_json(options),
            "machine": machine,
            "model": {
                "type": model.config.model_type,
                "parameters": parameters,
                "hidden": options.hidden,
                "layers": options.layers,
                "vocab": vocab,
                "attention": model.config._attn_implementation,
                "dtype": "bfloat16" if options.bf16 else "float32",
            },
            "data": {
                "rows": options.rows,
                "tokens": data.tokens,
                "lengths": lengths,
                "assistant_turns": data.assistant_turns,
                "masked_turns": data.masked_turns,
                "trained_tokens_plain": trained_b,
                "trained_tokens_masked": trained_a,
            },
            "loss_check": loss_check,
            "step_masking": {
                "runs": [run_b.report(), run_a.report()],
                "paired_ratios": pairs,
                "ratio_of_medians": ratio,
                "ratio_of_means": mean_ratio,
                "median_paired_ratio": paired,
                "median_paired_ratio_95": [low, high],
                "target_tolerance": TARGET_TOLERANCE,
                "target_met": met,
            },
            "packing": {
                "runs": [run.report() for run in packing_runs],
                "packed_over_padded_tokens_per_second": packing_ratio,
                "second_attention": options.packed_attn,
                "forward_only_runs": [run.report() for run in forward_runs],
                "second_over_padded_tokens_per_second": second_ratio,
                "second_warm_up_s": compile_s,
            },
            "memory_unit": "cuda max_memory_allocated" if device.type == "cuda" else "RSS",
            "problems": problems,
        }
        write_report(options.json_path, report)
    return exit_status(problems)


def guarded(options: Options) -> int:
    """The benchmark; out of GPU memory it says what to lower and exits 1."""
    try:
        return benchmark(options)
    except torch.OutOfMemoryError as error:
        print(
            f"\nFAILED: out of memory on {options.device} with --budget {options.budget:,} "
            f"({error}); a smaller --budget, --max-len or model lowers the peak",
            file=sys.stderr,
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("loss", "mfu"):  # bench/train_throughput.py
        from bench import train_throughput

        return train_throughput.main(args[0], args[1:])
    return run_cleaning_up(guarded, parse_options(args))


if __name__ == "__main__":
    sys.exit(main())
