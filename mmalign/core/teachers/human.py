"""A person as the teacher: segment pairs go to the labelling app (``mmalign label serve``), labels come back.

Each call posts its ``N`` pairs as clip queries to a project of the app (the server draws them for ``env_id`` as
side-by-side videos: from the MuJoCo states ``qpos_*``/``qvel_*`` when the call passes them — a run records them
for this teacher, :attr:`wants_states` —, else from the observations, which works only for the tasks that observe
``qpos``/``qvel``, :data:`mmalign.robotics.render.OBS_STATE_TASKS`, and Reacher; a run checks its teacher's task before
it starts, the app refuses a query it cannot draw), then polls the app until every query has
``answers_per_query`` answers or ``timeout`` seconds have passed. What comes back follows the teacher contract of :mod:`mmalign.core.teachers`:

- ``left`` / ``right`` / ``equal`` → label ``1`` / ``0`` / ``0.5`` (P(first ≻ second); the app undoes any side swap);
  several answers to one query are averaged (a soft label);
- "can't tell" → skipped (``answered`` False), as is a query every labeller skipped;
- **unanswered at the timeout** → skipped, and withdrawn from the app's queue (nobody is asked about a pair the run
  no longer waits for); ``teacher/timed_out`` counts them;
- **over budget** (``max_queries`` reached over the teacher's lifetime) → skipped without being posted;
  ``teacher/over_budget`` counts them.

The admin token is read from the environment variable named by ``token_env`` at call time, so it never lands in a
run's saved config. HTTP uses only the standard library (``urllib``).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Any, Callable

import numpy as np
import torch

from mmalign.core.teachers.base import SegmentPairBatch, Teacher, TeacherLabels, label_metrics

__all__ = ["HumanTeacher"]

# fields of a pair sent to the app: drawn (states or observations) and kept as the query's row (exported)
_POSTED = ("obs_first", "obs_second", "act_first", "act_second", "qpos_first", "qpos_second", "qvel_first",
           "qvel_second")


class HumanTeacher(Teacher):
    """Labels from people through the labelling app; see the module docstring for budget, timeout and skips.

    Args:
        url: the app's address, e.g. ``http://127.0.0.1:8765``.
        project: project that receives the queries (created as a clip project if new).
        env_id: the gymnasium MuJoCo task the segments come from (a non-MuJoCo env is refused here).
        token_env: environment variable holding the app's admin token.
        timeout: seconds to wait for the answers of one call (``0`` = wait forever).
        poll_seconds: seconds between two looks at the answers.
        max_queries: queries posted over the teacher's lifetime at most (``0`` = no limit).
        answers_per_query: labellers per query (2+ gives agreement statistics in the admin view).
        instructions: the question shown to labellers above every pair.
        fps: frames per second of the clips.
        chunk: queries per upload request (bounds the request size).
    """

    name = "human"
    needs_true_reward = False  # people look at the clips; the env's reward is never used
    wants_states = True  # a run records qpos/qvel for this teacher, so every MuJoCo task can be drawn

    def __init__(
        self, url: str = "http://127.0.0.1:8765", project: str = "pebble", env_id: str = "",
        token_env: str = "MMALIGN_LABEL_ADMIN_TOKEN", timeout: float = 3600.0, poll_seconds: float = 2.0,
        max_queries: int = 0, answers_per_query: int = 1,
        instructions: str = "Which clip makes more progress on the task?", fps: int = 20, chunk: int = 16,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not env_id:
            raise ValueError("env_id must name the gymnasium task whose segments people watch (teacher.env_id=...)")
        for field, value in (("timeout", timeout), ("max_queries", max_queries)):
            if value < 0:
                raise ValueError(f"{field} must be >= 0, got {value}")
        for field, value in (("poll_seconds", poll_seconds), ("answers_per_query", answers_per_query),
                             ("fps", fps), ("chunk", chunk)):
            if value <= 0:
                raise ValueError(f"{field} must be > 0, got {value}")
        self.url, self.project, self.env_id = url.rstrip("/"), project, env_id
        self.token_env, self.timeout, self.poll_seconds = token_env, float(timeout), float(poll_seconds)
        self.max_queries, self.answers_per_query = int(max_queries), int(answers_per_query)
        self.instructions, self.fps, self.chunk = instructions, int(fps), int(chunk)
        self.posted = 0
        self._run = uuid.uuid4().hex[:12]  # external ids unique across runs sharing a project
        self._project_ready = False
        self.sleep: Callable[[float], None] = time.sleep

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.error  # imported here: importing the teacher registry stays free of the HTTP stack
        import urllib.request

        token = os.environ.get(self.token_env, "")
        if not token:
            raise RuntimeError(f"the human teacher needs the app's admin token in ${self.token_env}")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as res:
                return json.loads(res.read() or b"null")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise RuntimeError(f"labelling app {method} {path} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"labelling app at {self.url} not reachable ({err.reason}); start it with "
                               f"`mmalign label serve`") from None

    def _ensure_project(self) -> None:
        if not self._project_ready:
            self._request("POST", "/api/projects", {"name": self.project, "kind": "clip",
                                                    "instructions": self.instructions,
                                                    "answers_per_query": self.answers_per_query})
            self._project_ready = True

    # -- labelling -----------------------------------------------------------------------------------------------
    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        n = batch.num_pairs
        if batch.obs_first is None or batch.obs_second is None:
            raise ValueError("the human teacher needs obs_first/obs_second (people watch the segments)")
        room = n if self.max_queries == 0 else max(0, min(n, self.max_queries - self.posted))
        labels = torch.full((n,), math.nan, dtype=torch.float32)
        answered = torch.zeros(n, dtype=torch.bool)
        timed_out = 0
        t0 = time.monotonic()
        if room:
            self._ensure_project()
            ids = self._post(batch, room)
            got, timed_out = self._wait(ids)
            for k, qid in enumerate(ids):
                values = got.get(qid, [])
                if values:
                    labels[k] = float(np.mean(values))
                    answered[k] = True
        metrics = label_metrics(labels, labels, answered)
        metrics.update({"teacher/timed_out": float(timed_out), "teacher/over_budget": float(n - room),
                        "teacher/wait_seconds": time.monotonic() - t0})
        return TeacherLabels(labels.to(batch.rewards_first.device), answered.to(batch.rewards_first.device),
                             metrics, labels.clone().to(batch.rewards_first.device))

    def _post(self, batch: SegmentPairBatch, room: int) -> list[int]:
        def arr(t: torch.Tensor | None, k: int) -> Any:
            return None if t is None else t[k].detach().cpu().numpy().astype(np.float64).tolist()

        ids: list[int] = []
        for start in range(0, room, self.chunk):
            items = []
            for k in range(start, min(room, start + self.chunk)):
                content = {name: arr(getattr(batch, name), k) for name in _POSTED}
                content = {name: value for name, value in content.items() if value is not None}
                items.append({"external_id": f"{self._run}-{self.posted + k}", "env_id": self.env_id,
                              "fps": self.fps, "content": content, "row": content})
            ids += self._request("POST", f"/api/projects/{self.project}/queries", {"queries": items})["query_ids"]
        self.posted += room
        return [int(i) for i in ids]

    def _wait(self, ids: list[int]) -> tuple[dict[int, list[float]], int]:
        """Poll until every query has its answers or the timeout; withdraw the unanswered ones."""
        deadline = math.inf if self.timeout == 0 else time.monotonic() + self.timeout
        query = ",".join(str(i) for i in ids)
        while True:
            rows = self._request("GET", f"/api/projects/{self.project}/answers?query_ids={query}")["answers"]
            count: dict[int, int] = {}
            labels: dict[int, list[float]] = {}
            for row in rows:
                count[row["query_id"]] = count.get(row["query_id"], 0) + 1
                if row["label"] is not None:
                    labels.setdefault(row["query_id"], []).append(float(row["label"]))
            open_ids = [i for i in ids if count.get(i, 0) < self.answers_per_query]
            if not open_ids:
                return labels, 0
            if time.monotonic() >= deadline:
                self._request("POST", f"/api/projects/{self.project}/cancel", {"query_ids": open_ids})
                # an answer that arrived between the last look and the withdrawal still counts
                rows = self._request("GET", f"/api/projects/{self.project}/answers?query_ids={query}")["answers"]
                labels = {}
                for row in rows:
                    if row["label"] is not None:
                        labels.setdefault(row["query_id"], []).append(float(row["label"]))
                return labels, sum(1 for i in open_ids if i not in labels)
            self.sleep(self.poll_seconds)
