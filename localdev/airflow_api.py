"""A small client of Airflow's public REST API (``/api/v2``), as the UI and scripts use it.

The demo and the end-to-end tests drive Airflow only through this: they log in, unpause DAGs,
trigger runs the way the Trigger form does, and read run states, task instances, XComs and logs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests

from retrain.waiting import poll

FINISHED = ("success", "failed")


class AirflowAPIError(RuntimeError):
    """The API answered with an error; the message carries its status and detail."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class AirflowAPI:
    def __init__(self, url: str, username: str, password: str, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self.http = requests.Session()

    def login(self) -> str:
        """A JWT from ``POST /auth/token``, kept on the session."""
        resp = self.http.post(f"{self.url}/auth/token", json={"username": self.username, "password": self.password},
                              timeout=self.timeout_s)
        if resp.status_code >= 400:
            raise AirflowAPIError(resp.status_code, resp.text)
        token = resp.json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {token}"
        return token

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if "Authorization" not in self.http.headers:
            self.login()
        resp = self.http.request(method, f"{self.url}/api/v2/{path.lstrip('/')}", timeout=self.timeout_s, **kwargs)
        if resp.status_code == 401:  # the token expired: once more with a new one
            self.login()
            resp = self.http.request(method, f"{self.url}/api/v2/{path.lstrip('/')}", timeout=self.timeout_s, **kwargs)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise AirflowAPIError(resp.status_code, detail if isinstance(detail, str) else str(detail))
        return resp.json() if resp.content else None

    # -- DAGs and runs -----------------------------------------------------------------------------

    def dag_ids(self) -> set[str]:
        return {d["dag_id"] for d in self.request("GET", "dags", params={"limit": 1000})["dags"]}

    def wait_for_dags(self, dag_ids: set[str], timeout_s: float = 120.0) -> None:
        """Until the DAG processor has parsed ``dag_ids`` into the database."""
        poll(lambda: dag_ids <= self.dag_ids(), timeout_s=timeout_s, what=f"DAGs {sorted(dag_ids)} parsed")

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.request("PATCH", f"dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, note: str | None = None) -> dict[str, Any]:
        """Create a run as the Trigger form does (``logical_date`` null: the run is not tied to an interval)."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if note:
            body["note"] = note
        return self.request("POST", f"dags/{dag_id}/dagRuns", json=body)

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def runs(self, dag_id: str, run_type: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": 100, "order_by": "run_after"}
        if run_type:
            params["run_type"] = run_type
        return self.request("GET", f"dags/{dag_id}/dagRuns", params=params)["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 900.0) -> dict[str, Any]:
        """The run once it has finished (success or failed)."""
        def finished() -> dict[str, Any] | None:
            run = self.run(dag_id, run_id)
            return run if run["state"] in FINISHED else None

        return poll(finished, timeout_s=timeout_s, interval_s=1.0, what=f"run {run_id} of {dag_id} finished")

    def wait_for_new_run(self, dag_id: str, run_type: str, known: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
        """The first run of ``run_type`` not in ``known``, once the scheduler has created it."""
        def created() -> dict[str, Any] | None:
            new = [r for r in self.runs(dag_id, run_type) if r["dag_run_id"] not in known]
            return new[0] if new else None

        return poll(created, timeout_s=timeout_s, interval_s=1.0, what=f"a new {run_type} run of {dag_id}")

    # -- tasks -------------------------------------------------------------------------------------

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        tis = self.request("GET", f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in tis}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.request("GET", f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/"
                                    f"xcomEntries/{key}", params={"deserialize": True, "stringify": False})
        return entry["value"]

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[dict[str, Any]]:
        """The task's log as structured events (each has ``event``, ``level``, ``timestamp``, ...)."""
        body = self.request("GET", f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/logs/"
                                   f"{try_number}", params={"full_content": True},
                            headers={"Accept": "application/json"})
        content = body["content"]
        return [line if isinstance(line, dict) else {"event": str(line)} for line in content]

    def extra_links(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str | None]:
        body = self.request("GET", f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/links")
        return body.get("extra_links", body)
