"""HTTP responses for the files of a finished export: one file with ranges, or all as a tar.

Exports are written once and never change, so a shard's sha256 from the manifest is its strong
ETag, and a client can resume a download with `Range` plus `If-Range`.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.errors import NotFoundError, RangeNotSatisfiableError
from app.exports.formats import FORMATS

CHUNK_SIZE = 1 << 20
# An export holds its manifest and the shards of its format.
MEDIA_TYPES = {".json": "application/json"} | {f.files.suffix: f.files.media_type for f in FORMATS}
# One range of bytes; several ranges, other units or anything malformed is ignored (RFC 9110
# 14.2 lets a server send the whole file instead), so no multipart/byteranges is ever built.
_BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# No file is 10**19 bytes or more (sizes are below 2**63), so a position with more digits than
# that only says "past any end": it is read as exactly that, and never given to `int()` (which
# refuses more than 4300 digits).
_MAX_DIGITS = 19
_PAST_ANY_END = 10**_MAX_DIGITS


def media_type_for(path: Path) -> str:
    """The Content-Type of an export file, from its suffix."""
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def resolve_export_file(root: Path, relative: str) -> Path:
    """The regular file under `root` named by a manifest path; NotFoundError for anything else.

    Refuses absolute paths, `.`/`..`/empty segments, backslashes, NUL bytes and symlinks that
    lead outside `root`, all with the same 404 so that probing learns nothing.
    """
    missing = NotFoundError(f"this export has no file {relative!r}")
    segments = relative.split("/")
    if "\\" in relative or "\x00" in relative or any(s in ("", ".", "..") for s in segments):
        raise missing
    base = root.resolve()
    try:
        path = base.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise missing from None
    if not path.is_relative_to(base) or not path.is_file():
        raise missing
    return path


def file_response(request: Request, path: Path, *, sha256: str | None, media_type: str) -> Response:
    """One file for GET or HEAD, honouring If-None-Match, a single Range and If-Range."""
    stat = path.stat()
    size = stat.st_size
    # Without a content hash the validator can only be weak; weak ETags never satisfy If-Range.
    etag = f'"{sha256}"' if sha256 else f'W/"{size:x}-{stat.st_mtime_ns:x}"'
    if _none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": attachment(path.name),
    }
    start, stop, status_code = 0, size, 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (if_range is None or _strong_match(if_range, etag)):
        byte_range = _parse_range(range_header, size)
        if byte_range is not None:
            start, stop = byte_range
            if start >= stop:
                return _unsatisfiable(range_header, size, etag)
            status_code = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD":
        return Response(status_code=status_code, headers=headers, media_type=media_type)
    return StreamingResponse(
        _read(path, start, stop), status_code=status_code, headers=headers, media_type=media_type
    )


def archive_response(
    root: Path, names: list[str], *, filename: str, mtime: int
) -> StreamingResponse:
    """The named files as one uncompressed tar, streamed, with its length known up front.

    Entries are `<filename without .tar>/<name>` in the given order with fixed metadata, so the
    same files always give the same bytes and `tar xf` makes one folder.
    """
    stem = filename.removesuffix(".tar")
    members: list[tuple[bytes, Path, int]] = []
    for name in names:
        path = resolve_export_file(root, name)
        info = tarfile.TarInfo(f"{stem}/{name}")
        info.size = path.stat().st_size
        info.mtime = mtime
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
        members.append((header, path, info.size))
    length = sum(len(header) + size + _padding(size) for header, _, size in members)
    length += 2 * tarfile.BLOCKSIZE
    return StreamingResponse(
        _tar_stream(members),
        media_type="application/x-tar",
        headers={"Content-Length": str(length), "Content-Disposition": attachment(filename)},
    )


def attachment(filename: str) -> str:
    """A Content-Disposition that saves under `filename`, RFC 6266-encoded when it must be."""
    quoted = quote(filename)
    if quoted == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename*=utf-8''{quoted}"


def _none_match(header: str | None, etag: str) -> bool:
    """Whether If-None-Match names this representation (weak comparison, RFC 9110 13.1.2)."""
    if header is None:
        return False
    wanted = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in wanted or etag.removeprefix("W/") in wanted


def _strong_match(tag: str, etag: str) -> bool:
    """If-Range needs strong comparison: a weak ETag (or a date) never matches."""
    return tag.strip() == etag and not etag.startswith("W/")


def _unsatisfiable(header: str, size: int, etag: str) -> JSONResponse:
    """416 with the JSON error body every error has, and the size the range missed."""
    shown = header if len(header) <= 80 else header[:80] + "..."
    error = RangeNotSatisfiableError(
        f"Range {shown!r} asks for no byte of this {size}-byte file",
        location="header.Range",
    )
    return JSONResponse(
        error.to_dict(),
        status_code=error.status_code,
        headers={"ETag": etag, "Content-Range": f"bytes */{size}"},
    )


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`(start, stop)` of a single byte range, stop exclusive; `start >= stop` means it cannot
    be satisfied. None for a header to ignore."""
    match = _BYTE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = _position(first)
        if not last:
            return start, size
        if _position(last) < start:
            return None
        return start, min(_position(last) + 1, size)
    if last:
        suffix = _position(last)
        # `bytes=-0` asks for no bytes, which no file can satisfy.
        return (max(size - suffix, 0), size) if suffix else (size, size)
    return None


def _position(digits: str) -> int:
    """A byte position or suffix length; one too long for any file counts as `_PAST_ANY_END`."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else _PAST_ANY_END


def _read(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = handle.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                # Content-Length is already sent: failing aborts the connection, so the client
                # sees a short body rather than a wrong one.
                raise OSError(f"{path} shrank while it was being sent")
            remaining -= len(chunk)
            yield chunk


def _padding(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def _tar_stream(members: list[tuple[bytes, Path, int]]) -> Iterator[bytes]:
    for header, path, size in members:
        yield header
        yield from _read(path, 0, size)
        if _padding(size):
            yield tarfile.NUL * _padding(size)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)
