"""Human labels over HTTP: set, read back on the trajectory, replace, remove; refused with a
reason for unknown labels, missing steps and other projects' trajectories."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.builders import make_trajectory
from tests.conftest import Caller


def _upload(client: TestClient, caller: Caller) -> str:
    response = client.post(
        "/v1/trajectories", json=make_trajectory(3, resolved=False), headers=caller.headers
    )
    assert response.status_code == 201, response.text
    trajectory_id: str = response.json()["trajectories"][0]["id"]
    return trajectory_id


def test_a_reviewer_labels_a_step_and_removes_it(client: TestClient, caller: Caller) -> None:
    tid = _upload(client, caller)
    url = f"/v1/trajectories/{tid}/steps/1/human_label"
    put = client.put(url, json={"label": "mistake", "note": "wrong file"}, headers=caller.headers)
    assert put.status_code == 200, put.text
    assert put.json()["label"] == "mistake"
    assert put.json()["author"] == "tests"  # the key's name
    steps = client.get(f"/v1/trajectories/{tid}", headers=caller.headers).json()["steps"]
    assert steps[1]["human_label"]["label"] == "mistake"
    assert steps[1]["human_label"]["note"] == "wrong file"
    assert steps[0]["human_label"] is None
    again = client.put(url, json={"label": "good"}, headers=caller.headers)
    assert again.json()["label"] == "good"
    assert again.json()["note"] is None
    assert client.delete(url, headers=caller.headers).status_code == 204
    steps = client.get(f"/v1/trajectories/{tid}", headers=caller.headers).json()["steps"]
    assert steps[1]["human_label"] is None


def test_bad_human_labels_are_refused(
    client: TestClient, caller: Caller, other_caller: Caller
) -> None:
    tid = _upload(client, caller)
    unknown = client.put(
        f"/v1/trajectories/{tid}/steps/0/human_label", json={"label": "meh"}, headers=caller.headers
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_label"
    assert "mistake" in unknown.json()["error"]["message"]
    missing = client.put(
        f"/v1/trajectories/{tid}/steps/3/human_label",
        json={"label": "good"},
        headers=caller.headers,
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["location"] == "path.step_index"
    foreign = client.put(
        f"/v1/trajectories/{tid}/steps/0/human_label",
        json={"label": "good"},
        headers=other_caller.headers,
    )
    assert foreign.status_code == 404
    anonymous = client.put(f"/v1/trajectories/{tid}/steps/0/human_label", json={"label": "good"})
    assert anonymous.status_code == 401
