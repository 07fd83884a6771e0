"""Building an export: trajectories and verdicts in, policy applied, rows written to shards,
a manifest, and an atomic publish. Run by a worker task; never half-published.

Files are written under `<export_dir>/.building/<id>-<claim>/` and renamed to
`<export_dir>/<project>/<id>/` only when complete; a failure removes the building folder, so
a failed export leaves no files. Trajectories are read and written in batches, so memory does
not grow with the size of the export.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

from app import __version__
from app.config import Settings
from app.db import Database, is_database_unavailable
from app.exports import finetune, service
from app.exports import formats as export_formats
from app.exports import rows as row_builders
from app.exports.formats import ExportFormat, MessageRows, TextRows, TokenRows
from app.exports.manifest import MANIFEST, manifest_bytes
from app.exports.rows import Source
from app.exports.tokenize import PREFIX_TOO_LONG, Example, TokenizeConfig, Tokenized
from app.exports.writers.jsonl import JsonlShards
from app.exports.writers.shards import ShardInfo, ShardLimits
from app.models import Export
from app.recipe.masking import PolicyCounts, PolicyOptions, TrajectoryDecision, decide
from app.recipe.render import SpanStats, template_hash
from app.status import ExportStatus

if TYPE_CHECKING:
    from app.exports.pool import TokenizePool

log = logging.getLogger("srft.exports")

# At most this long between heartbeats, and never more than a third of the stale timeout, so
# a live builder is never taken for a dead one.
HEARTBEAT_S = 10.0
MAX_LISTED = 20
# Rows dropped because of what one trajectory is, not because the request asked for it.
OUTLIER_REASONS = frozenset({PREFIX_TOO_LONG})
MAX_LISTED_OUTLIERS = 10_000


class ExportRefusedError(Exception):
    """The export cannot be built as asked; the reason goes to the caller."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ClaimLostError(Exception):
    """Another worker took the export over (this one stalled past the timeout)."""


class BuildInterruptedError(Exception):
    """The database became unavailable during the build. Nothing is left on disk and the
    export is still claimed under the same token: the caller tries again with that token once
    the database is back. `failure`: a failure the build found but could not record, for the
    next try to record instead of building again."""

    def __init__(self, failure: dict[str, Any] | None = None) -> None:
        super().__init__("the database became unavailable during the export")
        self.failure = failure


def export_path(settings: Settings, project_id: uuid.UUID, export_id: uuid.UUID) -> Path:
    return settings.export_dir / str(project_id) / str(export_id)


def building_root(settings: Settings) -> Path:
    return settings.export_dir / ".building"


@dataclass
class RowCounts:
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    split_rows: int = 0  # rows that are a piece of a split conversation

    # The trajectories of rows dropped as outliers (not by the request's own choice), by
    # reason, so that a big export's few odd rows can be found; at most MAX_LISTED_OUTLIERS.
    outliers: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def absorb(self, result: Tokenized) -> None:
        """Count what tokenizing one trajectory cut and dropped."""
        self.truncated += result.truncated
        for reason, count in result.dropped.items():
            self.drop(reason, count)
            if reason in OUTLIER_REASONS:
                listed = self.outliers.setdefault(reason, [])
                if len(listed) < MAX_LISTED_OUTLIERS:
                    listed.append(result.key)


def build_export(
    database: Database,
    settings: Settings,
    export_id: uuid.UUID,
    *,
    token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> ExportStatus | None:
    """Claim and build one export. Returns its final status, or None if it was not ours.

    `token`: the claim token to build under (a fresh one if None); an export still running
    under it is taken back. `failure`: record this failure ({code, message, details}) under
    `token` instead of building. Raises BuildInterruptedError when the database becomes
    unavailable (claiming, reading, beating, completing or recording a failure), for the task
    to try again with the same token as soon as it is back, rather than leave the export
    `running` with no reason until the sweeper takes it over.
    """
    token = token or str(uuid.uuid4())
    if failure is not None:
        return _record_failure(database, export_id, token, failure)
    try:
        with database.transaction() as session:
            claimed = service.claim(session, export_id, settings.stale_after_s, token=token)
            export = session.get(Export, export_id) if claimed else None
            if export is None:
                return None
            session.expunge(export)
    except Exception as error:
        if is_database_unavailable(error):
            raise BuildInterruptedError() from error
        raise
    building = building_root(settings) / f"{export_id}-{token}"
    _remove_stale_building(settings, export_id)
    try:
        manifest = _build(database, settings, export, token, building)
        final = export_path(settings, export.project_id, export_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier attempt published but did not record it
            shutil.rmtree(final)
        building.rename(final)
        with database.transaction() as session:
            if not service.complete(session, export_id, token, manifest):
                log.warning("export %s was taken over while finishing; kept its files", export_id)
                return None
        log.info("export %s completed: %d rows", export_id, manifest["counts"]["rows"]["written"])
        return ExportStatus.COMPLETED
    except ClaimLostError:
        log.warning("export %s was taken over by another worker; stopping", export_id)
        shutil.rmtree(building, ignore_errors=True)
        return None
    except Exception as error:
        shutil.rmtree(building, ignore_errors=True)
        if is_database_unavailable(error):
            # Not a failure of the export: it is built again, from the start, once the
            # database is back (the same inputs give the same bytes).
            reason = str(getattr(error, "orig", None) or error).partition("\n")[0]
            log.warning("export %s: the database became unavailable (%s)", export_id, reason)
            raise BuildInterruptedError() from error
        if isinstance(error, ExportRefusedError):
            log.info("export %s failed: %s", export_id, error.message)
            failed = {"code": error.code, "message": error.message, "details": error.details}
        else:
            log.exception("export %s failed unexpectedly", export_id)
            failed = {
                "code": "internal_error",
                "message": f"the export failed: {type(error).__name__}: {error}",
                "details": None,
            }
        return _record_failure(database, export_id, token, failed)


def _record_failure(
    database: Database, export_id: uuid.UUID, token: str, failure: dict[str, Any]
) -> ExportStatus:
    try:
        with database.transaction() as session:
            service.fail(
                session,
                export_id,
                token,
                code=failure["code"],
                message=failure["message"],
                details=failure.get("details"),
            )
    except Exception as error:
        if is_database_unavailable(error):
            raise BuildInterruptedError(failure) from error
        raise
    return ExportStatus.FAILED


def remove_export_files(settings: Settings, project_id: uuid.UUID, export_id: uuid.UUID) -> None:
    """An export's published folder and any building folder left by an attempt at it; what
    is already gone is skipped, and a file that cannot be removed is logged, not raised
    (the export's row is gone: nothing would retry)."""
    _remove_tree(export_path(settings, project_id, export_id))
    _remove_stale_building(settings, export_id)


def _remove_tree(path: Path) -> None:
    def failed(_function: object, name: str, info: tuple[type, BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            log.warning("could not remove %s: %s", name, info[1])

    shutil.rmtree(path, onerror=failed)


def _remove_stale_building(settings: Settings, export_id: uuid.UUID) -> None:
    """Folders left by earlier, dead attempts at this export."""
    root = building_root(settings)
    if root.exists():
        for stale in root.glob(f"{export_id}-*"):
            _remove_tree(stale)


class _Heartbeat:
    def __init__(
        self, database: Database, export_id: uuid.UUID, token: str, stale_after_s: float
    ) -> None:
        self.database = database
        self.export_id = export_id
        self.token = token
        self.interval = min(HEARTBEAT_S, stale_after_s / 3)
        self.last = 0.0

    def beat(self, done: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        with self.database.transaction() as session:
            if not service.heartbeat(session, self.export_id, self.token, done=done, total=total):
                raise ClaimLostError()


def _build(
    database: Database, settings: Settings, export: Export, token: str, building: Path
) -> dict[str, Any]:
    # First: a format nobody registered never reads a trajectory, let alone builds a row.
    fmt = _format_of(export)
    config = export.config
    options = PolicyOptions(
        mask_labels=frozenset(config["options"]["mask_labels"]),
        critique_resolved=config["options"]["critique_resolved"],
        unlabeled=config["options"]["unlabeled"],
        soft=config["options"]["soft"],
        min_trained_steps=config["options"]["min_trained_steps"],
    )
    with database.sessions() as session:
        ids = service.trajectory_ids(
            session, export.project_id, export.job_ids, config.get("selection")
        )
        jobs = service.job_infos(session, export.job_ids)
    if not ids:
        raise ExportRefusedError("no_trajectories", "the jobs' selections match no trajectory")
    if config.get("seed") is not None:
        random.Random(config["seed"]).shuffle(ids)
    heartbeat = _Heartbeat(database, export.id, token, settings.stale_after_s)
    heartbeat.beat(0, len(ids), force=True)

    building.mkdir(parents=True, exist_ok=False)
    limits = ShardLimits(config["shard_max_rows"], config["shard_max_bytes"])
    policy = config["policy"]
    counts = PolicyCounts()
    rows = RowCounts()
    stats = SpanStats()

    def decided() -> Iterator[list[tuple[Source, TrajectoryDecision]]]:
        done = 0
        for start in range(0, len(ids), settings.export_batch_size):
            batch = ids[start : start + settings.export_batch_size]
            with database.sessions() as session:
                sources = service.load_sources(session, batch, export.job_ids)
            out = []
            for source in sources:
                decision = decide(policy, source.resolved, source.labels, options)
                counts.add(decision)
                if decision.kept:
                    out.append((source, decision))
            done += len(batch)
            heartbeat.beat(done, len(ids))
            yield out

    tokenizer_info: dict[str, Any] | None = None
    profile: finetune.ProfileCounts | None = None
    match fmt.rows:
        case TokenRows() as kind:
            shards, tokenizer_info = _write_tokenized(
                settings, config, fmt, kind, building, limits, decided(), rows, stats
            )
        case MessageRows() as kind:
            # Rows fitted to the fine-tuning format: what fitting changed is counted here.
            profile = finetune.ProfileCounts() if kind.fine_tune else None
            shards, tokenizer_info = _write_messages(
                settings, config, kind, building, limits, decided(), rows, profile
            )
        case TextRows() as kind:
            shards = _write_text(building, limits, kind, decided(), rows)
        case _:
            assert_never(fmt.rows)
    if rows.written == 0:
        raise ExportRefusedError(
            "no_rows",
            "no row has a trained step under this policy and these options "
            f"(trajectories dropped: {counts.trajectories_dropped}, rows dropped: "
            f"{rows.dropped})",
            details={"policy": counts.as_dict(), "rows": rows.dropped},
        )
    manifest = _manifest(
        export, fmt, jobs, config, tokenizer_info, counts, rows, stats, shards, ids, profile
    )
    (building / MANIFEST).write_bytes(manifest_bytes(manifest))
    heartbeat.beat(len(ids), len(ids), force=True)
    return manifest


def _format_of(export: Export) -> ExportFormat:
    try:
        return export_formats.get_format(export.format)
    except export_formats.UnknownExportFormatError as error:
        raise ExportRefusedError("unknown_format", str(error)) from error


def _write_text(
    building: Path,
    limits: ShardLimits,
    kind: TextRows,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
) -> list[ShardInfo]:
    writer = JsonlShards(building, limits)
    try:
        for batch in batches:
            for source, decision in batch:
                row = kind.build(source, decision)
                if row is None:
                    rows.drop("no_trained_tokens")
                    continue
                writer.write(row)
                rows.written += 1
        return writer.close()
    finally:
        writer.abort()


def _write_messages(
    settings: Settings,
    config: dict[str, Any],
    kind: MessageRows,
    building: Path,
    limits: ShardLimits,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
    profile: finetune.ProfileCounts | None,
) -> tuple[list[ShardInfo], dict[str, Any] | None]:
    """Rows of messages: as `kind` builds them, or (`profile` set) also fitted to the
    fine-tuning format and checked against it. With a tokenizer, each row is measured with
    its chat template and split, dropped or cut at a step boundary to fit `max_seq_len`, in
    the tokenizing processes."""

    def examples() -> Iterator[list[Example]]:
        for batch in batches:
            out: list[Example] = []
            for source, decision in batch:
                row = kind.build(source, decision)
                if row is not None and profile is not None:
                    row = finetune.fit_row(row["messages"], row.get("tools"), profile)
                if row is None:
                    rows.drop("no_trained_tokens")
                    continue
                out.append(row_builders.message_example(str(source.id), row))
            yield out

    pool: TokenizePool | None = None
    info: dict[str, Any] | None = None
    writer = JsonlShards(building, limits)
    try:
        if config.get("tokenizer"):
            measure = _tokenize_config(config, messages=True)
            pool, info = _tokenize_pool(settings, config, measure)
        if pool is None:
            results: Iterator[list[Tokenized]] = (
                [Tokenized(e.key, pieces=[e]) for e in batch] for batch in examples()
            )
        else:
            results = pool.map(examples())
        for batch_results in results:
            _refuse_on_errors(batch_results, config["tokenizer"])
            invalid: list[dict[str, Any]] = []
            for result in batch_results:
                rows.absorb(result)
                for part, piece in enumerate(result.pieces):
                    row = row_builders.message_row(piece)
                    found = finetune.problems(row) if profile is not None else []
                    if found:
                        invalid.append(
                            {"trajectory_id": result.key, "part": part, "problems": found}
                        )
                        continue
                    writer.write(row)
                    rows.written += 1
                    if len(result.pieces) > 1:
                        rows.split_rows += 1
            if invalid:
                _refuse_invalid(invalid)
        return writer.close(), info
    finally:
        writer.abort()
        if pool is not None:
            pool.close()


def _refuse_invalid(invalid: Sequence[dict[str, Any]]) -> None:
    first = invalid[0]
    message = (
        f"{len(invalid)} rows of this batch are not valid fine-tuning examples and would be "
        f"refused by a fine-tuning service (first: trajectory {first['trajectory_id']}: "
        f"{first['problems'][0]}); export them as openai_jsonl_raw to get the canonical "
        "messages unchanged"
    )
    raise ExportRefusedError("invalid_rows", message, details={"rows": list(invalid[:MAX_LISTED])})


def _tokenize_pool(
    settings: Settings, config: dict[str, Any], tokenize_config: TokenizeConfig
) -> tuple[TokenizePool, dict[str, Any]]:
    """The export's tokenizer, loaded through the checks, in a pool of tokenizing processes;
    and what the manifest says of it."""
    try:
        import transformers  # noqa: F401

        from app.exports.pool import TokenizePool
        from app.exports.tokenize import (
            NotFastTokenizerError,
            TokenizerUnavailableError,
            load_export_tokenizer,
        )
    except ImportError as error:
        raise ExportRefusedError(
            "missing_dependency",
            f"{config['format']} with a tokenizer needs transformers on the worker: "
            f"pip install 'srft[export]' ({error})",
        ) from error

    name, revision = config["tokenizer"], config.get("tokenizer_revision")
    try:
        chat, load_as = load_export_tokenizer(name, revision, settings.tokenizer_roots)
    except NotFastTokenizerError as error:
        raise ExportRefusedError(
            "tokenizer_not_fast",
            f"the tokenizer {name!r} is not a fast tokenizer: token offsets (needed to map "
            "turns onto tokens) come only from a tokenizer.json",
        ) from error
    except TokenizerUnavailableError as error:
        # Why (what exists where) is for the worker's log; the caller learns only that it failed.
        log.warning("tokenizer %r unavailable: %s", name, error.reason, exc_info=error.__cause__)
        raise ExportRefusedError("tokenizer_unavailable", error.message) from error
    # The pool's processes load what was checked here: a resolved path, or the Hub id.
    pool = TokenizePool(chat, load_as, revision, tokenize_config, settings.export_processes)
    tokenizer = chat.tokenizer
    info = {
        "name": name,
        "revision": revision,
        "class": type(tokenizer).__name__,
        "chat_template_sha256": template_hash(chat.renderer.template_for(None)),
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
    }
    return pool, info


def _write_tokenized(
    settings: Settings,
    config: dict[str, Any],
    fmt: ExportFormat,
    kind: TokenRows,
    building: Path,
    limits: ShardLimits,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
    stats: SpanStats,
) -> tuple[list[ShardInfo], dict[str, Any]]:
    try:
        from app.exports.writers.parquet import ParquetShards
    except ImportError as error:
        raise ExportRefusedError(
            "missing_dependency",
            f"{fmt.name} needs transformers and pyarrow on the worker: "
            f"pip install 'srft[export]' ({error})",
        ) from error

    tokenize_config = _tokenize_config(config)
    pool, info = _tokenize_pool(settings, config, tokenize_config)
    writer = ParquetShards(building, limits, soft=config["options"]["soft"])
    examples = ([kind.example(source, decision) for source, decision in batch] for batch in batches)
    try:
        for results in pool.map(examples):
            _refuse_on_errors(results, config["tokenizer"])
            for result in results:
                stats.add(result.stats)
                rows.absorb(result)
                for row in result.rows:
                    writer.write(result.key, row)
                    rows.written += 1
                    if len(result.rows) > 1:
                        rows.split_rows += 1
        shards = writer.close()
    finally:
        writer.abort()
        pool.close()
    return shards, info


def _tokenize_config(config: dict[str, Any], *, messages: bool = False) -> TokenizeConfig:
    """The request's length limits. An export queued before `strict` existed is strict:
    a row whose task prefix is too long failed it then."""
    return TokenizeConfig(
        config.get("max_seq_len"),
        config["overflow"],
        messages=messages,
        strict=config.get("strict", True),
    )


def _refuse_on_errors(results: Sequence[Any], tokenizer: str) -> None:
    failed = [r for r in results if r.error is not None]
    if not failed:
        return
    code = failed[0].error_code or "tokenize_failed"
    listed = [{"trajectory_id": r.key, "reason": r.error} for r in failed[:MAX_LISTED]]
    if code == "template_not_prefix_stable":
        message = (
            f"the chat template of {tokenizer!r} is not prefix-stable, so no mask computed "
            f"from it would be right: {len(failed)} rows of this batch render past turns "
            f"differently once later turns follow (first: trajectory {failed[0].key}, "
            f"{failed[0].error}). Use a template that renders history as it was generated."
        )
    else:
        message = f"trajectory {failed[0].key}: {failed[0].error}"
        if len(failed) > 1:
            message += f" (and {len(failed) - 1} more rows of this batch)"
    raise ExportRefusedError(code, message, details={"rows": listed})


def _manifest(
    export: Export,
    fmt: ExportFormat,
    jobs: Sequence[service.JobInfo],
    config: dict[str, Any],
    tokenizer: dict[str, Any] | None,
    counts: PolicyCounts,
    rows: RowCounts,
    stats: SpanStats,
    shards: Sequence[ShardInfo],
    ids: Sequence[uuid.UUID],
    profile: finetune.ProfileCounts | None,
) -> dict[str, Any]:
    """Everything needed to trust and reproduce the shards; no times or export id, so the
    same inputs give the same manifest too."""
    tokenized = isinstance(fmt.rows, TokenRows)
    policy_counts = counts.as_dict()
    return {
        "srft_version": __version__,
        "format": fmt.name,
        "policy": {"name": config["policy"], "options": config["options"]},
        "config": {
            key: config.get(key)
            for key in (
                "max_seq_len",
                "overflow",
                "seed",
                "selection",
                "shard_max_rows",
                "shard_max_bytes",
            )
        },
        "tokenizer": tokenizer,
        "source_job_ids": list(export.job_ids),
        "critic": [
            {
                "job_id": str(job.id),
                "model": job.critic_model,
                "prompt_hash": job.prompt_hash,
                "mode": job.mode,
                "votes": job.votes,
                "temperature": job.temperature,
                "labels": job.labels,
            }
            for job in jobs
        ],
        "counts": {
            "trajectories": {
                "considered": len(ids),
                "kept": counts.trajectories_kept,
                "dropped": policy_counts["trajectories_dropped"],
            },
            "steps": {
                key: policy_counts[key]
                for key in (
                    "steps_trained",
                    "steps_masked",
                    "steps_cut",
                    "trained_by_label",
                    "masked_by_label",
                    "steps_by_source",
                )
            },
            "rows": {
                "written": rows.written,
                "dropped": dict(sorted(rows.dropped.items())),
                "dropped_trajectories": dict(sorted(rows.outliers.items())),
                "truncated": rows.truncated,
                "split_rows": rows.split_rows,
            },
            # Formats fitted to the fine-tuning format (openai_jsonl): what fitting changed.
            "profile": profile.as_dict() if profile is not None else None,
            "tokens": {
                "total": sum(s.tokens or 0 for s in shards) if tokenized else None,
                "trained": sum(s.trained_tokens or 0 for s in shards) if tokenized else None,
                "straddling_span_edges": stats.straddling_tokens if tokenized else None,
                "turns_without_end_token": stats.turns_without_end_token if tokenized else None,
                "empty_turns": stats.empty_turns if tokenized else None,
            },
        },
        "columns": [f.name for f in _parquet_schema(config)] if tokenized else None,
        "shards": [s.as_dict() for s in shards],
    }


def _parquet_schema(config: dict[str, Any]) -> Any:
    from app.exports.writers.parquet import schema

    return schema(config["options"]["soft"])
