"""The labelling database: projects, labellers, queries, leases and answers (SQLAlchemy; SQLite or PostgreSQL).

Guarantees (tested in tests/label/test_store.py on both engines):

- an answer is committed before :meth:`Store.submit` returns, so whatever the server acknowledged survives a crash;
- a submission carries a client-generated id: a retried submit returns the stored answer and stores nothing new;
- a labeller answers a query at most once (a database constraint, not only a check);
- :meth:`Store.lease` hands a query to a labeller for ``lease_seconds``; an expired lease returns the query to the
  queue, so a query whose labeller vanished (or whose server was killed) is handed out again;
- a query needs ``answers_per_query`` answers (more than one gives overlap for inter-labeller agreement).

SQLite runs in WAL mode with ``synchronous=FULL`` and every transaction ``BEGIN IMMEDIATE`` (one writer at a time,
readers never blocked); PostgreSQL picks the next query with ``FOR UPDATE SKIP LOCKED`` so that several server
processes can share one database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sqlalchemy import (
    Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine, event, func, select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "CHOICES",
    "KINDS",
    "Store",
    "StoreError",
    "choice_label",
    "hash_token",
    "sqlite_url",
]

KINDS = ("clip", "image", "text")
# what the labeller clicks -> P(left ≻ right); None = "can't tell", stored as a skip (never as a label)
CHOICES: dict[str, float | None] = {"left": 1.0, "right": 0.0, "equal": 0.5, "skip": None}


class StoreError(ValueError):
    """A request the database refuses; ``status`` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(10))
    instructions: Mapped[str] = mapped_column(Text, default="")
    answers_per_query: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[float] = mapped_column(Float)


class Labeller(Base):
    __tablename__ = "labellers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)


class Query(Base):
    __tablename__ = "queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    external_id: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)  # JSON: what the page shows (text, media file names)
    row: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the source row, for export
    reference_label: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_answers: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[bool] = mapped_column(default=False)
    __table_args__ = (UniqueConstraint("project_id", "external_id"),
                      Index("ix_queries_open", "project_id", "num_answers", "id"))


class Lease(Base):
    __tablename__ = "leases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"))
    expires: Mapped[float] = mapped_column(Float, index=True)
    __table_args__ = (UniqueConstraint("query_id", "labeller_id"),)


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(String(64), unique=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"), index=True)
    choice: Mapped[str] = mapped_column(String(8))
    label: Mapped[float | None] = mapped_column(Float, nullable=True)  # P(first ≻ second); None = skipped
    comment: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("query_id", "labeller_id"), Index("ix_answers_created", "created"))


def hash_token(token: str) -> str:
    """SHA-256 of a token: tokens are 256-bit random strings, so a fast hash is enough (no dictionary to guess)."""
    return hashlib.sha256(token.encode()).hexdigest()


def sqlite_url(folder: str | Path) -> str:
    """The default database: ``labels.db`` in the project folder."""
    return f"sqlite:///{Path(folder).resolve() / 'labels.db'}"


def swapped(query_id: int, labeller_id: int) -> bool:
    """Whether this labeller sees the pair's second item on the left (half the queries, fixed per labeller and
    query, so that a position bias of the labeller does not become a preference for ``first``)."""
    return hashlib.sha256(f"{query_id}:{labeller_id}".encode()).digest()[0] & 1 == 1


def choice_label(choice: str, is_swapped: bool) -> float | None:
    """P(first ≻ second) for what the labeller clicked on the page; ``None`` for a skip ("can't tell")."""
    if choice not in CHOICES:
        raise StoreError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
    value = CHOICES[choice]
    return None if value is None else (1.0 - value if is_swapped else value)


@dataclass
class Leased:
    """A query handed to a labeller: what the page shows (sides already swapped where needed)."""

    query_id: int
    project: str
    kind: str
    payload: dict[str, Any]
    swapped: bool
    expires: float


class Store:
    """All database access of the app, the CLI and the tests; one instance per process (thread-safe)."""

    def __init__(self, url: str, *, lease_seconds: float = 600.0) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.url = url
        self.lease_seconds = float(lease_seconds)
        self.sqlite = url.startswith("sqlite")
        self.engine = _engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # tokens and projects never change once created: cache them (two fewer transactions per request)
        self._tokens: dict[str, tuple[int, str, bool]] = {}
        self._projects: dict[str, Project] = {}

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------------------------
    def _tx(self) -> Session:
        return self._session.begin()  # type: ignore[return-value]

    # -- labellers ---------------------------------------------------------------------------------------------
    def add_labeller(self, name: str, *, admin: bool = False, token: str | None = None) -> str:
        """Create a labeller (or the admin) and return its token; only the token's hash is stored."""
        _check_name("labeller name", name)
        token = token or secrets.token_urlsafe(32)
        if len(token) < 16:
            raise StoreError("a token must have at least 16 characters")
        try:
            with self._tx() as s:
                s.add(Labeller(name=name, token_hash=hash_token(token), admin=admin))
        except IntegrityError:
            raise StoreError(f"labeller {name!r} already exists (or the token is in use)", 409) from None
        return token

    def has_admin(self) -> bool:
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(Labeller).where(Labeller.admin)) > 0

    def authenticate(self, token: str | None) -> tuple[int, str, bool] | None:
        """``(labeller id, name, is_admin)`` for a valid token, else ``None``."""
        if not token:
            return None
        digest = hash_token(token)
        if digest in self._tokens:
            return self._tokens[digest]
        with self._session() as s:
            row = s.execute(
                select(Labeller.id, Labeller.name, Labeller.token_hash, Labeller.admin).where(
                    Labeller.token_hash == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        self._tokens[digest] = (int(row.id), str(row.name), bool(row.admin))
        return self._tokens[digest]

    # -- projects and queries ----------------------------------------------------------------------------------
    def create_project(self, name: str, kind: str, *, instructions: str = "", answers_per_query: int = 1) -> int:
        _check_name("project name", name)
        if kind not in KINDS:
            raise StoreError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if not 1 <= answers_per_query <= 20:
            raise StoreError(f"answers_per_query must be in [1, 20], got {answers_per_query}")
        with self._tx() as s:
            existing = s.scalar(select(Project).where(Project.name == name))
            if existing is not None:
                if existing.kind != kind:
                    raise StoreError(f"project {name!r} exists with kind {existing.kind!r}, not {kind!r}", 409)
                return int(existing.id)
            project = Project(name=name, kind=kind, instructions=instructions,
                              answers_per_query=answers_per_query, created=time.time())
            s.add(project)
            s.flush()
            return int(project.id)

    def project(self, name: str) -> Project:
        if name in self._projects:
            return self._projects[name]
        with self._session() as s:
            project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise StoreError(f"no project named {name!r}", 404)
        self._projects[name] = project
        return project

    def projects(self) -> list[Project]:
        with self._session() as s:
            return list(s.scalars(select(Project).order_by(Project.id)))

    def add_queries(self, project: str, items: Sequence[dict[str, Any]]) -> list[int]:
        """Enqueue queries ``{"external_id", "payload", "row"?, "reference_label"?}``; an ``external_id`` already
        in the project returns the existing query's id (pushing the same file twice enqueues nothing twice)."""
        proj = self.project(project)
        ids: list[int] = []
        with self._tx() as s:
            for n, item in enumerate(items):
                ext = str(item.get("external_id", ""))
                if not ext or len(ext) > 200:
                    raise StoreError(f"query {n}: external_id must be a non-empty string of ≤ 200 characters")
                ref = item.get("reference_label")
                if ref is not None and not 0.0 <= float(ref) <= 1.0:
                    raise StoreError(f"query {n}: reference_label must be in [0, 1], got {ref}")
                found = s.scalar(select(Query.id).where(Query.project_id == proj.id, Query.external_id == ext))
                if found is not None:
                    ids.append(int(found))
                    continue
                q = Query(project_id=proj.id, external_id=ext, payload=json.dumps(item["payload"]),
                          row=json.dumps(item.get("row", {})), reference_label=None if ref is None else float(ref))
                s.add(q)
                s.flush()
                ids.append(int(q.id))
        return ids

    def cancel(self, project: str, query_ids: Sequence[int]) -> int:
        """Withdraw unanswered queries from the queue (a run that stopped waiting); returns how many."""
        proj = self.project(project)
        with self._tx() as s:
            rows = list(s.scalars(select(Query).where(Query.project_id == proj.id, Query.id.in_(list(query_ids)))))
            for q in rows:
                q.cancelled = True
            return len(rows)

    # -- the labelling loop ------------------------------------------------------------------------------------
    def lease(self, project: str, labeller_id: int, *, now: float | None = None) -> Leased | None:
        """The next query this labeller should answer (the one it already holds, if any), or ``None``."""
        proj = self.project(project)
        now = time.time() if now is None else now
        with self._tx() as s:
            held = s.execute(
                select(Lease, Query).join(Query, Query.id == Lease.query_id).where(
                    Lease.labeller_id == labeller_id, Lease.expires > now, Query.project_id == proj.id,
                    ~Query.cancelled)
            ).first()
            if held is not None:
                lease, q = held
                lease.expires = now + self.lease_seconds
                return self._leased(proj, q, labeller_id, lease.expires)
            live = (select(func.count()).select_from(Lease)
                    .where(Lease.query_id == Query.id, Lease.expires > now).scalar_subquery())
            mine = select(Answer.id).where(Answer.query_id == Query.id, Answer.labeller_id == labeller_id).exists()
            skip: list[int] = []
            while True:
                # the plain num_answers test first: complete queries are passed over without the lease subquery
                stmt = (select(Query).where(Query.project_id == proj.id, Query.num_answers < proj.answers_per_query,
                                            ~Query.cancelled, Query.num_answers + live < proj.answers_per_query, ~mine,
                                            Query.id.not_in(skip))
                        .order_by(Query.id).limit(1))
                if self.sqlite:  # BEGIN IMMEDIATE: this transaction is the only writer, the count is current
                    q = s.scalar(stmt)
                    break
                # PostgreSQL: lock the row, skipping rows other transactions are leasing; the lock may come after
                # another lease was committed that this statement's snapshot did not see, so count again
                q = s.scalar(stmt.with_for_update(skip_locked=True, of=Query))
                if q is None or self._free_slots(s, q, proj, now) > 0:
                    break
                skip.append(q.id)
            if q is None:
                return None
            old = s.scalar(select(Lease).where(Lease.query_id == q.id, Lease.labeller_id == labeller_id))
            if old is not None:  # this labeller's own expired lease on the same query
                old.expires = now + self.lease_seconds
            else:
                s.add(Lease(query_id=q.id, labeller_id=labeller_id, expires=now + self.lease_seconds))
            return self._leased(proj, q, labeller_id, now + self.lease_seconds)

    @staticmethod
    def _free_slots(s: Session, q: Query, proj: Project, now: float, but: int | None = None) -> int:
        """Answers the query still needs beyond its answers and other labellers' live leases (fresh statements)."""
        leases = s.scalar(select(func.count()).select_from(Lease).where(
            Lease.query_id == q.id, Lease.expires > now, Lease.labeller_id != (but if but is not None else -1)))
        answers = s.scalar(select(func.count()).select_from(Answer).where(Answer.query_id == q.id))
        return proj.answers_per_query - int(answers) - int(leases)

    def _leased(self, proj: Project, q: Query, labeller_id: int, expires: float) -> Leased:
        payload = json.loads(q.payload)
        flip = swapped(q.id, labeller_id)
        if flip:
            payload["left"], payload["right"] = payload["right"], payload["left"]
        return Leased(int(q.id), proj.name, proj.kind, payload, flip, expires)

    def submit(
        self, labeller_id: int, submission_id: str, query_id: int, choice: str, comment: str = "",
        seconds: float | None = None,
    ) -> dict[str, Any]:
        """Store one answer (committed before returning); a repeated ``submission_id`` returns the stored one."""
        if not isinstance(submission_id, str) or not 8 <= len(submission_id) <= 64:
            raise StoreError("submission_id must be a string of 8 to 64 characters")
        if len(comment) > 2000:
            raise StoreError(f"comment must be at most 2000 characters, got {len(comment)}")
        label = choice_label(choice, swapped(query_id, labeller_id))
        for _attempt in range(2):  # a concurrent duplicate surfaces as an IntegrityError: read it back once
            stored = self._answer_by_submission(submission_id)
            if stored is not None:
                if stored["labeller_id"] != labeller_id or stored["query_id"] != query_id:
                    raise StoreError("submission_id was already used for another answer", 409)
                return {**stored, "duplicate": True}
            try:
                with self._tx() as s:
                    q = s.get(Query, query_id, with_for_update=not self.sqlite)
                    if q is None:
                        raise StoreError(f"no query with id {query_id}", 404)
                    if s.scalar(select(Answer.id).where(Answer.query_id == query_id,
                                                        Answer.labeller_id == labeller_id)) is not None:
                        raise StoreError(f"query {query_id} was already answered by this labeller", 409)
                    lease = s.scalar(select(Lease).where(Lease.query_id == query_id,
                                                         Lease.labeller_id == labeller_id))
                    now = time.time()
                    if (lease is None or lease.expires <= now) and self._free_slots(
                            s, q, self._project_by_id(s, q.project_id), now, but=labeller_id) <= 0:
                        # the lease ran out and the query went to someone else: one labeller at a time
                        raise StoreError(f"the lease on query {query_id} expired and the query was given to "
                                         f"another labeller; this answer was not stored", 409)
                    a = Answer(submission_id=submission_id, query_id=query_id, labeller_id=labeller_id,
                               choice=choice, label=label, comment=comment, seconds=seconds, created=time.time())
                    s.add(a)
                    q.num_answers = Query.num_answers + 1  # atomic increment in SQL
                    if lease is not None:
                        s.delete(lease)
                    s.flush()
                    out = _answer_dict(a)
                return {**out, "duplicate": False}
            except IntegrityError:
                continue
        raise StoreError("could not store the answer (conflicting concurrent submission)", 409)

    def _project_by_id(self, s: Session, project_id: int) -> Project:
        for p in self._projects.values():
            if p.id == project_id:
                return p
        project = s.get(Project, project_id)
        self._projects[project.name] = project
        return project

    def _answer_by_submission(self, submission_id: str) -> dict[str, Any] | None:
        with self._session() as s:
            a = s.scalar(select(Answer).where(Answer.submission_id == submission_id))
            return None if a is None else _answer_dict(a)

    # -- reading back ------------------------------------------------------------------------------------------
    def answers(self, project: str, query_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Every answer of the project (optionally of some queries), with the labeller's name and the query's
        external id, in the order they were stored."""
        proj = self.project(project)
        stmt = (select(Answer, Labeller.name, Query.external_id, Query.reference_label)
                .join(Labeller, Labeller.id == Answer.labeller_id).join(Query, Query.id == Answer.query_id)
                .where(Query.project_id == proj.id).order_by(Answer.id))
        if query_ids is not None:
            stmt = stmt.where(Answer.query_id.in_(list(query_ids)))
        with self._session() as s:
            return [{**_answer_dict(a), "labeller": name, "external_id": ext, "reference_label": ref}
                    for a, name, ext, ref in s.execute(stmt)]

    def queries(self, project: str) -> Iterator[tuple[int, str, dict[str, Any], dict[str, Any], float | None, int]]:
        """``(id, external_id, payload, row, reference_label, num_answers)`` per non-cancelled query."""
        proj = self.project(project)
        with self._session() as s:
            rows = s.execute(select(Query.id, Query.external_id, Query.payload, Query.row, Query.reference_label,
                                    Query.num_answers)
                             .where(Query.project_id == proj.id, ~Query.cancelled).order_by(Query.id)).all()
        for qid, ext, payload, row, ref, n in rows:
            yield int(qid), ext, json.loads(payload), json.loads(row), ref, int(n)

    def counts(self, project: str) -> dict[str, int]:
        """Queries in the project: total, complete (enough answers), pending, cancelled."""
        proj = self.project(project)
        with self._session() as s:
            total, done, cancelled = s.execute(
                select(func.count(),
                       func.coalesce(func.sum((Query.num_answers >= proj.answers_per_query).cast(Integer)), 0),
                       func.coalesce(func.sum(Query.cancelled.cast(Integer)), 0))
                .where(Query.project_id == proj.id)).one()
        return {"queries": int(total), "complete": int(done), "cancelled": int(cancelled),
                "pending": int(total) - int(done) - int(cancelled)}


def _answer_dict(a: Answer) -> dict[str, Any]:
    return {"answer_id": int(a.id), "submission_id": a.submission_id, "query_id": int(a.query_id),
            "labeller_id": int(a.labeller_id), "choice": a.choice, "label": a.label, "comment": a.comment,
            "seconds": a.seconds, "created": a.created}


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise StoreError(f"{what} must be 1-100 letters, digits, '-', '_' or '.', got {name!r}")


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30.0},
                               pool_size=8, max_overflow=16)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives power loss, not just a crash
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
