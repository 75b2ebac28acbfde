"""Membership inference from a model's weights: Min-K% Prob and Min-K%++.

The training record (`silo.provenance`) answers exactly for the models SILO trains. For
any checkpoint, and to check that the record's claim shows in the weights, the model can
be asked directly:

- **Min-K% Prob** (Shi et al., 2023): the mean log-probability of the text's k% least
  likely tokens (k = 20%); text seen in training has fewer very unlikely tokens.
- **Min-K%++** (Zhang et al., 2024): each token's log-probability standardised by the
  model's own next-token distribution at that position, (log p(x_t) − μ_t) / σ_t with
  μ_t = E_{z~p}[log p(z)] and σ_t² = Var_{z~p}[log p(z)]; then the mean of the lowest k%.
  A token at a local maximum of the likelihood (a memorised one) scores high.

Higher is "more likely a member" for both. A score alone means little; it is calibrated
against **reference non-members**: held-out documents (test split) that the training record
proves were never trained on, and the text's percentile among them is reported.

`membership_auroc` measures how well each score separates members (training-split documents
of the trained tiers, in the record) from non-members (test-split documents of the same
tiers), with a bootstrap 95% interval: ≈ 0.5 means the weights do not tell them apart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from silo.corpus import iter_documents
from silo.errors import SiloError
from silo.lm import load_causal_lm
from silo.progress import bar as progress_bar
from silo.provenance import TrainingRecord
from silo.tokenizer import text_ids

DEFAULT_K = 0.2
MIN_TOKENS = 8  # shorter texts say too little to score
MAX_CHECKED_DOCUMENTS = 4  # a removal's documents scored by `membership_check` (one forward pass each)


@dataclass
class MembershipScores:
    tokens: int
    min_k: float
    min_k_pp: float
    mean_logprob: float  # the plain loss attack (Min-K% at k = 100%)


@torch.no_grad()
def token_statistics(model, ids: list[int], bos_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p(x_t), μ_t, σ_t) for every token of `ids` after [BOS], in one forward pass of at
    most the model's context (longer texts are cut to their first window)."""
    window = model.config.max_position_embeddings
    seq = ([bos_id] if bos_id is not None else []) + list(ids)
    seq = seq[:window]
    x = torch.tensor([seq], dtype=torch.long)
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    target = x[0, 1:]
    tok_lp = logp.gather(1, target[:, None])[:, 0]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
    return tok_lp.double().numpy(), mu.double().numpy(), sigma.double().numpy()


def _lowest_mean(x: np.ndarray, k: float) -> float:
    n = max(1, math.ceil(k * len(x)))
    return float(np.sort(x)[:n].mean())


def score_text(model, tok, text: str, k: float = DEFAULT_K) -> MembershipScores | None:
    """Min-K% and Min-K%++ of a text; None when it has fewer than MIN_TOKENS tokens."""
    return score_ids(model, tok, text_ids(tok, text), k)


def score_ids(model, tok, ids: list[int], k: float = DEFAULT_K) -> MembershipScores | None:
    """`score_text` of a text already tokenized (`text_ids`)."""
    if not 0 < k <= 1:
        raise SiloError(f"k must be in (0, 1], not {k}")
    if len(ids) < MIN_TOKENS:
        return None
    lp, mu, sigma = token_statistics(model, ids, tok.bos_token_id)
    return MembershipScores(len(lp), _lowest_mean(lp, k), _lowest_mean((lp - mu) / sigma, k), float(lp.mean()))


def auroc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half (Mann–Whitney U)."""
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if not len(m) or not len(n):
        raise SiloError("an AUROC needs members and non-members")
    ranks = _ranks(np.concatenate([m, n]))
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def bootstrap_interval(members: np.ndarray, nonmembers: np.ndarray, rounds: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the AUROC (both groups resampled)."""
    rng = np.random.default_rng(seed)
    m, n = np.asarray(members), np.asarray(nonmembers)
    stats = [auroc(rng.choice(m, len(m)), rng.choice(n, len(n))) for _ in range(rounds)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _documents(corpus: str | os.PathLike, tiers: tuple[str, ...] | None, split: str, n: int,
               never_trained: TrainingRecord | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (doc id, text) drawn uniformly from a split (reservoir sampling: a corpus is stored
    in harvest order, by source, so its first documents are not a sample of it); with
    `never_trained`, only documents that record proves were not trained on."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    seen = 0
    for doc in iter_documents(corpus, tiers=tiers, split=split):
        if never_trained is not None and never_trained.has_document(doc["doc_id"]):
            continue
        seen += 1
        if len(out) < n:
            out.append((doc["doc_id"], doc["text"]))
        elif (j := int(rng.integers(seen))) < n:
            out[j] = (doc["doc_id"], doc["text"])
    return out


def _scored(model, tok, docs: list[tuple[str, str]], k: float, desc: str, progress: bool) -> np.ndarray:
    rows = [score_text(model, tok, text, k) for _, text in progress_bar(docs, desc=desc, unit="doc",
                                                                           progress=progress, total=len(docs))]
    return np.array([(r.min_k, r.min_k_pp) for r in rows if r is not None], np.float64).reshape(-1, 2)


def membership_auroc(model_dir: str | os.PathLike, corpus: str | os.PathLike, tiers: tuple[str, ...],
                     n: int = 200, k: float = DEFAULT_K, progress: bool = False, loaded: tuple | None = None) -> dict:
    """The train split of `tiers` (members, if the model trained on those tiers) against the
    test split (non-members; with a record, proved never trained on) under Min-K% and
    Min-K%++: AUROC with a bootstrap 95% interval for each. On tiers the model never trained
    on, both sides are non-members and the AUROC should be ≈ 0.5; `in_record` says how many
    of the "members" the training record holds."""
    model, tok = loaded or load_causal_lm(model_dir)
    record = TrainingRecord.open(model_dir)
    members = _documents(corpus, tiers, "train", n)
    nonmembers = _documents(corpus, tiers, "test", n, never_trained=record)
    if not members or not nonmembers:
        raise SiloError(f"tiers {','.join(tiers)}: {len(members)} train and {len(nonmembers)} test documents; "
                        "an AUROC needs both")
    sm = _scored(model, tok, members, k, "members", progress)
    sn = _scored(model, tok, nonmembers, k, "non-members", progress)
    out = {"tiers": list(tiers), "members": len(sm), "nonmembers": len(sn), "k": k, "record": record is not None,
           "in_record": None if record is None else sum(record.has_document(d) for d, _ in members)}
    for i, name in enumerate(("min_k", "min_k_pp")):
        lo, hi = bootstrap_interval(sm[:, i], sn[:, i])
        out[name] = {"auroc": round(auroc(sm[:, i], sn[:, i]), 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out


@dataclass
class Reference:
    """Min-K% and Min-K%++ of reference documents: what the model's scores look like on text
    it did not train on. `proven`: the training record proves every one a non-member; for a
    checkpoint without a record, the operator vouches for them (e.g. text written after it)."""

    scores: np.ndarray  # (n, 2): min_k, min_k_pp
    corpus: str
    proven: bool

    def __post_init__(self) -> None:
        assert self.scores.ndim == 2 and self.scores.shape[1] == 2 and len(self.scores), self.scores.shape

    @property
    def documents(self) -> int:
        return len(self.scores)

    @property
    def label(self) -> str:
        return "held-out non-members" if self.proven else "reference documents (not proven non-members)"

    def percentiles(self, s: MembershipScores) -> tuple[float, float]:
        """The Min-K% and Min-K%++ percentiles of `s` among the reference."""
        return percentile(self.scores[:, 0], s.min_k), percentile(self.scores[:, 1], s.min_k_pp)


def load_reference(model, tok, model_dir: str | os.PathLike, corpus: str | os.PathLike | None = None,
                   tiers: tuple[str, ...] | None = None, n: int = 100, k: float = DEFAULT_K) -> Reference | None:
    """The reference of `model_dir`: test-split documents of the record's corpus and tiers (or
    of `corpus`), never trained on by the record; None when there is no corpus to draw from."""
    record = TrainingRecord.open(model_dir)
    if corpus is None and record is not None:
        corpus = record.record["corpus"]
    if corpus is None or not os.path.isdir(corpus):
        return None
    tiers = tiers or (tuple(record.record["tiers"]) if record else None)
    docs = _documents(corpus, tiers, "test", n, never_trained=record)
    scores = _scored(model, tok, docs, k, "reference", False)
    return Reference(scores, str(corpus), record is not None) if len(scores) else None


def percentile(reference: np.ndarray, value: float) -> float:
    """The share of reference non-members scoring below `value`, in percent."""
    return float(100.0 * (np.asarray(reference) < value).mean())


def weights_audit(model_dir: str | os.PathLike, texts: list[tuple[str, str]], k: float = DEFAULT_K,
                  reference_corpus: str | os.PathLike | None = None, reference_n: int = 100,
                  loaded: tuple | None = None) -> list[dict | None]:
    """Per text: its Min-K% and Min-K%++ and, where reference documents exist, their
    percentiles among them (None for a text under MIN_TOKENS tokens)."""
    model, tok = loaded or load_causal_lm(model_dir)
    reference = load_reference(model, tok, model_dir, reference_corpus, n=reference_n, k=k)
    out = []
    for _, text in texts:
        s = score_text(model, tok, text, k)
        if s is None:
            out.append(None)
            continue
        row = {"tokens": s.tokens, "min_k": round(s.min_k, 4), "min_k_pp": round(s.min_k_pp, 4), "k": k,
               "reference_documents": 0 if reference is None else reference.documents}
        if reference is not None:
            p, pp = reference.percentiles(s)
            row |= {"min_k_percentile": round(p, 1), "min_k_pp_percentile": round(pp, 1),
                    "reference_proven": reference.proven}
        out.append(row)
    return out


def membership_check(model, tok, reference: Reference | None, texts: dict[str, str], k: float = DEFAULT_K) -> dict:
    """The weights' side of a removal for a checkpoint without a training record: the removed
    documents' texts still held (doc id -> text; at most MAX_CHECKED_DOCUMENTS scored, each
    on the model's first window) scored with Min-K%++ among the reference. Returns the
    highest percentile, or `why` there is none (`WeightsCheck.membership`)."""
    if reference is None:
        return {"why": "no reference documents to compare the weights' scores with (start the server with "
                       "--membership-reference CORPUS)"}
    window = getattr(model.config, "max_position_embeddings", 2048)
    scored, best = [], None
    for doc_id, text in list(texts.items())[:MAX_CHECKED_DOCUMENTS]:
        s = score_text(model, tok, text[: window * 16], k)  # a window's tokens are in far fewer characters
        if s is None:
            continue
        p = reference.percentiles(s)[1]
        best = p if best is None else max(best, p)
        scored.append(doc_id)
    if not scored:
        return {"why": "no text of the removed documents is held here any more (compacted) or long enough to "
                       "score: send it to Audit with membership to ask the weights"}
    return {"percentile": round(best, 1), "reference_documents": reference.documents,
            "reference_proven": reference.proven, "scored_doc_ids": scored}
