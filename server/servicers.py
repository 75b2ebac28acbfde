"""gRPC servicers: `LanguageModel` and `Datastore`, thin over the library.

Each method checks its request against the server's `Limits` (INVALID_ARGUMENT naming the
field), turns it into one library call, and turns the result into protobuf. Library errors
map to status codes in one place (`status_for`), so a bad request never takes the server
down and never surfaces as UNKNOWN. Who may call what is decided before a method runs
(`silo.server.auth`); methods only narrow it (an owner's token reaches that owner's documents).

Stores are swapped (after a compaction) under `ServerState.lock`; a request keeps the
store object it started with, and the new object has read the whole opt-out log.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
from silo.datastore.compact import compact
from silo.datastore.errors import FingerprintMismatch, TooMuchWork
from silo.datastore.ledger import fingerprint
from silo.datastore.manifest import model_fingerprint
from silo.datastore.passages import retrievers_needed
from silo.datastore.removal import (
    PermissionDenied,
    find_record,
    remove,
    status,
)
from silo.datastore.store import Datastore, UnknownDocuments
from silo.server.auth import ANONYMOUS, Auth, Principal
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import (
    BadRequest,
    Limits,
    check_float,
    check_int,
    check_retrieval,
    check_retriever,
    check_sampling_temperature,
    check_text,
    check_work,
    shown,
)
from silo.server.limits import policy_from_pb as checked_policy
from silo.server.status import FailedPrecondition, InvalidMessage, guarded, status_for

from silo.corpus import normalize_record
from silo.errors import SiloError
from silo.evaluate import score_documents, windows_for
from silo.infgram import InfgramParams, generate_infgram, score_infgram, trace
from silo.ingest import INGEST_KINDS, add_documents
from silo.knnlm import KNNParams, generate, knn_score
from silo.licenses import license_obligation
from silo.lm import model_info, trained_tiers
from silo.membership import (
    MAX_CHECKED_DOCUMENTS,
    Reference,
    load_reference,
    membership_check,
    score_ids,
)
from silo.provenance import TrainingRecord, audit_record, audit_statement, check_removal
from silo.ricl import RICParams, ric_blocks, ric_generate, ric_score_documents
from silo.search import SEARCH_KINDS, search_text
from silo.tokenizer import encode_document, text_ids

log = logging.getLogger("silo.server")
DEFAULT_MAX_NEW_TOKENS = 32
MAX_TOP_LOGPROBS = 20  # most likely tokens reported per step (OpenAI's own limit)


@dataclass
class ServerState:
    """What a server holds: the model, its stores, limits, credentials. Shared by all servicers."""

    model_dir: str
    model: object
    tok: object
    stores: dict[str, Datastore] = field(default_factory=dict)  # kind -> open store
    store_errors: dict[str, str] = field(default_factory=dict)  # kind -> why it cannot be used
    # kind -> a store started with but out of use: opened (another model's: removals still go
    # to its log) or its path (it could not be opened: removals are refused until it is repaired)
    idle: dict[str, Datastore | str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    auth: Auth = field(default_factory=Auth)
    window: int = 512
    default_mode: int = pb.RETRIEVAL_NONE  # a request that names no mode gets this (`choose_default_mode`)
    shard_token: str | None = None  # presented to remote shard servers
    training_record: TrainingRecord | None = None  # what the model was trained on (None: an outside checkpoint)
    # the reference documents of membership percentiles: a corpus's test split (None: the
    # training record's corpus), computed once, on first use (`membership_reference`)
    membership_corpus: str | None = None
    membership_documents: int = 100
    _reference: Reference | None = None
    _reference_loaded: bool = False
    _reference_lock: threading.Lock = field(default_factory=threading.Lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _reopening: threading.Lock = field(default_factory=threading.Lock)
    _release_due: float | None = None  # when to hand a swapped-out store's heap back to the OS

    def release_later(self) -> None:
        """Release freed memory once the requests still holding an old store are done: on
        the first request after `RELEASE_AFTER_S` (no extra thread, which could still be
        running when the process exits)."""
        self._release_due = time.monotonic() + RELEASE_AFTER_S

    def membership_reference(self) -> Reference | None:
        """Min-K% / Min-K%++ of the reference documents (`silo.membership.load_reference`),
        computed by the first caller (`membership_documents` forward passes) while others
        wait; None when there is no corpus to draw them from."""
        with self._reference_lock:
            if not self._reference_loaded:
                self._reference = load_reference(self.model, self.tok, self.model_dir, self.membership_corpus,
                                                 n=self.membership_documents)
                self._reference_loaded = True
            return self._reference

    def mode_of(self, retrieval: pb.RetrievalOptions) -> int:
        """The request's retrieval mode, or the server's default where it names none."""
        return retrieval.mode if retrieval.HasField("mode") else self.default_mode

    def store(self, kind: str, asked_by: str = "") -> Datastore:
        """The open store of this kind; `asked_by` names the request field that needs it."""
        if kind in self.store_errors:
            raise FingerprintMismatch(self.store_errors[kind])
        store = self.stores.get(kind)
        if store is None:
            if not asked_by:  # the RPC itself needs the store: the server's state, not the request, is at fault
                raise FailedPrecondition(f"this server has no {kind} store (start it with --store)")
            raise BadRequest(f"{asked_by} needs a {kind} store, and this server has none (start it with --store)")
        return self.current(store)

    def current(self, store: Datastore) -> Datastore:
        """`store`, or — if another process switched its manifest (a live ingest, a compaction)
        — the store as it is now. One request reopens it; the others keep the old object
        until the new one is in place (no restart, no request waits for another's reopen)."""
        due = self._release_due
        if due is not None and time.monotonic() >= due:
            self._release_due = None
            release_freed_memory()
        if not store.manifest_changed():
            return store
        if not self._reopening.acquire(blocking=False):
            return store
        try:
            if self.stores.get(store.manifest.kind) is store:  # not swapped meanwhile
                self.stores[store.manifest.kind] = store.reopen()
                self.release_later()  # the old store is freed once the requests still using it finish
            return self.stores[store.manifest.kind]
        finally:
            self._reopening.release()

    def open_stores(self) -> list[Datastore]:
        return [self.current(st) for kind, st in list(self.stores.items()) if kind not in self.store_errors]

    # kept for callers that name the store kind as an attribute
    @property
    def token_store(self) -> Datastore | None:
        return self.stores.get("token")

    @property
    def passage_store(self) -> Datastore | None:
        return self.stores.get("passage")


def check_store_retriever(store: Datastore, retriever: str, name: str) -> None:
    """A retriever asked of a passage store must be one it was built with (hybrid: both):
    the request's fault, refused before any work (the store itself would say FAILED_PRECONDITION)."""
    if not retriever:
        return
    needs, have = retrievers_needed(retriever), store.manifest.retrievers
    if any(x not in have for x in needs):
        raise BadRequest(f"{name} {retriever!r} needs a passage store built with {' and '.join(needs)}; "
                         f"this server's has {', '.join(have)}")


# a store kind's retrieval mode, in the order `auto` prefers them: kNN-LM (SILO's best mode
# where it is affordable), then ∞-gram, then RIC-LM
MODE_OF_KIND = {"token": pb.RETRIEVAL_KNN, "infgram": pb.RETRIEVAL_INFGRAM, "passage": pb.RETRIEVAL_RIC}
DEFAULT_MODES = ("auto", "none", "knn", "ric", "infgram")


def choose_default_mode(requested: str, kinds) -> int:
    """The mode a request that names none gets (`silo serve --mode`). `auto` is SILO, not
    the bare LM: kNN-LM with a token store, else ∞-gram, else RIC-LM; the LM alone only
    without any store in use. An explicit mode needs its store."""
    kinds = set(kinds)
    if requested not in DEFAULT_MODES:
        raise SiloError(f"--mode must be one of {', '.join(DEFAULT_MODES)}, got {requested!r}")
    if requested == "auto":
        return next((m for kind, m in MODE_OF_KIND.items() if kind in kinds), pb.RETRIEVAL_NONE)
    mode = pb.RetrievalMode.Value(f"RETRIEVAL_{requested.upper()}")
    need = next((kind for kind, m in MODE_OF_KIND.items() if m == mode), None)
    if need is not None and need not in kinds:
        raise SiloError(f"--mode {requested} needs a {need} store in use (start the server with --store)")
    return mode


RELEASE_AFTER_S = 10.0  # longer than a request holds the store it started with


def release_freed_memory() -> None:
    """Hand the heap freed by a swapped-out store (or a compaction) back to the OS. glibc
    keeps freed chunks in its arenas: without this a serving process's RSS stays higher
    after every compaction by about the memory the compaction and the old index used."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)



def principal(state: ServerState, context) -> Principal:
    return state.auth.principal(context.invocation_metadata()) if context is not None else ANONYMOUS


# ---------------------------------------------------------------------------- conversions


def knn_params_from_pb(r: pb.RetrievalOptions, store: Datastore, limits: Limits) -> KNNParams:
    """The request's values over the store's tuned defaults (`KNNParams.merged`). A default
    above the server's own limits (k, nprobe) is lowered to them: a request that names no k
    is never refused, here or at a shard server, for the server's own settings."""
    params = KNNParams.merged(store.manifest.defaults, k=r.k if r.HasField("k") else None,
                              lam=r.lambda_ if r.HasField("lambda_") else None,
                              temperature=r.temperature if r.HasField("temperature") else None,
                              nprobe=r.nprobe or None,
                              refine=r.refine_factor if r.HasField("refine_factor") else None,
                              reuse=r.reuse if r.HasField("reuse") else None,
                              skip_above=r.skip_above if r.HasField("skip_above") else None)
    if not r.HasField("k"):
        params = replace(params, k=min(params.k, limits.max_k))
    if not r.HasField("reuse"):  # the store's tuned count, for the k this request really uses
        params = replace(params, reuse=min(params.reuse, params.k))
    if not r.nprobe and params.nprobe is not None:
        params = replace(params, nprobe=min(params.nprobe, limits.max_nprobe))
    return params


def infgram_params_from_pb(r: pb.RetrievalOptions, store: Datastore) -> InfgramParams:
    """The request's λ (for every suffix length) over the store's tuned λ per suffix length."""
    return InfgramParams.merged(store.manifest.defaults, r.lambda_ if r.HasField("lambda_") else None)


def traced_pb(sp) -> pb.TracedSpan:
    return pb.TracedSpan(start_token=sp.start_token, end_token=sp.end_token, start_char=sp.start_char,
                         end_char=sp.end_char, text=sp.text, count=sp.count,
                         documents=[pb.Source(doc_id=d["doc_id"], source=d["source"] or "", license=d["license"] or "",
                                              tier=d["tier"] or "", owner=d["owner"] or "") for d in sp.documents])


def neighbour_pb(h: dict) -> pb.Neighbour:
    return pb.Neighbour(entry_id=h["entry_id"], doc_id=h["doc_id"], source=h["source"] or "",
                        license=h["license"] or "", tier=h["tier"] or "", owner=h["owner"] or "",
                        sentence=h["sentence"], sentence_index=h["sentence_index"], weight=h.get("weight", 0.0),
                        distance=h.get("score", 0.0), next_token=h.get("next_token", ""),
                        passage=h.get("passage", ""))


def top_pb(tok, top: list[tuple[int, float]]) -> list[pb.TopToken]:
    if not top:
        return []
    texts = tok.batch_decode([[t] for t, _ in top])
    return [pb.TopToken(token_id=t, text=x, logprob=lp) for (t, lp), x in zip(top, texts, strict=True)]


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
            code, msg = status_for(e)
            context.abort(code, msg)

    def _check_generate(self, r) -> int:
        lim = self.s.limits
        if r.prompt_token_ids:
            if r.prompt:
                raise BadRequest("give prompt or prompt_token_ids, not both")
            check_work("the prompt's tokens", len(r.prompt_token_ids), "max_request_tokens", lim, "a shorter prompt")
            vocab = len(self.s.tok)
            bad = next((t for t in r.prompt_token_ids if t >= vocab), None)
            if bad is not None:
                raise BadRequest(f"prompt_token_ids: {bad} is not a token id of this model (vocabulary {vocab:,})")
        else:
            check_text("prompt", r.prompt, lim.max_text_chars)
        # unset = the default, within the server's limit (never refused for the server's own setting)
        max_new = r.max_new_tokens if r.HasField("max_new_tokens") else min(DEFAULT_MAX_NEW_TOKENS, lim.max_new_tokens)
        check_int("max_new_tokens", max_new, 0 if r.echo else 1, lim.max_new_tokens)
        check_int("top_logprobs", r.top_logprobs, 0, MAX_TOP_LOGPROBS)
        check_sampling_temperature("temperature", r.temperature, 100.0)
        check_float("top_p", r.top_p, 0.0, 1.0)
        check_float("time_limit_s", r.time_limit_s, 0.0, lim.max_time_limit_s)
        check_int("attribution_top", r.attribution_top, 0, lim.max_attribution_top)
        check_int("stop_sequences (count)", len(r.stop_sequences), 0, lim.max_stop_sequences)
        for x in r.stop_sequences:
            check_text("a stop sequence", x, lim.max_stop_chars, allow_empty=True)
        check_retrieval(r.retrieval, lim)
        return max_new

    def _generate(self, r, context):
        s = self.s
        max_new = self._check_generate(r)
        mode = s.mode_of(r.retrieval)
        store = params = policy = None
        if mode != pb.RETRIEVAL_NONE:
            policy = checked_policy(r.retrieval.policy, s.limits)
        prompt_ids = list(r.prompt_token_ids) or None
        prompt_tokens = len(prompt_ids) if prompt_ids else len(text_ids(s.tok, r.prompt))
        check_work("the prompt's tokens", prompt_tokens, "max_request_tokens", s.limits, "a shorter prompt")
        steps = max_new + (prompt_tokens if r.echo else 0)  # an echoed prompt token costs a step
        if mode == pb.RETRIEVAL_KNN:
            store = s.store("token", "retrieval.mode RETRIEVAL_KNN")
            params = knn_params_from_pb(r.retrieval, store, s.limits)
            self._check_knn_work(store, params, steps, "steps (echoed prompt tokens + max_new_tokens)")
        if mode == pb.RETRIEVAL_RIC and r.echo:
            raise BadRequest("echo is not available with RETRIEVAL_RIC (its passages change as text is generated); "
                             "score a text under RIC-LM with Score")
        if mode == pb.RETRIEVAL_RIC:
            rp = RICParams(stride=r.retrieval.ric_stride or 16, passages=r.retrieval.k or 1,
                           retriever=r.retrieval.retriever or None)
            window = min(s.window, getattr(s.model.config, "max_position_embeddings", s.window))
            retrievals = -(-max_new // rp.stride)  # one before the first token, then every ric_stride tokens
            check_work(f"RIC-LM passages ({retrievals:,} retrievals x {rp.passages} passages)",
                       retrievals * rp.passages, "max_ric_passages", s.limits,
                       "a larger ric_stride, fewer passages (k) or max_new_tokens")
            check_work(f"tokens through the LM ({retrievals:,} RIC-LM contexts x window {window})",
                       retrievals * window + max_new, "max_forward_tokens", s.limits,
                       "a larger ric_stride or fewer max_new_tokens")
        stop = pb.MAX_TOKENS
        deadline = time.monotonic() + r.time_limit_s if r.time_limit_s > 0 else None
        pieces, attrs, n = [], [], 0
        if r.trace:
            s.store("infgram", "trace")  # refused before any work if there is nothing to trace against
        if mode == pb.RETRIEVAL_RIC:
            passages = s.store("passage", "retrieval.mode RETRIEVAL_RIC")
            check_store_retriever(passages, r.retrieval.retriever, "retrieval.retriever")
            gen = ric_generate(s.model, s.tok, passages, r.prompt, max_new, rp, r.temperature, r.top_p or 1.0,
                               r.seed, policy, tuple(r.stop_sequences), s.window, r.top_logprobs, prompt_ids)
        elif mode == pb.RETRIEVAL_INFGRAM:
            ig = s.store("infgram", "retrieval.mode RETRIEVAL_INFGRAM")
            gen = generate_infgram(s.model, s.tok, ig, r.prompt, max_new, infgram_params_from_pb(r.retrieval, ig),
                                   r.temperature, r.top_p or 1.0, r.seed, policy, tuple(r.stop_sequences),
                                   r.attribution_top or 3, echo=r.echo, top_logprobs=r.top_logprobs,
                                   prompt_ids=prompt_ids)
        else:
            gen = generate(s.model, s.tok, r.prompt, max_new, store=store, params=params or KNNParams(),
                           temperature=r.temperature, top_p=r.top_p or 1.0, seed=r.seed, policy=policy,
                           stop=tuple(r.stop_sequences), attribution_top=r.attribution_top or 3, echo=r.echo,
                           top_logprobs=r.top_logprobs, prompt_ids=prompt_ids)
        echoed = 0
        for tok_out in gen:
            if not context.is_active():  # client cancelled or deadline passed: stop the work
                return
            first = tok_out.attribution[0] if tok_out.attribution else {}
            if tok_out.prompt:
                echoed += 1
            else:
                n += 1
                pieces.append(tok_out.text)
                attrs.append(tok_out.attribution)
            yield pb.GenerateResponse(token=pb.GeneratedToken(
                index=echoed - 1 if tok_out.prompt else n - 1, token_id=tok_out.token_id, text=tok_out.text,
                logprob=tok_out.logprob, lm_logprob=tok_out.lm_logprob,
                attribution=[neighbour_pb(h) for h in tok_out.attribution],
                suffix_tokens=first.get("suffix_tokens", 0), suffix_count=first.get("suffix_count", 0),
                prompt=tok_out.prompt, top=top_pb(s.tok, tok_out.top)))
            if tok_out.prompt:
                continue
            if tok_out.token_id == s.tok.eos_token_id:
                stop = pb.EOS_TOKEN
                break
            if any(x and x in "".join(pieces) for x in r.stop_sequences):
                stop = pb.STOP_SEQUENCE
                break
            if deadline is not None and time.monotonic() > deadline:
                stop = pb.TIME_LIMIT
                break
        text = "".join(pieces)
        spans = []
        if r.trace and text.strip():
            spans = [traced_pb(sp) for sp in trace(s.store("infgram", "trace"), s.tok, text,
                                                   r.trace_min_tokens or 8, policy=policy)]
        yield pb.GenerateResponse(summary=pb.GenerationSummary(
            stop_reason=stop, prompt_tokens=prompt_tokens, generated_tokens=n, text=text,
            citations=citations(attrs), trace=spans, mode=mode))

    def _check_knn_work(self, store: Datastore, params: KNNParams, queries: int, what: str) -> None:
        """kNN-LM work: one query's candidates (k x refine) and the request's neighbour
        slots (queries x k x refine), with the k and refine the search will really use."""
        lim, refine = self.s.limits, store.refine_for(params.refine)
        check_work(f"candidates per search (k {params.k} x refine {refine})", params.k * refine,
                   "max_query_candidates", lim, "a smaller k or refine_factor")
        check_work(f"neighbour slots ({queries:,} {what} x k {params.k} x refine {refine})",
                   queries * params.k * refine, "max_neighbour_slots", lim,
                   f"fewer {what}, a smaller k or refine_factor")

    @guarded
    def Score(self, r, context):
        s, lim = self.s, self.s.limits
        check_text("text", r.text, lim.max_text_chars)
        check_retrieval(r.retrieval, lim)
        max_pos = getattr(s.model.config, "max_position_embeddings", s.window)
        longest = min(max_pos, lim.max_window)
        # 0 = the server's window, capped by the model's context and the limit (a default
        # request is never refused for the server's own setting)
        window = check_int("window", r.window or min(s.window, longest), 2, longest)
        stride = check_int("stride", r.stride or max(window // 2, 1), 1, window)
        ids = encode_document(s.tok, r.text)
        # every product of this request's work, before any of it is allocated
        check_work("the text's tokens", len(ids), "max_request_tokens", lim, "score a shorter text")
        windows = len(windows_for(len(ids), window, stride))
        if windows > lim.max_score_windows:  # the cost is windows x window tokens: bounded per request
            raise TooMuchWork(f"text, window {window} and stride {stride} make {windows:,} windows; over the "
                              f"server's cap max_score_windows = {lim.max_score_windows:,} (a larger stride, "
                              "or a shorter text)")
        check_work(f"tokens through the LM ({windows:,} windows x window {window})", windows * window,
                   "max_forward_tokens", lim, "a larger stride, or a shorter text")
        mode = s.mode_of(r.retrieval)
        scored = max(len(ids) - 1, 0)
        if mode == pb.RETRIEVAL_KNN:
            store = s.store("token", "retrieval.mode RETRIEVAL_KNN")
            params = knn_params_from_pb(r.retrieval, store, s.limits)
            self._check_knn_work(store, params, scored, "scored tokens")
        rp = None
        if mode == pb.RETRIEVAL_RIC:
            rp = RICParams(stride=r.retrieval.ric_stride or 64, passages=r.retrieval.k or 1,
                           retriever=r.retrieval.retriever or None).validate(window)
            blocks = ric_blocks(len(ids), rp.stride)
            check_work(f"RIC-LM passages ({blocks:,} blocks of ric_stride {rp.stride} x {rp.passages} passages)",
                       blocks * rp.passages, "max_ric_passages", lim, "a larger ric_stride, fewer passages (k)")
            check_work(f"tokens through the LM ({blocks:,} RIC-LM blocks x window {window})", blocks * window,
                       "max_forward_tokens", lim, "a larger ric_stride, or a shorter text")
        pad = s.tok.pad_token_id if s.tok.pad_token_id is not None else 0
        if mode == pb.RETRIEVAL_KNN:
            # no second search thread: the server already gives each concurrent request its share of the cores
            lm, lp = knn_score(s.model, store, ids, params, window, stride, 8, pad,
                               checked_policy(r.retrieval.policy, lim))
        else:
            lm = score_documents(s.model, [ids], window, stride, 8, pad)[0]
            lp = lm
            if mode == pb.RETRIEVAL_INFGRAM:
                ig = s.store("infgram", "retrieval.mode RETRIEVAL_INFGRAM")
                scored = score_infgram(s.model, ig, [ids], policy=checked_policy(r.retrieval.policy, lim),
                                       lm_logprobs=[lm])[0]
                lp = scored.logprob(infgram_params_from_pb(r.retrieval, ig))
            if mode == pb.RETRIEVAL_RIC:
                passages = s.store("passage", "retrieval.mode RETRIEVAL_RIC")
                check_store_retriever(passages, r.retrieval.retriever, "retrieval.retriever")
                lp = ric_score_documents(s.model, s.tok, passages, [ids], window, rp, 8, pad,
                                         checked_policy(r.retrieval.policy, lim))[0]
        texts = s.tok.batch_decode([[t] for t in ids[1:]])  # one call into the Rust tokenizer
        tokens = [pb.TokenScore(token_id=t, text=x, logprob=float(a), lm_logprob=float(b))
                  for t, x, a, b in zip(ids[1:], texts, lp, lm, strict=True)]
        total = float(np.sum(lp))
        return pb.ScoreResponse(tokens=tokens, total_logprob=total, num_tokens=len(tokens),
                                perplexity=math.exp(-total / max(len(tokens), 1)), mode=mode)

    @guarded
    def Trace(self, r, context):
        s, lim = self.s, self.s.limits
        check_text("text", r.text, lim.max_text_chars)
        min_tokens = check_int("min_tokens", r.min_tokens or 8, 1, lim.max_trace_min_tokens)
        max_spans = check_int("max_spans", r.max_spans or 50, 1, 1000)
        max_docs = check_int("max_documents", r.max_documents or 5, 1, lim.max_attribution_top)
        store = s.store("infgram")
        n_tokens = len(text_ids(s.tok, r.text))
        check_work("the text's tokens", n_tokens, "max_request_tokens", lim, "trace a shorter text")
        spans = trace(store, s.tok, r.text, min_tokens, max_spans, max_docs, checked_policy(r.policy, lim))
        return pb.TraceResponse(spans=[traced_pb(sp) for sp in spans], tokens=n_tokens)

    @guarded
    def Audit(self, r, context):
        s, lim = self.s, self.s.limits
        if not r.text and not r.doc_ids:
            raise BadRequest("give a text or doc_ids to audit")
        if r.text:
            check_text("text", r.text, lim.max_text_chars)
        check_int("doc_ids", len(r.doc_ids), 0, lim.max_optout_values)
        for d in r.doc_ids:
            check_text("doc_ids", d, lim.max_value_chars)
        name = Path(s.model_dir).name
        rep = audit_record(s.training_record, name, [("text", r.text)] if r.text else [], list(r.doc_ids))
        out = pb.AuditResponse(model=name, has_record=rep["record"],
                               trained_doc_ids=[d["doc_id"] for d in rep["documents"] if d["trained"]])
        if rep["record"] and rep["texts"]:
            t = rep["texts"][0]
            out.MergeFrom(pb.AuditResponse(verdict=t["verdict"], words=t["words"], shingles=t["shingles"],
                                           found=t["found"], longest_run_words=t["longest_run_words"],
                                           same_documents=t["same_documents"], shingle_fpr=t["fpr"]))
        out.statement = audit_statement(rep)
        if r.membership and r.text:
            ids = text_ids(s.tok, r.text)
            check_work("the text's tokens", len(ids), "max_request_tokens", lim, "audit a shorter text")
            scores = score_ids(s.model, s.tok, ids)  # one forward pass over at most the model's window
            if scores is not None:
                out.scored, out.min_k, out.min_k_pp = True, scores.min_k, scores.min_k_pp
                ref = s.membership_reference()
                if ref is not None:
                    out.min_k_percentile, out.min_k_pp_percentile = ref.percentiles(scores)
                    out.reference_documents, out.reference_proven = ref.documents, ref.proven
        return out

    @guarded
    def Tokenize(self, r, context):
        check_text("text", r.text, self.s.limits.max_text_chars)
        ids = text_ids(self.s.tok, r.text)  # special tokens in the text are text
        check_work("the text's tokens", len(ids), "max_request_tokens", self.s.limits, "a shorter text")
        if r.add_special_tokens and self.s.tok.bos_token_id is not None:
            ids = [self.s.tok.bos_token_id, *ids]
        return pb.TokenizeResponse(ids=ids, tokens=self.s.tok.convert_ids_to_tokens(ids))

    @guarded
    def ModelInfo(self, r, context):
        s = self.s
        info = model_info(s.model_dir)
        stores = [pb.StoreInfo(name=st.path.name, kind=st.manifest.kind, entries=st.n_entries,
                               shards=len(st.manifest.shards), tiers=st.manifest.tiers) for st in s.stores.values()]
        return pb.ModelInfoResponse(
            model=Path(s.model_dir).resolve().name, model_type=s.model.config.model_type,
            parameters=sum(p.numel() for p in s.model.parameters()), vocab_size=len(s.tok),
            max_position_embeddings=getattr(s.model.config, "max_position_embeddings", 0),
            fingerprint=model_fingerprint(s.model_dir), trained_tiers=trained_tiers(info),
            trained_on_restricted=bool(info.get("trained_on_restricted", False)), stores=stores,
            max_new_tokens_limit=s.limits.max_new_tokens, default_mode=s.default_mode)


# ---------------------------------------------------------------------------- Datastore


class DatastoreServicer:
    def __init__(self, state: ServerState):
        self.s = state

    def _stores(self, name: str = "") -> list[Datastore]:
        out = self.s.open_stores()
        if name:
            out = [x for x in out if x.manifest.kind == name or x.path.name == name]
            if not out:
                raise BadRequest(f"no store named {shown(name)} on this server")
        return out

    @guarded
    def Search(self, r, context):
        s, lim = self.s, self.s.limits
        check_text("query", r.query, lim.max_text_chars)
        k = check_int("k", r.k if r.HasField("k") else 10, 1, lim.max_k)
        check_int("nprobe", r.nprobe, 0, lim.max_nprobe)
        check_retriever("retriever", r.retriever)
        policy = checked_policy(r.policy, lim)
        kind = r.store or "token"
        if kind not in SEARCH_KINDS:
            raise BadRequest(f"store must be one of {', '.join(SEARCH_KINDS)}, got {shown(kind)}")
        store = s.store(kind, f"store {kind!r}")
        refine = check_int("refine_factor", r.refine_factor, 1, lim.max_refine_factor) \
            if r.HasField("refine_factor") else None
        if kind == "token":
            used = store.refine_for(refine)
            check_work(f"candidates per search (k {k} x refine {used})", k * used, "max_query_candidates", lim,
                       "a smaller k or refine_factor")
        if r.retriever:
            if kind != "passage":
                raise BadRequest(f"retriever {shown(r.retriever)} is for passage stores, not the {kind} store")
            check_store_retriever(store, r.retriever, "retriever")
        found = search_text(store, r.query, k, s.model, s.tok, policy, r.nprobe or None, refine,
                            retriever=r.retriever or None, allow_partial=r.allow_partial)
        return pb.SearchResponse(hits=[neighbour_pb(h) for h in found.hits], partial=bool(found.missing),
                                 missing_shards=found.missing)

    @guarded
    def OptOut(self, r, context):
        lim = self.s.limits
        which = r.WhichOneof("target")
        if which is None:
            raise BadRequest("say what to remove: doc_ids, owner, source or text_span")
        by, values = {"doc_ids": ("doc_ids", list(r.doc_ids.ids)), "owner": ("owner", [r.owner]),
                      "source": ("source", [r.source]), "text_span": ("span", [r.text_span])}[which]
        check_int(f"{which} (count)", len(values), 1, lim.max_optout_values)
        for v in values:
            check_text(which, v, lim.max_value_chars)
        check_text("reason", r.reason, lim.max_value_chars, allow_empty=True)
        if by == "span" and len(values[0]) < lim.min_span_chars:
            raise BadRequest(f"text_span must be at least {lim.min_span_chars} characters "
                             "(a shorter span would remove too much)")
        who = principal(self.s, context)
        owner = who.owner if who.kind == "owner" else None
        with self.s.lock:  # one removal at a time: the size check and the log see the same state
            # every store the server was started with, served or not: a store out of use now
            # must not serve the document once it is back
            res = remove(self._stores() + self._idle_stores(), by, values, owner=owner, made_by=who.label,
                         reason=r.reason, confirm_large=r.confirm_large, dry_run=r.dry_run,
                         max_docs=lim.max_optout_docs, max_fraction=lim.max_optout_fraction,
                         unopened=self._unopened())
        return pb.OptOutResponse(receipt_id=res.receipt, removed_doc_ids=sorted(res.doc_ids),
                                 removed_entries=res.entries, logged_at=res.logged_at, dry_run=res.dry_run)

    @guarded
    def OptOutStatus(self, r, context):
        which = r.WhichOneof("key")
        if which is None:
            raise BadRequest("give a receipt_id or a doc_id")
        key = check_text(which, getattr(r, which), self.s.limits.max_value_chars)
        stores = self._stores() + self._idle_stores()
        who = principal(self.s, context)
        if which == "doc_id" and who.kind == "owner":
            owners = {st.doc_owner(st.doc_index(key)) for st in stores if st.doc_index(key) is not None}
            if owners and owners != {who.owner}:
                raise PermissionDenied(f"document {shown(key)} does not belong to owner {who.owner!r}")
        record = find_record(stores, receipt=key) if which == "receipt_id" else find_record(stores, doc_id=key)
        if record is None:
            if which == "receipt_id":
                raise UnknownDocuments(f"no opt-out with receipt {shown(key)}")
            texts = self._held_texts(stores, [key])
            fps = [fp for fp in (fingerprint(key, texts.get(key, "")),) if fp]
            return pb.OptOutStatusResponse(removed=False,
                                           weights=self._weights({"doc_ids": [key], "fingerprints": fps}, texts))
        show = who.may_see(record)
        if who.kind == "owner" and not show:
            # someone else's removal: an owner sees only the part of it about their own documents
            own = [d for d in record["doc_ids"]
                   if any(st.doc_index(d) is not None and st.doc_owner(st.doc_index(d)) == who.owner for st in stores)]
            if not own:
                raise PermissionDenied(f"receipt {record['receipt']} covers no document of owner {who.owner!r}")
            record = {**record, "doc_ids": own}
        proof = status(stores, record, unopened=list(self._unopened()))
        return pb.OptOutStatusResponse(
            removed=True, receipt_id=record["receipt"], logged_at=record["time"], by=record["by"],
            values=record["values"] if show else [], values_redacted=not show, removed_doc_ids=record["doc_ids"],
            compacted=proof.compacted, logged=True, tombstoned=proof.tombstoned,
            made_by=record.get("made_by", "admin"),
            stores=[pb.StoreProof(store=p.store, doc_ids=p.doc_ids, tombstoned=p.tombstoned, compacted=p.compacted,
                                  live_entries=p.live_entries) for p in proof.stores]
            # a store this server cannot open proves nothing: listed, not tombstoned
            + [pb.StoreProof(store=f"{Path(m).name} (cannot be opened: no proof)") for m in proof.missing],
            weights=self._weights(record, None if self.s.training_record else
                                  self._held_texts(stores, record["doc_ids"][:MAX_CHECKED_DOCUMENTS])))

    @staticmethod
    def _held_texts(stores: list[Datastore], doc_ids: list[str]) -> dict[str, str]:
        """doc id -> its text (at most 1 MiB: bounded work), where a store still holds it
        (removed documents keep their text until compaction)."""
        out = {}
        for d in doc_ids:
            for st in stores:
                i = st.doc_index(d)
                if i is not None and not st.is_compacted(i):
                    out[d] = st.doc_text(i)[: 1 << 20]
                    break
        return out

    def _weights(self, removal: dict, texts: dict[str, str] | None = None) -> pb.WeightsProof:
        """The weights' side: the served model's training record checked for these documents;
        without a record, the weights asked (Min-K%++ of the texts still held, `texts`)."""
        s = self.s
        membership = None
        if s.training_record is None and texts is not None:
            membership = membership_check(s.model, s.tok, s.membership_reference(), texts)
        w = check_removal(s.training_record, Path(s.model_dir).name, removal, membership)
        m = w.membership or {}
        return pb.WeightsProof(model=w.model, has_record=w.has_record, trained_doc_ids=w.trained_doc_ids,
                               trained_text_doc_ids=w.trained_text_doc_ids, shingle_fpr=w.fpr, statement=w.statement,
                               scored="percentile" in m, membership_percentile=m.get("percentile", 0.0),
                               reference_documents=m.get("reference_documents", 0),
                               scored_doc_ids=m.get("scored_doc_ids", []))

    def _idle_stores(self) -> list[Datastore]:
        """Stores this server was started with and opened, but does not serve (another model's)."""
        return [st for st in list(self.s.idle.values()) if isinstance(st, Datastore)]

    def _unopened(self) -> dict[str, str]:
        """Stores this server was started with but could not open: path -> why."""
        return {st: self.s.store_errors.get(kind, "") for kind, st in list(self.s.idle.items())
                if not isinstance(st, Datastore)}

    @guarded
    def Stats(self, r, context):
        out = []
        for st in self._stores():
            d = st.stats()
            out.append(pb.StoreStats(
                name=st.path.name, kind=d["kind"], documents=d["documents"], live_documents=d["live_documents"],
                entries=d["entries"], live_entries=d["live_entries"], shards=d["shards"], index=d["index"] or "",
                bytes=d["bytes"], lists=d.get("lists", ""),
                shard_groups=[pb.ShardGroupStats(**g.stats()) for g in st.remotes], tiers={k: pb.GroupStats(**v) for k, v in d["tiers"].items()},
                sources={k: pb.GroupStats(**v) for k, v in d["sources"].items()}))
        return pb.StatsResponse(stores=out)

    def AddDocuments(self, requests, context):  # client-streaming
        try:
            return self._add_documents(requests, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server stays up
            code, msg = status_for(e)
            context.abort(code, msg)

    def _add_documents(self, requests, context):
        s, lim = self.s, self.s.limits
        first = next(requests, None)
        if first is None:
            raise BadRequest("no documents: stream at least one AddDocumentsRequest")
        if isinstance(first, InvalidMessage):
            raise BadRequest(first.reason)
        check_text("store", first.store, lim.max_value_chars, allow_empty=True)
        kind = first.store or "token"
        if kind not in INGEST_KINDS:
            raise BadRequest(f"store must be one of {', '.join(INGEST_KINDS)}, got {shown(kind)}")
        store = s.store(kind, f"store {kind!r}")
        docs, total = [], 0
        for i, r in enumerate(itertools.chain([first], requests)):
            if isinstance(r, InvalidMessage):
                raise BadRequest(f"document {i}: {r.reason}")
            if i >= lim.max_add_documents:
                raise BadRequest(f"more than {lim.max_add_documents:,} documents in one stream; send several")
            d = r.document
            check_text(f"document {i}: text", d.text, lim.max_document_chars)
            total += len(d.text)
            if total > lim.max_add_chars:
                raise BadRequest(f"the stream's documents exceed {lim.max_add_chars:,} characters; send several")
            for name in ("doc_id", "source", "license", "owner"):
                check_text(f"document {i}: {name}", getattr(d, name), lim.max_value_chars, allow_empty=True)
            row = normalize_record({"doc_id": d.doc_id, "text": d.text, "source": d.source, "license": d.license,
                                    "owner": d.owner, "license_classifiers": list(d.license_classifiers)})
            if row is not None:
                docs.append(row)
        rep = add_documents(store.path, docs, s.model_dir, model=s.model, tok=s.tok)
        if rep["shard"]:
            fresh = store.reopen()  # serve the new shard from the next request on
            with s.lock:
                s.stores[kind] = fresh
        return pb.AddDocumentsResponse(
            added_documents=rep["added_documents"], added_entries=rep["added_entries"], shard=rep["shard"] or "",
            seconds=rep["seconds"], refused=[pb.RefusedDocument(doc_id=r["doc_id"], reason=r["reason"])
                                             for r in rep["refused"]])

    @guarded
    def Compact(self, r, context):
        check_text("store", r.store, self.s.limits.max_value_chars, allow_empty=True)
        total = {"rewritten_shards": 0, "removed_entries": 0, "seconds": 0.0}
        for st in self._stores(r.store):
            # with remote shards, the shard servers hold the indexes: each group compacts its
            # own; shards a live ingest added since are this server's
            local = st.open_options.get("local_from")
            results = [g.compact() for g in st.remotes] if st.remotes else [compact(st.path)]
            if st.remotes and local is not None and local < len(st.shards):
                results.append(compact(st.path, only_shards=set(range(local, len(st.shards)))))
            if any(res["rewritten_shards"] for res in results):
                fresh = st.reopen()  # opened as `st` was: no index loaded for remote shards
                with self.s.lock:
                    self.s.stores[st.manifest.kind] = fresh
            for res in results:
                for k in total:
                    total[k] += res[k]
        if total["rewritten_shards"]:
            del st
            release_freed_memory()  # the compaction's working memory
            self.s.release_later()  # the old store, once unused
        return pb.CompactResponse(**total)
