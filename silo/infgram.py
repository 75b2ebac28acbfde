"""∞-gram inference: p = (1-λ)·p_LM + λ·p_∞, verbatim tracing, and λ tuned per suffix length.

p_∞(w | context) is the next-token distribution of the *longest* suffix of the context
that occurs in the store (Liu et al. 2024): cont_count / suffix_count, backing off to the
unigram distribution only when not even the last token occurs. How much to trust it
depends on how long that suffix is (a 20-token match is nearly a copy; a 1-token match is
a unigram), so λ is a function of the suffix length: one λ per length bucket, tuned on
validation text by `sweep_infgram` (each bucket's positions are disjoint, so the buckets
are tuned independently and exactly) and stored in the store's manifest. A position where
the store holds nothing at all (every document opted out) uses λ = 0: the LM exactly.

Scoring runs the LM once (the same windows as LM-only, so every mode scores the same
tokens) and queries the engine per position; the longest match can grow by at most one
token per position, so each query looks only at that many trailing tokens.

Generation takes the store's index at every step (a tombstone-version compare when nothing
changed): a removal acknowledged while a generation streams holds from its next token on,
for the distribution and for the attribution alike.

Tracing (`trace`): the maximal spans of a text that occur verbatim in the store, each
with its documents — OLMoTrace's idea — longest and rarest first, opted-out documents
never shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from silo.datastore.infgram import MAX_MATCH, InfgramStore
from silo.datastore.policy import RetrievalPolicy
from silo.errors import SiloError
from silo.evaluate import perplexity, score_documents
from silo.knnlm import GeneratedToken, generate_mixed, knn_interpolate
from silo.tokenizer import tokenize_text

SUFFIX_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # lower bounds of the suffix-length buckets
MAX_CONTEXT = MAX_MATCH  # tokens of context a match may span


@dataclass(frozen=True)
class InfgramParams:
    lam: float = 0.5  # λ for buckets without a tuned value
    lam_by_suffix: tuple[tuple[int, float], ...] = ()  # ((bucket lower bound, λ), ...), tuned

    @classmethod
    def merged(cls, defaults: dict | None = None, lam: float | None = None) -> InfgramParams:
        """A request's λ (one value for every bucket) over a store's tuned defaults."""
        d = defaults or {}
        if lam is not None:
            return cls(lam=lam)
        return cls(lam=d.get("lambda", cls.lam), lam_by_suffix=tuple(tuple(x) for x in d.get("lambda_by_suffix", ())))

    def validate(self) -> InfgramParams:
        for _, v in ((None, self.lam), *self.lam_by_suffix):
            if not 0.0 <= v <= 1.0:
                raise SiloError(f"∞-gram λ must be in [0, 1], got {v}")
        return self

    def lam_for(self, suffix_len: np.ndarray) -> np.ndarray:
        lams = np.full(np.shape(suffix_len), self.lam, dtype=np.float64)
        for lo, v in self.lam_by_suffix:
            lams[np.asarray(suffix_len) >= lo] = v
        return lams


def bucket_of(suffix_len: np.ndarray) -> np.ndarray:
    return np.searchsorted(SUFFIX_BUCKETS, suffix_len, side="right") - 1


@dataclass
class DocInfgram:
    """Per scored token of one document: LM log-prob, target, and its ∞-gram match."""

    lm_logprob: np.ndarray  # (n,) float64
    targets: np.ndarray  # (n,) int64
    suffix_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,)
    suffix_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,)
    cont_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,)

    def infgram_logprob(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.suffix_count > 0, np.log(self.cont_count / np.maximum(self.suffix_count, 1)), -np.inf)

    def logprob(self, params: InfgramParams) -> np.ndarray:
        lams = params.lam_for(self.suffix_len)
        inf = self.infgram_logprob()
        out = np.empty(len(self.targets), dtype=np.float64)
        for lam in np.unique(lams):
            sel = lams == lam
            out[sel] = knn_interpolate(self.lm_logprob[sel], inf[sel], float(lam), retrieved=self.suffix_count[sel] > 0)
        return out


def score_infgram(model, store: InfgramStore, docs: list[list[int]], window: int = 512, stride: int = 256,
                  batch_size: int = 8, pad_id: int = 0, policy: RetrievalPolicy | None = None,
                  progress: bool = False, lm_logprobs: list[np.ndarray] | None = None,
                  threads: int = 2) -> list[DocInfgram]:
    """One LM pass (or the given LM log-probs of the same tokens) and the ∞-gram match of
    every scored token; documents are matched in `threads` threads while the LM runs."""
    index = store.index_for(policy)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # matching runs beside the LM pass (the engine and torch both release the GIL)
        pending = [pool.submit(index.match, list(d)) for d in docs]
        lm = lm_logprobs if lm_logprobs is not None else score_documents(model, docs, window, stride, batch_size,
                                                                         pad_id, progress)
        matches = [f.result() for f in pending]
    return [DocInfgram(lp, np.asarray(d[1:], dtype=np.int64), *m) for lp, d, m in zip(lm, docs, matches, strict=True)]


def sweep_lambdas(scored: list[DocInfgram], lams: tuple[float, ...] = tuple(np.round(np.arange(0, 1.0, 0.05), 2)),
                  min_tokens: int = 20) -> tuple[InfgramParams, dict]:
    """λ per suffix-length bucket minimising perplexity (buckets tuned independently: their
    positions are disjoint); a bucket with fewer than `min_tokens` tokens takes the global λ."""
    lm = np.concatenate([s.lm_logprob for s in scored])
    inf = np.concatenate([s.infgram_logprob() for s in scored])
    has = np.concatenate([s.suffix_count for s in scored]) > 0
    buckets = bucket_of(np.concatenate([s.suffix_len for s in scored]))

    def best(sel) -> float:  # the λ of least negative log-likelihood (the smallest, on a tie)
        return float(min(sorted(lams), key=lambda lam: -knn_interpolate(lm[sel], inf[sel], lam, retrieved=has[sel]).sum()))

    glob = best(np.ones(len(lm), dtype=bool))
    by_bucket, report = [], {}
    for b, lo in enumerate(SUFFIX_BUCKETS):
        sel = buckets == b
        if sel.sum() >= min_tokens:
            lam = best(sel)
            by_bucket.append((lo, lam))
            report[str(lo)] = {"lambda": lam, "tokens": int(sel.sum())}
    params = InfgramParams(lam=glob, lam_by_suffix=tuple(by_bucket))
    return params, {"lambda": glob, "buckets": report}


def infgram_perplexity(scored: list[DocInfgram], params: InfgramParams) -> float:
    return perplexity([s.logprob(params) for s in scored])


# ---------------------------------------------------------------------------- generation


def generate_infgram(model, tok, store: InfgramStore, prompt: str, max_new_tokens: int = 32,
                     params: InfgramParams | None = None, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, policy: RetrievalPolicy | None = None, stop: tuple[str, ...] = (),
                     attribution_top: int = 3, max_support: int = 1000, echo: bool = False, top_logprobs: int = 0,
                     prompt_ids: list[int] | None = None) -> Iterator[GeneratedToken]:
    """Tokens one at a time from (1-λ)·p_LM + λ·p_∞ (a normalised distribution; λ = 0 where
    the store holds nothing), each with its attribution: the matched suffix's length and
    count, and documents that continue it with the chosen token."""
    p_ = (params or InfgramParams.merged(store.manifest.defaults)).validate()
    store.index_for(policy)  # refused before the first token if the policy's view is over its cap
    pending: dict = {}  # the step's match, for attributing the token once it is chosen
    last: dict = {"index": None, "len": -1, "sl": 0}  # the previous step's index, context length and match

    def mix(ids: list[int], lm_p: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        # taken per step (a tombstone version compare when nothing changed): a removal
        # acknowledged while the generation streams holds from the next token on
        index = store.index_for(policy)
        context = ids[-MAX_CONTEXT:]
        # one token more than last step, on the same index: the match grows by one token at most
        grown = index is last["index"] and len(ids) == last["len"] + 1
        sl, count, nxt = index.next_tokens(context, max_support, at_most=last["sl"] + 1 if grown else None)
        last.update(index=index, len=len(ids), sl=sl)
        pending.clear()
        if count <= 0 or not nxt:
            return lm_p, []
        inf_p = torch.zeros_like(lm_p)
        tokens = torch.tensor(list(nxt), dtype=torch.long)
        keep = tokens < len(inf_p)
        inf_p[tokens[keep]] = torch.tensor(list(nxt.values()), dtype=torch.float32)[keep]
        if inf_p.sum() <= 0:
            return lm_p, []
        lam = float(p_.lam_for(np.asarray([sl]))[0])
        pending.update(context=ids[len(ids) - sl:] if sl else [], sl=sl, count=count, nxt=nxt, lam=lam)
        return (1 - lam) * lm_p + lam * inf_p / inf_p.sum(), []

    for t in generate_mixed(model, tok, prompt, mix, max_new_tokens, temperature, top_p, seed, stop, echo,
                            top_logprobs, prompt_ids):
        m = pending
        if m and m["lam"] > 0 and m["sl"] > 0 and m["nxt"].get(t.token_id):
            docs = store.index_for(policy).documents([*m["context"], t.token_id], attribution_top)
            share = m["lam"] * m["nxt"][t.token_id] / max(sum(m["nxt"].values()), 1) / max(len(docs), 1)
            t.attribution = [{"entry_id": int(store.docs.first_entry[d]), **store.doc_provenance(d),
                              "sentence_index": 0, "sentence": "", "position": 0,
                              "weight": share,  # the token's λ·p_∞ shared by the documents shown
                              "suffix_tokens": m["sl"], "suffix_count": m["count"]} for d in docs]
        yield t


# ---------------------------------------------------------------------------- tracing


@dataclass
class TracedSpan:
    start_token: int
    end_token: int
    start_char: int
    end_char: int
    text: str
    count: int
    documents: list[dict]


def trace(store: InfgramStore, tok, text: str, min_tokens: int = 8, max_spans: int = 50, max_docs: int = 5,
          policy: RetrievalPolicy | None = None) -> list[TracedSpan]:
    """The maximal spans (≥ `min_tokens` tokens) of `text` that occur verbatim in the store,
    each with up to `max_docs` of its documents, longest and rarest first."""
    if min_tokens < 1:
        raise SiloError(f"min_tokens must be positive, got {min_tokens}")
    enc = tokenize_text(tok, text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    index = store.index_for(policy)
    out = []
    for sp in index.spans(ids, min_tokens, max_docs):
        a, b = offsets[sp.start][0], offsets[sp.end - 1][1]
        out.append(TracedSpan(sp.start, sp.end, a, b, text[a:b], sp.count, [store.doc_provenance(d) for d in sp.docs]))
    out.sort(key=lambda s: (-(s.end_token - s.start_token), s.count, s.start_token))
    return out[:max_spans]

