"""gRPC servicers: `LanguageModel` and `Datastore`, thin over the library.

Each method validates its request (INVALID_ARGUMENT with a message naming the field),
turns it into a library call, and turns the result into protobuf. Library errors map to
status codes in one place (`_status_for`), so a bad request never takes the server down.
Stores can be swapped (after compaction) under a lock; a request uses the store object
it started with.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from datastore.manifest import FingerprintMismatch, StoreError
from datastore.policy import RetrievalPolicy
from datastore.store import Datastore, ShardUnavailable, UnknownDocuments
from server.gen import silo_pb2 as pb
from silo.errors import SiloError
from silo.knnlm import KNNParams
from silo.licenses import TIERS, license_obligation

DEFAULT_MAX_NEW_TOKENS = 32


class BadRequest(Exception):
    """INVALID_ARGUMENT with this message."""


@dataclass
class ServerState:
    """What a server holds: the model, its stores, limits. Shared by all servicers."""

    model_dir: str
    model: object
    tok: object
    token_store: Datastore | None = None
    passage_store: Datastore | None = None
    store_errors: dict[str, str] = field(default_factory=dict)  # kind -> why it cannot be used
    max_new_tokens: int = 512
    max_text_chars: int = 200_000
    window: int = 512
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, kind: str) -> Datastore:
        if kind in self.store_errors:
            raise FingerprintMismatch(self.store_errors[kind])
        store = self.token_store if kind == "token" else self.passage_store
        if store is None:
            raise BadRequest(f"this server has no {kind} store (start it with --store)")
        return store


def _status_for(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, UnknownDocuments):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, FingerprintMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, ShardUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, (ValueError, SiloError, StoreError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def guarded(fn):
    """Map exceptions of a unary method to statuses (never a crash, never a bare INTERNAL
    for the user's mistakes)."""
    def wrapper(self, request, context):
        if isinstance(request, InvalidMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server stays up
            code, msg = _status_for(e)
            context.abort(code, msg)
    wrapper.__name__ = fn.__name__
    return wrapper


class InvalidMessage:
    """Stands in for a request that could not be parsed (e.g. invalid UTF-8 in a string)."""

    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------------------- conversions


def policy_from_pb(p: pb.RetrievalPolicy) -> RetrievalPolicy:
    bad = [t for t in p.tiers if t not in TIERS]
    if bad:
        raise BadRequest(f"policy.tiers: unknown tier(s) {', '.join(bad)}; expected {', '.join(TIERS)}")
    return RetrievalPolicy(tiers=tuple(p.tiers) or None, allow_licenses=tuple(p.allow_licenses),
                           deny_licenses=tuple(p.deny_licenses), allow_sources=tuple(p.allow_sources),
                           deny_sources=tuple(p.deny_sources), deny_owners=tuple(p.deny_owners))


def knn_params_from_pb(r: pb.RetrievalOptions, store: Datastore) -> KNNParams:
    from silo.eval_modes import store_knn_params

    base = store_knn_params(store)
    if r.HasField("k") and r.k <= 0:
        raise BadRequest(f"retrieval.k must be positive, got {r.k}")
    if r.HasField("lambda_") and not 0.0 <= r.lambda_ <= 1.0:
        raise BadRequest(f"retrieval.lambda_ must be in [0, 1], got {r.lambda_}")
    if r.HasField("temperature") and not r.temperature > 0:
        raise BadRequest(f"retrieval.temperature must be positive, got {r.temperature}")
    return KNNParams(k=r.k if r.HasField("k") else base.k,
                     lam=r.lambda_ if r.HasField("lambda_") else base.lam,
                     temperature=r.temperature if r.HasField("temperature") else base.temperature,
                     nprobe=r.nprobe or base.nprobe)


def neighbour_pb(h: dict) -> pb.Neighbour:
    return pb.Neighbour(entry_id=h["entry_id"], doc_id=h["doc_id"], source=h["source"] or "",
                        license=h["license"] or "", tier=h["tier"] or "", owner=h["owner"] or "",
                        sentence=h["sentence"], sentence_index=h["sentence_index"], weight=h.get("weight", 0.0),
                        distance=h.get("score", 0.0), next_token=h.get("next_token", ""),
                        passage=h.get("passage", ""))


def attribution_line(h: dict) -> str:
    """The credit line an attribution license asks for; empty where none is required."""
    tier = h.get("tier")
    if tier not in ("by", "sw"):
        return ""
    who = h.get("owner") or h.get("source") or "unknown author"
    return f"\"{h['doc_id']}\" by {who}, from {h.get('source') or 'unknown source'}, licensed under {h.get('license')}"


def citations(tokens_attr: list[list[dict]]) -> list[pb.Citation]:
    agg: dict[str, dict] = {}
    counts: dict[str, int] = defaultdict(int)
    for attr in tokens_attr:
        for h in attr:
            a = agg.setdefault(h["doc_id"], {**h, "weight": 0.0})
            a["weight"] += h.get("weight", 0.0)
        for d in {h["doc_id"] for h in attr}:
            counts[d] += 1
    out = []
    for d, a in sorted(agg.items(), key=lambda kv: -kv[1]["weight"]):
        out.append(pb.Citation(doc_id=d, source=a["source"] or "", license=a["license"] or "", tier=a["tier"] or "",
                               owner=a["owner"] or "", total_weight=a["weight"], tokens=counts[d],
                               obligation=license_obligation(a["license"]), attribution_line=attribution_line(a)))
    return out


def _check_text(text: str, field_name: str, limit: int) -> None:
    if not text or not text.strip():
        raise BadRequest(f"{field_name} is empty")
    if len(text) > limit:
        raise BadRequest(f"{field_name} has {len(text)} characters; the limit is {limit}")


# ---------------------------------------------------------------------------- LanguageModel


class LanguageModelServicer:
    def __init__(self, state: ServerState):
        self.s = state

    def Generate(self, request, context):  # server-streaming
        if isinstance(request, InvalidMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            yield from self._generate(request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server stays up
            code, msg = _status_for(e)
            context.abort(code, msg)

    def _generate(self, r, context):
        from silo.knnlm import generate

        s = self.s
        _check_text(r.prompt, "prompt", s.max_text_chars)
        max_new = r.max_new_tokens if r.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        if not 1 <= max_new <= s.max_new_tokens:
            raise BadRequest(f"max_new_tokens must be in [1, {s.max_new_tokens}], got {max_new}")
        if r.temperature < 0 or not math.isfinite(r.temperature):
            raise BadRequest(f"temperature must be ≥ 0, got {r.temperature}")
        if not 0 <= r.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {r.top_p}")
        mode = r.retrieval.mode
        store = params = policy = None
        if mode != pb.RETRIEVAL_NONE:
            policy = policy_from_pb(r.retrieval.policy)
        if mode == pb.RETRIEVAL_KNN:
            store = s.store("token")
            params = knn_params_from_pb(r.retrieval, store)
        prompt_tokens = len(s.tok(r.prompt, add_special_tokens=False)["input_ids"])
        stop = pb.MAX_TOKENS
        deadline = time.monotonic() + r.time_limit_s if r.time_limit_s > 0 else None
        pieces, attrs, n = [], [], 0
        if mode == pb.RETRIEVAL_RIC:
            from silo.ricl import RICParams, ric_generate

            if r.retrieval.HasField("k") and r.retrieval.k <= 0:
                raise BadRequest(f"retrieval.k must be positive, got {r.retrieval.k}")
            rp = RICParams(stride=r.retrieval.ric_stride or 16, passages=r.retrieval.k or 1)
            gen = ric_generate(s.model, s.tok, s.store("passage"), r.prompt, max_new, rp, r.temperature,
                               r.top_p or 1.0, r.seed, policy, tuple(r.stop_sequences), s.window)
        else:
            gen = generate(s.model, s.tok, r.prompt, max_new, store=store, params=params or KNNParams(),
                           temperature=r.temperature, top_p=r.top_p or 1.0, seed=r.seed, policy=policy,
                           stop=tuple(r.stop_sequences), attribution_top=r.attribution_top or 3)
        for tok_out in gen:
            if not context.is_active():  # client cancelled or deadline passed: stop the work
                return
            n += 1
            pieces.append(tok_out.text)
            attrs.append(tok_out.attribution)
            yield pb.GenerateResponse(token=pb.GeneratedToken(
                index=n - 1, token_id=tok_out.token_id, text=tok_out.text, logprob=tok_out.logprob,
                lm_logprob=tok_out.lm_logprob, attribution=[neighbour_pb(h) for h in tok_out.attribution]))
            if tok_out.token_id == s.tok.eos_token_id:
                stop = pb.EOS_TOKEN
                break
            if any(x and x in "".join(pieces) for x in r.stop_sequences):
                stop = pb.STOP_SEQUENCE
                break
            if deadline is not None and time.monotonic() > deadline:
                stop = pb.TIME_LIMIT
                break
        yield pb.GenerateResponse(summary=pb.GenerationSummary(
            stop_reason=stop, prompt_tokens=prompt_tokens, generated_tokens=n, text="".join(pieces),
            citations=citations(attrs)))

    @guarded
    def Score(self, r, context):
        from silo.evaluate import score_documents
        from silo.tokenizer import encode_document

        s = self.s
        _check_text(r.text, "text", s.max_text_chars)
        window = r.window or s.window
        max_pos = getattr(s.model.config, "max_position_embeddings", window)
        if not 2 <= window <= max_pos:
            raise BadRequest(f"window must be in [2, {max_pos}], got {window}")
        stride = r.stride or max(window // 2, 1)
        if not 1 <= stride <= window:
            raise BadRequest(f"stride must be in [1, window], got {stride}")
        ids = encode_document(s.tok, r.text)
        pad = s.tok.pad_token_id if s.tok.pad_token_id is not None else 0
        mode = r.retrieval.mode
        if mode == pb.RETRIEVAL_KNN:
            from silo.knnlm import retrieve_neighbours

            store = s.store("token")
            params = knn_params_from_pb(r.retrieval, store)
            res = retrieve_neighbours(s.model, store, [ids], params.k, window, stride, 8, pad, params.nprobe,
                                      policy_from_pb(r.retrieval.policy))[0]
            lm, lp = res.lm_logprob, res.knn_logprob(params)
        else:
            lm = score_documents(s.model, [ids], window, stride, 8, pad)[0]
            lp = lm
            if mode == pb.RETRIEVAL_RIC:
                from silo.ricl import RICParams, ric_score_documents

                store = s.store("passage")
                if r.retrieval.HasField("k") and r.retrieval.k <= 0:
                    raise BadRequest(f"retrieval.k must be positive, got {r.retrieval.k}")
                rp = RICParams(stride=r.retrieval.ric_stride or 64, passages=r.retrieval.k or 1)
                lp = ric_score_documents(s.model, s.tok, store, [ids], window, rp, 8, pad,
                                         policy_from_pb(r.retrieval.policy))[0]
        texts = s.tok.batch_decode([[t] for t in ids[1:]])  # one call into the Rust tokenizer
        tokens = [pb.TokenScore(token_id=t, text=x, logprob=float(a), lm_logprob=float(b))
                  for t, x, a, b in zip(ids[1:], texts, lp, lm, strict=True)]
        total = float(np.sum(lp))
        return pb.ScoreResponse(tokens=tokens, total_logprob=total, num_tokens=len(tokens),
                                perplexity=math.exp(-total / max(len(tokens), 1)))

    @guarded
    def Tokenize(self, r, context):
        _check_text(r.text, "text", self.s.max_text_chars)
        ids = self.s.tok(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]
        if r.add_special_tokens and self.s.tok.bos_token_id is not None and (not ids or ids[0] != self.s.tok.bos_token_id):
            ids = [self.s.tok.bos_token_id, *ids]
        return pb.TokenizeResponse(ids=ids, tokens=self.s.tok.convert_ids_to_tokens(ids))

    @guarded
    def ModelInfo(self, r, context):
        from datastore.manifest import model_fingerprint
        from silo.lm import model_info

        s = self.s
        info = model_info(s.model_dir)
        stores = []
        for kind in ("token", "passage"):
            st = s.token_store if kind == "token" else s.passage_store
            if st is not None:
                stores.append(pb.StoreInfo(name=st.path.name, kind=st.manifest.kind, entries=st.n_entries,
                                           shards=len(st.manifest.shards), tiers=st.manifest.tiers))
        return pb.ModelInfoResponse(
            model=str(Path(s.model_dir).resolve()), model_type=s.model.config.model_type,
            parameters=sum(p.numel() for p in s.model.parameters()), vocab_size=len(s.tok),
            max_position_embeddings=getattr(s.model.config, "max_position_embeddings", 0),
            fingerprint=model_fingerprint(s.model_dir), trained_tiers=info.get("tiers", []),
            trained_on_restricted=bool(info.get("trained_on_restricted", False)), stores=stores,
            max_new_tokens_limit=s.max_new_tokens)


# ---------------------------------------------------------------------------- Datastore


class DatastoreServicer:
    def __init__(self, state: ServerState):
        self.s = state

    def _stores(self, name: str = "") -> list[Datastore]:
        out = [x for x in (self.s.token_store, self.s.passage_store) if x is not None]
        if name:
            out = [x for x in out if x.manifest.kind == name or x.path.name == name]
            if not out:
                raise BadRequest(f"no store named {name!r} on this server")
        return out

    @guarded
    def Search(self, r, context):
        from silo.keys import text_keys

        s = self.s
        _check_text(r.query, "query", s.max_text_chars)
        k = r.k if r.HasField("k") else 10
        if k <= 0:
            raise BadRequest(f"k must be positive, got {k}")
        policy = policy_from_pb(r.policy)
        kind = r.store or "token"
        if kind not in ("token", "passage"):
            raise BadRequest(f"store must be 'token' or 'passage', got {kind!r}")
        store = s.store(kind)
        if kind == "passage":
            scores, ids = store.search_text([r.query], k, policy=policy)
            missing: list[str] = []
        else:
            q = text_keys(s.model, s.tok, [r.query], store.manifest.key_type or "ffn_input")
            res = store.search_ex(q, k, r.nprobe or None, policy, allow_partial=r.allow_partial)
            scores, ids, missing = res.distances, res.ids, res.missing
        hits = store.attribute(ids[0], scores[0])
        if kind == "token":
            vals = store.values(np.asarray([h["entry_id"] for h in hits], dtype=np.int64))
            for h, v in zip(hits, vals, strict=True):
                h["next_token"] = s.tok.decode([int(v)])
        return pb.SearchResponse(hits=[neighbour_pb(h) for h in hits], partial=bool(missing),
                                 missing_shards=missing)

    @guarded
    def OptOut(self, r, context):
        which = r.WhichOneof("target")
        if which is None:
            raise BadRequest("say what to remove: doc_ids, owner, source or text_span")
        by, values = {"doc_ids": ("doc_ids", list(r.doc_ids.ids)), "owner": ("owner", [r.owner]),
                      "source": ("source", [r.source]), "text_span": ("span", [r.text_span])}[which]
        values = [v for v in values if v and v.strip()]
        if not values:
            raise BadRequest(f"{which} is empty")
        if by == "span" and len(values[0]) < 8:
            raise BadRequest("text_span must be at least 8 characters (a shorter span would remove too much)")
        stores = self._stores()
        if by == "doc_ids":  # every id must be known to some store, else NOT_FOUND and nothing logged
            unknown = [v for v in values if all(st.doc_index(v) is None for st in stores)]
            if unknown:
                raise UnknownDocuments(f"unknown doc id(s): {', '.join(unknown[:20])}")
        removed, entries, record = set(), 0, None
        with self.s.lock:
            for st in stores:
                vals = [v for v in values if st.doc_index(v) is not None] if by == "doc_ids" else values
                if not vals:
                    continue
                record, docs, n = st.opt_out(by, vals)
                removed.update(docs)
                entries += n
        return pb.OptOutResponse(receipt_id=record["receipt"], removed_doc_ids=sorted(removed),
                                 removed_entries=entries, logged_at=record["time"])

    @guarded
    def OptOutStatus(self, r, context):
        from datastore.optout import read_log

        which = r.WhichOneof("key")
        if which is None:
            raise BadRequest("give a receipt_id or a doc_id")
        key = getattr(r, which)
        for st in self._stores():
            rem = read_log(st.path)
            for rec in rem.records:
                if (which == "receipt_id" and rec["receipt"] == key) or (which == "doc_id" and key in rec["doc_ids"]):
                    compacted = bool(st.manifest.compactions) and any(
                        c["time"] >= rec["time"] for c in st.manifest.compactions)
                    return pb.OptOutStatusResponse(removed=True, receipt_id=rec["receipt"], logged_at=rec["time"],
                                                   by=rec["by"], values=rec["values"],
                                                   removed_doc_ids=rec["doc_ids"], compacted=compacted)
        if which == "receipt_id":
            raise UnknownDocuments(f"no opt-out with receipt {key!r}")
        return pb.OptOutStatusResponse(removed=False)

    @guarded
    def Stats(self, r, context):
        out = []
        for st in self._stores():
            d = st.stats()
            out.append(pb.StoreStats(
                name=st.path.name, kind=d["kind"], documents=d["documents"], live_documents=d["live_documents"],
                entries=d["entries"], live_entries=d["live_entries"], shards=d["shards"], index=d["index"] or "",
                bytes=d["bytes"], tiers={k: pb.GroupStats(**v) for k, v in d["tiers"].items()},
                sources={k: pb.GroupStats(**v) for k, v in d["sources"].items()}))
        return pb.StatsResponse(stores=out)

    @guarded
    def Compact(self, r, context):
        from datastore.compact import compact

        total = {"rewritten_shards": 0, "removed_entries": 0, "seconds": 0.0}
        for st in self._stores(r.store):
            with self.s.lock:  # no opt-out lands between the compaction's read of the log and the swap
                res = compact(st.path)
                if res["rewritten_shards"]:
                    fresh = type(st).open(st.path)
                    fresh.remotes = st.remotes
                    if st is self.s.token_store:
                        self.s.token_store = fresh
                    else:
                        self.s.passage_store = fresh
            for k in total:
                total[k] += res[k]
        return pb.CompactResponse(**total)
