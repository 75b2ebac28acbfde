"""Datastore scaling curves, MassiveDS's way: retrieve once, subsample many times.

For every scored token the full store is searched once with a large depth K. A store of
fraction p is simulated by keeping an entry iff u(entry id, seed) < p, where u is a
deterministic hash to [0, 1): the kept sets are nested (an entry kept at 1% is kept at
10%), reproducible, and independent of the query — unlike MassiveDS's per-(query,
candidate) coin. The first k survivors of each token's list are exactly the top-k of the
subsampled store *for exact search*, as long as at least k survive (reported as
`k_satisfied`). For IVF/PQ stores the trick is approximate, so the tool also measures ANN
recall at each fraction against exact search over the kept raw keys (needs
`--keep-keys`).

λ fits the store's size. The full store's tuned λ trusts a store a tenth its size as much,
which made kNN-LM worse than no store at small fractions; so (unless λ is given) each
fraction and seed gets the λ of `LAMBDA_GRID` (0, no store, among them) that scores best
on the validation split, subsampled the same way, from one more deep retrieval there. With
the store's tuned k and T and the evaluation's tokens, the full store's point is the SILO
table's (`silo eval`), and no size is worse than the LM alone on validation.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
from matplotlib.figure import Figure

from silo.datastore.passages import PassageStore
from silo.datastore.store import Datastore
from silo.eval_modes import decontaminated_docs, store_exclusions, with_denied
from silo.evaluate import load_eval_docs, perplexity, score_documents
from silo.knnlm import DocNeighbours, KNNParams, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.ricl import RICParams, ric_score_documents

LAMBDA_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # `silo eval --sweep`'s λ values, and 0: no store
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def entry_uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64(id, seed) -> uniform floats in [0, 1); same id and seed, same value."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 intends
        x = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= 0) & (entry_uniform(np.where(ids >= 0, ids, 0), seed) < fraction)


def subsample_neighbours(n: DocNeighbours, fraction: float, seed: int, k: int) -> tuple[DocNeighbours, np.ndarray]:
    """The first k kept neighbours of each token; and whether k survived, per token."""
    keep = keep_mask(n.ids, fraction, seed)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, distance order kept
    kept = np.take_along_axis(keep, order, 1)
    dists = np.where(kept, np.take_along_axis(n.dists, order, 1), np.inf)
    values = np.where(kept, np.take_along_axis(n.values, order, 1), -1)
    ids = np.where(kept, np.take_along_axis(n.ids, order, 1), -1)
    return (DocNeighbours(n.lm_logprob, n.targets, dists, values, ids, metric=n.metric, lm_top=n.lm_top),
            kept.sum(1) >= k)


class SubsampledPassages:
    """A passage store seen through the subsampling trick: the full store is searched once
    per query with `depth`; each call keeps the first k survivors of `keep_mask`."""

    def __init__(self, store, depth: int):
        self.store, self.depth = store, depth
        self.cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.fraction, self.seed = 1.0, 0

    def search_text(self, queries: list[str], k: int, policy=None, retriever: str = "bm25", embed=None,
                    nprobe: int | None = None):
        todo = [q for q in queries if (q, retriever) not in self.cache]
        if todo:
            scores, ids = self.store.search_text(todo, self.depth, policy=policy, retriever=retriever,
                                                 embed=embed, nprobe=nprobe)
            for q, sc, i in zip(todo, scores, ids, strict=True):
                self.cache[(q, retriever)] = (sc, i)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for r, q in enumerate(queries):
            sc, i = self.cache[(q, retriever)]
            kept = np.flatnonzero(keep_mask(i, self.fraction, self.seed))[:k]
            out_s[r, : len(kept)], out_i[r, : len(kept)] = sc[kept], i[kept]
        return out_s, out_i

    def __getattr__(self, name):  # passage_text, attribute, manifest, …
        return getattr(self.store, name)


def ric_scaling_rows(model, tok, pstore, docs, fractions, seeds: int, depth: int, window: int, batch_size: int,
                     pad: int, policy, stride: int = 64) -> list[dict]:
    """RIC-LM perplexity per (fraction, seed) from one deep retrieval per block."""
    view = SubsampledPassages(pstore, depth)
    live = np.flatnonzero(np.repeat(pstore.doc_mask(policy), pstore.entries_per_doc))
    rows = []
    for seed in range(seeds):
        for f in sorted(fractions):
            view.fraction, view.seed = f, seed
            lps = ric_score_documents(model, tok, view, docs, window, RICParams(stride=stride), batch_size, pad, policy)
            rows.append({"fraction": f, "tokens": int(keep_mask(live, f, seed).sum()) * pstore.manifest.passage_tokens,
                         "seed": seed, "mode": "ric", "perplexity": perplexity(lps), "k_satisfied": "",
                         "ann_recall": ""})
    return rows


@dataclass
class CurveArgs:
    model: str
    store: str
    corpus: str
    out: str
    split: str = "test"
    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    seeds: int = 3
    depth: int = 1024  # K: neighbours retrieved once from the full store
    knn: KNNParams | None = None  # default: the overrides below over the store's tuned defaults
    k: int | None = None
    lam: float | None = None
    temperature: float | None = None
    nprobe: int | None = None
    window: int = 512
    stride: int = 256
    batch_size: int = 8
    max_tokens: int | None = 20_000
    oracle: str | None = None
    passage_store: str | None = None  # also the RIC-LM curve
    recall_queries: int = 200
    tune_lambda: bool = True  # λ per fraction on validation (when no λ is given)
    progress: bool = False


def tuned_lambdas(model, tok, store: Datastore, a: CurveArgs, params: KNNParams, depth: int,
                  pad: int) -> dict[tuple[float, int], float]:
    """(fraction, seed) -> the λ of LAMBDA_GRID (`params`' k and T) with the lowest validation
    perplexity at that subsample, from one deep retrieval over the validation split."""
    docs, policy, _ = decontaminated_docs(store, tok, a.corpus, "validation", tuple(store.manifest.tiers),
                                          a.max_tokens, max_doc_tokens=2048)
    neigh = retrieve_neighbours(model, store, docs, depth, a.window, a.stride, a.batch_size, pad, params.nprobe,
                                policy, a.progress, keep_top=params.skip_above < 1.0)
    out = {}
    for seed in range(a.seeds):
        for f in a.fractions:
            subs = [subsample_neighbours(n, f, seed, params.k)[0] for n in neigh]
            scored = [(perplexity([s.knn_logprob(replace(params, lam=lam)) for s in subs]), lam)
                      for lam in LAMBDA_GRID]
            out[(f, seed)] = min(scored)[1]
    return out


def scaling_curve(a: CurveArgs) -> list[dict]:
    """Rows (fraction, tokens, seed, mode, perplexity, …); also writes CSV and PNG into `a.out`."""

    if not a.fractions or any(not 0 < f <= 1 for f in a.fractions):
        raise ValueError(f"fractions must be in (0, 1], got {a.fractions}")
    model, tok = load_causal_lm(a.model)
    store = Datastore.open(a.store)
    store.check_model(a.model)
    params = (a.knn or KNNParams.merged(store.manifest.defaults, a.k, a.lam, a.temperature, a.nprobe)).validate()
    depth = max(a.depth, params.k)
    metas, docs = load_eval_docs(a.corpus, tok, a.split, tuple(store.manifest.tiers), max_tokens=a.max_tokens,
                                 max_doc_tokens=2048)
    if not docs:
        raise ValueError(f"no {a.split} documents of tiers {','.join(store.manifest.tiers)}")
    texts = [tok.decode(d, skip_special_tokens=True) for d in docs]
    deny, _ = store_exclusions(store, metas, texts, True)
    policy = with_denied(None, deny)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lams = (tuned_lambdas(model, tok, store, a, params, depth, pad)
            if a.tune_lambda and a.lam is None and a.knn is None else {})
    recall_keys = _raw_keys(store)
    neigh = retrieve_neighbours(model, store, docs, depth, a.window, a.stride, a.batch_size, pad, params.nprobe,
                                policy, a.progress, keep_queries=recall_keys is not None,
                                keep_top=params.skip_above < 1.0)
    walked = None  # the full store scored as `silo eval` scores it: pointer reuse walks, it is no subsample
    if params.reuse and store.can_refine:
        walked = retrieve_neighbours(model, store, docs, params.k, a.window, a.stride, a.batch_size, pad,
                                     params.nprobe, policy, refine=params.refine, reuse=params.reuse,
                                     skip_above=params.skip_above)
    live = np.repeat(store.doc_mask(policy), store.entries_per_doc)
    all_ids = np.flatnonzero(live)
    lm_ppl = perplexity([n.lm_logprob for n in neigh])
    rows = []
    for seed in range(a.seeds):
        for f in sorted(a.fractions):
            subs = [subsample_neighbours(n, f, seed, params.k) for n in neigh]
            p = replace(params, lam=lams.get((f, seed), params.lam))
            ppl = perplexity([s.knn_logprob(p) for s, _ in subs] if walked is None or f < 1.0
                             else [w.knn_logprob(p) for w in walked])
            satisfied = float(np.mean(np.concatenate([ok for _, ok in subs])))
            tokens = int(keep_mask(all_ids, f, seed).sum())
            row = {"fraction": f, "tokens": tokens, "seed": seed, "mode": "knn", "perplexity": ppl,
                   "k_satisfied": round(satisfied, 4), "ann_recall": "", "lambda": p.lam}
            if recall_keys is not None:
                row["ann_recall"] = round(_ann_recall(recall_keys, neigh, subs, f, seed, params.k, all_ids,
                                                      a.recall_queries), 4)
            rows.append(row)
    if a.passage_store:
        pstore = PassageStore.open(a.passage_store)
        pstore.check_model(a.model)
        rows += ric_scaling_rows(model, tok, pstore, docs, a.fractions, a.seeds, depth, a.window, a.batch_size, pad,
                                 with_denied(None, store_exclusions(pstore, metas, texts, True)[0]))
    rows.append({"fraction": 1.0, "tokens": len(all_ids), "seed": 0, "mode": "lm", "perplexity": lm_ppl,
                 "k_satisfied": "", "ann_recall": ""})
    if a.oracle:
        oracle, _ = load_causal_lm(a.oracle)
        o = perplexity(score_documents(oracle, docs, a.window, a.stride, a.batch_size, pad))
        rows.append({"fraction": 1.0, "tokens": len(all_ids), "seed": 0, "mode": "oracle", "perplexity": o,
                     "k_satisfied": "", "ann_recall": ""})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "scaling.csv")
    plot_curve(rows, out / "scaling.png", title=f"{Path(a.store).name}: kNN-LM perplexity vs datastore size "
               f"(k={params.k}, λ={'tuned per size' if lams else params.lam}, T={params.temperature})")
    return rows


def _raw_keys(store: Datastore) -> Datastore | None:
    """The store itself when it kept raw keys (fp16, memory-mapped) and uses an approximate index."""
    if store.manifest.index == "Flat":
        return None  # exact search: the trick is exact, nothing to measure
    return store if store.can_refine else None


def _ann_recall(store: Datastore, neigh, subs, fraction, seed, k, all_ids, n_queries) -> float:
    """Recall@k of the subsampled ANN lists against exact search over the kept raw keys."""
    kept = all_ids[keep_mask(all_ids, fraction, seed)]
    if len(kept) < k:
        return float("nan")
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(store.manifest.dim))
    for lo in range(0, len(kept), 1 << 18):  # the kept keys, a chunk at a time from the memory maps
        part = kept[lo : lo + (1 << 18)]
        index.add_with_ids(store.keys_of(part).astype(np.float32), part.astype(np.int64))
    rng = np.random.default_rng(seed)
    q = np.concatenate([n.queries for n in neigh])
    approx = np.concatenate([s.ids for s, _ in subs])
    rows = rng.choice(len(q), min(len(q), n_queries), replace=False)
    _, exact = index.search(q[rows], k)
    return float(np.mean([len(set(e) & set(a[a >= 0])) / k for e, a in zip(exact, approx[rows], strict=True)]))


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    cols = ["fraction", "tokens", "seed", "mode", "perplexity", "lambda", "k_satisfied", "ann_recall"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def plot_curve(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity vs datastore tokens (log x): mean and min–max band per mode, LM/oracle lines."""
    fig = Figure(figsize=(7, 4.5), dpi=120)  # no pyplot: no global backend, no GUI, nothing to close
    ax = fig.subplots()
    knn = [r for r in rows if r["mode"] == "knn"]
    for mode, color in (("knn", "tab:blue"), ("ric", "tab:green")):
        pts = [r for r in rows if r["mode"] == mode]
        if not pts:
            continue
        fr = sorted({r["fraction"] for r in pts})
        x = [np.mean([r["tokens"] for r in pts if r["fraction"] == f]) for f in fr]
        ys = [[r["perplexity"] for r in pts if r["fraction"] == f] for f in fr]
        ax.plot(x, [np.mean(y) for y in ys], "o-", color=color, label={"knn": "kNN-LM", "ric": "RIC-LM"}[mode])
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
    for mode, style in (("lm", "k--"), ("oracle", "r:")):
        for r in rows:
            if r["mode"] == mode and math.isfinite(r["perplexity"]):
                ax.axhline(r["perplexity"], linestyle=style[1:], color=style[0],
                           label=f"{'LM only' if mode == 'lm' else 'oracle LM'} ({r['perplexity']:.2f})")
    if knn:
        ax.set_xscale("log")
    ax.set_xlabel("datastore tokens (log scale)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
