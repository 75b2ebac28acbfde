"""One index across shards, metadata off the heap, exact re-ranking, live ingest."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
from faults import count_steps, run_killed
from silo.datastore.errors import StoreLocked
from silo.datastore.index import choose_factory
from silo.datastore.lock import StoreLock
from silo.datastore.optout import append_removal
from silo.datastore.store import Datastore

from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents
from silo.ingest import add_documents

COMMON = dict(tiers=("restricted", "by"), window=64, stride=32, progress=False)


@pytest.fixture(scope="module")
def ivf_stores(tmp_path_factory, tiny_model, corpus_dir):
    """The same IVF-PQ store built in 1 and in 5 shards (kept keys: exact re-ranking)."""
    root = tmp_path_factory.mktemp("scale")
    for shards in (1, 5):
        build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(root / f"s{shards}"),
                              shards=shards, factory="IVF64,PQ8", keep_keys=True, **COMMON))
    return root


def _queries(store: Datastore, n: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.choice(store.n_entries, n, replace=False)
    return store.keys_of(ids).astype(np.float32) + rng.normal(0, 0.05, (n, store.manifest.dim)).astype(np.float32)


def _same_up_to_ties(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    (da, ia), (db, ib) = a, b
    np.testing.assert_array_equal(da, db)  # same distances, bit for bit
    for r in range(len(ia)):
        strict = da[r] < da[r][-1]  # ids strictly inside the k-th distance are the same set
        assert set(ia[r][strict]) == set(ib[r][strict])


def test_the_trained_index_does_not_depend_on_the_shard_count(ivf_stores):
    one, five = Datastore.open(ivf_stores / "s1"), Datastore.open(ivf_stores / "s5")
    assert len(five.shards) == 5 and five.manifest.index == one.manifest.index == "IVF64,PQ8"
    assert (ivf_stores / "s1" / "trained.faiss").read_bytes() == (ivf_stores / "s5" / "trained.faiss").read_bytes()
    assert five.group is not None and five.group.ntotal == five.n_entries  # one group index, every shard in it


@pytest.mark.parametrize("nprobe", [1, 4, 64])
def test_n_shards_answer_exactly_like_one(ivf_stores, nprobe):
    one, five = Datastore.open(ivf_stores / "s1"), Datastore.open(ivf_stores / "s5")
    q = _queries(one)
    _same_up_to_ties(one.search(q, 10, nprobe=nprobe), five.search(q, 10, nprobe=nprobe))
    from silo.datastore.policy import RetrievalPolicy

    policy = RetrievalPolicy(deny_sources=("news",))
    _same_up_to_ties(one.search(q, 10, nprobe=nprobe, policy=policy), five.search(q, 10, nprobe=nprobe, policy=policy))


def test_a_shard_server_scans_the_lists_it_is_given(ivf_stores):
    """What a remote shard server does: search only some shards with the main server's list
    assignment; the merged answers equal the whole store's."""
    whole = Datastore.open(ivf_stores / "s5")
    halves = [Datastore.open(ivf_stores / "s5", only_shards=s) for s in ({0, 1}, {2, 3, 4})]
    q = _queries(whole)
    from silo.datastore.index import assign, quantizer_of

    coarse, lists = assign(quantizer_of(whole.trained), q, 8)
    parts = [h.search_ex(q, 10, nprobe=8, assigned=(coarse, lists)) for h in halves]
    d = np.concatenate([p.distances for p in parts], 1)
    i = np.concatenate([p.ids for p in parts], 1)
    order = np.argsort(d, axis=1, kind="stable")[:, :10]
    _same_up_to_ties(whole.search(q, 10, nprobe=8), (np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)))


def test_entry_columns_are_narrow_memory_maps_and_text_is_read_on_demand(ivf_stores):
    store = Datastore.open(ivf_stores / "s5")
    s = store.shards[0]
    assert s.columns["value"].dtype == np.uint16  # a 512-token vocabulary
    assert {s.columns[c].dtype for c in ("doc", "position", "sentence")} == {np.dtype(np.int32)}
    # memory-mapped: plain ndarray views (cheaper to index than np.memmap) of the mapped files
    assert all(isinstance(c.base, np.memmap) and not c.flags.owndata for c in [*s.columns.values(), s.keys])
    assert s.keys.dtype == np.float16
    assert not any(isinstance(v, str) for v in vars(store.docs).values())  # no text held as Python strings
    row = store.doc_row(3)
    assert row["text"] and row["text"] == store.doc_text(3) and row["sentence_starts"][0] == 0


def test_exact_reranking_recovers_exact_neighbours(ivf_stores):
    store = Datastore.open(ivf_stores / "s5")
    q = _queries(store, 30)
    keys = store.keys_of(np.arange(store.n_entries)).astype(np.float32)
    exact = faiss.IndexFlatL2(keys.shape[1])
    exact.add(keys)
    de, ie = exact.search(q, 10)
    recall = {}
    for refine in (1, 4, 32):
        d, i = store.search(q, 10, nprobe=64, refine=refine)
        recall[refine] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, ie, strict=True)])
    assert recall[4] >= recall[1] and recall[32] >= 0.99, recall
    d, i = store.search(q, 10, nprobe=64, refine=32)
    np.testing.assert_allclose(d, de, rtol=1e-2, atol=1e-2)  # exact distances (from fp16 keys)
    no_keys = Datastore.open(ivf_stores / "s1")
    no_keys.shards[0].keys = None  # a store without kept keys silently searches un-refined
    np.testing.assert_array_equal(no_keys.search(q, 10, nprobe=64, refine=8)[1], no_keys.search(q, 10, nprobe=64)[1])


def test_a_big_store_gets_an_hnsw_coarse_quantizer(tmp_path, tiny_model, corpus_dir):
    assert choose_factory(10**9, 256).startswith("IVF131072_HNSW32,PQ")
    m = build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(tmp_path / "h"), shards=3,
                              factory="IVF32_HNSW8,PQ8", **COMMON))
    store = Datastore.open(tmp_path / "h")
    assert m.index == "IVF32_HNSW8,PQ8" and isinstance(faiss.downcast_index(store.trained.quantizer),
                                                        faiss.IndexHNSWFlat)
    d, i = store.search(np.random.default_rng(0).standard_normal((4, m.dim)).astype(np.float32), 5, nprobe=8)
    assert (i >= 0).all()


# ---------------------------------------------------------------------------- live ingest


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("ingest") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), shards=2,
                          factory="IVF16,PQ8", **{**COMMON, "tiers": ("restricted",)}))
    return out


def _new_docs(corpus_dir):
    """Documents the store (built on the train split) does not hold."""
    return [d for split in ("validation", "test") for d in iter_documents(corpus_dir, tiers=["restricted"], split=split)]


def test_ingest_adds_a_shard_with_the_stores_trained_index(base_store, tmp_path, corpus_dir, tiny_model):
    path = tmp_path / "store"
    shutil.copytree(base_store, path)
    before = Datastore.open(path)
    docs = _new_docs(corpus_dir)
    victim = docs[0]
    receipt = append_removal(path, "doc_ids", [victim["doc_id"]], [])["receipt"]  # opted out before it arrives
    existing = before.doc_row(0)
    rep = add_documents(path, [*docs, {**existing}, {**docs[1]}])
    refused = {r["doc_id"]: r["reason"] for r in rep["refused"]}
    # the refusal names the receipt of the removal that keeps the document out
    assert refused == {victim["doc_id"]: f"opted out (receipt {receipt})", existing["doc_id"]: "duplicate doc id",
                       docs[1]["doc_id"]: "duplicate doc id"}
    assert rep["added_documents"] == len(docs) - 1 and rep["shard"] == "00002"
    after = Datastore.open(path)
    assert len(after.shards) == 3 and after.n_documents == before.n_documents + len(docs) - 1
    assert after.manifest.entries == before.n_entries + rep["added_entries"] and after.manifest.ingests
    assert after.doc_index(victim["doc_id"]) is None and after.doc_index(docs[2]["doc_id"]) == before.n_documents + 1
    assert after.group.ntotal == after.n_entries
    # the new documents are retrievable: their own keys find their entries
    new = np.arange(before.n_entries, after.n_entries)
    q = after.search(np.zeros((1, after.manifest.dim), np.float32), 1)  # searching works across old and new
    assert q[1].shape == (1, 1)
    trained = faiss.read_index(str(path / "trained.faiss"))
    shard_index = faiss.read_index(str(path / "shards" / "00002" / "index.faiss"))
    assert faiss.extract_index_ivf(shard_index).nlist == faiss.extract_index_ivf(trained).nlist
    assert after.entry_docs(new).min() == before.n_documents
    # nothing new: a report, no shard
    again = add_documents(path, docs[2:4])
    assert again["added_documents"] == 0 and again["shard"] is None and len(again["refused"]) == 2


def test_ingest_is_refused_while_another_writer_holds_the_store(base_store, tmp_path, corpus_dir):
    path = tmp_path / "store"
    shutil.copytree(base_store, path)
    with StoreLock(path, "compaction"), pytest.raises(StoreLocked, match="compaction"):
        add_documents(path, _new_docs(corpus_dir)[:2])


def test_ingest_killed_at_every_step_leaves_the_store_before_or_after(base_store, tmp_path, corpus_dir):
    docs = _new_docs(corpus_dir)[:4]
    steps = count_steps("silo.ingest:add_documents", str(_copy(base_store, tmp_path / "count")), docs, tmp=tmp_path)
    before = Datastore.open(base_store)
    outcomes = set()
    for n in range(1, steps + 1):
        path = _copy(base_store, tmp_path / f"kill-{n}")
        assert run_killed("silo.ingest:add_documents", str(path), docs, kill_at=n, tmp=tmp_path) is None
        store = Datastore.open(path)  # whole, whatever the step: before, or after
        outcomes.add(store.n_documents - before.n_documents)
        assert store.n_documents in (before.n_documents, before.n_documents + len(docs)), n
        if n in (1, steps // 2, steps):  # the ingest can be repeated: before -> after, after -> all refused
            rep = add_documents(path, docs)
            final = Datastore.open(path)
            assert final.n_documents == before.n_documents + len(docs), n
            assert rep["added_documents"] in (0, len(docs))
            assert sorted(p.name for p in (path / "shards").iterdir()) == sorted(s.name for s in final.manifest.shards)
        shutil.rmtree(path)
    assert outcomes == {0, len(docs)}  # the kills landed before and after the switch


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst
