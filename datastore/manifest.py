"""`manifest.json` of a store, and the model fingerprint that ties a store to its LM.

The fingerprint hashes what decides the keys and values: the model config, the tokenizer
files and each weight file's safetensors header plus its first and last MiB (cheap for a
multi-GB checkpoint, yet any retrained or different model changes it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from silo.datastore.errors import FingerprintMismatch, StoreError  # noqa: F401 - re-exported

FORMAT_VERSION = 2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder: so that the renames and creations in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file_ends(h, path: Path, mib: int = 1) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(mib << 20))
        if size > 2 * (mib << 20):
            f.seek(-(mib << 20), os.SEEK_END)
            h.update(f.read())


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise StoreError(f"{d}: not a model folder (no config.json)")
    h = hashlib.sha256()
    config = json.loads((d / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        if (d / name).is_file() and name != "tokenizer_config.json":
            h.update(name.encode())
            h.update((d / name).read_bytes())
    for weights in sorted(d.glob("*.safetensors")):
        _hash_file_ends(h, weights)
    return h.hexdigest()[:32]


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (d / name).is_file():
            h.update(name.encode())
            h.update((d / name).read_bytes())
    return h.hexdigest()[:32]


@dataclass
class ShardInfo:
    """One shard: a contiguous range of documents and of their entries (global ids)."""

    name: str  # folder under shards/
    first_entry: int  # global id of its first entry; entries are [first_entry, first_entry + entries)
    entries: int
    first_doc: int  # global index of its first document; documents are [first_doc, first_doc + documents)
    documents: int
    index_entries: int = -1  # vectors in the index file; -1 = all `entries` (fewer after compaction)


@dataclass
class Manifest:
    """What a store is and which files make it: the one file switched atomically."""

    kind: str  # "token" | "passage" | "infgram"
    model: str  # path the store was built from (informational)
    model_fingerprint: str
    tokenizer_fingerprint: str
    dim: int  # key dimension (0 without vectors: BM25-only passage stores, ∞-gram stores)
    metric: str  # "l2" | "ip" | "bm25" | "infgram"
    key_type: str | None
    shards: list[ShardInfo]
    corpus: str
    tiers: list[str]
    split: str
    documents: int
    entries: int
    index: str = "Flat"  # FAISS factory of `trained.faiss` (one trained index for every shard), "bm25", "infgram"
    value_dtype: str | None = None  # entry values (next token): "uint16" or "uint32"
    keep_keys: bool = False  # fp16 keys beside each shard (exact re-ranking)
    passage_tokens: int | None = None
    retrievers: list[str] = field(default_factory=list)  # passage stores: "bm25", "dense"
    defaults: dict = field(default_factory=dict)  # tuned search/inference defaults (silo eval --sweep)
    build: dict = field(default_factory=dict)  # settings and timings of the build
    compactions: list[dict] = field(default_factory=list)  # what each compaction removed
    ingests: list[dict] = field(default_factory=list)  # what each live ingest added
    lists: str = "ram"  # IVF inverted lists served from "ram" or "ssd" (memory-mapped); switchable at open
    ledger: str | None = None  # the removal ledger this store honours (silo.datastore.ledger); None: its own log only
    format_version: int = FORMAT_VERSION

    def save(self, store: str | os.PathLike) -> None:
        path = Path(store) / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself must survive a crash

    @classmethod
    def load(cls, store: str | os.PathLike) -> Manifest:
        path = Path(store) / "manifest.json"
        if not path.is_file():
            raise StoreError(f"{store} is not a SILO datastore (no manifest.json)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise StoreError(f"{store}: store format {raw.get('format_version')!r}; this version of SILO reads "
                                 f"format {FORMAT_VERSION} (memory-mapped entries, per-shard documents): rebuild "
                                 "the store with `silo datastore build`")
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise StoreError(f"{path} is corrupt: {e}") from e
