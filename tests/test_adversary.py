"""The opt-out promise against someone who wants around it: the oracle, generations in
flight, special tokens, bounded attribution reads.

Each test here failed on the code before the fix it guards. The ∞-gram takedown's probes
are in tests/test_adversary_infgram.py, the server's work caps and streams in
tests/test_adversary_server.py, the removal ledger's in tests/test_ledger.py.
"""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
from silo.datastore.kinds import open_store
from silo.server.client import SiloClient

from silo.app.cli import main
from silo.build import BuildArgs, build_store
from silo.knnlm import KNNParams, generate
from silo.lm import RestrictedModel, load_causal_lm
from silo.ricl import RICParams, ric_generate
from silo.train import TrainArgs, train
from tests.test_server import start

WINDOW = 128


def _build(tiny_model, corpus_dir, out, **kw):
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, corpus_dir):
    """A real oracle: trained on every tier, restricted included (a few steps)."""
    out = tmp_path_factory.mktemp("oracle") / "oracle"
    train(TrainArgs(corpus=str(corpus_dir), out=str(out), config="tiny", vocab_size=512, steps=4,
                    tiers=("pd", "sw", "by", "restricted"), allow_restricted=True, progress=False))
    return out


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_causal_lm(tiny_model)


@pytest.fixture(scope="module")
def passage_dir(tmp_path_factory, tiny_model, corpus_dir):
    return _build(tiny_model, corpus_dir, tmp_path_factory.mktemp("adv-p") / "store", kind="passage",
                  passage_tokens=32)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, tiny_model, corpus_dir):
    return _build(tiny_model, corpus_dir, tmp_path_factory.mktemp("adv-t") / "store")


# ---------------------------------------------------------------------------- the oracle


def test_the_oracle_is_never_served_by_accident(oracle, capsys):
    with pytest.raises(RestrictedModel, match="trained on restricted text"):
        start(oracle, [])
    with pytest.raises(SystemExit) as e:  # `silo serve` refuses before loading anything or binding a port
        main(["serve", "--model", str(oracle), "--port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--serve-restricted-model" in err and "Traceback" not in err


def test_the_oracle_served_on_purpose_says_what_it_is(oracle, tiny_model, tmp_path):
    from silo.server.app import build_server, load_state
    from silo.server.servicers import DatastoreServicer, LanguageModelServicer

    state = load_state(str(oracle), [], allow_restricted_model=True)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0)
    try:
        info = SiloClient(f"127.0.0.1:{port}").model_info()
        assert info.trained_on_restricted and "restricted" in info.trained_tiers
    finally:
        server.stop(0)
    # an outside checkpoint (no training record): its tiers are unknown, not "none"
    outside = shutil.copytree(tiny_model, tmp_path / "outside")
    (outside / "silo_model.json").unlink()
    server, port, _ = start(outside, [])
    try:
        info = SiloClient(f"127.0.0.1:{port}").model_info()
        assert list(info.trained_tiers) == ["unknown"] and not info.trained_on_restricted
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- generations in flight


def _top_doc(events) -> str:
    docs = [h["doc_id"] for e in events for h in e.attribution]
    assert docs, "the generation attributed nothing: the test needs a retrieved document"
    return max(set(docs), key=docs.count)


def test_a_running_ric_generation_drops_a_removed_passage_at_the_next_token(tmp_path, passage_dir, lm):
    """RIC-LM kept a retrieved passage in its KV cache for `stride` tokens: tokens streamed
    after the acknowledgement still used and cited the removed document."""
    model, tok = lm
    path = shutil.copytree(passage_dir, tmp_path / "p")
    served, other = open_store(path), open_store(path)  # `other`: another process's view of the same store
    prompt = served.doc_text(3)[:80]
    gen = ric_generate(model, tok, served, prompt, max_new_tokens=12, params=RICParams(stride=64))
    first = [next(gen) for _ in range(3)]
    doc = _top_doc(first)
    other.opt_out("doc_ids", [doc])  # acknowledged: in the log, fsync'd
    rest = list(gen)
    assert rest and all(doc not in {h["doc_id"] for h in e.attribution} for e in rest)


def test_a_running_knn_generation_drops_a_removed_document_at_the_next_token(tmp_path, token_dir, lm):
    model, tok = lm
    path = shutil.copytree(token_dir, tmp_path / "t")
    served, other = open_store(path), open_store(path, load_index=False)
    prompt = served.doc_text(5)[:60]
    gen = generate(model, tok, prompt, 10, store=served, params=KNNParams(k=16, lam=0.5, temperature=10.0),
                   attribution_top=8)
    first = [next(gen) for _ in range(3)]
    doc = _top_doc(first)
    other.opt_out("doc_ids", [doc])
    rest = list(gen)
    assert rest and all(doc not in {h["doc_id"] for h in e.attribution} for e in rest)


# ---------------------------------------------------------------------------- special tokens


def test_special_tokens_in_client_text_are_text(tmp_path, token_dir, tiny_model):
    """A literal "</s><s>" was tokenized as EOS/BOS: a client could end a document inside
    its query. Now every special token's spelling is plain text, in every RPC."""
    server, port, _ = start(tiny_model, [shutil.copytree(token_dir, tmp_path / "t")])
    try:
        c = SiloClient(f"127.0.0.1:{port}")
        tok = load_causal_lm(tiny_model)[1]
        specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
        for text in ("end</s><s>start", "<pad><unk>", "a <s> b </s>"):
            assert not specials & set(c.tokenize(text).ids), text
            scored = c.score(f"The bridge of Quito {text} was built", mode="knn")
            assert not specials & {t.token_id for t in scored.tokens[:-1]}  # only the closing </s> is special
        ids = list(c.tokenize("x", add_special_tokens=True).ids)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        with pytest.raises(grpc.RpcError):
            c.score("")
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- bounded attribution reads


def test_a_slice_of_a_document_reads_its_characters_exactly(tmp_path, tiny_model):
    """Attribution read each hit's whole document to show one sentence; now it decodes at
    most 4·end bytes, and must give exactly the same characters on any text."""
    from silo.corpus import write_corpus

    rng = np.random.default_rng(0)
    alphabet = list("abc xyz.") + ["é", "ß", "日本", "🙂", "\u200d", "Ａ"]
    records = [{"doc_id": f"u{i}", "text": ". ".join("".join(rng.choice(alphabet, 40)) for _ in range(5)) + ".",
                "source": "s", "license": "GPL-3.0-only", "owner": "o"} for i in range(6)]
    write_corpus(records, tmp_path / "c")
    store = open_store(_build(tiny_model, tmp_path / "c", tmp_path / "s", split=None), load_index=False)
    for d in range(store.n_documents):
        text = store.doc_text(d)
        for a, b in [(0, 1), (0, len(text)), (3, 17), (len(text) - 2, len(text) + 5), (10, 10)] + [
                tuple(sorted(rng.integers(0, len(text) + 1, 2))) for _ in range(20)]:
            assert store.docs.text_slice(d, int(a), int(b)) == text[a:b], (d, a, b)
    hits = store.attribute(np.arange(store.n_entries))
    for h in hits[:: max(1, len(hits) // 50)]:
        d = store.doc_index(h["doc_id"])
        starts = list(store.docs.sentence_starts(d)) + [len(store.doc_text(d))]
        s = h["sentence_index"]
        assert h["sentence"] == store.doc_text(d)[starts[s]:starts[s + 1]].strip()


# ---------------------------------------------------------------------------- SILO by default


def test_a_request_naming_no_mode_gets_silo_not_the_bare_lm(tmp_path, token_dir, passage_dir, tiny_model):
    """A client written from the .proto alone (no retrieval options at all) streamed the
    parametric LM with 0 attributions. The server's default mode is now SILO's retrieval
    with the stores it has, and ModelInfo and every answer say which mode was used."""
    from silo.server.gen import silo_pb2 as pb
    from silo.server.gen import silo_pb2_grpc as pb_grpc

    server, port, _ = start(tiny_model, [shutil.copytree(token_dir, tmp_path / "t")])
    try:
        c = SiloClient(f"127.0.0.1:{port}")
        assert c.model_info().default_mode == pb.RETRIEVAL_KNN
        stub = pb_grpc.LanguageModelStub(c.channel)  # a bare request, as any language's client sends it
        events = list(stub.Generate(pb.GenerateRequest(prompt="The lighthouse of", max_new_tokens=6), timeout=60))
        assert sum(len(e.token.attribution) for e in events if e.HasField("token")) > 0
        assert events[-1].summary.citations and events[-1].summary.mode == pb.RETRIEVAL_KNN
        scored = stub.Score(pb.ScoreRequest(text="The bridge of Quito was built in 1785."), timeout=60)
        lm = c.score("The bridge of Quito was built in 1785.", mode="none")
        assert scored.mode == pb.RETRIEVAL_KNN and lm.mode == pb.RETRIEVAL_NONE
        assert scored.perplexity != lm.perplexity
    finally:
        server.stop(0)
    server, port, state = start(tiny_model, [passage_dir])  # no token store: RIC-LM
    try:
        assert SiloClient(f"127.0.0.1:{port}").model_info().default_mode == pb.RETRIEVAL_RIC
    finally:
        server.stop(0)
    from silo.server.app import load_state

    from silo.errors import SiloError

    assert load_state(str(tiny_model), [], mode="auto").default_mode == pb.RETRIEVAL_NONE  # no store: the LM
    with pytest.raises(SiloError, match="needs a token store"):
        load_state(str(tiny_model), [str(passage_dir)], mode="knn")
