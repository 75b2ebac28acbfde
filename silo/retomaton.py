"""Fewer kNN-LM searches: pointer reuse (RetoMaton) and adaptive retrieval.

Pointer reuse (Alon et al., 2022). Entry e of a token store is the LM's state before token
value(e) of its document, and entry e + 1 the state right after that token. When the text
goes on with the token that neighbour e predicted, e + 1 is where that neighbour's document
went next: a neighbour of the next query, found without searching. After each token y the
pointers are

    P = {e + 1 : e a neighbour of this step, value(e) = y, e + 1 in e's document and allowed now}

and with at least `reuse` of them they are the next step's neighbours: their exact distances
from the kept fp16 keys (so k, λ, T and the vote mean what they mean after a search), no
inverted list scanned. With fewer, the store is searched, which restarts the walk. Whether
an entry is allowed is asked of the store at every step (`Datastore.allowed`: the opt-out
log re-read, the request's policy, compactions), so a pointer never steps into an entry
removed before that step, and every neighbour that votes is a real entry of the store with
its document and sentence: attribution is what a search would report.

Adaptive retrieval (He et al., 2021). Where the LM's top probability is at least
`skip_above`, the LM is trusted alone: no search, λ = 0 at that token (the LM exactly, as
where nothing is retrieved), and the walk restarts after it.

Both are off unless a request or the store's tuned defaults (`silo eval --sweep`) turn them
on; pointer reuse needs a store with kept keys (`Datastore.can_refine`), like re-ranking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore

SEARCHED, REUSED, SKIPPED = 0, 1, 2  # how each token got its neighbours

# searches one batch of queries: (n, d) -> (distances (n, k), entry ids (n, k))
SearchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def advance(store: Datastore, ids: np.ndarray, values: np.ndarray, tokens: np.ndarray,
            policy: RetrievalPolicy | None) -> np.ndarray:
    """The next step's pointers (m, k), valid ones first and -1 after, from this step's
    neighbours `ids` (m, k), their `values`, and the token `tokens` (m,) that came next."""
    assert ids.shape == values.shape and ids.ndim == 2 and tokens.shape == (len(ids),), (ids.shape, tokens.shape)
    nxt = np.where((ids >= 0) & (values == tokens[:, None]), ids + 1, -1)
    ok = nxt >= 0
    if ok.any():
        ok &= store.entry_docs(np.where(ok, nxt, -1)) == store.entry_docs(np.where(ok, ids, -1))
        ok &= store.allowed(nxt, policy)
    nxt = np.where(ok, nxt, -1)
    return np.take_along_axis(nxt, np.argsort(~ok, axis=1, kind="stable"), 1)


def reused_neighbours(store: Datastore, queries: np.ndarray, pointers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pointers as neighbours: (exact distances, ids), each row best first, -1 last."""
    dist = store.distances_to(queries, pointers)
    order = np.argsort(dist if store.metric != "ip" else -dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, 1), np.take_along_axis(pointers, order, 1)


def search_sequences(store: Datastore, search: SearchFn, queries: np.ndarray, lengths: list[int],
                     tokens: np.ndarray, lm_top: np.ndarray, k: int, reuse: int, skip_above: float,
                     policy: RetrievalPolicy | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours for rows that form sequences (the rows of sequence i are contiguous and in
    text order; `lengths` says how many), with `tokens` (n,) the token each row predicts and
    `lm_top` (n,) the LM's top probability there. Returns (distances (n, k), ids (n, k),
    values (n, k), how (n,) int8: SEARCHED, REUSED or SKIPPED). Step j searches, in one
    call, the j-th rows of every sequence that has neither enough pointers nor a confident LM."""
    n = len(queries)
    assert queries.ndim == 2 and tokens.shape == lm_top.shape == (n,) and sum(lengths) == n, (queries.shape, lengths)
    reuse = reuse if store.can_refine else 0
    worst = np.inf if store.metric != "ip" else -np.inf
    dist, ids, values = np.full((n, k), worst, np.float32), np.full((n, k), -1, np.int64), np.full((n, k), -1, np.int64)
    how = np.full(n, SEARCHED, np.int8)
    confident = lm_top >= skip_above if skip_above < 1.0 else np.zeros(n, bool)
    if reuse <= 0:  # no walk: no step depends on the one before, one search for every row that needs one
        need = np.flatnonzero(~confident)
        if len(need):
            dist[need], ids[need] = search(queries[need])
            values[need] = store.values(ids[need])
        how[confident] = SKIPPED
        return dist, ids, values, how
    lengths_a = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
    pointers = np.full((len(lengths_a), k), -1, np.int64)
    for j in range(int(lengths_a.max(initial=0))):
        seqs = np.flatnonzero(lengths_a > j)
        rows = starts[seqs] + j
        use = (pointers[seqs] >= 0).sum(axis=1) >= reuse
        skip = ~use & confident[rows]
        need = ~use & ~skip
        if need.any():
            dist[rows[need]], ids[rows[need]] = search(queries[rows[need]])
        if use.any():
            dist[rows[use]], ids[rows[use]] = reused_neighbours(store, queries[rows[use]], pointers[seqs[use]])
        how[rows[use]], how[rows[skip]] = REUSED, SKIPPED
        values[rows] = store.values(ids[rows])
        pointers[seqs] = advance(store, ids[rows], values[rows], tokens[rows], policy)
    return dist, ids, values, how


class Walk:
    """Pointer reuse and adaptive retrieval one token at a time (generation): `neighbours`
    gives a step's (distances (1, k), ids (1, k), values (1, k), how); `moved_to` advances
    the pointers along the token that was chosen."""

    def __init__(self, store: Datastore, search: SearchFn, k: int, reuse: int, skip_above: float,
                 policy: RetrievalPolicy | None):
        self.store, self.search, self.k, self.policy = store, search, k, policy
        self.reuse = reuse if store.can_refine else 0
        self.skip_above = skip_above
        self.pointers = np.full((1, k), -1, np.int64)
        self.last, self.last_values = self.pointers, self.pointers

    def neighbours(self, query: np.ndarray, lm_top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        if self.reuse > 0 and int((self.pointers >= 0).sum()) >= self.reuse:
            dist, ids = reused_neighbours(self.store, query, self.pointers)
            how = REUSED
        elif self.skip_above < 1.0 and lm_top >= self.skip_above:
            worst = np.inf if self.store.metric != "ip" else -np.inf
            dist, ids, how = np.full((1, self.k), worst, np.float32), np.full((1, self.k), -1, np.int64), SKIPPED
        else:
            (dist, ids), how = self.search(query), SEARCHED
        self.last, self.last_values = ids, self.store.values(ids)
        return dist, ids, self.last_values, how

    def moved_to(self, token: int) -> None:
        if self.reuse > 0:
            self.pointers = advance(self.store, self.last, self.last_values, np.array([token], np.int64), self.policy)
