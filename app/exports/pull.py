"""Download a finished export into a folder, resuming partial files and verifying every byte.

Each shard is written to `<name>.part` and renamed only once its size and sha256 match the
manifest; manifest.json is written last, so a folder that has one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from app.exports.manifest import MANIFEST
from app.exports.writers.shards import file_sha256
from app.status import EXPORT_OPEN, ExportStatus

PART_SUFFIX = ".part"
CHUNK_SIZE = 1 << 20


@dataclass
class PullResult:
    directory: Path
    files: int  # shards in the manifest; manifest.json itself is not counted
    bytes_downloaded: int  # fetched over the network this run; resumed files count only the rest
    bytes_total: int
    resumed: int  # files continued from a partial download
    skipped: int  # files already complete and verified


class PullError(Exception):
    """A pull that cannot finish; the message says which file and why."""


@dataclass(frozen=True)
class _Shard:
    path: str
    sha256: str
    size: int


def pull_export(
    client: httpx.Client,
    export_id: str,
    directory: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> PullResult:
    """Download every shard of a completed export into `directory`, then its manifest.json.

    Run it again after an interruption: complete files are skipped and `.part` files resumed.
    `progress(done, total)` counts skipped and already partial bytes as done.
    """
    response = _get(client, f"/v1/exports/{export_id}", "the export")
    try:
        export = response.json()
    except ValueError as exc:
        raise PullError(f"GET /v1/exports/{export_id} did not answer JSON: {exc}") from exc
    if not isinstance(export, dict):
        raise PullError(f"GET /v1/exports/{export_id} did not answer a JSON object")
    status = export.get("status")
    if status != ExportStatus.COMPLETED:
        message = f"export {export_id} is {status}, not completed"
        if status == ExportStatus.FAILED:
            error = export.get("error")
            detail = error.get("message") if isinstance(error, dict) else error
            message += f": {detail}" if detail else ""
        elif status in EXPORT_OPEN:
            message += "; pull it once it has completed"
        raise PullError(message)
    shards = _shards(export.get("manifest"))
    targets = [_target(directory, shard.path) for shard in shards]
    total = sum(shard.size for shard in shards)
    result = PullResult(directory, len(shards), 0, total, 0, 0)
    done = 0

    def advance(size: int) -> None:
        nonlocal done
        done += size
        if progress is not None:
            progress(done, total)

    directory.mkdir(parents=True, exist_ok=True)
    for shard, target in zip(shards, targets, strict=True):
        if (
            target.is_file()
            and target.stat().st_size == shard.size
            and file_sha256(target) == shard.sha256
        ):
            result.skipped += 1
            advance(shard.size)
            continue
        # From here on the folder differs from any manifest it had, so that has to go first.
        (directory / MANIFEST).unlink(missing_ok=True)
        _download(client, export_id, shard, target, result, advance, chunk_size)

    served = _get(client, f"/v1/exports/{export_id}/files/{MANIFEST}", MANIFEST).content
    try:
        served_shards = _shards(json.loads(served))
    except (ValueError, PullError) as exc:
        raise PullError(f"{MANIFEST} as served is not a valid manifest: {exc}") from exc
    if served_shards != shards:
        raise PullError(
            f"{MANIFEST} as served lists other shards than the export does; "
            "it changed during the pull, run again"
        )
    _write_atomically(directory / MANIFEST, served)
    return result


def verify_directory(directory: Path) -> list[str]:
    """Re-check every shard named in `directory/manifest.json`; the problems, or [] if none."""
    try:
        shards = _shards(json.loads((directory / MANIFEST).read_bytes()))
    except FileNotFoundError:
        return [f"{MANIFEST} is missing: the pull did not finish"]
    except (ValueError, PullError) as exc:
        return [f"{MANIFEST} is not a valid manifest: {exc}"]
    problems: list[str] = []
    for shard in shards:
        try:
            target = _target(directory, shard.path)
        except PullError as exc:
            problems.append(str(exc))
            continue
        if not target.is_file():
            problems.append(f"{shard.path}: missing")
            continue
        size = target.stat().st_size
        if size != shard.size:
            problems.append(f"{shard.path}: {size} bytes, the manifest says {shard.size}")
            continue
        digest = file_sha256(target)
        if digest != shard.sha256:
            problems.append(f"{shard.path}: sha256 {digest}, the manifest says {shard.sha256}")
    return problems


def _download(
    client: httpx.Client,
    export_id: str,
    shard: _Shard,
    target: Path,
    result: PullResult,
    advance: Callable[[int], None],
    chunk_size: int,
) -> None:
    part = target.with_name(target.name + PART_SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if offset >= shard.size:  # nothing left to ask for: start over rather than trust it
        part.unlink(missing_ok=True)
        offset = 0
    # identity: Range counts bytes of the file as stored, not of a compressed encoding.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = f'"{shard.sha256}"'
    hasher = hashlib.sha256()
    if offset:
        _hash_file(hasher, part, chunk_size)
    url = f"/v1/exports/{export_id}/files/{quote(shard.path)}"
    received = 0
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 206 and offset:
                content_range = response.headers.get("content-range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    raise PullError(
                        f"{shard.path}: asked for bytes {offset}- and got Content-Range "
                        f"{content_range!r}"
                    )
                result.resumed += 1
                advance(offset)
                mode = "ab"
            elif response.status_code == 200:
                # The server sent the whole file (it changed, or ignores ranges): start over.
                offset = 0
                hasher = hashlib.sha256()
                mode = "wb"
            else:
                response.read()
                raise _http_error(response, shard.path)
            with part.open(mode) as handle:
                # Pieces as they arrive, so that a cut loses nothing already received.
                for piece in response.iter_bytes():
                    handle.write(piece)
                    hasher.update(piece)
                    received += len(piece)
                    result.bytes_downloaded += len(piece)
                    advance(len(piece))
                    if offset + received > shard.size:
                        break
                handle.flush()
                os.fsync(handle.fileno())
    except httpx.TransportError as exc:
        raise PullError(
            f"{shard.path}: download interrupted after {offset + received} of {shard.size} "
            f"bytes ({exc}); run again to resume"
        ) from exc
    size, digest = offset + received, hasher.hexdigest()
    if size != shard.size or digest != shard.sha256:
        part.unlink(missing_ok=True)
        raise PullError(
            f"{shard.path}: got {size} bytes with sha256 {digest}, but the manifest says "
            f"{shard.size} bytes with sha256 {shard.sha256}; the partial file was deleted"
        )
    os.replace(part, target)


def _get(client: httpx.Client, url: str, what: str) -> httpx.Response:
    try:
        response = client.get(url)
    except httpx.TransportError as exc:
        raise PullError(f"could not GET {url} ({what}): {exc}") from exc
    if response.status_code != 200:
        raise _http_error(response, what)
    return response


def _http_error(response: httpx.Response, what: str) -> PullError:
    body = response.text.strip()
    if len(body) > 500:
        body = body[:500] + "..."
    return PullError(
        f"GET {response.request.url.path} ({what}) answered HTTP {response.status_code}: {body}"
    )


def _shards(manifest: Any) -> list[_Shard]:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise PullError("the manifest has no list of shards")
    parsed: list[_Shard] = []
    for index, shard in enumerate(shards):
        if not (
            isinstance(shard, dict)
            and isinstance(shard.get("path"), str)
            and isinstance(shard.get("sha256"), str)
            and isinstance(shard.get("bytes"), int)
        ):
            raise PullError(
                f"manifest shards[{index}] needs a string path and sha256 and an integer bytes"
            )
        parsed.append(_Shard(shard["path"], shard["sha256"].lower(), shard["bytes"]))
    return parsed


def _target(directory: Path, path: str) -> Path:
    """Where a shard goes; refuses manifest paths that would land outside `directory`."""
    segments = path.split("/")
    if (
        "\\" in path
        or "\x00" in path
        or path == MANIFEST
        or any(s in ("", ".", "..") for s in segments)
    ):
        raise PullError(f"refusing shard path {path!r}: it must name a file inside the folder")
    target = directory.joinpath(*segments)
    # A symlink already in the folder could still lead out of it.
    if not target.resolve().is_relative_to(directory.resolve()):
        raise PullError(f"refusing shard path {path!r}: it leads outside {directory}")
    return target


def _hash_file(hasher: hashlib._Hash, path: Path, chunk_size: int) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            hasher.update(chunk)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + PART_SUFFIX)
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
