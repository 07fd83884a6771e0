"""Axolotl on an srft `openai_jsonl` export: what its `chat_template` strategy trains, counted
against the export's weights. Not part of `make test`: Axolotl takes ~3 minutes and ~4 GB to
install (it pulls its own trl, transformers and datasets, and triton, xformers, bitsandbytes),
so it lives in a virtualenv of its own, outside the repository:

    python3.11 -m venv /tmp/axolotl-venv
    echo 'torch==2.13.0' > /tmp/axolotl-constraints.txt     # the CPU build this machine has
    /tmp/axolotl-venv/bin/pip install -c /tmp/axolotl-constraints.txt axolotl==0.19.0
    .venv/bin/python bench/consumers_axolotl.py --axolotl-venv /tmp/axolotl-venv
    .venv/bin/python bench/consumers_axolotl.py --export dataset/ --tokenizer tok/   # yours

What it does:

1. builds the ChatML test tokenizer (`tests/chat_tokenizers.py`, no downloads; its template's
   loop variable is `message`, which Axolotl needs to see the messages' fields) and a tiny
   random Llama with it (`tests/training/conftest.py`);
2. unless given --export: starts a throw-away Postgres, stores the shared real runs
   (tests/data/trajectories; resolved, unresolved and unknown in turn, as tests/exports does),
   labels the unresolved runs' steps with the rules critic and exports them (policy `srft`)
   twice as `openai_jsonl`: as they are, and measured with the tokenizer and split at
   --sequence-len (`tokenizer`, `max_seq_len`, `overflow: split`);
3. for each export: writes an Axolotl config (`type: chat_template`,
   `chat_template: tokenizer_default`, `message_field_training: weight`, `sequence_len`) and
   runs `axolotl preprocess`; then reads the prepared rows and, for each, finds its export row
   (the same tokens as the template's render of it, `apply_chat_template` in this venv) and
   counts its targets (labels not -100): inside the template's own assistant spans
   (`{% generation %}` masks) of weight-1 messages, of weight-0 messages (must be 0), and
   elsewhere (must be 0); and the rows Axolotl dropped;
4. with --train-steps N (default 3): `axolotl train --launcher python` on the measured export
   for N optimizer steps on the CPU; it must end with a finite loss.

It prints the numbers and exits 1 when a weight-0 message or a non-assistant token is trained,
a weight-1 turn is left without a target, or a step fails.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from sqlalchemy import select, update

from app.auth.service import create_key
from app.config import Settings
from app.critic.labels import DEFAULT_LABELS
from app.critic.rules import label_trajectory
from app.db import Database
from app.exports import service as export_service
from app.exports.builder import build_export, export_path
from app.exports.schemas import ExportCreate
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.schemas import JobCreate, Selection
from app.models import Export, Trajectory, Verdict
from app.recipe.steps import split_steps
from app.trajectories.service import ingest
from bench.common import PostgresServer, machine_facts, run_cleaning_up
from tests.helpers import all_trajectory_files, prepare_job
from tests.servers import postgres_server

RESOLUTIONS: tuple[bool | None, ...] = (True, False, None)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Options:
    axolotl_venv: Path
    export: Path | None
    tokenizer: Path | None
    sequence_len: int
    train_steps: int
    keep: Path | None


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axolotl-venv", type=Path, default=Path("/tmp/axolotl-venv"))
    parser.add_argument(
        "--export", type=Path, help="an openai_jsonl export folder (default: build two)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="with --export: its tokenizer (default: the test one)"
    )
    parser.add_argument("--sequence-len", type=int, default=8192)
    parser.add_argument("--train-steps", type=int, default=3, help="0: preprocess only")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    args = parser.parse_args(argv)
    return Options(
        args.axolotl_venv.resolve(),
        args.export,
        args.tokenizer,
        args.sequence_len,
        args.train_steps,
        args.keep,
    )


# ------------------------------------------------------------------------ the export


def export_shared_runs(workdir: Path, tokenizer_dir: Path, sequence_len: int) -> dict[str, Path]:
    """The shared runs labeled by the rules and exported `srft` as `openai_jsonl`: as they
    are, and measured and split at `sequence_len` with the tokenizer."""
    with ExitStack() as stack:
        server = PostgresServer(stack.enter_context(postgres_server()))
        stack.callback(server.close)
        url = stack.enter_context(server.fresh_database("axolotl"))
        database = Database(url)
        stack.callback(database.dispose)
        settings = Settings(
            database_url=url, export_dir=workdir / "exports", tokenizer_dirs=str(tokenizer_dir)
        )
        with database.transaction() as session:
            project_id = create_key(session, "bench").project_id
        ids: list[uuid.UUID] = []
        for path in all_trajectory_files():
            with database.transaction() as session:
                result = ingest(session, project_id, path.read_bytes(), filename=path.name)
                ids += [run.id for run in result.runs]
        with database.transaction() as session:
            for n, trajectory_id in enumerate(sorted(ids)):
                session.execute(
                    update(Trajectory)
                    .where(Trajectory.id == trajectory_id)
                    .values(resolved=RESOLUTIONS[n % 3])
                )
            body = JobCreate(selection=Selection(), scope="unresolved", cache=False)
            job_id = job_service.create_job(session, project_id, body, settings).id
            prepare_job(session, job_id)
        _label_by_rules(database, job_id)
        exports: dict[str, Path] = {}
        requests = {
            "as is": ExportCreate(job_ids=[job_id], format="openai_jsonl"),
            f"split at {sequence_len}": ExportCreate(
                job_ids=[job_id],
                format="openai_jsonl",
                tokenizer=str(tokenizer_dir),
                max_seq_len=sequence_len,
                overflow="split",
            ),
        }
        for name, request in requests.items():
            with database.transaction() as session:
                export_id = export_service.create_export(session, project_id, request, settings).id
            build_export(database, settings, export_id)
            with database.transaction() as session:
                row = session.get(Export, export_id)
                assert row is not None
                if row.status != "completed":
                    raise RuntimeError(f"the export {name!r} ended {row.status}: {row.error}")
            exports[name] = export_path(settings, project_id, export_id)
        return exports


def _label_by_rules(database: Database, job_id: uuid.UUID) -> None:
    with database.transaction() as session:
        rows = session.execute(
            select(Verdict.id, Verdict.trajectory_id, Verdict.step_index).where(
                Verdict.job_id == job_id
            )
        ).all()
        labels: dict[uuid.UUID, list[str]] = {}
        for row in rows:
            if row.trajectory_id not in labels:
                messages = session.get(Trajectory, row.trajectory_id).messages  # type: ignore[union-attr]
                verdicts = label_trajectory(messages, split_steps(messages), DEFAULT_LABELS)
                labels[row.trajectory_id] = [v.label for v in verdicts]
            label = labels[row.trajectory_id][row.step_index]
            session.execute(
                update(Verdict)
                .where(Verdict.id == row.id)
                .values(status="done", label=label, reason=f"rules: {label}")
            )
        workqueue.finish_if_done(session, job_id)


# ------------------------------------------------------------------------ Axolotl


def axolotl_config(
    workdir: Path, model_dir: Path, shards: list[Path], sequence_len: int, steps: int
) -> dict[str, Any]:
    """The configuration the README gives, plus what a CPU run needs."""
    return {
        "base_model": str(model_dir),
        "chat_template": "tokenizer_default",
        "datasets": [
            {
                "path": str(shard),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "message_field_training": "weight",
            }
            for shard in shards
        ],
        "sequence_len": sequence_len,
        "sample_packing": False,
        "dataset_prepared_path": str(workdir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(workdir / "out"),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": max(steps, 1),
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
    }


def run_axolotl(venv: Path, command: list[str], config: Path, log: Path) -> tuple[int, float]:
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "AXOLOTL_DO_NOT_TRACK": "1",  # it sends telemetry otherwise
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("VIRTUAL_ENV", None)
    began = time.perf_counter()
    with log.open("w") as out:
        status = subprocess.run(
            [str(venv / "bin" / "axolotl"), *command, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        ).returncode
    return status, time.perf_counter() - began


def prepared_rows(prepared: Path) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    folders = sorted({p.parent for p in prepared.rglob("dataset_info.json")})
    if len(folders) != 1:
        raise RuntimeError(f"{prepared}: expected one prepared dataset, found {folders}")
    return list(load_from_disk(str(folders[0])).select_columns(["input_ids", "labels"]))


# ------------------------------------------------------------------------ counting


@dataclass
class Count:
    export_rows: int = 0
    too_long: int = 0  # export rows longer than sequence_len (by the template's render)
    prepared_rows: int = 0
    matched: int = 0
    targets: int = 0
    on_kept_turns: int = 0
    on_masked_turns: int = 0  # weight-0 assistant messages: must stay 0
    elsewhere: int = 0  # outside every assistant span: must stay 0
    weight_1_messages: int = 0  # in every export row
    reread: int = 0  # rows Axolotl renders differently from the row as written (see above)
    kept_turn_tokens: int = 0  # the template's spans of weight-1 messages, in matched rows
    masked_turn_tokens: int = 0
    kept_turns: int = 0
    kept_turns_untrained: int = 0  # weight-1 turns with no target at all
    kept_tokens_untrained: int = 0
    untrained_examples: list[str] = field(default_factory=list)


def as_axolotl_reads(example: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """A row's messages and tools as Axolotl hands them to the template: tool-call
    `arguments` parsed from JSON strings into objects (`transform_message`), and keys whose
    value is null gone from the tools (they do not reach the template; the shared runs' tool
    schemas carry some). Neither changes which turns are trained."""
    messages = []
    for message in example["messages"]:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                if isinstance(function.get("arguments"), str):
                    function["arguments"] = json.loads(function["arguments"])
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        messages.append(message)
    return messages, _without_nulls(example.get("tools"))


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def count(tokenizer: Any, export: Path, rows: list[dict[str, Any]], sequence_len: int) -> Count:
    result = Count(prepared_rows=len(rows))
    by_ids = {tuple(row["input_ids"]): row for row in rows}
    for shard in sorted((export / "data").glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            example = json.loads(line)
            result.export_rows += 1
            messages, tools = as_axolotl_reads(example)
            rendered = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids = list(rendered["input_ids"])
            raw = tokenizer.apply_chat_template(
                example["messages"], tools=example.get("tools"), tokenize=True, return_dict=True
            )
            result.reread += list(raw["input_ids"]) != ids
            weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
            result.weight_1_messages += sum(1 for w in weights if w)
            if len(ids) > sequence_len:
                result.too_long += 1
            prepared = by_ids.get(tuple(ids))
            if prepared is None:
                continue
            result.matched += 1
            mask = np.asarray(rendered["assistant_masks"], dtype=bool)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
            spans = list(zip(edges[::2], edges[1::2], strict=True))
            if len(spans) != len(weights):
                raise RuntimeError(f"{len(spans)} assistant spans for {len(weights)} messages")
            labels = np.asarray(prepared["labels"])
            targets = labels != IGNORE_INDEX
            result.targets += int(targets.sum())
            result.elsewhere += int((targets & ~mask).sum())
            for (start, end), weight in zip(spans, weights, strict=True):
                inside = int(targets[start:end].sum())
                if weight:
                    result.kept_turns += 1
                    result.on_kept_turns += inside
                    result.kept_turn_tokens += int(end - start)
                    result.kept_tokens_untrained += int(end - start) - inside
                    if inside == 0:
                        result.kept_turns_untrained += 1
                    elif inside < end - start and len(result.untrained_examples) < 3:
                        left = [int(t) for t in np.flatnonzero(~targets[start:end]) + start]
                        result.untrained_examples.append(
                            repr(tokenizer.decode([ids[t] for t in left]))[:160]
                        )
                else:
                    result.on_masked_turns += inside
                    result.masked_turn_tokens += int(end - start)
    return result


def report(name: str, c: Count, sequence_len: int, seconds: float) -> list[str]:
    print(
        f"\n  export {name}: {c.export_rows} rows, {c.too_long} longer than sequence_len "
        f"{sequence_len}; axolotl preprocess {seconds:.0f} s kept {c.prepared_rows} "
        f"({c.matched} matched to export rows by their tokens; {c.reread} export rows render "
        "differently as Axolotl reads them)"
    )
    print(
        f"    targets {c.targets:,}: on weight-1 turns {c.on_kept_turns:,} of the template's "
        f"{c.kept_turn_tokens:,} tokens in {c.kept_turns} turns (of the export's "
        f"{c.weight_1_messages} weight-1 messages); on weight-0 turns "
        f"{c.on_masked_turns} of {c.masked_turn_tokens:,}; outside assistant turns "
        f"{c.elsewhere}"
    )
    print(
        f"    weight-1 tokens left untrained {c.kept_tokens_untrained:,}; turns with no target "
        f"{c.kept_turns_untrained}"
        + (f"; e.g. {'; '.join(c.untrained_examples)}" if c.untrained_examples else "")
    )
    problems = []
    if c.on_masked_turns:
        problems.append(f"{name}: {c.on_masked_turns} tokens of weight-0 messages trained")
    if c.elsewhere:
        problems.append(f"{name}: {c.elsewhere} tokens outside assistant turns trained")
    if c.kept_turns_untrained:
        problems.append(f"{name}: {c.kept_turns_untrained} weight-1 turns with no target")
    if c.matched != c.prepared_rows:
        problems.append(f"{name}: {c.prepared_rows - c.matched} prepared rows not matched")
    return problems


def final_loss(log: Path) -> float | None:
    """The last `'loss': ...` Axolotl (the HF Trainer) printed."""
    loss = None
    for line in log.read_text(errors="replace").splitlines():
        if "'loss'" in line:
            try:
                loss = float(line.split("'loss':", 1)[1].split(",", 1)[0].strip(" '"))
            except ValueError:
                continue
    return loss


# ------------------------------------------------------------------------ main


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="srft-bench-axolotl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def benchmark(options: Options) -> int:
    import yaml
    from transformers import AutoTokenizer

    from tests.chat_tokenizers import build_tokenizer
    from tests.training.models import tiny_model

    axolotl = options.axolotl_venv / "bin" / "axolotl"
    if not axolotl.exists():
        print(f"no {axolotl}: install Axolotl as the docstring says", file=sys.stderr)
        return 2
    version = subprocess.run(
        [str(options.axolotl_venv / "bin" / "python"), "-c", _VERSIONS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    machine = machine_facts()
    print(
        f"srft openai_jsonl -> Axolotl ({version}); {machine['usable_cpus']} CPUs "
        f"({machine['cpu_model'] or 'unknown CPU'}), Python {machine['python']}"
    )
    problems: list[str] = []
    with _workdir(options.keep) as workdir:
        tokenizer_dir = (
            options.tokenizer.resolve()
            if options.tokenizer
            else build_tokenizer(workdir / "tokenizer", "chatml")
        )
        model_dir = tiny_model(workdir / "model", tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if options.export is not None:
            exports = {str(options.export): options.export.resolve()}
        else:
            began = time.perf_counter()
            exports = export_shared_runs(workdir, tokenizer_dir, options.sequence_len)
            print(f"  exported the shared runs in {time.perf_counter() - began:.0f} s")
        last: Path | None = None
        for n, (name, folder) in enumerate(exports.items()):
            run_dir = workdir / f"axolotl-{n}"
            run_dir.mkdir()
            shards = sorted((folder / "data").glob("*.jsonl"))
            config = run_dir / "config.yml"
            config.write_text(
                yaml.safe_dump(
                    axolotl_config(
                        run_dir, model_dir, shards, options.sequence_len, options.train_steps
                    ),
                    sort_keys=False,
                )
            )
            status, seconds = run_axolotl(
                options.axolotl_venv, ["preprocess"], config, run_dir / "preprocess.log"
            )
            if status != 0:
                problems.append(f"{name}: axolotl preprocess exited {status}")
                print((run_dir / "preprocess.log").read_text()[-3000:], file=sys.stderr)
                continue
            counted = count(
                tokenizer, folder, prepared_rows(run_dir / "prepared"), options.sequence_len
            )
            problems += report(name, counted, options.sequence_len, seconds)
            last = config
        if options.train_steps and last is not None:
            log = last.parent / "train.log"
            status, seconds = run_axolotl(
                options.axolotl_venv, ["train", "--launcher", "python"], last, log
            )
            loss = final_loss(log)
            print(
                f"\n  axolotl train ({options.train_steps} steps, tiny Llama, CPU): exit "
                f"{status} in {seconds:.0f} s, last loss {loss}"
            )
            if status != 0 or loss is None or not math.isfinite(loss):
                problems.append(f"axolotl train exited {status}, last loss {loss}")
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


_VERSIONS = (
    "from importlib.metadata import version as v; "
    "print(', '.join(f'{p} {v(p)}' for p in "
    "('axolotl', 'transformers', 'datasets', 'trl', 'torch')))"
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cleaning_up(benchmark, parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
