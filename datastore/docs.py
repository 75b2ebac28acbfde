"""The documents of a store: small metadata in RAM, text and sentences read on demand.

Per document, RAM holds its id, its first entry and entry count, and the four columns a
retrieval policy or an opt-out looks at (tier, license, source, owner) dictionary-encoded:
an int32 code per document plus the distinct values, so a glob is matched once per
distinct value, not once per document. Text and sentence offsets stay in each shard's
memory-mapped files and are decoded only for the documents a caller asks about — never
held as Python strings. Document indexes are global: shard i holds
[first_doc, first_doc + documents).
"""

from __future__ import annotations

import fnmatch
import mmap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from silo.datastore.errors import StoreError

CODED = ("source", "license", "tier", "owner")


def _load(path: Path, **kw) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False, **kw)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from e


def _bytes(path: Path) -> mmap.mmap | bytes:
    """A read-only memory map of a file (b"" for an empty one, which cannot be mapped)."""
    if not path.is_file():
        raise StoreError(f"{path}: missing")
    if path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class ShardText:
    """One shard's text and sentence starts (memory-mapped)."""

    def __init__(self, folder: Path, documents: int):
        self.text = _bytes(folder / "text.bin")
        self.text_offsets = _load(folder / "text_offsets.npy")
        self.sentences = _load(folder / "sentences.npy")
        self.sentence_offsets = _load(folder / "sentence_offsets.npy")
        if len(self.text_offsets) != documents + 1 or len(self.sentence_offsets) != documents + 1:
            raise StoreError(f"{folder}: text offsets for {len(self.text_offsets) - 1} documents, expected {documents}")
        if int(self.text_offsets[-1]) != len(self.text):
            raise StoreError(f"{folder / 'text.bin'}: {len(self.text)} bytes, offsets say {int(self.text_offsets[-1])}")

    def text_of(self, local: int) -> str:
        a, b = int(self.text_offsets[local]), int(self.text_offsets[local + 1])
        return self.text[a:b].decode("utf-8")

    def slice_of(self, local: int, start: int, end: int) -> str:
        """Characters [start, end) of a document, decoding only its first 4·end bytes (a
        UTF-8 character takes 1 to 4), not the whole text: an attribution reads one
        sentence or passage, whatever the size of its document."""
        a, b = int(self.text_offsets[local]), int(self.text_offsets[local + 1])
        cut = min(b, a + 4 * max(end, 0))
        while a < cut < b and self.text[cut] & 0xC0 == 0x80:  # never cut inside a character
            cut -= 1
        return self.text[a:cut].decode("utf-8")[start:end]

    def sentence_starts(self, local: int) -> np.ndarray:
        return np.asarray(self.sentences[int(self.sentence_offsets[local]) : int(self.sentence_offsets[local + 1])])


class Documents:
    """Every document of a store, across its shards."""

    def __init__(self, tables: list[pa.Table], texts: list[ShardText | None], first_docs: list[int]):
        table = pa.concat_tables(tables) if tables else pa.table({"doc_id": pa.array([], pa.string())})
        self.n = table.num_rows
        self.doc_ids = table.column("doc_id").combine_chunks() if self.n else pa.array([], pa.string())
        self.first_entry = table.column("first_entry").to_numpy().astype(np.int64) if self.n else np.zeros(0, np.int64)
        self.n_entries = table.column("n_entries").to_numpy().astype(np.int64) if self.n else np.zeros(0, np.int64)
        self.n_tokens = table.column("n_tokens").to_numpy().astype(np.int64) if self.n else np.zeros(0, np.int64)
        self.removed = table.column("removed").to_numpy(zero_copy_only=False) if self.n else np.zeros(0, bool)
        self.codes: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        for c in CODED:
            if not self.n:
                self.codes[c], self.values[c] = np.zeros(0, np.int32), np.zeros(0, dtype=object)
                continue
            enc = pc.dictionary_encode(table.column(c).combine_chunks().fill_null(""))
            self.codes[c] = enc.indices.to_numpy().astype(np.int32)
            self.values[c] = np.asarray(enc.dictionary.to_pylist(), dtype=object)
        self._texts, self._first = texts, np.asarray(first_docs, dtype=np.int64)
        self._index: dict[str, int] | None = None

    # ------------------------------------------------------------------ lookups

    def index_of(self, doc_id: str) -> int | None:
        if self._index is None:  # built on first use: most processes never look a doc id up
            self._index = {d: i for i, d in enumerate(self.doc_ids.to_pylist())}
        return self._index.get(doc_id)

    def indexes_of(self, doc_ids) -> np.ndarray:
        """Boolean mask of documents whose id is in `doc_ids`."""
        if not len(doc_ids) or not self.n:
            return np.zeros(self.n, dtype=bool)
        return pc.is_in(self.doc_ids, value_set=pa.array(list(doc_ids), pa.string())).to_numpy(zero_copy_only=False)

    def doc_id(self, d: int) -> str:
        return self.doc_ids[int(d)].as_py()

    def ids_of(self, mask: np.ndarray) -> list[str]:
        return self.doc_ids.filter(pa.array(mask)).to_pylist()

    def value(self, column: str, d: int) -> str | None:
        """One document's source, license, tier or owner ('' if empty; None for no owner)."""
        v = self.values[column][self.codes[column][int(d)]]
        return (v or None) if column == "owner" else v

    def column(self, column: str) -> np.ndarray:
        """One coded column, decoded (object array; for tests and small stores)."""
        return self.values[column][self.codes[column]]

    def where(self, column: str, patterns, glob: bool = True) -> np.ndarray:
        """Boolean mask of documents whose `column` matches one of `patterns` (case-insensitive
        globs), or equals one of them (`glob=False`). Matched once per distinct value."""
        vals = self.values[column]
        if glob:
            pats = [p.lower() for p in patterns]
            hit = np.array([any(fnmatch.fnmatchcase(str(v).lower(), p) for p in pats) for v in vals], dtype=bool)
        else:
            want = set(patterns)
            hit = np.array([v in want for v in vals], dtype=bool)
        return hit[self.codes[column]] if len(vals) else np.zeros(self.n, dtype=bool)

    # ------------------------------------------------------------------ text, on demand

    def _locate(self, d: int) -> tuple[ShardText, int]:
        s = int(np.searchsorted(self._first, d, side="right") - 1)
        text = self._texts[s]
        if text is None:
            raise StoreError("this store was opened without its documents' text")
        return text, int(d - self._first[s])

    def text(self, d: int) -> str:
        text, local = self._locate(d)
        return text.text_of(local)

    def text_slice(self, d: int, start: int, end: int) -> str:
        """Characters [start, end) of document `d` (`ShardText.slice_of`)."""
        text, local = self._locate(d)
        return text.slice_of(local, start, end)

    def sentence_starts(self, d: int) -> np.ndarray:
        text, local = self._locate(d)
        return text.sentence_starts(local)

    def find_span(self, span: str) -> np.ndarray:
        """Boolean mask of documents whose text contains `span`: a byte search over each
        shard's memory-mapped text (no document is decoded)."""
        needle = span.encode("utf-8")
        hit = np.zeros(self.n, dtype=bool)
        for first, text in zip(self._first, self._texts, strict=True):
            if text is None or not needle:
                continue
            pos, i = [], text.text.find(needle)
            while i >= 0:
                pos.append(i)
                i = text.text.find(needle, i + 1)
            if pos:
                at = np.asarray(pos, dtype=np.int64)
                local = np.searchsorted(text.text_offsets, at, side="right") - 1
                inside = at + len(needle) <= np.asarray(text.text_offsets)[local + 1]  # not across documents
                hit[first + local[inside]] = True
        return hit


def read_shard_docs(folder: Path, documents: int, with_text: bool = True) -> tuple[pa.Table, ShardText | None]:
    try:
        table = pq.read_table(folder / "docs.parquet")
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise StoreError(f"{folder / 'docs.parquet'}: unreadable ({e})") from e
    if table.num_rows != documents:
        raise StoreError(f"{folder / 'docs.parquet'}: {table.num_rows} documents, manifest says {documents}")
    return table, (ShardText(folder, documents) if with_text else None)
