"""The opt-out log: an append-only, checksummed, fsync'd record of every removal.

`STORE/optout.log` holds one JSON object per line (ASCII; non-ASCII escaped):

    {"receipt": "…", "time": "…", "by": "doc_ids"|"owner"|"source"|"span", "values": [...],
     "doc_ids": [documents it removed when it was made], "scope_owner": null | "NAME",
     "made_by": "admin" | "owner:NAME", "reason": "…", "check": "<sha256 prefix>"}

`check` is the first 16 hex digits of the SHA-256 of the record's canonical JSON without
it, so a flipped byte is caught; a record without `check` is corrupt too (a flipped byte in
the key itself must not turn a record into an unchecked one). Records may also carry
`fingerprints` (`silo.datastore.ledger`: content hashes of the removed text, so the same text
under another id is refused by builds and ingest). `scope_owner` limits a removal made with an owner's
credential to that owner's documents: an owner opting out a source or a span never
removes anyone else's text, now or in a later rebuild.

Crash safety. A removal is acknowledged only after its line is written and fsync'd
(and, for a new log, the folder too). A crash can leave at most a torn *last* line
(never acknowledged): readers ignore it, and `OptOutLog.append` first truncates it away
(and fsyncs) under an exclusive `flock`, so a new record never lands on a fragment.
The write is looped until every byte is written (a short `write` is never acknowledged).
An append that cuts a torn tail pads its line with spaces if needed so that the log ends
up longer than it ever was: readers compare sizes (below), and a log that returned to a
size a reader had already consumed would hide the new record from it.
A complete line that does not parse or fails its checksum anywhere is a `CorruptLog`
naming the line: the store refuses to serve rather than serve opted-out text, and
`silo datastore check STORE --repair` quarantines the bad lines for a human to re-issue.

Reading is incremental (`OptOutLog.read_new`): the log only grows, so a process keeps the
byte offset of the last complete line it applied and reads only what follows, and the
bytes it has *consumed* (`consumed`, a torn tail it has seen included): a reader whose
size check finds exactly that many bytes knows nothing new is there, torn tail or not.
The same class reads and writes the corpus's removal ledger (`silo.datastore.ledger`), which
has this format under another name.
`Removals.matches` answers "is this document opted out?" for rebuilds and ingest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from silo.datastore.errors import StoreError
from silo.datastore.manifest import fsync_path

LOG_NAME = "optout.log"
QUARANTINE_NAME = "optout.quarantine"
REMOVAL_KINDS = ("doc_ids", "owner", "source", "span")
_REQUIRED = {"receipt": str, "time": str, "by": str, "values": list, "doc_ids": list}


class CorruptLog(StoreError):
    """A complete line of the opt-out log (or of a removal ledger) is unreadable: the store
    will not serve until an operator repairs it (`silo datastore check STORE --repair`)."""

    def __init__(self, path: Path, line_no: int, reason: str, store: Path | None = None):
        what = "opt-out log" if path.name == LOG_NAME else "removal ledger"
        super().__init__(f"{path}: line {line_no} of the {what} is corrupt ({reason}); the store refuses "
                         f"to serve rather than risk serving removed text. Run `silo datastore check "
                         f"{store or path.parent} --repair` to quarantine the line, then re-issue that removal.")
        self.path, self.line_no, self.reason = path, line_no, reason


def checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "check"}
    canon = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("ascii")).hexdigest()[:16]


def parse_line(raw: bytes) -> dict:
    """One complete log line (without its newline) -> record; ValueError says why not."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    for key, typ in _REQUIRED.items():
        if not isinstance(rec.get(key), typ):
            raise ValueError(f"field {key!r} missing or not a {typ.__name__}")
    if rec["by"] not in REMOVAL_KINDS:
        raise ValueError(f"unknown removal kind {rec['by']!r}")
    if not isinstance(rec.get("check"), str):  # never "unchecked": a flipped key must not skip the check
        raise ValueError("no checksum")
    if rec["check"] != checksum(rec):
        raise ValueError("checksum mismatch")
    return rec


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written: a short write (a full disk, a file size
    limit) raises instead of leaving half a record that someone acknowledges."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(f"write returned {n}: the record was not written")
        view = view[n:]


def new_record(by: str, values: list[str], doc_ids: Iterable[str], scope_owner: str | None = None,
               made_by: str = "admin", reason: str = "", fingerprints: list[dict] | None = None,
               receipt: str | None = None) -> dict:
    """A checksummed removal record (one receipt, appended unchanged to every log it goes to)."""
    if by not in REMOVAL_KINDS:
        raise ValueError(f"unknown removal kind {by!r}; expected one of {', '.join(REMOVAL_KINDS)}")
    rec = {"receipt": receipt or uuid.uuid4().hex, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "by": by, "values": list(values), "doc_ids": sorted(set(doc_ids)), "scope_owner": scope_owner,
           "made_by": made_by, "reason": reason}
    if fingerprints:
        rec["fingerprints"] = fingerprints
    rec["check"] = checksum(rec)
    return rec


@dataclass
class Removals:
    """Everything a log removes, merged; scoped removals only reach their owner's documents."""

    doc_ids: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    sources: set[tuple[str | None, str]] = field(default_factory=set)  # (scope owner, source)
    spans: list[tuple[str | None, str]] = field(default_factory=list)  # (scope owner, span)
    records: list[dict] = field(default_factory=list)
    receipts: set[str] = field(default_factory=set)

    def add(self, rec: dict) -> None:
        if rec["receipt"] in self.receipts:  # the same removal read from a store's log and from a ledger
            return
        self.receipts.add(rec["receipt"])
        self.records.append(rec)
        self.doc_ids.update(rec["doc_ids"])
        scope, kind, values = rec.get("scope_owner"), rec["by"], rec["values"]
        if kind == "doc_ids":
            self.doc_ids.update(values)
        elif kind == "owner":
            self.owners.update(values)
        elif kind == "source":
            self.sources.update((scope, v) for v in values)
        else:
            self.spans.extend((scope, v) for v in values)

    def matches(self, doc: dict) -> bool:
        """Is this document (doc_id, owner, source, text) removed by the log, by id, owner,
        source or span? (Copies of removed text: `silo.datastore.ledger.CopyFinder`.)"""
        owner = doc.get("owner") or None
        if doc.get("doc_id") in self.doc_ids or owner in self.owners:
            return True
        if any(s == doc.get("source") and (scope is None or scope == owner) for scope, s in self.sources):
            return True
        text = doc.get("text") or ""
        return any(sp in text and (scope is None or scope == owner) for scope, sp in self.spans)

    def receipt_for(self, doc: dict) -> str | None:
        """The receipt of a record that removes this document (for reports), or None."""
        text = doc.get("text")
        for rec in reversed(self.records):
            if record_matches(rec, doc.get("doc_id"), doc.get("owner") or None, doc.get("source"), text):
                return rec["receipt"]
        return None


def record_matches(rec: dict, doc_id: str, owner: str | None, source: str | None, text: str | None) -> bool:
    """Does one record remove this document? (Text is only looked at for span records.)"""
    scope = rec.get("scope_owner")
    if doc_id in rec["doc_ids"]:
        return True
    if scope is not None and scope != owner:
        return False
    by, values = rec["by"], rec["values"]
    if by == "doc_ids":
        return doc_id in values
    if by == "owner":
        return owner in values
    if by == "source":
        return source in values
    return text is not None and any(v in text for v in values)


def _last_newline(fd: int, size: int) -> int:
    """Offset just past the last b"\\n" in the first `size` bytes (0 if none)."""
    pos, chunk = size, 1 << 16
    while pos > 0:
        lo = max(0, pos - chunk)
        data = os.pread(fd, pos - lo, lo)
        i = data.rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


class OptOutLog:
    """One log file (a store's `optout.log`, or a removal ledger): durable appends,
    incremental tolerant reads."""

    def __init__(self, store: str | os.PathLike, name: str = LOG_NAME, repair_hint: Path | None = None):
        self.path = Path(store) / name
        self.repair_hint = repair_hint  # the folder `silo datastore check --repair` takes
        self.offset = 0  # end of the last complete line read by `read_new`
        self.consumed = 0  # bytes seen by `read_new`, a torn tail included

    @classmethod
    def at(cls, path: str | os.PathLike, repair_hint: Path | None = None) -> OptOutLog:
        path = Path(path)
        return cls(path.parent, path.name, repair_hint)

    @property
    def quarantine(self) -> Path:
        return self.path.parent / (QUARANTINE_NAME if self.path.name == LOG_NAME
                                   else self.path.stem + ".quarantine")

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_new(self) -> list[dict]:
        """Records appended since the last call (all of them the first time). A torn last
        line is left for later; a corrupt complete line raises `CorruptLog`."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self.offset = self.consumed = 0
            return []
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:  # rewritten by an offline repair: read it all again (callers merge)
                self.offset = 0
            if size == self.offset:
                self.consumed = size
                return []
            data = os.pread(fd, size - self.offset, self.offset)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # bytes after it: a torn last write, never acknowledged
        first_line = self._line_no(self.offset)
        out = []
        for i, raw in enumerate(data[:end].split(b"\n")[:-1]):
            try:
                out.append(parse_line(raw))
            except ValueError as e:
                raise CorruptLog(self.path, first_line + i, str(e), self.repair_hint) from None
        self.offset += end
        self.consumed = self.offset + len(data) - end
        return out

    def _line_no(self, offset: int) -> int:
        if offset == 0:
            return 1
        with open(self.path, "rb") as f:
            return f.read(offset).count(b"\n") + 1

    def read_all(self) -> Removals:
        rem = Removals()
        for rec in OptOutLog(self.path.parent, self.path.name, self.repair_hint).read_new():
            rem.add(rec)
        return rem

    def append(self, by: str, values: list[str], doc_ids: Iterable[str], scope_owner: str | None = None,
               made_by: str = "admin", reason: str = "", fingerprints: list[dict] | None = None) -> dict:
        """Append one removal durably and return its record (the receipt): only then may
        the caller acknowledge it."""
        rec = new_record(by, values, doc_ids, scope_owner, made_by, reason, fingerprints)
        self.append_record(rec)
        return rec

    def append_record(self, rec: dict) -> None:
        """Append a record made by `new_record` durably (fsync'd; the folder too for a new log)."""
        line = json.dumps(rec, ensure_ascii=True).encode("ascii")
        new = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one appender at a time, across processes
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn tail from a crash: cut it off first
                end = _last_newline(fd, size)
                os.ftruncate(fd, end)
                os.fsync(fd)
                # end longer than the torn log was: a reader that consumed `size` bytes must see a change
                line += b" " * max(0, size - end - len(line))
            write_all(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
        if new:
            fsync_path(self.path.parent)

    def check(self) -> dict:
        """Every complete line checked: counts, corrupt lines (number, reason), torn tail bytes."""
        report = {"records": 0, "corrupt": [], "torn_tail_bytes": 0}
        if not self.path.is_file():
            return report
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        report["torn_tail_bytes"] = len(data) - end
        for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
            try:
                parse_line(raw)
            except ValueError as e:
                report["corrupt"].append({"line": i, "reason": str(e), "bytes": raw[:200].decode("latin-1")})
                continue
            report["records"] += 1
        return report

    def repair(self) -> dict:
        """Rewrite the log without a torn tail and without corrupt lines (moved, with their
        line numbers, to the quarantine file beside it for a human to re-issue); atomic and
        fsync'd. Run it with every server of the store stopped."""
        report = self.check()
        if not report["corrupt"] and not report["torn_tail_bytes"]:
            return report
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        good, bad = [], []
        for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
            try:
                parse_line(raw)
                good.append(raw + b"\n")
            except ValueError as e:
                bad.append(f"# line {i}: {e}\n".encode() + raw + b"\n")
        if bad:
            with open(self.quarantine, "ab") as q:
                q.write(b"".join(bad))
                q.flush()
                os.fsync(q.fileno())
        tmp = self.path.with_name(self.path.name + ".repair")
        with open(tmp, "wb") as f:
            f.write(b"".join(good))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)
        return report


def read_log(store: str | os.PathLike) -> Removals:
    """Everything the log of `store` removes (a torn last line ignored; corrupt lines raise)."""
    return OptOutLog(store).read_all()


def append_removal(store: str | os.PathLike, by: str, values: list[str], doc_ids: Iterable[str], **kw) -> dict:
    """Append one removal to the log of `store`, durably (see `OptOutLog.append`)."""
    return OptOutLog(store).append(by, values, doc_ids, **kw)
