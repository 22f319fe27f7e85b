"""``mmalign label serve | push | export``: start the app, enqueue pairs from a data file, write answers back.

``push`` and ``export`` work on the database and the project folder directly (run them where the server's folder
is; with PostgreSQL, any machine that reaches the database and the folder). A run asks people through the app's
HTTP API instead (the ``human`` teacher).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_positive, option

__all__ = ["ServeConfig", "PushConfig", "ExportConfig", "serve", "push", "export", "open_store"]

_ADMIN_ENV = "MMALIGN_LABEL_ADMIN_TOKEN"


@dataclasses.dataclass
class _Where(Config):
    folder: str = option("labels", "project folder: the SQLite database (labels.db) and every project's media")
    db_url: str = option("", "SQLAlchemy URL of the database (e.g. postgresql://user:pw@host/db); empty = SQLite "
                             "in the folder")


@dataclasses.dataclass
class ServeConfig(_Where):
    """The labelling web app (``label.serve``)."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for a team on the network, behind HTTPS)")
    port: int = option(8765, "TCP port")
    lease_seconds: float = option(600.0, "how long a query stays with a labeller before it returns to the queue")
    max_body_kb: int = option(16, "largest labeller request body (answers, logins), KiB")
    max_upload_mb: int = option(64, "largest admin request body (queries with images or states), MiB")
    rate_per_second: float = option(20.0, "requests per second per token (token bucket)")
    rate_burst: int = option(40, "burst of the per-token rate limit")
    max_connections: int = option(200, "concurrent connections before the server answers 503")

    def __post_init__(self) -> None:
        for name in ("port", "lease_seconds", "max_body_kb", "max_upload_mb", "rate_per_second", "rate_burst",
                     "max_connections"):
            check_positive(name, getattr(self, name))


@dataclasses.dataclass
class PushConfig(_Where):
    """Enqueue the pairs of a preference data file (``label.push``)."""

    project: str = option("", "project name (created if new)")
    data: str = option("", "preference data: JSONL / JSON / Parquet / datasets folder of mmalign.data")
    kind: str = option("text", "query kind: text (prompt + answers, mmalign.data 'text'), image (caption + two "
                               "images, 'image') or clip (two segments, 'segment')")
    env_id: str = option("", "gymnasium MuJoCo id to render clip rows without frames_* columns, from their recorded "
                             "qpos_*/qvel_* (any task) or their observations (Reacher, locomotion tasks)")
    fps: int = option(20, "frames per second of clips")
    answers_per_query: int = option(1, "labellers per query (2+ gives agreement statistics)")
    instructions: str = option("", "what labellers are asked (shown above every query)")
    reference_labels: bool = option(False, "treat the data's label column as reference labels (agreement view)")
    skip_invalid: bool = option(False, "drop invalid rows (counted) instead of refusing the file")

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("clip", "image", "text"))
        check_positive("fps", self.fps)
        check_positive("answers_per_query", self.answers_per_query)


@dataclasses.dataclass
class ExportConfig(_Where):
    """Write a project's answers as a preference data file (``label.export``)."""

    project: str = option("", "project name")
    output: str = option("", "JSONL file to write (images go to media/ beside it); refused if it exists")


def validate(cfg: _Where, resume: bool = False) -> None:
    """Required fields, checked before a run folder is made (not in ``__post_init__``, so every config builds from
    its defaults for ``--help`` and the docs)."""
    if isinstance(cfg, PushConfig):
        if not cfg.project:
            raise ValueError("project must be set (project=NAME)")
        if not cfg.data:
            raise ValueError("data must be set (data=path/to/pairs.jsonl)")
    if isinstance(cfg, ExportConfig) and (not cfg.project or not cfg.output):
        raise ValueError("project and output must be set (project=NAME output=answers.jsonl)")


def open_store(cfg: _Where, lease_seconds: float = 600.0) -> Any:
    from mmalign.label.store import Store, sqlite_url

    return Store(cfg.db_url or sqlite_url(cfg.folder), lease_seconds=lease_seconds)


def serve(cfg: ServeConfig, run_dir: Path) -> dict[str, Any]:
    """Run the app until interrupted (Ctrl-C); prints the admin token the first time a folder is served."""
    import uvicorn

    from mmalign.label.app import AppSettings, create_app, ensure_admin

    folder = Path(cfg.folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg, cfg.lease_seconds)
    fresh = ensure_admin(store, os.environ.get(_ADMIN_ENV), folder)
    if fresh:
        print(f"[mmalign] admin token (also in {folder / 'admin_token'}, mode 0600): {fresh}")
    settings = AppSettings(folder=folder, max_body_bytes=cfg.max_body_kb * 1024,
                           max_upload_bytes=cfg.max_upload_mb * 1024 * 1024, rate_per_second=cfg.rate_per_second,
                           rate_burst=cfg.rate_burst)
    print(f"[mmalign] labelling app on http://{cfg.host}:{cfg.port}/  (admin: /admin)  database: "
          f"{store.engine.url.render_as_string(hide_password=True)}", flush=True)
    uvicorn.run(create_app(store, settings), host=cfg.host, port=cfg.port, log_level="warning",
                limit_concurrency=cfg.max_connections, timeout_graceful_shutdown=5)
    store.close()
    return {"url": f"http://{cfg.host}:{cfg.port}/"}


def push(cfg: PushConfig, run_dir: Path) -> dict[str, Any]:
    """Validate the whole file first (mmalign.data), then render/save media and enqueue every pair."""
    from mmalign.data import load_preference_data
    from mmalign.label.queries import DATA_KIND, rows_to_queries

    validate(cfg)
    data = Path(cfg.data)
    dataset = load_preference_data(data, DATA_KIND[cfg.kind], skip_invalid=cfg.skip_invalid)
    # every row's clip is checked and rendered before the database is touched: a bad row creates no project
    media = Path(cfg.folder) / "media" / cfg.project
    queries = rows_to_queries(cfg.kind, dataset.rows, media, data if data.is_dir() else data.parent,
                              env_id=cfg.env_id, fps=cfg.fps, id_prefix=f"{data.stem}-",
                              reference=cfg.reference_labels,
                              row_numbers=[dataset.row_number(i) for i in range(len(dataset.rows))])
    store = open_store(cfg)
    try:
        store.create_project(cfg.project, cfg.kind, instructions=cfg.instructions,
                             answers_per_query=cfg.answers_per_query)
        ids = store.add_queries(cfg.project, queries)
        counts = store.counts(cfg.project)
    finally:
        store.close()
    print(f"[mmalign] {cfg.project}: pushed {len(ids)} pairs from {data} ({dataset.report.summary()}); "
          f"{counts['pending']} pending")
    return {"pushed": len(ids), "dropped": len(dataset.report.dropped), **counts}


def export(cfg: ExportConfig, run_dir: Path) -> dict[str, Any]:
    """Answers -> preference rows of the project's data kind; reads back through mmalign.data before returning."""
    from mmalign.data import load_preference_data, write_jsonl
    from mmalign.label.queries import DATA_KIND, export_rows

    validate(cfg)
    out = Path(cfg.output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another output (nothing is overwritten)")
    store = open_store(cfg)
    try:
        project = store.project(cfg.project)
        rows, stats = export_rows(project.kind, store.queries(cfg.project), store.answers(cfg.project),
                                  Path(cfg.folder) / "media" / cfg.project, out.parent)
    finally:
        store.close()
    if not rows:
        raise ValueError(f"project {cfg.project!r} has no answered queries to export ({stats})")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")  # same suffix: mmalign.data reads it by its suffix
    write_jsonl(partial, rows)
    try:  # what a training job will do: must pass before the file appears under its name
        load_preference_data(partial, DATA_KIND[project.kind])
    except ValueError as err:
        partial.unlink()
        raise ValueError(f"project {cfg.project!r} does not export as {DATA_KIND[project.kind]} preference data "
                         f"(nothing written to {out}): {err}") from None
    partial.replace(out)
    print(f"[mmalign] wrote {len(rows)} labelled pairs to {out} (all-skipped: {stats['all_skipped']}, "
          f"unanswered: {stats['unanswered']})")
    return {"output": str(out), **stats}
