"""The labelling database on SQLite and PostgreSQL: leases, idempotent submits, crash safety, overlap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the labelling app needs: pip install 'mmalign[label]'")

from mmalign.label.store import Store, StoreError, choice_label, swapped  # noqa: E402


def _store(db_url: str, n: int = 3, per_query: int = 1, lease: float = 60.0) -> Store:
    store = Store(db_url, lease_seconds=lease)
    store.create_project("p", "text", answers_per_query=per_query)
    store.add_queries("p", [{"external_id": f"q{i}", "payload": {"left": {"text": f"a{i}"},
                                                               "right": {"text": f"b{i}"}}} for i in range(n)])
    return store


def test_choice_labels_follow_the_teacher_convention() -> None:
    assert [choice_label(c, False) for c in ("left", "right", "equal", "skip")] == [1.0, 0.0, 0.5, None]
    assert [choice_label(c, True) for c in ("left", "right", "equal", "skip")] == [0.0, 1.0, 0.5, None]
    with pytest.raises(StoreError, match="choice must be one of"):
        choice_label("maybe", False)


def test_lease_submit_and_every_query_once(db_url: str) -> None:
    store = _store(db_url)
    alice = store.authenticate(store.add_labeller("alice"))
    assert alice is not None
    seen = []
    while (leased := store.lease("p", alice[0])) is not None:
        # the page shows the second item on the left when the query is swapped for this labeller
        assert leased.payload["left"]["text"][0] == ("b" if leased.swapped else "a")
        seen.append(leased.query_id)
        out = store.submit(alice[0], f"sub-{leased.query_id:04d}", leased.query_id, "left")
        assert out["label"] == (0.0 if leased.swapped else 1.0) and not out["duplicate"]
    assert len(seen) == 3 == len(set(seen))
    assert store.counts("p") == {"queries": 3, "complete": 3, "cancelled": 0, "pending": 0}
    store.close()


def test_retried_submission_is_stored_once_and_reuse_is_refused(db_url: str) -> None:
    store = _store(db_url)
    lid = store.authenticate(store.add_labeller("alice"))[0]  # type: ignore[index]
    q = store.lease("p", lid)
    first = store.submit(lid, "same-submission", q.query_id, "equal", "hmm")
    again = store.submit(lid, "same-submission", q.query_id, "equal", "hmm")
    assert again["duplicate"] and again["answer_id"] == first["answer_id"]
    assert len(store.answers("p")) == 1
    with pytest.raises(StoreError, match="already answered"):
        store.submit(lid, "other-submission", q.query_id, "left")
    bob = store.authenticate(store.add_labeller("bob"))[0]  # type: ignore[index]
    with pytest.raises(StoreError, match="another answer"):
        store.submit(bob, "same-submission", q.query_id, "left")
    assert len(store.answers("p")) == 1
    store.close()


def test_expired_lease_goes_back_to_the_queue(db_url: str) -> None:
    store = _store(db_url, n=1, lease=10.0)
    a = store.authenticate(store.add_labeller("alice"))[0]  # type: ignore[index]
    b = store.authenticate(store.add_labeller("bob"))[0]  # type: ignore[index]
    t = 1_000_000.0
    qa = store.lease("p", a, now=t)
    assert qa is not None and store.lease("p", b, now=t + 5) is None  # held by alice
    assert store.lease("p", a, now=t + 5).query_id == qa.query_id  # alice gets the same one back
    qb = store.lease("p", b, now=t + 16)  # alice's lease (renewed at t+5) expired at t+15
    assert qb is not None and qb.query_id == qa.query_id
    store.close()


def test_answer_after_an_expired_lease_is_refused_only_when_the_query_moved_on(db_url: str) -> None:
    store = _store(db_url, n=2, lease=10.0)
    a = store.authenticate(store.add_labeller("alice"))[0]  # type: ignore[index]
    b = store.authenticate(store.add_labeller("bob"))[0]  # type: ignore[index]
    t = time.time()
    qa = store.lease("p", a, now=t - 100)  # alice's lease expired long ago
    assert store.lease("p", b).query_id == qa.query_id  # so bob gets the same query
    with pytest.raises(StoreError, match="expired"):
        store.submit(a, "alice-0000001", qa.query_id, "left")
    store.submit(b, "bob-00000001", qa.query_id, "left")
    qa2 = store.lease("p", a, now=t - 50)  # expired, but nobody else took it: the answer is welcome
    store.submit(a, "alice-0000002", qa2.query_id, "right")
    assert sorted((x["labeller"], x["query_id"]) for x in store.answers("p")) == [
        ("alice", qa2.query_id), ("bob", qa.query_id)]
    store.close()


def test_overlap_gives_each_query_to_several_labellers_once(db_url: str) -> None:
    store = _store(db_url, n=2, per_query=2)
    ids = [store.authenticate(store.add_labeller(n))[0] for n in ("a", "b", "c")]  # type: ignore[index]
    answered = {i: [] for i in ids}
    for lid in ids * 3:
        q = store.lease("p", lid)
        if q is not None:
            store.submit(lid, f"sub-{lid:03d}-{q.query_id:04d}", q.query_id, "right")
            answered[lid].append(q.query_id)
    per_query = {}
    for row in store.answers("p"):
        per_query.setdefault(row["query_id"], []).append(row["labeller"])
    assert sorted(len(v) for v in per_query.values()) == [2, 2]
    assert all(len(set(v)) == len(v) for v in per_query.values())
    store.close()


def test_cancelled_queries_are_not_served(db_url: str) -> None:
    store = _store(db_url, n=2)
    lid = store.authenticate(store.add_labeller("alice"))[0]  # type: ignore[index]
    ids = [q[0] for q in store.queries("p")]
    assert store.cancel("p", ids[:1]) == 1
    assert store.lease("p", lid).query_id == ids[1]
    store.close()


def test_tokens_are_stored_hashed_and_checked(db_url: str) -> None:
    store = Store(db_url)
    token = store.add_labeller("root", admin=True)
    assert store.authenticate(token)[1:] == ("root", True)  # type: ignore[index]
    assert store.authenticate(token + "x") is None and store.authenticate("") is None
    from sqlalchemy import text

    with store.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(text("SELECT token_hash FROM labellers"))]
    assert token not in stored and len(stored[0]) == 64
    store.close()


def test_bad_input_is_refused_before_anything_is_written(db_url: str) -> None:
    store = Store(db_url)
    with pytest.raises(StoreError, match="kind must be one of"):
        store.create_project("p", "audio")
    with pytest.raises(StoreError, match="project name"):
        store.create_project("../p", "text")
    store.create_project("p", "text")
    with pytest.raises(StoreError, match="reference_label"):
        store.add_queries("p", [{"external_id": "ok", "payload": {}}, {"external_id": "x", "payload": {},
                                                                      "reference_label": 2}])
    assert list(store.queries("p")) == []  # the whole batch was rolled back
    with pytest.raises(StoreError, match="no project"):
        store.lease("nope", 1)
    store.close()


def test_killed_process_loses_no_acknowledged_answer(db_url: str, tmp_path: Path) -> None:
    """A child answers queries, prints each acknowledged id and dies by SIGKILL (no exit handlers, no flush) after
    the 15th; everything printed must be stored and the rest served again. Kills at arbitrary moments under load
    are measured by scripts/bench_label_load.py."""
    store = _store(db_url, n=40)
    token = store.add_labeller("alice")
    store.close()
    code = textwrap.dedent(f"""
        import os, signal, sys
        from mmalign.label.store import Store
        s = Store({db_url!r})
        lid = s.authenticate({token!r})[0]
        n = 0
        while (q := s.lease("p", lid)) is not None:
            s.submit(lid, f"sub-{{q.query_id:06d}}", q.query_id, "left")
            print(q.query_id, flush=True)
            n += 1
            if n == 15:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    acked = {int(x) for x in proc.stdout.split()}
    assert len(acked) == 15
    store = Store(db_url, lease_seconds=60.0)
    stored = {a["query_id"] for a in store.answers("p")}
    assert acked <= stored
    # the rest is served again to another labeller (alice holds no live lease: she answered her last one)
    bob = store.authenticate(store.add_labeller("bob"))[0]  # type: ignore[index]
    served = set()
    while (q := store.lease("p", bob)) is not None:
        served.add(q.query_id)
        store.submit(bob, f"bob-{q.query_id:06d}", q.query_id, "skip")
    assert served == {q[0] for q in store.queries("p")} - stored
    store.close()


def test_swapped_is_about_half_and_fixed() -> None:
    flips = [swapped(q, 7) for q in range(400)]
    assert 150 < sum(flips) < 250 and flips == [swapped(q, 7) for q in range(400)]


def test_concurrent_labellers_never_share_a_query(db_url: str) -> None:
    """Eight threads lease and answer at once: every query is answered exactly once (on PostgreSQL this needs the
    count after the row lock; on SQLite BEGIN IMMEDIATE serialises the transactions)."""
    import threading

    store = _store(db_url, n=48)
    ids = [store.authenticate(store.add_labeller(f"l{k}"))[0] for k in range(8)]  # type: ignore[index]
    errors: list[BaseException] = []

    def work(lid: int) -> None:
        try:
            while (q := store.lease("p", lid)) is not None:
                store.submit(lid, f"sub-{lid:03d}-{q.query_id:05d}", q.query_id, "left")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(lid,)) for lid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    answered = [a["query_id"] for a in store.answers("p")]
    assert sorted(answered) == sorted(q[0] for q in store.queries("p"))  # each once, none missing
    store.close()
