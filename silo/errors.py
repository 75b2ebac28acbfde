"""The one base class for errors a user can fix; the CLI prints them (and the storage
engine's `StoreError`s) as one line."""

from silo.datastore.errors import StoreError


class SiloError(Exception):
    """Bad input or state the user can fix; the message says what and where."""


USER_ERRORS: tuple[type[BaseException], ...] = (SiloError, StoreError, FileNotFoundError, FileExistsError)
