"""The opt-out promise against an adversary: a removal ledger that outlives stores, content
fingerprints, stores out of use, and the opt-out log's smaller defects.

Real stores built with the tiny model on a corpus of this module (its own folder, so its
ledger `CORPUS/removals.log` is private), real logs, a real gRPC server on loopback.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_records
from faults import count_steps, run_killed
from silo.datastore.compact import compact
from silo.datastore.errors import StoreError
from silo.datastore.kinds import open_store
from silo.datastore.optout import (
    LOG_NAME,
    CorruptLog,
    OptOutLog,
    append_removal,
    checksum,
    new_record,
    read_log,
)
from silo.datastore.removal import remove
from silo.server.client import SiloClient
from test_server import TOKEN, start

from silo.app.cli import main as silo_main
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents, write_corpus

_WORDS = ["amber", "basalt", "cedar", "dune", "ember", "fjord", "glacier", "heron", "iris", "juniper", "kelp", "lagoon", "meadow", "nebula", "ochre", "prairie", "quartz", "reef", "sierra", "tundra", "umber", "valley", "willow", "xenon", "yarrow", "zephyr"]
HEADER = ("Copyright 2019 the Free Text Collective. This work may not be copied, reproduced or distributed "
          "without written permission of the publisher, except for brief quotations in reviews. All rights "
          "reserved under international conventions.")


def unique_prose(seed: int, n: int = 150) -> str:
    """Text whose 13-word runs occur nowhere else (numbered words), in sentences."""
    rng = random.Random(seed)
    words = [f"{rng.choice(_WORDS)}{rng.randint(0, 999)}" if i % 3 else rng.choice(_WORDS) for i in range(n)]
    return " ".join(" ".join(words[i:i + 10]).capitalize() + "." for i in range(0, n, 10))


ORIG = HEADER + "\n\n" + unique_prose(1)
FULLWIDTH = str.maketrans({c: chr(ord(c) + 0xFEE0) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"})
COPIES = {  # the removed text under other ids, owners and sources
    "copy-ws": "  ".join(ORIG.split()).replace(". ", ".\n\t"),
    "copy-case": ORIG.upper(),
    "copy-header": "Scanned from the 1998 printing; minor errors corrected by the volunteer.\n" + ORIG,
    "copy-fullwidth": ORIG.translate(FULLWIDTH),
}


def _doc(doc_id: str, text: str, owner: str, source: str) -> dict:
    return {"doc_id": doc_id, "text": text, "source": source, "license": "All rights reserved", "owner": owner}


def special_records() -> list[dict]:
    return ([_doc("orig", ORIG, "mallory", "secret-press"),
             _doc("header-only", HEADER + "\n\n" + unique_prose(2), "nina", "secret-press-2")]
            + [_doc(k, v, f"owner-x{i}", "mirror") for i, (k, v) in enumerate(COPIES.items())])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ledger") / "corpus"
    write_corpus(make_records(48) + special_records(), out, shard_bytes=20_000)
    return out


def _args(model, corpus, out, **kw) -> BuildArgs:
    return BuildArgs(**{"model": str(model), "corpus": str(corpus), "out": str(out), "tiers": ("restricted",),
                        "window": 64, "stride": 32, "progress": False, **kw})


@pytest.fixture
def fresh(tmp_path, corpus) -> Path:
    """A private copy of the corpus (its ledger is this test's alone)."""
    path = tmp_path / "corpus"
    shutil.copytree(corpus, path)
    return path


def _ids(store) -> set[str]:
    return {store.doc_id(d) for d in range(store.n_documents)}


def _live(store) -> set[str]:
    store.maybe_reload_optouts()
    return {store.doc_id(d) for d in np.flatnonzero(~store.dead_docs)}


# ---------------------------------------------------------------------------- a removal outlives its store


def test_a_rebuild_into_a_new_folder_honours_removals_and_refuses_copies(fresh, tmp_path, tiny_model):
    a = tmp_path / "a"
    build_store(_args(tiny_model, fresh, a))
    store = open_store(a)
    victim = sorted(_ids(store) - set(COPIES) - {"orig", "header-only"})[0]
    res = remove([store], "doc_ids", ["orig", victim], confirm_large=True)
    m = build_store(_args(tiny_model, fresh, tmp_path / "b"))  # blue-green: a new folder, same corpus
    rebuilt = open_store(tmp_path / "b")
    assert _ids(rebuilt) == _ids(store) - {"orig", victim} - set(COPIES)  # header-only kept, nothing else lost
    assert m.ledger == str(fresh.resolve() / "removals.log")
    refused = {r["doc_id"]: r for r in m.build["refused"]}
    assert set(refused) == {"orig", victim, *COPIES}
    for copy in COPIES:  # reported: the original's id and the receipt that removed it
        assert refused[copy]["original"] == "orig" and refused[copy]["receipt"] == res.receipt
        assert "orig" in refused[copy]["reason"] and res.receipt in refused[copy]["reason"]


def test_ingest_refuses_a_copy_under_a_new_id_and_reports_it(fresh, tmp_path, tiny_model, capsys):
    a = tmp_path / "a"
    build_store(_args(tiny_model, fresh, a))
    res = remove([open_store(a)], "doc_ids", ["orig"])
    new = tmp_path / "new"
    write_corpus([_doc("new-copy", "Reprinted without permission.\n" + ORIG.lower(), "bob", "elsewhere"),
                  _doc("new-header", HEADER + "\n" + unique_prose(3), "bob", "elsewhere")], new)
    silo_main(["datastore", "add", str(a), "--corpus", str(new), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["added_documents"] == 1 and [r["doc_id"] for r in rep["refused"]] == ["new-copy"]
    assert "orig" in rep["refused"][0]["reason"] and res.receipt in rep["refused"][0]["reason"]
    assert {"new-header"} <= _ids(open_store(a)) and "new-copy" not in _ids(open_store(a))


def test_a_local_optout_reaches_every_store_of_the_corpus(fresh, tmp_path, tiny_model):
    a, b = tmp_path / "a", tmp_path / "b"
    build_store(_args(tiny_model, fresh, a))
    build_store(_args(tiny_model, fresh, b, kind="passage", retrievers=("bm25",), passage_tokens=32))
    serving_b = open_store(b)  # another process's view of the second store
    victim = sorted(_ids(serving_b))[3]
    silo_main(["datastore", "optout", str(a), "--doc-id", victim])
    assert victim not in _live(serving_b) and victim not in _live(open_store(b))
    assert not (b / LOG_NAME).exists()  # nobody touched the second store's folder
    hits = serving_b.search_text([serving_b.doc_text(serving_b.doc_index(victim))[:200]], 20)[1]
    assert victim not in {serving_b.doc_id(int(d)) for d in serving_b.entries(hits)["doc"].ravel() if d >= 0}
    compact(b)  # compaction reads the ledger too
    assert open_store(b).is_compacted(open_store(b).doc_index(victim))


def test_a_store_whose_ledger_is_gone_is_refused_and_an_old_store_still_opens(fresh, tmp_path, tiny_model):
    a = tmp_path / "a"
    build_store(_args(tiny_model, fresh, a, kind="passage", retrievers=("bm25",), passage_tokens=32))
    ledger = fresh / "removals.log"
    ledger.rename(tmp_path / "moved.log")
    with pytest.raises(StoreError, match=rf"{ledger}.*cannot be read.*manifest.json"):
        open_store(a)
    raw = json.loads((a / "manifest.json").read_text())
    del raw["ledger"]  # a store built before ledgers: its own log is its record
    (a / "manifest.json").write_text(json.dumps(raw))
    append_removal(a, "doc_ids", ["orig"], ["orig"])
    assert "orig" not in _live(open_store(a))


def _kill_setup(fresh, tmp_path, tiny_model):
    a, b = tmp_path / "a", tmp_path / "b"
    build_store(_args(tiny_model, fresh, a, kind="passage", retrievers=("bm25",), passage_tokens=32))
    build_store(_args(tiny_model, fresh, b, kind="passage", retrievers=("bm25",), passage_tokens=32))
    return a, b


def test_an_optout_killed_at_every_step_loses_nothing_acknowledged(fresh, tmp_path, tiny_model):
    """kill -9 before every file-system step of `silo datastore optout` (ledger append, then
    the store's log): whatever was acknowledged is honoured by both stores of the corpus
    after the restart, a half-written record breaks nothing, and the removal can be re-issued."""
    a, b = _kill_setup(fresh, tmp_path, tiny_model)
    ledger = fresh / "removals.log"
    remove([open_store(a)], "doc_ids", ["header-only"])  # acknowledged before the kills
    pristine = {p: p.read_bytes() for p in (ledger, a / LOG_NAME)}
    argv = ["datastore", "optout", str(a), "--doc-id", "orig"]
    steps = count_steps("silo.app.cli:main", argv, tmp=tmp_path)
    assert steps >= 4  # ledger write + fsync, log write + fsync
    for n in range(1, steps + 1):
        for p, raw in pristine.items():
            p.write_bytes(raw)
        assert run_killed("silo.app.cli:main", argv, kill_at=n, tmp=tmp_path) is None
        sa, sb = open_store(a), open_store(b)  # nothing half-written stops a store from opening
        assert "header-only" not in _live(sa) | _live(sb), n
        assert ("orig" in _live(sa)) >= ("orig" in _live(sb)), n  # in the ledger first: every store honours it
        silo_main(argv)  # re-issued after the crash: the torn tails are cut, and it is acknowledged
        assert "orig" not in _live(open_store(a)) | _live(open_store(b)), n
        assert OptOutLog.at(ledger).check()["corrupt"] == [] and OptOutLog(a).check()["corrupt"] == []


# ---------------------------------------------------------------------------- stores out of use, stats


def test_an_optout_reaches_stores_out_of_use_or_is_refused(fresh, tmp_path, tiny_model):
    tok, psg = tmp_path / "tok", tmp_path / "psg"
    build_store(_args(tiny_model, fresh, tok))
    build_store(_args(tiny_model, fresh, psg, kind="passage", retrievers=("bm25",), passage_tokens=32))
    manifest = json.loads((psg / "manifest.json").read_text())
    (psg / "manifest.json").write_text(json.dumps({**manifest, "model_fingerprint": "0" * 32,  # another model's
                                                   "tokenizer_fingerprint": "0" * 32}))
    server, port, state = start(tiny_model, [tok, psg])
    client = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
    try:
        assert "passage" in state.store_errors
        assert "secret-press" in {s for st in client.stats().stores for s in st.sources}
        r = client.optout(owner="mallory", confirm_large=True)
        assert "orig" in r.removed_doc_ids
        assert r.receipt_id in (psg / LOG_NAME).read_text()  # logged in the store it cannot serve
        assert not {s for st in client.stats().stores for s in st.sources} & {"secret-press"}  # finding 4: Stats
        proof = client.optout_status(receipt_id=r.receipt_id)
        assert {p.store for p in proof.stores} == {"tok", "psg"} and proof.tombstoned
    finally:
        client.close()
        server.stop(0)
    (psg / "manifest.json").write_text(json.dumps(manifest))  # repaired: it serves again, without the document
    assert "orig" not in _live(open_store(psg)) and "orig" in _ids(open_store(psg))
    # a store whose log is corrupt cannot take a record: the removal is refused, nowhere logged
    with open(psg / LOG_NAME, "ab") as f:
        f.write(b'{"receipt": "torn\n')
    server, port, state = start(tiny_model, [tok, psg])
    client = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
    try:
        sizes = [(tok / LOG_NAME).stat().st_size, (fresh / "removals.log").stat().st_size]
        with pytest.raises(grpc.RpcError) as e:
            client.optout(doc_ids=["header-only"])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "store psg cannot record" in e.value.details() and "--repair" in e.value.details()
        assert sizes == [(tok / LOG_NAME).stat().st_size, (fresh / "removals.log").stat().st_size]
        proof = client.optout_status(receipt_id=r.receipt_id)
        assert not proof.tombstoned and any(p.store.startswith("psg") and not p.tombstoned for p in proof.stores)
    finally:
        client.close()
        server.stop(0)


# ---------------------------------------------------------------------------- the log's smaller defects


def test_a_short_write_is_never_acknowledged(tmp_path):
    """A file size limit cuts the record's write short: the append must fail, not return a receipt."""
    append_removal(tmp_path, "doc_ids", ["a"], ["a"])
    size = (tmp_path / LOG_NAME).stat().st_size
    code = (
        "import resource, sys\n"
        "from silo.datastore.optout import append_removal\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 40}, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    append_removal({str(tmp_path)!r}, 'doc_ids', ['b'], ['b'])\n"
        "except OSError as e:\n"
        "    print('refused', e); sys.exit(0)\n"
        "print('acknowledged'); sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and proc.stdout.startswith("refused"), proc.stdout + proc.stderr
    assert read_log(tmp_path).doc_ids == {"a"}  # the fragment is a torn tail, never a record
    append_removal(tmp_path, "doc_ids", ["c"], ["c"])
    assert read_log(tmp_path).doc_ids == {"a", "c"}


def test_a_record_without_its_checksum_is_corrupt(tmp_path):
    rec = append_removal(tmp_path, "doc_ids", ["a"], ["a"])
    flipped = json.dumps(rec).replace('"check"', '"chetk"', 1)  # one flipped byte in the key
    (tmp_path / LOG_NAME).write_text(flipped + "\n")
    with pytest.raises(CorruptLog, match="line 1 .*no checksum"):
        read_log(tmp_path)
    bare = {k: v for k, v in rec.items() if k != "check"}
    (tmp_path / LOG_NAME).write_text(json.dumps(bare) + "\n")
    with pytest.raises(CorruptLog, match="no checksum"):
        read_log(tmp_path)
    (tmp_path / LOG_NAME).write_text(json.dumps({**bare, "check": checksum(bare)}) + "\n")
    assert read_log(tmp_path).doc_ids == {"a"}


def test_a_torn_tail_keeps_searches_lock_free_and_a_later_append_is_seen(fresh, tmp_path, tiny_model):
    a = tmp_path / "a"
    build_store(_args(tiny_model, fresh, a, kind="passage", retrievers=("bm25",), passage_tokens=32))
    raw = json.loads((a / "manifest.json").read_text())
    (a / "manifest.json").write_text(json.dumps({**raw, "ledger": None}))  # the store's own log alone
    store, other = open_store(a), open_store(a)
    victim = sorted(_ids(store))[5]
    store.opt_out("doc_ids", ["orig"])
    hit = store.match_docs("doc_ids", [victim])
    probe = new_record("doc_ids", [victim], [victim], fingerprints=store.fingerprints(hit))  # the next record
    with open(a / LOG_NAME, "ab") as f:  # a crash mid-write, as long as the next record's line will be
        f.write(b"x" * (len(json.dumps(probe, ensure_ascii=True)) + 1))
    other.maybe_reload_optouts()  # reads the torn tail once
    with other._optout_lock:  # a search must not need the lock while nothing new is there
        t = threading.Thread(target=other.maybe_reload_optouts)
        t.start()
        t.join(2)
        blocked = t.is_alive()
    t.join()
    assert not blocked, "every search took the locked path because of a torn tail"
    store.opt_out("doc_ids", [victim])  # cuts the torn tail; the log must not return to a size already seen
    assert victim not in _live(other)


# ---------------------------------------------------------------------------- BM25 statistics


def _scores(store, queries: list[str]) -> list[dict]:
    scores, ids = store.search_text(queries, 10)
    ent = store.passages(ids)
    return [{(store.doc_id(int(d)), int(p)): float(s) for d, p, s in zip(ent["doc"][q], ent["position"][q], scores[q],
                                                                           strict=True) if d >= 0}
            for q in range(len(queries))]


def test_bm25_statistics_leave_out_removed_passages(fresh, tmp_path, tiny_model):
    """A tombstoned (then compacted) passage no longer shapes anyone's score: scores equal
    those of a store built without it."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(kind="passage", retrievers=("bm25",), passage_tokens=32)
    build_store(_args(tiny_model, fresh, a, **kw))
    build_store(_args(tiny_model, fresh, b, exclude_doc_ids=("orig", "doc-0004"), **kw))
    store = open_store(a)
    words = ORIG.split()
    queries = [" ".join(words[40:52]), " ".join(words[60:66]) + " Lisbon lighthouse", "Ada Lovelace Kyoto"]
    remove([store], "doc_ids", ["orig", "doc-0004"], confirm_large=True)
    want = _scores(open_store(b), queries)
    for got in (_scores(store, queries), _scores(open_store(a), queries)):
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            assert np.allclose([g[k] for k in w], [w[k] for k in w], rtol=1e-5), (g, w)
    compact(a)
    for g, w in zip(_scores(open_store(a), queries), want, strict=True):
        assert g.keys() == w.keys() and np.allclose([g[k] for k in w], [w[k] for k in w], rtol=1e-5)


def test_rewriting_a_corpus_keeps_its_removal_ledger(fresh, tmp_path, tiny_model):
    """A corpus written again in place (`silo corpus import --overwrite`, a harvest, traps
    planted) replaced its folder, and the ledger beside its shards went with it: every store
    of the corpus was then refused (LedgerMissing), and a rebuild served the removed
    documents again."""
    a = tmp_path / "a"
    build_store(_args(tiny_model, fresh, a))
    res = remove([open_store(a)], "doc_ids", ["orig"])
    write_corpus(list(iter_documents(fresh)), fresh, overwrite=True)
    assert res.receipt in (fresh / "removals.log").read_text()
    assert "orig" not in _live(open_store(a))
    build_store(_args(tiny_model, fresh, tmp_path / "b"))
    assert "orig" not in _ids(open_store(tmp_path / "b"))
