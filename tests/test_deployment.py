"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_whole_stack_with_health_checks() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "api", "worker", "beat"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    for name in ("api", "worker", "beat", "migrate"):
        assert services[name]["build"] == "."
        env = services[name]["environment"]
        assert env["SRFT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SRFT_BROKER_URL"].startswith("redis://redis:")
    # Servers come up healthy and the schema is migrated before anything uses them.
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_the_api_serves_the_exports_the_workers_write() -> None:
    compose = _compose()
    services = compose["services"]
    folder = services["api"]["environment"]["SRFT_EXPORT_DIR"]
    assert services["worker"]["environment"]["SRFT_EXPORT_DIR"] == folder
    mounts = {name: services[name]["volumes"] for name in ("api", "worker")}
    assert mounts["api"] == mounts["worker"] == [f"exports:{folder}"]
    assert "exports" in compose["volumes"]


def test_every_compose_command_is_a_real_cli_command() -> None:
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "srft":
            continue
        words = [w for w in command[1:] if not w.startswith("-")]
        subcommand = words[:2] if words[:1] == ["db"] else words[:1]
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", *subcommand, "--help"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{name}: {' '.join(command)}: {result.stderr}"
        for option in (w for w in command if w.startswith("--")):
            assert option in result.stdout, f"{name}: unknown option {option}"


def test_dockerfile_copies_what_exists_and_runs_the_service() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE):
        *sources, _destination = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert 'CMD ["srft", "serve"' in dockerfile
