"""A datastore too large for one machine: shard servers behind the same Datastore API.

`silo serve-shards STORE --shards 0-3 --port P` loads only those shards' indexes and
answers `ShardSearch.SearchShards` (vectors in, per-shard-merged top-k out). The main
server opens the store without indexes, attaches one `RemoteShardGroup` per shard
server, and `Datastore.search_ex` fans out to them in parallel with a per-shard deadline,
merging exactly as for local shards. A shard server that is down or late raises
`ShardUnavailable` naming its shards — or, only when the request allows partial results,
is listed as missing. Never a silent partial answer.

Both sides read the same store folder (shared storage): a shard server re-reads
`optout.log` when it changes and reopens the store when a compaction switches the
manifest, and the main server post-filters every result against its own tombstones, so
an acknowledged removal is honoured even by a shard server that has not caught up yet.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from silo.datastore.compact import compact
from silo.datastore.errors import FingerprintMismatch
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore, ShardUnavailable
from silo.server.gen import silo_pb2 as pb
from silo.server.gen import silo_pb2_grpc as pb_grpc
from silo.server.limits import BadRequest, Limits, check_int, policy_from_pb
from silo.server.servicers import guarded


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
        """Compact this server's shards (under the store's lock), then reopen them."""
        self._check_fingerprint(self.current(), request.store_fingerprint)
        res = compact(self.path, only_shards=self.shard_numbers)
        self.current()  # the manifest switched: reopen now, not on the next search
        return pb.CompactResponse(**res)

    @guarded
    def SearchShards(self, request, context):
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


class RemoteShardGroup:
    """The main server's handle on one shard server."""

    def __init__(self, target: str, fingerprint: str, deadline_s: float = 5.0, token: str | None = None,
                 root_cert: bytes | None = None):
        """`token`: the shard token; `root_cert`: verify the shard server's TLS certificate
        with it (the main server speaks TLS to its shards whenever it serves TLS itself)."""
        self.target, self.fingerprint, self.deadline_s = target, fingerprint, deadline_s
        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=opts)
                        if root_cert else grpc.insecure_channel(target, options=opts))
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.stub = pb_grpc.ShardSearchStub(self.channel)
        self.names = [target]
        try:  # learn the shard names for error messages; a server down now is named by address
            resp = self.stub.SearchShards(pb.ShardSearchRequest(num_queries=0, store_fingerprint=fingerprint),
                                          timeout=deadline_s, metadata=self.metadata)
            self.names = [f"{n}@{target}" for n in resp.shards]
        except grpc.RpcError:
            pass

    def search(self, queries: np.ndarray, k: int, nprobe: int | None, policy: RetrievalPolicy | None,
               assigned: tuple[np.ndarray, np.ndarray] | None = None):
        """The shard server's top-k; `assigned` = (coarse distances, lists) from the main
        server's quantizer, so every shard scans the same lists (IVF stores)."""
        req = pb.ShardSearchRequest(queries=np.ascontiguousarray(queries, dtype="<f4").tobytes(),
                                    num_queries=len(queries), dim=queries.shape[1], k=k, nprobe=nprobe or 0,
                                    policy=_policy_pb(policy), store_fingerprint=self.fingerprint,
                                    deny_doc_ids=sorted(policy.deny_doc_ids) if policy is not None else [])
        if assigned is not None:
            coarse, lists = assigned
            req.nprobe = lists.shape[1]
            req.lists = np.ascontiguousarray(lists, dtype="<i8").tobytes()
            req.coarse = np.ascontiguousarray(coarse, dtype="<f4").tobytes()
        try:
            resp = self.stub.SearchShards(req, timeout=self.deadline_s, metadata=self.metadata)
        except grpc.RpcError as e:
            what = "late" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "down"
            raise ShardUnavailable(f"shard server {self.target} ({', '.join(self.names)}) is {what}: "
                                   f"{e.code().name}", self.names) from e
        n = len(queries)
        return (np.frombuffer(resp.distances, dtype="<f4").reshape(n, k),
                np.frombuffer(resp.ids, dtype="<i8").reshape(n, k))

    def compact(self) -> dict:
        """Ask the shard server to compact its shards; raises `ShardUnavailable` if it can't."""
        try:
            r = self.stub.CompactShards(pb.CompactShardsRequest(store_fingerprint=self.fingerprint),
                                        metadata=self.metadata)
        except grpc.RpcError as e:
            raise ShardUnavailable(f"shard server {self.target} could not compact: {e.code().name}: {e.details()}",
                                   self.names) from e
        return {"rewritten_shards": r.rewritten_shards, "removed_entries": r.removed_entries, "seconds": r.seconds}

    def close(self) -> None:
        self.channel.close()
