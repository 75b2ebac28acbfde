"""The storage engine's errors: one base class, so callers map them to statuses in one place."""


class StoreError(Exception):
    """A store folder that is missing, corrupt, locked, or does not fit the request; the
    message says which and what to do."""


class FingerprintMismatch(StoreError):
    """The store was built with another model or tokenizer."""


class StoreLocked(StoreError):
    """Another process holds the store's lock (a build, compaction or ingest is running)."""


class TooMuchWork(StoreError):
    """A request's total work is over one of the caps that bound it, checked before any
    allocation (RESOURCE_EXHAUSTED over gRPC); the message names the cap and its value."""
