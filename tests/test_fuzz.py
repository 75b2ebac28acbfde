"""Property-based fuzzing of every request message of every RPC, against real servers.

What is fuzzed: every method of every service in the contract (`pb.DESCRIPTOR`, so an RPC
added to `silo.proto` later is fuzzed with no change here), three ways:

- **messages**: requests drawn from the protobuf descriptors, recursively — integers at
  their extremes, NaN/±inf/-0.0/huge/tiny floats, empty, blank, long and astral-plane
  strings, random bytes, unknown enum numbers, nested and repeated messages, oneofs (at
  most one member) and proto3 `optional` presence — mixed with a small dictionary of
  values the servers know (tiers, store kinds, doc ids, owners, the store's fingerprint)
  so that a share of the cases gets past validation into the library code;
- **bytes on the wire**: random bytes, and serialized requests truncated, bit-flipped or
  with garbage appended, sent with identity serializers;
- **invalid UTF-8**: a valid encoding with a string field's bytes corrupted, which the
  server must refuse with INVALID_ARGUMENT naming UTF-8.

Calls carry the admin token (so authorization does not short-circuit everything), an
owner's token, no token, or a wrong one. Why: a request is the one thing anybody can
control, so whatever it holds the server must answer with a proper status — never
UNKNOWN or INTERNAL — with a message that says what to fix, and stay healthy (health
SERVING, a normal Score call works) afterwards. The servers run over private copies of a
small store with small `Limits`, so OptOut and Compact really remove and compact and
every case is quick. ShardSearch is fuzzed on a shard server with the shard token, and
the public services also on a main server whose token store lives on that shard server.

Reproducible: every (kind, server, method) runs derandomized from a seed of its own, and
strings the servers answered with (doc ids, receipts, store names) feed later requests in
a fixed test order. `pytest -s` prints the number of cases and the statuses per method.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import struct
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from silo.datastore.manifest import Manifest
from silo.server.app import build_server, load_state
from silo.server.auth import ADMIN, OWNER, PUBLIC, RPC_ACCESS, SHARD, Auth, OwnerCredentials
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import Limits
from silo.server.remote import ShardSearchServicer
from silo.server.servicers import DatastoreServicer, LanguageModelServicer

from silo.build import BuildArgs, build_store

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
SHARD_TOKEN = "fuzz-shard-token-0123456789"
FUZZ_OWNER = "owner-1"
LIMITS = Limits(max_new_tokens=4, max_text_chars=2000, max_k=64, max_nprobe=64, max_window=256)
TIMEOUT_S = 20.0  # a case still running after this is a hang: DEADLINE_EXCEEDED fails it
WINDOW = 128
MAX_EXAMPLES = {"message": 150, "wire": 60, "utf8": 40}
REMOTE_SHARE = 2  # the main server over remote shards gets 1/REMOTE_SHARE of the examples
MAX_DEPTH = 4  # nested messages deeper than this are left empty
MAX_DETAILS_CHARS = 1024  # a status message longer than this is not one a person reads

METHODS: list[MethodDescriptor] = [m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]
INTERNAL_SERVICES = {"silo.v1.ShardSearch"}  # served by shard servers, not by `silo serve`
S = grpc.StatusCode
NEVER = {S.UNKNOWN, S.INTERNAL, S.CANCELLED, S.UNIMPLEMENTED, S.DATA_LOSS, S.DEADLINE_EXCEEDED}


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# ---------------------------------------------------------------------------- strategies from descriptors

INT_RANGES: dict[int, tuple[int, int]] = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32),
                    (-(1 << 31), (1 << 31) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64),
                    (-(1 << 63), (1 << 63) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, (1 << 32) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, (1 << 64) - 1)),
}
EXTREME_INTS = (0, 1, -1, 2, -2, 127, 128, 255, 256, 1 << 15, 1 << 16, (1 << 31) - 1, 1 << 31, -(1 << 31),
                -(1 << 31) - 1, (1 << 32) - 1, 1 << 32, 1 << 53, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1)
F32_MAX = 3.4028234663852886e38
SPECIAL_FLOATS = (math.nan, -math.nan, math.inf, -math.inf, -0.0, -1.0, -1e-45, 1e-45, 1.1754944e-38, F32_MAX,
                  -F32_MAX, 1e6, 1.0000001, 100.00001, 3600.0, 3601.0, 1e30)
SPECIAL_DOUBLES = (*SPECIAL_FLOATS, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308, 1e300)
SPECIAL_STRINGS = ("", " ", "\t\n \r", "\x00", "\x00abc", "\u200b", "\ufeff", "a\u0301", "\U0010fffd",
                   "😀" * 3, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🏳️\u200d🌈", "*", "**", "?", "[", "[!]", "[a-", "\\", "%s%n%x",
                   "{}", "'\"", "../../etc/passwd", "\r\n\r\n", "NaN", "-1", "ü" * 300)
MAX_REPEATED = 70  # a little above the largest per-request list limit we can reach (64 patterns)


@dataclass(frozen=True)
class Dictionary:
    """Values the servers know, mixed into the random ones so cases get past validation."""

    words: tuple[str, ...]
    numbers: tuple[int, ...]  # small meaningful integers (the store's dimension, …)
    boundaries: tuple[int, ...]  # every limit, ±1: lengths, counts and values at the edge
    hints: dict[str, tuple[str, ...]]  # field name -> values that field takes


# Strings the servers answered with, by field name (doc ids, receipts, store names, …):
# a tame string field draws from those of its own name (or an alias), so later cases
# name things that exist — OptOutStatus asks about receipts OptOut returned.
SEEN: dict[str, list[str]] = defaultdict(list)
ALIASES = {"ids": ("doc_id", "removed_doc_ids"), "doc_id": ("removed_doc_ids",), "store": ("name", "kind"),
           "deny_owners": ("owner",), "allow_sources": ("source", "sources"), "deny_sources": ("source", "sources"),
           "allow_licenses": ("license",), "deny_licenses": ("license",), "tiers": ("tier",)}


def harvest(msg: Message) -> None:
    """Remember the short strings of a response (and string map keys), by field name."""
    for f, value in msg.ListFields():
        strings: list[str] = []
        if is_map(f):
            if f.message_type.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
                strings = list(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            for v in value if f.is_repeated else [value]:
                harvest(v)
        elif f.type == FieldDescriptor.TYPE_STRING:
            strings = list(value) if f.is_repeated else [value]
        pool = SEEN[f.name]
        for v in strings:
            if 0 < len(v) <= 100 and v not in pool and len(pool) < 64:
                pool.append(v)


def limit_boundaries(limits: Limits) -> tuple[int, ...]:
    out = set()
    for f in fields(limits):
        v = getattr(limits, f.name)
        if isinstance(v, int):
            out.update((v - 1, v, v + 1))
    return tuple(sorted(x for x in out if x >= 0))


@functools.cache
def real_oneofs(desc: Descriptor) -> list:
    """The message's oneofs, without the synthetic ones of proto3 `optional` fields."""
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    synthetic = {proto.oneof_decl[f.oneof_index].name for f in proto.field if f.proto3_optional}
    return [o for o in desc.oneofs if o.name not in synthetic]


def is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


class Fuzzer:
    """Hypothesis strategies for any protobuf message, built from its descriptor.

    Each value is *tame* (what a server accepts more often than not: small numbers, known
    words, known enum values) or *odd* (extremes, NaN, unknown enums, empty, huge); a
    request is drawn with a wildness (the share of odd values: none, about one, or many)
    and a density (the share of its fields set), so that some cases reach the library
    code with one odd value — where a value no validator caught does damage — and the
    rest hit every validator."""

    def __init__(self, dictionary: Dictionary):
        self.d = dictionary
        self._scalar: dict[tuple, st.SearchStrategy] = {}
        self._messages: dict[tuple, st.SearchStrategy] = {}
        lengths = st.one_of(st.integers(0, 3000), st.sampled_from([b for b in dictionary.boundaries if b <= 10_000]))
        self.long_text = st.builds(lambda piece, n: (piece * (n // len(piece) + 1))[:n],
                                   st.text(min_size=1, max_size=6), lengths)
        self.word = st.one_of(
            st.sampled_from(dictionary.words),
            st.text(st.characters(codec="ascii", categories=("L", "N", "Zs")), min_size=1, max_size=24))
        self.odd_text = st.one_of(
            st.text(max_size=40),  # any code point but surrogates, astral ones included
            st.sampled_from(SPECIAL_STRINGS), self.long_text)
        self.odd_binary = st.one_of(
            st.binary(max_size=512),
            st.lists(st.floats(width=32), max_size=64).map(lambda xs: struct.pack(f"<{len(xs)}f", *xs)),
            st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 20_000)))
        self.sizes = (st.integers(0, 3), st.sampled_from([b for b in dictionary.boundaries if b <= MAX_REPEATED]))
        self.density = st.sampled_from([25, 50, 75, 90, 100])  # % of a message's fields set
        self.wildness = st.sampled_from([0, 5, 15, 50])  # % of the values that are odd

    def scalar(self, f: FieldDescriptor) -> tuple[st.SearchStrategy, st.SearchStrategy]:
        """(tame, odd) values of a scalar field."""
        key = (f.type, f.enum_type.full_name if f.enum_type else None, f.name)
        if key not in self._scalar:
            self._scalar[key] = self._scalars(f)
        return self._scalar[key]

    @staticmethod
    def pick(draw, pair: tuple[st.SearchStrategy, st.SearchStrategy], wild: int):
        """A tame or (with `wild`% chance) an odd value; shrinks towards tame."""
        return draw(pair[1] if wild and draw(st.integers(0, 99)) >= 100 - wild else pair[0])

    def hinted(self, name: str) -> st.SearchStrategy[str]:
        """A value this field name is known to take: from the hints, or seen in a response
        (read when drawn, so it grows as the servers answer)."""
        def pick(i: int) -> str:
            pool = [*self.d.hints.get(name, ()), *(v for n in (name, *ALIASES.get(name, ())) for v in SEEN[n])]
            return pool[i % len(pool)] if pool else self.d.words[i % len(self.d.words)]
        return st.integers(0, 1 << 16).map(pick)

    def _scalars(self, f: FieldDescriptor) -> tuple[st.SearchStrategy, st.SearchStrategy]:
        """(tame, odd) values of a scalar field's type."""
        t = f.type
        if t in INT_RANGES:
            lo, hi = INT_RANGES[t]
            known = [x for x in self.d.numbers if lo <= x <= hi] or [1]
            edges = [x for x in (*EXTREME_INTS, *self.d.boundaries) if lo <= x <= hi]
            return (st.one_of(st.just(0), st.integers(1, 8), st.sampled_from(known)),
                    st.one_of(st.sampled_from(edges), st.integers(lo, hi)))
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
            special = SPECIAL_FLOATS if width == 32 else SPECIAL_DOUBLES
            tiny = (1e-45, 1.1754944e-38) if width == 32 else (5e-324, 2.2250738585072014e-308)
            # in range, but tiny: 1/x overflows
            return (st.one_of(st.sampled_from([0.0, 0.5, 1.0, 0.1, 2.0, 10.0, *tiny]), st.floats(0, 1, width=width)),
                    st.one_of(st.sampled_from(special), st.floats(width=width)))
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans(), st.booleans()
        if t == FieldDescriptor.TYPE_STRING:
            return st.one_of(self.hinted(f.name), self.word), self.odd_text
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64), self.odd_binary
        if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel
            known = [v.number for v in f.enum_type.values]
            unknown = [x for x in (-1, max(known) + 1, 99, (1 << 31) - 1, -(1 << 31)) if x not in known]
            return st.sampled_from(known), st.one_of(st.sampled_from(unknown), st.integers(-(1 << 31), (1 << 31) - 1))
        raise NotImplementedError(f"no strategy for field type {t} ({f.full_name})")

    def message(self, desc: Descriptor, depth: int = 0, wild: int | None = None) -> st.SearchStrategy:
        """Messages of type `desc`; `wild` None: a wildness is drawn (nested messages share it)."""
        key = (desc.full_name, depth, wild)
        if key not in self._messages:
            cls = GetMessageClass(desc)

            @st.composite
            def build(draw) -> Message:
                msg = cls()
                if depth <= MAX_DEPTH:
                    w = draw(self.wildness) if wild is None else wild
                    self._fill(draw, msg, draw(self.density), depth, w)
                return msg

            self._messages[key] = build()
        return self._messages[key]

    def _fill(self, draw, msg: Message, density: int, depth: int, wild: int) -> None:
        desc = msg.DESCRIPTOR
        in_oneof = set()
        for oneof in real_oneofs(desc):  # at most one member set
            in_oneof.update(f.name for f in oneof.fields)
            member = draw(st.one_of(st.none(), st.sampled_from(list(oneof.fields))))
            if member is not None:
                self._set(draw, msg, member, depth, wild)
        for f in desc.fields:
            # unset (the default; no presence for proto3 `optional`) shrinks to unset
            if f.name not in in_oneof and draw(st.integers(0, 99)) >= 100 - density:
                self._set(draw, msg, f, depth, wild)

    def _set(self, draw, msg: Message, f: FieldDescriptor, depth: int, wild: int) -> None:
        def element(g: FieldDescriptor):
            if g.type == FieldDescriptor.TYPE_MESSAGE:
                return draw(self.message(g.message_type, depth + 1, wild))
            return self.pick(draw, self.scalar(g), wild)

        if is_map(f):
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            target = getattr(msg, f.name)
            for _ in range(self.pick(draw, self.sizes, wild)):
                k = element(key_f)
                if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                    target[k].MergeFrom(element(value_f))
                else:
                    target[k] = element(value_f)
        elif f.is_repeated:
            n = self.pick(draw, self.sizes, wild)
            if n:  # a few drawn elements, cycled to the drawn length (keeps long lists cheap)
                some = [element(f) for _ in range(draw(st.integers(1, 3)))]
                getattr(msg, f.name).extend(some[i % len(some)] for i in range(n))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, f.name)
            sub.SetInParent()
            sub.MergeFrom(element(f))
        else:
            setattr(msg, f.name, element(f))

    def requests(self, method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
        """One request, or for a client-streaming method a stream of 0-4 of them."""
        one = self.message(method.input_type)
        return st.lists(one, max_size=4) if method.client_streaming else one.map(lambda m: [m])


# ---------------------------------------------------------------------------- string fields, for UTF-8 corruption

MARKER = "zQ8xUTF8MARKq"  # replaced by invalid UTF-8 of the same length after serializing


def string_slots(desc: Descriptor, depth: int = 0) -> list[tuple[str, ...]]:
    """Paths to every string field reachable from `desc`: field names; "+" appends an
    element to a repeated message field, "{}" a key to a map."""
    out: list[tuple[str, ...]] = []
    if depth > MAX_DEPTH:
        return out
    for f in desc.fields:
        if is_map(f):
            key_f = f.message_type.fields_by_name["key"]
            if key_f.type == FieldDescriptor.TYPE_STRING:
                out.append((f.name, "{}"))
        elif f.type == FieldDescriptor.TYPE_STRING:
            out.append((f.name,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            step = (f.name, "+") if f.is_repeated else (f.name,)
            out += [step + rest for rest in string_slots(f.message_type, depth + 1)]
    return out


def plant(msg: Message, slot: tuple[str, ...], value: str) -> None:
    """Put `value` into the string field at `slot` (creating the messages on the way)."""
    name, rest = slot[0], slot[1:]
    f = msg.DESCRIPTOR.fields_by_name[name]
    if rest[:1] == ("{}",):
        target = getattr(msg, name)
        value_f = f.message_type.fields_by_name["value"]
        if value_f.type == FieldDescriptor.TYPE_MESSAGE:
            target[value].SetInParent()
        else:
            target[value] = value_f.default_value
    elif not rest:
        if f.is_repeated:
            getattr(msg, name).append(value)
        else:
            setattr(msg, name, value)
    elif rest[0] == "+":
        plant(getattr(msg, name).add(), rest[1:], value)
    else:
        sub = getattr(msg, name)
        sub.SetInParent()
        plant(sub, rest, value)


INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80")


def field_words(desc: Descriptor, depth: int = 0) -> set[str]:
    """Every field and oneof name reachable from `desc`, as a message may spell it."""
    out: set[str] = set()
    if depth > MAX_DEPTH:
        return out
    for name in [f.name for f in desc.fields] + [o.name for o in desc.oneofs]:
        name = name.lstrip("_").rstrip("_")
        out |= {name, name.replace("_", " "), name.rstrip("s"), name.replace("_", " ").rstrip("s")}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            out |= field_words(f.message_type, depth + 1)
    return {w for w in out if w}


# ---------------------------------------------------------------------------- servers and callers


@dataclass
class Target:
    """One server under test, with what a call to it may legitimately answer."""

    name: str
    address: str
    services: set[str]
    callers: dict[str, tuple[str, tuple[tuple[str, str], ...]]]  # label -> (principal kind, metadata)
    privileged: str  # the caller most cases use: the one that may call everything here
    remote_shards: bool = False  # UNAVAILABLE is a proper answer only here
    probe: Callable[[grpc.Channel], None] | None = None
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    seconds: float


CASES: Counter[str] = Counter()  # cases run per method path (examples, replays and shrinks)
SECONDS: Counter[str] = Counter()  # "fuzz": inside the hypothesis runs; "setup": stores and servers
CODES: dict[str, Counter[str]] = defaultdict(Counter)  # path -> status name -> count
SLOWEST: list[tuple[float, str]] = []


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def call(target: Target, method: MethodDescriptor, payloads: list[bytes],
         metadata: tuple[tuple[str, str], ...]) -> Outcome:
    """Send raw request bytes (a list: one per message of a client stream) and collect
    the status, its message and the raw responses."""
    kinds = {(False, False): target.channel.unary_unary, (False, True): target.channel.unary_stream,
             (True, False): target.channel.stream_unary, (True, True): target.channel.stream_stream}
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path_of(method), request_serializer=lambda b: b, response_deserializer=lambda b: b)
    request: Any = iter(payloads) if method.client_streaming else payloads[0]
    t = time.perf_counter()
    responses: list[bytes] = []
    try:
        result = stub(request, timeout=TIMEOUT_S, metadata=metadata)
        responses = list(result) if method.server_streaming else [result]
        code, details = S.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    seconds = time.perf_counter() - t
    path = path_of(method)
    CASES[path] += 1
    CODES[f"{target.name} {path}"][code.name] += 1
    SLOWEST.append((seconds, f"{target.name} {path}"))
    SLOWEST.sort(reverse=True)
    del SLOWEST[5:]
    return Outcome(code, details, responses, seconds)


def permitted(access: str, kind: str) -> bool:
    return (access == PUBLIC or (access == OWNER and kind in ("admin", "owner"))
            or (access == ADMIN and kind == "admin") or (access == SHARD and kind == "shard"))


def check_outcome(target: Target, method: MethodDescriptor, kind: str, out: Outcome, what: str) -> None:
    """The status is a proper one for this caller, its message is actionable, and the
    server still answers health checks and a normal call."""
    path = path_of(method)
    access = RPC_ACCESS.get(path)
    assert access is not None, f"{path} has no entry in silo.server.auth.RPC_ACCESS"
    where = f"{what} to {path} on the {target.name} server as {kind}"
    assert out.code not in NEVER, f"{where}: {out.code.name}: {out.details!r}"
    if not permitted(access, kind):
        assert out.code == S.UNAUTHENTICATED, f"{where}: {out.code.name} ({out.details!r}), not UNAUTHENTICATED"
    else:
        allowed = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}
        allowed |= {S.PERMISSION_DENIED} if kind == "owner" else set()
        allowed |= {S.UNAVAILABLE} if target.remote_shards else set()
        assert out.code in allowed, f"{where}: {out.code.name}: {out.details!r}"
    if out.code == S.OK:
        response_cls = GetMessageClass(method.output_type)
        for raw in out.responses:  # every response is a well-formed message of the contract
            harvest(response_cls.FromString(raw))
        return
    d = out.details
    assert d.strip(), f"{where}: {out.code.name} with an empty message"
    assert len(d) <= MAX_DETAILS_CHARS, f"{where}: {out.code.name} message of {len(d):,} characters: {d[:200]!r}…"
    assert not re.search(r"Traceback|Exception calling application|internal error", d), f"{where}: {d!r}"
    if out.code == S.INVALID_ARGUMENT:
        # it names what is wrong: a field of the request (or the request), or its encoding
        words = field_words(method.input_type) | {method.input_type.name, "UTF-8", "parsed"}
        assert any(re.search(rf"(?<![A-Za-z0-9]){re.escape(w)}s?(?![A-Za-z0-9])", d, re.IGNORECASE)
                   for w in words), f"{where}: INVALID_ARGUMENT message names no field: {d!r}"
    if out.code == S.UNAUTHENTICATED:
        assert re.search(r"token|credential", d, re.IGNORECASE), f"{where}: {d!r}"


def check_healthy(target: Target, every_service: bool = False) -> None:
    """Health SERVING (the server's, or every service's too) and a normal call answers."""
    health = health_pb2_grpc.HealthStub(target.channel)
    for service in ("", *sorted(target.services)) if every_service else ("",):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target.name} {service!r}: {resp}"
    if target.probe is not None:
        target.probe(target.channel)


def score_probe(channel: grpc.Channel) -> None:
    score = channel.unary_unary("/silo.v1.LanguageModel/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                response_deserializer=pb.ScoreResponse.FromString)
    assert score(pb.ScoreRequest(text="The tower of Oslo"), timeout=TIMEOUT_S).num_tokens > 0


def shard_probe(channel: grpc.Channel) -> None:
    search = channel.unary_unary("/silo.v1.ShardSearch/SearchShards",
                                 request_serializer=pb.ShardSearchRequest.SerializeToString,
                                 response_deserializer=pb.ShardSearchResponse.FromString)
    assert search(pb.ShardSearchRequest(), timeout=TIMEOUT_S, metadata=bearer(SHARD_TOKEN)).shards


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_stores(tmp_path_factory, tiny_model, corpus_dir) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    t = time.perf_counter()
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(root / "store"), tiers=("restricted",),
                          shards=2, window=WINDOW, stride=WINDOW // 2, progress=False))
    build_store(BuildArgs(model=str(tiny_model), kind="passage", corpus=str(corpus_dir), out=str(root / "passages"),
                          tiers=("restricted",), passage_tokens=64, progress=False))
    build_store(BuildArgs(model=str(tiny_model), kind="infgram", corpus=str(corpus_dir), out=str(root / "ngrams"),
                          tiers=("restricted",), progress=False))
    SECONDS["setup"] += time.perf_counter() - t
    return root / "store", root / "passages", root / "ngrams"


@dataclass
class World:
    targets: dict[str, Target]
    fuzzer: Fuzzer
    dim: int  # of the token store's keys


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, fuzz_stores) -> Iterator[World]:
    """A main server (token, passage and ∞-gram stores), a shard server (both shards of another copy)
    and a main server whose token store is searched on that shard server."""
    root = tmp_path_factory.mktemp("fuzz-servers")
    t = time.perf_counter()
    store, passages, ngrams = fuzz_stores
    for name, src in (("main-store", store), ("main-passages", passages), ("main-ngrams", ngrams),
                      ("shared-store", store)):
        shutil.copytree(src, root / name)
    owners = OwnerCredentials(root / "credentials.json")
    owner_token, _ = owners.issue(FUZZ_OWNER)
    auth = Auth(admin_token=ADMIN_TOKEN, owners=owners)
    servers = []

    def main_server(stores: list[Path], **kw) -> str:
        state = load_state(str(tiny_model), [str(p) for p in stores], auth=auth, limits=LIMITS,
                           shard_token=SHARD_TOKEN, **kw)
        server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                        "Datastore": DatastoreServicer(state)}, 0, auth=auth, max_workers=2)
        servers.append(server)
        return f"127.0.0.1:{port}"

    manifest = Manifest.load(root / "shared-store")
    shard_server, shard_port, _ = build_server(
        {"ShardSearch": ShardSearchServicer(root / "shared-store", set(range(len(manifest.shards))), LIMITS)},
        0, auth=Auth(shard_token=SHARD_TOKEN), max_workers=2)
    servers.append(shard_server)
    main = main_server([root / "main-store", root / "main-passages", root / "main-ngrams"])
    remote = main_server([root / "shared-store"], remote_shards=[f"127.0.0.1:{shard_port}"], shard_deadline_s=10.0)

    public = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()} - INTERNAL_SERVICES
    wrong = (("anonymous", ()), ("anonymous", bearer("wrong-token-0123456789")),
             ("anonymous", (("authorization", ADMIN_TOKEN),)), ("anonymous", bearer(ADMIN_TOKEN[:-1])))
    main_callers = {"admin": ("admin", bearer(ADMIN_TOKEN)), "owner": ("owner", bearer(owner_token)),
                    "anonymous": wrong[0], "wrong": wrong[1], "no-bearer": wrong[2], "near-miss": wrong[3],
                    "shard": ("anonymous", bearer(SHARD_TOKEN))}
    shard_callers = {"shard": ("shard", bearer(SHARD_TOKEN)), "anonymous": wrong[0], "wrong": wrong[1],
                     "admin": ("anonymous", bearer(ADMIN_TOKEN)), "near-miss": ("anonymous", bearer(SHARD_TOKEN[1:]))}
    targets = {
        "main": Target("main", main, public, main_callers, "admin", probe=score_probe),
        "remote": Target("remote", remote, public, main_callers, "admin", remote_shards=True, probe=score_probe),
        "shard": Target("shard", f"127.0.0.1:{shard_port}", INTERNAL_SERVICES, shard_callers, "shard", probe=shard_probe),
    }
    docs = tuple(f"doc-{i:04d}" for i in (4, 5, 10, 11, 16, 1, 9999))  # restricted (in the stores), sw, none
    owners, sources = (FUZZ_OWNER, "owner-2", "owner-4"), ("github", "news", "books", "gutenberg")
    licenses, spans = ("*", "*-NC-*", "CC-BY-*", "MIT", "GPL-3.0-only"), ("the observatory of Kyoto", "def parse")
    hints = {"store": ("token", "passage", ""), "tiers": ("pd", "sw", "by", "restricted"), "ids": docs,
             "doc_id": docs, "owner": owners, "deny_owners": owners, "source": sources, "allow_sources": sources,
             "deny_sources": sources, "allow_licenses": licenses, "deny_licenses": licenses, "text_span": spans,
             "store_fingerprint": (manifest.model_fingerprint, "")}
    words = ("The tower of Oslo", "In 1734, Claude Shannon finished", "rcpt-0000", "store",
             *{v for values in hints.values() for v in values if v})
    dictionary = Dictionary(words=tuple(sorted(words)), numbers=(1, 2, 3, 4, 8, 16, 64, 128, manifest.dim),
                            boundaries=limit_boundaries(LIMITS), hints=hints)
    SECONDS["setup"] += time.perf_counter() - t
    try:
        yield World(targets, Fuzzer(dictionary), manifest.dim)
    finally:
        for t in targets.values():
            t.channel.close()
        for s in servers:
            s.stop(0)


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    """Print how many cases ran (pytest -s shows it), per method and status."""
    yield
    print(f"\nfuzz: {sum(CASES.values())} cases over {len(CASES)} methods in {SECONDS['fuzz']:.1f} s "
          f"(stores and servers built in {SECONDS['setup']:.1f} s); slowest: "
          + ", ".join(f"{p} {s:.2f} s" for s, p in SLOWEST[:3]))
    for key in sorted(CODES):
        print(f"  {key}: " + ", ".join(f"{c} {n}" for c, n in CODES[key].most_common()))


# ---------------------------------------------------------------------------- method-specific help


def consistent_shard_query(draw, msg: Message, w: World) -> None:
    """SearchShards checks queries against num_queries x dim before anything else: make half
    the cases consistent (random vectors, some poisoned with NaN/inf) to reach the search."""
    if not draw(st.booleans()):
        return
    n = draw(st.integers(1, 3))
    q = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((n, w.dim)).astype("<f4")
    poison = draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf, F32_MAX, 0.0]))
    if poison is not None:
        q[draw(st.integers(0, n - 1)), draw(st.integers(0, w.dim - 1))] = poison
    msg.num_queries, msg.dim, msg.queries = n, w.dim, q.tobytes()


HELPERS: dict[str, Callable[[Any, Message, World], None]] = {
    "/silo.v1.ShardSearch/SearchShards": consistent_shard_query,
}


# ---------------------------------------------------------------------------- the properties


def cases() -> list:
    out = []
    for m in METHODS:
        for target in (("shard",) if m.containing_service.full_name in INTERNAL_SERVICES else ("main", "remote")):
            out.append(pytest.param(target, m, id=f"{target}-{m.containing_service.name}.{m.name}"))
    return out


def fuzz(target: Target, method: MethodDescriptor, kind: str, case: Callable[[Any], None]) -> None:
    """Run `case(data)` as a hypothesis test with a seed of its own (reproducible), then
    check every service of the server is still SERVING."""
    n = MAX_EXAMPLES[kind] // (REMOTE_SHARE if target.remote_shards else 1)

    @seed(zlib.crc32(f"{kind}:{target.name}:{path_of(method)}".encode()))
    @settings(max_examples=max(n, 5), derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data) -> None:
        case(data)

    t = time.perf_counter()
    try:
        run()
    finally:
        SECONDS["fuzz"] += time.perf_counter() - t
    check_healthy(target, every_service=True)


RANDOM_CALLER = "random"
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


def draw_caller(data, target: Target) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Mostly the privileged credential of the target, sometimes any other, or a random
    authorization header (anonymous: nobody guesses a token)."""
    label = data.draw(st.sampled_from([target.privileged] * 8 + sorted(target.callers) + [RANDOM_CALLER]),
                      label="caller")
    if label == RANDOM_CALLER:
        value = data.draw(st.one_of(HEADER_TEXT, HEADER_TEXT.map("Bearer {}".format)), label="authorization")
        return "anonymous", (("authorization", value),)
    return target.callers[label]


@pytest.mark.parametrize(("target_name", "method"), cases())
def test_random_messages_get_a_proper_status(world: World, target_name: str, method: MethodDescriptor) -> None:
    target = world.targets[target_name]
    helper = HELPERS.get(path_of(method))
    oks = []

    def case(data) -> None:
        kind, metadata = draw_caller(data, target)
        requests = data.draw(world.fuzzer.requests(method), label="requests")
        if helper is not None:
            for r in requests:
                helper(data.draw, r, world)
        out = call(target, method, [r.SerializeToString() for r in requests], metadata)
        check_outcome(target, method, kind, out, f"{requests!r}"[:2000])
        check_healthy(target)
        oks.append(out.code == S.OK)

    fuzz(target, method, "message", case)
    # the fuzzing means something only if some cases got all the way through (on the server
    # with local stores: over remote shards, some methods refuse every call by design)
    assert any(oks) or target.remote_shards, (
        f"no random {method.input_type.name} got OK from {path_of(method)}: extend the dictionary")


def mutated(fuzzer: Fuzzer, method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, or a valid encoding truncated, bit-flipped, or with bytes inserted."""
    encoded = fuzzer.message(method.input_type).map(lambda m: m.SerializeToString())

    def mutate(b: bytes, op: int, at: int, junk: bytes, bit: int) -> bytes:
        i = at % (len(b) + 1)
        if op == 0:
            return b[:i]
        if op == 1 and b:
            i = min(i, len(b) - 1)
            return b[:i] + bytes([b[i] ^ (1 << bit)]) + b[i + 1:]
        return b[:i] + junk + b[i:]

    return st.one_of(st.binary(max_size=256),
                     st.builds(mutate, encoded, st.integers(0, 2), st.integers(0, 1 << 16), st.binary(max_size=16),
                               st.integers(0, 7)))


@pytest.mark.parametrize(("target_name", "method"), cases())
def test_random_bytes_on_the_wire_get_a_proper_status(world: World, target_name: str,
                                                      method: MethodDescriptor) -> None:
    target = world.targets[target_name]
    payload = mutated(world.fuzzer, method)

    def case(data) -> None:
        kind, metadata = draw_caller(data, target)
        payloads = data.draw(st.lists(payload, max_size=4) if method.client_streaming else payload.map(lambda b: [b]),
                             label="payloads")
        out = call(target, method, payloads, metadata)
        check_outcome(target, method, kind, out, f"bytes {payloads!r}"[:2000])
        check_healthy(target)

    fuzz(target, method, "wire", case)


@pytest.mark.parametrize(("target_name", "method"),
                         [c for c in cases() if string_slots(c.values[1].input_type)])
def test_invalid_utf8_in_any_string_is_invalid_argument(world: World, target_name: str,
                                                       method: MethodDescriptor) -> None:
    target = world.targets[target_name]
    slots = string_slots(method.input_type)

    def case(data) -> None:
        kind, metadata = draw_caller(data, target)
        requests = data.draw(world.fuzzer.requests(method).filter(bool), label="requests")
        which = data.draw(st.integers(0, len(requests) - 1), label="which")
        slot = data.draw(st.sampled_from(slots), label="slot")
        plant(requests[which], slot, MARKER)
        bad = data.draw(st.sampled_from(INVALID_UTF8), label="bad")
        prefix = data.draw(st.integers(0, len(MARKER) - len(bad)), label="at")
        corrupt = (MARKER[:prefix].encode() + bad + MARKER[prefix + len(bad):].encode())[:len(MARKER)]
        payloads = [r.SerializeToString() for r in requests]
        assert payloads[which].count(MARKER.encode()) == 1
        payloads[which] = payloads[which].replace(MARKER.encode(), corrupt)
        out = call(target, method, payloads, metadata)
        check_outcome(target, method, kind, out, f"{slot} corrupted in {requests!r}"[:2000])
        # a later message of a client stream may never be read: the server can refuse an
        # earlier one first (any proper status, checked above)
        if permitted(RPC_ACCESS[path_of(method)], kind) and which == 0:
            assert out.code == S.INVALID_ARGUMENT and "UTF-8" in out.details, (
                f"invalid UTF-8 in {'.'.join(slot)} of {path_of(method)}: {out.code.name} {out.details!r}")
        check_healthy(target)

    fuzz(target, method, "utf8", case)


def test_every_contract_method_is_fuzzed() -> None:
    """A new RPC in the contract lands in the fuzzing without a change here."""
    fuzzed = {path_of(c.values[1]) for c in cases()}
    assert fuzzed == {path_of(m) for m in METHODS} and len(fuzzed) >= 11
    assert all(path in RPC_ACCESS for path in fuzzed)
