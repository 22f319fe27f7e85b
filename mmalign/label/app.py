"""The labelling web app (Starlette): the labeller page, the admin page and the JSON API behind them.

Security model
--------------
- Every API call carries ``Authorization: Bearer <token>``; tokens are stored hashed (:mod:`mmalign.label.store`).
  No token or an unknown one: 401; a labeller's token on an admin call: 403. Nothing is written before the check.
  Tokens travel in a header, never in a cookie, so another site cannot make a browser send them (no CSRF).
- Pages are static HTML/JS from the package; model text and captions reach the page as JSON and are put into the
  DOM with ``textContent`` only, under a Content-Security-Policy that allows scripts from this origin alone (an
  injected ``<script>`` or ``onerror=`` attribute would not run even if it reached the DOM as markup).
- Media are served only by content-hash name from the project's own folder (404 for anything else).
- Request bodies are bounded (``max_body_bytes`` for labellers, ``max_upload_bytes`` for the admin's query
  uploads) and every client is rate limited (a token bucket per token, and one per address for failed logins).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from mmalign.label.agreement import progress_report
from mmalign.label.media import MEDIA_TYPES, media_file
from mmalign.label.queries import build_payload, decode_upload
from mmalign.label.store import Store, StoreError

__all__ = ["AppSettings", "create_app", "ensure_admin", "CSP"]

STATIC = Path(__file__).parent / "static"
_PAGES = {"label.js", "admin.js", "common.js", "style.css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; media-src 'self' blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass
class AppSettings:
    """Limits of the app (the ``label serve`` config sets them)."""

    folder: Path
    max_body_bytes: int = 16 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    rate_per_second: float = 20.0
    rate_burst: int = 40
    failed_logins_per_minute: int = 30
    _buckets: dict[str, list[float]] = field(default_factory=dict)

    def allow(self, key: str, rate: float, burst: float) -> bool:
        """Token bucket: ``burst`` requests at once, refilled at ``rate`` per second."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, [burst, now])
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = [tokens, now]
            return False
        self._buckets[key] = [tokens - 1.0, now]
        if len(self._buckets) > 100_000:  # forget idle clients rather than grow without bound
            self._buckets.clear()
        return True


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Caller:
    id: int
    name: str
    admin: bool


def create_app(store: Store, settings: AppSettings) -> Starlette:
    """The ASGI app over ``store``; media of project ``p`` live in ``settings.folder / "media" / p``."""

    def media_dir(project: str) -> Path:
        return settings.folder / "media" / store.project(project).name

    async def caller(request: Request, admin: bool = False) -> Caller:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        ip = request.client.host if request.client else "?"
        who = await run_in_threadpool(store.authenticate, token) if token else None
        if who is None:
            if not settings.allow(f"fail:{ip}", settings.failed_logins_per_minute / 60.0,
                                  settings.failed_logins_per_minute):
                raise HTTPError(429, "too many failed logins from this address; wait a minute")
            raise HTTPError(401, "missing or unknown token (send Authorization: Bearer <token>)")
        if not settings.allow(f"tok:{who[0]}", settings.rate_per_second, settings.rate_burst):
            raise HTTPError(429, "too many requests; slow down")
        if admin and not who[2]:
            raise HTTPError(403, "this needs the admin token")
        return Caller(*who)

    async def body(request: Request, limit: int) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HTTPError(413, f"request body larger than {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise HTTPError(413, f"request body larger than {limit} bytes")
        try:
            return json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, "request body is not JSON") from None

    def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                out = await fn(request)
            except HTTPError as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            except StoreError as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            except (ValueError, KeyError, TypeError) as err:
                return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
            return out if isinstance(out, Response) else JSONResponse(out)
        return wrapped

    # -- pages ---------------------------------------------------------------------------------------------------
    async def page_label(request: Request) -> Response:
        return FileResponse(STATIC / "label.html", media_type="text/html")

    async def page_admin(request: Request) -> Response:
        return FileResponse(STATIC / "admin.html", media_type="text/html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _PAGES:
            return JSONResponse({"error": "not found"}, status_code=404)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return FileResponse(STATIC / name, media_type=kind)

    # -- API -----------------------------------------------------------------------------------------------------
    async def me(request: Request) -> Any:
        who = await caller(request)
        return {"name": who.name, "admin": who.admin}

    async def list_projects(request: Request) -> Any:
        await caller(request)

        def run() -> list[dict[str, Any]]:
            return [{"name": p.name, "kind": p.kind, "instructions": p.instructions,
                     "answers_per_query": p.answers_per_query, **store.counts(p.name)} for p in store.projects()]
        return await run_in_threadpool(run)

    async def create_project(request: Request) -> Any:
        await caller(request, admin=True)
        data = await body(request, settings.max_body_bytes)
        pid = await run_in_threadpool(
            store.create_project, str(data["name"]), str(data["kind"]),
            instructions=str(data.get("instructions", "")), answers_per_query=int(data.get("answers_per_query", 1)))
        return {"id": pid, "name": data["name"]}

    async def create_labeller(request: Request) -> Any:
        await caller(request, admin=True)
        data = await body(request, settings.max_body_bytes)
        token = await run_in_threadpool(store.add_labeller, str(data["name"]))
        return {"name": data["name"], "token": token}

    async def add_queries(request: Request) -> Any:
        await caller(request, admin=True)
        project = request.path_params["project"]
        data = await body(request, settings.max_upload_bytes)
        items = data.get("queries")
        if not isinstance(items, list) or not items:
            raise HTTPError(400, "body must be {\"queries\": [...]} with at least one query")

        def run() -> list[int]:
            kind = store.project(project).kind
            folder = media_dir(project)
            rendered = _render_states(kind, items)
            queries = []
            for n, item in enumerate(items):
                content = dict(item.get("content") or {})
                if kind == "text":
                    content["images"] = [decode_upload(im, f"queries[{n}].images") for im in content.get("images") or []]
                elif kind == "image":
                    for col in ("chosen_image", "rejected_image"):
                        content[col] = decode_upload(content.get(col), f"queries[{n}].{col}")
                clips = rendered.get(n)
                payload = build_payload(kind, content, folder, None, clips=clips, fps=int(item.get("fps", 20)))
                queries.append({"external_id": item["external_id"], "payload": payload,
                                "row": item.get("row") or {}, "reference_label": item.get("reference_label")})
            return store.add_queries(project, queries)
        return {"query_ids": await run_in_threadpool(run)}

    async def next_query(request: Request) -> Any:
        who = await caller(request)
        project = request.path_params["project"]
        leased = await run_in_threadpool(store.lease, project, who.id)
        if leased is None:
            return {"query": None, "counts": await run_in_threadpool(store.counts, project)}
        return {"query": {"query_id": leased.query_id, "kind": leased.kind, "payload": leased.payload,
                          "lease_expires": leased.expires}}

    async def submit(request: Request) -> Any:
        who = await caller(request)
        data = await body(request, settings.max_body_bytes)
        seconds = data.get("seconds")
        out = await run_in_threadpool(
            store.submit, who.id, str(data["submission_id"]), int(data["query_id"]), str(data["choice"]),
            str(data.get("comment", "")), None if seconds is None else float(seconds))
        return {"stored": True, "answer_id": out["answer_id"], "duplicate": out["duplicate"]}

    async def answers(request: Request) -> Any:
        await caller(request, admin=True)
        project = request.path_params["project"]
        raw = request.query_params.get("query_ids", "")
        ids = [int(x) for x in raw.split(",") if x.strip()] if raw else None
        return {"answers": await run_in_threadpool(store.answers, project, ids)}

    async def cancel(request: Request) -> Any:
        await caller(request, admin=True)
        data = await body(request, settings.max_upload_bytes)
        n = await run_in_threadpool(store.cancel, request.path_params["project"],
                                    [int(x) for x in data.get("query_ids", [])])
        return {"cancelled": n}

    async def progress(request: Request) -> Any:
        await caller(request, admin=True)

        def run() -> dict[str, Any]:
            return {p.name: {"kind": p.kind, **progress_report(store.answers(p.name), store.counts(p.name))}
                    for p in store.projects()}
        return await run_in_threadpool(run)

    async def media(request: Request) -> Response:
        await caller(request)
        project, name = request.path_params["project"], request.path_params["name"]
        try:
            folder = media_dir(project)
        except StoreError:
            return JSONResponse({"error": "not found"}, status_code=404)
        path = media_file(folder, name)
        if path is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    routes = [
        Route("/", page_label), Route("/admin", page_admin), Route("/static/{name}", static),
        Route("/api/me", endpoint(me)),
        Route("/api/projects", endpoint(list_projects), methods=["GET"]),
        Route("/api/projects", endpoint(create_project), methods=["POST"]),
        Route("/api/labellers", endpoint(create_labeller), methods=["POST"]),
        Route("/api/projects/{project}/queries", endpoint(add_queries), methods=["POST"]),
        Route("/api/projects/{project}/next", endpoint(next_query), methods=["GET"]),
        Route("/api/projects/{project}/answers", endpoint(answers), methods=["GET"]),
        Route("/api/projects/{project}/cancel", endpoint(cancel), methods=["POST"]),
        Route("/api/answers", endpoint(submit), methods=["POST"]),
        Route("/api/progress", endpoint(progress), methods=["GET"]),
        Route("/media/{project}/{name:path}", endpoint(media), methods=["GET"]),
    ]
    return SecurityHeaders(Starlette(routes=routes))  # type: ignore[return-value]


class SecurityHeaders:
    """ASGI wrapper adding the CSP and friends to every response (``no-store`` on the API)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _render_states(kind: str, items: list[Any]) -> dict[int, tuple[Any, Any]]:
    """Clips of the clip queries sent as states (``env_id`` + recorded ``qpos_*``/``qvel_*`` or ``obs_*`` in the
    content, no ``frames_*``: given frames are shown as given, as by ``label push``), rendered in one child process
    per env id (starting the renderer costs more than drawing a query)."""
    by_env: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        content = item.get("content") or {}
        framed = content.get("frames_first") is not None and content.get("frames_second") is not None
        if kind == "clip" and item.get("env_id") and not framed:
            by_env.setdefault(str(item["env_id"]), []).append(n)
    out: dict[int, tuple[Any, Any]] = {}
    if by_env:
        from mmalign.label.media import render_clips, segment_of

        for env_id, ns in by_env.items():
            segs = [segment_of(items[n].get("content") or {}, side, f"queries[{n}]") for n in ns
                    for side in ("first", "second")]
            frames = render_clips(env_id, segs)
            for k, n in enumerate(ns):
                out[n] = (frames[2 * k], frames[2 * k + 1])
    return out


def ensure_admin(store: Store, token: str | None, folder: Path) -> str | None:
    """Make sure an admin exists: with ``token`` when given (added if new), else a fresh one written to
    ``folder/admin_token`` (mode 0600) and returned; ``None`` when an admin already exists and no token is given."""
    if token:
        if store.authenticate(token) is None:
            name = "admin" if not store.has_admin() else f"admin-{int(time.time())}"
            store.add_labeller(name, admin=True, token=token)
        return None
    if store.has_admin():
        return None
    token = store.add_labeller("admin", admin=True)
    path = folder / "admin_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token

