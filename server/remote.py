"""A datastore too large for one machine: shard servers behind the same Datastore API.

`silo serve-shards STORE --shards 0-3 --port P` loads only those shards' indexes and
answers `ShardSearch.SearchShards` (vectors in, per-shard-merged top-k out). The main
server opens the store without indexes, attaches one `RemoteShardGroup` per shard
group, and `Datastore.search_ex` fans out to them in parallel with a per-group deadline,
merging exactly as for local shards. A group may have several replicas (`--remote-shards
a:1+b:1,c:1+d:1`): a replica down or late is retried on another within the deadline, and
a background health check keeps track of which are up. Only a group whose every replica
fails raises `ShardUnavailable` naming its shards — or, only when the request allows
partial results, is listed as missing. Never a silent partial answer.

Both sides read the same store folder (shared storage): a shard server re-reads
`optout.log` when it changes and reopens the store when a compaction switches the
manifest, and the main server post-filters every result against its own tombstones, so
an acknowledged removal is honoured even by a shard server that has not caught up yet.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from silo.datastore.compact import compact
from silo.datastore.errors import FingerprintMismatch, StoreError
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore, ShardUnavailable
from silo.server.gen import silo_pb2 as pb
from silo.server.gen import silo_pb2_grpc as pb_grpc
from silo.server.limits import BadRequest, Limits, check_int, policy_from_pb
from silo.server.status import guarded


def parse_shard_range(spec: str, n_shards: int) -> set[int]:
    """'0-3', '0,2,5' or '1-2,7' -> shard numbers, checked against the store."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if lo > hi:
            raise ValueError(f"bad shard range {part!r}")
        out.update(range(lo, hi + 1))
    bad = sorted(x for x in out if not 0 <= x < n_shards)
    if bad or not out:
        raise ValueError(f"shards {spec!r}: the store has shards 0-{n_shards - 1}")
    return out


def _policy_pb(policy: RetrievalPolicy | None) -> pb.RetrievalPolicy:
    p = policy or RetrievalPolicy()
    return pb.RetrievalPolicy(tiers=list(p.tiers or ()), allow_licenses=p.allow_licenses,
                              deny_licenses=p.deny_licenses, allow_sources=p.allow_sources,
                              deny_sources=p.deny_sources, deny_owners=p.deny_owners)


class ShardSearchServicer(pb_grpc.ShardSearchServicer):
    """Serves some shards of a store; reopens it when a compaction switches the manifest.
    Callers need the shard token (checked by `silo.server.auth` before a method runs)."""

    def __init__(self, path: str | os.PathLike, shards: set[int], limits: Limits | None = None,
                 lists: str | None = None):
        self.path, self.shard_numbers, self.limits, self.lists = Path(path), shards, limits or Limits(), lists
        self.max_reply_bytes = 16 << 20  # the server's send limit (build_server's max_message_bytes)
        self._lock = threading.Lock()
        self._open()

    def _stamp(self) -> int:
        return (self.path / "manifest.json").stat().st_mtime_ns

    def _open(self) -> None:
        self.store = Datastore.open(self.path, only_shards=self.shard_numbers, lists=self.lists)
        self.stamp = self._stamp()
        self.names = [self.store.shards[i].info.name for i in sorted(self.shard_numbers)]

    def current(self) -> Datastore:
        with self._lock:
            if self._stamp() != self.stamp:
                self._open()
            return self.store

    def _check_fingerprint(self, store: Datastore, fingerprint: str) -> None:
        if fingerprint and fingerprint != store.manifest.model_fingerprint:
            raise FingerprintMismatch(f"shard server holds a store of another model "
                                      f"({store.manifest.model_fingerprint})")

    @guarded
    def CompactShards(self, request, context):
        return self.compact(request)

    @guarded
    def SearchShards(self, request, context):
        return self.search(request)

    def compact(self, request: pb.CompactShardsRequest) -> pb.CompactResponse:
        """Compact this server's shards (under the store's lock), then reopen them."""
        self._check_fingerprint(self.current(), request.store_fingerprint)
        res = compact(self.path, only_shards=self.shard_numbers)
        self.current()  # the manifest switched: reopen now, not on the next search
        return pb.CompactResponse(**res)

    def search(self, request: pb.ShardSearchRequest) -> pb.ShardSearchResponse:
        """The checked search behind `SearchShards` (and behind a Ray Serve replica's call):
        caps, fingerprint, deny list and list assignment validated before any work."""
        store = self.current()
        self._check_fingerprint(store, request.store_fingerprint)
        if request.num_queries == 0:  # handshake: which shards are here
            return pb.ShardSearchResponse(shards=self.names)
        check_int("num_queries", request.num_queries, 0, 1 << 20)
        if request.dim != store.manifest.dim or len(request.queries) != 4 * request.num_queries * request.dim:
            raise BadRequest("queries do not match num_queries x dim")
        check_int("k", request.k, 1, self.limits.max_k)
        if request.num_queries * request.k * 12 > self.max_reply_bytes:  # checked before the work, not after
            raise BadRequest(f"{request.num_queries:,} queries x k {request.k} would not fit one reply; "
                             "send fewer queries per call")
        check_int("nprobe", request.nprobe, 0, self.limits.max_nprobe)
        q = np.frombuffer(request.queries, dtype="<f4").reshape(request.num_queries, request.dim)
        if not np.isfinite(q).all():
            raise BadRequest("queries must be finite")
        policy = policy_from_pb(request.policy, self.limits)
        if request.deny_doc_ids:  # the caller's deny list (decontamination, evaluation): inside the search
            check_int("deny_doc_ids (count)", len(request.deny_doc_ids), 0, self.limits.max_deny_doc_ids)
            policy = replace(policy, deny_doc_ids=frozenset(request.deny_doc_ids))
        assigned = None
        if request.lists or request.coarse:
            if not request.nprobe or len(request.lists) != 8 * request.num_queries * request.nprobe \
                    or len(request.coarse) != 4 * request.num_queries * request.nprobe:
                raise BadRequest("lists and coarse must be (num_queries, nprobe) int64 and float32")
            lists = np.frombuffer(request.lists, dtype="<i8").reshape(request.num_queries, request.nprobe)
            nlist = store.trained.nlist if store.trained is not None and hasattr(store.trained, "nlist") else None
            if nlist is None or lists.min() < -1 or lists.max() >= nlist:
                raise BadRequest("list numbers out of range for this store's index")
            coarse = np.frombuffer(request.coarse, dtype="<f4").reshape(request.num_queries, request.nprobe)
            assigned = (coarse, lists)
        res = store.search_ex(q, request.k, request.nprobe or None, policy, assigned=assigned, refine=1)
        return pb.ShardSearchResponse(distances=res.distances.astype("<f4").tobytes(),
                                      ids=res.ids.astype("<i8").tobytes(), shards=self.names)


def parse_remote_shards(specs: list[str]) -> list[list[str]]:
    """`--remote-shards` values -> shard groups, each a list of replica addresses: groups are
    separated by commas (or given one per flag), a group's replicas by '+':
    'node1:50061+node3:50061,node2:50061+node4:50061' is two groups of two replicas."""
    groups = [[t.strip() for t in spec.split("+")] for item in specs for spec in item.split(",") if spec.strip()]
    for g in groups:
        if not all(g) or len(set(g)) != len(g):
            raise ValueError(f"bad shard group {'+'.join(g)!r}: replicas are distinct host:port joined by '+'")
    return groups


def shard_search_request(queries: np.ndarray, k: int, nprobe: int | None, policy: RetrievalPolicy | None,
                         assigned: tuple[np.ndarray, np.ndarray] | None, fingerprint: str) -> pb.ShardSearchRequest:
    """What the main server sends a shard group (over gRPC, or to a Ray Serve replica)."""
    req = pb.ShardSearchRequest(queries=np.ascontiguousarray(queries, dtype="<f4").tobytes(),
                                num_queries=len(queries), dim=queries.shape[1], k=k, nprobe=nprobe or 0,
                                policy=_policy_pb(policy), store_fingerprint=fingerprint,
                                deny_doc_ids=sorted(policy.deny_doc_ids) if policy is not None else [])
    if assigned is not None:
        coarse, lists = assigned
        req.nprobe = lists.shape[1]
        req.lists = np.ascontiguousarray(lists, dtype="<i8").tobytes()
        req.coarse = np.ascontiguousarray(coarse, dtype="<f4").tobytes()
    return req


def shard_search_result(resp: pb.ShardSearchResponse, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (n, k), of a shard group's answer; a malformed one is refused."""
    if len(resp.distances) != 4 * n * k or len(resp.ids) != 8 * n * k:
        raise ShardUnavailable(f"shard group answered {len(resp.ids) // 8} ids for {n} x {k}", [])
    return (np.frombuffer(resp.distances, dtype="<f4").reshape(n, k),
            np.frombuffer(resp.ids, dtype="<i8").reshape(n, k))


LATE_FACTOR, LATE_SLACK_S = 4.0, 0.1  # a try is late past 4x the group's p99 per query, plus 100 ms


def try_budget(left: float, tries_left: int, per_query: list[float], n_queries: int) -> float:
    """Seconds one try of a shard call gets: its share of the time `left`, and, unless it is
    the last try, no more than `LATE_FACTOR` x the group's p99 seconds per query of recent
    calls (× the queries, so a large batch is not mistaken for a stall) + `LATE_SLACK_S`:
    a stalled replica is given up on in a fraction of the deadline."""
    budget = left / tries_left
    if tries_left > 1 and len(per_query) >= 20:
        budget = min(budget, LATE_FACTOR * float(np.percentile(per_query, 99)) * n_queries + LATE_SLACK_S)
    return budget


class _Replica:
    """One shard server of a group: its channel, and what the group knows of its health."""

    def __init__(self, target: str, fingerprint: str, token: str | None, root_cert: bytes | None):
        self.target, self.fingerprint = target, fingerprint
        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=opts)
                        if root_cert else grpc.insecure_channel(target, options=opts))
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.stub = pb_grpc.ShardSearchStub(self.channel)
        self.healthy = True
        self.error = ""

    def handshake(self, timeout: float) -> list[str]:
        """The names of the shards this server holds (a search of no queries); raises grpc.RpcError."""
        resp = self.stub.SearchShards(pb.ShardSearchRequest(num_queries=0, store_fingerprint=self.fingerprint),
                                      timeout=timeout, metadata=self.metadata)
        return list(resp.shards)

    def mark(self, healthy: bool, error: str = "") -> None:
        self.healthy, self.error = healthy, error


class RemoteShardGroup:
    """The main server's handle on one shard group: one or more `silo serve-shards` servers
    (replicas) holding the same shards of a shared store.

    A search goes to a healthy replica (round robin), and is retried on the next one when
    that replica is down or late, within the call's deadline: each attempt gets the time
    left divided by the replicas left to try, and at most 4x what the group's calls take
    (p99 per query, + 100 ms), so a stalled replica is given up on in a fraction of the
    deadline and leaves time for the others.
    A background thread checks every replica every `health_period_s` (a handshake), so a
    replica that comes back is used again and a dead one is tried last. Only when every
    replica fails does the search raise `ShardUnavailable`, naming the group's shards and
    each replica's error. Opt-outs need nothing from the replicas: each re-reads the shared
    log, and the main server post-filters every answer against its own tombstones."""

    def __init__(self, targets: str | list[str], fingerprint: str, deadline_s: float = 5.0, token: str | None = None,
                 root_cert: bytes | None = None, health_period_s: float = 1.0):
        """`targets`: the replicas' host:port; `token`: the shard token; `root_cert`: verify
        the shard servers' TLS certificates with it (the main server speaks TLS to its
        shards whenever it serves TLS itself)."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("a shard group needs at least one replica address")
        self.fingerprint, self.deadline_s, self.health_period_s = fingerprint, deadline_s, health_period_s
        self.replicas = [_Replica(t, fingerprint, token, root_cert) for t in targets]
        self.target = "+".join(targets)
        self.shard_names: list[str] = []
        for r in self.replicas:  # learn the shard names; a replica down now is named by address
            try:
                names = r.handshake(min(deadline_s, 2.0))
            except grpc.RpcError as e:
                r.mark(False, e.code().name)
                continue
            if self.shard_names and names != self.shard_names:
                raise StoreError(f"replicas of one shard group must serve the same shards: {self.replicas[0].target} "
                                 f"serves {', '.join(self.shard_names)}, {r.target} serves {', '.join(names)}")
            self.shard_names = self.shard_names or names
        self.names = [f"{n}@{self.target}" for n in self.shard_names] or [self.target]
        self._lock = threading.Lock()
        self._turn = 0
        self.requests = self.failovers = 0
        self.latencies: deque[float] = deque(maxlen=4096)  # seconds per query of recent successful calls
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"health {self.target}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.health_period_s):
            for r in self.replicas:
                try:
                    # names change with a compaction (00000 -> 00000-c1), one replica before the
                    # other: only the start checks that replicas agree, here the latest answer counts
                    self.shard_names = r.handshake(min(self.deadline_s, max(self.health_period_s, 0.5)))
                    r.mark(True)
                except grpc.RpcError as e:
                    r.mark(False, e.code().name)

    def _order(self) -> list[_Replica]:
        """Healthy replicas first, taking turns; the others last (one may be back)."""
        with self._lock:
            self._turn += 1
            turn = self._turn
        healthy = [r for r in self.replicas if r.healthy]
        healthy = healthy[turn % len(healthy):] + healthy[:turn % len(healthy)] if healthy else []
        return healthy + [r for r in self.replicas if not r.healthy]

    def search(self, queries: np.ndarray, k: int, nprobe: int | None, policy: RetrievalPolicy | None,
               assigned: tuple[np.ndarray, np.ndarray] | None = None):
        """The shard group's top-k; `assigned` = (coarse distances, lists) from the main
        server's quantizer, so every shard scans the same lists (IVF stores)."""
        req = shard_search_request(queries, k, nprobe, policy, assigned, self.fingerprint)
        deadline = time.monotonic() + self.deadline_s
        order, errors = self._order(), []
        with self._lock:
            self.requests += 1
            recent = list(self.latencies)
        for i, r in enumerate(order):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            budget = try_budget(left, len(order) - i, recent, len(queries))
            t = time.monotonic()
            try:
                resp = r.stub.SearchShards(req, timeout=budget, metadata=r.metadata)
                result = shard_search_result(resp, len(queries), k)
            except ShardUnavailable as e:  # a malformed answer: this replica is not to be trusted now
                r.mark(False, str(e))
                errors.append(f"{r.target}: {e}")
                with self._lock:
                    self.failovers += 1
                continue
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # every replica would refuse it alike
                    raise BadRequest(f"shard server {r.target}: {e.details()}") from e
                what = "late" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "down"
                r.mark(False, f"{what}: {e.code().name}")
                errors.append(f"{r.target} is {what} ({e.code().name})")
                with self._lock:
                    self.failovers += 1
                continue
            with self._lock:
                self.latencies.append((time.monotonic() - t) / len(queries))
            return result
        shards = ", ".join(self.shard_names) or "unknown shards"
        raise ShardUnavailable(f"shard group {self.target} ({shards}): every replica is down or late: "
                               f"{'; '.join(errors) or 'no time left'}", self.names)

    def compact(self) -> dict:
        """Ask one replica to compact the group's shards (they share the store folder: the
        others see the manifest switch and reopen); raises `ShardUnavailable` if none can."""
        errors = []
        for r in self._order():
            try:
                resp = r.stub.CompactShards(pb.CompactShardsRequest(store_fingerprint=self.fingerprint),
                                            metadata=r.metadata)
            except grpc.RpcError as e:
                errors.append(f"{r.target}: {e.code().name}: {e.details()}")
                continue
            return {"rewritten_shards": resp.rewritten_shards, "removed_entries": resp.removed_entries,
                    "seconds": resp.seconds}
        raise ShardUnavailable(f"shard group {self.target} could not compact: {'; '.join(errors)}", self.names)

    def stats(self) -> dict:
        """Replicas (all and healthy, and why the others are not), calls, failovers and the
        latency per query of recent successful calls, for Stats and `silo stats`."""
        with self._lock:
            lat = np.array(self.latencies) * 1e3
            requests, failovers = self.requests, self.failovers
        return {"name": self.target, "shards": list(self.shard_names), "replicas": len(self.replicas),
                "healthy": sum(r.healthy for r in self.replicas), "requests": requests, "failovers": failovers,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
                "down": [f"{r.target}: {r.error}" for r in self.replicas if not r.healthy]}

    def close(self) -> None:
        self._stop.set()
        for r in self.replicas:
            r.channel.close()
