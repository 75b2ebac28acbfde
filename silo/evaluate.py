"""Sliding-window perplexity, per document, so contexts never cross documents.

Each document is framed `<s> … </s>` and cut into windows of `window` tokens whose starts
are `stride` apart; a window scores only the tokens no earlier window scored, so every
token is scored exactly once and (past the first window) with at least
`window - stride` tokens of context. Windows of many documents are batched together.

`score_documents` yields per-token log-probs and, on request, the hidden states a
datastore keys on — the retrieval modes reuse the same windows, so every mode scores
exactly the same tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from silo.corpus import iter_documents
from silo.errors import SiloError
from silo.lm import load_causal_lm
from silo.progress import bar as progress_bar
from silo.tokenizer import encode_document


@dataclass
class Window:
    doc: int  # index of the document in the caller's list
    begin: int  # first input token (position in the document)
    end: int  # one past the last input token
    first_target: int  # first position (in the document) whose log-prob this window reports


def windows_for(n_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows that score positions 1..n_tokens-1 of one document exactly once."""
    assert 0 < stride <= window, (stride, window)
    out, scored_to, begin = [], 1, 0
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        out.append(Window(doc, begin, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
        # the next window's first target needs one token of context inside the window
        begin = min(begin + stride, scored_to - 1)
    return out


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def pad_batch(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) of token sequences; positions stay 0..len-1."""
    length = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        mask[r, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def score_documents(model, docs: list[list[int]], window: int = 512, stride: int = 256,
                    batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Natural-log probabilities of tokens 1..n-1 of each document (float64 arrays)."""
    model.eval()
    device = next(model.parameters()).device
    wins = [w for i, d in enumerate(docs) for w in windows_for(len(d), window, stride, i)]
    wins.sort(key=lambda w: w.end - w.begin)  # similar lengths together: little padding
    out = [np.zeros(max(len(d) - 1, 0), dtype=np.float64) for d in docs]
    for batch in progress_bar(list(batched(wins, batch_size)), desc="score", unit="batch", progress=progress):
        ids, mask = pad_batch([docs[w.doc][w.begin : w.end] for w in batch], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, w in enumerate(batch):
            # logits at input position t predict token t+1
            lo, hi = w.first_target - w.begin - 1, w.end - w.begin - 1
            targets = ids[r, lo + 1 : hi + 1].to(device)
            lp = logp[r, lo:hi].gather(-1, targets[:, None])[:, 0]
            out[w.doc][w.first_target - 1 : w.end - 1] = lp.double().cpu().numpy()
    return out


def perplexity(logprobs: Iterable[np.ndarray]) -> float:
    arrs = [a for a in logprobs if len(a)]
    n = sum(len(a) for a in arrs)
    if n == 0:
        return float("nan")
    return math.exp(-sum(float(a.sum()) for a in arrs) / n)


def load_eval_docs(corpus: str, tok, split: str = "test", tiers: Iterable[str] | None = None,
                   max_docs: int | None = None, max_tokens: int | None = None,
                   max_doc_tokens: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """Documents of one split (and tiers) with their token ids, capped for quick runs."""
    metas, docs, total = [], [], 0
    for doc in iter_documents(corpus, tiers=tiers, split=split, columns=["text", "source", "license"]):
        ids = encode_document(tok, doc["text"])
        if max_doc_tokens is not None:
            ids = ids[:max_doc_tokens]
        if len(ids) < 2:
            continue
        metas.append({k: doc[k] for k in ("doc_id", "source", "tier", "license")})
        docs.append(ids)
        total += len(ids) - 1
        if (max_docs is not None and len(docs) >= max_docs) or (max_tokens is not None and total >= max_tokens):
            break
    return metas, docs


def perplexity_report(metas: list[dict], logprobs: list[np.ndarray]) -> dict:
    """Overall perplexity and per-source / per-tier breakdown with token counts."""
    groups: dict[str, dict[str, list[np.ndarray]]] = {"source": defaultdict(list), "tier": defaultdict(list)}
    for m, lp in zip(metas, logprobs, strict=True):
        groups["source"][m["source"]].append(lp)
        groups["tier"][m["tier"]].append(lp)
    report = {
        "perplexity": perplexity(logprobs),
        "tokens": int(sum(len(a) for a in logprobs)),
        "documents": len(metas),
    }
    for kind, g in groups.items():
        report[kind] = {k: {"perplexity": perplexity(v), "tokens": int(sum(len(a) for a in v)), "documents": len(v)}
                        for k, v in sorted(g.items())}
    return report


def evaluate_lm(model, tok, corpus: str, split: str = "test", tiers: Iterable[str] | None = None,
                window: int = 512, stride: int = 256, batch_size: int = 8, max_docs: int | None = None,
                max_tokens: int | None = None, progress: bool = False, max_doc_tokens: int | None = 2048) -> dict:
    """`silo lm eval`: LM-only sliding-window perplexity over a split, per source and overall."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and window > max_pos:
        raise SiloError(f"window {window} is longer than the model's context ({max_pos})")
    # each document capped (its first max_doc_tokens tokens), so a token budget covers many documents
    metas, docs = load_eval_docs(corpus, tok, split, tiers, max_docs, max_tokens, max_doc_tokens)
    if not docs:
        raise SiloError(f"no documents in split {split!r}" + (f" for tiers {','.join(tiers)}" if tiers else ""))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lps = score_documents(model, docs, window, stride, batch_size, pad, progress)
    return perplexity_report(metas, lps)


def evaluate_model(model_dir: str, corpus: str, split: str = "test", tiers: Iterable[str] | None = None,
                   window: int = 512, stride: int = 256, batch_size: int = 8, max_docs: int | None = None,
                   max_tokens: int | None = None, progress: bool = False) -> dict:
    """`silo lm eval`: `evaluate_lm` of any local causal-LM folder."""
    model, tok = load_causal_lm(model_dir)
    return evaluate_lm(model, tok, corpus, split, tiers, window, stride, batch_size, max_docs, max_tokens, progress)
