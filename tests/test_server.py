"""gRPC serving against real servers on loopback: contract, calls, errors, opt-out, shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from silo.server.app import build_server, load_state
from silo.server.auth import Auth
from silo.server.client import SiloClient, retrieval_options
from silo.server.gen import silo_pb2 as pb
from silo.server.servicers import DatastoreServicer, LanguageModelServicer

from silo.build import BuildArgs, build_store

TOKEN = "test-admin-token-0123456789"
WINDOW = 128


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("srv") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                                shards=2, window=WINDOW, stride=WINDOW // 2, progress=False))
    return out


SHARD_TOKEN = "test-shard-token-0123456789"


def start(model, stores, **kw):
    auth = Auth(admin_token=kw.get("token", TOKEN), owners=kw.get("owners"))
    state = load_state(str(model), [str(s) for s in stores], auth=auth, limits=kw.get("limits"),
                       shard_token=SHARD_TOKEN, **{k: v for k, v in kw.items()
                                                   if k in ("remote_shards", "shard_deadline_s", "shard_root_cert",
                                                            "membership_reference")})
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state), "Datastore": DatastoreServicer(state)},
                                   0, auth=auth, max_concurrent=kw.get("max_concurrent", 32), tls=kw.get("tls"),
                                   max_workers=kw.get("max_workers"))
    return server, port, state


@pytest.fixture
def live(tmp_path, store_dir, tiny_model):
    """A server over a private copy of the store (tests may remove things)."""
    path = tmp_path / "store"
    shutil.copytree(store_dir, path)
    server, port, state = start(tiny_model, [path])
    client = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
    yield client, path, state
    client.close()
    server.stop(0)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        r = fn()
        if hasattr(r, "__next__"):
            list(r)
    return e.value.code()


def test_generated_code_is_current():
    from silo.server import protogen

    proc = subprocess.run([sys.executable, "-m", "silo.server.protogen", "--check"], capture_output=True, text=True,
                          cwd=protogen.ROOT)
    assert proc.returncode == 0, proc.stderr


def test_generate_streams_tokens_with_attribution_and_citations(live):
    client, _, _ = live
    events = list(client.generate("The museum of Nairobi", max_new_tokens=6, mode="knn", k=8, lam=0.5,
                                  temperature=10.0))
    tokens = [e.token for e in events if e.HasField("token")]
    summary = events[-1].summary
    assert len(tokens) == summary.generated_tokens == 6 and summary.stop_reason == pb.MAX_TOKENS
    assert all(t.attribution for t in tokens)
    assert {a.tier for t in tokens for a in t.attribution} == {"restricted"}
    cited = {c.doc_id for c in summary.citations}
    assert cited == {a.doc_id for t in tokens for a in t.attribution}
    assert all(c.obligation == "not licensed for reuse" for c in summary.citations)
    assert summary.text == "".join(t.text for t in tokens)
    plain = list(client.generate("def parse", max_new_tokens=4, mode="none"))
    assert not any(e.token.attribution for e in plain if e.HasField("token"))


def test_score_tokenize_modelinfo_search(live):
    client, _, _ = live
    text = "The lighthouse of Lisbon was built in 1700 by Ada Lovelace. In 1751, Alan Turing finished the bridge of Quito."
    lm = client.score(text, mode="none")
    knn = client.score(text, mode="knn", k=16, lam=0.5, temperature=10.0)
    assert lm.num_tokens == knn.num_tokens == len(client.tokenize(text).ids) + 1
    assert knn.perplexity < lm.perplexity
    assert [t.token_id for t in lm.tokens] == [t.token_id for t in knn.tokens]
    info = client.model_info()
    assert info.model_type == "llama" and info.trained_tiers == ["pd", "sw"] and not info.trained_on_restricted
    assert info.stores[0].kind == "token" and info.stores[0].entries > 0
    hits = client.search("The bridge of Quito was built in", k=4).hits
    assert len(hits) == 4 and all(h.sentence and h.license is not None for h in hits)
    by_source = client.search("The bridge of Quito was built in", k=4, deny_sources=["books", "news"]).hits
    assert len(by_source) == 4 and not {h.source for h in by_source} & {"books", "news"}
    assert client.health() == "SERVING" and client.health("silo.v1.Datastore") == "SERVING"


def test_bad_input_gets_the_right_status_and_server_stays_up(live, tmp_path):
    client, _, _ = live
    inv = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.generate("", max_new_tokens=3)) == inv
    assert code_of(lambda: client.generate("x", max_new_tokens=10_000)) == inv
    assert code_of(lambda: client.generate("x", max_new_tokens=0)) == inv
    assert code_of(lambda: client.generate("x", mode="knn", k=0)) == inv
    assert code_of(lambda: client.generate("x", mode="knn", k=-3)) == inv
    assert code_of(lambda: client.generate("x", mode="knn", lam=1.5)) == inv
    assert code_of(lambda: client.score("   ")) == inv
    assert code_of(lambda: client.score("x" * 300_000)) == inv
    assert code_of(lambda: client.search("x", k=0)) == inv
    assert code_of(lambda: client.search("x", tiers=["gold"])) == inv
    assert code_of(lambda: client.search("x", store="elsewhere")) == inv
    # invalid UTF-8 in a string field: raw bytes, as a buggy client in any language could send
    raw = client.channel.unary_unary("/silo.v1.LanguageModel/Score", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\x03\xff\xfe\x41", timeout=10)
    assert e.value.code() == inv and "UTF-8" in e.value.details()
    assert code_of(lambda: client.optout(doc_ids=["no-such-doc"])) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.optout_status(receipt_id="nope")) == grpc.StatusCode.NOT_FOUND
    anon = SiloClient(client.target)
    assert code_of(lambda: anon.optout(owner="owner-1")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: anon.compact()) == grpc.StatusCode.UNAUTHENTICATED
    wrong = SiloClient(client.target, token="wrong-token-wrong-token")
    assert code_of(lambda: wrong.optout(owner="owner-1")) == grpc.StatusCode.UNAUTHENTICATED
    assert client.health() == "SERVING"
    assert client.score("still here").num_tokens > 0


def test_store_of_another_model_is_failed_precondition(store_dir, tmp_path, tiny_model, corpus_dir):
    from silo.train import TrainArgs, train

    other = tmp_path / "other"
    train(TrainArgs(corpus=str(corpus_dir), out=str(other), config="tiny", tokenizer=str(tiny_model), steps=2,
                    seed=9, progress=False))
    server, port, _ = start(other, [store_dir])
    try:
        c = SiloClient(f"127.0.0.1:{port}")
        assert code_of(lambda: c.search("x")) == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(lambda: c.generate("x", mode="knn")) == grpc.StatusCode.FAILED_PRECONDITION
        assert c.score("LM-only still works").num_tokens > 0
    finally:
        server.stop(0)


def test_concurrency_limit_gives_resource_exhausted(store_dir, tiny_model):
    server, port, _ = start(tiny_model, [store_dir], max_concurrent=2)
    codes, lock = [], threading.Lock()

    def call():
        c = SiloClient(f"127.0.0.1:{port}")
        try:
            list(c.generate("The tower of Oslo", max_new_tokens=40, mode="knn", k=8))
            res = "OK"
        except grpc.RpcError as e:
            res = e.code().name
        with lock:
            codes.append(res)
        c.close()

    threads = [threading.Thread(target=call) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    server.stop(0)
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}


def test_deadline_and_cancellation_stop_generation(live):
    client, _, state = live
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("The tower of Oslo", max_new_tokens=500, mode="knn", k=8, timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = client.generate("The tower of Oslo", max_new_tokens=500, mode="knn", k=8)
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    t = time.perf_counter()
    assert client.score("responsive after cancellations").num_tokens > 0
    assert time.perf_counter() - t < 10


def _docs_seen(client: SiloClient, queries: list[str]) -> set[str]:
    seen = set()
    for q in queries:
        seen |= {h.doc_id for h in client.search(q, k=20).hits}
        for e in client.generate(q, max_new_tokens=3, mode="knn", k=16, lam=0.5, attribution_top=16):
            if e.HasField("token"):
                seen |= {a.doc_id for a in e.token.attribution}
    return seen


QUERIES = [f"The {t} of {p}" for t, p in (("lighthouse", "Lisbon"), ("observatory", "Kyoto"), ("library", "Quito"),
                                           ("bridge", "Oslo"), ("museum", "Nairobi"), ("harbour", "Tallinn"))]


def test_optout_is_honoured_at_once_with_status_and_stats(live):
    client, _, _ = live
    before = _docs_seen(client, QUERIES)
    victims = sorted(before)[:5]
    live_before = client.stats().stores[0].live_entries
    r = client.optout(doc_ids=victims, reason="owner request", confirm_large=True)
    assert sorted(r.removed_doc_ids) == victims and r.removed_entries > 0 and r.receipt_id
    assert not _docs_seen(client, QUERIES) & set(victims)
    st = client.optout_status(receipt_id=r.receipt_id)
    assert st.removed and sorted(st.removed_doc_ids) == victims and not st.compacted
    assert client.optout_status(doc_id=victims[0]).removed
    assert client.stats().stores[0].live_entries == live_before - r.removed_entries
    c = client.compact()
    assert c.rewritten_shards >= 1 and c.removed_entries == r.removed_entries
    assert client.optout_status(receipt_id=r.receipt_id).compacted
    assert not _docs_seen(client, QUERIES) & set(victims)


def test_optout_by_text_span_removes_every_document_containing_it(live):
    client, path, state = live
    span = "the observatory of Kyoto"
    store = state.token_store
    holders = {store.doc_id(d) for d in range(store.n_documents) if span in store.doc_text(d)}
    assert len(holders) > 1
    r = client.optout(text_span=span, confirm_large=True)
    assert set(r.removed_doc_ids) == holders
    assert not _docs_seen(client, QUERIES + ["In 1734, Claude Shannon finished the observatory of Kyoto"]) & holders


# ---------------------------------------------------------------------------- real processes


def _spawn(args: list[str], ready: Path, env: dict | None = None) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", *args, "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.time() + 120
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read().decode() if proc.stdout else ""
            proc.kill()
            raise AssertionError(f"server did not start: {out[-3000:]}")
        time.sleep(0.1)
    return proc


def _serve(tmp_path, model, store, env=None) -> tuple[subprocess.Popen, SiloClient]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    ready = tmp_path / "ready"
    proc = _spawn(["serve", "--model", str(model), "--store", str(store), "--port", "0", "--token-file",
                   str(token_file)], ready, env)
    return proc, SiloClient(f"127.0.0.1:{ready.read_text()}", token=TOKEN)


def test_kill9_after_acknowledged_optout_loses_nothing(tmp_path, store_dir, tiny_model):
    path = tmp_path / "store"
    shutil.copytree(store_dir, path)
    proc, client = _serve(tmp_path, tiny_model, path)
    victims = sorted(_docs_seen(client, QUERIES[:3]))[:4]
    client.optout(doc_ids=victims, confirm_large=True)
    os.kill(proc.pid, signal.SIGKILL)  # right after the acknowledgement
    proc.wait()
    proc, client = _serve(tmp_path, tiny_model, path)
    try:
        queries = QUERIES + [f"In {1700 + 17 * i}, someone finished the" for i in range(8)]
        assert not _docs_seen(client, queries) & set(victims)
        assert client.optout_status(doc_id=victims[0]).removed
    finally:
        proc.kill()
        proc.wait()


def test_remote_shards_answer_like_a_local_store(tmp_path, store_dir, tiny_model):
    from silo.server.app import build_server as bs
    from silo.server.remote import ShardSearchServicer

    shard_servers = []
    for shards in ({0}, {1}):
        srv, port, _ = bs({"ShardSearch": ShardSearchServicer(store_dir, shards)}, 0, auth=Auth(shard_token=SHARD_TOKEN))
        shard_servers.append((srv, port))
    remote = [f"127.0.0.1:{p}" for _, p in shard_servers]
    main, mport, _ = start(tiny_model, [store_dir], remote_shards=remote, shard_deadline_s=3.0)
    local, lport, _ = start(tiny_model, [store_dir])
    try:
        rc, lc = SiloClient(f"127.0.0.1:{mport}"), SiloClient(f"127.0.0.1:{lport}")
        for q in QUERIES:
            a, b = rc.search(q, k=8), lc.search(q, k=8)
            assert [h.entry_id for h in a.hits] == [h.entry_id for h in b.hits] and not a.partial
        assert rc.score("The library of Quito", mode="knn", k=8).perplexity == pytest.approx(
            lc.score("The library of Quito", mode="knn", k=8).perplexity, rel=1e-5)
        shard_servers[1][0].stop(0)
        with pytest.raises(grpc.RpcError) as e:
            rc.search(QUERIES[0], k=8)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "00001" in e.value.details()
        part = rc.search(QUERIES[0], k=8, allow_partial=True)
        assert part.partial and any("00001" in m for m in part.missing_shards) and len(part.hits) == 8
        assert code_of(lambda: rc.generate("x", mode="knn", k=4)) == grpc.StatusCode.UNAVAILABLE
    finally:
        for srv, _ in shard_servers:
            srv.stop(0)
        main.stop(0)
        local.stop(0)


def test_tls(tmp_path, store_dir, tiny_model):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    server, port, _ = start(tiny_model, [store_dir], tls=(cert.read_bytes(), key.read_bytes()))
    try:
        c = SiloClient(f"localhost:{port}", root_cert=cert.read_bytes())
        assert c.score("over TLS").num_tokens > 0
        plain = SiloClient(f"localhost:{port}", timeout=3)
        assert code_of(lambda: plain.score("no TLS")) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_retrieval_options_helper():
    o = retrieval_options("knn", k=5, lam=0.25, tiers=["pd"])
    assert o.mode == pb.RETRIEVAL_KNN and o.k == 5 and o.lambda_ == 0.25 and list(o.policy.tiers) == ["pd"]
    assert not retrieval_options().HasField("k")
    with pytest.raises(ValueError):
        retrieval_options("magic")


def test_ric_mode_and_passage_search_over_grpc(tmp_path, store_dir, tiny_model, corpus_dir):
    passages = tmp_path / "passages"
    build_store(BuildArgs(model=str(tiny_model), kind="passage", corpus=str(corpus_dir), out=str(passages),
                                         tiers=("restricted",), passage_tokens=64, progress=False))
    server, port, _ = start(tiny_model, [store_dir, passages])
    try:
        c = SiloClient(f"127.0.0.1:{port}")
        hits = c.search("lighthouse Lisbon Ada Lovelace", k=3, store="passage").hits
        assert len(hits) == 3 and "Lisbon" in hits[0].passage and hits[0].sentence
        events = list(c.generate("The lighthouse of Lisbon was built in", max_new_tokens=6, mode="ric"))
        tokens = [e.token for e in events if e.HasField("token")]
        assert len(tokens) == 6 and all(t.attribution for t in tokens)
        assert events[-1].summary.citations and events[-1].summary.citations[0].tier == "restricted"
        text = "In 1700, Ada Lovelace finished the lighthouse of Lisbon. The lighthouse of Lisbon was built in 1700."
        lm, ric = c.score(text), c.score(text, mode="ric")
        assert ric.num_tokens == lm.num_tokens and ric.perplexity > 0
        assert code_of(lambda: c.generate("x", mode="ric", k=0)) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)


NEW_TEXT = ("Zorblat the quokka keeper of Vrelling catalogued nine hundred lanterns. "
            "Every lantern of Vrelling was painted ochre by the keeper's apprentice.")
NEW_QUERY = "Zorblat the quokka keeper of Vrelling catalogued nine"


def _top_docs(client, query: str, k: int = 4) -> list[str]:
    return [h.doc_id for h in client.search(query, k=k).hits]


def test_add_documents_over_grpc_is_served_at_once_and_can_be_opted_out(live, tmp_path):
    client, path, _ = live
    entries_before = client.stats().stores[0].entries
    assert "ingest:zorblat" not in _top_docs(client, NEW_QUERY)
    existing = client.search(NEW_QUERY, k=1).hits[0].doc_id
    r = client.add_documents([{"doc_id": "ingest:zorblat", "text": NEW_TEXT, "source": "letters",
                               "license": "proprietary", "owner": "vrelling"},
                              {"doc_id": existing, "text": "a copy under an existing id", "license": "MIT"}])
    assert r.added_documents == 1 and r.added_entries > 0 and r.shard
    assert [(x.doc_id, x.reason) for x in r.refused] == [(existing, "duplicate doc id")]
    assert (path / "shards" / r.shard / "index.faiss").is_file()
    assert client.stats().stores[0].entries == entries_before + r.added_entries
    hit = client.search(NEW_QUERY, k=1).hits[0]  # the exact context is in the store now
    assert (hit.doc_id, hit.source, hit.owner) == ("ingest:zorblat", "letters", "vrelling")
    assert "Vrelling" in hit.sentence
    # the ingested text falls under the same promise as the rest
    gone = client.optout(doc_ids=["ingest:zorblat"])
    assert gone.removed_entries == r.added_entries
    assert "ingest:zorblat" not in _top_docs(client, NEW_QUERY, k=16)
    # without the admin token, ingest is refused and nothing is written
    anon = SiloClient(client.target)
    try:
        assert code_of(lambda: anon.add_documents([{"text": NEW_TEXT}])) in (
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        anon.close()
    assert code_of(lambda: client.add_documents([{"text": ""}])) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.stats().stores[0].entries == entries_before + r.added_entries


def test_another_process_ingest_is_served_without_restart(live):
    """`silo datastore add` (another process) switches the manifest; the running server
    serves the new shard from its next request on."""
    client, path, _ = live
    assert "ingest:elsewhere" not in _top_docs(client, NEW_QUERY)
    code = ("import sys; from silo.ingest import add_documents; "
            "r = add_documents(sys.argv[1], [{'doc_id': 'ingest:elsewhere', 'text': sys.argv[2], "
            "'license': 'proprietary', 'source': 'letters'}]); assert r['added_documents'] == 1, r")
    subprocess.run([sys.executable, "-c", code, str(path), NEW_TEXT], check=True, timeout=300)
    assert client.search(NEW_QUERY, k=1).hits[0].doc_id == "ingest:elsewhere"
    assert client.stats().stores[0].shards == 3
