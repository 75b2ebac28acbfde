"""`silo eval`: LM-only, kNN-LM, RIC-LM, ∞-gram and an oracle LM on exactly the same text.

Every mode scores positions 1..n-1 of the same documents (framed `<s> … </s>`), so the
perplexities compare directly; the share of the gap closed is SILO's:
(ppl_LM − ppl_mode) / (ppl_LM − ppl_oracle). Bits per byte (total negative log-likelihood
in bits over the text's UTF-8 bytes) are reported for every mode too: they compare models
with different tokenizers, so an oracle with another tokenizer (a user's Pythia, say) is
scored on the same text with its own tokens and the gap closed is computed in bits per byte.

Before scoring, the store is checked against the evaluation text: evaluation documents
found in the store (a split mistake) and store documents that copy evaluation text
(`silo.decontam`) are excluded through the retrieval policy, and both are reported.
`sweep_knn` picks k, λ and T on the validation split from a single retrieval;
`sweep_infgram` picks the ∞-gram λ per suffix length.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from silo.datastore.infgram import InfgramStore
from silo.datastore.kinds import open_store
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, tokenizer_fingerprint
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore
from silo.decontam import leaked_docs, store_contamination
from silo.errors import SiloError
from silo.evaluate import load_eval_docs, perplexity, perplexity_report, score_documents
from silo.infgram import InfgramParams, infgram_perplexity, score_infgram, sweep_lambdas
from silo.knnlm import KNNParams, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.retomaton import REUSED, SKIPPED
from silo.ricl import RICParams, ric_score_documents
from silo.tokenizer import encode_document

MODES = ("lm", "knn", "ric", "infgram")
MODE_STORE = {"knn": "token", "ric": "passage", "infgram": "infgram"}  # the store kind each mode uses


@dataclass
class EvalArgs:
    model: str
    corpus: str
    stores: tuple[str, ...] = ()  # any stores; each mode uses the one of its kind (MODE_STORE)
    split: str = "test"
    modes: tuple[str, ...] = ("lm", "knn")
    oracle: str | None = None  # any local causal LM; another tokenizer is compared in bits per byte
    tiers: tuple[str, ...] | None = None  # default: the stores' tiers
    window: int = 512
    stride: int = 256
    batch_size: int = 8
    max_docs: int | None = None
    max_tokens: int | None = None
    max_doc_tokens: int | None = 2048  # each document's first tokens: a budget covers many documents
    knn: KNNParams | None = None  # default: the overrides below over the store's tuned defaults
    infgram: InfgramParams | None = None  # default: `infgram_lambda`, else the ∞-gram store's tuned defaults
    k: int | None = None  # overrides of single kNN-LM parameters (None = the store's default)
    lam: float | None = None
    temperature: float | None = None
    nprobe: int | None = None
    refine: int | None = None
    reuse: int | None = None
    skip_above: float | None = None
    infgram_lambda: float | None = None
    sweep: bool = False  # first tune the token / ∞-gram stores' parameters on the validation split
    save_defaults: bool = False  # with sweep: save the tuned values in each store's manifest as its defaults
    ric_stride: int = 64
    ric_retriever: str | None = None  # bm25, dense or hybrid; None: the passage store's default
    policy: RetrievalPolicy | None = None
    decontaminate: bool = True
    progress: bool = False


def stores_by_kind(paths: tuple[str, ...] | list[str], model_dir: str, kinds: set[str] | None = None) -> dict:
    """Open the given stores, one per kind (checked against the model)."""
    out: dict[str, Datastore] = {}
    for path in paths:
        kind = Manifest.load(path).kind
        if kind in out:
            raise SiloError(f"two {kind} stores given ({out[kind].path} and {path}): give one store per kind")
        if kinds is None or kind in kinds:
            out[kind] = open_store(path)
            out[kind].check_model(model_dir)
    return out


def store_exclusions(store: Datastore, metas: list[dict], texts: list[str], decontaminate: bool) -> tuple[set, dict]:
    """Store documents to keep out of an evaluation: evaluation documents found in the store,
    and store documents that copy evaluation text; with the counts, for the report."""
    leaked = leaked_docs(store, [m["doc_id"] for m in metas])
    dropped = store_contamination(store, texts) if decontaminate else {}
    return set(leaked) | set(dropped), {"leaked_eval_docs": len(leaked), "decontaminated_store_docs": len(dropped)}


def with_denied(policy: RetrievalPolicy | None, deny: set) -> RetrievalPolicy | None:
    """`policy` that also denies the documents `deny` (decontamination drops)."""
    if not deny:
        return policy
    policy = policy or RetrievalPolicy()
    return replace(policy, deny_doc_ids=frozenset(policy.deny_doc_ids | deny))


def _bits(logprobs: list[np.ndarray]) -> float:
    return -float(sum(lp.sum() for lp in logprobs)) / math.log(2)


def run_eval(a: EvalArgs) -> dict:
    """Perplexity and bits per byte per mode (overall and per source), the gap each mode
    closes towards the oracle, and the checks made. Every mode scores the same tokens."""
    unknown = set(a.modes) - set(MODES)
    if unknown:
        raise SiloError(f"unknown mode(s) {', '.join(sorted(unknown))}; expected {', '.join(MODES)}")
    wanted = {MODE_STORE[m] for m in a.modes if m in MODE_STORE}
    stores = stores_by_kind(a.stores, a.model, wanted)
    for m in a.modes:
        if m in MODE_STORE and MODE_STORE[m] not in stores:
            raise SiloError(f"mode {m} needs a {MODE_STORE[m]} store (--store)")
    model, tok = load_causal_lm(a.model)
    sweeps = {}
    if a.sweep:  # tune on validation text (saved as the stores' defaults if asked), then evaluate with them
        tune = dict(window=a.window, stride=a.stride, batch_size=a.batch_size, max_tokens=a.max_tokens or 20_000,
                    progress=a.progress, save=a.save_defaults)
        if "token" in stores:
            sweeps["knn"] = sweep_knn(model, tok, stores["token"], a.corpus, nprobe=a.nprobe or 32, refine=a.refine,
                                      **tune)
        if "infgram" in stores:
            sweeps["infgram"] = sweep_infgram(model, tok, stores["infgram"], a.corpus, **tune)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ref = next(iter(stores.values()), None)
    tiers = a.tiers or (tuple(ref.manifest.tiers) if ref is not None else None)
    metas, docs = load_eval_docs(a.corpus, tok, a.split, tiers, a.max_docs, a.max_tokens, a.max_doc_tokens)
    if not docs:
        raise SiloError(f"no documents to evaluate in split {a.split!r}" + (f", tiers {','.join(tiers)}" if tiers else ""))
    texts = [tok.decode(d, skip_special_tokens=True) for d in docs]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    report: dict = {"split": a.split, "tiers": list(tiers) if tiers else None, "documents": len(docs),
                    "tokens": int(sum(len(d) - 1 for d in docs)), "bytes": n_bytes, "checks": {}}
    per_mode: dict[str, list[np.ndarray]] = {}

    def policy_for(kind: str) -> RetrievalPolicy | None:
        deny, checks = store_exclusions(stores[kind], metas, texts, a.decontaminate)
        report["checks"][f"{kind}_store"] = checks
        return with_denied(a.policy, deny)

    if "knn" in a.modes:
        store = stores["token"]
        params = (a.knn or KNNParams.merged(store.manifest.defaults, a.k, a.lam, a.temperature, a.nprobe,
                                            a.refine, a.reuse, a.skip_above)).validate()
        neigh = retrieve_neighbours(model, store, docs, params.k, a.window, a.stride, a.batch_size, pad,
                                    params.nprobe, policy_for("token"), a.progress, refine=params.refine,
                                    reuse=params.reuse, skip_above=params.skip_above)
        per_mode["lm"] = [n.lm_logprob for n in neigh]
        per_mode["knn"] = [n.knn_logprob(params) for n in neigh]
        how = np.bincount(np.concatenate([n.how for n in neigh] or [np.zeros(0, np.int8)]), minlength=3)
        report["knn_params"] = {"k": params.k, "lambda": params.lam, "temperature": params.temperature,
                                "nprobe": params.nprobe, "refine": params.refine, "reuse": params.reuse,
                                "skip_above": params.skip_above,
                                "searched": int(how[0]), "reused": int(how[1]), "skipped": int(how[2])}
    if "lm" not in per_mode and ("lm" in a.modes or "infgram" in a.modes):
        per_mode["lm"] = score_documents(model, docs, a.window, a.stride, a.batch_size, pad, a.progress)
    if "infgram" in a.modes:
        store = stores["infgram"]
        params = (a.infgram or InfgramParams.merged(store.manifest.defaults, a.infgram_lambda)).validate()
        scored = score_infgram(model, store, docs, policy=policy_for("infgram"), lm_logprobs=per_mode["lm"])
        per_mode["infgram"] = [s.logprob(params) for s in scored]
        report["infgram_params"] = {"lambda": params.lam, "lambda_by_suffix": [list(x) for x in params.lam_by_suffix],
                                    "mean_suffix_tokens": float(np.mean(np.concatenate([s.suffix_len for s in scored])))}
    if "ric" in a.modes:
        rp = RICParams(stride=a.ric_stride, retriever=a.ric_retriever)
        per_mode["ric"] = ric_score_documents(model, tok, stores["passage"], docs, a.window, rp, a.batch_size, pad,
                                              policy_for("passage"), a.progress)
        report["ric_params"] = {"stride": rp.stride, "query_tokens": rp.query_tokens, "passages": rp.passages,
                                "retriever": rp.retriever}
    if sweeps:
        report["sweeps"] = sweeps
    if "lm" not in a.modes and "lm" in per_mode and a.oracle is None:
        del per_mode["lm"]
    report["modes"] = {m: perplexity_report(metas, lps) for m, lps in per_mode.items()}
    for m, lps in per_mode.items():
        report[m] = perplexity(lps)
        report.setdefault("bits_per_byte", {})[m] = _bits(lps) / n_bytes
    if a.oracle:
        same = tokenizer_fingerprint(a.oracle) == tokenizer_fingerprint(a.model)
        oracle, otok = load_causal_lm(a.oracle)
        # the same text: the same tokens when the tokenizers match, else the oracle's tokens of it
        odocs = docs if same else [encode_document(otok, t) for t in texts]
        opad = otok.pad_token_id if otok.pad_token_id is not None else 0
        olps = score_documents(oracle, odocs, a.window, a.stride, a.batch_size, opad, a.progress)
        report["oracle"] = perplexity(olps)
        report["bits_per_byte"]["oracle"] = _bits(olps) / n_bytes
        report["oracle_tokenizer"] = "same" if same else "other (perplexity per its own tokens; compare bits per byte)"
        if same:
            report["modes"]["oracle"] = perplexity_report(metas, olps)
        bpb = report["bits_per_byte"]
        for m in ("knn", "ric", "infgram"):
            if m in per_mode and "lm" in per_mode:
                if same:
                    gap = report["lm"] - report["oracle"]
                    report[f"gap_closed_{m}"] = (report["lm"] - report[m]) / gap if gap > 0 else float("nan")
                gap = bpb["lm"] - bpb["oracle"]
                report[f"gap_closed_bpb_{m}"] = (bpb["lm"] - bpb[m]) / gap if gap > 0 else float("nan")
        if "gap_closed_knn" in report:
            report["gap_closed"] = report["gap_closed_knn"]
    return report


def decontaminated_docs(store: Datastore, tok, corpus: str, split: str, tiers: tuple[str, ...],
                        max_tokens: int | None, max_doc_tokens: int | None = None,
                        ) -> tuple[list[list[int]], RetrievalPolicy | None, dict]:
    """Evaluation documents of `split` (token ids) and the policy that keeps the store's
    copies of them out (leaked documents and near-copies), with the counts for a report:
    what tuning and the benchmarks score, exactly as `silo eval` does."""
    metas, docs = load_eval_docs(corpus, tok, split, tiers, max_tokens=max_tokens, max_doc_tokens=max_doc_tokens)
    if not docs:
        raise SiloError(f"no {split} documents of tiers {','.join(tiers)} to tune on")
    deny, checks = store_exclusions(store, metas, [tok.decode(d, skip_special_tokens=True) for d in docs], True)
    return docs, with_denied(None, deny), checks


def save_defaults(store: Datastore, defaults: dict) -> None:
    """A store's tuned defaults, written under its lock onto the manifest as it is now (a
    compaction or ingest may have switched it since the store was opened), and used by the
    open store from now on."""
    with StoreLock(store.path, "tuning"):
        manifest = Manifest.load(store.path)
        manifest.defaults = defaults
        manifest.save(store.path)
    store.manifest.defaults = defaults


def _keep_defaults(store: Datastore, defaults: dict, save: bool, result: dict) -> None:
    """Tuned values: saved in the store's manifest (`result["saved_to"]` says where), or used
    by this open store only, for the evaluation that follows, leaving its files untouched."""
    if save:
        save_defaults(store, defaults)
        result["saved_to"] = str(Path(store.path) / "manifest.json")
    else:
        store.manifest.defaults = defaults


def sweep_infgram(model, tok, store: InfgramStore, corpus: str, split: str = "validation", window: int = 512,
                  stride: int = 256, batch_size: int = 8, max_tokens: int | None = 20_000, save: bool = True,
                  progress: bool = False) -> dict:
    """`silo eval --sweep` for an ∞-gram store (of this model): λ per suffix-length bucket on
    validation text; with `save`, stored as the store's defaults in its manifest."""
    docs, policy, checks = decontaminated_docs(store, tok, corpus, split, tuple(store.manifest.tiers), max_tokens,
                                               max_doc_tokens=2048)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scored = score_infgram(model, store, docs, window, stride, batch_size, pad, policy, progress)
    params, detail = sweep_lambdas(scored)
    lm_ppl = perplexity([s.lm_logprob for s in scored])
    best = infgram_perplexity(scored, params)
    if not math.isfinite(best):
        raise SiloError("sweep found no finite perplexity")
    result = {"lm": lm_ppl, "infgram": best, "lambda": params.lam,
              "lambda_by_suffix": [list(x) for x in params.lam_by_suffix], "split": split,
              "tokens": int(sum(len(d) - 1 for d in docs)), "checks": checks, "buckets": detail["buckets"]}
    _keep_defaults(store, {"lambda": params.lam, "lambda_by_suffix": result["lambda_by_suffix"],
                           "tuned_on": f"{split}, {result['tokens']} tokens",
                           "validation_ppl_lm": round(lm_ppl, 4), "validation_ppl_infgram": round(best, 4)},
                   save, result)
    return result


# adaptive retrieval and pointer reuse (silo.retomaton) are kept where they cost at most this
# share of the validation perplexity of the same neighbours searched at every token
SEARCH_LESS_TOLERANCE = 0.01
SKIP_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # LM top probabilities above which no search runs
REUSE_GRID = (1, 2, 4, 8, 16, 32)  # pointers that must advance for a token to skip its search (most reuse first)


def sweep_knn(model, tok, store: Datastore, corpus: str, split: str = "validation", window: int = 512,
              stride: int = 256, batch_size: int = 8, max_tokens: int | None = 20_000,
              ks: tuple[int, ...] = (8, 32, 128, 512), lams: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
              temps: tuple[float, ...] = (0.3, 1, 3, 10, 30, 100, 300), nprobe: int | None = 32,
              refine: int | None = None, save: bool = True, progress: bool = False,
              search_less: bool = True) -> dict:
    """`silo eval --sweep`: best (k, λ, T) for a token store (of this model) on validation
    text from one retrieval at max k (at `nprobe`, re-ranking `refine`·k candidates exactly
    when given); with `save`, stored with that nprobe and refine factor as the store's
    defaults in its manifest. With `search_less`, then the lowest LM confidence above which
    the search is skipped (from the same retrieval), and the fewest advancing pointers that
    replace a search (one more retrieval per value tried, stores with kept keys), each kept
    only within `SEARCH_LESS_TOLERANCE` of the perplexity of searching at every token."""
    docs, policy, checks = decontaminated_docs(store, tok, corpus, split, tuple(store.manifest.tiers), max_tokens,
                                               max_doc_tokens=2048)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    k_max = min(max(ks), max(store.n_entries, 1))
    neigh = retrieve_neighbours(model, store, docs, k_max, window, stride, batch_size, pad, nprobe, policy, progress,
                                refine=refine, keep_top=search_less)
    lm_ppl = perplexity([n.lm_logprob for n in neigh])
    grid = []
    for k, lam, t in itertools.product([k for k in ks if k <= k_max] or [k_max], lams, temps):
        p = KNNParams(k=k, lam=lam, temperature=t, nprobe=nprobe)
        grid.append((perplexity([n.knn_logprob(p) for n in neigh]), k, lam, t))
    best = min(grid)
    result = {"lm": lm_ppl, "knn": best[0], "k": best[1], "lambda": best[2], "temperature": best[3],
              "nprobe": nprobe, "split": split, "tokens": int(sum(len(d) - 1 for d in docs)), "checks": checks,
              "grid_size": len(grid)}
    if not math.isfinite(best[0]):  # checked before anything is saved: never store broken defaults
        raise SiloError("sweep found no finite perplexity")
    chosen = {k: result[k] for k in ("k", "lambda", "temperature", "nprobe")} | ({"refine": refine} if refine else {})
    if search_less:
        params = KNNParams(k=best[1], lam=best[2], temperature=best[3], nprobe=nprobe, refine=refine)
        chosen |= tune_search_less(model, store, docs, neigh, params, best[0], window, stride, batch_size, pad, policy,
                                   result)
    _keep_defaults(store, chosen | {"tuned_on": f"{split}, {result['tokens']} tokens",
                                    "validation_ppl_lm": round(lm_ppl, 4), "validation_ppl_knn": round(best[0], 4)},
                   save, result)
    return result


def tune_search_less(model, store: Datastore, docs: list[list[int]], neigh: list, params: KNNParams,
                     full_ppl: float, window: int, stride: int, batch_size: int, pad: int,
                     policy: RetrievalPolicy | None, result: dict) -> dict:
    """`skip_above` and `reuse` for `params` (tuned k, λ, T) on the sweep's text: the most
    searches saved within `SEARCH_LESS_TOLERANCE` of `full_ppl`; what each value cost goes
    into `result` (perplexity, share of tokens not searched)."""
    bound = full_ppl * (1 + SEARCH_LESS_TOLERANCE)
    tops = np.concatenate([n.lm_top for n in neigh])
    skip, tried = 1.0, []
    for t in SKIP_GRID:
        ppl = perplexity([n.knn_logprob(replace(params, skip_above=t)) for n in neigh])
        tried.append({"skip_above": t, "ppl": round(ppl, 4), "skipped": round(float((tops >= t).mean()), 4)})
        if ppl <= bound:
            skip = t
            break
    result["skip_grid"], result["skip_above"] = tried, skip
    reuse, tried = 0, []
    if store.can_refine:
        for r in (r for r in REUSE_GRID if r <= params.k):
            found = retrieve_neighbours(model, store, docs, params.k, window, stride, batch_size, pad, params.nprobe,
                                        policy, refine=params.refine, reuse=r, skip_above=skip)
            p = replace(params, reuse=r, skip_above=skip)
            ppl = perplexity([n.knn_logprob(p) for n in found])
            how = np.concatenate([n.how for n in found])
            tried.append({"reuse": r, "ppl": round(ppl, 4), "reused": round(float((how == REUSED).mean()), 4),
                          "skipped": round(float((how == SKIPPED).mean()), 4)})
            if ppl <= bound:  # the first within the bound saves the most searches: one pass when it is 1
                reuse = r
                break
    result["reuse_grid"], result["reuse"] = tried, reuse
    return {"skip_above": skip, "reuse": reuse}
