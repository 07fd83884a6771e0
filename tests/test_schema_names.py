"""One naming rule for the API's bodies, read from the OpenAPI document clients generate from:
a request body is named for its verb (`<Thing>Create` for POST, `<Thing>Patch`, `<Thing>Put`),
a response body is `<Thing>Out` or a page `<Thing>Page`; the parts inside either are plain
nouns (`Selection`, `Counts`), never `...In`, `...View` or `...Response`."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

REQUEST = {"post": "Create", "patch": "Patch", "put": "Put"}
RESPONSE = ("Out", "Page")
REF = re.compile(r"#/components/schemas/(\w+)$")


def _refs(content: dict[str, Any]) -> list[str]:
    found = []
    for media in content.values():
        match = REF.match(media.get("schema", {}).get("$ref", ""))
        if match:
            found.append(match.group(1))
    return found


def test_bodies_are_named_for_their_verb_and_responses_out_or_page(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    requests: list[tuple[str, str]] = []
    responses: list[str] = []
    for operations in document["paths"].values():
        for method, operation in operations.items():
            for name in _refs(operation.get("requestBody", {}).get("content", {})):
                requests.append((method, name))
            for code, response in operation["responses"].items():
                if code.startswith("2"):
                    responses += _refs(response.get("content", {}))
    # The walk reads the document.
    assert len(requests) >= 4
    assert len(responses) >= 8
    wrong = [f"{m.upper()} {name}" for m, name in requests if not name.endswith(REQUEST[m])]
    assert not wrong, wrong
    assert not [name for name in responses if not name.endswith(RESPONSE)]
    bodies = {name for _, name in requests} | set(responses)
    parts = set(document["components"]["schemas"]) - bodies
    assert not [name for name in parts if name.endswith(("In", "View", "Response"))]
