"""gRPC statuses of exceptions: what every servicer (and a shard server) answers for an error.

Kept apart from the servicers so that a shard server (`silo serve-shards`, a Ray Serve
replica), which runs no model, imports grpc and the datastore only, not torch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
from silo.datastore.errors import FingerprintMismatch, StoreError, StoreLocked, TooMuchWork
from silo.datastore.optout import CorruptLog
from silo.datastore.removal import LargeRemoval, NotLoggedEverywhere, PermissionDenied
from silo.datastore.store import ShardUnavailable, UnknownDocuments
from silo.server.limits import BadRequest, bounded_message

from silo.errors import SiloError

log = logging.getLogger("silo.server")


class FailedPrecondition(Exception):
    """FAILED_PRECONDITION with this message: the request is fine, the server's state is not."""


STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownDocuments, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LargeRemoval, grpc.StatusCode.FAILED_PRECONDITION),
    (NotLoggedEverywhere, grpc.StatusCode.FAILED_PRECONDITION),
    (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CorruptLog, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreLocked, grpc.StatusCode.FAILED_PRECONDITION),
    (ShardUnavailable, grpc.StatusCode.UNAVAILABLE),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooMuchWork, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (SiloError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreError, grpc.StatusCode.FAILED_PRECONDITION),
)


# an absolute path in a message: a "/" that starts a word, then at least two segments
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/()\[\]{},;]+/)+[^\s'\"/()\[\]{},;]*")


def without_paths(message: str) -> str:
    """`message` with every absolute path shown by its last part: a client learns which
    store or file, never the server's file system."""
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or "…", message)


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in STATUS_OF:
        if isinstance(e, cls):
            return code, bounded_message(without_paths(str(e) or type(e).__name__))
    log.exception("unexpected error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the server logged it"


class InvalidMessage:
    """Stands in for a request that could not be parsed (e.g. invalid UTF-8 in a string)."""

    def __init__(self, reason: str):
        self.reason = reason


def guarded(fn):
    """Map exceptions of a unary method to statuses (never a crash, never a bare INTERNAL
    for the user's mistakes)."""
    def wrapper(self, request, context):
        if isinstance(request, InvalidMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server stays up
            code, msg = status_for(e)
            context.abort(code, msg)
    wrapper.__name__ = fn.__name__
    return wrapper
