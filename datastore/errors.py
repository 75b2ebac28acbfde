"""The storage engine's errors: one base class, so callers map them to statuses in one place."""


class StoreError(Exception):
    """A store folder that is missing, corrupt, locked, or does not fit the request; the
    message says which and what to do."""


class FingerprintMismatch(StoreError):
    """The store was built with another model or tokenizer."""


class StoreLocked(StoreError):
    """Another process holds the store's lock (a build, compaction or ingest is running)."""
