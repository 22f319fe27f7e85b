"""Durability and load of the labelling app: simulated labellers against a real ``mmalign label serve`` process.

Per database (SQLite in a temporary folder; PostgreSQL when ``--postgres URL`` is given, in a fresh database):

1. **load**: ``--labellers`` concurrent labellers (asyncio + httpx, one connection each) each answer
   ``--answers`` queries (GET next, POST answer); then the database must hold exactly one answer per query and every
   acknowledged submission, and the latencies of both calls are summarised (p50 / p95 / max).
2. **kill**: the same labellers work on a fresh project; after ``--kill-after`` acknowledged answers the server is
   killed with SIGKILL and restarted on the same database. Every client retries its in-flight submission with the
   same submission id until acknowledged, then continues until the queue is empty. Checked: every answer
   acknowledged before the kill is stored, every query is answered, no submission is stored twice, and every
   query unanswered at the kill was served again after the restart.

    python scripts/bench_label_load.py [--labellers 20] [--answers 500] [--postgres postgresql://u:p@host/db]
        [--out docs/benchmarks/labelling.md]

Clients and server share the machine; rate limits are raised for the run (the defaults would throttle a client that
answers faster than 20 requests per second).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from mmalign.label.store import Store, sqlite_url

ADMIN = "bench-admin-token-" + "a" * 24


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``mmalign label serve`` as a child process (so that SIGKILL hits a real server)."""

    def __init__(self, folder: Path, db_url: str, lease_seconds: float) -> None:
        self.folder, self.db_url, self.lease = folder, db_url, lease_seconds
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mmalign.cli", "label", "serve", "--output-dir",
               str(self.folder / f"run-{uuid.uuid4().hex[:6]}"), f"folder={self.folder}", f"db_url={self.db_url}",
               f"port={self.port}", f"lease_seconds={self.lease}", "rate_per_second=100000", "rate_burst=100000",
               "max_connections=1000"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "MMALIGN_LABEL_ADMIN_TOKEN": ADMIN},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/api/me", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start: " + (self.proc.stderr.read().decode() if self.proc.stderr else ""))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def _labeller(url: str, token: str, project: str, limit: int, state: dict[str, Any]) -> None:
    """Answer until ``limit`` answers or an empty queue; retries the same submission through a server outage."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        done = 0
        while done < limit:
            try:
                t0 = time.perf_counter()
                r = await client.get(f"/api/projects/{project}/next")
                r.raise_for_status()
                state["next_ms"].append(1000 * (time.perf_counter() - t0))
            except (httpx.TransportError, httpx.HTTPStatusError):
                await asyncio.sleep(0.2)  # server down (kill phase): try again
                continue
            q = r.json()["query"]
            if q is None:
                return
            fetched_after_restart = state["restarted"]
            if fetched_after_restart:
                state["served_after_restart"].add(q["query_id"])
            body = {"submission_id": uuid.uuid4().hex, "query_id": q["query_id"], "choice": "left"}
            while True:
                try:
                    t0 = time.perf_counter()
                    r = await client.post("/api/answers", json=body)
                    if r.status_code == 200:
                        state["submit_ms"].append(1000 * (time.perf_counter() - t0))
                        state["acked"].append((body["submission_id"], q["query_id"], fetched_after_restart))
                        break
                    if r.status_code == 409:  # the lease ran out and the query went to someone else
                        state["conflicts"] += 1
                        done -= 1
                        break
                    r.raise_for_status()
                except (httpx.TransportError, httpx.HTTPStatusError):
                    state["retries"] += 1
                    await asyncio.sleep(0.2)
            done += 1


def _fill(db_url: str, project: str, n: int, labellers: int) -> list[str]:
    store = Store(db_url)
    if store.authenticate(ADMIN) is None:
        store.add_labeller("admin", admin=True, token=ADMIN)
    store.create_project(project, "text")
    store.add_queries(project, [{"external_id": f"{project}-{i}", "payload": {
        "prompt": f"prompt {i}", "left": {"text": "a", "runs": [["a", True]]},
        "right": {"text": "b", "runs": [["b", True]]}}} for i in range(n)])
    tokens = [store.add_labeller(f"{project}-l{k}") for k in range(labellers)]
    store.close()
    return tokens


def _state() -> dict[str, Any]:
    return {"next_ms": [], "submit_ms": [], "acked": [], "retries": 0, "conflicts": 0, "restarted": False,
            "served_after_restart": set()}


def _check(db_url: str, project: str, state: dict[str, Any]) -> dict[str, Any]:
    store = Store(db_url)
    answers = store.answers(project)
    queries = [q[0] for q in store.queries(project)]
    store.close()
    subs = [a["submission_id"] for a in answers]
    stored = set(subs)
    per_query: dict[int, int] = {}
    for a in answers:
        per_query[a["query_id"]] = per_query.get(a["query_id"], 0) + 1
    return {"queries": len(queries), "answers": len(answers),
            "lost_acked": sum(1 for s, _, _ in state["acked"] if s not in stored),
            "duplicate_submissions": len(subs) - len(stored),
            "queries_unanswered": sum(1 for q in queries if q not in per_query),
            "queries_answered_twice": sum(1 for v in per_query.values() if v > 1)}


def run_engine(name: str, db_url: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    total = args.labellers * args.answers
    # 1. load
    tokens = _fill(db_url, "load", total, args.labellers)
    server = Server(folder, db_url, lease_seconds=args.lease)
    server.start()
    state = _state()

    async def load() -> None:
        await asyncio.gather(*(_labeller(server.url, t, "load", args.answers, state) for t in tokens))

    cpu0, t0 = server.cpu_seconds(), time.perf_counter()  # the server's start-up (imports) is not counted
    asyncio.run(load())
    wall = time.perf_counter() - t0
    cpu = server.cpu_seconds() - cpu0
    server.stop()
    load_out = {**_check(db_url, "load", state), "wall_s": wall, "conflicts": state["conflicts"],
                "server_cpu_ms_per_answer": 1000 * cpu / max(1, len(state["acked"])), "answers_per_s": len(state["acked"]) / wall,
                "next_p50": _pct(state["next_ms"], 50), "next_p95": _pct(state["next_ms"], 95),
                "submit_p50": _pct(state["submit_ms"], 50), "submit_p95": _pct(state["submit_ms"], 95),
                "submit_max": max(state["submit_ms"])}
    print(f"[{name}] load: {load_out}", flush=True)

    # 2. kill -9 mid-load and restart
    tokens = _fill(db_url, "kill", args.kill_queries, args.labellers)
    server = Server(folder, db_url, lease_seconds=args.lease)
    server.start()
    kstate = _state()

    async def killer() -> None:
        while len(kstate["acked"]) < args.kill_after:
            await asyncio.sleep(0.01)
        server.kill()
        kstate["acked_at_kill"] = list(kstate["acked"])
        store = Store(db_url)
        answered = {a["query_id"] for a in store.answers("kill")}
        kstate["unanswered_at_kill"] = {q[0] for q in store.queries("kill")} - answered
        store.close()
        kstate["restarted"] = True
        await asyncio.to_thread(server.start)

    async def kill_run() -> None:
        await asyncio.gather(killer(), *(_labeller(server.url, t, "kill", args.kill_queries, kstate)
                                         for t in tokens))

    asyncio.run(kill_run())
    server.stop()
    kill_out = _check(db_url, "kill", kstate)
    acked_before = {s for s, _, _ in kstate["acked_at_kill"]}
    store = Store(db_url)
    stored = {a["submission_id"] for a in store.answers("kill")}
    store.close()
    unanswered = kstate["unanswered_at_kill"]
    # in flight at the kill: fetched before it, stored after the restart by the client's retry (same submission id)
    retried = {qid for s, qid, fetched_after in kstate["acked"] if not fetched_after and s not in acked_before}
    kill_out.update({"acked_before_kill": len(acked_before), "lost_acked_before_kill": len(acked_before - stored),
                     "unanswered_at_kill": len(unanswered),
                     "unanswered_served_again": len(unanswered & kstate["served_after_restart"]),
                     "unanswered_stored_by_retry": len(unanswered & retried - kstate["served_after_restart"]),
                     "unanswered_neither": len(unanswered - kstate["served_after_restart"] - retried),
                     "client_retries": kstate["retries"], "conflicts": kstate["conflicts"]})
    print(f"[{name}] kill: {kill_out}", flush=True)
    return {"load": load_out, "kill": kill_out}


def _postgres_db(url: str) -> tuple[str, Any]:
    from sqlalchemy import create_engine, text

    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"mmalign_label_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url.rsplit("/", 1)[0] + "/" + name, drop


def _markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = ["| database | answers | lost | duplicated | unanswered | next p50 / p95 (ms) | submit p50 / p95 / max (ms) "
             "| answers/s | server CPU per answer (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        x = r["load"]
        lines.append(f"| {name} | {x['answers']} of {x['queries']} | {x['lost_acked']} | "
                     f"{x['duplicate_submissions']} + {x['queries_answered_twice']} | {x['queries_unanswered']} | "
                     f"{x['next_p50']:.1f} / {x['next_p95']:.1f} | {x['submit_p50']:.1f} / {x['submit_p95']:.1f} / "
                     f"{x['submit_max']:.0f} | {x['answers_per_s']:.0f} | {x['server_cpu_ms_per_answer']:.1f} |")
    lines += ["", "| database | acknowledged before SIGKILL | of those lost | unanswered at kill | served again "
              "after restart | stored by a retried in-flight submit | neither | final: answered / queries | "
              "duplicated | client retries |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        k = r["kill"]
        lines.append(f"| {name} | {k['acked_before_kill']} | {k['lost_acked_before_kill']} | {k['unanswered_at_kill']} "
                     f"| {k['unanswered_served_again']} | {k['unanswered_stored_by_retry']} | {k['unanswered_neither']} "
                     f"| {k['queries'] - k['queries_unanswered']} / {k['queries']} | "
                     f"{k['duplicate_submissions']} + {k['queries_answered_twice']} | {k['client_retries']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labellers", type=int, default=20)
    p.add_argument("--answers", type=int, default=500)
    p.add_argument("--kill-queries", type=int, default=3000)
    p.add_argument("--kill-after", type=int, default=1000)
    p.add_argument("--lease", type=float, default=60.0, help="lease seconds (longer than the worst latency, or "
                                                               "leases run out under load)")
    p.add_argument("--postgres", default=os.environ.get("MMALIGN_TEST_POSTGRES_URL", ""))
    p.add_argument("--out", default="")
    args = p.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite (WAL)"] = run_engine("sqlite", sqlite_url(Path(tmp) / "sqlite"), Path(tmp) / "sqlite", args)
        if args.postgres:
            url, drop = _postgres_db(args.postgres)
            try:
                results["PostgreSQL"] = run_engine("postgresql", url, Path(tmp) / "pg", args)
            finally:
                drop()
    command = "python " + " ".join(sys.argv)
    table = _markdown(results, args, command)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(table)
    print(f"\ncommand: {command}\nmachine: {machine}")
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
