"""Who may call what: credentials, the access class of every RPC, and the interceptor.

Three credentials travel as `authorization: Bearer <token>` metadata:

- the **admin** token (`--token-file`, a secret shared with operators): everything;
- **owner** tokens (`silo token issue --owner NAME --credentials FILE`): a data owner may
  opt out, and ask the status of, only documents whose `owner` is NAME. The file keeps
  only SHA-256 hashes of the tokens (a token is 32 random bytes, so a fast hash is as good
  as a slow one), is re-read when it changes (new owners need no restart), and a token
  is shown once, when issued;
- the **shard** token (`--shard-token-file`), spoken between a main server and its shard
  servers.

`RPC_ACCESS` classifies every method of every service once (public / owner / admin /
shard); the interceptor enforces the class before a servicer runs (UNAUTHENTICATED), and
an RPC missing from the table is refused — a test fails if the contract grows an RPC
without an entry here. Finer checks (an owner's token on another owner's documents is
PERMISSION_DENIED) are made by the servicers with `Auth.principal`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from silo.server.gen import silo_pb2 as pb

PUBLIC, OWNER, ADMIN, SHARD = "public", "owner", "admin", "shard"

RPC_ACCESS: dict[str, str] = {
    "/silo.v1.LanguageModel/Generate": PUBLIC,
    "/silo.v1.LanguageModel/Score": PUBLIC,
    "/silo.v1.LanguageModel/Tokenize": PUBLIC,
    "/silo.v1.LanguageModel/ModelInfo": PUBLIC,
    "/silo.v1.LanguageModel/Trace": PUBLIC,
    "/silo.v1.LanguageModel/Audit": PUBLIC,
    "/silo.v1.Datastore/Search": PUBLIC,
    "/silo.v1.Datastore/Stats": PUBLIC,
    "/silo.v1.Datastore/OptOut": OWNER,
    "/silo.v1.Datastore/OptOutStatus": OWNER,
    "/silo.v1.Datastore/Compact": ADMIN,
    "/silo.v1.Datastore/AddDocuments": ADMIN,
    "/silo.v1.ShardSearch/SearchShards": SHARD,
    "/silo.v1.ShardSearch/CompactShards": SHARD,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
}
MIN_SECRET_CHARS = 16


class CredentialError(ValueError):
    """A credentials or token file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin" | "owner" | "shard" | "anonymous"
    owner: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def label(self) -> str:
        """How the opt-out log records who made a removal (never the token itself)."""
        return f"owner:{self.owner}" if self.kind == "owner" else self.kind

    def may_see(self, record: dict) -> bool:
        """May this caller see a removal's values (the owner names, sources, text spans)?"""
        return self.is_admin or (self.kind == "owner" and record.get("made_by") == self.label)


ANONYMOUS = Principal("anonymous")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_secret(path: str | os.PathLike | None, what: str) -> str | None:
    """A shared secret from a file (admin or shard token): stripped, at least 16 characters."""
    if not path:
        return None
    token = Path(path).read_text().strip()
    if len(token) < MIN_SECRET_CHARS:
        raise CredentialError(f"{path}: the {what} token must be at least {MIN_SECRET_CHARS} characters")
    return token


class OwnerCredentials:
    """The owner-token file: `{"version": 1, "tokens": [{"id", "owner", "sha256", "created"}]}`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, dict] = {}

    def _load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            tokens = data["tokens"]
            assert all({"id", "owner", "sha256"} <= set(t) for t in tokens)
            return tokens
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
            raise CredentialError(f"{self.path}: not a SILO credentials file ({e})") from e

    def _save(self, tokens: list[dict]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "tokens": tokens}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # the rename is durable only once the folder is: without this a crash could bring
        # back the old file, i.e. a revoked token
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def issue(self, owner: str) -> tuple[str, dict]:
        """A new token for `owner`: returns (the token, shown only now; its entry)."""
        owner = owner.strip()
        if not owner or len(owner) > 256:
            raise CredentialError("an owner name must be 1-256 characters")
        token_id = secrets.token_hex(4)
        token = f"silo-owner-{token_id}-{secrets.token_urlsafe(32)}"
        entry = {"id": token_id, "owner": owner, "sha256": token_hash(token),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._lock:
            self._save([*self._load(), entry])
        return token, entry

    def revoke(self, token_id: str) -> bool:
        with self._lock:
            tokens = self._load()
            kept = [t for t in tokens if t["id"] != token_id]
            if len(kept) == len(tokens):
                return False
            self._save(kept)
            return True

    def list(self) -> list[dict]:
        return [{k: t[k] for k in ("id", "owner", "created") if k in t} for t in self._load()]

    def owner_of(self, token: str) -> str | None:
        """The owner a token belongs to, or None; the file is re-read when it changes."""
        try:
            st = self.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._by_hash = {t["sha256"]: t for t in self._load()}
                self._stamp = stamp
            entry = self._by_hash.get(token_hash(token))
        return entry["owner"] if entry else None


class Auth:
    """The server's credentials; `principal` says who a call's metadata speaks for."""

    def __init__(self, admin_token: str | None = None, owners: OwnerCredentials | None = None,
                 shard_token: str | None = None):
        self.admin_token, self.owners, self.shard_token = admin_token, owners, shard_token

    def principal(self, metadata) -> Principal:
        given = ""
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else ""
        if not given.startswith("Bearer "):
            return ANONYMOUS
        token = given[len("Bearer "):]
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return Principal("admin")
        if self.shard_token and hmac.compare_digest(token.encode(), self.shard_token.encode()):
            return Principal("shard")
        if self.owners is not None and token.startswith("silo-owner-"):
            owner = self.owners.owner_of(token)
            if owner is not None:
                return Principal("owner", owner)
        return ANONYMOUS

    def allows(self, access: str, who: Principal) -> bool:
        if access == PUBLIC:
            return True
        if access == OWNER:
            return who.kind in ("admin", "owner")
        if access == ADMIN:
            return who.is_admin
        return who.kind == "shard"

    def refuse(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of `method` (`/package.Service/Method`) with this metadata may not run —
        (status code, message) — or None when it may. gRPC's interceptor and the HTTP API
        both ask here."""
        access = RPC_ACCESS.get(method)
        if access is None:
            return grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}"
        if access == PUBLIC or self.allows(access, self.principal(metadata)):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, self.refusal(access)

    def refusal(self, access: str) -> str:
        if access == ADMIN and not self.admin_token:
            return "this server has no admin token configured (--token-file)"
        if access == SHARD and not self.shard_token:
            return "this server has no shard token configured (--shard-token-file)"
        if access == OWNER and not (self.admin_token or self.owners):
            return "this server has no admin token or owner credentials configured"
        need = {ADMIN: "the admin token", OWNER: "an owner or admin token", SHARD: "the shard token"}[access]
        return f"missing or wrong credentials: this call needs {need}"


class AuthInterceptor(grpc.ServerInterceptor):
    """Enforces `RPC_ACCESS` before any servicer code runs."""

    def __init__(self, auth: Auth):
        self.auth = auth

    def intercept_service(self, continuation, details):
        refused = self.auth.refuse(details.method, details.invocation_metadata)
        if refused is None:
            return continuation(details)
        code, why = refused
        return _deny(code, why, details.method if code != grpc.StatusCode.UNIMPLEMENTED else "")


def _streaming(method: str) -> tuple[bool, bool]:
    """(client streams, server streams) of one of our methods; unary for anything else."""
    _, service, name = method.split("/")
    svc = pb.DESCRIPTOR.services_by_name.get(service.removeprefix("silo.v1."))
    m = svc.methods_by_name.get(name) if svc is not None and service.startswith("silo.v1.") else None
    return (m.client_streaming, m.server_streaming) if m is not None else (False, False)


def _deny(code: grpc.StatusCode, why: str, method: str = ""):
    """A handler of the method's own streaming shape that only refuses; it accepts any bytes,
    so the refusal never depends on parsing the request."""
    client_streams, server_streams = _streaming(method) if method.count("/") == 2 else (False, False)

    def deny(request, context):
        context.abort(code, why)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(client_streams, server_streams)]
    return make(deny, request_deserializer=lambda b: b)
