"""Format detection, forcing, and the guard that keeps importer gaps from becoming 500s."""

from __future__ import annotations

import json

import pytest

from app.errors import InvalidJsonError, InvalidTrajectoryError, UnknownFormatError
from app.trajectories import formats
from app.trajectories.formats import decode_document, parse_upload
from tests.builders import make_trajectory


def test_undetectable_document_lists_every_importer_and_its_reason() -> None:
    with pytest.raises(UnknownFormatError) as caught:
        parse_upload(b'{"unrelated": true}')
    assert set(caught.value.details["tried"]) == set(formats.FORMAT_NAMES)
    for name in formats.FORMAT_NAMES:
        assert name in caught.value.message


def test_unknown_format_name_is_refused_before_decoding() -> None:
    with pytest.raises(UnknownFormatError) as caught:
        parse_upload(b"not even json", "langchain")
    assert caught.value.location == "query.format"


def test_an_importer_crash_is_a_located_422_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    importer = formats.get_importer("openai")

    def broken(_doc: object) -> list[object]:
        raise KeyError("messages")

    monkeypatch.setattr(importer, "parse", broken)
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(json.dumps(make_trajectory()).encode())
    assert "openai importer could not read this file" in caught.value.message
    assert "KeyError" in caught.value.message


def test_deeply_nested_json_is_invalid_json() -> None:
    with pytest.raises(InvalidJsonError) as caught:
        decode_document(b"[" * 100_000 + b"]" * 100_000)
    assert "nested too deeply" in caught.value.message


def test_jsonl_is_guessed_when_the_first_line_is_json() -> None:
    body = "\n".join(json.dumps(make_trajectory(salt=str(i))) for i in range(3)).encode()
    doc = decode_document(body)
    assert doc.is_lines
    assert [r.line for r in doc.records] == [1, 2, 3]
