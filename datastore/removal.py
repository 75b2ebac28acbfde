"""Opt-out across every open store, and the proof of a removal — the legal promise, in code.

`remove` is what a server's OptOut (and `silo datastore optout`) does:

1. resolve the request in every store (doc ids, an owner, a source, or a text span);
2. authorize: a caller acting for an owner reaches only that owner's documents — doc ids
   of another owner, or another owner's name, raise `PermissionDenied` before anything is
   written; a source or span removal is scoped to the owner (also in later rebuilds);
3. refuse a large removal (more than `max_docs` documents, or more than `max_fraction`
   of a store) unless confirmed — a typo must not empty a store;
4. on a dry run, stop and say what would go;
5. check that the record can be logged everywhere: every store the caller serves, and the
   stores it was started with but cannot serve now (`unopened`, e.g. a corrupt log) — if
   one cannot take it, refuse (`NotLoggedEverywhere`) before anything is written;
6. otherwise make one record (one receipt, with content fingerprints of the removed
   text: `silo.datastore.ledger`), append it to every removal ledger the stores name (the
   corpus's record, which outlives the stores: rebuilds into new folders, ingest and
   other stores of the corpus read it), then to every store's own log (fsync'd), tombstone,
   and only then return the receipt. A crash in between loses nothing acknowledged: a
   store whose log missed the record reads it from the ledger when it opens.

`status` proves a removal: its log record (checksum verified on read), and per store
whether its documents are tombstoned in the open store and compacted out of the files.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from silo.datastore.errors import StoreError
from silo.datastore.ledger import ledger_log
from silo.datastore.optout import new_record, record_matches
from silo.datastore.store import Datastore, UnknownDocuments

REMOVAL_KINDS = ("doc_ids", "owner", "source", "span")


class PermissionDenied(StoreError):
    """The caller acts for an owner and the request reaches another owner's documents."""


class LargeRemoval(StoreError):
    """The removal is larger than the configured limits and was not confirmed."""


class NotLoggedEverywhere(StoreError):
    """A store the removal must reach cannot take it (its log is corrupt, its ledger is
    missing): nothing was written, nothing is acknowledged."""


@dataclass
class RemovalResult:
    receipt: str  # "" for a dry run
    logged_at: str
    doc_ids: list[str]  # newly removed (or, for a dry run, that would be)
    entries: int
    dry_run: bool


@dataclass
class StoreProof:
    store: str
    doc_ids: list[str]
    tombstoned: bool
    compacted: bool
    live_entries: int


@dataclass
class RemovalStatus:
    record: dict | None
    stores: list[StoreProof] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # stores the server was started with but cannot open

    @property
    def tombstoned(self) -> bool:
        return self.record is not None and not self.missing and all(p.tombstoned for p in self.stores)

    @property
    def compacted(self) -> bool:
        return self.record is not None and bool(self.stores) and all(p.compacted for p in self.stores)


def remove(stores: list[Datastore], by: str, values: list[str], owner: str | None = None, made_by: str = "admin",
           reason: str = "", confirm_large: bool = False, dry_run: bool = False, max_docs: int = 1000,
           max_fraction: float = 0.01, unopened: dict[str, str] | None = None) -> RemovalResult:
    """Remove documents from every store (see the module docstring). `owner` is the owner
    the caller acts for (None: an admin, unscoped). `unopened` maps stores the caller was
    started with but could not open to why: the removal cannot reach them, so it is refused."""
    if by not in REMOVAL_KINDS:
        raise ValueError(f"unknown removal kind {by!r}; expected one of {', '.join(REMOVAL_KINDS)}")
    values = list(dict.fromkeys(v for v in values if v))
    if not values:
        raise ValueError("a removal needs at least one non-empty value")
    if not stores:
        raise StoreError("there is no store to remove documents from")
    if owner is not None and by == "owner" and values != [owner]:
        raise PermissionDenied(f"an owner's token may only remove that owner's documents ({owner!r})")
    if by == "doc_ids":
        unknown = [v for v in values if all(st.doc_index(v) is None for st in stores)]
        if unknown:
            raise UnknownDocuments(f"unknown doc id(s): {', '.join(unknown[:20])}")
        if owner is not None:
            foreign = sorted({v for st in stores for v in values
                              if st.doc_index(v) is not None and st.doc_owner(st.doc_index(v)) != owner})
            if foreign:
                raise PermissionDenied(f"doc id(s) {', '.join(foreign[:20])} do not belong to owner {owner!r}; "
                                       "nothing was removed")
    new: dict[str, None] = {}
    for st in stores:
        hit = st.match_docs(by, values, owner) & ~st.dead_docs
        n = int(hit.sum())
        if not (confirm_large or dry_run) and (n > max_docs or (n > 1 and n > max_fraction * max(st.n_documents, 1))):
            raise LargeRemoval(f"this removal would take {n:,} of the {st.n_documents:,} documents of store "
                               f"{st.path.name} (limits: {max_docs:,} documents, {max_fraction:.0%} of a store); "
                               "check it with a dry run (--dry-run; RPC field dry_run), then confirm it "
                               "(--confirm-large; RPC field confirm_large)")
        new.update(dict.fromkeys(st.doc_ids_of(hit)))
    doc_ids = list(new)
    if dry_run:
        return RemovalResult("", "", doc_ids, sum(st.entries_of(doc_ids) for st in stores), True)
    if unopened:
        name, why = next(iter(unopened.items()))
        raise NotLoggedEverywhere(
            f"store {name} cannot record this removal ({why}); nothing was removed anywhere, so that no store "
            f"serves the text once it is back. Repair it (`silo datastore check {name} --repair`), restart "
            "the server, and opt out again.")
    ledgers = {}
    for st in stores:
        if st.ledger_path is not None:
            ledgers.setdefault(st.ledger_path.resolve(), st.path)
    logs = [ledger_log(path, store) for path, store in ledgers.items()]  # each readable, or refused here
    hits = [st.match_docs(by, values, owner) for st in stores]
    fingerprints, seen = [], set()
    for st, hit in zip(stores, hits, strict=True):
        for fp in st.fingerprints(hit):
            if fp["doc_id"] not in seen:
                seen.add(fp["doc_id"])
                fingerprints.append(fp)
    all_ids = sorted({d for st, hit in zip(stores, hits, strict=True) for d in st.doc_ids_of(hit)})
    record = new_record(by, values, all_ids, owner, made_by, reason, fingerprints, receipt=uuid.uuid4().hex)
    for log in logs:  # the corpus's record first: it outlives every store
        log.append_record(record)
    entries = sum(st.entries_of(doc_ids) for st in stores)  # before: the ledger append tombstones them
    for st in stores:
        st.opt_out(by, values, scope_owner=owner, made_by=made_by, reason=reason, require_known=False,
                   record=record)
    return RemovalResult(record["receipt"], record["time"], doc_ids, entries, False)


def find_record(stores: list[Datastore], receipt: str | None = None, doc_id: str | None = None) -> dict | None:
    """The log record with this receipt, or the one that removed this document."""
    for st in stores:
        for rec in st.removal_records:
            if receipt is not None and rec["receipt"] == receipt:
                return rec
    if doc_id is None:
        return None
    for st in stores:
        d = st.doc_index(doc_id)
        if d is None or not st.dead_docs[d]:
            continue
        for rec in st.removal_records:
            if record_matches(rec, doc_id, st.doc_owner(d), st.doc_source(d), None) or (
                    rec["by"] == "span" and record_matches(rec, doc_id, st.doc_owner(d), None, st.doc_text(d))):
                return rec
    return None


def status(stores: list[Datastore], record: dict, unopened: list[str] | None = None) -> RemovalStatus:
    """Per store: which of its documents the record covers, tombstoned? compacted?
    `unopened` (stores the server cannot open) are listed as missing: no proof for them."""
    out = RemovalStatus(record, missing=list(unopened or []))
    for st in stores:
        docs = [d for d in (st.doc_index(x) for x in record["doc_ids"]) if d is not None]
        if not docs:
            continue
        out.stores.append(StoreProof(
            store=st.path.name, doc_ids=[st.doc_id(d) for d in docs], tombstoned=bool(st.dead_docs[docs].all()),
            compacted=all(st.is_compacted(d) for d in docs),
            live_entries=sum(int(st.entries_per_doc[d]) for d in docs if not st.dead_docs[d])))
    return out
