"""The opt-out promise under faults: torn and corrupt logs, races, locks, kills at every step.

Once a removal is acknowledged, no search returns it again — after a crash mid-write,
while other threads search and opt out, while another process reads the same log, and
when a compaction or a build is killed at any point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faults import count_steps, run_killed
from silo.datastore.check import check_store
from silo.datastore.compact import compact
from silo.datastore.errors import StoreLocked
from silo.datastore.lock import StoreLock
from silo.datastore.optout import (
    LOG_NAME,
    CorruptLog,
    OptOutLog,
    Removals,
    append_removal,
    checksum,
    read_log,
)
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore, MaskCache

from silo.build import BuildArgs, build_store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("optout") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out),
                                tiers=("restricted", "by"), shards=2, window=64, stride=32, progress=False))
    return out


@pytest.fixture
def store_copy(tmp_path, store_dir) -> Path:
    path = tmp_path / "store"
    shutil.copytree(store_dir, path)
    return path


def _queries(store: Datastore, n: int = 24, seed: int = 0) -> np.ndarray:
    """Random queries: every search returns its k nearest entries, so documents come back."""
    return np.random.default_rng(seed).standard_normal((n, store.manifest.dim)).astype(np.float32)


def _docs_returned(store: Datastore, queries: np.ndarray, k: int = 20) -> set[str]:
    _, ids = store.search(queries, k)
    docs = store.entries(ids)["doc"].ravel()
    return {store.doc_id(int(d)) for d in docs if d >= 0}


# ---------------------------------------------------------------------------- the log itself


def test_records_carry_checksums_and_a_flipped_byte_is_caught(tmp_path):
    rec = append_removal(tmp_path, "doc_ids", ["a", "b"], ["a", "b"], reason="owner asked")
    assert rec["check"] == checksum(rec) and read_log(tmp_path).doc_ids == {"a", "b"}
    raw = (tmp_path / LOG_NAME).read_bytes()
    (tmp_path / LOG_NAME).write_bytes(raw.replace(b'"a"', b'"x"', 1))
    with pytest.raises(CorruptLog, match="line 1 .*checksum mismatch"):
        read_log(tmp_path)


def test_every_torn_tail_is_ignored_then_repaired_by_the_next_append(tmp_path):
    """A crash in the middle of a log write, at every byte of the record being written:
    earlier records all survive, and the next append never lands on the fragment."""
    for i in range(3):
        append_removal(tmp_path, "doc_ids", [f"doc-{i}"], [f"doc-{i}"])
    full = (tmp_path / LOG_NAME).read_bytes()
    last_start = full[:-1].rfind(b"\n") + 1
    for cut in range(last_start, len(full)):
        d = tmp_path / f"cut-{cut}"
        d.mkdir()
        (d / LOG_NAME).write_bytes(full[:cut])
        assert read_log(d).doc_ids == {"doc-0", "doc-1"}, cut  # the torn record was never acknowledged
        append_removal(d, "owner", ["owner-9"], [])
        rem = read_log(d)
        assert rem.doc_ids == {"doc-0", "doc-1"} and rem.owners == {"owner-9"}, cut
        assert (d / LOG_NAME).read_bytes().count(b"\n") == 3 and OptOutLog(d).check()["corrupt"] == []


def test_a_torn_multibyte_character_in_an_older_utf8_log_is_tolerated(tmp_path):
    legacy = {"receipt": "r1", "time": "2026-01-01T00:00:00Z", "by": "span", "values": ["café Zürich"],
              "doc_ids": []}
    legacy["check"] = checksum(legacy)  # records without a checksum are corrupt (test_ledger.py)
    line = (json.dumps(legacy, ensure_ascii=False) + "\n").encode("utf-8")
    torn = json.dumps({**legacy, "receipt": "r2", "values": ["naïve"]}, ensure_ascii=False).encode()
    cut = torn.index("ï".encode()) + 1  # in the middle of a two-byte character
    (tmp_path / LOG_NAME).write_bytes(line + torn[:cut])
    assert [s for _, s in read_log(tmp_path).spans] == ["café Zürich"]
    append_removal(tmp_path, "span", ["naïve text"], [])
    assert [s for _, s in read_log(tmp_path).spans] == ["café Zürich", "naïve text"]


def test_a_corrupt_line_stops_the_store_until_repaired(store_copy):
    append_removal(store_copy, "doc_ids", ["x1"], [])
    with open(store_copy / LOG_NAME, "ab") as f:
        f.write(b'{"receipt": "garbage\n')
    append_removal(store_copy, "owner", ["owner-3"], [])
    with pytest.raises(CorruptLog, match="line 2"):
        Datastore.open(store_copy)
    report = check_store(store_copy)
    assert not report["ok"] and report["log"]["corrupt"][0]["line"] == 2
    fixed = check_store(store_copy, repair=True)
    assert fixed["ok"] and (store_copy / "optout.quarantine").read_bytes().count(b"garbage") == 1
    store = Datastore.open(store_copy)  # the good records on both sides of the bad line are kept
    owners = np.array([store.doc_owner(d) for d in range(store.n_documents)])
    assert store.dead_docs[owners == "owner-3"].all() and read_log(store_copy).doc_ids >= {"x1"}


def test_scoped_removals_reach_only_their_owner():
    rem = Removals()
    rem.add({"receipt": "r", "time": "t", "by": "source", "values": ["news"], "doc_ids": [], "scope_owner": "ann"})
    rem.add({"receipt": "s", "time": "t", "by": "span", "values": ["secret"], "doc_ids": [], "scope_owner": "bob"})
    assert rem.matches({"doc_id": "1", "owner": "ann", "source": "news", "text": ""})
    assert not rem.matches({"doc_id": "2", "owner": "bob", "source": "news", "text": ""})
    assert rem.matches({"doc_id": "3", "owner": "bob", "source": "x", "text": "a secret"})
    assert not rem.matches({"doc_id": "4", "owner": "ann", "source": "x", "text": "a secret"})


# ---------------------------------------------------------------------------- tombstones in a process


def test_tombstones_only_grow_even_if_the_log_shrinks(store_copy):
    store = Datastore.open(store_copy)
    victims = [store.doc_id(0), store.doc_id(1)]
    store.opt_out("doc_ids", victims)
    (store_copy / LOG_NAME).write_bytes(b"")  # an operator's botched repair
    store.maybe_reload_optouts()
    assert store.dead_docs[[0, 1]].all()


def test_mask_cache_is_bounded_in_bytes(store_copy):
    store = Datastore.open(store_copy)
    store._masks = MaskCache(max_bytes=3 * (store.n_entries // 8 + 1))
    for i in range(40):  # 40 distinct policies, as a client could send
        store.allowed_bitmap(RetrievalPolicy(deny_sources=(f"src-{i}", "news")))
    assert len(store._masks) <= 3 and store._masks.nbytes <= store._masks.max_bytes


def test_no_acknowledged_removal_is_returned_by_any_later_search(store_copy):
    """Opt-outs and searches from many threads, and a second store object on the same
    folder (another process's view, reading the log): after an opt-out returns, no search
    that starts later returns the removed documents."""
    store, other = Datastore.open(store_copy), Datastore.open(store_copy)
    queries = _queries(store, 32)
    all_docs = [store.doc_id(d) for d in range(store.n_documents)]
    random.Random(0).shuffle(all_docs)
    acked: set[str] = set()
    acked_lock, errors, stop = threading.Lock(), [], threading.Event()

    def remover(docs: list[str]) -> None:
        for d in docs:
            store.opt_out("doc_ids", [d])
            with acked_lock:
                acked.add(d)

    def searcher(st: Datastore, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            with acked_lock:
                before = set(acked)
            got = _docs_returned(st, queries[rng.choice(len(queries), 4)], k=30)
            if got & before:
                errors.append(sorted(got & before))

    victims = all_docs[: len(all_docs) // 2]
    removers = [threading.Thread(target=remover, args=(victims[i::3],)) for i in range(3)]
    searchers = [threading.Thread(target=searcher, args=(st, i)) for i, st in enumerate([store] * 4 + [other] * 2)]
    for t in searchers + removers:
        t.start()
    for t in removers:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors[:3]
    assert acked == set(victims)
    for st in (store, other, Datastore.open(store_copy)):
        st.maybe_reload_optouts()
        assert not _docs_returned(st, queries, k=50) & acked


def test_a_search_waits_for_a_reload_that_has_read_but_not_yet_tombstoned(store_copy):
    """Another process's opt-out is in the log; one thread of this process has read it
    and is still tombstoning (held here by a slow `_tombstone`) when a second thread
    searches. That search must wait for the tombstones, not see "nothing new"."""
    store, other = Datastore.open(store_copy), Datastore.open(store_copy)
    queries = _queries(store, 32)
    victim = sorted(_docs_returned(other, queries, k=30))[0]
    store.opt_out("doc_ids", [victim])  # acknowledged: a later search must never return it
    reading, release = threading.Event(), threading.Event()
    tombstone = other._tombstone

    def slow_tombstone(records):
        reading.set()
        release.wait(10)
        tombstone(records)

    other._tombstone = slow_tombstone
    reloader = threading.Thread(target=other.maybe_reload_optouts)
    reloader.start()
    assert reading.wait(10)
    got: list[set[str]] = []
    searcher = threading.Thread(target=lambda: got.append(_docs_returned(other, queries, k=30)))
    searcher.start()
    searcher.join(0.5)
    release.set()
    reloader.join()
    searcher.join()
    assert victim not in got[0]


def test_a_failed_reload_reads_the_records_again(store_copy):
    store, other = Datastore.open(store_copy), Datastore.open(store_copy)
    victim = store.doc_id(0)
    store.opt_out("doc_ids", [victim])
    tombstone = other._tombstone

    def failing(records):
        raise MemoryError("simulated")

    other._tombstone = failing
    with pytest.raises(MemoryError):
        other.maybe_reload_optouts()
    other._tombstone = tombstone
    other.maybe_reload_optouts()
    assert other.dead_docs[0]


# ---------------------------------------------------------------------------- locks


def test_one_writer_at_a_time_and_a_dead_holders_lock_is_taken_over(store_copy):
    with StoreLock(store_copy, "compaction"), pytest.raises(StoreLocked, match="compaction"):
        compact(store_copy)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path[:0] = [sys.argv[1]]\n"
        "from silo.datastore.lock import StoreLock\n"
        "with StoreLock(sys.argv[2], 'build'):\n"
        "    print('locked', flush=True); time.sleep(600)"), str(Path(__file__).parents[1]), str(store_copy)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=rf"build \(pid {holder.pid}"):
            compact(store_copy)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        compact(store_copy)  # the system released the dead holder's lock
    finally:
        holder.kill()


# ---------------------------------------------------------------------------- kill -9 at every step


def _assert_store_whole_and_removals_honoured(path: Path, removed: set[str]) -> None:
    store = Datastore.open(path)  # every file the manifest names opens, counts match
    assert {store.doc_id(int(d)) for d in np.flatnonzero(store.dead_docs)} >= removed
    assert not _docs_returned(store, _queries(store, 24), k=40) & removed


def test_compaction_killed_at_every_step_loses_nothing(store_copy, tmp_path):
    store = Datastore.open(store_copy)
    victims = {store.doc_id(d) for d in (0, 3, store.n_documents - 1)}
    store.opt_out("doc_ids", sorted(victims))
    pristine = tmp_path / "pristine"
    shutil.copytree(store_copy, pristine)
    steps = count_steps("silo.datastore.compact:compact", str(store_copy), tmp=tmp_path)
    assert steps > 5
    for n in range(1, steps + 1):
        path = tmp_path / f"kill-{n}"
        shutil.copytree(pristine, path)
        assert run_killed("silo.datastore.compact:compact", str(path), kill_at=n, tmp=tmp_path) is None
        _assert_store_whole_and_removals_honoured(path, victims)
        compact(path)  # a later compaction finishes the job and sweeps what the killed one left
        st = Datastore.open(path)
        dead = np.isin(st.entry_docs(np.arange(st.n_entries)), np.flatnonzero(st.dead_docs))
        assert (st.values(np.flatnonzero(dead)) == -1).all(), n  # physically gone
        assert sorted(p.name for p in (path / "shards").iterdir()) == sorted(s.name for s in st.manifest.shards)
        shutil.rmtree(path)


def test_build_killed_at_every_step_resumes_to_the_same_store(tmp_path, tiny_model, corpus_dir, store_dir):
    args = dict(model=str(tiny_model), corpus=str(corpus_dir), tiers=("restricted", "by"), shards=2, window=64,
                stride=32, progress=False)
    steps = count_steps("faults:build", {**args, "out": str(tmp_path / "count")}, tmp=tmp_path)
    rng = random.Random(0)
    quarter = max(1, steps // 4)  # one kill point drawn in each quarter: planning, training, shards, manifest
    for n in sorted({min(steps, q + rng.randrange(quarter)) for q in range(1, steps + 1, quarter)}):
        out = tmp_path / f"kill-{n}"
        assert run_killed("faults:build", {**args, "out": str(out)}, kill_at=n, tmp=tmp_path) is None
        if (out / "manifest.json").exists():  # killed after the switch: finished, whole
            Datastore.open(out)
        else:
            build_store(BuildArgs(**{**args, "out": str(out)}))  # resumes
        for s in ("00000", "00001"):
            assert (out / "shards" / s / "index.faiss").read_bytes() == \
                (store_dir / "shards" / s / "index.faiss").read_bytes(), (n, s)
        shutil.rmtree(out)


@pytest.mark.slow
def test_server_killed_during_a_loop_of_optouts_honours_every_acknowledged_one(store_copy, tmp_path, tiny_model):
    from test_server import _serve

    acked: list[str] = []
    docs = [Datastore.open(store_copy, load_index=False).doc_id(d) for d in range(40)]
    rng = random.Random(1)
    for _ in range(3):
        proc, client = _serve(tmp_path, tiny_model, store_copy)
        todo = [d for d in docs if d not in acked]

        def loop(client=client, todo=todo):
            for d in todo:
                try:
                    client.optout(doc_ids=[d], confirm_large=True)
                except Exception:  # noqa: BLE001 - the server was killed mid-call: not acknowledged
                    return
                acked.append(d)

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t.join()
        client.close()
        _assert_store_whole_and_removals_honoured(store_copy, set(acked))
    assert acked, "no opt-out was acknowledged before the kills"
    proc, client = _serve(tmp_path, tiny_model, store_copy)
    try:
        for d in acked:
            assert client.optout_status(doc_id=d).tombstoned
    finally:
        proc.kill()
        proc.wait()
