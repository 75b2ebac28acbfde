"""The corpus: license-tiered documents in parquet shards, streamed in and out.

On disk a corpus is one folder:

    CORPUS/corpus.json        format version, shard list, counts per tier, skipped input
    CORPUS/part-NNNNN.parquet doc_id, text, source, license, tier, license_classifiers,
                              owner, sentence_starts
    CORPUS/removals.log       the removal ledger (silo.datastore.ledger), once a store is
                              built; a corpus written again in place keeps it
    CORPUS/traps.json         the copyright traps planted in it, if any (silo.traps)

`tier` is computed here from `license` (never taken from the input), and
`sentence_starts` are the character offsets from `silo.sentences.segment`, so attribution
can point at a sentence later. A corpus is written into a temporary folder and renamed
into place only when complete: a failed import leaves no half corpus behind.

The train/validation/test split is a pure function of `doc_id` (`split_of`), so every
tool agrees on it without storing it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from silo.datastore.ledger import LEDGER_NAME
from silo.datastore.manifest import fsync_path
from silo.errors import SiloError
from silo.licenses import TIERS, classify_license, stricter
from silo.progress import bar as progress_bar
from silo.sentences import segment

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.large_string()),
        ("source", pa.string()),
        ("license", pa.string()),
        ("tier", pa.string()),
        ("license_classifiers", pa.list_(pa.string())),
        ("owner", pa.string()),
        ("sentence_starts", pa.list_(pa.int32())),
    ]
)


class CorpusError(SiloError, ValueError):
    """Bad corpus input or a corpus folder that cannot be read; the message says which."""


def split_of(doc_id: str) -> str:
    """Deterministic split of a document: 90% train, 5% validation, 5% test, by id hash."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if h < SPLIT_FRACTIONS["train"]:
        return "train"
    return "validation" if h < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"] else "test"


def content_id(text: str) -> str:
    """Stable id for a document that came without one."""
    return "sha1:" + hashlib.sha1(text.encode()).hexdigest()


def normalize_record(record: dict) -> dict | None:
    """One input document as the corpus stores it: its tier computed from its license (never
    taken from the input), its sentences segmented, a content id if it came without one;
    None for an empty text. Live ingest prepares documents the same way."""
    text = record.get("text")
    if not isinstance(text, str):
        raise CorpusError(f"document {record.get('doc_id')!r}: text must be a string")
    if not text.strip():
        return None
    license_ = str(record.get("license") or "")
    classifiers = [str(c) for c in record.get("license_classifiers") or ()]
    return {"doc_id": str(record.get("doc_id") or content_id(text)), "text": text,
            "source": str(record.get("source") or "unknown"), "license": license_,
            "tier": classify_license(license_, classifiers), "license_classifiers": classifiers,
            "owner": record.get("owner") or None, "sentence_starts": segment(text)}


@dataclass
class CorpusStats:
    documents: Counter = field(default_factory=Counter)  # tier -> docs
    bytes: Counter = field(default_factory=Counter)  # tier -> UTF-8 bytes
    skipped_empty: int = 0
    skipped_invalid: int = 0

    def to_json(self) -> dict:
        return {
            "documents": dict(self.documents),
            "bytes": dict(self.bytes),
            "skipped_empty": self.skipped_empty,
            "skipped_invalid": self.skipped_invalid,
        }


class CorpusWriter:
    """Streams documents into parquet shards; `close()` publishes the folder atomically.

    Use as a context manager. Documents are buffered up to `shard_bytes` of text, so
    memory stays bounded whatever the corpus size; only the set of doc ids is kept, to
    catch duplicates (an error naming them, raised when the writer closes).
    """

    def __init__(self, out: str | os.PathLike, shard_bytes: int = 64 << 20, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CorpusError(f"{self.out} already exists (pass overwrite=True / --overwrite)")
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shard_bytes = shard_bytes
        self.stats = CorpusStats()
        self._ids: set[str] = set()
        self._duplicates: list[str] = []
        self._rows: list[dict] = []
        self._buffered = 0
        self._shards: list[str] = []

    def add(self, record: dict) -> bool:
        """Add one document (`text`, `source`, `license`; optional `doc_id`, `owner`,
        `license_classifiers`). Returns False if it was skipped as empty."""
        row = normalize_record(record)
        if row is None:
            self.stats.skipped_empty += 1
            return False
        if row["doc_id"] in self._ids:
            self._duplicates.append(row["doc_id"])
            return False
        self._ids.add(row["doc_id"])
        tier, n_bytes = row["tier"], len(row["text"].encode("utf-8", "surrogatepass"))
        self._rows.append(row)
        self.stats.documents[tier] += 1
        self.stats.bytes[tier] += n_bytes
        self._buffered += n_bytes
        if self._buffered >= self.shard_bytes:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"part-{len(self._shards):05d}.parquet"
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        pq.write_table(table, self.tmp / name, compression="zstd")
        self._shards.append(name)
        self._rows, self._buffered = [], 0

    def close(self) -> CorpusStats:
        if self._duplicates:
            self.abort()
            shown = ", ".join(repr(d) for d in self._duplicates[:20])
            more = f" (and {len(self._duplicates) - 20} more)" if len(self._duplicates) > 20 else ""
            raise CorpusError(f"duplicate doc ids: {shown}{more}")
        self._flush()
        meta = {"format_version": FORMAT_VERSION, "shards": self._shards, **self.stats.to_json()}
        (self.tmp / "corpus.json").write_text(json.dumps(meta, indent=2))
        if self.out.exists():
            # the removal ledger is the corpus's record of opt-outs, not part of its text: a
            # corpus written again keeps it (the same file, so appends in flight land in it)
            ledger = self.out / LEDGER_NAME
            if ledger.is_file():
                os.replace(ledger, self.tmp / LEDGER_NAME)
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        fsync_path(self.out.parent)
        return self.stats

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_corpus(records: Iterable[dict], out: str | os.PathLike, **kwargs) -> CorpusStats:
    """Write an iterable of document records as a corpus folder (see `CorpusWriter.add`)."""
    with CorpusWriter(out, **kwargs) as writer:
        for record in records:
            writer.add(record)
    return writer.stats


# ---------------------------------------------------------------------------- reading


def open_corpus(path: str | os.PathLike) -> dict:
    """The corpus manifest (`corpus.json`), checked; raises CorpusError if not a corpus."""
    path = Path(path)
    meta_path = path / "corpus.json"
    if not meta_path.is_file():
        raise CorpusError(f"{path} is not a SILO corpus (no corpus.json); create one with `silo corpus import` or `silo corpus harvest`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{meta_path} is corrupt: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{path}: unsupported corpus format {meta.get('format_version')!r}")
    for shard in meta["shards"]:
        if not (path / shard).is_file():
            raise CorpusError(f"{path}: shard {shard} is missing")
    return meta


def expected_documents(corpus: str | os.PathLike, tiers: Iterable[str] | None = None,
                       split: str | None = None) -> int:
    """About how many documents `iter_documents` yields for these tiers and split, from the
    manifest's counts and the split fractions (splits are a hash of the id): the total of a
    progress bar, not a promise."""
    counts = open_corpus(corpus).get("documents", {})
    n = sum(v for t, v in counts.items() if tiers is None or t in set(tiers))
    return max(1, round(n * (SPLIT_FRACTIONS.get(split, 1.0) if split else 1.0)))


def iter_documents(
    corpus: str | os.PathLike,
    *,
    tiers: Iterable[str] | None = None,
    split: str | None = None,
    columns: Iterable[str] | None = None,
    batch_size: int = 256,
) -> Iterator[dict]:
    """Stream documents as dicts, optionally only some tiers and one split."""
    if split is not None and split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    meta = open_corpus(corpus)
    wanted = set(tiers) if tiers is not None else None
    cols = list(columns) if columns is not None else None
    if cols is not None:
        cols = list(dict.fromkeys(["doc_id", "tier", *cols]))
    for shard in meta["shards"]:
        pf = pq.ParquetFile(Path(corpus) / shard)
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for row in batch.to_pylist():
                if wanted is not None and row["tier"] not in wanted:
                    continue
                if split is not None and split_of(row["doc_id"]) != split:
                    continue
                yield row


# ---------------------------------------------------------------------------- import


def _read_jsonl(path: Path, stats: CorpusStats, skip_invalid: bool) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_invalid:
                    stats.skipped_invalid += 1
                    continue
                raise CorpusError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    stats.skipped_invalid += 1
                    continue
                raise CorpusError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object")
            yield obj


def _read_parquet(path: Path, stats: CorpusStats, skip_invalid: bool) -> Iterator[dict]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable parquet file: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no 'text' column (has {', '.join(pf.schema_arrow.names)})")
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            for key, value in list(row.items()):
                if isinstance(value, bytes):  # binary columns: decode strictly, like JSONL
                    try:
                        row[key] = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        if skip_invalid:
                            stats.skipped_invalid += 1
                            break
                        raise CorpusError(f"{path}: row {row_no}: column {key!r} is not valid UTF-8") from e
            else:
                yield row


def read_records(paths: Iterable[str | os.PathLike], stats: CorpusStats, skip_invalid: bool = False) -> Iterator[dict]:
    """Documents from JSONL (optionally .gz) and parquet files, in order."""
    for p in map(Path, paths):
        if not p.is_file():
            raise CorpusError(f"{p}: no such file")
        name = p.name.lower()
        if name.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
            yield from _read_jsonl(p, stats, skip_invalid)
        elif name.endswith(".parquet"):
            yield from _read_parquet(p, stats, skip_invalid)
        else:
            raise CorpusError(f"{p}: unknown input format (expected .jsonl, .jsonl.gz or .parquet)")


def import_files(paths: Iterable[str | os.PathLike], out: str | os.PathLike, *, skip_invalid: bool = False,
                 overwrite: bool = False, progress: bool = False) -> CorpusStats:
    """`silo corpus import`: JSONL/parquet files -> corpus folder."""
    with CorpusWriter(out, overwrite=overwrite) as writer:
        records = read_records(paths, writer.stats, skip_invalid)
        for record in progress_bar(records, desc="import", unit="doc", progress=progress):
            writer.add(record)
    return writer.stats


# ---------------------------------------------------------------------------- stats

_WORD = re.compile(r"\w+|[^\w\s]")


def corpus_stats(corpus: str | os.PathLike, tokenizer=None) -> dict:
    """Documents, tokens and bytes per tier and per source, and per split.

    Tokens are the given tokenizer's, or else words and punctuation marks (`_WORD`)."""
    count = (lambda t: len(tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])) if tokenizer else (
        lambda t: len(_WORD.findall(t)))
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for doc in iter_documents(corpus, columns=["text", "source"]):
        for key in (("tier", doc["tier"]), ("source", doc["source"]), ("split", split_of(doc["doc_id"]))):
            c = rows[key]
            c["documents"] += 1
            c["tokens"] += count(doc["text"])
            c["bytes"] += len(doc["text"].encode("utf-8", "surrogatepass"))
    out: dict[str, dict] = {"tier": {}, "source": {}, "split": {}}
    for (kind, name), c in rows.items():
        out[kind][name] = dict(c)
    out["tier"] = {t: out["tier"][t] for t in TIERS if t in out["tier"]}
    total = Counter()
    for c in out["tier"].values():
        total.update(c)
    out["total"] = dict(total)
    return out


def tier_guard(doc: dict, allowed: Iterable[str], allow_restricted: bool = False) -> None:
    """Refuse a document outside the allowed tiers — the LM training loader's safety check.

    The tier is re-derived from the license and the stricter of stored and derived wins,
    so a corpus whose `tier` column was edited cannot smuggle restricted text into training.
    """
    tier = stricter(doc["tier"], classify_license(doc.get("license"), doc.get("license_classifiers") or ()))
    if tier == "restricted" and not allow_restricted:
        raise RestrictedTextError(
            f"document {doc['doc_id']!r} ({doc.get('license') or 'no license'}) is restricted: "
            "training reads only permissive tiers (an oracle run must ask for restricted text explicitly)")
    if tier not in set(allowed):
        raise RestrictedTextError(f"document {doc['doc_id']!r} is tier {tier!r}, outside {sorted(allowed)}")


class RestrictedTextError(SiloError):
    """Raised when training would read text outside its permitted tiers."""
