"""End to end: ``mmalign robotics pebble teacher=human`` while a scripted labeller in headless Chromium answers the
run's clip queries through the app; the run finishes with exactly those labels."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")
pytest.importorskip("stable_baselines3")
sync_api = pytest.importorskip("playwright.sync_api")

from label_helpers import CHROMIUM, FLAGS, SHOTS, LiveServer, make_app  # noqa: E402

from mmalign.cli import run_job  # noqa: E402
from mmalign.label.store import sqlite_url  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")

KEYS = ["1", "2", "3", "ArrowLeft"]  # left, right, equal, left: one of each answer a run can learn from


def _browser_labeller(url: str, token: str, project: str, stop: threading.Event, pressed: list[str],
                      errors: list[str]) -> None:
    """Log in, wait for the run's project, answer every query with the next key until told to stop."""
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#token", token)
            page.click("#login-btn")
            page.wait_for_selector("#pick:not([hidden])")
            while not stop.is_set() and not page.evaluate(
                    f"Array.from(document.querySelectorAll('#project option')).some(o => o.value === '{project}')"):
                page.wait_for_timeout(200)
                page.reload()  # logs in again from the session and lists the projects
                page.wait_for_selector("#pick:not([hidden])")
            page.select_option("#project", project)
            page.click("#pick-btn")
            seen = None
            while not stop.is_set():
                state = page.evaluate("[document.getElementById('task').hidden, document.body.dataset.queryId || '',"
                                      " document.querySelectorAll('#task video').length]")
                if not state[0] and state[1] != seen and state[2] >= 2:
                    seen = state[1]
                    page.wait_for_timeout(300)  # the page polls "again" fast: a doubled load would show by now
                    shown = page.evaluate("[document.getElementById('left-item').children.length, "
                                          "document.getElementById('right-item').children.length]")
                    if shown != [1, 1]:
                        errors.append(f"query {seen} shows {shown} clips per side")
                    if SHOTS and not pressed:  # the docs' picture of a run's query (Reacher clips, playing)
                        page.wait_for_timeout(1500)
                        page.screenshot(path=str(Path(SHOTS) / "label-clip-reacher.png"), full_page=True)
                    key = KEYS[len(pressed) % len(KEYS)]
                    page.keyboard.press(key)
                    pressed.append(key)
                elif page.is_visible("#done"):
                    try:  # the page polls by itself too: a query that arrives first hides the button again
                        page.click("#again", timeout=2000)
                    except sync_api.TimeoutError:
                        pass
                page.wait_for_timeout(100)
            browser.close()
    except Exception as err:  # noqa: BLE001  (reported to the test's thread)
        errors.append(repr(err))


def test_pebble_run_learns_from_a_person_in_the_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, store, admin, labeller = make_app(tmp_path / "labels", sqlite_url(tmp_path / "labels"))
    monkeypatch.setenv("MMALIGN_LABEL_ADMIN_TOKEN", admin)
    stop = threading.Event()
    pressed: list[str] = []
    errors: list[str] = []
    with LiveServer(app) as live:
        worker = threading.Thread(target=_browser_labeller,
                                  args=(live.url, labeller, "pebble-e2e", stop, pressed, errors))
        worker.start()
        try:
            overrides = ["env_id=Reacher-v5", "total_steps=200", "learning_starts=60", "first_feedback=100",
                         "feedback_every=60", "label_budget=6", "initial_labels=3", "labels_per_round=3",
                         "rm_batch_size=4", "rm_epochs=2", "eval_every=200", "eval_episodes=1", "batch_size=16",
                         "segment_length=8", "candidate_factor=2", "net_width=16", "rm_hidden=16",
                         "save_reward_model=false", "teacher=human", f"teacher.url={live.url}",
                         "teacher.project=pebble-e2e", "teacher.env_id=Reacher-v5", "teacher.poll_seconds=0.2",
                         "teacher.timeout=90"]
            summary = run_job("robotics.pebble", None, overrides, str(tmp_path / "run"))
        finally:
            stop.set()
            worker.join(timeout=60)
    assert errors == []
    answers = store.answers("pebble-e2e")
    store.close()
    assert len(answers) == len(pressed) == 6  # every query of the run was answered in the browser, once
    labels = [a["label"] for a in answers]
    assert summary["labels/queries"] == 6 and summary["labels/answered"] == 6
    assert summary["labels/ties"] == labels.count(0.5) == 1
    assert summary["labels/first_preferred"] == sum(1 for y in labels if y == 1.0)
    assert {a["choice"] for a in answers} == {"left", "right", "equal"}
