"""Retrieval-augmented training (`silo lm train --ric SHARE`): an LM that reads what is
retrieved for it.

A small LM trained only on running text never learns to look back at a prepended passage
and copy from it, so RIC-LM gains nothing with it. Here every batch keeps its plain rows
(the LM's own training, unchanged) and gains `share` x as many rows laid out exactly as
RIC-LM lays out a block at inference (`silo.ricl`): passages retrieved for the block,
framed as documents and worst first (`ric_prefix`), then the document's text up to the
block's end. The loss covers the document's text, never the passages (`loss_on="block"`:
only the block the passages were retrieved for). Taking the RIC rows out of the plain
batch instead cost the tiny LM 54% validation perplexity at 600 steps (the passages
displace the text it learns from); added, it costs none (measured: 125.8 against 129.2).

- **What is retrieved from.** The training text itself, after the leakage scan: passages
  of `passage_tokens` tokens cut from each training document's tokens as they went into
  `train.bin`, indexed with BM25 exactly as a passage store is (`bm25_tokens`, In-Context
  RALM's parameters). At inference the passages come from the restricted store; here
  they come from the trained (permissive) tiers only, and the tier guard checks every
  passage put in a context: a restricted one stops training, as a restricted document does.
- **What is never retrieved for a sequence.** Passages of its own document, and near-copies
  of its text: a passage that shares a run of `copy_tokens` tokens with the sequence
  (templated documents copy each other) — or the model learns to copy its own text instead
  of reading.
- **The query** is the text of the `query_tokens` tokens before the block, as at inference.
- **Determinism.** The layout of step s depends only on (seed, s), so a resumed run sees the
  batches an uninterrupted one would. Batches are built by a thread ahead of the training
  step (retrieval is the slow part), a few steps ahead.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import pyarrow.parquet as pq
import torch

from silo.corpus import RestrictedTextError
from silo.datastore.passages import BM25_PARAMS, bm25_tokens
from silo.errors import SiloError
from silo.progress import bar as progress_bar
from silo.ricl import ric_prefix

IGNORE = -100  # cross_entropy's ignore_index: no loss on the passages or on the context before the block


@dataclass(frozen=True)
class RICTrainParams:
    share: float = 0.25  # RIC rows added to each batch, as a share of its plain rows
    passages: int = 1
    passage_tokens: int = 128  # the passage store's passage length (`--passage-tokens`)
    max_passage_tokens: int = 256
    query_tokens: int = 32
    block: int = 64  # the block scored after the passages (RIC-LM's stride)
    copy_tokens: int = 32  # a passage sharing this many consecutive tokens with the sequence is a copy
    candidates: int = 16  # retrieved per sequence, before the exclusions
    loss_on: str = "text"  # "text": every document token after the passages; "block": the block only

    def check(self, seq_len: int) -> RICTrainParams:
        if not 0 < self.share <= 1:
            raise SiloError(f"--ric is the RIC rows added per plain row of a batch, in (0, 1]; got {self.share}")
        if self.loss_on not in ("text", "block"):
            raise SiloError(f"loss_on must be text or block, got {self.loss_on!r}")
        if min(self.passages, self.passage_tokens, self.query_tokens, self.block, self.copy_tokens) < 1:
            raise SiloError("RIC training's passages, passage tokens, query tokens, block and copy run must be "
                            "positive")
        if self.block + self.query_tokens >= seq_len:
            raise SiloError(f"the RIC block ({self.block}) and query ({self.query_tokens}) leave no room for "
                            f"passages in a sequence of {seq_len} tokens")
        return self


class TrainingPassages:
    """BM25 over passages of the training documents' tokens (`train.bin`, framed <s> … </s>
    as `encode_document` wrote them, in the training record's order)."""

    def __init__(self, model_dir: Path, data: np.ndarray, tok, tiers: tuple[str, ...], allow_restricted: bool,
                 p: RICTrainParams, progress: bool = False):
        docs = pq.read_table(model_dir / "provenance" / "documents.parquet",
                             columns=["doc_id", "tier", "tokens"]).to_pylist()
        lengths = np.array([d["tokens"] for d in docs], np.int64)
        if int(lengths.sum()) > len(data):
            raise SiloError(f"{model_dir}: the training record lists {int(lengths.sum()):,} tokens, train.bin holds "
                            f"{len(data):,}")
        self.data, self.tok, self.p = data, tok, p
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)])
        self.docs = docs
        self.tiers, self.allow_restricted = tiers, allow_restricted
        spans = []  # (doc, start, end) of each passage, in the stream
        for i, (a, b) in enumerate(zip(self.doc_starts[:-1], self.doc_starts[1:], strict=True)):
            a, b = int(a) + 1, int(b) - 1  # inside the document's <s> … </s>
            spans += [(i, s, min(s + p.passage_tokens, b)) for s in range(a, b, p.passage_tokens)]
        self.spans = np.array(spans, np.int64).reshape(-1, 3)
        texts = [tok.decode(data[s:e].tolist(), skip_special_tokens=True)
                 for _, s, e in progress_bar(self.spans, desc="RIC training: passages", unit="passage",
                                             progress=progress, total=len(self.spans))]
        self.bm25 = bm25s.BM25(**BM25_PARAMS)
        self.bm25.index(bm25_tokens(texts), show_progress=False)

    def doc_of(self, pos: int) -> int:
        """The training document that holds stream position `pos`."""
        return int(np.searchsorted(self.doc_starts, pos, side="right") - 1)

    def retrieve(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k best passages per query; -1 where none (a query with no
        indexed word, or fewer positive scores)."""
        vocab = self.bm25.vocab_dict
        toks = [[t for t in q if t in vocab] for q in bm25_tokens(queries)]
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.zeros((len(queries), k), np.float32)
        asked = [i for i, t in enumerate(toks) if t]
        if asked:
            kk = min(k, len(self.spans))
            found, sc = self.bm25.retrieve([toks[i] for i in asked], k=kk, show_progress=False, n_threads=1)
            for row, i in enumerate(asked):
                keep = sc[row] > 0
                ids[i, : keep.sum()], scores[i, : keep.sum()] = found[row][keep], sc[row][keep]
        return ids, scores

    def passage(self, pid: int) -> list[int]:
        """A passage's tokens, its document's tier checked against the trained tiers."""
        d, s, e = self.spans[pid]
        doc = self.docs[int(d)]
        # the record's tier was derived with the document's full license data when it was
        # tokenized (`tier_guard`); a passage is held to it again here
        if (doc["tier"] == "restricted" and not self.allow_restricted) or doc["tier"] not in self.tiers:
            raise RestrictedTextError(f"passage of document {doc['doc_id']!r} is tier {doc['tier']!r}: RIC training "
                                      f"reads only the trained tiers ({', '.join(self.tiers)})")
        return self.data[int(s) : int(e)][: self.p.max_passage_tokens].tolist()


def token_runs(seq, n: int) -> set[tuple]:
    """Every run of n consecutive tokens of `seq`."""
    seq = list(seq)
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}


def shares_run(passage: list[int], runs: set[tuple], n: int) -> bool:
    """Whether `passage` has one of `runs` (`token_runs` of a sequence, n tokens each)."""
    return any(tuple(passage[i : i + n]) in runs for i in range(len(passage) - n + 1))


class RICBatches:
    """Training batches with RIC-LM blocks added, built ahead of the step."""

    def __init__(self, stream, index: TrainingPassages, tok, seq_len: int, batch_size: int, seed: int,
                 p: RICTrainParams, start: int, steps: int, ahead: int = 4):
        self.stream, self.index, self.tok = stream, index, tok
        self.seq_len, self.batch_size, self.seed, self.p = seq_len, batch_size, seed, p
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self.eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.stats = {"sequences": 0, "with_passages": 0, "excluded_own": 0, "excluded_copies": 0}
        self.layouts: list[dict] = []  # the last built batch's RIC rows: row, own_doc, passages, end
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start, steps), name="ric-batches", daemon=True)
        self._thread.start()

    def _fill(self, start: int, steps: int) -> None:
        try:
            for step in range(start, steps):
                if self._stop.is_set():
                    return
                self._queue.put((step, self.build(step)))
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            self._queue.put((None, e))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        got, item = self._queue.get()
        if got is None:
            raise item
        assert got == step, (got, step)
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)

    def build(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`: the plain batch, untouched (the LM's own training), and
        `share` x batch size rows more, laid out with passages (a row whose block finds
        nothing to read is a plain window ending at the block)."""
        x, y = self.stream.batch(step, self.batch_size, self.seed)
        rng = np.random.default_rng([self.seed, step, 1])
        data, n, p = self.index.data, self.seq_len, self.p
        m = max(1, round(p.share * self.batch_size))
        ends = rng.integers(n + 1, len(data) + 1, size=m)  # each extra row: a block ending here
        blocks = [(int(e) - p.block, int(e)) for e in ends]
        queries = [self.tok.decode(data[a - p.query_tokens : a].tolist(), skip_special_tokens=True) for a, _ in blocks]
        ids, _ = self.index.retrieve(queries, p.candidates)
        extra = torch.from_numpy(np.stack([data[e - n - 1 : e].astype(np.int64) for _, e in blocks]))
        ex, ey = extra[:, :-1].clone(), extra[:, 1:].clone()  # one tensor's views: the mask must not reach inputs
        rows = range(m)
        self.stats["sequences"] += m
        layouts = []
        for r, (a, e), cands in zip(rows, blocks, ids, strict=True):
            own = self.index.doc_of(a)
            runs = token_runs(data[max(0, e - n) : e], p.copy_tokens)  # once per row, for every candidate
            chosen, pids = [], []
            for pid in cands[cands >= 0]:
                if int(self.index.spans[pid][0]) == own:
                    self.stats["excluded_own"] += 1
                    continue
                toks = self.index.passage(int(pid))
                if shares_run(toks, runs, p.copy_tokens):
                    self.stats["excluded_copies"] += 1
                    continue
                chosen.append(toks)
                pids.append(int(pid))
                if len(chosen) == p.passages:
                    break
            if not chosen:
                continue  # nothing to read: the row stays a plain one
            prefix = ric_prefix(chosen, self.bos, self.eos, n - p.block)
            seq = prefix + data[e - (n + 1 - len(prefix)) : e].tolist()
            t = torch.tensor(seq, dtype=torch.long)
            ex[r], ey[r] = t[:-1], t[1:]
            # the loss covers the document's text, never the passages; "block": only the block
            ey[r, : (n - p.block if p.loss_on == "block" else len(prefix) - 1)] = IGNORE
            self.stats["with_passages"] += 1
            layouts.append({"row": self.batch_size + int(r), "own_doc": own, "passages": pids, "end": e})
        self.layouts = layouts
        return torch.cat([x, ex]), torch.cat([y, ey])
