"""Replicated shard serving over plain gRPC: `silo serve --remote-shards a+b,c+d` in front of
four `silo serve-shards` processes (two groups of two replicas, one of each serving its
lists from SSD). Replicas are killed (SIGKILL) while several clients Score, Search and opt
out: no request fails while a replica of each group lives, no removed document is served,
and the answers are the single-process store's. Only a group with no replica left fails a
request, by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from silo.datastore.errors import StoreError
from silo.datastore.store import Datastore
from silo.server.client import SiloClient
from silo.server.remote import RemoteShardGroup, parse_remote_shards

from silo.build import BuildArgs, build_store
from silo.keys import text_keys
from silo.lm import load_causal_lm

SHARD_TOKEN = "replica-shard-token-0123456789abcdef"
ADMIN = "replica-admin-token-0123456789abcdef"
QUERIES = ["The lighthouse of Lisbon was built in", "def parse(self, text):", "Permission is hereby granted",
           "In 1717 the observatory", "return self.value", "The committee met on"]


def _launch(args: list[str], root: Path, name: str) -> tuple[subprocess.Popen, Path]:
    ready = root / f"{name}.port"
    proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", *args, "--port", "0", "--ready-file", str(ready)],
                            stdout=(root / f"{name}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, ready


def _wait(proc: subprocess.Popen, ready: Path) -> str:
    deadline = time.monotonic() + 180
    while not ready.is_file() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{ready.with_suffix('.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return f"127.0.0.1:{ready.read_text().strip()}"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def build_ivf_store(root: Path, tiny_model, corpus_dir) -> Path:
    """Two shards of 8-bit IVF-PQ (mappable from SSD), the store the replica tests serve."""
    common = dict(model=str(tiny_model), corpus=str(corpus_dir), tiers=("restricted",), window=128, stride=64,
                  progress=False)
    build_store(BuildArgs(out=str(root / "probe"), max_docs=2, **common))
    dim = Datastore.open(root / "probe").manifest.dim
    build_store(BuildArgs(out=str(root / "store"), shards=2, factory=f"IVF16,PQ{dim // 4}", **common))
    return root / "store"


class LoadResult:
    def __init__(self):
        self.errors: list[str] = []
        self.acked: list[tuple[float, str]] = []  # (time acknowledged, doc id)
        self.searches: list[tuple[float, list[str]]] = []  # (time the call started, doc ids served)
        self.scores = 0
        self.compacted: list[int] = []

    def check(self, to_remove: list[str]) -> None:
        """No call failed, every removal was acknowledged, and no removal acknowledged before
        a call began is in its answer."""
        assert not self.errors, self.errors[:5]
        assert len(self.acked) == len(to_remove) and self.scores > 0 and len(self.searches) > 20
        for started, served in self.searches:
            gone = {doc for at, doc in self.acked if at < started}
            assert not gone & set(served), gone & set(served)


def under_load(front: str, to_remove: list[str], disrupt, pace: float, compact_after: int | None = None) -> LoadResult:
    """Two clients searching, one scoring with kNN-LM and one opting `to_remove` out (one per
    `pace` seconds; a compaction after the `compact_after`-th) against `front`, while
    `disrupt()` runs; the opt-outs all finish before the load stops."""
    res, stop = LoadResult(), threading.Event()

    def searcher(seed: int):
        with SiloClient(front) as c:
            i = seed
            while not stop.is_set():
                t = time.monotonic()
                try:
                    res.searches.append((t, [h.doc_id for h in c.search(QUERIES[i % len(QUERIES)], k=8).hits]))
                except grpc.RpcError as e:
                    res.errors.append(f"Search: {e.code().name}: {e.details()}")
                i += 1

    def scorer():
        with SiloClient(front) as c:
            while not stop.is_set():
                try:
                    c.score("The lighthouse of Lisbon was built in 1700 by the committee.", mode="knn")
                    res.scores += 1
                except grpc.RpcError as e:
                    res.errors.append(f"Score: {e.code().name}: {e.details()}")

    def remover():
        with SiloClient(front, token=ADMIN) as c:
            for i, doc in enumerate(to_remove):
                time.sleep(pace)  # the whole list, however long the load makes each acknowledgement
                try:
                    c.optout(doc_ids=[doc], reason="replica test")
                    res.acked.append((time.monotonic(), doc))
                    if i == compact_after:  # one replica of each group rewrites, the other reopens
                        res.compacted.append(c.compact().removed_entries)
                except grpc.RpcError as e:
                    res.errors.append(f"OptOut/Compact: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=searcher, args=(s,)) for s in (0, 3)]
    threads += [threading.Thread(target=scorer), threading.Thread(target=remover)]
    for t in threads:
        t.start()
    try:
        disrupt()
    finally:
        threads[-1].join(300)  # the remover: every opt-out acknowledged before the load stops
        stop.set()
        for t in threads:
            t.join(120)
    return res


def assert_single_process_answers(front: str, store: Path, tiny_model) -> None:
    """The front's answers are those of the store opened in this process (which reads the
    same opt-out log): the same distances, the same entries below the k-th distance."""
    local = Datastore.open(store)
    model, tok = load_causal_lm(str(tiny_model))
    with SiloClient(front) as c:
        for query in QUERIES:
            hits = c.search(query, k=8).hits
            d, ids = local.search(text_keys(model, tok, [query]), 8)
            # the query key is computed in another process (float summation order aside)
            np.testing.assert_allclose([h.distance for h in hits], d[0][ids[0] >= 0], rtol=1e-5)
            below = d[0] < d[0][-1] * (1 - 1e-5)  # ties at the k-th distance may come in either order
            assert {h.entry_id for h, b in zip(hits, below, strict=True) if b} == set(ids[0][below].tolist())


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("replicas")
    store = build_ivf_store(root, tiny_model, corpus_dir)
    (root / "shard.token").write_text(SHARD_TOKEN + "\n")
    (root / "admin.token").write_text(ADMIN + "\n")
    procs: dict[str, subprocess.Popen] = {}
    readies = {}
    for group in (0, 1):
        for replica, lists in (("a", "ram"), ("b", "ssd")):
            name = f"{replica}{group}"
            procs[name], readies[name] = _launch(["serve-shards", str(store), "--shards", str(group), "--lists", lists,
                                                  "--shard-token-file", str(root / "shard.token")], root, name)
    targets = {name: _wait(procs[name], readies[name]) for name in procs}
    spec = f"{targets['a0']}+{targets['b0']},{targets['a1']}+{targets['b1']}"
    procs["front"], ready = _launch(["serve", "--model", str(tiny_model), "--store", str(store), "--remote-shards",
                                     spec, "--shard-token-file", str(root / "shard.token"), "--token-file",
                                     str(root / "admin.token"), "--shard-deadline", "5"], root, "front")
    front = _wait(procs["front"], ready)
    yield {"store": store, "front": front, "procs": procs, "targets": targets, "root": root}
    for p in procs.values():
        _kill(p)


def test_remote_shards_spec_names_groups_and_replicas():
    assert parse_remote_shards(["a:1+b:1,c:1+d:1"]) == [["a:1", "b:1"], ["c:1", "d:1"]]
    assert parse_remote_shards(["a:1", "c:1+d:1"]) == [["a:1"], ["c:1", "d:1"]]  # one group per flag works too
    for bad in ("a:1+a:1", "a:1++b:1"):
        with pytest.raises(ValueError, match="bad shard group"):
            parse_remote_shards([bad])


def test_replicas_of_one_group_must_hold_the_same_shards(replicated):
    t = replicated["targets"]
    fp = Datastore.open(replicated["store"], load_index=False).manifest.model_fingerprint
    with pytest.raises(StoreError, match="must serve the same shards"):
        RemoteShardGroup([t["a0"], t["a1"]], fp, 5.0, SHARD_TOKEN)


def test_killing_replicas_under_load_fails_no_request_and_serves_no_removed_text(replicated, tiny_model, capsys):
    store, front, procs = replicated["store"], replicated["front"], replicated["procs"]
    local = Datastore.open(store)
    to_remove = [local.docs.doc_id(d) for d in range(0, local.n_documents, max(1, local.n_documents // 6))][:6]

    def disrupt():
        time.sleep(1.0)
        os.killpg(procs["b0"].pid, signal.SIGSTOP)  # a replica stalls (late, not dead) …
        time.sleep(2.0)
        os.killpg(procs["b0"].pid, signal.SIGCONT)  # … and comes back
        time.sleep(1.5)
        _kill(procs["a0"])  # one replica of group 0 dies …
        time.sleep(1.5)
        _kill(procs["b1"])  # … and the other kind of replica (SSD lists) of group 1
        time.sleep(2.5)

    res = under_load(front, to_remove, disrupt, pace=0.6, compact_after=2)
    res.check(to_remove)
    assert res.compacted and res.compacted[0] > 0  # the removed entries left the index files, under load

    # a live ingest under replicas: the new shard is searched by the main server itself, at once
    new_text = ("Zorblat the quokka keeper of Vrelling catalogued nine hundred lanterns. "
                "Every lantern of Vrelling was painted ochre by the keeper's apprentice.")
    with SiloClient(front, token=ADMIN) as c:
        added = c.add_documents([{"doc_id": "ingest:zorblat", "text": new_text, "license": "MIT"}])
        assert added.added_documents == 1 and added.shard
        assert c.search("Zorblat the quokka keeper of Vrelling catalogued nine", k=1).hits[0].doc_id == "ingest:zorblat"
        assert c.optout(doc_ids=["ingest:zorblat"]).removed_entries == added.added_entries  # the same promise
        assert "ingest:zorblat" not in {h.doc_id for h in c.search("Zorblat the quokka keeper", k=16).hits}

    assert_single_process_answers(front, store, tiny_model)  # after the compaction and the ingest
    with SiloClient(front) as c:
        groups = c.stats().stores[0].shard_groups
    assert [g.healthy for g in groups] == [1, 1] and [g.replicas for g in groups] == [2, 2], list(groups[0].down)
    assert all(g.failovers >= 1 and g.requests > 0 and g.p50_ms > 0 for g in groups)
    assert replicated["targets"]["a0"] in groups[0].down[0] and replicated["targets"]["b1"] in groups[1].down[0]

    from test_cli_e2e import run

    code, out, _ = run(capsys, "stats", "--target", front)
    assert code == 0 and out.count("1/2 replicas healthy") == 2 and "down:" in out

    # the last replica of group 1 gone: its calls fail by name, or are listed as partial when allowed
    _kill(procs["a1"])
    with SiloClient(front) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.search(QUERIES[0], k=8)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "every replica" in e.value.details()
        assert replicated["targets"]["a1"] in e.value.details()
        r = c.search(QUERIES[0], k=8, allow_partial=True)
        assert r.partial and all(replicated["targets"]["a1"] in m for m in r.missing_shards)
        assert all(h.doc_id not in to_remove for h in r.hits)


def test_a_replica_answering_garbage_is_failed_over(replicated):
    """A replica whose answer does not match the request (a bug, a truncated reply) is
    treated as down: the call is answered by the other replica, exactly."""
    from silo.server.app import build_server
    from silo.server.auth import Auth
    from silo.server.remote import ShardSearchServicer

    class Truncating(ShardSearchServicer):
        def search(self, request):
            resp = super().search(request)
            if request.num_queries:
                resp.ids = resp.ids[:8]
            return resp

    store = replicated["store"]
    servers = [build_server({"ShardSearch": cls(store, {0})}, 0, auth=Auth(shard_token=SHARD_TOKEN))
               for cls in (Truncating, ShardSearchServicer)]
    fp = Datastore.open(store, load_index=False).manifest.model_fingerprint
    group = RemoteShardGroup([f"127.0.0.1:{p}" for _, p, _ in servers], fp, 5.0, SHARD_TOKEN, health_period_s=60)
    try:
        only = Datastore.open(store, only_shards={0})
        q = np.asarray(only.shards[0].keys if only.shards[0].keys is not None else
                       np.random.default_rng(0).standard_normal((4, only.manifest.dim)), dtype=np.float32)[:4]
        want = only.search_ex(q, 5, refine=1)
        for _ in range(2):  # whichever replica's turn it is
            d, ids = group.search(q, 5, None, None)
            np.testing.assert_array_equal(ids, want.ids)
        assert group.stats()["failovers"] >= 1 and "answered" in group.stats()["down"][0]
    finally:
        group.close()
        for s, _, _ in servers:
            s.stop(0)


def test_ray_flags_need_a_ray_address(tiny_model, capsys):
    from test_cli_e2e import run

    code, _, err = run(capsys, "serve", "--model", str(tiny_model), "--shard-group", "0-1")
    assert code != 0 and "--ray-address" in err
