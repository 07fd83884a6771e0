"""The API while its database is away: `srft serve` (uvicorn) on a Postgres of this module's
own, which the test stops and starts. Every request answers 503 `database_unavailable` with
`Retry-After`, on the same kept-alive connection, and the service is back as soon as the
database is."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.builders import make_trajectory
from tests.servers import PostgresServer
from tests.test_embedded import Served

pytestmark = pytest.mark.slow

KEY = "srft_" + "o" * 40


@pytest.fixture(scope="module")
def served(
    own_postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    server = Served(
        tmp_path_factory.mktemp("outage"),
        SRFT_DATABASE_URL=own_postgres.url,
        SRFT_BOOTSTRAP_API_KEY=KEY,
    )
    server.start()
    yield server
    server.stop()


class Connection:
    """One kept-alive HTTP/1.1 connection, spoken to by hand so that a reset shows."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""

    def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._read()
        payload, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, payload

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the kept-alive connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def test_a_lost_database_answers_503_and_keeps_the_connection(
    served: Served, own_postgres: PostgresServer
) -> None:
    connection = Connection(served.port)
    body = json.dumps(make_trajectory(2, salt="outage")).encode()
    status, _, payload = connection.request("POST", "/v1/trajectories", body)
    assert status == 201, payload
    trajectory_id = json.loads(payload)["trajectories"][0]["id"]

    own_postgres.stop()
    try:
        probes = [
            ("GET", f"/v1/trajectories/{trajectory_id}", b""),
            ("GET", "/v1/trajectories?limit=5", b""),
            ("POST", "/v1/jobs", json.dumps({"selection": {}}).encode()),
            ("PATCH", f"/v1/trajectories/{trajectory_id}", b'{"resolved": true}'),
            ("POST", "/v1/trajectories", json.dumps(make_trajectory(2, salt="lost")).encode()),
            ("GET", "/metrics", b""),
        ] * 2
        for method, path, probe_body in probes:
            status, headers, payload = connection.request(method, path, probe_body)
            assert status == 503, (method, path, payload)
            assert int(headers["retry-after"]) > 0
            assert json.loads(payload)["error"]["code"] == "database_unavailable"
        status, _, payload = connection.request("GET", "/readyz")
        assert status == 503
        assert json.loads(payload)["checks"]["database"].startswith("error")
    finally:
        own_postgres.start()

    # Back within seconds, on the same connection.
    returned = time.monotonic()
    deadline = returned + 15
    while True:
        status, _, payload = connection.request("GET", f"/v1/trajectories/{trajectory_id}")
        if status == 200:
            break
        assert status == 503, payload
        assert time.monotonic() < deadline, "the API did not come back"
        time.sleep(0.2)
    print(f"\nAPI serving again {time.monotonic() - returned:.2f} s after Postgres was back")
    assert json.loads(payload)["resolved"] is None  # the PATCH during the outage applied nothing
    connection.close()
    log = served.log.read_text()
    assert "Exception in ASGI application" not in log
    assert "database unavailable on GET" in log
