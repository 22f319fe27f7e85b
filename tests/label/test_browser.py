"""A labeller in real headless Chromium (Debian's chromium driven by Playwright): one query of each kind answered
with the mouse, one with the keyboard; the database then holds exactly those answers. Model text with script
payloads is shown as text and runs nothing.

Set MMALIGN_LABEL_SCREENSHOTS=<folder> to save a PNG of each view (docs/guide/img/ is made so; the clip view comes
from test_pebble_human.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need `pip install playwright`")

from label_helpers import (CHROMIUM, FLAGS, SHOTS, XSS, LiveServer, auth, make_app,  # noqa: E402
                           query_items)
from mmalign.label.store import sqlite_url  # noqa: E402


pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # never downloads a browser
        yield b
        b.close()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[LiveServer, Any, str, str]]:
    from starlette.testclient import TestClient

    app, store, admin, labeller = make_app(tmp_path, sqlite_url(tmp_path))
    with TestClient(app) as client:  # set up the projects through the API, as a run or `label push` would
        for kind, n, text in (("clip", 1, ""), ("image", 1, ""), ("text", 2, "")):
            client.post("/api/projects", json={"name": kind, "kind": kind,
                                               "instructions": "Which one is better?"}, headers=auth(admin))
            r = client.post(f"/api/projects/{kind}/queries", json={"queries": query_items(kind, n, text)},
                            headers=auth(admin))
            assert r.status_code == 200, r.text
        client.post("/api/projects", json={"name": "xss", "kind": "text"}, headers=auth(admin))
        items = query_items("text", 1, XSS)
        items[0]["content"]["prompt"] = XSS
        client.post("/api/projects/xss/queries", json={"queries": items}, headers=auth(admin))
    with LiveServer(app) as live:
        yield live, store, admin, labeller
    store.close()


def _open_project(page: Any, url: str, token: str, project: str) -> None:
    page.goto(url + "/")
    if not page.evaluate("sessionStorage.getItem('mmalign-label-token')"):  # else the page logs in by itself
        page.fill("#token", token)
        page.click("#login-btn")
    page.wait_for_selector("#pick:not([hidden])")
    page.select_option("#project", project)
    page.click("#pick-btn")
    page.wait_for_selector("#task:not([hidden])")


def _wait(page: Any, expression: str, timeout: float = 20.0) -> None:
    """Poll ``expression`` until true (``page.wait_for_function`` evaluates strings in the page, which the app's CSP
    rightly forbids; ``page.evaluate`` runs through the DevTools protocol)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        page.wait_for_timeout(50)


def _shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def _answered(page: Any, store: Any, project: str, n: int) -> None:
    """Wait until the page moved on (the answer was acknowledged) and the database holds ``n`` answers."""
    _wait(page, "document.getElementById('status').textContent.startsWith('Saved') || "
                           "!document.getElementById('done').hidden")
    assert len(store.answers(project)) == n


def test_labeller_answers_each_kind_with_mouse_and_keyboard(browser: Any, server: Any) -> None:
    live, store, _admin, token = server
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    _open_project(page, live.url, token, "clip")
    # both clips load and play, the right one following the left
    _wait(page, "Array.from(document.querySelectorAll('#task video'))"
                           ".every(v => v.readyState >= 2 && v.currentTime > 0)")
    assert page.eval_on_selector_all("#task video", "vs => vs.map(v => v.loop && v.muted)") == [True, True]
    # overlapping loads (a double click on "Check again", a slow network) never show an item twice
    page.evaluate("blobCache.clear(); Promise.all([loadNext(), loadNext(), loadNext()])")  # media fetched anew
    assert page.evaluate("[document.getElementById('left-item').children.length, "
                         "document.getElementById('right-item').children.length]") == [1, 1]
    _wait(page, "Array.from(document.querySelectorAll('#task video'))"
                ".every(v => v.readyState >= 2 && v.currentTime > 0)")
    page.fill("#comment", "the left arm reaches the target")
    page.click("#ans-left")
    page.wait_for_selector("#done:not([hidden])")

    _open_project(page, live.url, token, "image")
    _wait(page, "Array.from(document.querySelectorAll('#task .item img')).every(i => i.naturalWidth > 0)")
    assert page.text_content("#caption") == "a red square 0 "
    _shot(page, "label-image.png")
    page.click("#ans-right")
    page.wait_for_selector("#done:not([hidden])")

    _open_project(page, live.url, token, "text")
    assert page.eval_on_selector_all("#task .item mark", "ms => ms.map(m => m.textContent.trim())") in (
        ["red square", "blue circle"], ["blue circle", "red square"])
    _shot(page, "label-text.png")
    page.click("#ans-equal")
    _answered(page, store, "text", 1)
    page.keyboard.press("2")  # keyboard: right is better
    page.wait_for_selector("#done:not([hidden])")
    assert errors == []

    got = {p: [(a["choice"], a["comment"]) for a in store.answers(p)] for p in ("clip", "image", "text")}
    assert got == {"clip": [("left", "the left arm reaches the target")], "image": [("right", "")],
                   "text": [("equal", ""), ("right", "")]}
    # labels are P(first ≻ second): the page may show the pair swapped, the database never is
    for p in ("clip", "image", "text"):
        for a in store.answers(p):
            from mmalign.label.store import choice_label, swapped

            assert a["label"] == choice_label(a["choice"], swapped(a["query_id"], a["labeller_id"]))
    page.close()


def test_script_payloads_in_model_text_are_shown_as_text(browser: Any, server: Any) -> None:
    live, store, _admin, token = server
    page = browser.new_page()
    _open_project(page, live.url, token, "xss")
    assert page.text_content("#prompt") == XSS
    assert XSS.strip() in page.text_content("#left-item") or XSS.strip() in page.text_content("#right-item")
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert page.eval_on_selector_all("#task script, #task img[onerror]", "n => n.length") == 0
    page.keyboard.press("0")  # can't tell
    page.wait_for_selector("#done:not([hidden])")
    assert [(a["choice"], a["label"]) for a in store.answers("xss")] == [("skip", None)]
    page.close()


def test_admin_page_shows_progress(browser: Any, server: Any) -> None:
    live, store, admin, token = server
    # two labellers on overlapping queries with reference labels: kappa and reference agreement are shown
    store.create_project("review", "text", answers_per_query=2)
    store.add_queries("review", [{"external_id": f"r{i}", "payload": {"left": {}, "right": {}},
                                  "reference_label": float(i % 2)} for i in range(6)])
    ids = [store.authenticate(token)[0], store.authenticate(store.add_labeller("bob"))[0]]
    for lid, choices in zip(ids, (["left", "right"] * 3, ["left", "right", "left", "equal", "left", "skip"])):
        for choice in choices:
            q = store.lease("review", lid)
            store.submit(lid, f"sub-{lid}-{q.query_id:05d}", q.query_id, choice)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(live.url + "/admin")
    page.fill("#token", admin)
    page.click("#login-btn")
    page.wait_for_selector("#labellers tbody tr")
    rows = page.eval_on_selector_all("#labellers tbody tr", "rs => rs.map(r => r.textContent)")
    assert any("review" in r and "alice" in r for r in rows) and any("bob" in r for r in rows)
    kappa = page.eval_on_selector_all("#cohen tbody tr", "rs => rs.map(r => r.textContent)")
    assert len(kappa) == 1 and "alice · bob" in kappa[0]
    _shot(page, "admin.png")
    page.close()
