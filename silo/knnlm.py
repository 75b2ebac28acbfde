"""kNN-LM: p = (1-λ)·p_LM + λ·p_kNN, with p_kNN(w) ∝ Σ_{neighbours with value w} exp(-d/T).

λ is the *datastore* weight (SILO's code convention). Scoring runs the LM once per
sliding window (the same windows as LM-only evaluation, so both modes score the same
tokens), takes the keys of the scored positions with the same hook the store was built
with, and searches the store for the whole batch at once. The neighbours are kept
(distances and values per token), so λ and T can be swept without searching again, and
any k' ≤ k by truncation.

Memory is bounded by the search, not by the text: each batch's queries are searched in
chunks of at most `SEARCH_CHUNK_BYTES` of candidates (refine x k per query, each with its
exact key when re-ranking), and `knn_score` — the server's Score — turns every batch into
log-probs at once and keeps nothing per neighbour, so a long text costs time, never more
memory. `retrieve_neighbours` keeps the neighbours (n x k x 20 B) for sweeps.

Generation goes one token at a time with the KV cache; every generated token carries its
attribution: the neighbours that voted, with their weight and source.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
from tqdm import tqdm

from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore
from silo.errors import SiloError
from silo.evaluate import batched, pad_batch, windows_for
from silo.keys import capture_keys
from silo.retomaton import Walk, search_sequences
from silo.tokenizer import StreamDecoder, text_ids


@dataclass(frozen=True)
class KNNParams:
    k: int = 128
    lam: float = 0.25  # datastore weight λ
    temperature: float = 10.0
    nprobe: int | None = 32
    refine: int | None = None  # exact re-ranking of refine × k candidates (stores with kept keys); None = store default
    reuse: int = 0  # pointer reuse (silo.retomaton): no search where ≥ reuse pointers advance; 0 = off
    skip_above: float = 1.0  # adaptive retrieval: no search where the LM's top probability ≥ this; 1 = off

    @classmethod
    def merged(cls, defaults: dict | None = None, k: int | None = None, lam: float | None = None,
               temperature: float | None = None, nprobe: int | None = None,
               refine: int | None = None, reuse: int | None = None, skip_above: float | None = None) -> KNNParams:
        """The one parameter merge (CLI, servicers, demo): values given (None = not given)
        over a store's tuned defaults (`manifest.defaults`) over the built-in ones."""
        d, base = defaults or {}, cls()

        def pick(given, key: str, fallback):
            return given if given is not None else d.get(key, fallback)

        return cls(k=pick(k, "k", base.k), lam=pick(lam, "lambda", base.lam),
                   temperature=pick(temperature, "temperature", base.temperature),
                   nprobe=pick(nprobe, "nprobe", base.nprobe), refine=pick(refine, "refine", base.refine),
                   reuse=pick(reuse, "reuse", base.reuse), skip_above=pick(skip_above, "skip_above", base.skip_above))

    def validate(self) -> KNNParams:
        if self.k <= 0:
            raise SiloError(f"k must be positive, got {self.k}")
        if not 0.0 <= self.lam <= 1.0:
            raise SiloError(f"lambda must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise SiloError(f"temperature must be positive, got {self.temperature}")
        if self.nprobe is not None and self.nprobe <= 0:
            raise SiloError(f"nprobe must be positive, got {self.nprobe}")
        if self.refine is not None and self.refine < 1:
            raise SiloError(f"refine must be at least 1, got {self.refine}")
        if not 0 <= self.reuse <= self.k:
            raise SiloError(f"reuse must be in [0, k={self.k}] (0: no pointer reuse), got {self.reuse}")
        if not 0.0 < self.skip_above <= 1.0:  # NaN fails too
            raise SiloError(f"skip_above must be in (0, 1] (1: never skip a search), got {self.skip_above}")
        return self


def knn_weights(dists: np.ndarray, temperature: float, valid: np.ndarray | None = None,
                metric: str = "l2") -> np.ndarray:
    """Softmax over each row's neighbours of -d/T (L2 distances) or +s/T (inner-product
    scores: larger is closer). Missing neighbours (`valid` False, or a distance that is not
    finite) weigh 0; a row with no neighbour at all weighs 0 everywhere."""
    d = np.asarray(dists, dtype=np.float64)
    logits = (d if metric == "ip" else -d) / temperature
    ok = np.isfinite(logits) if valid is None else np.isfinite(logits) & np.asarray(valid, dtype=bool)
    top = np.where(ok, logits, -np.inf).max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.where(ok, np.exp(np.where(ok, logits, 0.0) - top), 0.0)
    total = w.sum(axis=-1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def knn_target_logprob(dists: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float,
                       metric: str = "l2") -> np.ndarray:
    """log p_kNN(target) per row (-inf where no neighbour has the target as value)."""
    w = knn_weights(dists, temperature, values >= 0, metric)
    p = (w * (values == targets[:, None])).sum(axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(p)


def knn_interpolate(lm_logprob: np.ndarray, knn_logprob: np.ndarray, lam: float,
                    retrieved: np.ndarray | None = None) -> np.ndarray:
    """log((1-λ)·p_LM + λ·p_kNN), stable in log space. Where nothing was retrieved
    (`retrieved` False: every neighbour opted out, filtered by policy, or none found),
    λ = 0 there: the LM exactly — never the LM scaled by (1-λ)."""
    lm = np.asarray(lm_logprob, dtype=np.float64)
    if lam <= 0.0:
        return lm
    if lam >= 1.0:
        mixed = np.asarray(knn_logprob, dtype=np.float64)
    else:
        mixed = np.logaddexp(lm + math.log1p(-lam), np.asarray(knn_logprob, dtype=np.float64) + math.log(lam))
    return mixed if retrieved is None else np.where(retrieved, mixed, lm)


def knn_distribution(dists: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float,
                     metric: str = "l2") -> torch.Tensor:
    """p_kNN over the vocabulary, (n, V), from (n, k) neighbours (for generation); a row
    without neighbours is all zeros."""
    valid = (values >= 0).numpy()
    w = torch.from_numpy(knn_weights(dists.numpy(), temperature, valid, metric)).float()
    safe = values.clamp(min=0).long()
    out = torch.zeros((dists.shape[0], vocab_size))
    out.scatter_add_(1, safe, w * (values >= 0))
    return out


# ---------------------------------------------------------------------------- scoring


@dataclass
class DocNeighbours:
    """Per scored token of one document: LM log-prob, target, and its k neighbours."""

    lm_logprob: np.ndarray  # (n,) float64
    targets: np.ndarray  # (n,) int64
    dists: np.ndarray  # (n, k) float32
    values: np.ndarray  # (n, k) int64, -1 = no neighbour
    ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (n, k) entry ids
    queries: np.ndarray | None = None  # (n, d) query keys, when asked for (ANN recall checks)
    metric: str = "l2"  # the store's: "l2" distances or "ip" scores
    lm_top: np.ndarray | None = None  # (n,) the LM's top probability (adaptive retrieval's confidence)
    how: np.ndarray | None = None  # (n,) int8: searched, reused or skipped (silo.retomaton)

    def knn_logprob(self, params: KNNParams) -> np.ndarray:
        """kNN-LM log-probs with the first k neighbours; `params.skip_above` applied after the
        fact (the LM alone where it is that confident), as if those searches were skipped."""
        k = params.k
        values = self.values[:, :k]
        knn = knn_target_logprob(self.dists[:, :k], values, self.targets, params.temperature, self.metric)
        retrieved = (values >= 0).any(axis=1)
        if params.skip_above < 1.0 and self.lm_top is not None:
            retrieved &= self.lm_top < params.skip_above
        return knn_interpolate(self.lm_logprob, knn, params.lam, retrieved=retrieved)


# one search call's candidates, at most (FAISS's distances and ids, the merge's copies, and
# with exact re-ranking the candidates' fp16 keys and their float32 distances)
SEARCH_CHUNK_BYTES = 128 << 20
WALK_WINDOWS = 128  # windows walked together with pointer reuse (silo.retomaton): each step's search is batched


def search_rows(store: Datastore, k: int, refine: int | None) -> int:
    """Queries per search call so that one call's candidates fit `SEARCH_CHUNK_BYTES`."""
    r = store.refine_for(refine)
    per_candidate = 64 + (6 * store.manifest.dim if r > 1 else 0)
    return max(1, SEARCH_CHUNK_BYTES // (k * r * per_candidate))


def chunked_search(store: Datastore, queries: np.ndarray, k: int, nprobe: int | None,
                   policy: RetrievalPolicy | None, refine: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`store.search` over `queries` in chunks of `search_rows` queries: the search's
    temporaries are bounded whatever the batch."""
    step = search_rows(store, k, refine)
    if len(queries) <= step:
        return store.search(queries, k, nprobe=nprobe, policy=policy, refine=refine)
    parts = [store.search(queries[i : i + step], k, nprobe=nprobe, policy=policy, refine=refine)
             for i in range(0, len(queries), step)]
    return np.concatenate([d for d, _ in parts]), np.concatenate([e for _, e in parts])


@dataclass
class NeighbourBatch:
    """One batch of windows: the scored spans (doc, first, end) in row order, and per row
    the LM log-prob, the query key and the k neighbours."""

    spans: list[tuple[int, int, int]]
    lm_logprob: np.ndarray  # (rows,) float64
    queries: np.ndarray  # (rows, d)
    dists: np.ndarray  # (rows, k)
    ids: np.ndarray  # (rows, k)
    values: np.ndarray  # (rows, k)
    lm_top: np.ndarray  # (rows,) the LM's top probability
    how: np.ndarray  # (rows,) int8: searched, reused or skipped (silo.retomaton)


@torch.no_grad()
def neighbour_batches(model, store: Datastore, docs: list[list[int]], k: int, window: int = 512,
                      stride: int = 256, batch_size: int = 8, pad_id: int = 0, nprobe: int | None = None,
                      policy: RetrievalPolicy | None = None, progress: bool = False, refine: int | None = None,
                      overlap: bool = True, reuse: int = 0, skip_above: float = 1.0,
                      keep_top: bool = False) -> Iterator[NeighbourBatch]:
    """The LM and the store over every window, one `NeighbourBatch` at a time. With
    `overlap`, the search of one batch runs in a second thread while the LM runs the next
    batch (FAISS and torch both release the GIL), so retrieval costs only what it adds
    beyond the forward — at the price of one more busy thread. `reuse` and `skip_above`
    search less (`silo.retomaton.search_sequences`: each window's scored tokens are a walk);
    the LM's top probability per token is computed for `skip_above` < 1 or `keep_top`
    (a pass over the vocabulary: ~10% of a tiny LM's forward), else left at 0."""
    want_top = keep_top or skip_above < 1.0
    model.eval()
    device = next(model.parameters()).device
    wins = [w for i, d in enumerate(docs) for w in windows_for(len(d), window, stride, i)]
    wins.sort(key=lambda w: w.end - w.begin)

    def search(q_all: np.ndarray, lengths: list[int], tokens: np.ndarray, top: np.ndarray):
        return search_sequences(store, lambda q: chunked_search(store, q, k, nprobe, policy, refine),
                                q_all, lengths, tokens, top, k, reuse, skip_above, policy)

    def finish(spans: list, lm: np.ndarray, q_all: np.ndarray, top: np.ndarray, found: Future) -> NeighbourBatch:
        dist, eid, vals, how = found.result()
        return NeighbourBatch(spans, lm, q_all, dist, eid, vals, top, how)

    threads = faiss.omp_get_max_threads()  # OpenMP's thread count is per calling thread: carry it over
    # a walk advances every window of its group one token per step, and a step searches the
    # windows whose pointers ran out together: small groups make small, slow searches
    group = 1 if reuse <= 0 else max(1, min(WALK_WINDOWS // batch_size,
                                            SEARCH_CHUNK_BYTES // max(1, batch_size * window * k * 20)))
    pending, parts = None, []
    batches = list(batched(wins, batch_size))
    with capture_keys(model, store.manifest.key_type or "ffn_input") as box, \
            ThreadPoolExecutor(max_workers=1, initializer=faiss.omp_set_num_threads, initargs=(threads,)) as pool:
        for no, batch in enumerate(tqdm(batches, desc="kNN-LM score", unit="batch", disable=not progress)):
            ids, mask = pad_batch([docs[w.doc][w.begin : w.end] for w in batch], pad_id)
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            keys = box["keys"].float().cpu()
            for r, w in enumerate(batch):
                lo, hi = w.first_target - w.begin - 1, w.end - w.begin - 1
                targets = ids[r, lo + 1 : hi + 1].to(device)
                parts.append(((w.doc, w.first_target - 1, w.end - 1),
                              logp[r, lo:hi].gather(-1, targets[:, None])[:, 0].double().cpu().numpy(),
                              keys[r, lo:hi].numpy(),
                              logp[r, lo:hi].max(-1).values.exp().double().cpu().numpy() if want_top
                              else np.zeros(hi - lo),
                              targets.cpu().numpy()))
            del logp, keys
            if (no + 1) % group and no + 1 < len(batches):
                continue
            spans, lms, queries, tops, tokens = zip(*parts, strict=True)
            parts = []
            q_all, top = np.concatenate(queries), np.concatenate(tops)
            if pending is not None:
                yield finish(*pending)
            found = pool.submit(search, q_all, [len(t) for t in tokens], np.concatenate(tokens), top)
            pending = (list(spans), np.concatenate(lms), q_all, top, found)
            if not overlap:
                yield finish(*pending)
                pending = None
        if pending is not None:
            yield finish(*pending)


def knn_score(model, store: Datastore, ids: list[int], params: KNNParams, window: int = 512, stride: int = 256,
              batch_size: int = 8, pad_id: int = 0, policy: RetrievalPolicy | None = None,
              overlap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(LM log-probs, kNN-LM log-probs) of tokens 1..n-1 of one document, each batch's
    neighbours turned into log-probs and dropped at once: memory does not grow with the text."""
    n = max(len(ids) - 1, 0)
    lm, mixed = np.zeros(n), np.zeros(n)
    doc = np.asarray(ids, dtype=np.int64)
    # a batch's neighbours (window x k x 20 B per window) and the float64 temporaries of the
    # vote (about 50 B per neighbour) stay within about SEARCH_CHUNK_BYTES each, whatever k
    batch_size = max(1, min(batch_size, SEARCH_CHUNK_BYTES // (window * params.k * 20)))
    step = max(1, SEARCH_CHUNK_BYTES // (params.k * 50))
    for b in neighbour_batches(model, store, [ids], params.k, window, stride, batch_size, pad_id, params.nprobe,
                               policy, refine=params.refine, overlap=overlap, reuse=params.reuse,
                               skip_above=params.skip_above):
        targets = np.concatenate([doc[a + 1 : e + 1] for _, a, e in b.spans])
        lp = np.concatenate([
            knn_interpolate(b.lm_logprob[i : i + step],
                            knn_target_logprob(b.dists[i : i + step], b.values[i : i + step], targets[i : i + step],
                                               params.temperature, store.metric),
                            params.lam, retrieved=(b.values[i : i + step] >= 0).any(axis=1))
            for i in range(0, len(targets), step)])
        row = 0
        for _, a, e in b.spans:
            lm[a:e], mixed[a:e] = b.lm_logprob[row : row + e - a], lp[row : row + e - a]
            row += e - a
    return lm, mixed


def retrieve_neighbours(model, store: Datastore, docs: list[list[int]], k: int, window: int = 512,
                        stride: int = 256, batch_size: int = 8, pad_id: int = 0, nprobe: int | None = None,
                        policy: RetrievalPolicy | None = None, progress: bool = False,
                        keep_queries: bool = False, refine: int | None = None,
                        overlap: bool = True, reuse: int = 0, skip_above: float = 1.0,
                        keep_top: bool = False) -> list[DocNeighbours]:
    """One pass: LM log-probs and the store's k neighbours for every scored token, kept
    (n x k per document) so that λ, T and any k' ≤ k can be swept without searching again
    (and, with `keep_top`, `skip_above`: the LM's top probability is kept beside them)."""
    n = [max(len(d) - 1, 0) for d in docs]
    out = [DocNeighbours(np.zeros(m), np.asarray(d[1:], dtype=np.int64), np.zeros((m, k), np.float32),
                         np.full((m, k), -1, np.int64), np.full((m, k), -1, np.int64), metric=store.metric,
                         lm_top=np.zeros(m) if keep_top else None, how=np.zeros(m, np.int8))
           for d, m in zip(docs, n, strict=True)]
    if keep_queries:
        for o in out:
            o.queries = np.zeros((len(o.targets), store.manifest.dim), np.float32)
    for b in neighbour_batches(model, store, docs, k, window, stride, batch_size, pad_id, nprobe, policy,
                               progress, refine, overlap, reuse, skip_above, keep_top):
        row = 0
        for doc, a, e in b.spans:
            o, rows = out[doc], slice(row, row + e - a)
            o.lm_logprob[a:e], o.dists[a:e], o.ids[a:e], o.values[a:e] = \
                b.lm_logprob[rows], b.dists[rows], b.ids[rows], b.values[rows]
            o.how[a:e] = b.how[rows]
            if keep_top:
                o.lm_top[a:e] = b.lm_top[rows]
            if keep_queries:
                o.queries[a:e] = b.queries[rows]
            row += e - a
    return out


# ---------------------------------------------------------------------------- generation


@dataclass
class GeneratedToken:
    token_id: int
    text: str
    logprob: float  # log-prob of the token under the distribution it was drawn from
    lm_logprob: float
    attribution: list[dict]  # top neighbours: doc_id, source, license, sentence, weight
    top: list[tuple[int, float]] = field(default_factory=list)  # the distribution's most likely tokens
    prompt: bool = False  # an echoed prompt token (scored, not drawn)


def top_tokens(p: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The `n` most likely tokens of a distribution, with their natural-log probabilities."""
    if n <= 0:
        return []
    vals, idx = torch.topk(p, min(n, p.shape[0]))
    return [(int(i), float(torch.log(v.clamp_min(1e-30)))) for v, i in zip(vals, idx, strict=True)]


def prompt_tokens(tok, prompt: str, prompt_ids: list[int] | None) -> list[int]:
    """The prompt as ids (given ids win: they are the caller's tokenization), BOS first."""
    ids = list(prompt_ids) if prompt_ids else text_ids(tok, prompt)
    if not ids:
        raise SiloError("empty prompt")
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def sample_token(probs: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(probs.argmax())
    logits = torch.log(probs.clamp_min(1e-30)) / temperature
    p = torch.softmax(logits, -1)
    if top_p < 1.0:
        sp, si = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        keep[0] = True
        p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
        p = p / p.sum()
    return int(torch.multinomial(p, 1, generator=gen))


# mixes the LM's next-token distribution with a store's: (context ids, p_LM) -> (p, attribution)
Mixer = Callable[[list[int], torch.Tensor], tuple[torch.Tensor, list[dict]]]


@torch.no_grad()
def generate_mixed(model, tok, prompt: str, mix: Mixer, max_new_tokens: int = 32, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (), echo: bool = False,
                   top_logprobs: int = 0, prompt_ids: list[int] | None = None) -> Iterator[GeneratedToken]:
    """The decoding loop every mode shares: one forward per token on the KV cache, `mix`
    turns p_LM into the distribution sampled from (and says where the token came from), the
    streaming detokenizer yields each token's text; ends at EOS, a stop sequence or the limit.

    With `echo`, the prompt's own tokens come first (`prompt=True`), each scored under the
    same mixed distribution as a generated token would be (teacher forcing, one forward per
    token): the log-likelihood of a text under any mode, the way OpenAI's `echo` +
    `logprobs` ask for it. `top_logprobs` adds each step's most likely tokens."""
    device = next(model.parameters()).device
    ids = prompt_tokens(tok, prompt, prompt_ids)
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    if echo:
        if len(ids) + max_new_tokens > max_pos:
            raise SiloError(f"the prompt's {len(ids) - 1} tokens and max_new_tokens {max_new_tokens} exceed the "
                            f"model's {max_pos - 1}-token context (echo scores every prompt token: nothing is cut)")
        start = 1  # the first token (BOS, or the prompt's first without one) is context, not scored
        forced, context = ids[start:], ids[:start]
    else:
        forced, context = [], ids[-max(1, max_pos - max_new_tokens):]
    gen = torch.Generator().manual_seed(seed)
    text_so_far, past, decoder = "", None, StreamDecoder(tok)
    # transformers ≥ 5.2x calls the KV cache `cache`; earlier releases `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    inp = torch.tensor([context], device=device)
    for step in range(len(forced) + max_new_tokens):
        out = model(input_ids=inp, use_cache=True, **{cache_arg: past})
        past = getattr(out, cache_arg)
        lm_p = torch.softmax(out.logits[0, -1].float(), -1).cpu()
        p, attribution = mix(context, lm_p)
        is_prompt = step < len(forced)
        next_id = forced[step] if is_prompt else sample_token(p, temperature, top_p, gen)
        piece = decoder.add(next_id)
        yield GeneratedToken(next_id, piece, float(torch.log(p[next_id].clamp_min(1e-30))),
                             float(torch.log(lm_p[next_id].clamp_min(1e-30))), attribution,
                             top_tokens(p, top_logprobs), is_prompt)
        context.append(next_id)
        if not is_prompt:
            if next_id == tok.eos_token_id:
                return
            text_so_far += piece
            if any(s and s in text_so_far for s in stop):
                return
        inp = torch.tensor([[next_id]], device=device)


def generate(model, tok, prompt: str, max_new_tokens: int = 32, store: Datastore | None = None,
             params: KNNParams = KNNParams(), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             policy: RetrievalPolicy | None = None, stop: tuple[str, ...] = (), attribution_top: int = 3,
             echo: bool = False, top_logprobs: int = 0, prompt_ids: list[int] | None = None,
             ) -> Iterator[GeneratedToken]:
    """Yield tokens one at a time, LM-only (store None) or kNN-LM, with attribution
    (`echo`, `top_logprobs`, `prompt_ids`: `generate_mixed`)."""
    key_type = store.manifest.key_type if store is not None else "ffn_input"
    walk = None if store is None else Walk(
        store, lambda q: store.search(q, params.k, nprobe=params.nprobe, policy=policy, refine=params.refine),
        params.k, params.reuse, params.skip_above, policy)
    with capture_keys(model, key_type or "ffn_input") as box:

        def mix(ids: list[int], lm_p: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
            if store is None or params.lam <= 0:
                return lm_p, []
            walk.moved_to(ids[-1])  # the token fed last: the pointers of the step before follow it
            q = box["keys"][0, -1:].float().cpu().numpy()
            dist, eid, vals, _ = walk.neighbours(q, float(lm_p.max()))
            vals = torch.from_numpy(vals)
            if not (vals >= 0).any():  # nothing allowed retrieved: λ = 0, the LM exactly
                return lm_p, []
            knn_p = knn_distribution(torch.from_numpy(dist), vals, lm_p.shape[0], params.temperature, store.metric)[0]
            w = knn_weights(dist, params.temperature, (vals >= 0).numpy(), store.metric)[0]
            top = np.argsort(-w)[:attribution_top]
            top = top[eid[0, top] >= 0]
            attribution = []
            for hit, j in zip(store.attribute(eid[0, top], dist[0, top]), top, strict=True):
                hit["weight"] = float(w[j] * params.lam)
                attribution.append(hit)
            return (1 - params.lam) * lm_p + params.lam * knn_p, attribution  # sums to 1: both do

        yield from generate_mixed(model, tok, prompt, mix, max_new_tokens, temperature, top_p, seed, stop, echo,
                                  top_logprobs, prompt_ids)
