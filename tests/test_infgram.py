"""∞-gram stores: exact counts and suffix matches, exact takedown, tracing, inference and
evaluation beside kNN-LM, exact no-neighbour semantics, and the server's Trace."""

from __future__ import annotations

import json
import math
import random
import shutil

import grpc
import numpy as np
import pytest
from silo.datastore.infgram import InfgramStore
from silo.datastore.kinds import open_store
from silo.datastore.optout import append_removal
from silo.server.client import SiloClient
from test_server import TOKEN, code_of, start

from silo.build import BuildArgs, build_store
from silo.eval_modes import EvalArgs, run_eval, sweep_infgram
from silo.evaluate import load_eval_docs, perplexity
from silo.infgram import InfgramParams, generate_infgram, score_infgram, trace
from silo.lm import load_causal_lm

WINDOW = 128


def build_infgram(out, tiny_model, corpus_dir, **kw):
    return build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), kind="infgram",
                                 tiers=("restricted",), progress=False, **kw))


@pytest.fixture(scope="module")
def ig_dir(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("infgram") / "store"
    build_infgram(out, tiny_model, corpus_dir, shards=3)
    return out


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_causal_lm(tiny_model)


def _docs_tokens(store: InfgramStore, keep=None) -> list[list[int]]:
    return [store.index.doc_tokens(d).tolist() for d in range(store.n_documents) if keep is None or keep[d]]


def _count(docs: list[list[int]], q: list[int], eos: int) -> int:
    """Brute force: occurrences of q in the documents (EOS = a document's end)."""
    n = 0
    for d in docs:
        seq = d + [eos]
        n += sum(seq[i : i + len(q)] == q for i in range(len(seq) - len(q) + 1)
                 if eos not in q[:-1] and (q[-1] != eos or i + len(q) == len(seq)))
    return n


def _longest(docs, context, eos) -> tuple[int, int]:
    for length in range(len(context), 0, -1):
        c = _count(docs, context[-length:], eos)
        if c:
            return length, c
    return 0, sum(len(d) for d in docs)


def test_layout_and_exact_counts(ig_dir, lm):
    store = open_store(ig_dir)
    assert isinstance(store, InfgramStore) and store.manifest.kind == "infgram" and len(store.shards) == 3
    assert all((s.path / "sa" / "table.0").is_file() for s in store.shards)
    _, tok = lm
    docs = _docs_tokens(store)
    assert sum(len(d) for d in docs) == store.n_entries  # every token, BOS first, no EOS inside
    assert all(d[0] == tok.bos_token_id and tok.eos_token_id not in d for d in docs)
    rng = random.Random(0)
    eos = tok.eos_token_id
    for _ in range(60):
        d = docs[rng.randrange(len(docs))]
        a = rng.randrange(len(d))
        q = d[a : a + rng.randint(1, 12)]
        if rng.random() < 0.2:
            q = q + [eos]
        assert store.index.count(q) == _count(docs, q, eos), q


def test_suffix_matches_are_the_longest_and_exact(ig_dir, lm, corpus_dir):
    model, tok = lm
    store = open_store(ig_dir)
    _, eval_docs = load_eval_docs(str(corpus_dir), tok, "validation", ("restricted",), max_docs=2)
    docs = _docs_tokens(store)
    for ids in eval_docs:
        sl, sc, cc = store.index.match(ids)
        for t in range(1, min(len(ids), 40)):
            length, count = _longest(docs, ids[:t], tok.eos_token_id)
            assert (sl[t - 1], sc[t - 1]) == (length, count), t
            if length:
                assert cc[t - 1] == _count(docs, ids[t - length : t] + [ids[t]], tok.eos_token_id)


def test_takedown_is_exact_and_compaction_keeps_the_answers(ig_dir, tmp_path, tiny_model, corpus_dir, lm):
    """After an opt-out, counts, matches and spans equal those of a store built without the
    removed documents; after compaction, too."""
    model, tok = lm
    path = tmp_path / "store"
    shutil.copytree(ig_dir, path)
    store = open_store(path)
    victims = [store.doc_id(d) for d in (0, 7, store.n_documents - 1)]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    append_removal(ref_dir, "doc_ids", victims, [])  # a rebuild never ingests them
    build_infgram(ref_dir, tiny_model, corpus_dir, shards=2)
    ref = open_store(ref_dir)
    assert ref.n_documents == store.n_documents - 3
    store.opt_out("doc_ids", victims)
    _, eval_docs = load_eval_docs(str(corpus_dir), tok, "validation", ("restricted",), max_docs=3)
    victim_text = [store.index.doc_tokens(store.doc_index(v)).tolist() for v in victims]
    for ids in [*eval_docs, *victim_text]:
        for x, y in zip(store.index.match(ids), ref.index.match(ids), strict=True):
            np.testing.assert_array_equal(x, y)
    removed = {store.doc_index(v) for v in victims}
    for ids in victim_text:
        spans = store.index.spans(ids, 4)
        assert not {d for sp in spans for d in sp.docs} & removed
        assert [(s.start, s.end, s.count) for s in spans] == [(s.start, s.end, s.count) for s in ref.index.spans(ids, 4)]
    from silo.datastore.compact import compact

    res = compact(path)
    assert res["rewritten_shards"] >= 1
    after = open_store(path)
    assert after.index.diff is None  # physically gone: nothing left to subtract
    for ids in [*eval_docs, *victim_text]:
        for x, y in zip(after.index.match(ids), ref.index.match(ids), strict=True):
            np.testing.assert_array_equal(x, y)
    assert all(after.index.doc_tokens(d).size == 0 for d in removed)


def test_an_infgram_store_is_traced_not_searched(ig_dir, capsys):
    from silo.app.cli import main
    from silo.errors import SiloError
    from silo.search import search_text

    with pytest.raises(SiloError, match="silo trace"):
        search_text(open_store(ig_dir, load_index=False), "The lighthouse of", 3)
    with pytest.raises(SystemExit) as e:
        main(["datastore", "search", str(ig_dir), "--query", "The lighthouse of"])
    assert e.value.code == 2 and "silo trace" in capsys.readouterr().err


def test_inference_tracing_and_generation(ig_dir, lm, corpus_dir):
    model, tok = lm
    store = open_store(ig_dir)
    _, docs = load_eval_docs(str(corpus_dir), tok, "validation", ("restricted",))
    scored = score_infgram(model, store, docs, WINDOW, WINDOW // 2, 8, tok.pad_token_id)
    lm_ppl = perplexity([s.lm_logprob for s in scored])
    inf_ppl = perplexity([s.logprob(InfgramParams(lam=0.5)) for s in scored])
    assert inf_ppl < lm_ppl  # the store holds look-alike documents: matching helps
    p0 = perplexity([s.logprob(InfgramParams(lam=0.0)) for s in scored])
    assert p0 == pytest.approx(lm_ppl, rel=1e-12)
    # tracing: a stored document's own text comes back as one long span, from it
    d = 5
    text = store.doc_text(d)[:400]
    spans = trace(store, tok, text, min_tokens=8)
    assert spans and spans[0].text in text and spans[0].end_token - spans[0].start_token >= 8
    assert store.doc_id(d) in {x["doc_id"] for sp in spans for x in sp.documents}
    assert all(len(a.text) >= len(b.text) or a.count <= b.count for a, b in zip(spans, spans[1:], strict=False))
    out = list(generate_infgram(model, tok, store, "The lighthouse of Lisbon was built in", 6, InfgramParams(0.7)))
    assert len(out) == 6 and any(t.attribution for t in out)
    assert all(h["tier"] == "restricted" and h["suffix_tokens"] > 0 for t in out for h in t.attribution)


def test_eval_reports_every_mode_with_bits_per_byte(ig_dir, tmp_path, tiny_model, corpus_dir):
    token = tmp_path / "token"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(token), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False))
    ig = tmp_path / "ig"
    shutil.copytree(ig_dir, ig)
    model, tok = load_causal_lm(tiny_model)
    res = sweep_infgram(model, tok, open_store(ig), str(corpus_dir), window=WINDOW, stride=WINDOW // 2)
    assert res["infgram"] <= res["lm"] and open_store(ig).manifest.defaults["lambda_by_suffix"]
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(token), str(ig)),
                            modes=("lm", "knn", "infgram"), window=WINDOW, stride=WINDOW // 2, k=16, lam=0.5,
                            temperature=10.0))
    for m in ("lm", "knn", "infgram"):
        assert math.isfinite(rep[m]) and math.isfinite(rep["bits_per_byte"][m])
    assert rep["modes"]["lm"]["tokens"] == rep["modes"]["knn"]["tokens"] == rep["modes"]["infgram"]["tokens"]
    assert rep["infgram"] < rep["lm"] and rep["checks"]["infgram_store"]["leaked_eval_docs"] == 0
    # bits per byte: the total negative log-likelihood in bits over the text's UTF-8 bytes
    assert rep["bits_per_byte"]["lm"] == pytest.approx(math.log2(rep["lm"]) * rep["tokens"] / rep["bytes"], rel=1e-9)
    json.dumps(rep)


def test_oracle_with_another_tokenizer_is_compared_in_bits_per_byte(tmp_path, tiny_model, corpus_dir, ig_dir):
    from silo.train import TrainArgs, train

    oracle = tmp_path / "oracle"
    train(TrainArgs(corpus=str(corpus_dir), out=str(oracle), config="tiny", vocab_size=400, steps=30,
                    tiers=("pd", "sw", "by", "restricted"), allow_restricted=True, progress=False))
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(ig_dir),),
                            modes=("lm", "infgram"), oracle=str(oracle), window=WINDOW, stride=WINDOW // 2,
                            infgram_lambda=0.5))
    assert rep["oracle_tokenizer"].startswith("other") and "gap_closed_infgram" not in rep
    bpb = rep["bits_per_byte"]
    assert rep["gap_closed_bpb_infgram"] == pytest.approx((bpb["lm"] - bpb["infgram"]) / (bpb["lm"] - bpb["oracle"]))


def test_opting_everything_out_gives_exactly_the_lm(tmp_path, ig_dir, tiny_model, corpus_dir, lm):
    """The promise: with every document opted out, kNN-LM and ∞-gram perplexity equal
    LM-only on the same tokens — in `silo eval` and through `Score`."""
    token = tmp_path / "token"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(token), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False))
    ig = tmp_path / "ig"
    shutil.copytree(ig_dir, ig)
    for path in (token, ig):
        st = open_store(path)
        st.opt_out("doc_ids", [st.doc_id(d) for d in range(st.n_documents)])
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(token), str(ig)),
                            modes=("lm", "knn", "infgram"), window=WINDOW, stride=WINDOW // 2, k=8, lam=0.6,
                            temperature=10.0, infgram_lambda=0.6))
    assert rep["knn"] == pytest.approx(rep["lm"], rel=1e-9) and rep["infgram"] == pytest.approx(rep["lm"], rel=1e-9)
    server, port, _ = start(tiny_model, [token, ig])
    try:
        c = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
        text = "The lighthouse of Lisbon was built in 1700 by Ada Lovelace."
        base = c.score(text, window=WINDOW, mode="none")
        for mode in ("knn", "infgram"):
            r = c.score(text, window=WINDOW, mode=mode, lam=0.6)
            assert r.perplexity == pytest.approx(base.perplexity, rel=1e-6), mode
        assert not c.trace(text, min_tokens=2).spans
        events = list(c.generate("The lighthouse of", max_new_tokens=5, mode="infgram", lam=0.9))
        assert not any(e.token.attribution for e in events if e.HasField("token"))
    finally:
        server.stop(0)


def _generation_docs(c: SiloClient, text: str) -> set[str]:
    """Every document an ∞-gram generation from `text`'s opening cites: per token, in the
    citations and in the trace of its output."""
    events = list(c.generate(text[:60], max_new_tokens=12, mode="infgram", lam=0.9, trace=True, trace_min_tokens=3))
    summary = events[-1].summary
    return ({h.doc_id for e in events if e.HasField("token") for h in e.token.attribution}
            | {x.doc_id for x in summary.citations} | {d.doc_id for sp in summary.trace for d in sp.documents})


def test_trace_and_infgram_over_grpc(tmp_path, ig_dir, tiny_model):
    ig = tmp_path / "ig"
    shutil.copytree(ig_dir, ig)
    server, port, state = start(tiny_model, [ig])
    try:
        c = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
        store = state.stores["infgram"]
        text = store.doc_text(4)[:300]
        r = c.trace(text, min_tokens=6)
        assert r.spans and r.tokens > 0 and r.spans[0].documents
        owner_doc = store.doc_id(4)
        assert owner_doc in {d.doc_id for sp in r.spans for d in sp.documents}
        lm = c.score(text, mode="none")
        ig_score = c.score(text, mode="infgram", lam=0.5)
        assert ig_score.perplexity < lm.perplexity and ig_score.num_tokens == lm.num_tokens
        events = list(c.generate(text[:60], max_new_tokens=8, mode="infgram", lam=0.8, trace=True,
                                 trace_min_tokens=3))
        summary = events[-1].summary
        assert summary.generated_tokens == 8 and any(e.token.suffix_tokens for e in events if e.HasField("token"))
        assert summary.trace and summary.citations
        assert owner_doc in _generation_docs(c, text)  # its own opening: the store continues it
        c.optout(doc_ids=[owner_doc])
        r2 = c.trace(text, min_tokens=6)
        assert owner_doc not in {d.doc_id for sp in r2.spans for d in sp.documents}
        assert owner_doc not in _generation_docs(c, text)
        proof = c.optout_status(doc_id=owner_doc)
        assert proof.removed and proof.tombstoned and not proof.compacted
        assert [(p.store, p.tombstoned, p.live_entries) for p in proof.stores] == [(ig.name, True, 0)]
        assert c.compact().rewritten_shards >= 1  # the suffix array rewritten without it
        assert c.optout_status(doc_id=owner_doc).compacted
        assert owner_doc not in {d.doc_id for sp in c.trace(text, min_tokens=6).spans for d in sp.documents}
        assert owner_doc not in _generation_docs(c, text)
        assert c.score(text, mode="infgram", lam=0.5).num_tokens == lm.num_tokens
        assert code_of(lambda: c.trace("")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.trace(text, min_tokens=5000)) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
    bare, bport, _ = start(tiny_model, [])
    try:
        assert code_of(lambda: SiloClient(f"127.0.0.1:{bport}").trace("some text")) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        bare.stop(0)
