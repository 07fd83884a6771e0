"""`bench/scale.py --quick --only latency` runs end to end: stores built and counted, both
served, every endpoint answered with the rows it must show, numbers written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import child_env

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parent.parent


def test_scale_latency_section_runs_and_reports_every_endpoint(tmp_path: Path) -> None:
    report = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/scale.py",
            "--quick",
            "--only",
            "latency",
            "--small",
            "120",
            "--large",
            "600",
            "--requests",
            "3",
            "--json",
            str(report),
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    numbers = json.loads(report.read_text())
    assert numbers["problems"] == []
    assert numbers["stores"]["120"]["size"] == 120
    assert numbers["stores"]["600"]["size"] == 600
    latency = numbers["latency"]
    assert set(latency) == {
        "GET /v1/jobs/{id}",
        "GET /v1/trajectories?limit=100",
        "page 90% down the cursor chain",
        "with resolved=true",
        "GET /v1/jobs/{id}/verdicts",
        "verdicts 90% down the cursor chain",
        "GET /ui/jobs/{id}",
        "GET /metrics",
    }
    for summary in latency.values():
        assert summary["small_median_ms"] > 0
        assert summary["ratio_median"] == pytest.approx(
            summary["large_median_ms"] / summary["small_median_ms"]
        )
    assert "ratio p50" in done.stdout
    assert "machine:" in done.stdout
