"""The recipe check: what step masking does to a trained policy, end to end through the service.

Run from the repository root (needs the PostgreSQL server binaries and redis-server, as the
tests do, and the `train` and `export` extras; the plot needs the `recipe` extra, matplotlib):

    .venv/bin/python -m bench.recipe             # the default run: 3 seeds, 3 critics, 5 policies
    .venv/bin/python -m bench.recipe --quick         # the wiring, a few minutes; not the effect
    .venv/bin/python -m bench.recipe --seeds 5 --out runs/recipe

What it does:

1. generates tasks of the environment (`bench/recipe_env.py`) and has the scripted teachers
   (`bench/recipe_teachers.py`) play them; writes their runs as JSON Lines of canonical chat
   items, keeping the true labels apart;
2. starts the service (a throw-away Postgres, Redis, `srft serve`, `srft worker`) and the
   critics (`bench/recipe_critics.py`: oracle, corrupted oracle, rules) in this process;
3. `srft ingest` of the runs; one labeling job per critic (`POST /v1/jobs`, trajectory mode,
   scope `unresolved`); each critic's precision, recall and F1 of `mistake` against the true
   labels, read from the job's verdicts;
4. per policy and critic, a `tokenized_parquet` export with a locally built tokenizer
   (`sft` and `rft` do not read verdicts: exported once), `srft pull`, and per seed
   `srft train` of a tiny randomly initialised Llama (the same `--steps` optimizer steps for
   every policy) from a saved initialisation;
5. rolls every student out on held-out tasks (`bench/recipe_eval.py`) as soon as it is trained
   (`--jobs` students train side by side): success rate and the mechanism metric (how often the
   student repeats the teachers' mistake habits in the states where they had them), each with
   a 95% t interval over the seeds (and a Wilson interval over the pooled rollouts);
6. prints the table, writes `recipe.json` and `recipe.png` (success and habit-repeat rate
   against critic F1) under `--out`.

`--shift-masks` moves every exported row's per-turn weights one assistant turn later before
training (the check that the mechanism test fails on a mask that is off by one turn).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    REPO_ROOT,
    PostgresServer,
    child_env,
    exit_status,
    http_ok,
    machine_facts,
    run_cleaning_up,
    write_report,
)
from bench.recipe_critics import TrueLabels, corrupted_model, serve_critics
from bench.recipe_env import MISTAKE, Task, make_task
from bench.recipe_eval import (
    HabitCounts,
    habit_counts,
    held_out_tasks,
    rollout,
    seed_interval,
    wilson,
)
from bench.recipe_teachers import TeacherRun, teacher_runs, write_runs
from bench.scale import Processes, wait_until
from tests.chat_tokenizers import save_tokenizer, train_bpe
from tests.servers import RedisServer, free_port, postgres_server
from tests.training.models import tiny_model

SRFT = (sys.executable, "-m", "app.cli")
API_KEY = "srft_recipe_" + "r" * 32
POLICIES = ("sft", "rft", "srft", "srft_unresolved", "prefix")
CRITIC_FREE = ("sft", "rft")  # policies that read no verdict
MAX_SEQ_LEN = 1024
EVAL_SEED = 1_000_003  # the held-out tasks' stream
TOKENIZER_VOCAB = 600
SAMPLE_ROLLOUTS = 3


@dataclass(frozen=True)
class Options:
    seeds: int
    train_runs: int
    eval_tasks: int
    steps: int
    lr: float
    tokens_per_micro_batch: int
    policies: tuple[str, ...]
    critics: tuple[str, ...]
    shift_masks: bool
    packing: bool
    out: Path
    data_seed: int
    jobs: int = 1
    workdir: Path | None = None


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description="The recipe check (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the wiring")
    parser.add_argument("--seeds", type=int, help="training seeds (3; quick: 1)")
    parser.add_argument("--train-runs", type=int, help="teachers' runs (800; quick: 120)")
    parser.add_argument(
        "--eval-tasks", type=int, help="held-out tasks per student (100; quick: 20)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per student (600; quick: 20)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument(
        "--tokens-per-micro-batch", type=int, default=4096, help="token budget of a batch (4096)"
    )
    parser.add_argument(
        "--policies", help=f"comma-separated (default all: {','.join(POLICIES)}; quick: sft,srft)"
    )
    parser.add_argument(
        "--critics",
        help="comma-separated: oracle, rules, oracle-pP-rR-sS (default oracle,"
        f"{corrupted_model(0.75, 0.75, 0)},rules; quick: oracle)",
    )
    parser.add_argument(
        "--shift-masks",
        action="store_true",
        help="move each row's turn weights one assistant turn later before training",
    )
    parser.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pack rows in training (default off: padded rows are cheaper on CPU here)",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="the training tasks' stream (0)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, machine_facts()["usable_cpus"]),
        help="students trained at once, each on usable CPUs / jobs threads (default: the "
        "usable CPUs; a tiny model trains faster one thread each, side by side)",
    )
    parser.add_argument("--out", type=Path, default=Path("recipe-out"), help="results folder")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the runs, exports and students here (default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    policies = tuple((args.policies or ("sft,srft" if quick else ",".join(POLICIES))).split(","))
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}")
    critics = args.critics or (
        "oracle" if quick else f"oracle,{corrupted_model(0.75, 0.75, 0)},rules"
    )
    return Options(
        seeds=args.seeds or (1 if quick else 3),
        train_runs=args.train_runs or (120 if quick else 800),
        eval_tasks=args.eval_tasks or (20 if quick else 100),
        steps=args.steps or (20 if quick else 600),
        lr=args.lr,
        tokens_per_micro_batch=args.tokens_per_micro_batch,
        policies=policies,
        critics=tuple(critics.split(",")),
        shift_masks=args.shift_masks,
        packing=args.packing,
        out=args.out,
        data_seed=args.data_seed,
        jobs=max(1, args.jobs),
        workdir=args.workdir,
    )


# ------------------------------------------------------------------------ the service


class Service:
    """Postgres, Redis, the API and a worker; the critics in a thread of this process."""

    def __init__(self, stack: ExitStack, workdir: Path, true_labels: TrueLabels) -> None:
        admin = PostgresServer(stack.enter_context(postgres_server()))
        stack.callback(admin.close)
        url = stack.enter_context(admin.fresh_database("recipe"))
        redis = RedisServer()
        redis.start()
        stack.callback(redis.close)
        critic_port = serve_critics(true_labels)
        self.tokenizer_root = workdir / "tokenizers"
        self.exports = workdir / "exports"
        env = {
            "SRFT_DATABASE_URL": url,
            "SRFT_BROKER_URL": redis.url,
            "SRFT_BOOTSTRAP_API_KEY": API_KEY,
            "SRFT_EXPORT_DIR": str(self.exports),
            "SRFT_TOKENIZER_DIRS": str(self.tokenizer_root),
            "SRFT_EXPORT_PROCESSES": "1",
            "SRFT_CRITIC_BASE_URL": f"http://127.0.0.1:{critic_port}/v1",
            "SRFT_LOG_LEVEL": "WARNING",
        }
        self.procs = Processes(workdir)
        stack.callback(self.procs.stop)
        port = free_port()
        api = self.procs.spawn("api", ["serve", "--no-migrate", "--port", str(port)], env)
        worker = self.procs.spawn(
            "worker", ["worker", "--pool", "threads", "--concurrency", "4"], env
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{self.url}/healthz"), "the API", [api, worker])
        wait_until(
            lambda: " ready." in worker.log_path.read_text(errors="replace"),
            "the worker",
            [api, worker],
        )
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600
        )
        stack.callback(self.http.close)

    def cli(self, *args: str) -> str:
        """An `srft` client command against the service; its output."""
        env = child_env() | {"SRFT_URL": self.url, "SRFT_API_KEY": API_KEY}
        done = subprocess.run(
            [*SRFT, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"srft {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def wait(self, path: str, done: Sequence[str]) -> dict[str, Any]:
        while True:
            body: dict[str, Any] = self.http.get(path).json()
            if body["status"] in done:
                return body
            for proc in self.procs.procs:
                proc.check_alive()
            time.sleep(0.3)

    def label(self, model: str) -> dict[str, Any]:
        response = self.http.post(
            "/v1/jobs",
            json={
                "selection": {},
                "critic": {"mode": "trajectory", "model": model},
                "scope": "unresolved",
            },
        )
        if response.status_code != 202:
            raise RuntimeError(f"job for {model}: HTTP {response.status_code}: {response.text}")
        job = self.wait(f"/v1/jobs/{response.json()['id']}", ("completed", "failed", "cancelled"))
        if job["status"] != "completed" or job["counts"]["steps"]["failed"]:
            raise RuntimeError(f"job for {model} did not complete cleanly: {job}")
        return job

    def verdicts(self, job_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": 200} | ({"cursor": cursor} if cursor else {})
            page = self.http.get(f"/v1/jobs/{job_id}/verdicts", params=params).json()
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def task_ids(self) -> dict[str, str]:
        """trajectory id -> task id, for every stored run."""
        found: dict[str, str] = {}
        cursor: str | None = None
        while True:
            params = {"limit": 100} | ({"cursor": cursor} if cursor else {})
            page = self.http.get("/v1/trajectories", params=params).json()
            found |= {item["id"]: item["task_id"] for item in page["items"]}
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    def export(self, job_id: str, policy: str, tokenizer: Path, folder: Path) -> dict[str, Any]:
        response = self.http.post(
            "/v1/exports",
            json={
                "job_ids": [job_id],
                "policy": policy,
                "format": "tokenized_parquet",
                "tokenizer": str(tokenizer),
                "max_seq_len": MAX_SEQ_LEN,
                "seed": 0,
            },
        )
        if response.status_code != 202:
            raise RuntimeError(f"export {policy}: HTTP {response.status_code}: {response.text}")
        export = self.wait(f"/v1/exports/{response.json()['id']}", ("completed", "failed"))
        if export["status"] != "completed":
            raise RuntimeError(f"export {policy} failed: {export}")
        self.cli("pull", export["id"], str(folder))
        manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
        return manifest


def repeated_texts(runs: Sequence[TeacherRun]) -> dict[str, int]:
    """How many distinct texts the runs have (srft stores a repeated run once, the first), and
    how many texts several runs share that differ in outcome or true labels (a premature submit
    after an edit reads the same whether the edit was right or not)."""
    seen: dict[str, set[tuple[bool, tuple[str, ...]]]] = {}
    for run in runs:
        text = json.dumps(run.item()["messages"], sort_keys=True)
        seen.setdefault(text, set()).add((run.resolved, tuple(run.labels)))
    return {
        "distinct_texts": len(seen),
        "ambiguous_texts": sum(len(truths) > 1 for truths in seen.values()),
    }


# ------------------------------------------------------------------------ critics' quality


def critic_quality(
    verdicts: list[dict[str, Any]], task_of: dict[str, str], runs: dict[str, TeacherRun]
) -> dict[str, Any]:
    """Precision, recall and F1 of `mistake` against the true labels, over the labeled steps."""
    true_positive = false_positive = false_negative = 0
    for verdict in verdicts:
        run = runs[task_of[verdict["trajectory_id"]]]
        truth = run.labels[verdict["step_index"]] == MISTAKE
        said = verdict["label"] == MISTAKE
        true_positive += truth and said
        false_positive += said and not truth
        false_negative += truth and not said
    precision = true_positive / (true_positive + false_positive) if true_positive else 0.0
    recall = true_positive / (true_positive + false_negative) if true_positive else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "steps": len(verdicts)}


# ------------------------------------------------------------------------ masks shifted


def shift_masks(folder: Path, tokenizer: Any) -> int:
    """Move every row's per-turn weights one assistant turn later (the first turn trained),
    rewrite the shards and the manifest's sizes and digests; the rows changed.

    A turn's trainable span is read off the render: from after `<|im_start|>assistant\\n` to
    its `<|im_end|>`; on the turns the export trained, that span must be exactly its labels.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.exports.writers.shards import file_sha256

    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    changed = 0
    for shard in manifest["shards"]:
        path = folder / shard["path"]
        table = pq.read_table(path)
        rows = table.to_pylist()
        trained = 0
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            spans: list[tuple[int, int]] = []
            for position, token in enumerate(ids):
                if token == start_id and ids[position + 1 : position + 1 + len(header)] == header:
                    first = position + 1 + len(header)
                    last = ids.index(end_id, first) if end_id in ids[first:] else len(ids) - 1
                    spans.append((first, last + 1))
            weights = [any(labels[i] != -100 for i in range(a, b)) for a, b in spans]
            for (a, b), weight in zip(spans, weights, strict=True):
                if weight and any(labels[i] == -100 for i in range(a, b)):
                    raise RuntimeError("a trained turn's labels are not its whole span")
            shifted = [True, *weights[:-1]]
            new = [-100] * len(ids)
            for (a, b), weight in zip(spans, shifted, strict=True):
                if weight:
                    new[a:b] = ids[a:b]
            changed += new != labels
            row["labels"] = new
            row["assistant_masks"] = [int(label != -100) for label in new]
            row["num_trained_tokens"] = sum(row["assistant_masks"])
            trained += row["num_trained_tokens"]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
        shard["bytes"] = path.stat().st_size
        shard["sha256"] = file_sha256(path)
        shard["trained_tokens"] = trained
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return changed


# ------------------------------------------------------------------------ students


def build_recipe_tokenizer(directory: Path, runs: Sequence[TeacherRun]) -> Path:
    """A byte-level BPE of `TOKENIZER_VOCAB` tokens trained on the teachers' runs, with the
    ChatML template of `tests/chat_tokenizers.py`: the environment's words become single
    tokens, so rows are short and the output layer small (what a tiny model on CPU needs)."""
    corpus = (json.dumps(run.item()) + "\n" + "\n".join(run.commands) for run in runs)
    return save_tokenizer(directory, train_bpe(corpus, TOKENIZER_VOCAB), "chatml")


def save_initial_model(tokenizer_dir: Path, seed: int, folder: Path) -> Path:
    """A tiny randomly initialised Llama (`tests/training/models.py`: hidden 64, 2 layers,
    untied input and output embeddings: about 0.16 M parameters with the 600-token
    vocabulary), saved.

    Calibrated on `sft` alone before any policy was compared: with tied embeddings (and with 4
    layers) the students had not learned to copy the function's name from the task into their
    `grep` after 1,500 steps; this one does within about 600."""
    return tiny_model(
        folder, tokenizer_dir, seed, hidden=64, heads=4, max_positions=MAX_SEQ_LEN,
        end_token="<|im_end|>",
    )  # fmt: skip


def train_student(data: Path, model: Path, output: Path, seed: int, options: Options) -> int:
    """`srft train` on usable CPUs / `--jobs` threads; the tokens it trained."""
    args = [
        "train",
        "--data", str(data),
        "--model", str(model),
        "--output", str(output),
        "--max-steps", str(options.steps),
        "--lr", str(options.lr),
        "--warmup-steps", str(max(1, options.steps // 10)),
        "--tokens-per-micro-batch", str(options.tokens_per_micro_batch),
        "--max-seq-len", str(MAX_SEQ_LEN),
        "--seed", str(seed),
        "--log-every", "1",
        "--packing" if options.packing else "--no-packing",
    ]  # fmt: skip
    threads = str(max(1, machine_facts()["usable_cpus"] // options.jobs))
    env = child_env() | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([*SRFT, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"srft train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return sum(int(json.loads(line).get("trained_tokens", 0)) for line in lines if "loss" in line)


def evaluate_student(
    folder: Path, tasks: list[Task], seed: int
) -> tuple[int, HabitCounts, list[list[str]]]:
    """Successes over `tasks`, the habit counts of the student saved in `folder`, and the
    commands of its first rollouts (a sample to read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    habits = HabitCounts()
    successes = 0
    results = rollout(model, tokenizer, tasks, seed)
    for result in results:
        successes += result.success
        habits.add(habit_counts(result.task, result.commands))
    return successes, habits, [[r.task.prompt, *r.commands] for r in results[:SAMPLE_ROLLOUTS]]


# ------------------------------------------------------------------------ the run


@dataclass
class Cell:
    """One policy with one critic, over every seed."""

    policy: str
    critic: str
    successes: int = 0
    rollouts: int = 0
    habits: HabitCounts = field(default_factory=HabitCounts)
    trained_tokens: list[int] = field(default_factory=list)
    export_trained_tokens: int = 0
    rows: int = 0
    export_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    per_seed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, student: dict[str, Any], tasks: int) -> None:
        """One seed's student: trained on `student["tokens"]`, rolled out on `tasks` tasks."""
        self.successes += student["successes"]
        self.rollouts += tasks
        self.habits.add(student["habits"])
        self.train_seconds += student["train_seconds"]
        self.eval_seconds += student["eval_seconds"]
        self.per_seed.append(
            {
                "seed": student["seed"],
                "success": student["successes"] / tasks,
                "habit_repeat": student["habits"].rate,
                "trained_tokens": student["tokens"],
                "sample_rollouts": student["sample_rollouts"],
            }
        )
        self.per_seed.sort(key=lambda entry: entry["seed"])
        self.trained_tokens = [entry["trained_tokens"] for entry in self.per_seed]

    def as_dict(self) -> dict[str, Any]:
        low, high = wilson(self.successes, self.rollouts)
        return {
            "policy": self.policy,
            "critic": self.critic,
            "success": self.successes / self.rollouts if self.rollouts else 0.0,
            "success_ci95": [low, high],
            "success_seed_ci95": list(seed_interval([e["success"] for e in self.per_seed])),
            "successes": self.successes,
            "rollouts": self.rollouts,
            "habit_repeat": self.habits.as_dict(),
            "habit_repeat_seed_ci95": list(
                seed_interval([e["habit_repeat"] for e in self.per_seed])
            ),
            "trained_tokens_per_seed": self.trained_tokens,
            "export_rows": self.rows,
            "export_trained_tokens": self.export_trained_tokens,
            # export, every seed's training and rollouts added up (students train side by side)
            "seconds": self.export_seconds + self.train_seconds + self.eval_seconds,
            "export_seconds": self.export_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "per_seed": self.per_seed,
        }


def run(options: Options) -> int:
    began = time.perf_counter()
    options.out.mkdir(parents=True, exist_ok=True)
    train_tasks = [make_task(options.data_seed, n) for n in range(options.train_runs)]
    runs = teacher_runs(train_tasks, options.data_seed)
    eval_tasks = held_out_tasks(EVAL_SEED, options.eval_tasks, train_tasks)
    by_task = {run.task.task_id: run for run in runs}
    true_labels = TrueLabels.of(runs)
    teachers = {
        "runs": len(runs),
        "resolved": sum(run.resolved for run in runs),
        "steps": sum(len(run.labels) for run in runs),
        "labels": {
            label: sum(run.labels.count(label) for run in runs)
            for label in ("good", "unnecessary", "mistake", "recover")
        },
        "key_conflicts": true_labels.conflicts,
        **repeated_texts(runs),
    }
    teacher_habits = HabitCounts()
    for teacher_run in runs:
        teacher_habits.add(habit_counts(teacher_run.task, teacher_run.commands))
    teachers["habit_repeat"] = teacher_habits.as_dict()
    print(
        f"teachers: {teachers['runs']} runs ({teachers['distinct_texts']} distinct texts, "
        f"{teachers['ambiguous_texts']} of them read the same for runs that differ in outcome "
        f"or labels), {teachers['resolved']} resolved, "
        f"labels {teachers['labels']}, habit repeat rate {teacher_habits.rate:.3f}"
    )
    problems: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    critics: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        if options.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="srft-recipe-")))
        else:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        runs_file = workdir / "runs.jsonl"
        write_runs(runs, runs_file)
        service = Service(stack, workdir, true_labels)
        tokenizer_dir = build_recipe_tokenizer(service.tokenizer_root / "chatml", runs)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        started = time.perf_counter()
        service.cli("ingest", str(runs_file), "--state", str(workdir / "ingest-state"))
        ingest_s = time.perf_counter() - started
        task_of = service.task_ids()
        if len(task_of) != teachers["distinct_texts"]:
            problems.append(
                f"{len(task_of)} runs stored, {teachers['distinct_texts']} distinct ones written"
            )
        jobs: dict[str, str] = {}
        for model in options.critics:
            started = time.perf_counter()
            job = service.label(model)
            jobs[model] = job["id"]
            critics[model] = critic_quality(service.verdicts(job["id"]), task_of, by_task) | {
                "job_id": job["id"],
                "seconds": time.perf_counter() - started,
            }
            print(f"critic {model}: {critics[model]}")
        initial = [
            save_initial_model(tokenizer_dir, seed, workdir / "models" / f"init-{seed}")
            for seed in range(options.seeds)
        ]
        plan = [(p, "-") for p in options.policies if p in CRITIC_FREE] + [
            (p, c) for c in options.critics for p in options.policies if p not in CRITIC_FREE
        ]
        folders: dict[tuple[str, str], Path] = {}
        for policy, critic in plan:
            cell = Cell(policy, critic)
            cells[(policy, critic)] = cell
            started = time.perf_counter()
            folder = workdir / "data" / f"{policy}-{critic}"
            manifest = service.export(
                jobs[options.critics[0] if critic == "-" else critic], policy, tokenizer_dir, folder
            )
            cell.rows = sum(shard["rows"] for shard in manifest["shards"])
            cell.export_trained_tokens = sum(
                shard["trained_tokens"] for shard in manifest["shards"]
            )
            if options.shift_masks:
                shift_masks(folder, tokenizer)
            folders[(policy, critic)] = folder
            cell.export_seconds = time.perf_counter() - started
        train_students(options, plan, folders, initial, eval_tasks, workdir, cells)
    wall = time.perf_counter() - began
    table = [cell.as_dict() for cell in cells.values()]
    for row in table:
        row["critic_f1"] = None if row["critic"] == "-" else critics[row["critic"]]["f1"]
    print_table(table, critics)
    print(f"wall time {wall:.0f} s; machine: {machine_facts()}")
    report = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
        "teachers": teachers,
        "critics": critics,
        "table": table,
        "ingest_seconds": ingest_s,
        "wall_seconds": wall,
        "machine": machine_facts(),
        "success_interval": "success_ci95: 95% Wilson interval over the rollouts of all seeds "
        "pooled; success_seed_ci95: 95% t interval of the mean of the seeds' success rates "
        "(the spread between training seeds; printed)",
        "problems": problems,
    }
    write_report(options.out / "recipe.json", report)
    plot(table, critics, options.out / "recipe.png")
    return exit_status(problems)


def train_students(
    options: Options,
    plan: list[tuple[str, str]],
    folders: dict[tuple[str, str], Path],
    initial: list[Path],
    eval_tasks: list[Task],
    workdir: Path,
    cells: dict[tuple[str, str], Cell],
) -> None:
    """Every (policy, critic) cell's students, one per seed: `--jobs` trainings at a time, each
    rolled out as soon as it is trained (one rollout at a time: they seed torch's generator)."""
    import torch

    torch.set_num_threads(max(1, machine_facts()["usable_cpus"] // options.jobs))
    rolling_out = threading.Lock()

    def student(policy: str, critic: str, seed: int) -> dict[str, Any]:
        output = workdir / "students" / f"{policy}-{critic}-{seed}"
        clock = time.perf_counter()
        tokens = train_student(folders[(policy, critic)], initial[seed], output, seed, options)
        train_s = time.perf_counter() - clock
        with rolling_out:
            clock = time.perf_counter()
            successes, habits, sample = evaluate_student(output / "final", eval_tasks, seed)
            eval_s = time.perf_counter() - clock
        return {
            "seed": seed,
            "successes": successes,
            "habits": habits,
            "tokens": tokens,
            "train_seconds": train_s,
            "eval_seconds": eval_s,
            "sample_rollouts": sample,
        }

    pool = ThreadPoolExecutor(max_workers=options.jobs)
    try:
        futures = {
            pool.submit(student, policy, critic, seed): (policy, critic)
            for seed in range(options.seeds)
            for policy, critic in plan
        }
        for future in as_completed(futures):
            policy, critic = futures[future]
            result = future.result()
            cells[(policy, critic)].add(result, len(eval_tasks))
            print(
                f"{policy:>15} {critic:>24} seed {result['seed']}: "
                f"success {result['successes']}/{len(eval_tasks)}, "
                f"habit repeat {result['habits'].rate:.3f}, trained tokens {result['tokens']} "
                f"(train {result['train_seconds']:.0f} s, rollouts {result['eval_seconds']:.0f} s)",
                flush=True,
            )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def print_table(table: list[dict[str, Any]], critics: dict[str, dict[str, Any]]) -> None:
    """Per cell: success and habit repeat rate, each with the 95% t interval over the seeds."""
    print()
    print(
        f"{'policy':<16}{'critic':<24}{'F1':>6}  {'success [95% CI, seeds]':<25}"
        f"{'habit repeat [95% CI, seeds]':<30}{'trained tokens':>15}{'seconds':>9}"
    )
    for row in table:
        f1 = "" if row["critic_f1"] is None else f"{row['critic_f1']:.2f}"
        tokens = sum(row["trained_tokens_per_seed"]) // max(1, len(row["trained_tokens_per_seed"]))
        low, high = row["success_seed_ci95"]
        success = f"{row['success']:.3f} [{low:.3f}, {high:.3f}]"
        low, high = row["habit_repeat_seed_ci95"]
        habit = f"{row['habit_repeat']['rate']:.3f} [{low:.3f}, {high:.3f}]"
        print(
            f"{row['policy']:<16}{row['critic']:<24}{f1:>6}  {success:<25}{habit:<30}"
            f"{tokens:>15}{row['seconds']:>9.0f}"
        )
    print()


def plot(table: list[dict[str, Any]], critics: dict[str, dict[str, Any]], path: Path) -> None:
    """Success and habit-repeat rate against critic F1 (policies that read no verdict as
    horizontal lines); skipped with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install 'srft[recipe]'): no plot")
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in (
        (axes[0], "success", "success rate"),
        (axes[1], "habit", "habit repeat rate"),
    ):
        for policy in POLICIES:
            rows = [r for r in table if r["policy"] == policy]
            if not rows:
                continue
            values = [r["success"] if key == "success" else r["habit_repeat"]["rate"] for r in rows]
            if rows[0]["critic_f1"] is None:
                axis.axhline(values[0], linestyle="--", label=policy, color=_colour(policy))
                continue
            points = sorted((r["critic_f1"], v) for r, v in zip(rows, values, strict=True))
            axis.plot(*zip(*points, strict=True), marker="o", label=policy, color=_colour(policy))
        axis.set_xlabel("critic F1 (mistake)")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot written to {path}")


def _colour(policy: str) -> str:
    return f"C{POLICIES.index(policy)}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cleaning_up(run, options)


if __name__ == "__main__":
    sys.exit(main())
