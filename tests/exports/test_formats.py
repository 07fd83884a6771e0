"""The registry of export formats: every registered format builds a real export of the shared
runs and is served and read as its registration says; the API, the CLI and the registry name
the same formats; a name nobody registered is refused at the API and never reaches row code."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, get_args

import pytest
import typer.main
from sqlalchemy import func, select, update

from app import cli
from app.exports import formats as export_formats
from app.exports import service
from app.exports.builder import build_export
from app.exports.formats import (
    FORMATS,
    NAMES,
    ExportFormat,
    MessageRows,
    TextRows,
    TokenizerUse,
    TokenRows,
    TrainerReads,
)
from app.exports.schemas import ExportCreate, FormatName
from app.models import Export
from app.training.data import DataError, load_rows
from tests.exports.conftest import Corpus

MAX_SEQ_LEN = 8192
READ_LEN = 1 << 20  # the trainer reads every row whole


def _variants() -> list[Any]:
    """Each format with the least it needs, and again with everything optional it takes."""
    params = []
    for fmt in FORMATS:
        params.append(pytest.param(fmt, False, id=f"{fmt.name}-least"))
        if fmt.tokenizer is TokenizerUse.MEASURES or fmt.soft_weights:
            params.append(pytest.param(fmt, True, id=f"{fmt.name}-everything"))
    return params


def _body(corpus: Corpus, fmt: ExportFormat, tokenizer: Path, everything: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"job_ids": [corpus.job_id], "format": fmt.name, "shard_max_rows": 10}
    if fmt.tokenizer is TokenizerUse.RENDERS or (
        everything and fmt.tokenizer is TokenizerUse.MEASURES
    ):
        body |= {"tokenizer": str(tokenizer), "max_seq_len": MAX_SEQ_LEN}
    if everything and fmt.soft_weights:
        body["options"] = {"soft": True}
    return body


@pytest.mark.parametrize(("fmt", "everything"), _variants())
def test_every_registered_format_builds_serves_and_reads_a_real_export(
    corpus: Corpus, tokenizers: dict[str, Path], fmt: ExportFormat, everything: bool
) -> None:
    body = _body(corpus, fmt, tokenizers["chatml"], everything)
    export = corpus.export(body)
    assert export["status"] == "completed", export["error"]
    manifest = export["manifest"]
    assert manifest["format"] == fmt.name
    written = manifest["counts"]["rows"]["written"]
    assert written > 0
    assert sum(s["rows"] for s in manifest["shards"]) == written
    assert (manifest["tokenizer"] is not None) == ("tokenizer" in body)
    tokenized = isinstance(fmt.rows, TokenRows)
    assert (manifest["counts"]["tokens"]["total"] is not None) == tokenized
    assert (manifest["columns"] is not None) == tokenized
    fitted = isinstance(fmt.rows, MessageRows) and fmt.rows.fine_tune
    assert (manifest["counts"]["profile"] is not None) == fitted

    for shard in manifest["shards"]:
        assert re.fullmatch(
            rf"data/train-\d{{5}}-of-\d{{5}}{re.escape(fmt.files.suffix)}", shard["path"]
        )
        served = corpus.api.get(f"/v1/exports/{export['id']}/files/{shard['path']}")
        assert served.status_code == 200
        assert served.headers["content-type"] == fmt.files.media_type
        assert hashlib.sha256(served.content).hexdigest() == shard["sha256"]

    root = corpus.path(export)
    if fmt.trainer is None:
        with pytest.raises(DataError, match="cannot be trained on here"):
            load_rows(root, tokenizer=str(tokenizers["chatml"]), max_seq_len=READ_LEN)
        return
    if fmt.trainer is TrainerReads.MESSAGES:
        with pytest.raises(DataError, match="needs a tokenizer"):
            load_rows(root, tokenizer=None, max_seq_len=READ_LEN)
    rows = load_rows(root, tokenizer=str(tokenizers["chatml"]), max_seq_len=READ_LEN)
    assert rows
    assert sum(row.num_trained for row in rows) > 0
    if fmt.trainer is TrainerReads.TOKEN_ROWS:
        assert len(rows) == written
        assert all((row.weights is not None) == everything for row in rows)


def test_the_api_the_cli_and_the_registry_name_the_same_formats(corpus: Corpus) -> None:
    assert get_args(FormatName) == NAMES
    schema = corpus.api.get("/openapi.json").json()["components"]["schemas"]["ExportCreate"]
    assert tuple(schema["properties"]["format"]["enum"]) == NAMES
    assert ExportCreate.model_fields["format"].default in NAMES

    command = typer.main.get_command(cli.app)
    export_command = command.commands["export"]  # type: ignore[attr-defined]
    helps = {param.name: param.help for param in export_command.params}
    named = re.compile(r"\b[a-z]+(?:_[a-z]+)+\b")
    assert tuple(named.findall(helps["fmt"])) == NAMES
    for fmt in FORMATS:
        if fmt.label:
            assert f"{fmt.name} ({fmt.label})" in helps["fmt"]
    assert named.findall(helps["soft"]) == [f.name for f in FORMATS if f.soft_weights]
    assert set(named.findall(helps["tokenizer"])) == {
        f.name for f in FORMATS if f.tokenizer is not TokenizerUse.NONE
    }


def test_the_registry_refuses_a_format_no_builder_path_or_reader_handles() -> None:
    def prm(source: Any, decision: Any) -> None:
        return None

    with pytest.raises(ValueError, match="need a tokenizer"):
        ExportFormat("x", TextRows(prm), TokenizerUse.RENDERS, soft_weights=False, trainer=None)
    with pytest.raises(ValueError, match="only rows of messages"):
        ExportFormat("x", TextRows(prm), TokenizerUse.MEASURES, soft_weights=False, trainer=None)
    with pytest.raises(ValueError, match="float weights"):
        ExportFormat("x", MessageRows(prm), TokenizerUse.NONE, soft_weights=True, trainer=None)
    with pytest.raises(ValueError, match="cannot read"):
        ExportFormat(
            "x", TextRows(prm), TokenizerUse.NONE, soft_weights=False, trainer=TrainerReads.MESSAGES
        )


def test_the_registry_and_its_row_builders_import_no_database_or_heavy_library() -> None:
    heavy = ("sqlalchemy", "psycopg", "httpx", "torch", "pyarrow", "transformers", "app.models")
    code = (
        "import sys, app.exports.formats; "
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"


def _export_count(corpus: Corpus) -> int:
    with corpus.api.database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Export)) or 0)


def test_an_unregistered_format_is_refused_at_the_api_and_never_reaches_row_code(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "csv" not in NAMES
    before = _export_count(corpus)
    response = corpus.api.post("/v1/exports", json={"job_ids": [corpus.job_id], "format": "csv"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["location"] == "body.format"
    assert _export_count(corpus) == before

    # Past the schema too (a body built without validation): the format's own checks refuse it.
    unchecked = ExportCreate(job_ids=[uuid.uuid4()]).model_copy(update={"format": "csv"})
    with pytest.raises(service.InvalidExportError) as refused:
        service._check_format(unchecked)
    assert refused.value.status_code == 422
    assert refused.value.code == "unknown_format"

    # A stored export whose format is no longer registered fails before any trajectory is read,
    # so no row function of any format can run.
    response = corpus.api.post("/v1/exports", json={"job_ids": [corpus.job_id]})
    assert response.status_code == 202, response.text
    export_id = uuid.UUID(response.json()["id"])
    with corpus.api.database.transaction() as session:
        session.execute(update(Export).where(Export.id == export_id).values(format="csv"))

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unregistered format read trajectories")

    monkeypatch.setattr(service, "trajectory_ids", unreachable)
    monkeypatch.setattr(service, "load_sources", unreachable)
    assert build_export(corpus.api.database, corpus.api.settings, export_id) == "failed"
    state = corpus.api.get(f"/v1/exports/{export_id}").json()
    assert state["status"] == "failed"
    assert state["error"]["code"] == "unknown_format"
    assert "csv" in state["error"]["message"]
    assert not list(corpus.api.settings.export_dir.rglob(f"{export_id}*"))
    with pytest.raises(export_formats.UnknownExportFormatError):
        export_formats.get_format("csv")
