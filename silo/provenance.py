"""The training record: what a model SILO trained saw, kept with its weights, checkable by anyone.

The weights' half of the promise ("the parametric model never saw restricted text") rests
on what went into training. `silo lm train` writes, beside the weights:

    MODEL/provenance/record.json      format; tiers; the training set's fingerprint; documents
                                      and tokens per tier, license and source; the
                                      membership filter's size, hash count, false-positive rate
    MODEL/provenance/documents.parquet  every training document: doc_id, tier, license, source,
                                      owner, tokens, sha256 of its normalised text
    MODEL/provenance/shingles.bloom   a Bloom filter over every 13-word shingle of every
                                      training document (raw bits, little-endian bytes)

- **Exact by document.** `documents.parquet` lists every document whose tokens went into
  training (the train split of the trained tiers, up to `--max-tokens`); validation
  documents only select the checkpoint and are listed apart (`validation_documents`).
- **Exact by text, up to a stated false-positive rate.** A text is normalised as the removal
  ledger does (NFKC, casefold, words) and cut into 13-word shingles (MassiveDS's
  decontamination n-gram; `silo.datastore.ledger.shingle_hashes`). Every shingle of every
  training document is in the filter, so a shingle of training text is always found (no
  false negatives); a shingle never trained on is found with probability `fpr` (default
  1e-4, ~19 bits = 2.4 bytes per shingle, about one per word). A 13-word run of text found
  by chance needs every one of its shingles to collide: a text of 20 words (8 shingles)
  at 1e-4 is reported as trained-on by chance with probability 1e-32.
- **The training set's fingerprint** is SHA-256 over (doc_id, sha256 of the raw text) of the
  training documents in training order: two models with the same fingerprint saw the same
  documents.

A model without a record (an outside checkpoint, or one trained before records existed)
has none: `TrainingRecord.open` returns None and every answer says so, never "no".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from silo.datastore.ledger import SHINGLE_WORDS, normalize, shingle_hashes, words_sha256
from silo.errors import SiloError

FORMAT_VERSION = 1
RECORD_DIR = "provenance"
DEFAULT_FPR = 1e-4
ATTRIBUTION_TIER = "by"  # licenses whose users must credit the author (CC-BY-style)
MAX_AUDIT_WORDS = 1_000_000  # a text audited at once, at most (about 8 MB of hashes)

DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("tier", pa.string()), ("license", pa.string()),
                        ("source", pa.string()), ("owner", pa.string()), ("tokens", pa.int64()),
                        ("sha256", pa.string())])


class ProvenanceError(SiloError):
    """A training record that cannot be written or read; the message says which file."""


def text_sha256(text: str) -> str:
    """SHA-256 of the normalised text (the removal ledger's normal form)."""
    return words_sha256(normalize(text))


# ---------------------------------------------------------------------------- the Bloom filter


class BloomFilter:
    """A Bloom filter over 64-bit hashes (already uniformly mixed: the shingle hashes are
    splitmix64 outputs). Probe i of hash h is (h1 + i·h2) mod m, with h1, h2 its 32-bit halves
    (Kirsch–Mitzenmacher double hashing)."""

    def __init__(self, bits: np.ndarray, m: int, k: int):
        assert bits.dtype == np.uint8 and bits.ndim == 1 and len(bits) == (m + 7) // 8, (bits.dtype, bits.shape, m)
        assert k >= 1
        self.bits, self.m, self.k = bits, int(m), int(k)

    @classmethod
    def sized(cls, n: int, fpr: float) -> BloomFilter:
        """The optimal filter for `n` items at false-positive rate `fpr`."""
        if not 0 < fpr < 1:
            raise ProvenanceError(f"a false-positive rate must be in (0, 1), not {fpr}")
        n = max(int(n), 1)
        m = max(int(math.ceil(-n * math.log(fpr) / math.log(2) ** 2)), 64)
        k = max(int(round(m / n * math.log(2))), 1)
        return cls(np.zeros((m + 7) // 8, np.uint8), m, k)

    def _probes(self, hashes: np.ndarray) -> np.ndarray:
        assert hashes.dtype == np.uint64 and hashes.ndim == 1, (hashes.dtype, hashes.shape)
        h1 = (hashes & np.uint64(0xFFFFFFFF)).astype(np.uint64)
        h2 = (hashes >> np.uint64(32)) | np.uint64(1)
        i = np.arange(self.k, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return (h1[:, None] + i[None, :] * h2[:, None]) % np.uint64(self.m)  # (n, k)

    def add(self, hashes: np.ndarray) -> None:
        for start in range(0, len(hashes), 1 << 16):
            pos = self._probes(hashes[start:start + (1 << 16)]).ravel()
            np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64),
                             (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash: possibly added (True) or certainly not (False)."""
        if len(hashes) == 0:
            return np.zeros(0, bool)
        pos = self._probes(hashes)
        hit = (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1)

    def fill(self) -> float:
        """The fraction of bits set (the false-positive rate is about fill ** k)."""
        return float(np.unpackbits(self.bits)[: self.m].mean())


# ---------------------------------------------------------------------------- writing a record


class RecordWriter:
    """Collects the training documents while they are tokenized; `close()` writes the record.

    Shingle hashes go to a temporary file (8 bytes a word) so the filter is sized from the
    exact count, whatever the corpus size; the record is published by one rename."""

    def __init__(self, model_dir: str | os.PathLike, tiers: tuple[str, ...], corpus: str | os.PathLike,
                 fpr: float = DEFAULT_FPR):
        if not 0 < fpr < 1:
            raise ProvenanceError(f"a false-positive rate must be in (0, 1), not {fpr}")
        self.out = Path(model_dir) / RECORD_DIR
        self.tmp = Path(model_dir) / (RECORD_DIR + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.tiers, self.corpus, self.fpr = tuple(tiers), str(Path(corpus).resolve()), fpr
        self._hashes = open(self.tmp / "shingles.u64", "wb")  # noqa: SIM115 - closed in close()
        self._rows: dict[str, list] = {name: [] for name in DOC_SCHEMA.names}
        self._fingerprint = hashlib.sha256()
        self._shingles = 0
        self.validation_documents = 0  # read to pick the checkpoint, never trained on
        self.leakage: dict | None = None  # the leakage scan's report (silo.leakage), written beside the record

    def add(self, doc: dict, tokens: int) -> None:
        """A training document (`iter_documents` fields) and its token count."""
        text = doc["text"]
        words = normalize(text)
        h = shingle_hashes(words)
        self._hashes.write(h.tobytes())
        self._shingles += len(h)
        raw = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self._fingerprint.update(f"{doc['doc_id']}\t{raw}\n".encode())
        for name, value in (("doc_id", doc["doc_id"]), ("tier", doc["tier"]), ("license", doc["license"]),
                            ("source", doc["source"]), ("owner", doc.get("owner") or ""), ("tokens", int(tokens)),
                            ("sha256", words_sha256(words))):
            self._rows[name].append(value)

    def close(self) -> dict:
        self._hashes.close()
        bloom = BloomFilter.sized(self._shingles, self.fpr)
        hashes = np.memmap(self.tmp / "shingles.u64", dtype=np.uint64, mode="r") if self._shingles else \
            np.zeros(0, np.uint64)
        for start in range(0, len(hashes), 1 << 20):
            bloom.add(np.asarray(hashes[start:start + (1 << 20)]))
        del hashes
        (self.tmp / "shingles.u64").unlink()
        (self.tmp / "shingles.bloom").write_bytes(bloom.bits.tobytes())
        table = pa.Table.from_pydict(self._rows, schema=DOC_SCHEMA)
        pq.write_table(table, self.tmp / "documents.parquet")
        tokens = int(sum(self._rows["tokens"]))
        record = {
            "format_version": FORMAT_VERSION,
            "tiers": list(self.tiers),
            "corpus": self.corpus,
            "training_set_sha256": self._fingerprint.hexdigest(),
            "documents": len(table),
            "tokens": tokens,
            "by_tier": _totals(self._rows, "tier"),
            "by_license": _totals(self._rows, "license"),
            "by_source": _totals(self._rows, "source"),
            "validation_documents": self.validation_documents,
            "membership": {"shingle_words": SHINGLE_WORDS, "shingles": self._shingles, "bits": bloom.m,
                           "hashes": bloom.k, "fpr": self.fpr, "fill": round(bloom.fill(), 4),
                           "bytes": len(bloom.bits), "bytes_per_token": round(len(bloom.bits) / max(tokens, 1), 3)},
        }
        if self.leakage is not None:
            (self.tmp / "leakage.json").write_text(json.dumps(self.leakage, indent=2))
            record["leakage"] = {k: v for k, v in self.leakage.items() if k != "documents"}
        (self.tmp / "record.json").write_text(json.dumps(record, indent=2))
        shutil.rmtree(self.out, ignore_errors=True)
        os.replace(self.tmp, self.out)
        return record

    def abort(self) -> None:
        self._hashes.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _totals(rows: dict[str, list], key: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for value, tokens in zip(rows[key], rows["tokens"], strict=True):
        entry = out.setdefault(value, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += int(tokens)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["tokens"]))


# ---------------------------------------------------------------------------- reading and auditing


@dataclass
class TextAudit:
    """What a training record says about one text."""

    words: int
    shingles: int  # 13-word shingles of the text
    found: int  # of them in the training record's filter
    longest_run_words: int  # the longest run of the text whose every shingle was found, in words
    same_documents: list[str] = field(default_factory=list)  # training documents with the same normalised text
    fpr: float = DEFAULT_FPR

    @property
    def verdict(self) -> str:
        """`trained` (the whole text, or a training document), `partly` (a run of ≥ 2
        shingles), `not` (no shingle, or only isolated ones a false positive explains), or
        `too short` (under 13 words and no training document equal to it)."""
        if self.same_documents or (self.shingles and self.found == self.shingles):
            return "trained"
        if self.shingles == 0:
            return "too short"
        return "partly" if self.longest_run_words >= SHINGLE_WORDS + 1 else "not"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "words": self.words, "shingles": self.shingles, "found": self.found,
                "longest_run_words": self.longest_run_words, "same_documents": self.same_documents, "fpr": self.fpr}


class TrainingRecord:
    """A model's training record, opened read-only (`TrainingRecord.open(model_dir)`)."""

    def __init__(self, path: Path, record: dict, bloom: BloomFilter, documents: pa.Table):
        self.path, self.record, self.bloom, self.documents = path, record, bloom, documents
        self._ids = set(documents.column("doc_id").to_pylist())
        self._by_sha: dict[str, list[str]] = {}
        for doc_id, sha in zip(documents.column("doc_id").to_pylist(), documents.column("sha256").to_pylist(),
                               strict=True):
            self._by_sha.setdefault(sha, []).append(doc_id)

    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> TrainingRecord | None:
        """The record of a model folder; None when it has none (an outside checkpoint)."""
        path = Path(model_dir) / RECORD_DIR
        if not (path / "record.json").is_file():
            return None
        try:
            record = json.loads((path / "record.json").read_text())
            if record.get("format_version") != FORMAT_VERSION:
                raise ProvenanceError(f"{path}/record.json: format {record.get('format_version')!r}, "
                                      f"this version reads {FORMAT_VERSION}")
            mem = record["membership"]
            bits = np.fromfile(path / "shingles.bloom", dtype=np.uint8)
            if len(bits) != (mem["bits"] + 7) // 8:
                raise ProvenanceError(f"{path}/shingles.bloom: {len(bits)} bytes, the record says "
                                      f"{(mem['bits'] + 7) // 8} (a torn or foreign file)")
            documents = pq.read_table(path / "documents.parquet")
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise ProvenanceError(f"{path}: unreadable training record ({e})") from e
        if len(documents) != record["documents"]:
            raise ProvenanceError(f"{path}/documents.parquet: {len(documents)} documents, the record says "
                                  f"{record['documents']}")
        return cls(path, record, BloomFilter(bits, mem["bits"], mem["hashes"]), documents)

    def has_document(self, doc_id: str) -> bool:
        """Exact: were this document's tokens trained on?"""
        return doc_id in self._ids

    def documents_with_text(self, sha256: str) -> list[str]:
        """Training documents whose normalised text has this SHA-256 (`text_sha256`)."""
        return list(self._by_sha.get(sha256, []))

    def audit_text(self, text: str) -> TextAudit:
        words = normalize(text)
        if len(words) > MAX_AUDIT_WORDS:
            raise ProvenanceError(f"a text of {len(words):,} words is over the audit's limit of {MAX_AUDIT_WORDS:,}")
        hashes = shingle_hashes(words)
        hit = self.bloom.contains(hashes)
        run = longest = 0
        for h in hit:
            run = run + 1 if h else 0
            longest = max(longest, run)
        sha = text_sha256(text)
        return TextAudit(words=len(words), shingles=len(hashes), found=int(hit.sum()),
                         longest_run_words=longest + SHINGLE_WORDS - 1 if longest else 0,
                         same_documents=self.documents_with_text(sha) if words else [],
                         fpr=float(self.record["membership"]["fpr"]))

    def attributions(self) -> list[dict]:
        """The training documents under attribution licenses, grouped by (source, license), as
        the model's distributor must credit them."""
        docs = self.documents.filter(pc.equal(self.documents.column("tier"), ATTRIBUTION_TIER))
        groups: dict[tuple[str, str], list[str]] = {}
        for doc_id, source, lic in zip(docs.column("doc_id").to_pylist(), docs.column("source").to_pylist(),
                                       docs.column("license").to_pylist(), strict=True):
            groups.setdefault((source, lic), []).append(doc_id)
        return [{"source": s, "license": lic, "documents": len(ids), "doc_ids": sorted(ids)}
                for (s, lic), ids in sorted(groups.items())]


# ---------------------------------------------------------------------------- the model card


def model_card(model_dir: str | os.PathLike) -> str:
    """A model card in markdown: what the model is, what it was trained on (tiers, licenses,
    sources), the attributions its training data obliges, and how to check a text."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "silo_model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    record = TrainingRecord.open(model_dir)
    name = model_dir.resolve().name
    lines = [f"# {name}", ""]
    if meta is None or record is None:
        lines += ["No training record: this checkpoint was not trained by SILO (or before training records "
                  "existed), so what its weights saw cannot be checked here. Treat its training data as unknown.", ""]
        if meta is None:
            return "\n".join(lines)
    if meta is not None:
        lines += [f"- architecture: Llama, config `{meta.get('config')}`, {meta.get('parameters', 0):,} parameters",
                  f"- trained on tiers: {', '.join(meta.get('tiers', []))}"
                  + ("  **(includes restricted text: not servable as SILO's parametric model)**"
                     if meta.get("trained_on_restricted") else ""),
                  f"- steps {meta.get('steps')}, tokens seen {meta.get('tokens_seen', 0):,}, validation perplexity "
                  f"{meta.get('val_perplexity')}", ""]
    if record is None:
        return "\n".join(lines)
    r = record.record
    mem = r["membership"]
    lines += ["## Training data", "",
              f"{r['documents']:,} documents, {r['tokens']:,} tokens, from `{r['corpus']}`; training-set "
              f"fingerprint `{r['training_set_sha256']}`.", ""]
    for title, key in (("tier", "by_tier"), ("license", "by_license"), ("source", "by_source")):
        lines += [f"| {title} | documents | tokens |", "|---|---|---|"]
        lines += [f"| {k} | {v['documents']:,} | {v['tokens']:,} |" for k, v in r[key].items()]
        lines.append("")
    credits = record.attributions()
    lines += ["## Attributions", ""]
    if credits:
        lines += ["This model was trained on the following works under attribution licenses:", ""]
        for c in credits:
            shown = ", ".join(c["doc_ids"][:20]) + (f", … ({c['documents'] - 20} more)" if c["documents"] > 20 else "")
            lines.append(f"- {c['source']}, {c['license']}: {c['documents']} document(s): {shown}")
    else:
        lines.append("No training document is under an attribution license.")
    lines += ["", "## Membership", "",
              f"Every {mem['shingle_words']}-word shingle of the training documents is in a Bloom filter "
              f"({mem['bytes']:,} bytes, {mem['bytes_per_token']} bytes per token, false-positive rate "
              f"{mem['fpr']:g} per shingle): `silo audit --model {name} --text TEXT` says whether a text was "
              f"trained on, with no false negatives.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- `silo audit`


NO_RECORD = ("no training record: this checkpoint was not trained by SILO (or before training records existed), "
             "so whether its weights saw a text cannot be answered from a record")


def audit(model_dir: str | os.PathLike, texts: list[tuple[str, str]] = (), doc_ids: list[str] = ()) -> dict:
    """What a model's training record says about texts ((name, text) pairs) and document ids.

    {"model", "record": bool, "message" (without a record), "training_set_sha256",
     "texts": [{"name", **TextAudit.to_json()}], "documents": [{"doc_id", "trained"}]}"""
    return audit_record(TrainingRecord.open(model_dir), Path(model_dir).resolve().name, texts, doc_ids)


def audit_record(record: TrainingRecord | None, model: str, texts: list[tuple[str, str]] = (),
                 doc_ids: list[str] = ()) -> dict:
    """`audit` on a record already open (the server's)."""
    out: dict = {"model": model, "record": record is not None}
    if record is None:
        return out | {"message": NO_RECORD, "texts": [{"name": name} for name, _ in texts],
                      "documents": [{"doc_id": d, "trained": None} for d in doc_ids]}
    out["training_set_sha256"] = record.record["training_set_sha256"]
    out["texts"] = [{"name": name, **record.audit_text(text).to_json()} for name, text in texts]
    out["documents"] = [{"doc_id": d, "trained": record.has_document(d)} for d in doc_ids]
    return out


def audit_statement(rep: dict) -> str:
    """One sentence for an `audit_record` answer about one text and/or document ids."""
    if not rep["record"]:
        return f"{rep['model']}: {NO_RECORD}"
    parts = []
    for t in rep["texts"]:
        parts.append({"trained": "the text is in the training data",
                      "partly": f"part of the text is in the training data (a run of {t['longest_run_words']} words)",
                      "not": "the text is not in the training data",
                      "too short": "the text is too short to check by its words (under 13 words)"}[t["verdict"]])
    trained = [d["doc_id"] for d in rep["documents"] if d["trained"]]
    if rep["documents"]:
        parts.append(f"trained on {', '.join(trained[:5])}{', …' if len(trained) > 5 else ''}" if trained
                     else "none of the documents was trained on")
    return f"{rep['model']}: " + "; ".join(parts) + " (from its training record)"


# ---------------------------------------------------------------------------- the weights' side of a removal


CONTAINED = 0.5  # a removed text is "in the training data" when half its sampled shingles are


@dataclass
class WeightsCheck:
    """Was a removal's text in a model's training data? (OptOutStatus's weights section)"""

    model: str
    has_record: bool
    trained_doc_ids: list[str]  # removed documents trained on, by id (exact)
    trained_text_doc_ids: list[str]  # removed documents whose text the training data holds
    fpr: float
    # without a record, the weights asked instead (`membership_check`): percentile,
    # reference_documents, reference_proven, scored_doc_ids; or `why` nothing was scored
    membership: dict | None = None

    @property
    def statement(self) -> str:
        if not self.has_record:
            base = (f"{self.model} has no training record (an outside checkpoint): whether its weights saw "
                    f"these documents cannot be checked exactly")
            m = self.membership
            if m is None:
                return base
            if m.get("percentile") is None:
                return f"{base}; {m['why']}"
            among = ("held-out non-members" if m["reference_proven"]
                     else "reference documents the operator vouches were not trained on")
            return (f"{base}; membership percentile {m['percentile']:.0f} (Min-K%++ of the removed text of "
                    f"{', '.join(m['scored_doc_ids'][:3])}{', …' if len(m['scored_doc_ids']) > 3 else ''} among "
                    f"{m['reference_documents']} {among}: about 50 is what unseen text scores, near 100 suggests "
                    f"the weights saw it; a signal, not a proof)")
        hit = sorted(set(self.trained_doc_ids) | set(self.trained_text_doc_ids))
        if not hit:
            return (f"not in the training record of the served model {self.model} (exact by document id; by text, "
                    f"every 13-word shingle checked, false-positive rate {self.fpr:g} per shingle)")
        return (f"{len(hit)} removed document(s) are in the training data of {self.model} ({', '.join(hit[:5])}"
                f"{', …' if len(hit) > 5 else ''}): no longer served from the datastore, but the weights were "
                f"trained on them")


def check_removal(record: TrainingRecord | None, model: str, removal: dict,
                  membership: dict | None = None) -> WeightsCheck:
    """The weights' side of one removal (an opt-out log record: `doc_ids`, and the
    `fingerprints` of the removed texts, so the check holds after compaction). Without a
    record, `membership` (`silo.membership.membership_check`) is what the weights say."""
    if record is None:
        return WeightsCheck(model, False, [], [], 0.0, membership)
    by_id = [d for d in removal.get("doc_ids", ()) if record.has_document(d)]
    by_text = []
    for fp in removal.get("fingerprints") or ():
        shingles = np.array([int(x, 16) for x in fp.get("shingles", ())], np.uint64)
        same = bool(record.documents_with_text(fp.get("sha256", "")))
        if same or (len(shingles) and record.bloom.contains(shingles).mean() >= CONTAINED):
            by_text.append(fp["doc_id"])
    return WeightsCheck(model, True, by_id, by_text, float(record.record["membership"]["fpr"]))
