"""Fast kNN-LM: fast-scan PQ stores, re-indexing from kept keys, pointer reuse and adaptive
retrieval — each exact in attribution and true to the opt-out promise."""

from __future__ import annotations

import numpy as np
import pytest
from silo.datastore import index as ix
from silo.datastore.compact import compact
from silo.datastore.manifest import StoreError
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.reindex import reindex
from silo.datastore.store import Datastore

from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents
from silo.eval_modes import EvalArgs, run_eval, sweep_knn
from silo.ingest import add_documents
from silo.knnlm import KNNParams, generate, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.retomaton import REUSED, SEARCHED, SKIPPED, advance
from silo.tokenizer import encode_document

WINDOW = 128


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_causal_lm(tiny_model)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir, lm):
    """An exact store with kept keys, and the same entries under a fast-scan IVF index."""
    root = tmp_path_factory.mktemp("fast")
    common = dict(model=str(tiny_model), corpus=str(corpus_dir), tiers=("restricted",), window=WINDOW,
                  stride=WINDOW // 2, keep_keys=True, progress=False)
    build_store(BuildArgs(out=str(root / "flat"), **common))
    dim = Datastore.open(root / "flat").manifest.dim
    build_store(BuildArgs(out=str(root / "fs"), factory=f"IVF16,PQ{dim}x4fs", shards=2, **common))
    return root / "flat", root / "fs"


def _train_docs(corpus_dir, tok, n: int = 4) -> list[list[int]]:
    docs = list(iter_documents(corpus_dir, tiers=["restricted"], split="train"))[:n]
    return [encode_document(tok, d["text"])[:WINDOW] for d in docs]


def _queries(store: Datastore, n: int = 40) -> np.ndarray:
    keys = np.asarray(store.shards[0].keys, dtype=np.float32)
    rng = np.random.default_rng(0)
    return keys[rng.choice(len(keys), n, replace=False)] + rng.normal(0, 0.05, (n, keys.shape[1])).astype(np.float32)


# ---------------------------------------------------------------------------- fast-scan


def test_the_build_chooses_fast_scan_when_keys_are_kept():
    assert ix.choose_factory(1_000_000, 64, rerank=True) == "IVF4096,PQ64x4fs"
    assert ix.choose_factory(1_000_000, 64) == "IVF4096,PQ32"  # no keys: 8-bit PQ, never re-ranked
    assert ix.choose_factory(500, 64, rerank=True) == "Flat"
    assert ix.choose_factory(20_000_000, 768, memory_budget=20_000_000 * 40, rerank=True).endswith("x4fs")
    assert ix.default_refine("IVF4096,PQ64x4fs") == ix.FAST_SCAN_REFINE > 1 and ix.default_refine("IVF4096,PQ32") == 1


def test_fast_scan_store_is_reranked_from_its_keys(stores):
    """4-bit codes rank coarsely; the store's default re-ranking makes its distances exact,
    and deep enough re-ranking finds the exact neighbours (this templated corpus has many
    near-ties, so the k-th distance is compared, not the ids)."""
    flat, fs = Datastore.open(stores[0]), Datastore.open(stores[1])
    assert fs.manifest.index.endswith("x4fs") and fs.refine_for(None) == ix.FAST_SCAN_REFINE
    q = _queries(flat)
    de, _ = flat.search(q, 10)
    d1, _ = fs.search(q, 10, nprobe=16, refine=1)
    d, i = fs.search(q, 10, nprobe=16)  # the store's default: re-ranked from the keys
    np.testing.assert_allclose(d, fs.distances_to(q, i), rtol=1e-3)  # summation order aside
    assert not np.allclose(d1, fs.distances_to(q, fs.search(q, 10, nprobe=16, refine=1)[1]), rtol=1e-3)
    d8, _ = fs.search(q, 10, nprobe=16, refine=8)
    assert np.median(d8[:, -1] / de[:, -1]) <= 1.02 and (d8[:, -1] <= d[:, -1] * (1 + 1e-5)).all()


def test_fast_scan_honours_opt_outs_policies_compaction_and_ingest(stores, tmp_path, tiny_model, lm):
    import shutil

    path = tmp_path / "fs"
    shutil.copytree(stores[1], path)
    store = Datastore.open(path)
    q = _queries(store)
    _, before = store.search(q, 10, nprobe=16)
    victim = int(np.bincount(store.entries(before[before >= 0], ("doc",))["doc"]).argmax())
    owner = store.doc_row(victim)["owner"]
    policy = RetrievalPolicy(deny_owners=(owner,)) if owner else None
    if policy is not None:
        _, ids = store.search(q, 10, nprobe=16, policy=policy)
        assert owner not in {store.doc_owner(int(d)) for d in store.entries(ids[ids >= 0], ("doc",))["doc"]}
    store.opt_out("doc_ids", [store.doc_id(victim)])
    _, ids = store.search(q, 10, nprobe=16)
    assert victim not in set(store.entries(ids[ids >= 0], ("doc",))["doc"].tolist())
    assert (ids >= 0).all()  # the selector works on fast-scan lists: k found without the victim
    report = compact(path)
    assert report["removed_entries"] > 0
    store = Datastore.open(path)
    _, ids = store.search(q, 10, nprobe=16)
    assert victim not in set(store.entries(ids[ids >= 0], ("doc",))["doc"].tolist())
    text = "The lighthouse of Lisbon was built in 1700 by Ada Lovelace. " * 4
    add_documents(path, [{"doc_id": "new:1", "text": text, "source": "test", "license": "CC-BY-4.0",
                          "tier": "restricted", "owner": None, "sentence_starts": [0]}], model=lm[0], tok=lm[1])
    store = Datastore.open(path)
    assert store.manifest.index.endswith("x4fs")
    new = store.doc_index("new:1")
    first = int(store.docs.first_entry[new])
    key = np.asarray(store.keys_of(np.array([[first + 5]]))[0], dtype=np.float32)
    d, ids = store.search(key, 10, nprobe=16)
    assert first + 5 in ids[0] or d[0, -1] == 0  # found (or only exact ties outrank it)


def test_reindex_keeps_every_entry_and_changes_only_the_index(stores, tmp_path):
    flat = Datastore.open(stores[0])
    out = tmp_path / "re"
    m = reindex(stores[0], out, "IVF16,Flat")
    store = Datastore.open(out)
    assert m.index == store.manifest.index == "IVF16,Flat" and store.n_entries == flat.n_entries
    ids = np.arange(flat.n_entries)
    np.testing.assert_array_equal(store.values(ids), flat.values(ids))
    q = _queries(flat)
    de, _ = flat.search(q, 10)
    d, _ = store.search(q, 10, nprobe=16)  # every list: exact, as the flat index is
    np.testing.assert_allclose(d, de, rtol=1e-2)  # the kept keys are the fp16 rounding of the built ones
    # the copy reads the corpus's removal ledger: an opt-out made through it reaches the source too
    store.opt_out("doc_ids", [store.doc_id(0)])
    assert Datastore.open(stores[0]).dead_docs[0]
    with pytest.raises(StoreError, match="new folder"):
        reindex(stores[0], out, "Flat")


def test_reindex_refuses_a_store_without_keys(tmp_path, tiny_model, corpus_dir):
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(tmp_path / "nokeys"),
                          tiers=("restricted",), window=WINDOW, stride=WINDOW // 2, max_docs=3, progress=False))
    with pytest.raises(StoreError, match="--keep-keys"):
        reindex(tmp_path / "nokeys", tmp_path / "out", "Flat")


# ---------------------------------------------------------------------------- pointer reuse


def test_pointers_advance_within_documents_and_never_into_removed_entries(stores, tmp_path):
    import shutil

    path = tmp_path / "flat"
    shutil.copytree(stores[0], path)
    store = Datastore.open(path)
    d0, d1 = 0, 1
    last0 = int(store.docs.first_entry[d0] + store.entries_per_doc[d0] - 1)
    mid0 = int(store.docs.first_entry[d0]) + 3
    mid1 = int(store.docs.first_entry[d1]) + 3
    ids = np.array([[mid0, last0, mid1, -1]])
    vals = store.values(ids)
    tokens = np.array([vals[0, 0]])
    p = advance(store, ids, vals, tokens, None)
    live = set(p[p >= 0].tolist())
    assert mid0 + 1 in live and last0 + 1 not in live  # a document's last entry leads nowhere
    assert (mid1 + 1 in live) == (vals[0, 2] == tokens[0])
    store.opt_out("doc_ids", [store.doc_id(d0)])
    p = advance(store, ids, vals, tokens, None)
    assert mid0 + 1 not in set(p[p >= 0].tolist())
    owner = store.doc_row(d1)["owner"]
    if owner:
        p = advance(store, ids, vals, np.array([vals[0, 2]]), RetrievalPolicy(deny_owners=(owner,)))
        assert mid1 + 1 not in set(p[p >= 0].tolist())


def test_reuse_walks_the_store_with_exact_attribution(stores, lm, corpus_dir):
    """Scoring text the store holds: most tokens reuse pointers; every neighbour is a real,
    allowed entry whose distance is exact (from its key), as a search would report it."""
    model, tok = lm
    store = Datastore.open(stores[0])
    docs = _train_docs(corpus_dir, tok)
    plain = retrieve_neighbours(model, store, docs, 16, WINDOW, WINDOW // 2, keep_queries=True)
    walked = retrieve_neighbours(model, store, docs, 16, WINDOW, WINDOW // 2, reuse=2, keep_queries=True)
    how = np.concatenate([w.how for w in walked])
    assert (how == REUSED).mean() > 0.5 and (how == SEARCHED).any() and not (how == SKIPPED).any()
    assert (np.concatenate([p.how for p in plain]) == SEARCHED).all()
    for w in walked:
        reused = w.how == REUSED
        ids = w.ids[reused]
        ok = ids >= 0
        assert ok.sum(axis=1).min() >= 2
        assert (store.values(ids)[ok] == w.values[reused][ok]).all()
        exact = store.distances_to(w.queries[reused], ids)
        np.testing.assert_allclose(w.dists[reused][ok], exact[ok], rtol=1e-5)
        assert (np.diff(np.where(ok, w.dists[reused], 1e30), axis=1)[:, : ok.sum(1).min() - 1] >= 0).all()
    params = KNNParams(k=16, lam=0.25, temperature=10)
    ppl_plain = np.exp(-np.mean(np.concatenate([p.knn_logprob(params) for p in plain])))
    ppl_walked = np.exp(-np.mean(np.concatenate([w.knn_logprob(params) for w in walked])))
    assert ppl_walked < ppl_plain * 1.5  # the store's own text: the walk follows it


def test_reuse_never_walks_into_an_excluded_document(stores, lm, corpus_dir):
    model, tok = lm
    store = Datastore.open(stores[0])
    docs = _train_docs(corpus_dir, tok, 1)
    walked = retrieve_neighbours(model, store, docs, 16, WINDOW, WINDOW // 2, reuse=1)[0]
    own = np.bincount(store.entry_docs(walked.ids[walked.ids >= 0])).argmax()
    assert (walked.how == REUSED).any()
    owner = store.doc_row(int(own))["owner"]
    policy = RetrievalPolicy(deny_owners=(owner,)) if owner else None
    if policy is None:
        pytest.skip("the test corpus's document has no owner")
    fenced = retrieve_neighbours(model, store, docs, 16, WINDOW, WINDOW // 2, policy=policy, reuse=1)[0]
    seen = store.entry_docs(fenced.ids[fenced.ids >= 0])
    assert not any(store.doc_owner(int(d)) == owner for d in set(seen.tolist()))


def test_adaptive_retrieval_skips_confident_tokens_exactly(stores, lm, corpus_dir):
    model, tok = lm
    store = Datastore.open(stores[0])
    docs = _train_docs(corpus_dir, tok, 2)
    full = retrieve_neighbours(model, store, docs, 8, WINDOW, WINDOW // 2, keep_top=True)
    top = np.concatenate([f.lm_top for f in full])
    t = float(np.quantile(top, 0.7))  # about 30% of the tokens are at least this confident
    skipped = retrieve_neighbours(model, store, docs, 8, WINDOW, WINDOW // 2, skip_above=t)
    how = np.concatenate([s.how for s in skipped])
    np.testing.assert_array_equal(how == SKIPPED, top >= t)
    params = KNNParams(k=8, lam=0.3, temperature=10, skip_above=t)
    for f, s in zip(full, skipped, strict=True):
        mixed = s.knn_logprob(params)
        np.testing.assert_allclose(mixed[s.how == SKIPPED], s.lm_logprob[s.how == SKIPPED])  # the LM exactly
        np.testing.assert_allclose(f.knn_logprob(params), mixed, rtol=1e-6)  # after the fact = skipped


def test_generation_reuses_pointers_and_attributes_real_entries(stores, lm):
    model, tok = lm
    store = Datastore.open(stores[0])
    text = store.doc_text(0)
    prompt = text[: len(text) // 3]
    plain = list(generate(model, tok, prompt, 24, store=store, params=KNNParams(k=8, lam=0.9, temperature=1)))
    walked = list(generate(model, tok, prompt, 24, store=store,
                           params=KNNParams(k=8, lam=0.9, temperature=1, reuse=1, skip_above=0.999)))
    assert [g.token_id for g in walked][:4] == [g.token_id for g in plain][:4]
    for g in walked:
        for hit in g.attribution:
            eid = hit["entry_id"]
            assert store.allowed(np.array([eid]))[0] and hit["doc_id"] == store.doc_id(int(store.entry_docs(
                np.array([eid]))[0]))


def test_params_and_requests_are_checked():
    with pytest.raises(Exception, match="reuse"):
        KNNParams(k=8, reuse=9).validate()
    with pytest.raises(Exception, match="skip_above"):
        KNNParams(skip_above=0.0).validate()
    with pytest.raises(Exception, match="skip_above"):
        KNNParams(skip_above=float("nan")).validate()
    p = KNNParams.merged({"reuse": 4, "skip_above": 0.9}, reuse=0)
    assert p.reuse == 0 and p.skip_above == 0.9


def test_sweep_tunes_reuse_and_skip_and_eval_uses_them(stores, tmp_path, tiny_model, corpus_dir, lm):
    import shutil

    model, tok = lm
    path = tmp_path / "flat"
    shutil.copytree(stores[0], path)
    store = Datastore.open(path)
    r = sweep_knn(model, tok, store, str(corpus_dir), window=WINDOW, stride=WINDOW // 2, max_tokens=3000,
                  ks=(8, 32), lams=(0.25, 0.5), temps=(1, 10))
    d = Datastore.open(path).manifest.defaults
    assert d["reuse"] == r["reuse"] and d["skip_above"] == r["skip_above"]
    assert r["reuse_grid"] and all(x["ppl"] > 0 for x in r["reuse_grid"]) and r["skip_grid"]
    if r["reuse"]:  # a kept value is within the tolerance of searching at every token
        kept = next(x for x in r["reuse_grid"] if x["reuse"] == r["reuse"])
        assert kept["ppl"] <= r["knn"] * 1.01 + 1e-9
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(path),), modes=("lm", "knn"),
                            window=WINDOW, stride=WINDOW // 2, max_tokens=2000))
    kp = rep["knn_params"]
    assert kp["reuse"] == r["reuse"] and kp["skip_above"] == r["skip_above"]
    assert kp["searched"] + kp["reused"] + kp["skipped"] > 0


def test_reindex_from_the_command_line(stores, tmp_path, capsys):
    import json

    from silo.app.cli import main

    main(["datastore", "reindex", str(stores[0]), "--out", str(tmp_path / "re"), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["index"] == "Flat" and r["entries"] == Datastore.open(stores[0]).n_entries  # a small store: exact
    with pytest.raises(SystemExit) as e:
        main(["datastore", "reindex", str(stores[0]), "--out", str(tmp_path / "re")])
    assert e.value.code != 0 and "new folder" in capsys.readouterr().err


def test_eval_takes_reuse_and_skip_above_from_the_command_line(stores, tiny_model, corpus_dir, capsys):
    import json

    from silo.app.cli import main

    main(["eval", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--store", str(stores[0]), "--modes",
          "lm,knn", "--window", str(WINDOW), "--stride", str(WINDOW // 2), "--max-tokens", "1500", "--reuse", "1",
          "--skip-above", "0.9", "--json"])
    kp = json.loads(capsys.readouterr().out)["knn_params"]
    assert kp["reuse"] == 1 and kp["skip_above"] == 0.9 and kp["reused"] > 0
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--store", str(stores[0]),
              "--modes", "lm,knn", "--max-tokens", "500", "--skip-above", "0"])
    assert e.value.code != 0 and "skip_above" in capsys.readouterr().err
