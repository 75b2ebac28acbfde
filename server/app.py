"""Building and running SILO's gRPC servers (`silo serve`, `silo serve-shards`).

One process loads the model and stores once and serves concurrently from a thread pool.
Limits: `maximum_concurrent_rpcs` (excess calls get RESOURCE_EXHAUSTED from gRPC itself),
message sizes, text length, max_new_tokens. Health checking (grpc.health.v1) and server
reflection are on. `OptOut` and `Compact` need the admin token ("authorization: Bearer
…"); without a configured token they are refused. TLS with `--tls-cert/--tls-key`.

Requests are parsed by a wrapper that turns an unparsable message (e.g. invalid UTF-8 in
a string field, which protobuf rejects) into INVALID_ARGUMENT instead of gRPC's INTERNAL.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.gen import silo_pb2 as pb
from server.servicers import DatastoreServicer, InvalidMessage, LanguageModelServicer, ServerState

log = logging.getLogger("silo.server")
ADMIN_METHODS = ("/silo.v1.Datastore/OptOut", "/silo.v1.Datastore/Compact")
SERVICE_NAMES = ("silo.v1.LanguageModel", "silo.v1.Datastore", "silo.v1.ShardSearch")


class AdminTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for admin methods without the right bearer token."""

    def __init__(self, token: str | None):
        self.token = token

    def intercept_service(self, continuation, details):
        if details.method not in ADMIN_METHODS:
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        ok = self.token is not None and hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())
        if ok:
            return continuation(details)
        why = "this server has no admin token configured (--token-file)" if self.token is None else \
            "missing or wrong admin token"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return grpc.unary_unary_rpc_method_handler(deny)


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
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(fn, request_deserializer=_safe_parser(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"silo.v1.{name}", handlers),))


def _read_token(token_file: str | None) -> str | None:
    if not token_file:
        return None
    token = Path(token_file).read_text().strip()
    if len(token) < 16:
        raise SystemExit(f"{token_file}: the admin token must be at least 16 characters")
    return token


def build_server(services: dict, port: int, host: str = "127.0.0.1", token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, max_workers: int = 8, max_concurrent: int = 32,
                 max_message_bytes: int = 16 << 20) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server with `services` ({name: servicer}), health and reflection.
    Returns (server, bound port, health servicer)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[AdminTokenInterceptor(token)],
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
        raise SystemExit(f"cannot listen on {address}")
    server.start()
    for name in ("", *[f"silo.v1.{n}" for n in services]):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def load_state(model_dir: str, stores: list[str], remote_shards: list[str] | None = None,
               shard_deadline_s: float = 5.0, max_new_tokens: int = 512) -> ServerState:
    """Load the model and stores once. A store built for another model is kept out of use
    (retrieving calls get FAILED_PRECONDITION naming the mismatch) rather than served."""
    from datastore.manifest import FingerprintMismatch, Manifest
    from datastore.store import Datastore
    from silo.lm import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    state = ServerState(model_dir=model_dir, model=model, tok=tok, max_new_tokens=max_new_tokens)
    for path in stores:
        kind = Manifest.load(path).kind
        if kind == "passage":
            from datastore.passages import PassageStore

            store = PassageStore.open(path)
        else:
            store = Datastore.open(path, load_index=not remote_shards)
            if remote_shards:
                from server.remote import RemoteShardGroup

                store.remotes = [RemoteShardGroup(t, store.manifest.model_fingerprint, shard_deadline_s)
                                 for t in remote_shards]
        try:
            store.check_model(model_dir)
        except FingerprintMismatch as e:
            log.error("store %s does not fit the model: %s", path, e)
            state.store_errors[kind] = str(e)
        if kind == "passage":
            state.passage_store = store
        else:
            state.token_store = store
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
          tls_cert: str | None = None, tls_key: str | None = None, remote_shards: list[str] | None = None,
          shard_deadline_s: float = 5.0, max_concurrent: int = 32, max_new_tokens: int = 512,
          ready_file: str | None = None) -> None:
    state = load_state(model, stores, remote_shards, shard_deadline_s, max_new_tokens)
    tls = (Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()) if tls_cert and tls_key else None
    server, bound, hs = build_server({"LanguageModel": LanguageModelServicer(state),
                                      "Datastore": DatastoreServicer(state)}, port, host, _read_token(token_file),
                                     tls, max_concurrent=max_concurrent)
    print(f"silo: serving {model} with {len(stores)} store(s) on {host}:{bound}"
          f"{' (TLS)' if tls else ''}", flush=True)
    if ready_file:
        Path(ready_file).write_text(str(bound))
    wait_for_termination(server, hs)


def serve_shards(store: str, shards: str, port: int, host: str = "127.0.0.1", ready_file: str | None = None) -> None:
    from datastore.manifest import Manifest
    from server.remote import ShardSearchServicer, parse_shard_range

    numbers = parse_shard_range(shards, len(Manifest.load(store).shards))
    servicer = ShardSearchServicer(store, numbers)
    server, bound, hs = build_server({"ShardSearch": servicer}, port, host)
    print(f"silo: serving shards {', '.join(servicer.names)} of {store} on {host}:{bound}", flush=True)
    if ready_file:
        Path(ready_file).write_text(str(bound))
    wait_for_termination(server, hs)


def new_token() -> str:
    return os.urandom(24).hex()
