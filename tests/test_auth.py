"""Who may do what, and how much: credentials, the RPC access table, request limits, the
large-removal guard, shard credentials and TLS, compaction through shard servers."""

from __future__ import annotations

import shutil
import subprocess
import threading

import grpc
import pytest
from silo.datastore.optout import read_log
from silo.server.app import build_server
from silo.server.auth import RPC_ACCESS, Auth, OwnerCredentials
from silo.server.client import SiloClient
from silo.server.gen import silo_pb2 as pb
from silo.server.gen import silo_pb2_grpc as pb_grpc
from silo.server.limits import Limits
from silo.server.remote import ShardSearchServicer
from test_server import SHARD_TOKEN, TOKEN, code_of, start

from silo.build import BuildArgs, build_store

INV = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def owned(tmp_path, store_dir_auth, tiny_model):
    path = tmp_path / "store"
    shutil.copytree(store_dir_auth, path)
    creds = OwnerCredentials(tmp_path / "credentials.json")
    tokens = {o: creds.issue(o)[0] for o in ("owner-1", "owner-2")}
    server, port, state = start(tiny_model, [path], owners=creds)
    target = f"127.0.0.1:{port}"
    clients = {"admin": SiloClient(target, token=TOKEN), "anon": SiloClient(target),
               **{o: SiloClient(target, token=t) for o, t in tokens.items()}}
    yield clients, path, state, creds
    for c in clients.values():
        c.close()
    server.stop(0)


@pytest.fixture(scope="module")
def store_dir_auth(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("auth") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                                shards=2, window=128, stride=64, progress=False))
    return out


def _docs_of(state, owner: str) -> list[str]:
    st = state.token_store
    return [st.doc_id(d) for d in range(st.n_documents) if st.doc_owner(d) == owner]


def test_every_rpc_of_the_contract_is_classified():
    methods = {f"/silo.v1.{s.name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert methods <= set(RPC_ACCESS), sorted(methods - set(RPC_ACCESS))
    assert {RPC_ACCESS[m] for m in methods} <= {"public", "owner", "admin", "shard"}


def test_owner_tokens_are_hashed_at_rest(tmp_path):
    creds = OwnerCredentials(tmp_path / "c.json")
    token, entry = creds.issue("ann")
    text = (tmp_path / "c.json").read_text()
    assert token not in text and token.split("-")[-1] not in text and entry["sha256"] in text
    assert creds.owner_of(token) == "ann" and creds.owner_of(token + "x") is None
    assert creds.revoke(entry["id"]) and creds.owner_of(token) is None


def test_an_owner_removes_only_their_own_documents(owned):
    clients, path, state, _ = owned
    mine, theirs = _docs_of(state, "owner-1"), _docs_of(state, "owner-2")
    log_size = (path / "optout.log").stat().st_size if (path / "optout.log").exists() else 0
    for call in (lambda: clients["owner-1"].optout(doc_ids=[theirs[0]]),
                 lambda: clients["owner-1"].optout(doc_ids=[mine[0], theirs[0]]),
                 lambda: clients["owner-1"].optout(owner="owner-2", confirm_large=True),
                 lambda: clients["owner-1"].optout_status(doc_id=theirs[0])):
        assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    assert ((path / "optout.log").stat().st_size if (path / "optout.log").exists() else 0) == log_size  # nothing logged
    r = clients["owner-1"].optout(doc_ids=[mine[0]])
    assert list(r.removed_doc_ids) == [mine[0]]
    # a source removal by an owner is scoped to that owner's documents
    src = state.token_store.doc_source(state.token_store.doc_index(mine[1]))
    r2 = clients["owner-1"].optout(source=src, confirm_large=True)
    st = state.token_store
    assert r2.removed_doc_ids and all(st.doc_owner(st.doc_index(d)) == "owner-1" for d in r2.removed_doc_ids)
    assert not any(st.dead_docs[st.doc_index(d)] for d in theirs)
    assert read_log(path).records[-1]["scope_owner"] == "owner-1"
    # status: the owner sees their removal's values; another owner is denied; admin sees all
    mine_status = clients["owner-1"].optout_status(receipt_id=r2.receipt_id)
    assert mine_status.logged and mine_status.tombstoned and list(mine_status.values) == [src]
    assert mine_status.made_by == "owner:owner-1" and not mine_status.values_redacted
    assert code_of(lambda: clients["owner-2"].optout_status(receipt_id=r2.receipt_id)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: clients["anon"].optout_status(receipt_id=r2.receipt_id)) == grpc.StatusCode.UNAUTHENTICATED
    assert list(clients["admin"].optout_status(receipt_id=r2.receipt_id).values) == [src]


def test_status_proves_logged_tombstoned_compacted_and_redacts_values(owned):
    clients, path, state, creds = owned
    victim = _docs_of(state, "owner-2")[0]
    span = state.token_store.doc_text(state.token_store.doc_index(victim))[:40]
    r = clients["admin"].optout(text_span=span, confirm_large=True)
    assert victim in r.removed_doc_ids
    owner_view = clients["owner-2"].optout_status(doc_id=victim)
    assert owner_view.removed and owner_view.logged and owner_view.tombstoned and not owner_view.compacted
    assert owner_view.values_redacted and not owner_view.values  # made by the admin: the span stays hidden
    assert owner_view.stores[0].tombstoned and owner_view.stores[0].live_entries == 0
    clients["admin"].compact()
    after = clients["admin"].optout_status(receipt_id=r.receipt_id)
    assert after.compacted and after.stores[0].compacted and list(after.values) == [span]


def test_large_removals_need_confirmation_and_dry_runs_change_nothing(owned):
    clients, path, state, _ = owned
    admin = clients["admin"]
    assert code_of(lambda: admin.optout(owner="owner-1")) == grpc.StatusCode.FAILED_PRECONDITION
    dry = admin.optout(owner="owner-1", dry_run=True)
    assert dry.dry_run and not dry.receipt_id and set(dry.removed_doc_ids) == set(_docs_of(state, "owner-1"))
    assert not (path / "optout.log").exists() and not state.token_store.dead_docs.any()
    assert code_of(lambda: admin.optout(text_span="The ")) == INV  # too short to mean anything
    r = admin.optout(owner="owner-1", confirm_large=True)
    assert r.receipt_id and set(r.removed_doc_ids) == set(dry.removed_doc_ids)
    one = admin.optout(doc_ids=[_docs_of(state, "owner-2")[0]])  # a single document is never "large"
    assert len(one.removed_doc_ids) == 1


def test_request_limits_and_malformed_values(tmp_path, store_dir_auth, tiny_model):
    limits = Limits(max_k=32, max_nprobe=16, max_new_tokens=8, max_text_chars=500, max_stop_sequences=2,
                    max_patterns=3, max_attribution_top=4)
    server, port, _ = start(tiny_model, [store_dir_auth], limits=limits)
    c = SiloClient(f"127.0.0.1:{port}")
    try:
        nan, inf = float("nan"), float("inf")
        bad = [
            lambda: c.search("x", k=33), lambda: c.search("x", nprobe=17), lambda: c.search("x" * 501),
            lambda: c.search("x", deny_sources=["a", "b", "c", "d"]), lambda: c.search("x", tiers=["gold"]),
            lambda: c.search("x", deny_licenses=["x" * 300]),
            lambda: c.generate("x", max_new_tokens=9), lambda: c.generate("x", stop=("a", "b", "c")),
            lambda: c.generate("x", temperature=nan), lambda: c.generate("x", top_p=inf),
            lambda: c.generate("x", time_limit_s=-1.0), lambda: c.generate("x", attribution_top=5),
            lambda: c.generate("x", mode="knn", lam=nan), lambda: c.generate("x", mode="knn", temperature=inf),
            lambda: c.generate("x", mode="knn", k=33), lambda: c.score("x", mode="knn", nprobe=100),
            lambda: c.score("some text", window=100_000), lambda: c.score("some text", window=64, stride=65),
        ]
        for i, call in enumerate(bad):
            assert code_of(call) == INV, i
        unknown_mode = pb.RetrievalOptions(mode=7)
        with pytest.raises(grpc.RpcError) as e:
            list(c.lm.Generate(pb.GenerateRequest(prompt="x", retrieval=unknown_mode), timeout=10))
        assert e.value.code() == INV and "mode" in e.value.details()
        assert c.score("still serving").num_tokens > 0 and c.health() == "SERVING"
    finally:
        c.close()
        server.stop(0)


def test_shard_servers_need_the_shard_token_and_speak_tls(tmp_path, store_dir_auth, tiny_model):
    store = tmp_path / "store"
    shutil.copytree(store_dir_auth, store)
    tls = None
    if shutil.which("openssl"):
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        tls = (cert.read_bytes(), key.read_bytes())
    shard, sport, _ = build_server({"ShardSearch": ShardSearchServicer(store, {0, 1})}, 0,
                                   auth=Auth(shard_token=SHARD_TOKEN), tls=tls)
    host = "localhost" if tls else "127.0.0.1"
    try:
        creds = grpc.ssl_channel_credentials(tls[0]) if tls else None
        ch = grpc.secure_channel(f"{host}:{sport}", creds) if tls else grpc.insecure_channel(f"{host}:{sport}")
        stub = pb_grpc.ShardSearchStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchShards(pb.ShardSearchRequest(num_queries=0), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        main, mport, state = start(tiny_model, [store], remote_shards=[f"{host}:{sport}"],
                                   shard_root_cert=tls[0] if tls else None)
        try:
            c = SiloClient(f"127.0.0.1:{mport}", token=TOKEN)
            hits = c.search("The bridge of Oslo", k=8).hits
            assert len(hits) == 8 and len({h.entry_id for h in hits}) == 8
            victims = sorted({h.doc_id for h in hits})[:2]
            c.optout(doc_ids=victims, confirm_large=True)
            res = c.compact()  # asked of the shard server; the main server loads no index
            assert res.rewritten_shards >= 1
            assert all(s.index is None for s in state.token_store.shards)
            hits2 = c.search("The bridge of Oslo", k=8).hits
            ids = [h.entry_id for h in hits2]
            assert len(ids) == len(set(ids)) == 8 and not {h.doc_id for h in hits2} & set(victims)
        finally:
            main.stop(0)
    finally:
        shard.stop(0)


def test_concurrent_dense_passage_searches_share_one_tokenizer(tmp_path, tiny_model, corpus_dir):
    """Fast tokenizers raise "Already borrowed" if two threads reconfigure them at once."""
    from silo.datastore.passages import PassageStore

    from silo.embed import passage_search
    from silo.lm import load_causal_lm

    out = tmp_path / "passages"
    build_store(BuildArgs(model=str(tiny_model), kind="passage", corpus=str(corpus_dir), out=str(out),
                                         tiers=("restricted",), passage_tokens=32, retrievers=("bm25", "dense"),
                                         progress=False))
    store = PassageStore.open(out)
    model, tok = load_causal_lm(tiny_model)
    errors = []

    def run(i: int) -> None:
        try:  # dense searches interleaved with plain tokenization (Score, Generate) as a server sees them
            for j in range(20):
                text = f"The tower of Oslo {i} {j} " * (1 + j % 40)
                if (i + j) % 2:
                    passage_search(store, [text], 3, retriever="dense", model=model, tok=tok)
                else:
                    tok([text] * 4)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors[:3]

