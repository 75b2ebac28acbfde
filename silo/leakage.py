"""Cross-tier leakage scan: permissive documents that copy restricted text, cut before training.

A tier label is a claim about a whole document; real corpora break it inside documents: a
GPL file vendored into an MIT repository, a forum post quoting a book page. Before a
tokenizer or an LM trains, every document of the trained tiers is checked against the
restricted tier (all splits) for verbatim copies:

- text is cut into words (`\\w+` runs, each NFKC-normalised and casefolded: case,
  whitespace and punctuation do not hide a copy) and 13-word shingles are hashed (the
  removal ledger's hash, `silo.datastore.ledger.shingle_hashes`);
- the restricted tier's shingles form a sorted array (hash → restricted documents), 12
  bytes per restricted word; a document's shingles are looked up in one vectorised search;
- a **copy** is a run of consecutive shingles found in the restricted tier covering at
  least `min_words` words (default 32: MassiveDS's decontamination run, about 45 tokens
  at ~1.4 tokens per word), attributed to the restricted document holding most of them;
- **boilerplate** is not a copy: a shingle held by more than `boilerplate_docs` (3)
  restricted documents is a licence header or a standard notice, as in decontamination
  (`silo.decontam`), and breaks a run instead of extending it;
- the copied spans are **cut** (the rest of the document is kept, the pieces joined by a
  newline) or, with `action="exclude"`, the whole document is left out.

`LeakageScan.clean(doc)` gives the text to train on (None: excluded) and remembers each
document's copies for the report (`report()`: per document, its copied spans with the
restricted document, license and source they copy). `silo lm train` and `silo tokenizer
train` run the scan by default and write the report beside their output.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from silo.corpus import iter_documents
from silo.datastore.ledger import SHINGLE_WORDS, shingle_hashes
from silo.errors import SiloError
from silo.progress import bar as progress_bar
from silo.tokenizer import train_tokenizer_on_corpus

DEFAULT_MIN_WORDS = 32
BOILERPLATE_DOCS = 3
ACTIONS = ("cut", "exclude")
_WORD = re.compile(r"\w+")


def words_with_offsets(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(normalised words, start and end character offsets of each in `text`)."""
    spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    words = [unicodedata.normalize("NFKC", w).casefold() for _, _, w in spans]
    return words, np.array([s for s, _, _ in spans], np.int64), np.array([e for _, e, _ in spans], np.int64)


@dataclass
class Copy:
    """A span of a trained-tier document found verbatim in a restricted document."""

    start_char: int
    end_char: int
    words: int
    restricted_doc_id: str
    restricted_license: str
    restricted_source: str
    excerpt: str  # the first words of the span, for the report


class LeakageScan:
    """The restricted tier's shingles, and the copies found in each document scanned."""

    def __init__(self, hashes: np.ndarray, starts: np.ndarray, counts: np.ndarray, docs: np.ndarray,
                 meta: list[tuple[str, str, str]], min_words: int, action: str, boilerplate_docs: int):
        assert hashes.dtype == np.uint64 and len(hashes) == len(starts) == len(counts)
        if action not in ACTIONS:
            raise SiloError(f"leakage action must be one of {', '.join(ACTIONS)}, not {action!r}")
        if min_words < SHINGLE_WORDS:
            raise SiloError(f"a copy must be at least {SHINGLE_WORDS} words (the shingle), not {min_words}")
        self.hashes, self.starts, self.counts, self.docs, self.meta = hashes, starts, counts, docs, meta
        self.min_words, self.action, self.boilerplate_docs = min_words, action, boilerplate_docs
        self.copies: dict[str, list[Copy]] = {}  # doc id -> its copies (documents with none are not kept)
        self.excluded: set[str] = set()
        self.scanned: set[str] = set()
        self.words = 0
        self.seconds = 0.0
        self.build_seconds = 0.0

    @classmethod
    def build(cls, corpus: str, restricted_tiers: tuple[str, ...] = ("restricted",),
              min_words: int = DEFAULT_MIN_WORDS, action: str = "cut", boilerplate_docs: int = BOILERPLATE_DOCS,
              progress: bool = False) -> LeakageScan:
        """The index of every shingle of the restricted tier (every split)."""
        t0 = time.perf_counter()
        chunks, owners, meta = [], [], []
        docs = iter_documents(corpus, tiers=restricted_tiers, columns=["text", "license", "source"])
        for doc in progress_bar(docs, desc="leakage scan: index restricted", unit="doc", progress=progress):
            h = np.unique(shingle_hashes(words_with_offsets(doc["text"])[0]))
            chunks.append(h)
            owners.append(np.full(len(h), len(meta), np.int32))
            meta.append((doc["doc_id"], doc["license"], doc["source"]))
        h = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
        d = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        order = np.lexsort((d, h))  # by hash, then document: (hash, document) pairs are distinct per document
        h, d = h[order], d[order]
        uniq, starts, counts = np.unique(h, return_index=True, return_counts=True)
        scan = cls(uniq, starts, counts, d, meta, min_words, action, boilerplate_docs)
        scan.build_seconds = time.perf_counter() - t0
        return scan

    def find(self, text: str) -> list[Copy]:
        """The copies of restricted text in `text`, in order."""
        return self._scan(text)[1]

    def _scan(self, text: str) -> tuple[int, list[Copy]]:
        """(the text's words, its copies)."""
        words, starts, ends = words_with_offsets(text)
        h = shingle_hashes(words)
        if not len(h) or not len(self.hashes):
            return len(words), []
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = (self.hashes[at] == h) & (self.counts[at] <= self.boilerplate_docs)
        out = []
        # runs of consecutive hits: a run of r shingles covers r + 12 words
        edges = np.flatnonzero(np.diff(np.concatenate([[0], hit.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            n_words = int(b - a) + SHINGLE_WORDS - 1
            if n_words < self.min_words:
                continue
            votes = Counter()
            for p in range(a, b):
                s = self.starts[at[p]]
                votes.update(self.docs[s:s + self.counts[at[p]]].tolist())
            doc_id, lic, source = self.meta[votes.most_common(1)[0][0]]
            start, end = int(starts[a]), int(ends[b - 1 + SHINGLE_WORDS - 1])
            out.append(Copy(start, end, n_words, doc_id, lic, source, " ".join(text[start:end].split()[:12])))
        return len(words), out

    def clean(self, doc: dict) -> str | None:
        """The text of `doc` to train on: its copies cut out, or None when it is excluded."""
        t0 = time.perf_counter()
        doc_id, text = doc["doc_id"], doc["text"]
        if doc_id not in self.scanned:  # a document is scanned once (tokenizer and LM passes share it)
            self.scanned.add(doc_id)
            n_words, found = self._scan(text)
            self.words += n_words
            if found:
                self.copies[doc_id] = found
                if self.action == "exclude":
                    self.excluded.add(doc_id)
        found = self.copies.get(doc_id)
        self.seconds += time.perf_counter() - t0
        if not found:
            return text
        if doc_id in self.excluded:
            return None
        pieces, at = [], 0
        for c in found:
            pieces.append(text[at:c.start_char])
            at = c.end_char
        pieces.append(text[at:])
        return "\n".join(p for p in pieces if p.strip())

    def report(self) -> dict:
        """What was scanned and found: totals, throughput, and per document its copies."""
        return {
            "min_words": self.min_words, "action": self.action, "boilerplate_docs": self.boilerplate_docs,
            "restricted_documents": len(self.meta), "restricted_shingles": int(self.counts.sum()),
            "index_bytes": int(self.hashes.nbytes + self.starts.nbytes + self.counts.nbytes + self.docs.nbytes),
            "index_seconds": round(self.build_seconds, 3),
            "documents_scanned": len(self.scanned), "words_scanned": self.words,
            "scan_seconds": round(self.seconds, 3),
            "words_per_second": round(self.words / self.seconds) if self.seconds else None,
            "documents_with_copies": len(self.copies), "documents_excluded": len(self.excluded),
            "words_cut": 0 if self.action == "exclude" else sum(c.words for cs in self.copies.values() for c in cs),
            "documents": [{"doc_id": d, "excluded": d in self.excluded, "copies": [asdict(c) for c in cs]}
                          for d, cs in sorted(self.copies.items())],
        }


def summary_line(report: dict) -> str:
    """One line for the console."""
    if not report["documents_with_copies"]:
        return (f"leakage scan: {report['documents_scanned']:,} documents, no copy of restricted text "
                f"(≥ {report['min_words']} words)")
    what = (f"{report['documents_excluded']} excluded" if report["action"] == "exclude"
            else f"{report['words_cut']:,} words cut")
    return (f"leakage scan: {report['documents_with_copies']} of {report['documents_scanned']:,} documents copy "
            f"restricted text (≥ {report['min_words']} words): {what}")


def train_tokenizer_checked(corpus: str, out: str | os.PathLike, tiers: tuple[str, ...], vocab_size: int = 8192,
                            min_words: int = DEFAULT_MIN_WORDS, action: str = "cut", skip: bool = False,
                            progress: bool = False) -> tuple[object, dict]:
    """`silo tokenizer train`: the tokenizer trained on what the leakage scan leaves of the
    tiers' text; its report (or why there is none) is written to OUT/leakage.json."""
    scan = None if skip else LeakageScan.build(corpus, min_words=min_words, action=action, progress=progress)
    tok = train_tokenizer_on_corpus(corpus, out, tiers, vocab_size, clean=scan.clean if scan else None)
    report = scan.report() if scan else {"skipped": "skipped by --skip-leakage-scan: copies of restricted text "
                                                    "were trained on unchecked"}
    (Path(out) / "leakage.json").write_text(json.dumps(report, indent=2))
    return tok, report
