"""Hard limits on every request field, and the checks that enforce them.

Nothing a client sends may make the server allocate without bound or crash: every count
has a server-side maximum (`Limits`, set by `silo serve` flags), every float must be
finite and in range, enums must be known values (proto3 keeps unknown numbers), tiers
must be real tiers. A violation is `BadRequest` (INVALID_ARGUMENT) with a message that
names the field, its value and the allowed range.

Fields each within range can still multiply into more work than a machine holds (200,000
emoji are 800,000 tokens; with k = 4096 that is 65 GB of neighbours). So every request's
total work is also bounded, computed by the servicer from the exact token count before any
of it is allocated (`check_work`): neighbour slots (tokens or steps x k x refine), one
query's candidates (k x refine), tokens through the LM (windows or RIC blocks x window)
and RIC passages (blocks x passages). Over a cap is `TooMuchWork` (RESOURCE_EXHAUSTED),
naming the cap and its value. The characters of a text (`max_text_chars`) are its first,
cheap bound — they bound the tokenizer's own work — and the exact token count the second.

The defaults keep the largest request allowed under 2 GiB of peak RSS above the loaded
model and stores, so two workers and the streams fit a 2-core / 24 GiB machine with room
to spare: `tools/caps.py` measures at most ~0.3 GB of growth per request at the caps (k
4096 over 4,096 tokens; k 512 x refine 32), to which a model adds its forward batch of
logits (8 windows x window x vocabulary x 8 B: 1 GiB for 32k tokens at window 512).
The caps bound time too (about a minute for the largest on 2 cores with the tiny model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from silo.datastore.errors import TooMuchWork
from silo.datastore.passages import SEARCH_RETRIEVERS
from silo.datastore.policy import RetrievalPolicy
from silo.server.gen import silo_pb2 as pb

from silo.licenses import TIERS


class BadRequest(Exception):
    """INVALID_ARGUMENT with this message."""


# gRPC sends a status message percent-encoded in a trailer, and a client drops trailers
# over 16 KiB (it then sees RESOURCE_EXHAUSTED, not the real status): messages stay short
MAX_MESSAGE_BYTES = 1024


def shown(value: str, limit: int = 64) -> str:
    """A client's value quoted in a message: repr'd, cut to about `limit` characters."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}… ({len(value):,} characters)"


def bounded_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes, keeping its start and its end."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    head = raw[:limit * 3 // 4].decode("utf-8", "ignore")
    tail = raw[len(raw) - limit // 4 + 8:].decode("utf-8", "ignore")
    return f"{head} … {tail}"


BUSY = "the server is busy"  # how a refusal over a call budget begins (server/app.py; HTTP answers it with 429)


@dataclass(frozen=True)
class Limits:
    max_k: int = 4096  # neighbours, passages or hits per query
    max_nprobe: int = 4096
    max_refine_factor: int = 32
    max_new_tokens: int = 512
    max_attribution_top: int = 64
    max_text_chars: int = 200_000  # prompt, text to score or trace, search query
    max_stop_sequences: int = 16
    max_stop_chars: int = 256
    max_patterns: int = 64  # per policy field
    max_pattern_chars: int = 256
    max_optout_values: int = 10_000  # doc ids in one opt-out
    max_value_chars: int = 4096  # one doc id, owner, source, span, reason, store name
    min_span_chars: int = 8
    max_optout_docs: int = 1000  # larger removals need confirm_large
    max_optout_fraction: float = 0.01  # … and so do removals of more than this share of a store
    max_time_limit_s: float = 3600.0
    max_window: int = 8192
    max_trace_min_tokens: int = 1024
    max_add_documents: int = 100_000  # per AddDocuments stream
    max_document_chars: int = 5_000_000
    max_add_chars: int = 200_000_000  # all the text of one AddDocuments stream (it is held until durable)
    max_score_windows: int = 4096  # windows one Score may run (text length x window / stride)
    max_deny_doc_ids: int = 1_000_000  # a deny list a main server sends its shard servers
    # work caps (TooMuchWork, RESOURCE_EXHAUSTED), each a product the servicer computes first
    max_request_tokens: int = 65_536  # tokens of one text to score, trace, tokenize or prompt with
    max_neighbour_slots: int = 1 << 24  # kNN-LM: scored tokens (Score) or steps (Generate) x k x refine
    max_query_candidates: int = 16_384  # one search: k x refine (exact re-ranking reads each one's key)
    max_forward_tokens: int = 1 << 21  # tokens through the LM: Score windows x window, RIC blocks x window
    max_ric_passages: int = 65_536  # RIC-LM: retrieval blocks x passages (each fetched and tokenized)
    # streams open at once; beyond them RESOURCE_EXHAUSTED (server/app.py: admission)
    max_streams: int = 4  # Generate and AddDocuments (they compute beside the unary workers)
    max_watch_streams: int = 8  # reflection and health Watch (each holds a thread while idle)


def check_int(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_work(what: str, amount: int, cap: str, limits: Limits, advice: str = "") -> int:
    """`amount` of work against the cap named `cap` (a field of `Limits`); over it,
    `TooMuchWork` naming the cap, its value and what would make the request fit."""
    limit = getattr(limits, cap)
    if amount > limit:
        raise TooMuchWork(f"{what} is {amount:,}, over the server's cap {cap} = {limit:,}"
                          f"{f' ({advice})' if advice else ''}")
    return amount


def check_float(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


# Sampling divides log-probabilities by the temperature: below this, float32 overflows (a
# NaN distribution), and sampling is greedy decoding anyway
MIN_SAMPLING_TEMPERATURE = 1e-3


def check_sampling_temperature(name: str, value: float, hi: float) -> float:
    """0 (greedy) or a temperature in [MIN_SAMPLING_TEMPERATURE, hi]."""
    check_float(name, value, 0.0, hi)
    if 0.0 < value < MIN_SAMPLING_TEMPERATURE:
        raise BadRequest(f"{name} must be 0 (greedy) or at least {MIN_SAMPLING_TEMPERATURE}, got {value}")
    return value


def check_text(name: str, text: str, limit: int, allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise BadRequest(f"{name} is empty")
    if len(text) > limit:
        raise BadRequest(f"{name} has {len(text):,} characters; the limit is {limit:,}")
    return text


def check_enum(name: str, value: int, enum) -> int:
    if value not in enum.values():
        raise BadRequest(f"{name} {value} is not one of {', '.join(enum.keys())}")
    return value


def _patterns(name: str, values, limits: Limits) -> tuple[str, ...]:
    if len(values) > limits.max_patterns:
        raise BadRequest(f"{name} has {len(values)} patterns; the limit is {limits.max_patterns}")
    for v in values:
        if not v or len(v) > limits.max_pattern_chars:
            raise BadRequest(f"{name}: a pattern must be 1-{limits.max_pattern_chars} characters")
    return tuple(values)


def policy_from_pb(p: pb.RetrievalPolicy, limits: Limits | None = None) -> RetrievalPolicy:
    """A checked `RetrievalPolicy` from its message: known tiers, bounded patterns."""
    limits = limits or Limits()
    bad = [t for t in p.tiers if t not in TIERS]
    if bad:
        raise BadRequest(f"policy.tiers: unknown tier(s) {', '.join(shown(t) for t in bad[:5])}"
                         f"{' …' if len(bad) > 5 else ''}; expected {', '.join(TIERS)}")
    fields = {f: _patterns(f"policy.{f}", getattr(p, f), limits)
              for f in ("allow_licenses", "deny_licenses", "allow_sources", "deny_sources", "deny_owners")}
    return RetrievalPolicy(tiers=tuple(dict.fromkeys(p.tiers)) or None, **fields)


def check_retriever(name: str, value: str) -> None:
    """A passage retriever's name: empty (the store's default) or one of SEARCH_RETRIEVERS."""
    if value and value not in SEARCH_RETRIEVERS:
        raise BadRequest(f"{name} must be one of {', '.join(SEARCH_RETRIEVERS)} (or empty: the store's default), "
                         f"got {shown(value)}")


def check_retrieval(r: pb.RetrievalOptions, limits: Limits) -> None:
    """Every field of RetrievalOptions against the limits (mode, k, λ, T, nprobe, refine, reuse,
    skip_above, stride)."""
    check_enum("retrieval.mode", r.mode, pb.RetrievalMode)
    if r.HasField("k"):
        check_int("retrieval.k", r.k, 1, limits.max_k)
    if r.HasField("lambda_"):
        check_float("retrieval.lambda_", r.lambda_, 0.0, 1.0)
    if r.HasField("temperature"):
        check_float("retrieval.temperature", r.temperature, 0.0, 1e6, lo_open=True)
    check_int("retrieval.nprobe", r.nprobe, 0, limits.max_nprobe)
    if r.HasField("refine_factor"):
        check_int("retrieval.refine_factor", r.refine_factor, 1, limits.max_refine_factor)
    if r.HasField("reuse"):
        check_int("retrieval.reuse", r.reuse, 0, r.k if r.HasField("k") else limits.max_k)
    if r.HasField("skip_above"):
        check_float("retrieval.skip_above", r.skip_above, 0.0, 1.0, lo_open=True)
    check_int("retrieval.ric_stride", r.ric_stride, 0, limits.max_window)
    check_retriever("retrieval.retriever", r.retriever)
