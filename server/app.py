"""Building and running SILO's gRPC servers (`silo serve`, `silo serve-shards`).

One process loads the model and stores once and serves concurrently from a thread pool
of `workers` threads (default: one per core), with torch's and FAISS's own thread counts
set so that together they never oversubscribe the cores (`configure_threads`). Up to
`max_concurrent` calls wait; more get RESOURCE_EXHAUSTED from gRPC itself. Every request
field has a hard limit (`server.limits`); credentials and the access class of every RPC
are in `server.auth`. Health checking (grpc.health.v1) and server reflection are on;
TLS with `--tls-cert/--tls-key`, and then also to the shard servers.

Requests are parsed by a wrapper that turns an unparsable message (e.g. invalid UTF-8 in
a string field, which protobuf rejects) into INVALID_ARGUMENT instead of gRPC's INTERNAL.
"""

from __future__ import annotations

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

from datastore.errors import FingerprintMismatch, StoreError
from datastore.kinds import open_store
from datastore.manifest import Manifest
from datastore.optout import CorruptLog
from server.auth import Auth, AuthInterceptor, CredentialError, OwnerCredentials, read_secret
from server.gen import silo_pb2 as pb
from server.limits import Limits
from server.remote import RemoteShardGroup, ShardSearchServicer, parse_shard_range
from server.servicers import DatastoreServicer, InvalidMessage, LanguageModelServicer, ServerState
from silo.errors import SiloError
from silo.lm import load_causal_lm

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


def build_server(services: dict, port: int, host: str = "127.0.0.1", auth: Auth | None = None,
                 tls: tuple[bytes, bytes] | None = None, max_workers: int | None = None, max_concurrent: int = 32,
                 max_message_bytes: int = 16 << 20) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server with `services` ({name: servicer}), health and reflection.
    `max_workers` requests run at once (default: one per core; thread counts set to match),
    up to `max_concurrent` wait, more get RESOURCE_EXHAUSTED. Returns (server, bound port,
    health servicer)."""
    max_workers = max_workers or os.cpu_count() or 1
    per_request = configure_threads(max_workers)
    # OpenMP's thread count is per calling thread: each request thread sets FAISS's own
    pool = futures.ThreadPoolExecutor(max_workers=max_workers,
                                      initializer=lambda: faiss.omp_set_num_threads(per_request))
    server = grpc.server(
        pool, interceptors=[AuthInterceptor(auth or Auth())],
        maximum_concurrent_rpcs=max_concurrent,
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
               shard_token: str | None = None, shard_root_cert: bytes | None = None) -> ServerState:
    """Load the model and stores once. A store built for another model, or one whose
    opt-out log is corrupt, is kept out of use (retrieving calls get FAILED_PRECONDITION
    naming the problem) rather than served; the LM and the other stores still serve."""
    model, tok = load_causal_lm(model_dir)
    state = ServerState(model_dir=model_dir, model=model, tok=tok, limits=limits or Limits(), auth=auth or Auth(),
                        shard_token=shard_token)
    for path in stores:
        kind = Manifest.load(path).kind
        if kind in state.stores or kind in state.store_errors:
            raise StoreError(f"two {kind} stores given ({path}); a server serves one store of each kind")
        try:
            remote = bool(remote_shards) and kind == "token"
            store = open_store(path, load_index=not remote)
            if remote:
                store.remotes = [RemoteShardGroup(t, store.manifest.model_fingerprint, shard_deadline_s,
                                                  shard_token, shard_root_cert) for t in remote_shards]
            store.check_model(model_dir)
        except (FingerprintMismatch, CorruptLog) as e:
            log.error("store %s is out of use: %s", path, e)
            state.store_errors[kind] = str(e)
            continue
        state.stores[kind] = store
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


def serve(model: str, stores: list[str], port: int, host: str = "127.0.0.1", token_file: str | None = None,
          credentials_file: str | None = None, shard_token_file: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, shard_ca: str | None = None, remote_shards: list[str] | None = None,
          shard_deadline_s: float = 5.0, max_concurrent: int = 32, workers: int | None = None,
          limits: Limits | None = None, ready_file: str | None = None) -> None:
    """`silo serve`: the LM and its stores over gRPC until SIGINT/SIGTERM."""
    tls = (Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()) if tls_cert and tls_key else None
    shard_token = read_secret(shard_token_file, "shard")
    if remote_shards and not shard_token:
        raise CredentialError("--remote-shards needs --shard-token-file (shard servers refuse calls without it)")
    # TLS to the shard servers whenever this server serves TLS: verified with --shard-ca, or
    # with our own certificate (one internal CA for the cluster)
    shard_root = Path(shard_ca).read_bytes() if shard_ca else (tls[0] if tls else None)
    auth = Auth(read_secret(token_file, "admin"), OwnerCredentials(credentials_file) if credentials_file else None)
    state = load_state(model, stores, remote_shards, shard_deadline_s, limits, auth, shard_token, shard_root)
    server, bound, hs = build_server({"LanguageModel": LanguageModelServicer(state),
                                      "Datastore": DatastoreServicer(state)}, port, host, auth, tls,
                                     max_workers=workers, max_concurrent=max_concurrent)
    print(f"silo: serving {model} with {len(stores)} store(s) on {host}:{bound}"
          f"{' (TLS)' if tls else ''}", flush=True)
    if ready_file:
        Path(ready_file).write_text(str(bound))
    wait_for_termination(server, hs)


def serve_shards(store: str, shards: str, port: int, shard_token_file: str, host: str = "127.0.0.1",
                 tls_cert: str | None = None, tls_key: str | None = None, limits: Limits | None = None,
                 ready_file: str | None = None) -> None:
    """`silo serve-shards`: some shards of a store for a main server (shard token required)."""
    token = read_secret(shard_token_file, "shard")
    if not token:
        raise CredentialError("serve-shards needs --shard-token-file: the main server presents that token")
    tls = (Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()) if tls_cert and tls_key else None
    numbers = parse_shard_range(shards, len(Manifest.load(store).shards))
    servicer = ShardSearchServicer(store, numbers, limits)
    server, bound, hs = build_server({"ShardSearch": servicer}, port, host, Auth(shard_token=token), tls)
    print(f"silo: serving shards {', '.join(servicer.names)} of {store} on {host}:{bound}"
          f"{' (TLS)' if tls else ''}", flush=True)
    if ready_file:
        Path(ready_file).write_text(str(bound))
    wait_for_termination(server, hs)


def new_token() -> str:
    return os.urandom(24).hex()
