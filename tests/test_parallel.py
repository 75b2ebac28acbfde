"""Distributed build: worker processes and Ray build the same store, shard for shard."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from silo.datastore.store import Datastore

from silo.build import BuildArgs, build_store
from silo.evaluate import load_eval_docs, perplexity
from silo.knnlm import KNNParams, retrieve_neighbours
from silo.lm import load_causal_lm


def _build(out, tiny_model, corpus_dir, **kw):
    return build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out),
                                       tiers=("restricted", "by"), shards=4, window=64, stride=32, progress=False, **kw))


def _knn_ppl(store_dir, tiny_model, corpus_dir):
    model, tok = load_causal_lm(tiny_model)
    store = Datastore.open(store_dir)
    _, docs = load_eval_docs(str(corpus_dir), tok, "test", ("restricted", "by"))
    neigh = retrieve_neighbours(model, store, docs, 16, 64, 32, 8, tok.pad_token_id)
    return perplexity([n.knn_logprob(KNNParams(k=16, lam=0.5, temperature=10.0)) for n in neigh])


def test_worker_processes_retry_failed_shards(tmp_path, tiny_model, corpus_dir, monkeypatch):
    """Every shard's first attempt fails in its worker process; retries finish the build."""
    import faults

    import silo.build

    monkeypatch.setattr(silo.build, "shard_worker", faults.flaky_shard_worker)  # what the build runs per shard
    monkeypatch.setenv("FAULTS_DIR", str(tmp_path / "faults"))
    (tmp_path / "faults").mkdir()
    m = _build(tmp_path / "s", tiny_model, corpus_dir, backend="local", workers=2)
    assert len(list((tmp_path / "faults").iterdir())) == 4  # each shard failed once
    store = Datastore.open(tmp_path / "s")
    assert store.n_entries == m.entries and all(s.info.entries > 0 for s in store.shards)
    monkeypatch.setenv("FAULTS_DIR", str(tmp_path / "faults2"))
    (tmp_path / "faults2").mkdir()
    with pytest.raises(RuntimeError, match="injected"):
        _build(tmp_path / "t", tiny_model, corpus_dir, backend="local", workers=2, retries=0)


def test_unknown_backend_is_an_error(tmp_path, tiny_model, corpus_dir):
    with pytest.raises(ValueError, match="unknown backend"):
        _build(tmp_path / "x", tiny_model, corpus_dir, backend="spark")


@pytest.mark.slow
def test_a_ray_build_survives_losing_a_node(tmp_path, tiny_model, corpus_dir):
    """A real multi-node Ray cluster on this machine: a worker node is removed while the
    build runs (one of its shard builders dies with it) and another joins, as an autoscaler
    would add one. Ray restarts the builder there and retries its shard; the store is byte
    for byte the store local worker processes write, and scores alike."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # builders only on the workers
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    out = tmp_path / "ray"
    failure: list[BaseException] = []

    def build():
        try:
            _build(out, tiny_model, corpus_dir, backend="ray", workers=2, ray_address=cluster.address, retries=3)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failure.append(e)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        until = time.monotonic() + 600
        while not list((out / "shards").glob("*/shard.json")) and builder.is_alive() and time.monotonic() < until:
            time.sleep(0.1)  # one shard finished: both builders are loaded and have work in flight
        killed = builder.is_alive()
        cluster.remove_node(workers[0])
        cluster.add_node(num_cpus=1)
        builder.join(600)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not failure and not builder.is_alive(), failure
    assert killed  # the node went while the build ran
    _build(tmp_path / "local", tiny_model, corpus_dir, backend="local", workers=2)
    a, b = Datastore.open(tmp_path / "local"), Datastore.open(out)
    assert len(a.shards) == len(b.shards) == 4
    for sa, sb in zip(a.shards, b.shards, strict=True):
        files = sorted(f.name for f in sa.path.iterdir())
        assert files == sorted(f.name for f in sb.path.iterdir())
        for name in files:
            assert (sa.path / name).read_bytes() == (sb.path / name).read_bytes(), (sa.info.name, name)
    q = np.random.default_rng(0).standard_normal((16, a.manifest.dim)).astype(np.float32)
    np.testing.assert_array_equal(a.search(q, 10)[1], b.search(q, 10)[1])
    assert _knn_ppl(tmp_path / "local", tiny_model, corpus_dir) == _knn_ppl(out, tiny_model, corpus_dir)
