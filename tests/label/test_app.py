"""The HTTP API: auth on every write, media confinement, size and rate limits, the full labelling round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")
from starlette.testclient import TestClient  # noqa: E402

from mmalign.label.app import CSP  # noqa: E402
from mmalign.label.store import sqlite_url  # noqa: E402
from label_helpers import XSS, auth, make_app, query_items  # noqa: E402


@pytest.fixture()
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    app, store, admin, labeller = make_app(tmp_path, sqlite_url(tmp_path))
    with TestClient(app) as client:
        yield client, store, admin, labeller
    store.close()


def _project(client: TestClient, admin: str, kind: str, n: int = 1, text: str = "") -> None:
    r = client.post("/api/projects", json={"name": kind, "kind": kind}, headers=auth(admin))
    assert r.status_code == 200, r.text
    r = client.post(f"/api/projects/{kind}/queries", json={"queries": query_items(kind, n, text)}, headers=auth(admin))
    assert r.status_code == 200, r.text


def test_round_trip_of_each_kind(env) -> None:  # type: ignore[no-untyped-def]
    client, store, admin, labeller = env
    for kind in ("clip", "image", "text"):
        _project(client, admin, kind)
        q = client.get(f"/api/projects/{kind}/next", headers=auth(labeller)).json()["query"]
        assert q["kind"] == kind
        media = [v for side in ("left", "right") for k, v in q["payload"][side].items() if k in ("image", "video")]
        for name in media + q["payload"].get("images", []):
            r = client.get(f"/media/{kind}/{name}", headers=auth(labeller))
            assert r.status_code == 200 and r.headers["content-type"] in ("image/png", "video/webm")
        r = client.post("/api/answers", json={"submission_id": f"sub-{kind}-0001", "query_id": q["query_id"],
                                              "choice": "left", "comment": "ok"}, headers=auth(labeller))
        assert r.json() == {"stored": True, "answer_id": r.json()["answer_id"], "duplicate": False}
        assert client.get(f"/api/projects/{kind}/next", headers=auth(labeller)).json()["query"] is None
    progress = client.get("/api/progress", headers=auth(admin)).json()
    assert {k: v["labellers"]["alice"]["answered"] for k, v in progress.items()} == {"clip": 1, "image": 1, "text": 1}


def test_text_diff_runs_mark_the_differing_words(env) -> None:  # type: ignore[no-untyped-def]
    client, _store, admin, labeller = env
    _project(client, admin, "text")
    payload = client.get("/api/projects/text/next", headers=auth(labeller)).json()["query"]["payload"]
    changed = {tuple(sorted(t.strip() for t, c in payload[s]["runs"] if c)) for s in ("left", "right")}
    assert changed == {("red square",), ("blue circle",)}


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
def test_writes_without_a_valid_token_get_401_and_write_nothing(env, token) -> None:  # type: ignore[no-untyped-def]
    client, store, admin, labeller = env
    _project(client, admin, "image")
    qid = client.get("/api/projects/image/next", headers=auth(labeller)).json()["query"]["query_id"]
    headers = {} if token is None else auth(token)
    calls = [("/api/answers", {"submission_id": "sub-00000001", "query_id": qid, "choice": "left"}),
             ("/api/projects", {"name": "evil", "kind": "text"}),
             ("/api/labellers", {"name": "mallory"}),
             ("/api/projects/image/queries", {"queries": query_items("image", 1)}),
             ("/api/projects/image/cancel", {"query_ids": [qid]})]
    for path, body in calls:
        assert client.post(path, json=body, headers=headers).status_code == 401, path
    assert client.get("/api/progress", headers=headers).status_code == 401
    assert store.answers("image") == [] and [p.name for p in store.projects()] == ["image"]
    assert len(list(store.queries("image"))) == 1 and store.authenticate("x" * 20) is None


def test_labeller_token_on_admin_calls_gets_403_and_writes_nothing(env) -> None:  # type: ignore[no-untyped-def]
    client, store, admin, labeller = env
    _project(client, admin, "image")
    for path, body in [("/api/projects", {"name": "evil", "kind": "text"}), ("/api/labellers", {"name": "m"}),
                       ("/api/projects/image/queries", {"queries": query_items("image", 1)}),
                       ("/api/projects/image/cancel", {"query_ids": [1]})]:
        assert client.post(path, json=body, headers=auth(labeller)).status_code == 403, path
    assert client.get("/api/projects/image/answers", headers=auth(labeller)).status_code == 403
    assert [p.name for p in store.projects()] == ["image"] and len(list(store.queries("image"))) == 1


def test_media_outside_the_project_folder_is_404(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _store, admin, labeller = env
    _project(client, admin, "image")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "labels.db").exists()
    good = client.get("/api/projects/image/next", headers=auth(labeller)).json()["query"]["payload"]["left"]["image"]
    for bad in ["..%2Fsecret.png", "..%2F..%2Fsecret.png", "%2Fetc%2Fpasswd", "/etc/passwd", f"..%2Fimage%2F{good}",
                f"{tmp_path}/secret.png".replace("/", "%2F"), "labels.db", good.replace(".png", ".webm"),
                good + "%00.png"]:
        r = client.get(f"/media/image/{bad}", headers=auth(labeller))
        assert r.status_code == 404, bad
    assert client.get(f"/media/nope/{good}", headers=auth(labeller)).status_code == 404
    assert client.get(f"/media/image/{good}").status_code == 401


def test_pages_carry_a_content_security_policy(env) -> None:  # type: ignore[no-untyped-def]
    client = env[0]
    for path in ("/", "/admin", "/static/label.js"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_uploaded_images_must_be_pixels_not_server_paths(env) -> None:  # type: ignore[no-untyped-def]
    client, store, admin, _ = env
    client.post("/api/projects", json={"name": "image", "kind": "image"}, headers=auth(admin))
    item = query_items("image", 1)[0]
    item["content"]["chosen_image"] = "/etc/hostname"
    r = client.post("/api/projects/image/queries", json={"queries": [item]}, headers=auth(admin))
    assert r.status_code == 400 and "png_base64" in r.json()["error"]
    assert list(store.queries("image")) == []


def test_request_size_and_rate_are_bounded(tmp_path: Path) -> None:
    app, store, admin, labeller = make_app(tmp_path, sqlite_url(tmp_path), max_body_bytes=1024,
                                           rate_per_second=1.0, rate_burst=5)
    with TestClient(app) as client:
        big = {"submission_id": "sub-00000001", "query_id": 1, "choice": "left", "comment": "x" * 5000}
        assert client.post("/api/answers", json=big, headers=auth(labeller)).status_code == 413
        codes = [client.get("/api/me", headers=auth(labeller)).status_code for _ in range(8)]
        assert codes[:4] == [200] * 4 and codes[-1] == 429  # the 413 above used one of the burst of 5
    assert store.answers  # the store is still usable
    store.close()


def test_model_text_reaches_the_client_verbatim_as_json(env) -> None:  # type: ignore[no-untyped-def]
    client, _store, admin, labeller = env
    _project(client, admin, "text", text=XSS)
    q = client.get("/api/projects/text/next", headers=auth(labeller)).json()["query"]["payload"]
    assert XSS in q["prompt"] and XSS in "".join(t for t, _ in q["left"]["runs"])


def test_first_start_creates_one_admin_token_file_readable_by_the_owner_only(tmp_path: Path) -> None:
    from mmalign.label.app import ensure_admin
    from mmalign.label.store import Store

    store = Store(sqlite_url(tmp_path))
    token = ensure_admin(store, None, tmp_path)
    assert token and (tmp_path / "admin_token").read_text().strip() == token
    assert (tmp_path / "admin_token").stat().st_mode & 0o777 == 0o600
    assert store.authenticate(token)[2] is True  # type: ignore[index]
    assert ensure_admin(store, None, tmp_path) is None  # a restart creates no second admin
    given = "team-admin-token-" + "z" * 20
    assert ensure_admin(store, given, tmp_path) is None and store.authenticate(given)[2] is True  # type: ignore[index]
    store.close()
