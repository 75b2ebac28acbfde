"""The removal ledger: opt-outs that outlive any one store, and fingerprints of removed text.

A store's `optout.log` dies with the store; a rebuild into a new folder (the ordinary
blue-green way) would serve every removed document again. So removals also live in a
**ledger that belongs with the corpus**, the system of record: `CORPUS/removals.log`,
created by the first build from that corpus (`silo datastore build --ledger PATH` names
another, e.g. one ledger for a deployment whose stores come from several corpora). The
file has the opt-out log's format and guarantees (`silo.datastore.optout`: checksummed JSON
lines, fsync'd, flock'd appends, torn-tail repair), and:

- every store built from the corpus records the ledger's absolute path in its manifest
  (`Manifest.ledger`) and reads it on open and before every search, like its own log —
  so an opt-out made against one store reaches every store of the corpus without anyone
  touching their folders;
- every opt-out (server `OptOut`, `silo datastore optout`) appends its record to the
  ledger of every store it reaches *and* to each store's own log before it is
  acknowledged (`silo.datastore.removal.remove`);
- every build, rebuild, ingest (`datastore add`, `AddDocuments`) and compaction reads it;
- a store whose manifest names a ledger that cannot be read is refused (`LedgerMissing`):
  it could not keep the promise. Stores built before ledgers existed have no entry and
  open as before (their own log is their record).

Content fingerprints. A removal names ids, owners, sources or spans; the same text under
another id, owner or source would come back through a build or ingest. So each record
also carries, per removed document, a fingerprint of its text (`fingerprint`):

- the text is normalised: Unicode NFKC (full-width letters, ligatures), casefold, and
  reduced to its words (`\\w+` runs) joined by single spaces — so whitespace, case and
  punctuation do not matter;
- `sha256` of the normalised text (an exact copy, under any id);
- `shingles`: hashes of its 13-word shingles (MassiveDS's decontamination n-gram), a
  deterministic sample: a shingle is kept if its 64-bit hash is divisible by `SAMPLE_MOD`
  (4) — content-defined, so a shingle kept in one document is kept in every document
  containing it — and of those at most `MAX_SHINGLES` (128), the smallest, so a record
  stays under ~2.5 KB per document however long it is.

Matching rule (`CopyFinder.find`): a document is a copy of removed text if its
normalised hash equals a removed one, or if, for one removed fingerprint, at least
`MIN_SHARED` (3) of the document's sampled shingles are comparable (not above that
fingerprint's largest kept hash, when its sample was capped) and at least `CONTAINMENT`
(50%) of those are in the fingerprint. MassiveDS drops a document on a 32-word overlap or
13-gram Jaccard ≥ 0.8; containment of the *new* document is the stricter reading (an
excerpt of removed text is refused; a document that only shares a licence header with
one is not, since the header is a small share of its shingles).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

import numpy as np
from silo.datastore.errors import StoreError
from silo.datastore.manifest import fsync_path
from silo.datastore.optout import OptOutLog, Removals

LEDGER_NAME = "removals.log"
SHINGLE_WORDS = 13
SAMPLE_MOD = 4
MAX_SHINGLES = 128
MIN_SHARED = 3
CONTAINMENT = 0.5
_WORD = re.compile(r"\w+")
_MASK = (1 << 64) - 1


class LedgerMissing(StoreError):
    """A store's manifest names a removal ledger that cannot be read: serving it could
    serve removed text."""


def default_ledger(corpus: str | os.PathLike) -> Path:
    """Where a corpus keeps its removals: beside its shards."""
    return Path(corpus).resolve() / LEDGER_NAME


def ensure_ledger(path: str | os.PathLike) -> Path:
    """Create the ledger (empty, fsync'd with its folder) if it does not exist; its path."""
    path = Path(path).resolve()
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.fsync(fd)
        os.close(fd)
        fsync_path(path.parent)
    except OSError as e:
        raise StoreError(f"cannot create the removal ledger {path} ({e.strerror}); the corpus folder must be "
                         "writable, or name a writable ledger with --ledger PATH") from e
    return path


def ledger_log(path: str | os.PathLike, store: str | os.PathLike | None = None) -> OptOutLog:
    """The ledger at `path` as a log; `LedgerMissing` (naming `store`, the path and the fix)
    if it is not a readable file."""
    path = Path(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        who = f"store {store} records" if store else "this store records"
        raise LedgerMissing(
            f"{who} its removals in the ledger {path}, which cannot be read: without it the store could "
            "serve documents that were opted out, so it is refused. Restore the file (it lives with the corpus "
            "the store was built from), or if the corpus moved, set \"ledger\" in the store's manifest.json "
            "to the ledger's new path.")
    return OptOutLog.at(path, Path(store) if store else None)


def read_ledger(path: str | os.PathLike | None, into: Removals | None = None) -> Removals:
    """Every removal in the ledger (merged into `into`, if given); None: nothing."""
    rem = into if into is not None else Removals()
    if path is not None:
        for rec in ledger_log(path).read_new():
            rem.add(rec)
    return rem


# ---------------------------------------------------------------------------- fingerprints


def normalize(text: str) -> list[str]:
    """The words of `text` after NFKC and casefolding."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(words: list[str]) -> np.ndarray:
    """64-bit hashes (uint64) of every run of SHINGLE_WORDS words: a polynomial over the
    words' hashes, then splitmix64's finaliser so every bit is mixed (for the mod sample)."""
    n = len(words) - SHINGLE_WORDS + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    cache: dict[str, int] = {}
    w = np.array([cache[x] if x in cache else cache.setdefault(x, _word_hash(x)) for x in words], np.uint64)
    h = np.zeros(n, np.uint64)
    p = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(SHINGLE_WORDS):
            h = h * p + w[j : j + n]
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def words_sha256(words: list[str]) -> str:
    """SHA-256 of normalised words (`normalize`): equal for texts that differ only in case,
    whitespace and punctuation. Removal fingerprints and training records both use it, so
    one can be checked against the other."""
    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()


def sampled_shingles(words: list[str]) -> np.ndarray:
    """The sorted, distinct sampled shingle hashes of a normalised text (all of them)."""
    h = shingle_hashes(words)
    return np.unique(h[h % np.uint64(SAMPLE_MOD) == 0])


def fingerprint(doc_id: str, text: str) -> dict | None:
    """{doc_id, sha256, shingles (hex), capped} of a removed document's text; None if it has no words."""
    words = normalize(text)
    if not words:
        return None
    kept = sampled_shingles(words)
    capped = len(kept) > MAX_SHINGLES
    return {"doc_id": doc_id, "sha256": words_sha256(words),
            "shingles": [f"{int(x):016x}" for x in kept[:MAX_SHINGLES]], "capped": capped}


class CopyFinder:
    """Finds documents whose text is a copy of removed text (the rule in the module docstring)."""

    def __init__(self, removals: Removals):
        self.exact: dict[str, tuple[str, str]] = {}  # sha256 -> (original doc id, receipt)
        self.fps: list[tuple[str, str, int, int]] = []  # (doc id, receipt, kept shingles, cap threshold)
        self.by_shingle: dict[int, list[int]] = defaultdict(list)
        for rec in removals.records:
            for fp in rec.get("fingerprints") or ():
                self.exact.setdefault(fp["sha256"], (fp["doc_id"], rec["receipt"]))
                kept = [int(x, 16) for x in fp.get("shingles", ())]
                if not kept:
                    continue
                limit = max(kept) if fp.get("capped") else _MASK
                for x in kept:
                    self.by_shingle[x].append(len(self.fps))
                self.fps.append((fp["doc_id"], rec["receipt"], len(kept), limit))

    def __bool__(self) -> bool:
        return bool(self.exact)

    def find(self, text: str) -> dict | None:
        """{original, receipt, how} if `text` copies a removed document, else None."""
        if not self.exact:
            return None
        words = normalize(text)
        if not words:
            return None
        sha = words_sha256(words)
        if sha in self.exact:
            doc_id, receipt = self.exact[sha]
            return {"original": doc_id, "receipt": receipt, "how": "the same normalised text"}
        mine = sampled_shingles(words)
        hits: dict[int, int] = defaultdict(int)
        for x in mine.tolist():
            for i in self.by_shingle.get(x, ()):
                hits[i] += 1
        best = None
        for i, n in hits.items():
            doc_id, receipt, _, limit = self.fps[i]
            comparable = int((mine <= np.uint64(limit)).sum())
            if comparable >= MIN_SHARED and n >= MIN_SHARED and n >= CONTAINMENT * comparable:
                share = n / comparable
                if best is None or share > best[0]:
                    best = (share, doc_id, receipt)
        if best is None:
            return None
        return {"original": best[1], "receipt": best[2],
                "how": f"{best[0]:.0%} of its sampled 13-word shingles are in the removed text"}
