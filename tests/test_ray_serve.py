"""Shard groups on Ray Serve, on a real three-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`): `silo serve --ray-address` deploys two shard groups of two
replicas (at most one per node) and serves through their deployment handles. A replica is
killed, then a whole node, while several clients Score, Search and opt out: no request
fails, no removed document is served, the answers are the single-process store's, Ray
restarts the killed replica, and places the node's replicas on a node that joins."""

from __future__ import annotations

import time

import pytest
import yaml
from silo.datastore.store import Datastore
from silo.server.client import SiloClient
from test_replicas import (
    ADMIN,
    _kill,
    _launch,
    _wait,
    assert_single_process_answers,
    build_ivf_store,
    under_load,
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory, tiny_model, corpus_dir):
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray-serve")
    store = build_ivf_store(root, tiny_model, corpus_dir)
    (root / "admin.token").write_text(ADMIN + "\n")
    # no CPU on the head: each worker node holds exactly one replica of each group
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    front = None
    try:
        front, ready = _launch(["serve", "--model", str(tiny_model), "--store", str(store), "--ray-address",
                                cluster.address, "--shard-replicas", "2", "--shard-cpus", "0.25", "--token-file",
                                str(root / "admin.token"), "--shard-deadline", "10"], root, "front")
        target = _wait(front, ready)
        yield {"store": store, "front": target, "cluster": cluster, "workers": workers, "root": root}
    finally:
        if front is not None:
            _kill(front)
        ray.shutdown()
        cluster.shutdown()


def _replicas(app: str) -> list[str]:
    """The named actors of an application's replicas (`SERVE_REPLICA::app#deployment#id`)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app]
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def test_replicas_are_killed_and_nodes_lost_under_load(ray_served, tiny_model):
    from ray import serve

    store, front = ray_served["store"], ray_served["front"]
    apps = sorted(a for a in serve.status().applications if a.startswith("silo-shards-"))
    assert len(apps) == 2 and all(len(_replicas(a)) == 2 for a in apps)
    local = Datastore.open(store)
    to_remove = [local.docs.doc_id(d) for d in range(1, local.n_documents, max(1, local.n_documents // 5))][:5]

    def disrupt():
        nonlocal lost
        time.sleep(2)
        victim = _replicas(apps[0])[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # one replica dies …
        time.sleep(4)
        ray_served["cluster"].remove_node(ray_served["workers"][0])  # … then a whole node
        until = time.monotonic() + 30
        while lost < 2 and time.monotonic() < until:  # Serve's controller sees the node's replicas die
            time.sleep(0.5)
            lost = 4 - sum(_running(a) for a in apps)
        time.sleep(3)

    lost = 0
    under_load(front, to_remove, disrupt, pace=1.5).check(to_remove)
    assert lost >= 2  # the node held one replica of each group (the killed one may still be restarting)

    assert_single_process_answers(front, store, tiny_model)
    with SiloClient(front) as c:
        # a node joins (as an autoscaler would add one): Ray places the lost replicas on it
        ray_served["cluster"].add_node(num_cpus=1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            groups = c.stats().stores[0].shard_groups
            if all(g.healthy == 2 for g in groups):
                break
            time.sleep(1)
    assert [g.healthy for g in groups] == [2, 2], groups
    assert sorted(g.name for g in groups) == apps and all(g.requests > 0 for g in groups)


def test_the_deployment_file_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema
    from test_readme import ROOT

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "tools" / "ray-serve.yaml").read_text()))
    assert {a.import_path for a in cfg.applications} == {"silo.server.ray_shards:app"}
    assert all(d.max_replicas_per_node == 1 and d.num_replicas >= 2 for a in cfg.applications for d in a.deployments)
