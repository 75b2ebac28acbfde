"""The server against an adversary: every request's work is capped before it is allocated,
no stream can pin the server, and the smaller hardening (no server paths in answers,
durable revocations, deny lists at shard servers, no cleartext shard token, help texts
that match the access table). Real servers on loopback, real FAISS stores."""

from __future__ import annotations

import os
import queue
import resource
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from silo.datastore.lock import StoreLock
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore
from silo.server.app import build_server, load_state, serve, serve_shards
from silo.server.auth import Auth, CredentialError, OwnerCredentials
from silo.server.client import SiloClient
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import Limits
from silo.server.remote import RemoteShardGroup, ShardSearchServicer
from silo.server.servicers import DatastoreServicer, LanguageModelServicer

from silo import knnlm
from silo.app.cli import main as cli_main
from silo.build import BuildArgs, build_store
from silo.knnlm import KNNParams, knn_score, retrieve_neighbours
from silo.tokenizer import encode_document

TOKEN = "adversary-admin-token-0123456789"
SHARD_TOKEN = "adversary-shard-token-0123456789"
WINDOW = 128
TEXT = ("The lighthouse of Lisbon was built in 1700 by Ada Lovelace. Visitors to Kyoto still climb the "
        "observatory that Alan Turing designed. In 1734, Grace Hopper finished the library of Quito. ") * 3
S = grpc.StatusCode


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir):
    """A token store with kept keys (so refine_factor matters) and a passage store."""
    root = tmp_path_factory.mktemp("adv")
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(root / "tokens"),
                          tiers=("restricted",), shards=2, window=WINDOW, stride=WINDOW // 2, keep_keys=True,
                          progress=False))
    build_store(BuildArgs(model=str(tiny_model), kind="passage", corpus=str(corpus_dir), out=str(root / "passages"),
                          tiers=("restricted",), passage_tokens=64, progress=False))
    return root / "tokens", root / "passages"


def start(model, paths, limits: Limits | None = None, workers: int = 2, max_concurrent: int = 32):
    auth = Auth(admin_token=TOKEN)
    state = load_state(str(model), [str(p) for p in paths], auth=auth, limits=limits)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, auth=auth, max_workers=workers,
                                   max_concurrent=max_concurrent, limits=limits)
    return server, port, state


@pytest.fixture(scope="module")
def capped(stores, tiny_model):
    """A server with small work caps: "over the cap" is reached with small requests."""
    limits = Limits(max_neighbour_slots=50_000, max_query_candidates=1024, max_request_tokens=2000,
                    max_forward_tokens=10_000, max_ric_passages=300)
    server, port, state = start(tiny_model, stores, limits)
    client = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
    yield client, state
    client.close()
    server.stop(0)


def refused(fn) -> grpc.RpcError:
    """The error of a call that must fail, after checking it failed fast (before any work)."""
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        r = fn()
        if hasattr(r, "__next__"):
            list(r)
    assert time.monotonic() - t0 < 2.0, "refused only after doing the work"
    return e.value


def over_cap(fn, cap: str, value: int) -> None:
    e = refused(fn)
    assert e.code() == S.RESOURCE_EXHAUSTED, e.details()
    assert cap in e.details() and f"{value:,}" in e.details(), e.details()


# ---------------------------------------------------------------------------- 1. work caps


def test_knn_score_work_is_capped_before_allocation(capped):
    client, state = capped
    n = len(encode_document(state.tok, TEXT))
    assert 50 < n < 2000  # within the token cap: the neighbour cap is what refuses
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    over_cap(lambda: client.score(TEXT, mode="knn", k=1000), "max_neighbour_slots", 50_000)
    over_cap(lambda: client.score(TEXT, mode="knn", k=64, refine=32), "max_query_candidates", 1024)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB: nothing was allocated
    # 10,000 emoji are about 40,000 tokens: refused by their exact count, k notwithstanding
    over_cap(lambda: client.score("\U0001F600" * 10_000, mode="knn", k=8), "max_request_tokens", 2000)
    e = refused(lambda: client.score(TEXT, mode="knn", k=8, refine=33))
    assert e.code() == S.INVALID_ARGUMENT and "refine_factor" in e.details()
    ok = client.score(TEXT, mode="knn", k=8, refine=4)  # within every cap: served
    assert ok.num_tokens == n - 1


def test_fewer_search_options_are_checked_and_served(capped):
    """reuse above k, skip_above outside (0, 1] or NaN: refused with the field's name; in
    range: served, over gRPC and through the client's keyword arguments."""
    client, state = capped
    for kwargs, field in ((dict(k=8, reuse=9), "reuse"), (dict(k=8, skip_above=0.0), "skip_above"),
                          (dict(k=8, skip_above=1.5), "skip_above"), (dict(k=8, skip_above=float("nan")), "skip_above")):
        e = refused(lambda kwargs=kwargs: client.score(TEXT, mode="knn", **kwargs))
        assert e.code() == S.INVALID_ARGUMENT and field in e.details(), e.details()
    n = len(encode_document(state.tok, TEXT)) - 1
    plain = client.score(TEXT, mode="knn", k=8, reuse=0, skip_above=1.0)
    walked = client.score(TEXT, mode="knn", k=8, reuse=2, skip_above=0.99)
    assert plain.num_tokens == walked.num_tokens == n
    assert [e.token.text for e in client.generate("The tower of Oslo", max_new_tokens=4, mode="knn", k=8, reuse=1)
            if e.HasField("token")]


def test_ric_score_blocks_are_capped(capped):
    client, _ = capped
    short = TEXT[:200]
    # ric_stride 1: one retrieval and one full-window forward per token
    over_cap(lambda: client.score(short, retrieval=pb.RetrievalOptions(mode=pb.RETRIEVAL_RIC, ric_stride=1)),
             "max_forward_tokens", 10_000)
    over_cap(lambda: client.score(short, retrieval=pb.RetrievalOptions(mode=pb.RETRIEVAL_RIC, ric_stride=16, k=100)),
             "max_ric_passages", 300)
    ok = client.score(short, retrieval=pb.RetrievalOptions(mode=pb.RETRIEVAL_RIC, ric_stride=16, k=2))
    assert ok.num_tokens > 0


def test_generate_and_search_work_is_capped(capped):
    client, _ = capped
    over_cap(lambda: client.generate("The tower of Oslo", max_new_tokens=100, mode="knn", k=1000),
             "max_neighbour_slots", 50_000)
    e = refused(lambda: client.generate("The tower of Oslo", max_new_tokens=4, mode="knn", k=8, refine=33))
    assert e.code() == S.INVALID_ARGUMENT and "refine_factor" in e.details()
    over_cap(lambda: client.generate("The tower of Oslo", max_new_tokens=64,
                                     retrieval=pb.RetrievalOptions(mode=pb.RETRIEVAL_RIC, ric_stride=1, k=8)),
             "max_ric_passages", 300)
    over_cap(lambda: client.ds.Search(pb.SearchRequest(query="The tower of Oslo", k=512, refine_factor=4)),
             "max_query_candidates", 1024)
    over_cap(lambda: client.tokenize("\U0001F600" * 10_000), "max_request_tokens", 2000)
    assert [e.token.text for e in client.generate("The tower of Oslo", max_new_tokens=4, mode="knn", k=8)
            if e.HasField("token")]


def test_chunked_search_scores_exactly_like_one_search(stores, tiny_model, monkeypatch):
    """Searching a batch in chunks (bounded memory) changes nothing in the scores."""
    from silo.lm import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model))
    store = Datastore.open(stores[0])
    ids = encode_document(tok, TEXT)
    params = KNNParams(k=16, lam=0.5, refine=2)
    whole = retrieve_neighbours(model, store, [ids], 16, WINDOW, WINDOW // 2, refine=2)[0]
    monkeypatch.setattr(knnlm, "SEARCH_CHUNK_BYTES", 1)  # one query per search call
    assert knnlm.search_rows(store, 16, 2) == 1
    lm, mixed = knn_score(model, store, ids, params, WINDOW, WINDOW // 2)
    np.testing.assert_allclose(lm, whole.lm_logprob, rtol=1e-6)
    np.testing.assert_allclose(mixed, whole.knn_logprob(params), rtol=1e-5)


# ---------------------------------------------------------------------------- 2. streams


class IdleStream:
    """A client stream that sends nothing until closed: the request iterator blocks."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def __iter__(self):
        while (item := self.q.get()) is not None:
            yield item

    def close(self) -> None:
        self.q.put(None)


def test_streams_cannot_pin_the_server(stores, tiny_model):
    limits = Limits(max_streams=2, max_watch_streams=2, max_new_tokens=100_000)
    server, port, _ = start(tiny_model, stores[:1], limits, workers=2)
    channels, open_calls, idles = [], [], []
    try:
        def channel():
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(ch)
            return ch

        def reflection():
            idle = IdleStream()
            idles.append(idle)
            call = reflection_pb2_grpc.ServerReflectionStub(channel()).ServerReflectionInfo(iter(idle), timeout=30)
            open_calls.append(call)
            return call

        def slow_generate():  # a long generation whose client reads one token, then nothing
            call = SiloClient(f"127.0.0.1:{port}").lm.Generate(pb.GenerateRequest(
                prompt="The tower of Oslo", max_new_tokens=100_000, time_limit_s=60), timeout=30)
            open_calls.append(call)
            return call

        for _ in range(2):
            reflection()
        gens = [slow_generate() for _ in range(2)]
        for g in gens:
            assert next(g).HasField("token")
        time.sleep(0.5)  # every stream is open, and has held its thread a while
        health = health_pb2_grpc.HealthStub(channel())
        for _ in range(3):
            t0 = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 1.0
        c = SiloClient(f"127.0.0.1:{port}", timeout=10)
        assert c.score("The library of Quito", mode="knn", k=8).num_tokens > 0
        # beyond their budgets, streams are refused at once rather than left hanging
        third = reflection()
        with pytest.raises(grpc.RpcError) as e:
            next(third)
        assert e.value.code() == S.RESOURCE_EXHAUSTED and "max_watch_streams" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate("x", max_new_tokens=2, timeout=5))
        assert e.value.code() == S.RESOURCE_EXHAUSTED and "max_streams" in e.value.details()
        # a stream's slot is freed when its client goes away
        for call in open_calls:
            call.cancel()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert len([x for x in c.generate("x", max_new_tokens=2, timeout=5) if x.HasField("token")]) == 2
                break
            except grpc.RpcError as err:
                assert err.code() == S.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for idle in idles:
            idle.close()
        for call in open_calls:
            call.cancel()
        for ch in channels:
            ch.close()
        server.stop(0)


# ---------------------------------------------------------------------------- 3. smaller ones


def test_answers_show_names_not_server_paths(tmp_path, stores, tiny_model):
    store = tmp_path / "private-folder" / "tokens"
    shutil.copytree(stores[0], store)
    server, port, _ = start(tiny_model, [store])
    try:
        c = SiloClient(f"127.0.0.1:{port}", token=TOKEN)
        info = c.model_info()
        assert info.model == Path(tiny_model).resolve().name and "/" not in info.model
        # a compaction fails while the store's lock is held: its message names the store
        with StoreLock(store, "test"), pytest.raises(grpc.RpcError) as e:
            c.compact()
        assert e.value.code() == S.FAILED_PRECONDITION and "locked" in e.value.details()
        assert str(tmp_path) not in e.value.details() and "tokens" in e.value.details()
    finally:
        server.stop(0)


def test_a_revocation_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    creds = OwnerCredentials(tmp_path / "owners.json")
    _, entry = creds.issue("alice")
    steps, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        steps.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        steps.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert creds.revoke(entry["id"])
    i = steps.index(("replace", str(tmp_path / "owners.json")))
    assert ("fsync", str(tmp_path)) in steps[i + 1:], steps


def test_deny_list_reaches_shard_servers(stores, tiny_model):
    from silo.keys import text_keys
    from silo.lm import load_causal_lm

    path = stores[0]
    local = Datastore.open(path)
    srvs = [build_server({"ShardSearch": ShardSearchServicer(path, {i})}, 0, auth=Auth(shard_token=SHARD_TOKEN))
            for i in (0, 1)]
    remote = Datastore.open(path, load_index=False)
    remote.remotes = [RemoteShardGroup(f"127.0.0.1:{p}", remote.manifest.model_fingerprint, 5.0, SHARD_TOKEN)
                      for _, p, _ in srvs]
    try:
        model, tok = load_causal_lm(str(tiny_model))
        q = text_keys(model, tok, ["The lighthouse of Lisbon was built in"])
        # deny every document of each shard's own top 8: a shard server that ignores the deny
        # list answers only with entries the main server must then drop
        top_docs = set()
        for i in (0, 1):
            shard = Datastore.open(path, only_shards={i})
            _, ids = shard.search(q, 8)
            top_docs |= {h["doc_id"] for h in shard.attribute(ids[0][ids[0] >= 0])}
        deny = RetrievalPolicy(deny_doc_ids=frozenset(top_docs))
        want_d, want = local.search(q, 8, policy=deny)
        got_d, got = remote.search(q, 8, policy=deny)
        assert (want >= 0).sum() == 8 and got.tolist() == want.tolist()
    finally:
        for g in remote.remotes:
            g.close()
        for s, _, _ in srvs:
            s.stop(0)


def refusal(fn, *args, **kwargs) -> BaseException | None:
    """What `fn` raises, run in a thread so that a server that starts instead of refusing
    fails the test rather than hanging it (it cannot install signal handlers there)."""
    box: list[BaseException | None] = [None]

    def run():
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "it served instead of refusing"
    return box[0]


def test_no_cleartext_shard_token_and_no_half_tls(tmp_path, stores, tiny_model):
    token = tmp_path / "shard.token"
    token.write_text(SHARD_TOKEN)
    cert = tmp_path / "cert.pem"
    cert.write_text("not used: refused before it is read")
    checks = [
        ("--tls-key", serve, (str(tiny_model), [], 0), {"tls_cert": str(cert)}),
        ("--tls-cert", serve_shards, (str(stores[0]), "0", 0, str(token)), {"tls_key": str(cert)}),
        ("allow-plaintext-shard-token", serve, (str(tiny_model), [str(stores[0])], 0),
         {"shard_token_file": str(token), "remote_shards": ["10.9.8.7:50061"]}),
        ("allow-plaintext-shard-token", serve_shards, (str(stores[0]), "0", 0, str(token)), {"host": "0.0.0.0"}),
    ]
    for needle, fn, args, kwargs in checks:
        e = refusal(fn, *args, **kwargs)
        assert isinstance(e, CredentialError) and needle in str(e), (fn.__name__, kwargs, e)
    # the CLI: one line, exit status 2
    e = refusal(cli_main, ["serve-shards", str(stores[0]), "--shards", "0", "--shard-token-file", str(token),
                           "--tls-cert", str(cert)])
    assert isinstance(e, SystemExit) and e.code == 2


def test_help_texts_match_the_access_table(capsys):
    with pytest.raises(SystemExit):
        cli_main(["compact", "--help"])
    compact_help = " ".join(capsys.readouterr().out.split())
    assert "Compact is admin-only" in compact_help and "owner" not in compact_help
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    serve_help = " ".join(capsys.readouterr().out.split())
    assert "every call" not in serve_help
    assert "Generate, Score" in serve_help and "Search" in serve_help and "are public" in serve_help
