"""Source-format importers and automatic detection.

Each module defines one `Importer` (see `base.py`). `parse_upload` decodes the bytes, picks the
importer (forced by name, or the first whose `sniff` accepts the document) and returns
canonical trajectories, cleaned by `clean.clean_trajectory`.
"""

from __future__ import annotations

import logging

from app.errors import InvalidTrajectoryError, SrftError, UnknownFormatError
from app.trajectories.formats import (
    mini_swe_agent,
    nebius,
    openai_messages,
    openhands,
    swe_agent,
)
from app.trajectories.formats.base import Document, Importer, Trajectory
from app.trajectories.formats.clean import clean_trajectory
from app.trajectories.formats.decode import decode_document
from app.trajectories.formats.parquet import decode_parquet

log = logging.getLogger(__name__)

# Most specific first: `openai` accepts anything shaped like chat messages.
IMPORTERS: tuple[Importer, ...] = (
    swe_agent.IMPORTER,
    mini_swe_agent.IMPORTER,
    openhands.IMPORTER,
    nebius.IMPORTER,
    openai_messages.IMPORTER,
)
FORMAT_NAMES: tuple[str, ...] = tuple(i.name for i in IMPORTERS)


def get_importer(name: str) -> Importer:
    for importer in IMPORTERS:
        if importer.name == name:
            return importer
    raise UnknownFormatError(
        f"unknown format {name!r}; known formats: auto, {', '.join(FORMAT_NAMES)}",
        location="query.format",
    )


def detect_format(doc: Document) -> Importer:
    """The first importer whose sniff accepts `doc`; else an error listing every reason."""
    reasons: dict[str, str] = {}
    for importer in IMPORTERS:
        reason = importer.sniff(doc)
        if reason is None:
            return importer
        reasons[importer.name] = reason
    tried = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise UnknownFormatError(
        f"could not detect the trajectory format (tried {', '.join(reasons)}). {tried}. "
        "Force one with ?format=",
        location="(document)",
        details={"tried": reasons},
    )


def parse_document(doc: Document, fmt: str = "auto") -> list[Trajectory]:
    importer = detect_format(doc) if fmt == "auto" else get_importer(fmt)
    if fmt != "auto":
        reason = importer.sniff(doc)
        if reason is not None:
            raise InvalidTrajectoryError(f"the body is not {fmt}: {reason}", location="(document)")
    try:
        trajectories = importer.parse(doc)
    except SrftError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        # Importers validate what they read; reaching here means a file shaped in a way no
        # importer anticipated. That is still the file's problem to the caller (a 422, not a
        # 500), but it is an importer gap for us, so it is logged with its traceback.
        log.exception("the %s importer failed on an unexpected shape", importer.name)
        raise InvalidTrajectoryError(
            f"the {importer.name} importer could not read this file: {type(exc).__name__}: {exc}",
            location="(document)",
        ) from exc
    return [clean_trajectory(t) for t in trajectories]


def parse_upload(
    raw: bytes, fmt: str = "auto", *, lines: bool | None = None, parquet: bool = False
) -> list[Trajectory]:
    """Bytes of one file to canonical, cleaned trajectories. Raises `SrftError` subclasses.

    `parquet=True` reads the bytes as a Parquet file of dataset rows, which then go exactly
    where the same rows as JSON Lines go (`lines` is for JSON bodies only)."""
    if fmt != "auto":
        get_importer(fmt)  # an unknown name is the caller's first mistake; say so first
    doc = decode_parquet(raw) if parquet else decode_document(raw, lines=lines)
    return parse_document(doc, fmt)
