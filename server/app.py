"""Building and running SILO's gRPC servers (`silo serve`, `silo serve-shards`).

One process loads the model and stores once and serves concurrently. Every request field
has a hard limit and every request's work a cap (`silo.server.limits`); credentials and the
access class of every RPC are in `silo.server.auth`. Health checking (grpc.health.v1) and
server reflection are on; TLS with `--tls-cert/--tls-key`, and then also to the shard
servers (a shard token never crosses a network in cleartext unless the operator passes
`--allow-plaintext-shard-token`).

**No stream can pin the server.** gRPC's synchronous server gives every call a thread for
its whole life, idle streams included: with one thread per core, two idle reflection
streams used to stop every other call, health checks too. So the pool has more threads
than the compute budget, and `Admission` (an interceptor) gives each kind of call its own
budget, so that no kind can take another's threads:

- unary calls (Score, Search, …): at most `max_concurrent` in the server, of which
  `workers` compute at once (default one per core; torch's and FAISS's thread counts are
  set so they never oversubscribe the cores, `configure_threads`); the rest wait;
- Generate and AddDocuments streams: at most `limits.max_streams` open, each also one of
  the `max_concurrent`; they never hold a compute slot, so a stream whose client reads
  slowly (or not at all) blocks only itself;
- reflection and health Watch streams: at most `limits.max_watch_streams`; idle, they hold
  a thread and nothing else;
- Health.Check and Health.List: no budget, always a thread (`HEADROOM` spare threads).

A call over its budget gets RESOURCE_EXHAUSTED at once, never a wait; the pool is the sum
of the budgets plus the headroom, and gRPC's own `maximum_concurrent_rpcs` is set to that
sum, so nothing ever queues for a thread. A unary call waiting for compute gives up as
soon as its client cancels or its deadline passes.

Requests are parsed by a wrapper that turns an unparsable message (e.g. invalid UTF-8 in
a string field, which protobuf rejects) into INVALID_ARGUMENT instead of gRPC's INTERNAL.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import faiss
import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from silo.datastore.errors import FingerprintMismatch, StoreError
from silo.datastore.kinds import open_store
from silo.datastore.ledger import LedgerMissing
from silo.datastore.manifest import Manifest
from silo.datastore.optout import CorruptLog
from silo.server.auth import Auth, AuthInterceptor, CredentialError, OwnerCredentials, read_secret
from silo.server.client import mode_name
from silo.server.gen import silo_pb2 as pb
from silo.server.http import start_http
from silo.server.limits import BUSY, Limits
from silo.server.ray_shards import RayShardGroup, RayShards
from silo.server.remote import (
    RemoteShardGroup,
    ShardSearchServicer,
    parse_remote_shards,
    parse_shard_range,
)
from silo.server.servicers import (
    DatastoreServicer,
    LanguageModelServicer,
    ServerState,
    choose_default_mode,
)
from silo.server.status import InvalidMessage

from silo.corpus import open_corpus
from silo.errors import SiloError
from silo.lm import check_servable, load_causal_lm
from silo.provenance import TrainingRecord

log = logging.getLogger("silo.server")
SERVICE_NAMES = ("silo.v1.LanguageModel", "silo.v1.Datastore", "silo.v1.ShardSearch")


def configure_threads(workers: int, cores: int | None = None) -> int:
    """Set torch's and FAISS's thread counts so `workers` concurrent requests use the
    machine's cores without oversubscribing them: each request gets cores // workers
    threads (at least one). Returns that number."""
    cores = cores or os.cpu_count() or 1
    per_request = max(1, cores // max(workers, 1))
    torch.set_num_threads(per_request)
    faiss.omp_set_num_threads(per_request)
    return per_request


# threads beyond the budgets: Health.Check and the refusals of calls over a budget
HEADROOM = 4
FREE_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"})
WATCH_METHODS = frozenset({"/grpc.health.v1.Health/Watch",
                           "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                           "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"})


class Admission(grpc.ServerInterceptor):
    """Per-kind budgets for calls (see the module docstring): a call over its budget is
    refused with RESOURCE_EXHAUSTED before its handler runs; a slot is freed when the call
    ends, however it ends (finished, failed, cancelled). The HTTP API (`silo.server.http`)
    takes its slots from the same budgets (`unary`, `stream`)."""

    def __init__(self, workers: int, max_concurrent: int, max_streams: int, max_watch_streams: int):
        self.workers, self.max_concurrent = workers, max_concurrent
        self.max_streams, self.max_watch_streams = max_streams, max_watch_streams
        self.compute = threading.Semaphore(workers)
        self.admitted = threading.BoundedSemaphore(max_concurrent)
        self.streams = threading.BoundedSemaphore(max_streams)
        self.watches = threading.BoundedSemaphore(max_watch_streams)

    def _calls(self):
        return self.admitted, f"{self.max_concurrent} calls in progress (max_concurrent)"

    def unary(self, behaviour):
        """`behaviour(request, context)` admitted as a unary call: a compute slot while it runs."""
        return self._computing(behaviour, [self._calls()])

    def stream(self, behaviour):
        """A streaming `behaviour` admitted as a Generate/AddDocuments stream."""
        return self._stream(behaviour, [self._calls(), (self.streams, f"{self.max_streams} Generate/AddDocuments "
                                                                      "streams open (max_streams)")])

    @property
    def threads(self) -> int:
        """Threads the budgets can hold at once, plus the headroom: the pool's size."""
        return self.max_concurrent + self.max_watch_streams + HEADROOM

    def _take(self, context, slots: list[tuple[threading.Semaphore, str]]):
        """Take every slot without waiting, or abort RESOURCE_EXHAUSTED naming the full
        budget. Returns a release that runs once (at the end of the call, or when gRPC
        says the call terminated, whichever comes first)."""
        taken = []
        for sem, full in slots:
            if not sem.acquire(blocking=False):
                for t in taken:
                    t.release()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUSY}: {full}; try again later")
            taken.append(sem)
        lock, done = threading.Lock(), []

        def release() -> None:
            with lock:
                if done:
                    return
                done.append(True)
            for t in taken:
                t.release()

        if not context.add_callback(release):  # already terminated
            release()
        return release

    def _stream(self, behaviour, slots):
        def run(request, context):
            release = self._take(context, slots)
            try:
                yield from behaviour(request, context)
            finally:
                release()
        return run

    def _held(self, behaviour, slots):
        def run(request, context):
            release = self._take(context, slots)
            try:
                return behaviour(request, context)
            finally:
                release()
        return run

    def _computing(self, behaviour, slots):
        def run(request, context):
            release = self._take(context, slots)
            try:
                while not self.compute.acquire(timeout=0.1):
                    if not context.is_active():  # cancelled, or past its deadline, while waiting
                        context.abort(grpc.StatusCode.CANCELLED, "cancelled while waiting for a worker")
                try:
                    return behaviour(request, context)
                finally:
                    self.compute.release()
            finally:
                release()
        return run

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method in FREE_METHODS:
            return handler
        calls = self._calls()
        if details.method in WATCH_METHODS:
            slots = [(self.watches, f"{self.max_watch_streams} reflection/watch streams open (max_watch_streams)")]
        elif handler.request_streaming or handler.response_streaming:
            slots = [calls, (self.streams, f"{self.max_streams} Generate/AddDocuments streams open (max_streams)")]
        else:
            return grpc.unary_unary_rpc_method_handler(self._computing(handler.unary_unary, [calls]),
                                                       request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        kind = (handler.request_streaming, handler.response_streaming)
        make, behaviour, wrap = {
            (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream, self._stream),
            (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream, self._stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary, self._held),
            (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary, self._held)}[kind]
        return make(wrap(behaviour, slots), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _safe_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return InvalidMessage(f"request could not be parsed ({e}); strings must be valid UTF-8")
    return parse


def _add_service(server: grpc.Server, name: str, servicer) -> None:
    """Like the generated add_*_to_server, with `_safe_parser` request parsing."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for m in service.methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        fn = getattr(servicer, m.name)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(fn, request_deserializer=_safe_parser(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"silo.v1.{name}", handlers),))


def make_admission(max_workers: int | None = None, max_concurrent: int = 32,
                   limits: Limits | None = None) -> Admission:
    """The call budgets of a server (`Admission`), to share between its gRPC and HTTP APIs."""
    limits = limits or Limits()
    return Admission(max_workers or os.cpu_count() or 1, max_concurrent, min(limits.max_streams, max_concurrent),
                     limits.max_watch_streams)


def build_server(services: dict, port: int, host: str = "127.0.0.1", auth: Auth | None = None,
                 tls: tuple[bytes, bytes] | None = None, max_workers: int | None = None, max_concurrent: int = 32,
                 max_message_bytes: int = 16 << 20, limits: Limits | None = None,
                 admission: Admission | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server with `services` ({name: servicer}), health and reflection.
    `max_workers` unary calls compute at once (default: one per core; thread counts set to
    match), up to `max_concurrent` calls are in the server, streams have their own budgets
    (`limits.max_streams`, `limits.max_watch_streams`); beyond a budget, RESOURCE_EXHAUSTED
    (`Admission`; pass one to share its budgets with an HTTP API). Returns (server, bound
    port, health servicer)."""
    admission = admission or make_admission(max_workers, max_concurrent, limits)
    per_request = configure_threads(admission.workers)
    # OpenMP's thread count is per calling thread: each request thread sets FAISS's own
    pool = futures.ThreadPoolExecutor(max_workers=admission.threads,
                                      initializer=lambda: faiss.omp_set_num_threads(per_request))
    server = grpc.server(
        pool, interceptors=[AuthInterceptor(auth or Auth()), admission],
        maximum_concurrent_rpcs=admission.threads,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)])
    for name, servicer in services.items():
        _add_service(server, name, servicer)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*[f"silo.v1.{n}" for n in services], reflection.SERVICE_NAME,
                                         health.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])])) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise SiloError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    for name in ("", *[f"silo.v1.{n}" for n in services]):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def load_state(model_dir: str, stores: list[str], remote_shards: list[str] | None = None,
               shard_deadline_s: float = 5.0, limits: Limits | None = None, auth: Auth | None = None,
               shard_token: str | None = None, shard_root_cert: bytes | None = None,
               allow_restricted_model: bool = False, mode: str = "auto",
               membership_reference: str | None = None, membership_documents: int = 100,
               lists: str | None = None, ray_apps: list[str] | None = None) -> ServerState:
    """Load the model and stores once. A store built for another model, or one whose
    opt-out log is corrupt (or whose removal ledger is missing), is kept out of use
    (retrieving calls get FAILED_PRECONDITION naming the problem) rather than served; the
    LM and the other stores still serve. Out of use is not forgotten (`ServerState.idle`):
    opt-outs are still logged in another model's store, and refused while a store cannot be
    opened at all, so that no store serves a removed document once it is back. A model
    trained on restricted text is refused unless `allow_restricted_model` (`check_servable`).
    `membership_reference` is the corpus whose test split calibrates membership percentiles
    (default: the training record's corpus; an outside checkpoint has none unless given).
    `lists`: serve the stores' inverted lists from "ram" or "ssd" (default: each manifest's).
    `ray_apps`: the token store's shard groups are these Ray Serve applications
    (`silo.server.ray_shards`; `ray.init` to their cluster first)."""
    if membership_reference is not None:
        open_corpus(membership_reference)  # a wrong path is refused at start, not at the first audit
    if not 1 <= membership_documents <= 10_000:
        raise SiloError(f"membership_documents must be in 1..10000, got {membership_documents}")
    if check_servable(model_dir, allow_restricted_model).get("trained_on_restricted"):
        log.warning("SERVING A MODEL TRAINED ON RESTRICTED TEXT (%s): removed text can surface from its weights; "
                    "never expose this server to users", Path(model_dir).name)
    model, tok = load_causal_lm(model_dir)
    state = ServerState(model_dir=model_dir, model=model, tok=tok, limits=limits or Limits(), auth=auth or Auth(),
                        shard_token=shard_token, training_record=TrainingRecord.open(model_dir),
                        membership_corpus=membership_reference, membership_documents=membership_documents)
    for path in stores:
        kind = Manifest.load(path).kind
        if kind in state.stores or kind in state.store_errors:
            raise StoreError(f"two {kind} stores given ({path}); a server serves one store of each kind")
        store = None
        try:
            remote = bool(remote_shards or ray_apps) and kind == "token"
            # the shards there now are the shard servers'; shards a live ingest adds later are
            # searched here, beside them, until shard servers are started for them
            store = open_store(path, lists=lists, local_from=len(Manifest.load(path).shards) if remote else None)
            fp = store.manifest.model_fingerprint
            if remote and ray_apps:
                store.remotes = [RayShardGroup(a, fp, shard_deadline_s) for a in ray_apps]
            elif remote:
                store.remotes = [RemoteShardGroup(g, fp, shard_deadline_s, shard_token, shard_root_cert)
                                 for g in parse_remote_shards(remote_shards)]
            store.check_model(model_dir)
        except (FingerprintMismatch, CorruptLog, LedgerMissing) as e:
            log.error("store %s is out of use: %s", path, e)
            state.store_errors[kind] = str(e)
            state.idle[kind] = store if store is not None else str(path)
            continue
        state.stores[kind] = store
    state.default_mode = choose_default_mode(mode, state.stores)
    return state


def wait_for_termination(server: grpc.Server, health_servicer=None) -> None:
    """Block until SIGINT/SIGTERM, then drain in-flight calls for up to 5 s."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()


def tls_pair(cert: str | None, key: str | None) -> tuple[bytes, bytes] | None:
    """(certificate, key) read from `--tls-cert`/`--tls-key`, or None for neither; one
    without the other is refused (it would otherwise serve plaintext without a word)."""
    if bool(cert) != bool(key):
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise CredentialError(f"{given} without {missing}: TLS needs both (refusing to serve plaintext)")
    return (Path(cert).read_bytes(), Path(key).read_bytes()) if cert else None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, or host:port) is this machine's loopback; an
    unknown name or an all-interfaces address (0.0.0.0, ::) is not."""
    host = host.strip()
    if host.startswith("unix:"):
        return True
    if host.startswith("[") and "]" in host:  # [v6]:port
        host = host[1:host.index("]")]
    elif host.count(":") == 1:  # name:port or v4:port
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PLAINTEXT_FLAG = "--allow-plaintext-shard-token"


def serve(model: str, stores: list[str], port: int, host: str = "127.0.0.1", token_file: str | None = None,
          credentials_file: str | None = None, shard_token_file: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, shard_ca: str | None = None, remote_shards: list[str] | None = None,
          shard_deadline_s: float = 5.0, max_concurrent: int = 32, workers: int | None = None,
          limits: Limits | None = None, ready_file: str | None = None, allow_restricted_model: bool = False,
          allow_plaintext_shard_token: bool = False, mode: str = "auto", http_port: int | None = None,
          http_host: str | None = None, http_ready_file: str | None = None,
          membership_reference: str | None = None, membership_documents: int = 100, lists: str | None = None,
          ray_shards: RayShards | None = None) -> None:
    """`silo serve`: the LM and its stores over gRPC until SIGINT/SIGTERM. `mode` is what a
    request that names no retrieval mode gets (`choose_default_mode`: SILO, not the bare LM).
    With `http_port`, the same process also serves the OpenAI-compatible HTTP API and the
    data owners' page (`silo.server.http`), on the same state, credentials and budgets.
    With `ray_shards`, the token store's shard groups run as Ray Serve deployments."""
    tls = tls_pair(tls_cert, tls_key)
    ray_apps = None
    if ray_shards is not None:
        if remote_shards:
            raise SiloError("give --remote-shards or --ray-address, not both")
        token = [p for p in stores if Manifest.load(p).kind == "token"]
        if not token:
            raise SiloError("--ray-address serves a token store's shards: give one with --store")
        ray_apps = ray_shards.start(token[0], lists)
    shard_token = read_secret(shard_token_file, "shard")
    if remote_shards and not shard_token:
        raise CredentialError("--remote-shards needs --shard-token-file (shard servers refuse calls without it)")
    # TLS to the shard servers whenever this server serves TLS: verified with --shard-ca, or
    # with our own certificate (one internal CA for the cluster)
    shard_root = Path(shard_ca).read_bytes() if shard_ca else (tls[0] if tls else None)
    far = [t for g in parse_remote_shards(remote_shards or []) for t in g if not is_loopback(t)]
    if far and shard_root is None and not allow_plaintext_shard_token:
        raise CredentialError(f"--remote-shards {far[0]} is not on this machine and the shard token would cross "
                              "the network in cleartext: serve with --tls-cert/--tls-key (or --shard-ca), or pass "
                              f"{PLAINTEXT_FLAG} on a network you trust")
    auth = Auth(read_secret(token_file, "admin"), OwnerCredentials(credentials_file) if credentials_file else None)
    state = load_state(model, stores, remote_shards, shard_deadline_s, limits, auth, shard_token, shard_root,
                       allow_restricted_model, mode, membership_reference, membership_documents, lists, ray_apps)
    if membership_reference is not None:
        # the reference the operator named (forward passes over its documents) is computed
        # now, beside the first requests, rather than by the first audit that needs it; the
        # record's own reference is computed by the first membership audit
        threading.Thread(target=state.membership_reference, name="membership-reference", daemon=True).start()
    admission = make_admission(workers, max_concurrent, limits)
    server, bound, hs = build_server({"LanguageModel": LanguageModelServicer(state),
                                      "Datastore": DatastoreServicer(state)}, port, host, auth, tls,
                                     limits=limits, admission=admission)
    http = None
    if http_port is not None:
        http = start_http(state, admission, http_host or host, http_port, (tls_cert, tls_key) if tls else None)
    print(f"silo: serving {model} with {len(stores)} store(s) on {host}:{bound}"
          f"{' (TLS)' if tls else ''}; default mode {mode_name(state.default_mode)}"
          + (f"; HTTP on {http.url}" if http else ""), flush=True)
    if http and http_ready_file:
        Path(http_ready_file).write_text(str(http.port))
    if ready_file:
        Path(ready_file).write_text(str(bound))
    try:
        wait_for_termination(server, hs)
    finally:
        if http:
            http.stop()


def serve_shards(store: str, shards: str, port: int, shard_token_file: str, host: str = "127.0.0.1",
                 tls_cert: str | None = None, tls_key: str | None = None, limits: Limits | None = None,
                 ready_file: str | None = None, allow_plaintext_shard_token: bool = False,
                 lists: str | None = None) -> None:
    """`silo serve-shards`: some shards of a store for a main server (shard token required;
    off this machine's loopback, over TLS unless `allow_plaintext_shard_token`)."""
    token = read_secret(shard_token_file, "shard")
    if not token:
        raise CredentialError("serve-shards needs --shard-token-file: the main server presents that token")
    tls = tls_pair(tls_cert, tls_key)
    if tls is None and not is_loopback(host) and not allow_plaintext_shard_token:
        raise CredentialError(f"--host {host} is reachable from other machines and the shard token would arrive "
                              f"in cleartext: serve with --tls-cert/--tls-key, or pass {PLAINTEXT_FLAG} on a "
                              "network you trust")
    numbers = parse_shard_range(shards, len(Manifest.load(store).shards))
    servicer = ShardSearchServicer(store, numbers, limits, lists)
    server, bound, hs = build_server({"ShardSearch": servicer}, port, host, Auth(shard_token=token), tls,
                                     limits=limits)
    print(f"silo: serving shards {', '.join(servicer.names)} of {store} on {host}:{bound}"
          f"{' (TLS)' if tls else ''}", flush=True)
    if ready_file:
        Path(ready_file).write_text(str(bound))
    wait_for_termination(server, hs)


def new_token() -> str:
    return os.urandom(24).hex()
