"""Shard groups as Ray Serve deployments: replicas that Ray health-checks and restarts.

`silo serve --ray-address ADDR --shard-groups 0-3,4-7 --shard-replicas 2` opens the store
without indexes and deploys one Serve application per shard group (`deploy_shard_groups`):
a `ShardReplica` deployment with that many replicas, each holding the group's shards (the
same checked `ShardSearchServicer.search` a `silo serve-shards` server runs, so caps, deny
lists and the list assignment are validated alike), with its resource requests and at most
one replica per node, so losing a node costs each group one replica. An operator may deploy
the groups instead with `serve deploy tools/ray-serve.yaml` (`app` builds one group) and
attach the front to them with `--ray-apps`.

The front server calls a group through its `DeploymentHandle` (`RayShardGroup`, the same
interface as `silo.server.remote.RemoteShardGroup`): Serve routes each call to a live
replica; a call that fails because its replica died, or that is late, is retried within
the request's deadline (Serve stops routing to a dead replica and starts a new one). Only
a group with no replica able to answer fails, by name. Opt-outs need nothing from the
replicas: each re-reads the shared store's log before searching, and the front post-
filters every answer against its own tombstones, so a lagging replica never serves a
removed document. A compaction runs on one replica; the others see the manifest switch
and reopen between two calls.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import faiss
import numpy as np
from silo.datastore.manifest import Manifest
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import ShardUnavailable
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import BadRequest, Limits
from silo.server.remote import (
    ShardSearchServicer,
    parse_shard_range,
    shard_search_request,
    shard_search_result,
    try_budget,
)

APP_PREFIX = "silo-shards-"


class ShardReplica:
    """One replica of a shard group: the group's shards of a shared store, opened once
    (deployed by `replica_deployment`; Ray is the optional `distributed` extra, imported
    only where it is used)."""

    def __init__(self, store: str, shards: list[int], lists: str | None = None, threads: int = 1):
        faiss.omp_set_num_threads(threads)
        self.servicer = ShardSearchServicer(store, set(shards), Limits(), lists)
        self.pid = os.getpid()

    def search(self, request: bytes) -> bytes:
        return self.servicer.search(pb.ShardSearchRequest.FromString(request)).SerializeToString()

    def compact(self, fingerprint: str) -> dict:
        r = self.servicer.compact(pb.CompactShardsRequest(store_fingerprint=fingerprint))
        return {"rewritten_shards": r.rewritten_shards, "removed_entries": r.removed_entries, "seconds": r.seconds}

    def shards(self) -> list[str]:
        return list(self.servicer.names)

    def check_health(self) -> None:
        """Serve's health check: the store still opens (a switched manifest is reopened here)."""
        self.servicer.current()


def replica_deployment(replicas: int = 2, cpus: float = 1.0):
    """`ShardReplica` as a Serve deployment: Ray health-checks each replica every 2 s
    (`check_health`) and replaces one that fails; at most one replica per node."""
    from ray import serve

    if replicas < 1 or cpus <= 0:
        raise ValueError("a shard group needs at least 1 replica and a positive CPU request")
    return serve.deployment(ShardReplica, name="ShardReplica", num_replicas=replicas, max_replicas_per_node=1,
                            ray_actor_options={"num_cpus": cpus}, health_check_period_s=2,
                            health_check_timeout_s=10, max_ongoing_requests=16, graceful_shutdown_timeout_s=5)


def app_name(store_name: str, group: int) -> str:
    return f"{APP_PREFIX}{store_name}-{group}"


def app(args: dict):
    """A shard group's Serve application, for `serve deploy tools/ray-serve.yaml`: args
    `store`, `shards` ('0-3'), optional `lists` and `threads` (the file's deployment
    settings override replicas and resources)."""
    store = str(args["store"])
    shards = sorted(parse_shard_range(str(args["shards"]), len(Manifest.load(store).shards)))
    return replica_deployment().bind(store, shards, args.get("lists"), int(args.get("threads", 1)))


def deploy_shard_groups(store: str, groups: list[set[int]], replicas: int = 2, cpus: float = 1.0,
                        lists: str | None = None) -> list[str]:
    """Deploy one Serve application per shard group (an existing one is updated in place)
    and return their names; `ray.init` to the cluster first."""
    from ray import serve

    deployment = replica_deployment(replicas, cpus)
    serve.start(http_options={"location": "NoServer"})
    names = []
    for i, shards in enumerate(groups):
        name = app_name(os.path.basename(os.path.normpath(store)), i)
        serve.run(deployment.bind(store, sorted(shards), lists, max(1, int(cpus))), name=name, route_prefix=None,
                  blocking=False)
        names.append(name)
    return names


@dataclass
class RayShards:
    """`silo serve --ray-address`: where the shard groups run, and how many replicas."""

    address: str  # the Ray cluster ("auto", "ray://host:10001", a GCS address)
    groups: list[str] = field(default_factory=list)  # shard ranges, one per group (default: a group per shard)
    replicas: int = 2
    cpus: float = 1.0  # per replica
    apps: list[str] = field(default_factory=list)  # attach to these running applications instead of deploying

    def start(self, store: str, lists: str | None = None) -> list[str]:
        """Connect to the cluster, deploy the token store's shard groups (or find the given
        applications), and return the application names."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)
        if self.apps:
            return list(self.apps)
        n = len(Manifest.load(store).shards)
        groups = [parse_shard_range(g, n) for g in self.groups] or [{i} for i in range(n)]
        covered = sorted(x for g in groups for x in g)
        if covered != list(range(n)):
            raise ValueError(f"--shard-group ranges must cover shards 0-{n - 1} once each, got {covered}")
        return deploy_shard_groups(store, groups, self.replicas, self.cpus, lists)


class RayShardGroup:
    """The front server's handle on one shard group deployed on Ray Serve."""

    def __init__(self, app: str, fingerprint: str, deadline_s: float = 5.0, ready_s: float = 300.0):
        """Waits up to `ready_s` for the application to run (replicas load their shards)."""
        from ray import serve

        self.app, self.fingerprint, self.deadline_s = app, fingerprint, deadline_s
        self.target = app
        until = time.monotonic() + ready_s
        while True:
            status = serve.status().applications.get(app)
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > until:
                detail = status.message if status is not None else "no such application"
                raise ShardUnavailable(f"Ray Serve application {app} is not running: {detail}", [app])
            time.sleep(0.5)
        self.handle = serve.get_app_handle(app)
        self.shard_names = self.handle.shards.remote().result(timeout_s=deadline_s)
        self.names = [f"{n}@{app}" for n in self.shard_names]
        self._lock = threading.Lock()
        self.requests = self.failovers = 0
        self.latencies: deque[float] = deque(maxlen=4096)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None, policy: RetrievalPolicy | None,
               assigned: tuple[np.ndarray, np.ndarray] | None = None):
        """The group's top-k from one replica; a dead or late replica's call is retried."""
        req = shard_search_request(queries, k, nprobe, policy, assigned, self.fingerprint).SerializeToString()
        deadline = time.monotonic() + self.deadline_s
        errors = []
        with self._lock:
            self.requests += 1
            recent = list(self.latencies)
        attempt = 0
        while (left := deadline - time.monotonic()) > 0:
            t = time.monotonic()
            # the first try gets at most half the time (less once the group's pace is known):
            # a late replica leaves the rest to another, which Serve's router picks
            resp = self.handle.search.remote(req)
            try:
                out = resp.result(timeout_s=try_budget(left, 2 if attempt == 0 else 1, recent, len(queries)))
            except BadRequest:
                raise  # every replica would refuse it alike
            except Exception as e:  # noqa: BLE001 - a dead, late or restarting replica: try again
                resp.cancel()
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                with self._lock:
                    self.failovers += 1
                attempt += 1
                time.sleep(min(0.05 * attempt, 0.5, max(deadline - time.monotonic(), 0)))
                continue
            with self._lock:
                self.latencies.append((time.monotonic() - t) / len(queries))
            return shard_search_result(pb.ShardSearchResponse.FromString(out), len(queries), k)
        raise ShardUnavailable(f"shard group {self.app} ({', '.join(self.shard_names)}): no replica answered in "
                               f"{self.deadline_s:g} s: {'; '.join(errors[-3:]) or 'no time left'}", self.names)

    def compact(self) -> dict:
        try:
            return self.handle.compact.remote(self.fingerprint).result(timeout_s=3600)
        except Exception as e:  # noqa: BLE001 - reported by name
            raise ShardUnavailable(f"shard group {self.app} could not compact: {e}", self.names) from e

    def stats(self) -> dict:
        """Replicas from Serve's controller (target and running), calls, failovers, latency."""
        from ray import serve

        status = serve.status().applications.get(self.app)
        states: dict = {}
        target = 0
        if status is not None:
            for d in status.deployments.values():
                states = dict(d.replica_states)
                target = sum(states.values())
        with self._lock:
            lat = np.array(self.latencies) * 1e3
            requests, failovers = self.requests, self.failovers
        running = states.get("RUNNING", 0)
        return {"name": self.app, "shards": list(self.shard_names), "replicas": target, "healthy": running,
                "requests": requests, "failovers": failovers,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
                "down": [f"{n} replica(s) {s.lower()}" for s, n in sorted(states.items()) if s != "RUNNING"]}

    def close(self) -> None:
        pass
