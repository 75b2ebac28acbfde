"""RIC-LM (In-Context RALM): retrieved passages put in front of the context, no look-ahead.

Targets 1..n-1 of each document are scored in blocks of `stride` tokens. For the block
whose first target is position p:

- query = the text of the last `query_tokens` tokens *before* p (decoded without special
  tokens) — never the block itself; an empty query (the document start) retrieves nothing;
- the top `passages` passages are retrieved (one batched search over every block), each
  tokenized, cut to `max_passage_tokens` and framed `<s> passage </s>` like a document of
  the packed training stream; several go worst first, so the best sits next to the text;
- input = passages + the document's tokens up to p+stride-1, cut from the *left* of the
  document so the whole fits `window` (passages are shortened first if even the block
  alone would not fit); only the block's tokens are scored.

The tokens scored are exactly those of `silo.evaluate.score_documents`, so perplexities of
LM-only, kNN-LM and RIC-LM are comparable. Forwards are batched (right padding, attention
mask, similar lengths together).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from silo.datastore.passages import SEARCH_RETRIEVERS
from silo.embed import passage_search
from silo.errors import SiloError
from silo.evaluate import batched, pad_batch
from silo.knnlm import GeneratedToken, prompt_tokens, sample_token, top_tokens
from silo.tokenizer import StreamDecoder, text_ids


@dataclass
class RICParams:
    stride: int = 64  # tokens scored per retrieval
    query_tokens: int = 32  # tokens before the block that form the query
    passages: int = 1  # passages put in front
    max_passage_tokens: int = 256  # each passage cut to this many tokens
    retriever: str | None = None  # bm25, dense or hybrid; None: the store's default

    def validate(self, window: int) -> RICParams:
        for name in ("stride", "query_tokens", "passages", "max_passage_tokens"):
            if getattr(self, name) < 1:
                raise SiloError(f"RIC-LM {name} must be positive, got {getattr(self, name)}")
        if self.retriever is not None and self.retriever not in SEARCH_RETRIEVERS:
            raise SiloError(f"unknown retriever {self.retriever!r}; expected one of {', '.join(SEARCH_RETRIEVERS)}")
        if self.stride > window:
            raise SiloError(f"RIC-LM stride {self.stride} leaves no room in window {window}")
        return self


@dataclass
class RICBlock:
    """One scored block: which targets, which query, which passages were put in front."""

    doc: int  # index into the caller's documents
    start: int  # first target position (in the document)
    end: int  # one past the last target
    query: str  # the retrieval query ('' = none made)
    passage_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # best first
    passage_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    context_begin: int = 0  # first document token in the input (left truncation)
    prefix_tokens: int = 0  # tokens of passages in front of the document context


def ric_blocks(n_tokens: int, stride: int) -> int:
    """How many blocks (each one retrieval and one forward of up to `window` tokens) a
    document of `n_tokens` tokens is scored in: what a server checks against its caps
    before any of them runs."""
    return len(range(1, n_tokens, max(stride, 1)))


def _blocks(tok, docs: list[list[int]], p: RICParams) -> list[RICBlock]:
    out = []
    for i, d in enumerate(docs):
        for start in range(1, len(d), p.stride):
            q = d[max(0, start - p.query_tokens) : start]  # strictly before the block
            text = tok.decode(q, skip_special_tokens=True)
            out.append(RICBlock(i, start, min(start + p.stride, len(d)), text if text.strip() else ""))
    return out


def ric_prefix(passages: list[list[int]], bos: list[int], eos: list[int], limit: int) -> list[int]:
    """Passages (given best first) framed as documents, worst first, cut from the left to `limit`."""
    ids: list[int] = []
    for ptoks in reversed(passages):
        ids += bos + ptoks + eos
    return ids[len(ids) - limit :] if len(ids) > limit else ids


@torch.no_grad()
def ric_score_documents(model, tok, store, docs: list[list[int]], window: int = 512,
                        params: RICParams | None = None, batch_size: int = 8, pad_id: int = 0,
                        policy=None, progress: bool = False, return_blocks: bool = False):
    """Natural-log probabilities of tokens 1..n-1 of each document (float64 arrays) with
    retrieved passages in context; with `return_blocks`, also the `RICBlock`s (query and
    passage ids of every block, for attribution)."""
    p = (params or RICParams()).validate(window)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and window > max_pos:
        raise SiloError(f"window {window} is longer than the model's context ({max_pos})")
    model.eval()
    device = next(model.parameters()).device
    blocks = _blocks(tok, docs, p)

    asked = [b for b in blocks if b.query]
    if asked:  # one batched retrieval for every block
        scores, ids = passage_search(store, [b.query for b in asked], p.passages, policy=policy,
                                     retriever=p.retriever, model=model, tok=tok)
        for b, s, i in zip(asked, scores, ids, strict=True):
            b.passage_ids, b.passage_scores = i[i >= 0], s[i >= 0]
    used = np.unique(np.concatenate([b.passage_ids for b in blocks])) if blocks else np.zeros(0, np.int64)
    texts = store.passage_text(used) if len(used) else []
    ptoks = {int(pid): text_ids(tok, t)[: p.max_passage_tokens]
             for pid, t in zip(used, texts, strict=True)}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    rows = []  # (block, input ids)
    for b in blocks:
        n_targets = b.end - b.start
        prefix = ric_prefix([ptoks[int(i)] for i in b.passage_ids], bos, eos, window - n_targets)
        ctx_end = b.end - 1  # inputs d[..ctx_end) predict d[start..end)
        b.context_begin = max(0, ctx_end - (window - len(prefix)))
        b.prefix_tokens = len(prefix)
        rows.append((b, prefix + list(docs[b.doc][b.context_begin : ctx_end])))
    rows.sort(key=lambda r: len(r[1]))

    out = [np.zeros(max(len(d) - 1, 0), dtype=np.float64) for d in docs]
    for batch in tqdm(list(batched(rows, batch_size)), desc="ric score", unit="batch", disable=not progress):
        ids, mask = pad_batch([inp for _, inp in batch], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, (b, inp) in enumerate(batch):
            n_targets = b.end - b.start
            lp = torch.log_softmax(logits[r, len(inp) - n_targets : len(inp)].float(), dim=-1)
            targets = torch.as_tensor(docs[b.doc][b.start : b.end], device=lp.device)
            out[b.doc][b.start - 1 : b.end - 1] = lp.gather(-1, targets[:, None])[:, 0].double().cpu().numpy()
    return (out, blocks) if return_blocks else out


@torch.no_grad()
def ric_generate(model, tok, store, prompt: str, max_new_tokens: int = 32, params: RICParams | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, policy=None,
                 stop: tuple[str, ...] = (), window: int | None = None, top_logprobs: int = 0,
                 prompt_ids: list[int] | None = None):
    """Generation with retrieval in context: every `stride` new tokens, retrieve with the last
    `query_tokens` tokens, put the passages in front, and go on (KV cache in between).
    Yields `silo.knnlm.GeneratedToken`s; each carries the passages in its context.

    A passage whose document is removed while the generation runs leaves the context at
    the next token: before each step the store's opt-out log is checked (a stat when
    nothing changed), and a removed passage in the KV cache forces a new retrieval."""
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    window = min(window or max_pos, max_pos)
    p = (params or RICParams()).validate(window)
    device = next(model.parameters()).device
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids = prompt_tokens(tok, prompt, prompt_ids)
    gen = torch.Generator().manual_seed(seed)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generated, text_so_far, past, attribution, since = [], "", None, [], p.stride
    context_docs = np.zeros(0, np.int64)  # documents of the passages in the KV cache
    decoder = StreamDecoder(tok)
    for _ in range(max_new_tokens):
        if len(context_docs):
            store.maybe_reload_optouts()
            if store.dead_docs[context_docs].any():  # removed since it was retrieved: not one more token from it
                since = p.stride
        if since >= p.stride or past is None:  # re-retrieve and rebuild the context
            query = tok.decode(ids[-p.query_tokens :], skip_special_tokens=True)
            prefix, attribution, context_docs = [], [], np.zeros(0, np.int64)
            if query.strip():
                scores, pids = passage_search(store, [query], p.passages, policy=policy, retriever=p.retriever,
                                              model=model, tok=tok)
                keep = pids[0] >= 0
                pids, scores = pids[0][keep], scores[0][keep]
                if len(pids):
                    texts = store.passage_text(pids)
                    ptoks = [text_ids(tok, t)[: p.max_passage_tokens] for t in texts]
                    prefix = ric_prefix(ptoks, bos, eos, max(window // 2, 1))
                    attribution = store.attribute(pids, scores)
                    context_docs = store.entry_docs(pids)
                    for h in attribution:
                        h["weight"] = 1.0 / len(attribution)
            context = ids[-(window - len(prefix) - 1):]
            out = model(input_ids=torch.tensor([prefix + context], device=device), use_cache=True)
            since = 0
        else:
            out = model(input_ids=torch.tensor([[generated[-1]]], device=device), use_cache=True,
                        **{cache_arg: past})
        past = getattr(out, cache_arg)
        probs = torch.softmax(out.logits[0, -1].float(), -1).cpu()
        next_id = sample_token(probs, temperature, top_p, gen)
        generated.append(next_id)
        ids.append(next_id)
        since += 1
        piece = decoder.add(next_id)
        lp = float(torch.log(probs[next_id].clamp_min(1e-30)))
        yield GeneratedToken(next_id, piece, lp, lp, [dict(h) for h in attribution], top_tokens(probs, top_logprobs))
        if next_id == tok.eos_token_id:
            return
        text_so_far += piece
        if any(s and s in text_so_far for s in stop):
            return
