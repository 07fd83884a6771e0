"""Building an export: trajectories and verdicts in, policy applied, rows written to shards,
a manifest, and an atomic publish. Run by worker tasks; never half-published.

An export is built in parts (`app/exports/parts.py` says how, and why the result is the same
bytes as one task's): `build_export` plans the parts, `build_part` builds one, and
`finish_export` (the final task) writes the shards and the manifest from the parts' rows and
publishes. An export of one part is planned, built and finished by one `build_export`.

Files are written under `<export_dir>/.building/<id>/` (a part in `parts/<index>-<claim>/`,
the final task in `final-<claim>/`), and the final folder is renamed to
`<export_dir>/<project>/<id>/` only when complete; a failure removes what its task wrote, so a
failed export leaves no files. Trajectories are read and rows written in batches, so memory
does not grow with the size of the export.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

from app import __version__
from app.config import Settings
from app.db import Database, is_database_unavailable
from app.exports import finetune, service
from app.exports import formats as export_formats
from app.exports import queue as export_queue
from app.exports import rows as row_builders
from app.exports.formats import ExportFormat, MessageRows, TextRows, TokenRows
from app.exports.manifest import MANIFEST, manifest_bytes
from app.exports.parts import RESULT, PartFile, PartResult, PartSpan, RowCounts, add_up, plan_parts
from app.exports.rows import Source
from app.exports.tokenize import Example, TokenizeConfig, Tokenized
from app.exports.writers import jsonl as jsonl_writer
from app.exports.writers.jsonl import JsonlRun, JsonlShards
from app.exports.writers.shards import ShardInfo, ShardLimits, file_sha256
from app.models import Export, ExportPart
from app.recipe.masking import PolicyCounts, PolicyOptions, TrajectoryDecision, decide
from app.recipe.render import SpanStats, template_hash
from app.status import ExportPartStatus, ExportStatus

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.exports.pool import TokenizePool

log = logging.getLogger("srft.exports")

# At most this long between heartbeats, and never more than a third of the stale timeout, so
# a live builder is never taken for a dead one.
HEARTBEAT_S = 10.0
MAX_LISTED = 20
# Ids read per query while planning the parts.
PLAN_PAGE = 5000
FINAL = "final"


class ExportRefusedError(Exception):
    """The export cannot be built as asked; the reason goes to the caller."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ClaimLostError(Exception):
    """Another worker took the export (or part) over (this one stalled past the timeout), or
    the export failed meanwhile."""


class BuildInterruptedError(Exception):
    """The database became unavailable during the build. Nothing is left on disk and the
    export (or part) is still claimed under the same token: the caller tries again with that
    token once the database is back. `failure`: a failure the build found but could not
    record, for the next try to record instead of building again."""

    def __init__(self, failure: dict[str, Any] | None = None) -> None:
        super().__init__("the database became unavailable during the export")
        self.failure = failure


def export_path(settings: Settings, project_id: uuid.UUID, export_id: uuid.UUID) -> Path:
    return settings.export_dir / str(project_id) / str(export_id)


def building_root(settings: Settings) -> Path:
    return settings.export_dir / ".building"


def export_building(settings: Settings, export_id: uuid.UUID) -> Path:
    """Where an export's parts and final task write, on the storage every worker shares."""
    return building_root(settings) / str(export_id)


def part_folder(settings: Settings, export_id: uuid.UUID, name: str) -> Path:
    return export_building(settings, export_id) / "parts" / name


def part_output(index: int, token: str) -> str:
    """The folder name of one try at one part: a slow try that lost its claim never writes
    into the folder of the try that took over."""
    return f"{index:05d}-{token}"


# ---------------------------------------------------------------------- the tasks' entry points


def _database_call(work: Callable[[], Any]) -> Any:
    """`work` (database only); an outage becomes BuildInterruptedError."""
    try:
        return work()
    except Exception as error:
        if is_database_unavailable(error):
            raise BuildInterruptedError() from error
        raise


def build_export(
    database: Database,
    settings: Settings,
    export_id: uuid.UUID,
    *,
    token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> ExportStatus | None:
    """Claim a queued export and plan its parts; build it whole if it is one part. Returns
    its final status, RUNNING when its parts were handed to the workers, or None if it was
    not ours.

    An export already planned is brought forward instead: parts still claimed under `token`
    (an earlier try of this task) are built, then the final task runs if every part is done.

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

    def planned() -> bool:
        with database.transaction() as session:
            return service.is_planned(session, export_id)

    if _database_call(planned):
        return _bring_forward(database, settings, export_id, token)

    def claim() -> Export | None:
        with database.transaction() as session:
            claimed = service.claim(session, export_id, settings.stale_after_s, token=token)
            export = session.get(Export, export_id) if claimed else None
            if export is not None:
                session.expunge(export)
            return export

    export: Export | None = _database_call(claim)
    if export is None:
        return None
    _remove_stale_building(settings, export_id)
    try:
        part_ids = _plan(database, settings, export, token)
    except ClaimLostError:
        log.warning("export %s was taken over by another worker; stopping", export_id)
        return None
    except Exception as error:
        if is_database_unavailable(error):
            _log_outage(f"export {export_id}", error)
            raise BuildInterruptedError() from error
        _log_failure(f"export {export_id}", error)
        return _record_failure(database, export_id, token, _failure_of(error))
    if len(part_ids) > 1:
        log.info("export %s planned in %d parts", export_id, len(part_ids))
        return ExportStatus.RUNNING
    return _bring_forward(database, settings, export_id, token)


def _bring_forward(
    database: Database, settings: Settings, export_id: uuid.UUID, token: str
) -> ExportStatus | None:
    """Build the parts still claimed under `token`, then finish if every part is done."""

    def own() -> list[uuid.UUID]:
        with database.transaction() as session:
            return service.parts_claimed_by(session, export_id, token)

    for part_id in _database_call(own):
        status = build_part(database, settings, part_id, token=token, queue_final=False)
        if status == ExportStatus.FAILED:
            return status
    return finish_export(database, settings, export_id, token=token)


def _plan(database: Database, settings: Settings, export: Export, token: str) -> list[uuid.UUID]:
    """Cut the export's trajectories into parts and store them (queued, unless there is only
    one, which stays claimed for this task to build)."""
    _format_of(export)  # a format nobody registered never reads a trajectory
    spans: list[PartSpan] = list(
        plan_parts(_ordered_ids(database, export), settings.export_part_trajectories)
    )
    if not spans:
        raise ExportRefusedError("no_trajectories", "the jobs' selections match no trajectory")
    with database.transaction() as session:
        part_ids = service.create_parts(session, export.id, token, spans)
        if part_ids is None:
            raise ClaimLostError()
        if len(part_ids) > 1:
            export_queue.enqueue_parts_after_commit(session, settings.broker_url, part_ids)
    return part_ids


def _ordered_ids(database: Database, export: Export) -> Iterator[uuid.UUID]:
    """The export's trajectories in its order: id order, read a page at a time; or, with a
    seed, all of them shuffled (as a one-task build always did)."""
    config = export.config
    if config.get("seed") is not None:
        yield from _shuffled_ids(database, export)
        return
    after: uuid.UUID | None = None
    while True:
        with database.sessions() as session:
            page = service.trajectory_ids(
                session,
                export.project_id,
                export.job_ids,
                config.get("selection"),
                after=after,
                limit=PLAN_PAGE,
            )
        yield from page
        if len(page) < PLAN_PAGE:
            return
        after = page[-1]


def _shuffled_ids(database: Database, export: Export) -> list[uuid.UUID]:
    with database.sessions() as session:
        ids = service.trajectory_ids(
            session, export.project_id, export.job_ids, export.config.get("selection")
        )
    random.Random(export.config["seed"]).shuffle(ids)
    return ids


def _log_outage(what: str, error: Exception) -> None:
    reason = str(getattr(error, "orig", None) or error).partition("\n")[0]
    log.warning("%s: the database became unavailable (%s)", what, reason)


def _failure_of(error: Exception) -> dict[str, Any]:
    if isinstance(error, ExportRefusedError):
        return {"code": error.code, "message": error.message, "details": error.details}
    return {
        "code": "internal_error",
        "message": f"the export failed: {type(error).__name__}: {error}",
        "details": None,
    }


def _log_failure(what: str, error: Exception) -> None:
    if isinstance(error, ExportRefusedError):
        log.info("%s failed: %s", what, error.message)
    else:
        log.error("%s failed unexpectedly", what, exc_info=error)


def _record_failure(
    database: Database,
    export_id: uuid.UUID,
    token: str,
    failure: dict[str, Any],
    part_id: uuid.UUID | None = None,
) -> ExportStatus | None:
    """Fail the export under `token` (or, for a part, under the part's claim); None when the
    claim was lost meanwhile, so there was nothing to record."""
    try:
        with database.transaction() as session:
            fields = {
                "code": failure["code"],
                "message": failure["message"],
                "details": failure.get("details"),
            }
            if part_id is not None:
                recorded = service.fail_part(session, part_id, token, **fields)
            else:
                recorded = service.fail(session, export_id, token, **fields)
    except Exception as error:
        if is_database_unavailable(error):
            raise BuildInterruptedError(failure) from error
        raise
    if part_id is not None and not recorded:
        return None
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
    """Folders left by earlier, dead attempts at this export (before it was planned)."""
    root = building_root(settings)
    if root.exists():
        _remove_tree(export_building(settings, export_id))
        for stale in root.glob(f"{export_id}-*"):  # the layout of one-task builds
            _remove_tree(stale)


def _remove_part(folder: Path) -> None:
    """A part's folder, and the export's folders above it if nothing else is left in them."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            return


class _Heartbeat:
    """Keeps a claim alive and records progress, at most every `interval` seconds."""

    def __init__(self, database: Database, stale_after_s: float) -> None:
        self.database = database
        self.interval = min(HEARTBEAT_S, stale_after_s / 3)
        self.last = 0.0

    def beat(self, done: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        with self.database.transaction() as session:
            if not self._record(session, done, total):
                raise ClaimLostError()

    def _record(self, session: Session, done: int, total: int) -> bool:
        raise NotImplementedError


class _ExportHeartbeat(_Heartbeat):
    def __init__(
        self, database: Database, export_id: uuid.UUID, token: str, stale_after_s: float
    ) -> None:
        super().__init__(database, stale_after_s)
        self.export_id = export_id
        self.token = token

    def _record(self, session: Session, done: int, total: int) -> bool:
        return service.heartbeat(session, self.export_id, self.token, done=done, total=total)


class _PartHeartbeat(_Heartbeat):
    def __init__(
        self, database: Database, part: ExportPart, token: str, stale_after_s: float
    ) -> None:
        super().__init__(database, stale_after_s)
        self.part_id = part.id
        self.export_id = part.export_id
        self.token = token

    def _record(self, session: Session, done: int, total: int) -> bool:
        return service.part_heartbeat(session, self.part_id, self.export_id, self.token, done=done)


# ---------------------------------------------------------------------- one part


def build_part(
    database: Database,
    settings: Settings,
    part_id: uuid.UUID,
    *,
    token: str | None = None,
    failure: dict[str, Any] | None = None,
    queue_final: bool = True,
) -> ExportStatus | None:
    """Claim and build one part of an export: its rows and `part.json` in a folder of its
    own. Returns COMPLETED when the part is done, FAILED when it failed the export, None if
    it was not ours. The last part to finish queues the final task (`queue_final`), after
    its commit. `token`, `failure` and BuildInterruptedError as for `build_export`."""
    token = token or str(uuid.uuid4())

    def claim() -> tuple[ExportPart, Export] | None:
        with database.transaction() as session:
            claimed = service.claim_part(session, part_id, settings.stale_after_s, token=token)
            if claimed is not None:
                for row in claimed:
                    session.expunge(row)
            return claimed

    if failure is not None:
        found: tuple[ExportPart, Export] | None = _database_call(claim)
        if found is None:
            return None
        status = _record_failure(database, found[1].id, token, failure, part_id)
        if status is not None:
            shutil.rmtree(export_building(settings, found[1].id), ignore_errors=True)
        return status
    claimed: tuple[ExportPart, Export] | None = _database_call(claim)
    if claimed is None:
        return None
    part, export = claimed
    output = part_output(part.index, token)
    folder = part_folder(settings, export.id, output)
    shutil.rmtree(folder, ignore_errors=True)  # this task's own earlier try
    try:
        result = _build_part(database, settings, export, part, token, folder)
        (folder / RESULT).write_bytes(manifest_bytes(result.as_dict()))
        with database.transaction() as session:
            recorded, last = service.complete_part(session, part.id, export.id, token, output)
            if last and queue_final:
                export_queue.enqueue_finish_after_commit(session, settings.broker_url, export.id)
        if not recorded:
            raise ClaimLostError()
        log.info("export %s: part %d built (%d trajectories)", export.id, part.index, part.count)
        return ExportStatus.COMPLETED
    except ClaimLostError:
        log.warning("export %s: part %d was taken over or failed; stopping", export.id, part.index)
        _remove_part(folder)
        return None
    except Exception as error:
        _remove_part(folder)
        if is_database_unavailable(error):
            _log_outage(f"export {export.id}: part {part.index}", error)
            raise BuildInterruptedError() from error
        status = _record_failure(database, export.id, token, _failure_of(error), part.id)
        if status is None:
            # Another part failed the export first (removing the files under this one), or
            # this part was taken over: nothing of this part's to record.
            log.warning("export %s: part %d stopped: %s", export.id, part.index, error)
            return None
        _log_failure(f"export {export.id}: part {part.index}", error)
        # The export failed: no part's files will be used.
        shutil.rmtree(export_building(settings, export.id), ignore_errors=True)
        return status


def _part_ids(
    database: Database, settings: Settings, export: Export, part: ExportPart
) -> Iterator[list[uuid.UUID]]:
    """The part's trajectories in batches, checked against the plan: the trajectories an
    export selects must not change while it is built, or its parts would not fit together."""
    size = settings.export_batch_size
    seen = 0
    if export.config.get("seed") is not None:
        ids = _shuffled_ids(database, export)
        mine = ids[part.start : part.start + part.count]
        if len(ids) != export.total_trajectories or (
            mine and (mine[0], mine[-1]) != (part.first_id, part.last_id)
        ):
            _selection_changed(part, len(mine))
        del ids
        for start in range(0, len(mine), size):
            batch = mine[start : start + size]
            seen += len(batch)
            yield batch
    else:
        after: uuid.UUID | None = None
        while True:
            with database.sessions() as session:
                batch = service.trajectory_ids(
                    session,
                    export.project_id,
                    export.job_ids,
                    export.config.get("selection"),
                    first=part.first_id,
                    last=part.last_id,
                    after=after,
                    limit=size,
                )
            if not batch:
                break
            if after is None and batch[0] != part.first_id:
                _selection_changed(part, seen)
            seen += len(batch)
            if seen > part.count:
                _selection_changed(part, seen)
            yield batch
            after = batch[-1]
    if seen != part.count:
        _selection_changed(part, seen)


def _selection_changed(part: ExportPart, found: int) -> None:
    raise ExportRefusedError(
        "selection_changed",
        f"the trajectories this export selects changed while it was built (part {part.index} "
        f"was planned with {part.count} trajectories from {part.first_id} to {part.last_id}, "
        f"and found {found}); export again",
    )


def _build_part(
    database: Database,
    settings: Settings,
    export: Export,
    part: ExportPart,
    token: str,
    folder: Path,
) -> PartResult:
    fmt = _format_of(export)
    config = export.config
    options = PolicyOptions(
        mask_labels=frozenset(config["options"]["mask_labels"]),
        critique_resolved=config["options"]["critique_resolved"],
        unlabeled=config["options"]["unlabeled"],
        soft=config["options"]["soft"],
        min_trained_steps=config["options"]["min_trained_steps"],
    )
    heartbeat = _PartHeartbeat(database, part, token, settings.stale_after_s)
    heartbeat.beat(0, part.count, force=True)
    folder.mkdir(parents=True, exist_ok=False)
    policy = config["policy"]
    counts = PolicyCounts()
    rows = RowCounts()
    stats = SpanStats()

    def decided() -> Iterator[list[tuple[Source, TrajectoryDecision]]]:
        done = 0
        for batch in _part_ids(database, settings, export, part):
            with database.sessions() as session:
                sources = service.load_sources(session, batch, export.job_ids)
            out = []
            for source in sources:
                decision = decide(policy, source.resolved, source.labels, options)
                counts.add(decision)
                if decision.kept:
                    out.append((source, decision))
            done += len(batch)
            heartbeat.beat(done, part.count)
            yield out

    tokenizer_info: dict[str, Any] | None = None
    profile: finetune.ProfileCounts | None = None
    match fmt.rows:
        case TokenRows() as kind:
            written, tokenizer_info = _write_tokenized(
                settings, config, fmt, kind, folder, decided(), rows, stats
            )
        case MessageRows() as kind:
            # Rows fitted to the fine-tuning format: what fitting changed is counted here.
            profile = finetune.ProfileCounts() if kind.fine_tune else None
            written, tokenizer_info = _write_messages(
                settings, config, kind, folder, decided(), rows, profile
            )
        case TextRows() as kind:
            written = _write_text(folder, kind, decided(), rows)
        case _:
            assert_never(fmt.rows)
    heartbeat.beat(part.count, part.count, force=True)
    return PartResult(
        export_id=str(export.id),
        index=part.index,
        trajectories=part.count,
        policy=counts,
        rows=rows,
        stats=stats,
        profile=profile,
        tokenizer=tokenizer_info,
        files=[written],
    )


# ---------------------------------------------------------------------- the final task


@dataclass(frozen=True)
class _BuiltPart:
    part: ExportPart
    folder: Path
    result: PartResult


def finish_export(
    database: Database,
    settings: Settings,
    export_id: uuid.UUID,
    *,
    token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> ExportStatus | None:
    """The final task: once every part is done, check their results, write the shards and
    the manifest from their rows, in part order, and publish. Returns the export's final
    status, or None if it was not ours or not ready (a part is open: the last part queues
    this task again; a part's files were missing or wrong: it is queued to be built again).
    `token`, `failure` and BuildInterruptedError as for `build_export`."""
    token = token or str(uuid.uuid4())
    if failure is not None:
        return _record_failure(database, export_id, token, failure)

    def claim() -> tuple[Export, list[ExportPart]] | None:
        with database.transaction() as session:
            if not service.claim_final(session, export_id, settings.stale_after_s, token=token):
                return None
            export = session.get(Export, export_id, populate_existing=True)
            assert export is not None
            parts = service.parts_of(session, export_id)
            if not parts or any(p.status != ExportPartStatus.DONE for p in parts):
                service.release(session, export_id, token)
                return None
            for row in (export, *parts):
                session.expunge(row)
            return export, parts

    claimed: tuple[Export, list[ExportPart]] | None = _database_call(claim)
    if claimed is None:
        return None
    export, parts = claimed
    building = export_building(settings, export_id) / f"{FINAL}-{token}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        built, broken = _check_parts(settings, export, parts)
        if broken:
            with database.transaction() as session:
                service.reopen_parts(session, [p.id for p in broken])
                service.release(session, export_id, token)
                export_queue.enqueue_parts_after_commit(
                    session, settings.broker_url, [p.id for p in broken]
                )
            log.warning(
                "export %s: the files of parts %s are missing or wrong; building them again",
                export_id,
                [p.index for p in broken],
            )
            return None
        manifest = _finish(database, settings, export, token, built, building)
        final = export_path(settings, export.project_id, export_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier attempt published but did not record it
            shutil.rmtree(final)
        building.rename(final)
        with database.transaction() as session:
            if not service.complete(session, export_id, token, manifest):
                log.warning("export %s was taken over while finishing; kept its files", export_id)
                return None
        shutil.rmtree(export_building(settings, export_id), ignore_errors=True)
        log.info("export %s completed: %d rows", export_id, manifest["counts"]["rows"]["written"])
        return ExportStatus.COMPLETED
    except ClaimLostError:
        log.warning("export %s was taken over by another worker; stopping", export_id)
        shutil.rmtree(building, ignore_errors=True)
        return None
    except Exception as error:
        shutil.rmtree(building, ignore_errors=True)
        if is_database_unavailable(error):
            # Not a failure of the export: it is finished again, from the parts, once the
            # database is back (the same inputs give the same bytes).
            _log_outage(f"export {export_id}", error)
            raise BuildInterruptedError() from error
        _log_failure(f"export {export_id}", error)
        status = _record_failure(database, export_id, token, _failure_of(error))
        shutil.rmtree(export_building(settings, export_id), ignore_errors=True)
        return status


def _check_parts(
    settings: Settings, export: Export, parts: Sequence[ExportPart]
) -> tuple[list[_BuiltPart], list[ExportPart]]:
    """Each done part's result and files, checked (present, the right part, the sizes and
    sha256 it recorded); and the parts that failed the check."""
    built: list[_BuiltPart] = []
    broken: list[ExportPart] = []
    for part in parts:
        folder = part_folder(settings, export.id, part.output or "")
        try:
            if not part.output:
                raise ValueError("no folder recorded")
            result = PartResult.from_dict(json.loads((folder / RESULT).read_bytes()))
            if (result.export_id, result.index, result.trajectories) != (
                str(export.id),
                part.index,
                part.count,
            ):
                raise ValueError("the result is another part's")
            for written in result.files:
                path = folder / written.name
                if path.stat().st_size != written.bytes or file_sha256(path) != written.sha256:
                    raise ValueError(f"{written.name} is not what the part wrote")
        except (OSError, ValueError) as error:
            log.warning("export %s: part %d is not usable: %s", export.id, part.index, error)
            broken.append(part)
            continue
        built.append(_BuiltPart(part, folder, result))
    return built, broken


def _finish(
    database: Database,
    settings: Settings,
    export: Export,
    token: str,
    built: Sequence[_BuiltPart],
    building: Path,
) -> dict[str, Any]:
    fmt = _format_of(export)
    config = export.config
    try:
        totals = add_up([b.result for b in built])
    except ValueError as error:
        raise ExportRefusedError(
            "parts_disagree", f"the export's parts disagree: {error}"
        ) from error
    if totals.trajectories != export.total_trajectories:
        raise ExportRefusedError(
            "parts_disagree",
            f"the parts hold {totals.trajectories} trajectories, the plan "
            f"{export.total_trajectories}",
        )
    if totals.rows.written == 0:
        raise ExportRefusedError(
            "no_rows",
            "no row has a trained step under this policy and these options "
            f"(trajectories dropped: {totals.policy.trajectories_dropped}, rows dropped: "
            f"{totals.rows.dropped})",
            details={"policy": totals.policy.as_dict(), "rows": dict(totals.rows.dropped)},
        )
    with database.sessions() as session:
        jobs = service.job_infos(session, export.job_ids)
    heartbeat = _ExportHeartbeat(database, export.id, token, settings.stale_after_s)
    total = export.total_trajectories
    heartbeat.beat(total, total, force=True)
    building.mkdir(parents=True, exist_ok=False)
    limits = ShardLimits(config["shard_max_rows"], config["shard_max_bytes"])
    shards = _replay(fmt, config, building, limits, built, lambda: heartbeat.beat(total, total))
    manifest = _manifest(
        export,
        fmt,
        jobs,
        config,
        totals.tokenizer,
        totals.policy,
        totals.rows,
        totals.stats,
        shards,
        totals.trajectories,
        totals.profile,
    )
    (building / MANIFEST).write_bytes(manifest_bytes(manifest))
    heartbeat.beat(total, total, force=True)
    return manifest


def _replay(
    fmt: ExportFormat,
    config: dict[str, Any],
    building: Path,
    limits: ShardLimits,
    built: Sequence[_BuiltPart],
    beat: Callable[[], None],
) -> list[ShardInfo]:
    """The parts' rows, in order, through the shard writer a one-task build used."""
    if isinstance(fmt.rows, TokenRows):
        try:
            from app.exports.writers import parquet as parquet_writer
        except ImportError as error:
            raise ExportRefusedError(
                "missing_dependency",
                f"{fmt.name} needs pyarrow on the worker: pip install 'srft[export]' ({error})",
            ) from error
        tokens = parquet_writer.ParquetShards(building, limits, soft=config["options"]["soft"])
        try:
            for item in built:
                for written in item.result.files:
                    for count, (key, row) in enumerate(
                        parquet_writer.read_run(item.folder / written.name)
                    ):
                        tokens.write(key, row)
                        if count % 256 == 0:
                            beat()
            return tokens.close()
        finally:
            tokens.abort()
    lines = JsonlShards(building, limits)
    try:
        for item in built:
            for written in item.result.files:
                for count, line in enumerate(jsonl_writer.read_run(item.folder / written.name)):
                    lines.write_line(line)
                    if count % 1024 == 0:
                        beat()
        return lines.close()
    finally:
        lines.abort()


def _format_of(export: Export) -> ExportFormat:
    try:
        return export_formats.get_format(export.format)
    except export_formats.UnknownExportFormatError as error:
        raise ExportRefusedError("unknown_format", str(error)) from error


def _write_text(
    folder: Path,
    kind: TextRows,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
) -> PartFile:
    writer = JsonlRun(folder)
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
    folder: Path,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
    profile: finetune.ProfileCounts | None,
) -> tuple[PartFile, dict[str, Any] | None]:
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
    writer = JsonlRun(folder)
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
    folder: Path,
    batches: Iterator[list[tuple[Source, TrajectoryDecision]]],
    rows: RowCounts,
    stats: SpanStats,
) -> tuple[PartFile, dict[str, Any]]:
    try:
        from app.exports.writers.parquet import TokenRun
    except ImportError as error:
        raise ExportRefusedError(
            "missing_dependency",
            f"{fmt.name} needs transformers and pyarrow on the worker: "
            f"pip install 'srft[export]' ({error})",
        ) from error

    tokenize_config = _tokenize_config(config)
    pool, info = _tokenize_pool(settings, config, tokenize_config)
    writer = TokenRun(folder)
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
        written = writer.close()
    finally:
        writer.abort()
        pool.close()
    return written, info


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
    considered: int,
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
                "considered": considered,
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
