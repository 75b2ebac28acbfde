"""`silo datastore check STORE [--repair]`: is a store whole, and is its opt-out log sound?

Checks, in order: the manifest; the opt-out log line by line (a torn last line is a crash
before an acknowledgement and harmless; a corrupt complete line stops the store from
serving); the removal ledger the manifest names (`silo.datastore.ledger`), the same way — a
missing one stops the store; every file the manifest names (opening the store reads each index and entry
file and compares counts); folders no manifest names (a crashed build, compaction or
ingest). With `repair` (under the store's lock, with its servers stopped): the log is
rewritten without a torn tail and with corrupt lines moved to `optout.quarantine` —
whoever made those removals must issue them again — and unnamed folders are deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from silo.datastore.errors import StoreError
from silo.datastore.ledger import ledger_log
from silo.datastore.lock import StoreLock, lock_holder
from silo.datastore.manifest import Manifest
from silo.datastore.optout import QUARANTINE_NAME, OptOutLog
from silo.datastore.store import Datastore
from silo.datastore.writer import sweep_orphans


def _unnamed(path: Path, m: Manifest) -> list[str]:
    keep = {s.name for s in m.shards}
    shards = path / "shards"
    out = [d.name for d in shards.iterdir() if d.is_dir() and d.name not in keep] if shards.is_dir() else []
    return out + [d.name for d in (path / "build", path / ".ingest") if d.is_dir()]  # a build or ingest's work


def check_store(path: str | os.PathLike, repair: bool = False) -> dict:
    """A report: {"ok", "lines" (for people), "log", "unnamed", "errors", "repaired"}."""
    path = Path(path)
    lines, errors = [], []
    try:
        m = Manifest.load(path)
    except StoreError as e:
        return {"ok": False, "lines": [f"manifest: {e}"], "errors": [str(e)], "log": None, "unnamed": [],
                "repaired": False}
    lines.append(f"manifest: {m.kind} store, {m.documents:,} documents, {m.entries:,} entries, {len(m.shards)} shards")
    log = OptOutLog(path)
    report = log.check()
    lines.append(f"opt-out log: {report['records']} records")
    if report["torn_tail_bytes"]:
        lines.append(f"  a torn last line ({report['torn_tail_bytes']} bytes): a write cut short by a crash, never "
                     "acknowledged; the next opt-out (or --repair) cuts it off")
    for c in report["corrupt"]:
        errors.append(f"opt-out log line {c['line']} is corrupt ({c['reason']})")
        lines.append(f"  line {c['line']}: CORRUPT ({c['reason']}): {c['bytes'][:120]!r}")
    ledger = None
    if m.ledger:
        try:
            ledger = ledger_log(m.ledger, path)
        except StoreError as e:
            errors.append(str(e))
            lines.append(f"removal ledger: {e}")
    ledger_report = ledger.check() if ledger is not None else None
    if ledger_report is not None:
        lines.append(f"removal ledger {ledger.path}: {ledger_report['records']} records")
        for c in ledger_report["corrupt"]:
            errors.append(f"removal ledger line {c['line']} is corrupt ({c['reason']})")
            lines.append(f"  line {c['line']}: CORRUPT ({c['reason']}): {c['bytes'][:120]!r}")
    unnamed = _unnamed(path, m)
    if unnamed:
        lines.append(f"unfinished or replaced folders/files no manifest names: {', '.join(unnamed)}")
    holder = lock_holder(path)
    repaired = False
    if repair:
        with StoreLock(path, "repair"):
            if report["corrupt"] or report["torn_tail_bytes"]:
                log.repair()
                lines.append(f"repaired the log: {len(report['corrupt'])} corrupt line(s) moved to "
                             f"{path / QUARANTINE_NAME} — issue those removals again")
            if ledger_report is not None and (ledger_report["corrupt"] or ledger_report["torn_tail_bytes"]):
                ledger.repair()
                lines.append(f"repaired the removal ledger: {len(ledger_report['corrupt'])} corrupt line(s) moved "
                             f"to {ledger.quarantine} — issue those removals again")
            if unnamed:
                sweep_orphans(path)
                for work in ("build", ".ingest"):
                    shutil.rmtree(path / work, ignore_errors=True)
                lines.append(f"deleted {len(unnamed)} unnamed folder(s)/file(s)")
        repaired = True
        errors = [e for e in errors if not e.startswith(("opt-out log", "removal ledger line"))]
    if not errors or repaired:
        try:
            store = Datastore.open(path, load_index=True)
            lines.append(f"files: every shard opens ({store.n_entries:,} entries, "
                         f"{int(store.dead_docs.sum()):,} documents tombstoned)")
            store.close()
        except StoreError as e:
            errors.append(str(e))
            lines.append(f"files: {e}")
    if holder:
        lines.append(f"lock last taken by a {holder.get('purpose')} (pid {holder.get('pid')} on {holder.get('host')} "
                     f"at {holder.get('since')})")
    ok = not errors
    lines.append("OK" if ok else f"PROBLEMS: {len(errors)} — run `silo datastore check {path} --repair`")
    return {"ok": ok, "lines": lines, "errors": errors, "log": report, "unnamed": unnamed, "repaired": repaired}
