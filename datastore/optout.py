"""The opt-out log: an append-only, fsync'd record of every removal, read by every rebuild.

`STORE/optout.log` holds one JSON object per line:

    {"receipt": "…", "time": "…", "by": "doc_ids"|"owner"|"source"|"span",
     "values": [...], "doc_ids": [the documents it removed when it was made]}

A removal is acknowledged only after its line is written and fsync'd (`append_removal`).
A line cut short by a crash is ignored when reading (it was never acknowledged).
`removed_doc_filter` answers "is this corpus document opted out?" — by id, owner, source
or a text span it contains — so a rebuild never ingests removed text again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOG_NAME = "optout.log"
REMOVAL_KINDS = ("doc_ids", "owner", "source", "span")


@dataclass
class Removals:
    """Everything the log removes, merged."""

    doc_ids: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    spans: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def matches(self, doc: dict) -> bool:
        return (doc.get("doc_id") in self.doc_ids or (doc.get("owner") or None) in self.owners
                or doc.get("source") in self.sources or any(s in (doc.get("text") or "") for s in self.spans))


def read_log(store: str | os.PathLike) -> Removals:
    path = Path(store) / LOG_NAME
    rem = Removals()
    if not path.is_file():
        return rem
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn final write: never acknowledged
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rem.records.append(rec)
            rem.doc_ids.update(rec.get("doc_ids", []))
            kind, values = rec.get("by"), rec.get("values", [])
            if kind == "doc_ids":
                rem.doc_ids.update(values)
            elif kind == "owner":
                rem.owners.update(values)
            elif kind == "source":
                rem.sources.update(values)
            elif kind == "span":
                rem.spans.extend(values)
    return rem


def removed_doc_filter(store: str | os.PathLike) -> Callable[[dict], bool]:
    rem = read_log(store)
    if not rem.records:
        return lambda doc: False
    return rem.matches


def append_removal(store: str | os.PathLike, by: str, values: list[str], doc_ids: list[str]) -> dict:
    """Append one removal and fsync it (and the folder, for a new log) before returning."""
    if by not in REMOVAL_KINDS:
        raise ValueError(f"unknown removal kind {by!r}; expected one of {', '.join(REMOVAL_KINDS)}")
    rec = {"receipt": uuid.uuid4().hex, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "by": by, "values": list(values), "doc_ids": sorted(doc_ids)}
    path = Path(store) / LOG_NAME
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return rec
