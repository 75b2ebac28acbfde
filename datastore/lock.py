"""One writer per store folder: builds, compactions and ingests take `STORE/.silo.lock`.

The lock is an exclusive `flock` on the file, so the kernel releases it when its holder
dies — a lock left by a process killed with -9 is taken over by the next writer, safely,
because the kernel (not a pid check that could race) decides. The file also records who
holds it (purpose, pid, host, time) so a refused writer can say who is in the way.
Readers (serving processes, opt-outs) never take it: opt-outs have their own short lock
on the log (`silo.datastore.optout`), and compaction and ingest publish by an atomic manifest
switch that readers pick up on their own.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from silo.datastore.errors import StoreLocked

LOCK_NAME = ".silo.lock"


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """Who last took the lock of `folder` (it may be free now), or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class StoreLock:
    """`with StoreLock(folder, "compaction"):` — raises `StoreLocked` if another process holds it."""

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder, self.purpose = Path(folder), purpose
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = lock_holder(self.folder) or {}
            raise StoreLocked(f"{self.folder} is locked by a {h.get('purpose', 'writer')} (pid {h.get('pid', '?')} "
                              f"on {h.get('host', '?')} since {h.get('since', '?')}); wait for it to finish, or "
                              "stop that process — a dead holder's lock is released by the system") from None
        info = {"purpose": self.purpose, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
