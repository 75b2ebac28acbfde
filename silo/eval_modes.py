"""`silo eval`: LM-only, kNN-LM, RIC-LM and an oracle LM on exactly the same tokens.

Every mode scores positions 1..n-1 of the same documents (framed `<s> … </s>`), so the
perplexities compare directly; the share of the gap closed is SILO's:
(ppl_LM − ppl_kNN) / (ppl_LM − ppl_oracle).

Before scoring, the store is checked against the evaluation text: evaluation documents
found in the store (a split mistake) and store documents that copy evaluation text
(`silo.decontam`) are excluded through the retrieval policy, and both are reported.
`sweep_knn` picks k, λ and T on the validation split from a single retrieval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from datastore.lock import StoreLock
from datastore.manifest import FingerprintMismatch, Manifest, tokenizer_fingerprint
from datastore.passages import PassageStore
from datastore.policy import RetrievalPolicy
from datastore.store import Datastore
from silo.decontam import leaked_docs, store_contamination
from silo.errors import SiloError
from silo.evaluate import load_eval_docs, perplexity, perplexity_report, score_documents
from silo.knnlm import KNNParams, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.ricl import RICParams, ric_score_documents

MODES = ("lm", "knn", "ric")


@dataclass
class EvalArgs:
    model: str
    corpus: str
    store: str | None = None  # token store (knn)
    passage_store: str | None = None  # passage store (ric)
    split: str = "test"
    modes: tuple[str, ...] = ("lm", "knn")
    oracle: str | None = None
    tiers: tuple[str, ...] | None = None  # default: the store's tiers
    window: int = 512
    stride: int = 256
    batch_size: int = 8
    max_docs: int | None = None
    max_tokens: int | None = None
    max_doc_tokens: int | None = 2048  # each document's first tokens: a budget covers many documents
    knn: KNNParams | None = None  # default: the store's tuned defaults, else KNNParams()
    ric_stride: int = 64
    ric_retriever: str = "bm25"
    policy: RetrievalPolicy | None = None
    decontaminate: bool = True
    progress: bool = False


def store_knn_params(store: Datastore) -> KNNParams:
    return KNNParams.merged(store.manifest.defaults)


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


def run_eval(a: EvalArgs) -> dict:
    """Perplexity per mode (overall and per source), gap closed, and the checks made."""
    unknown = set(a.modes) - set(MODES)
    if unknown:
        raise SiloError(f"unknown mode(s) {', '.join(sorted(unknown))}; expected {', '.join(MODES)}")
    if "knn" in a.modes and not a.store:
        raise SiloError("mode knn needs a token store (--store)")
    if "ric" in a.modes and not a.passage_store:
        raise SiloError("mode ric needs a passage store (--passage-store)")
    model, tok = load_causal_lm(a.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    store = Datastore.open(a.store) if a.store else None
    if store is not None:
        store.check_model(a.model)
    pstore = None
    if a.passage_store:
        pstore = PassageStore.open(a.passage_store)
        pstore.check_model(a.model)
    ref = store or pstore
    tiers = a.tiers or (tuple(ref.manifest.tiers) if ref is not None else None)
    metas, docs = load_eval_docs(a.corpus, tok, a.split, tiers, a.max_docs, a.max_tokens, a.max_doc_tokens)
    if not docs:
        raise SiloError(f"no documents to evaluate in split {a.split!r}" + (f", tiers {','.join(tiers)}" if tiers else ""))
    texts = [tok.decode(d, skip_special_tokens=True) for d in docs]
    report: dict = {"split": a.split, "tiers": list(tiers) if tiers else None, "documents": len(docs),
                    "tokens": int(sum(len(d) - 1 for d in docs)), "checks": {}}
    per_mode: dict[str, list[np.ndarray]] = {}

    if "knn" in a.modes:
        deny, checks = store_exclusions(store, metas, texts, a.decontaminate)
        report["checks"]["token_store"] = checks
        params = (a.knn or store_knn_params(store)).validate()
        neigh = retrieve_neighbours(model, store, docs, params.k, a.window, a.stride, a.batch_size, pad,
                                    params.nprobe, with_denied(a.policy, deny), a.progress, refine=params.refine)
        per_mode["lm"] = [n.lm_logprob for n in neigh]
        per_mode["knn"] = [n.knn_logprob(params) for n in neigh]
        report["knn_params"] = {"k": params.k, "lambda": params.lam, "temperature": params.temperature,
                                "nprobe": params.nprobe, "refine": params.refine}
    if "lm" in a.modes and "lm" not in per_mode:
        per_mode["lm"] = score_documents(model, docs, a.window, a.stride, a.batch_size, pad, a.progress)
    if "ric" in a.modes:
        deny, checks = store_exclusions(pstore, metas, texts, a.decontaminate)
        report["checks"]["passage_store"] = checks
        rp = RICParams(stride=a.ric_stride, retriever=a.ric_retriever)
        per_mode["ric"] = ric_score_documents(model, tok, pstore, docs, a.window, rp, a.batch_size, pad,
                                              with_denied(a.policy, deny), a.progress)
        report["ric_params"] = {"stride": rp.stride, "query_tokens": rp.query_tokens, "passages": rp.passages,
                                "retriever": rp.retriever}
    if a.oracle:
        if tokenizer_fingerprint(a.oracle) != tokenizer_fingerprint(a.model):
            raise FingerprintMismatch(f"oracle {a.oracle} uses another tokenizer than {a.model}: "
                                      "perplexities would not be comparable")
        oracle, _ = load_causal_lm(a.oracle)
        per_mode["oracle"] = score_documents(oracle, docs, a.window, a.stride, a.batch_size, pad, a.progress)

    report["modes"] = {m: perplexity_report(metas, lps) for m, lps in per_mode.items()}
    for m, lps in per_mode.items():
        report[m] = perplexity(lps)
    if "oracle" in per_mode and "lm" in per_mode:
        for m in ("knn", "ric"):
            if m in per_mode:
                gap = report["lm"] - report["oracle"]
                report[f"gap_closed_{m}"] = (report["lm"] - report[m]) / gap if gap > 0 else float("nan")
        if "gap_closed_knn" in report:
            report["gap_closed"] = report["gap_closed_knn"]
    return report


def sweep_knn(model_dir: str, store_dir: str, corpus: str, split: str = "validation", window: int = 512,
              stride: int = 256, batch_size: int = 8, max_tokens: int | None = 20_000,
              ks: tuple[int, ...] = (8, 32, 128, 512), lams: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
              temps: tuple[float, ...] = (0.3, 1, 3, 10, 30, 100, 300), nprobe: int | None = 32,
              save: bool = True, progress: bool = False) -> dict:
    """`silo eval --sweep`: best (k, λ, T) on validation text from one retrieval at max k;
    with `save`, stored as the store's defaults in its manifest."""
    model, tok = load_causal_lm(model_dir)
    store = Datastore.open(store_dir)
    store.check_model(model_dir)
    metas, docs = load_eval_docs(corpus, tok, split, tuple(store.manifest.tiers), max_tokens=max_tokens,
                                 max_doc_tokens=2048)
    if not docs:
        raise SiloError(f"no {split} documents of tiers {','.join(store.manifest.tiers)} to tune on")
    texts = [tok.decode(d, skip_special_tokens=True) for d in docs]
    deny, checks = store_exclusions(store, metas, texts, True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    k_max = min(max(ks), max(store.n_entries, 1))
    neigh = retrieve_neighbours(model, store, docs, k_max, window, stride, batch_size, pad, nprobe,
                                with_denied(None, deny), progress)
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
    if save:  # under the store's lock, on the manifest as it is now (a compaction may have switched it)
        with StoreLock(store_dir, "tuning"):
            manifest = Manifest.load(store_dir)
            manifest.defaults = {k: result[k] for k in ("k", "lambda", "temperature", "nprobe")} | {
                "tuned_on": f"{split}, {result['tokens']} tokens", "validation_ppl_lm": round(lm_ppl, 4),
                "validation_ppl_knn": round(best[0], 4)}
            manifest.save(store_dir)
    return result
