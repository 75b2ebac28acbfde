"""Token store: build, shards, exact merge, policy, opt-out tombstones, resume, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from silo.datastore.index import choose_factory, nlist_for
from silo.datastore.manifest import FingerprintMismatch, StoreError
from silo.datastore.optout import append_removal, read_log
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore

import silo.build as build_mod
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents
from silo.lm import load_causal_lm
from silo.tokenizer import encode_document


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("stores")
    common = dict(model=str(tiny_model), corpus=str(corpus_dir), tiers=("restricted", "by"), progress=False,
                  window=64, stride=32)
    build_store(BuildArgs(out=str(root / "one"), shards=1, keep_keys=True, **common))
    build_store(BuildArgs(out=str(root / "three"), shards=3, **common))
    build_store(BuildArgs(out=str(root / "ivf"), shards=2, factory="IVF32,PQ16", **common))
    return root


def _queries(store: Datastore, n: int = 20, seed: int = 0) -> np.ndarray:
    keys = np.load(store.path / "shards" / "00000" / "keys.npy").astype(np.float32)
    rng = np.random.default_rng(seed)
    return keys[rng.choice(len(keys), n, replace=False)] + rng.normal(0, 0.1, (n, keys.shape[1])).astype(np.float32)


def test_entries_are_dense_and_values_are_next_tokens(stores, tiny_model, corpus_dir):
    store = Datastore.open(stores / "three")
    m = store.manifest
    assert m.kind == "token" and len(m.shards) == 3 and m.tiers == ["restricted", "by"] and m.split == "train"
    assert [s.first_entry for s in m.shards] == [0, m.shards[0].entries, m.shards[0].entries + m.shards[1].entries]
    _, tok = load_causal_lm(tiny_model)
    docs = [d for d in iter_documents(corpus_dir, tiers=["restricted", "by"], split="train")]
    assert m.documents == len(docs)
    expected_values = np.concatenate([encode_document(tok, d["text"])[1:] for d in docs])
    assert m.entries == len(expected_values)
    all_ids = np.arange(m.entries)
    np.testing.assert_array_equal(store.values(all_ids), expected_values)
    ent = store.entries(all_ids)
    assert (np.diff(ent["doc"]) >= 0).all()  # (document, position) order
    assert store.doc_row(0)["doc_id"] == docs[0]["doc_id"]


def test_multi_shard_merge_equals_one_index(stores):
    one, three = Datastore.open(stores / "one"), Datastore.open(stores / "three")
    q = _queries(one)
    d1, i1 = one.search(q, 10)
    d3, i3 = three.search(q, 10)
    np.testing.assert_allclose(d1, d3, rtol=1e-5)
    assert (i1 == i3).mean() > 0.95  # equal up to the order of exact ties


def test_keys_do_not_leak_across_documents(stores, tiny_model):
    """A document's keys computed alone equal the ones in the (batched, padded) store."""
    import torch

    from silo.keys import capture_keys

    store = Datastore.open(stores / "one")
    model, tok = load_causal_lm(tiny_model)
    keys = np.load(store.path / "shards" / "00000" / "keys.npy")
    for doc in (0, 5, store.manifest.documents - 1):
        row = store.doc_row(doc)
        ids = encode_document(tok, row["text"])[:64]
        with torch.no_grad(), capture_keys(model) as box:
            model(input_ids=torch.tensor([ids]))
        alone = box["keys"][0, :-1].numpy()
        first = row["first_entry"]
        np.testing.assert_allclose(keys[first : first + len(ids) - 1].astype(np.float32), alone, atol=2e-2, rtol=1e-2)


def test_fingerprint_mismatch_is_refused(stores, tmp_path, tiny_model, corpus_dir):
    from silo.train import TrainArgs, train

    other = tmp_path / "other"
    train(TrainArgs(corpus=str(corpus_dir), out=str(other), config="tiny", tokenizer=str(tiny_model), steps=3,
                    seed=7, progress=False))
    store = Datastore.open(stores / "one")
    store.check_model(tiny_model)
    with pytest.raises(FingerprintMismatch, match="built with model"):
        store.check_model(other)


def test_policy_gives_exact_top_k_of_allowed_entries(stores):
    store = Datastore.open(stores / "three")
    q = _queries(Datastore.open(stores / "one"), 8)
    policy = RetrievalPolicy(tiers=("by",))
    d, i = store.search(q, 5, policy=policy)
    assert (i >= 0).all()
    tiers = store.docs.column("tier")[store.entries(i)["doc"]]
    assert set(tiers.ravel()) == {"by"}
    # brute force: everything, then filter
    dall, iall = store.search(q, store.n_entries)
    allowed = store.doc_mask(policy)[store.entries(iall)["doc"]]
    for r in range(len(q)):
        want = dall[r][allowed[r]][:5]
        np.testing.assert_allclose(d[r], want, rtol=1e-5)


def test_policy_by_license_source_owner(stores):
    store = Datastore.open(stores / "three")
    q = _queries(Datastore.open(stores / "one"), 6)
    for policy, column, bad in (
        (RetrievalPolicy(deny_licenses=("GPL*",)), "license", lambda v: v.upper().startswith("GPL")),
        (RetrievalPolicy.from_strings(deny_sources="news,books"), "source", lambda v: v in ("news", "books")),
        (RetrievalPolicy(deny_owners=("owner-1",)), "owner", lambda v: v == "owner-1"),
        (RetrievalPolicy(allow_licenses=("CC-BY-4.0",)), "license", lambda v: v != "CC-BY-4.0"),
    ):
        _, i = store.search(q, 20, policy=policy)
        assert (i >= 0).all()
        values = store.docs.column(column)[store.entries(i)["doc"]].ravel()
        assert not any(bad(v) for v in values), policy


def test_optout_tombstones_survive_reopen(stores, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(stores / "three", path)
    store = Datastore.open(path)
    q = _queries(Datastore.open(stores / "one"), 30)
    _, i = store.search(q, 10)
    victims = sorted({store.doc_row(d)["doc_id"] for d in store.entries(i)["doc"][:, 0]})[:3]
    append_removal(path, "doc_ids", victims, victims)
    assert read_log(path).doc_ids == set(victims)
    reopened = Datastore.open(path)
    _, i2 = reopened.search(q, 50)
    found = {reopened.doc_row(d)["doc_id"] for d in reopened.entries(i2)["doc"].ravel() if d >= 0}
    assert not found & set(victims)
    assert (i2 >= 0).all()  # the top-k is refilled from live entries


def test_optout_by_owner_and_span(stores, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(stores / "one", path)
    append_removal(path, "owner", ["owner-2"], [])
    append_removal(path, "span", ["Quito"], [])
    store = Datastore.open(path)
    dead = store.dead_docs
    owners = store.docs.column("owner")
    texts = [store.doc_text(d) for d in range(store.n_documents)]
    assert all(dead[j] for j in range(len(owners)) if owners[j] == "owner-2" or "Quito" in texts[j])
    assert not all(dead)
    _, i = store.search(_queries(store, 10), 30)
    assert not any(dead[d] for d in store.entries(i)["doc"].ravel() if d >= 0)


def test_rebuild_applies_the_optout_log(stores, tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "rebuilt"
    out.mkdir()
    victim = Datastore.open(stores / "one").doc_row(0)["doc_id"]
    append_removal(out, "doc_ids", [victim], [victim])
    m = build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out),
                                    tiers=("restricted", "by"), window=64, stride=32, progress=False))
    store = Datastore.open(out)
    assert store.doc_index(victim) is None and m.build["skipped_optout"] == 1


def test_killed_build_resumes_to_the_same_store(stores, tmp_path, tiny_model, corpus_dir, monkeypatch):
    args = dict(model=str(tiny_model), corpus=str(corpus_dir), out=str(tmp_path / "s"), tiers=("restricted", "by"),
                shards=3, window=64, stride=32, progress=False)
    real = build_mod.write_shard
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_store(BuildArgs(**args))
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert (tmp_path / "s" / "shards" / "00000" / "shard.json").exists()
    monkeypatch.setattr(build_mod, "write_shard", real)
    build_store(BuildArgs(**args))
    for s in ("00000", "00001", "00002"):
        a = (tmp_path / "s" / "shards" / s / "index.faiss").read_bytes()
        b = (stores / "three" / "shards" / s / "index.faiss").read_bytes()
        assert a == b, s
    with pytest.raises(StoreError, match="other settings"):
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "build").mkdir()
        (tmp_path / "t" / "build" / "settings.json").write_text(json.dumps({"shards": 99}))
        build_store(BuildArgs(**{**args, "out": str(tmp_path / "t")}))


def test_ivf_pq_store_recall_against_exact(stores):
    exact, ivf = Datastore.open(stores / "one"), Datastore.open(stores / "ivf")
    assert ivf.manifest.index == "IVF32,PQ16"
    q = _queries(exact, 50)
    _, ie = exact.search(q, 10)
    _, ia = ivf.search(q, 10, nprobe=32)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ia, strict=True)])
    assert recall > 0.3, recall
    _, ia1 = ivf.search(q, 10, nprobe=1)
    assert (ia1 >= -1).all()


def test_attribution_names_document_and_sentence(stores):
    store = Datastore.open(stores / "one")
    d, i = store.search(_queries(store, 3), 3)
    hits = store.attribute(i[0], d[0])
    assert len(hits) == 3
    for h in hits:
        row = store.doc_row(store.entries(np.array([h["entry_id"]]))["doc"][0])
        assert h["doc_id"] == row["doc_id"] and h["license"] == row["license"] and h["tier"] == row["tier"]
        assert h["sentence"] and h["sentence"] in row["text"]


def test_bad_input_and_corrupt_files(stores, tmp_path):
    store = Datastore.open(stores / "one")
    with pytest.raises(ValueError, match="k must be positive"):
        store.search(_queries(store, 1), 0)
    with pytest.raises(ValueError, match="queries must be"):
        store.search(np.zeros((1, 3), np.float32), 1)
    with pytest.raises(StoreError, match="not a SILO datastore"):
        Datastore.open(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(stores / "one", bad)
    (bad / "shards" / "00000" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="unreadable FAISS index"):
        Datastore.open(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match="corrupt"):
        Datastore.open(bad)
    # unknown ids attribute to nothing instead of crashing
    assert store.attribute(np.array([-1])) == []
    assert (store.values(np.array([10**12, -5])) == -1).all()


def test_finished_store_is_not_overwritten(stores, tiny_model, corpus_dir):
    with pytest.raises(StoreError, match="finished store"):
        build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(stores / "one")))


def test_index_choice_rules():
    assert choose_factory(500, 64) == "Flat"
    assert nlist_for(10_000) == 512 and nlist_for(1_000_000) == 4096 and nlist_for(50_000_000) == 32768 and nlist_for(10**12) == 262144
    f = choose_factory(3_000_000, 256, memory_budget=3_000_000 * 40)
    assert f.startswith("IVF8192,PQ") and int(f.split("PQ")[1]) <= 32
    assert choose_factory(300_000, 64, memory_budget=10 << 30).startswith("IVF")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_foreign_architectures_build_and_search(arch, tmp_path, tiny_model, corpus_dir):
    """Keys hook the last block's feed-forward input of GPT-2 and GPT-NeoX/Pythia models too."""
    import torch
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    from silo.keys import capture_keys, key_dim

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=48, n_layer=2, n_head=4, n_positions=256))
        ffn = model.transformer.h[-1].mlp
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=96,
                                                 max_position_embeddings=256))
        ffn = model.gpt_neox.layers[-1].mlp
    seen = {}
    handle = ffn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad(), capture_keys(model) as box:
        model(input_ids=torch.tensor([[1, 5, 9, 12]]))
    handle.remove()
    torch.testing.assert_close(box["keys"], seen["x"])
    assert key_dim(model, "final") == 48
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    m = build_store(BuildArgs(model=str(tmp_path / arch), corpus=str(corpus_dir), out=str(tmp_path / "s"),
                                    tiers=("restricted",), window=64, stride=32, max_docs=10, progress=False))
    assert m.dim == 48 and m.entries > 0
    store = Datastore.open(tmp_path / "s")
    store.check_model(tmp_path / arch)
    _, i = store.search(np.zeros((2, 48), np.float32), 4)
    assert (i >= 0).all()


def test_compaction_removes_entries_physically_and_keeps_answers(stores, tmp_path):
    from silo.datastore.compact import compact

    path = tmp_path / "s"
    shutil.copytree(stores / "three", path)
    store = Datastore.open(path)
    q = _queries(Datastore.open(stores / "one"), 20)
    victims = sorted({store.doc_row(d)["doc_id"] for d in store.entries(store.search(q, 5)[1])["doc"].ravel()})[:4]
    store.opt_out("doc_ids", victims)
    before = store.search(q, 10)
    victim_idx = [store.doc_index(v) for v in victims]
    dead_ids = np.flatnonzero(np.isin(store.entries(np.arange(store.n_entries), ("doc",))["doc"], victim_idx))
    res = compact(path)
    assert res["removed_entries"] == len(dead_ids) and res["rewritten_shards"] >= 1
    after_store = Datastore.open(path)
    after = after_store.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    # physically gone: no index file holds the removed ids, no text of the removed documents remains
    import faiss

    for s in after_store.shards:
        index = faiss.read_index(str(s.path / "index.faiss"))
        lo, hi = s.info.first_entry, s.info.first_entry + s.info.entries
        mine = dead_ids[(dead_ids >= lo) & (dead_ids < hi)]
        if len(mine):
            assert index.ntotal == s.info.entries - len(mine)
            idmap = faiss.vector_to_array(faiss.downcast_index(index).id_map)
            assert not np.isin(mine, idmap).any()
    for v in victim_idx:
        assert after_store.doc_row(v)["text"] == ""
    assert (after_store.values(dead_ids) == -1).all()
    assert len(list((path / "shards").iterdir())) == 3  # old folders deleted
    assert compact(path)["rewritten_shards"] == 0  # nothing left to do
