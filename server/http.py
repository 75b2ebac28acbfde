"""The OpenAI-compatible HTTP API and the data owners' page (`silo serve --http-port`).

Every route is a transcoder, not a second implementation: it builds the gRPC request
message, checks the caller's credentials with the table gRPC uses (`Auth.refuse`), and
runs the gRPC servicer's own method inside the server's own budgets (`Admission.unary` /
`Admission.stream`), with an `HttpCall` standing in for the gRPC context. So HTTP and gRPC
share every limit, work cap, status code and library call, and cannot drift apart; a test
sends the same requests both ways and compares tokens, log-probs and citations.

- `POST /v1/completions` is OpenAI's legacy completions API (prompt as text, texts or
  token ids; `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `logprobs`, `echo`,
  `stream`), one `Generate` per prompt × n. SILO's retrieval options ride in the extension
  field `silo` (or in the model id: `MODEL:knn`), and each choice carries its mode,
  citations and traced spans in `choices[i].silo`. `echo` + `logprobs` scores the prompt
  under the mode's own distribution (`GenerateRequest.echo`): how lm-evaluation-harness
  measures log-likelihood. The first prompt token is scored after BOS (a number, where
  OpenAI's models give null).
- `GET /v1/models`; `/tokenizer_info`, `/tokenize`, `/detokenize` (vLLM's paths: the
  harness's remote tokenizer uses them).
- `/v1/silo/...`: Search, Trace, Score, OptOut, OptOutStatus, Stats, ModelInfo, Compact and
  Tokenize, each the RPC's request and response messages as JSON (proto field names).
- `/` is the data owners' page (`server/static/`, plain HTML and JavaScript).

Errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the HTTP status
of the gRPC code (`HTTP_STATUS`); RESOURCE_EXHAUSTED is 429 (with Retry-After) when a budget
is full and 413 when the request's own work is over a cap, since retrying cannot help it.
The OpenAPI document is at `/openapi.json` (no Swagger page: it would load from a CDN).
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from pydantic import BaseModel, ConfigDict, Field
from silo.server.client import mode_name
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import BUSY
from silo.server.servicers import (
    MODE_OF_KIND,
    DatastoreServicer,
    LanguageModelServicer,
    ServerState,
)
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:  # server/app.py imports this module: no import back at run time
    from silo.server.app import Admission

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 16 << 20  # as gRPC's largest message
MAX_CHOICES = 64  # prompts x n of one completion request: each is a Generate

HTTP_STATUS = {  # google.rpc's mapping, but FAILED_PRECONDITION is a conflict with the server's state
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class CallAborted(Exception):
    """A servicer's `context.abort(code, message)` over HTTP."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class HttpCall:
    """What a servicer and the admission budgets see of an HTTP request: the parts of
    `grpc.ServicerContext` they use."""

    def __init__(self, authorization: str | None):
        self._metadata = (("authorization", authorization),) if authorization else ()
        self._callbacks: list = []
        self.active = True

    def invocation_metadata(self):
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str):
        raise CallAborted(code, details)

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, fn) -> bool:
        self._callbacks.append(fn)
        return True

    def close(self) -> None:
        self.active = False
        for fn in self._callbacks:
            fn()


def error_response(status: int, message: str, code: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPE.get(status, "api_error"),
                                   "param": None, "code": code}}, status_code=status, headers=headers)


def aborted_response(e: CallAborted) -> JSONResponse:
    status = HTTP_STATUS.get(e.code, 500)
    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.message.startswith(BUSY):
        status = 429  # a full budget: retrying later helps (a work cap's 413 would not)
    return error_response(status, e.message, e.code.name.lower())


def to_json(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class Gateway:
    """Runs gRPC methods for HTTP routes: credentials, budgets, the servicer itself."""

    def __init__(self, state: ServerState, admission: Admission):
        self.state, self.admission = state, admission
        self.services = {"LanguageModel": LanguageModelServicer(state), "Datastore": DatastoreServicer(state)}

    def _method(self, service: str, name: str, authorization: str | None):
        refused = self.state.auth.refuse(f"/silo.v1.{service}/{name}", HttpCall(authorization).invocation_metadata())
        if refused is not None:
            raise CallAborted(*refused)
        return getattr(self.services[service], name)

    def unary(self, service: str, name: str, request, authorization: str | None = None):
        fn = self._method(service, name, authorization)
        call = HttpCall(authorization)
        try:
            return self.admission.unary(fn)(request, call)
        finally:
            call.close()

    def stream(self, service: str, name: str, request, authorization: str | None = None) -> Iterator:
        """The responses of a server-streaming method; the budget's slot is held until the
        iterator ends or is closed (a client that goes away closes it)."""
        fn = self._method(service, name, authorization)
        call = HttpCall(authorization)
        try:
            yield from self.admission.stream(fn)(request, call)
        finally:
            call.close()


# ---------------------------------------------------------------------------- completions


class SiloOptions(BaseModel):
    """SILO's retrieval options of a completion (the gRPC `RetrievalOptions`, and tracing)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    mode: Literal["none", "knn", "infgram", "ric"] | None = Field(None, description="unset: the model id's, "
                                                                  "else the server's default")
    k: int | None = Field(None, description="neighbours (kNN-LM) or passages (RIC-LM)")
    lambda_: float | None = Field(None, alias="lambda", description="datastore weight in [0, 1]")
    knn_temperature: float | None = None
    nprobe: int = 0
    refine: int | None = Field(None, description="exact re-ranking factor (stores with kept keys)")
    reuse: int | None = Field(None, description="kNN-LM pointer reuse: no search where this many neighbours "
                              "advance (0 = off)")
    skip_above: float | None = Field(None, description="kNN-LM adaptive retrieval: no search where the LM's top "
                                     "probability is at least this (1 = off)")
    ric_stride: int = 0
    retriever: Literal["bm25", "dense", "hybrid"] | None = Field(
        None, description="RIC-LM: how passages are found; unset: the passage store's own")
    policy: dict | None = Field(None, description="a RetrievalPolicy: tiers, allow_licenses, deny_licenses, "
                                "allow_sources, deny_sources, deny_owners")
    allow_partial: bool = False
    trace: bool = Field(False, description="trace the completion in the ∞-gram store")
    trace_min_tokens: int = 0
    attribution_top: int = 0
    time_limit_s: float = 0.0


class CompletionRequest(BaseModel):
    """OpenAI's completions request; fields OpenAI has and SILO does not honour are refused
    when set to anything but their neutral value, never ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    logprobs: int | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None
    silo: SiloOptions | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize request (lm-evaluation-harness's remote tokenizer sends it)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


class BadCompletion(ValueError):
    """A completion request this API refuses (400)."""


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadCompletion("prompt is empty")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


def _refuse_unsupported(body: CompletionRequest) -> None:
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("suffix", None)):
        if getattr(body, name) != neutral:
            raise BadCompletion(f"{name} is not supported by this server")
    if body.logit_bias:
        raise BadCompletion("logit_bias is not supported by this server")
    if body.best_of not in (None, body.n):
        raise BadCompletion("best_of is not supported by this server (give n only)")


class Completions:
    """`/v1/completions` on top of the Generate RPC."""

    def __init__(self, gateway: Gateway):
        self.g = gateway
        state = gateway.state
        self.base = Path(state.model_dir).resolve().name
        kinds = set(state.stores)
        self.modes = ["none", *[mode_name(m) for kind, m in MODE_OF_KIND.items() if kind in kinds]]

    def model_ids(self) -> list[str]:
        return [self.base, *[f"{self.base}:{m}" for m in self.modes]]

    def _mode_of_model(self, model: str) -> str | None:
        if model == self.base:
            return None
        if model.startswith(self.base + ":") and model.split(":", 1)[1] in self.modes:
            return model.split(":", 1)[1]
        raise CallAborted(grpc.StatusCode.NOT_FOUND, f"the model {model!r} does not exist here; "
                          f"GET /v1/models lists {', '.join(self.model_ids())}")

    def requests(self, body: CompletionRequest) -> list[tuple[int, str | list[int], pb.GenerateRequest]]:
        """(choice index, prompt, Generate request) for every prompt × n, all checked first."""
        _refuse_unsupported(body)
        prompts = _prompts(body.prompt)
        if body.n < 1:
            raise BadCompletion(f"n must be at least 1, got {body.n}")
        if len(prompts) * body.n > MAX_CHOICES:
            raise CallAborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(prompts)} prompts x n {body.n} is {len(prompts) * body.n} choices, over the "
                              f"server's cap of {MAX_CHOICES} per request (send several requests)")
        if body.seed is not None and not 0 <= body.seed < 2**63:
            raise BadCompletion(f"seed must be in [0, 2^63), got {body.seed}")
        mode = self._mode_of_model(body.model)
        opts = body.silo or SiloOptions()
        retrieval = pb.RetrievalOptions(nprobe=max(opts.nprobe, 0) if opts.nprobe >= 0 else 0,
                                        allow_partial=opts.allow_partial, ric_stride=max(opts.ric_stride, 0),
                                        retriever=opts.retriever or "")
        if opts.nprobe < 0 or opts.ric_stride < 0:
            raise BadCompletion("silo.nprobe and silo.ric_stride must be ≥ 0")
        if (opts.mode or mode) is not None:
            retrieval.mode = pb.RetrievalMode.Value(f"RETRIEVAL_{(opts.mode or mode).upper()}")
        for field, value in (("k", opts.k), ("lambda_", opts.lambda_), ("temperature", opts.knn_temperature),
                             ("refine_factor", opts.refine), ("reuse", opts.reuse), ("skip_above", opts.skip_above)):
            if value is not None:
                if field in ("refine_factor", "reuse") and value < 0:
                    raise BadCompletion(f"silo.{'refine' if field == 'refine_factor' else field} must be ≥ "
                                        f"{1 if field == 'refine_factor' else 0}")
                setattr(retrieval, field, value)
        if opts.policy:
            try:
                ParseDict(opts.policy, retrieval.policy)
            except ParseError as e:
                raise BadCompletion(f"silo.policy: {e}") from e
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list) and not all(isinstance(t, int) and t >= 0 for t in prompt):
                raise BadCompletion("token-id prompts must be lists of non-negative integers")
            for j in range(body.n):
                r = pb.GenerateRequest(temperature=body.temperature, top_p=body.top_p, seed=seed + j,
                                       stop_sequences=stops, retrieval=retrieval, echo=body.echo,
                                       top_logprobs=max(body.logprobs or 0, 0), trace=opts.trace,
                                       trace_min_tokens=max(opts.trace_min_tokens, 0),
                                       attribution_top=max(opts.attribution_top, 0), time_limit_s=opts.time_limit_s)
                if isinstance(prompt, str):
                    r.prompt = prompt
                else:
                    r.prompt_token_ids.extend(prompt)
                if body.max_tokens is not None:
                    if body.max_tokens < 0:
                        raise BadCompletion(f"max_tokens must be ≥ 0, got {body.max_tokens}")
                    r.max_new_tokens = body.max_tokens
                if body.logprobs is not None and body.logprobs < 0:
                    raise BadCompletion(f"logprobs must be ≥ 0, got {body.logprobs}")
                out.append((i * body.n + j, prompt, r))
        return out

    def _prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.g.state.tok.decode(prompt, skip_special_tokens=True)

    def choice(self, index: int, prompt, responses: list[pb.GenerateResponse], body: CompletionRequest) -> dict:
        """One OpenAI choice from a whole Generate stream."""
        tokens = [r.token for r in responses if r.HasField("token")]
        summary = responses[-1].summary
        text, finish = _cut_at_stop(summary.text, body.stop, summary.stop_reason)
        start = 0
        if body.echo:
            head = self._prompt_text(prompt)
            text, start = head + text, 0
        else:
            start = len(self._prompt_text(prompt))
        return {"index": index, "text": text, "finish_reason": finish,
                "logprobs": _logprobs(tokens, start) if body.logprobs is not None else None,
                "silo": _silo_part(summary)}

    def create(self, body: CompletionRequest, authorization: str | None) -> dict:
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        counted = set()
        for index, prompt, r in self.requests(body):
            responses = list(self.g.stream("LanguageModel", "Generate", r, authorization))
            choices.append(self.choice(index, prompt, responses, body))
            summary = responses[-1].summary
            if index // body.n not in counted:
                counted.add(index // body.n)
                usage["prompt_tokens"] += summary.prompt_tokens
            usage["completion_tokens"] += summary.generated_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage}

    def stream(self, body: CompletionRequest, authorization: str | None) -> Iterator[str]:
        """Server-sent events: one chunk per token, a last chunk per choice with its
        finish_reason and SILO's part, then `[DONE]`. The first choice's stream is started
        (and so checked) before the response begins: a refused request is an HTTP error."""
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        planned = self.requests(body)
        streams = [self.g.stream("LanguageModel", "Generate", r, authorization) for _, _, r in planned]
        first = next(streams[0])  # raises CallAborted for a refused request, before any byte is sent

        def chunk(index: int, text: str, logprobs=None, finish=None, silo=None) -> str:
            c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if silo is not None:
                c["silo"] = silo
            return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                          "model": body.model, "choices": [c]}) + "\n\n"

        def events() -> Iterator[str]:
            try:
                for n, ((index, prompt, _), responses) in enumerate(zip(planned, streams, strict=True)):
                    it = iter([first, *responses]) if n == 0 else responses
                    offset = 0 if body.echo else len(self._prompt_text(prompt))
                    generated, stopped = "", False
                    for resp in it:
                        if resp.HasField("summary"):
                            finish = "stop" if stopped else _finish(resp.summary.stop_reason)
                            yield chunk(index, "", None, finish, _silo_part(resp.summary))
                            break
                        if stopped:
                            continue
                        t = resp.token
                        piece = t.text
                        if not t.prompt:
                            piece, stopped = _cut_piece(generated, piece, body.stop)
                            generated += piece
                        lp = _logprobs([t], offset) if body.logprobs is not None else None
                        offset += len(t.text)
                        yield chunk(index, piece, lp)
                yield "data: [DONE]\n\n"
            except CallAborted as e:
                status = HTTP_STATUS.get(e.code, 500)
                yield "data: " + json.dumps({"error": {"message": e.message, "type": ERROR_TYPE.get(status, "api_error"),
                                                       "code": e.code.name.lower()}}) + "\n\n"
            finally:
                for s in streams:
                    s.close()

        return events()


def _finish(stop_reason: int) -> str:
    return "stop" if stop_reason in (pb.EOS_TOKEN, pb.STOP_SEQUENCE) else "length"


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in stop or [] if s]


def _cut_at_stop(text: str, stop, stop_reason: int) -> tuple[str, str]:
    """OpenAI returns a completion without the stop sequence that ended it."""
    cuts = [text.find(s) for s in _stops(stop) if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, _finish(stop_reason)


def _cut_piece(before: str, piece: str, stop) -> tuple[str, bool]:
    """A streamed piece up to a stop sequence that completes in it; (piece, stopped)."""
    whole = before + piece
    cuts = [whole.find(s) for s in _stops(stop) if s in whole]
    if not cuts:
        return piece, False
    return whole[len(before):min(cuts)] if min(cuts) >= len(before) else "", True


def _logprobs(tokens: list, start: int) -> dict:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{x.text: x.logprob for x in t.top} for t in tokens], "text_offset": offsets}


def _silo_part(summary: pb.GenerationSummary) -> dict:
    return {"mode": mode_name(summary.mode), "stop_reason": pb.StopReason.Name(summary.stop_reason),
            "citations": [to_json(c) for c in summary.citations], "trace": [to_json(s) for s in summary.trace]}


# ---------------------------------------------------------------------------- the app


# /v1/silo/... : (method, path) -> (service, RPC)
SILO_ROUTES = {
    ("POST", "/v1/silo/search"): ("Datastore", "Search"),
    ("POST", "/v1/silo/trace"): ("LanguageModel", "Trace"),
    ("POST", "/v1/silo/audit"): ("LanguageModel", "Audit"),
    ("POST", "/v1/silo/score"): ("LanguageModel", "Score"),
    ("POST", "/v1/silo/tokenize"): ("LanguageModel", "Tokenize"),
    ("GET", "/v1/silo/info"): ("LanguageModel", "ModelInfo"),
    ("POST", "/v1/silo/optout"): ("Datastore", "OptOut"),
    ("POST", "/v1/silo/optout/status"): ("Datastore", "OptOutStatus"),
    ("GET", "/v1/silo/stats"): ("Datastore", "Stats"),
    ("POST", "/v1/silo/compact"): ("Datastore", "Compact"),
}


class BodyLimit:
    """Refuses a request body over `limit` bytes (413) before it is all read: uvicorn has no
    limit of its own. ASGI middleware."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"the request body is over {self.limit:,} bytes", "body_too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await too_big(scope, receive, send)


class BodyTooLarge(Exception):
    pass


def http_app(state: ServerState, admission: Admission) -> FastAPI:
    """The FastAPI application over a loaded server state and its budgets."""
    gateway = Gateway(state, admission)
    completions = Completions(gateway)
    app = FastAPI(title="SILO", version="1", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions with SILO's retrieval, citations and opt-out. "
                  "The /v1/silo/ routes take and return the gRPC messages of proto/silo/v1/silo.proto as JSON.")

    @app.exception_handler(CallAborted)
    async def _aborted(request: Request, e: CallAborted):
        return aborted_response(e)

    @app.exception_handler(BadCompletion)
    async def _bad(request: Request, e: BadCompletion):
        return error_response(400, str(e), "invalid_argument")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                              str(first.get("msg", "invalid request")), "invalid_argument")

    @app.get("/v1/models")
    def models() -> dict:
        created = int(Path(state.model_dir).stat().st_mtime)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "silo"}
                                           for m in completions.model_ids()]}

    @app.post("/v1/completions")
    def create_completion(body: CompletionRequest, request: Request):
        auth = request.headers.get("authorization")
        if body.stream:
            return StreamingResponse(completions.stream(body, auth), media_type="text/event-stream")
        return completions.create(body, auth)

    def silo_route(method: str, path: str, service: str, rpc: str) -> None:
        req_cls = getattr(pb, pb.DESCRIPTOR.services_by_name[service].methods_by_name[rpc].input_type.name)

        async def route(request: Request):
            body = {}
            if method == "POST":
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    return error_response(400, f"the body is not JSON: {e}", "invalid_argument")
                if not isinstance(body, dict):
                    return error_response(400, "the body must be a JSON object", "invalid_argument")
            try:
                message = ParseDict(body, req_cls())
            except ParseError as e:
                return error_response(400, f"not a {req_cls.__name__}: {e}", "invalid_argument")
            try:
                reply = await run_in_threadpool(gateway.unary, service, rpc, message,
                                                request.headers.get("authorization"))
            except CallAborted as e:
                return aborted_response(e)
            return JSONResponse(to_json(reply))

        body_doc = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "description": f"silo.v1.{req_cls.__name__} as JSON (proto field names)"}}}}} \
            if method == "POST" else {}
        app.add_api_route(path, route, methods=[method], name=f"{service}.{rpc}", openapi_extra=body_doc,
                          summary=f"the {rpc} RPC over HTTP")

    for (method, path), (service, rpc) in SILO_ROUTES.items():
        silo_route(method, path, service, rpc)

    @app.get("/v1/silo/whoami")
    def whoami(request: Request) -> dict:
        who = state.auth.principal(HttpCall(request.headers.get("authorization")).invocation_metadata())
        return {"kind": who.kind, "owner": who.owner or ""}

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict:
        tok = state.tok
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                "model_max_length": getattr(state.model.config, "max_position_embeddings", None)}

    @app.post("/tokenize")
    def tokenize(body: TokenizeBody, request: Request) -> dict:
        tok = state.tok
        # a prompt that is exactly one special token is that token (the harness asks for the
        # BOS and EOS ids this way); anywhere else, special tokens in text are text
        special = {tok.bos_token: tok.bos_token_id, tok.eos_token: tok.eos_token_id}
        if body.prompt in special and body.prompt is not None and special[body.prompt] is not None:
            ids = [special[body.prompt]]
        else:
            ids = list(gateway.unary("LanguageModel", "Tokenize", pb.TokenizeRequest(
                text=body.prompt, add_special_tokens=body.add_special_tokens),
                request.headers.get("authorization")).ids)
        return {"tokens": ids, "count": len(ids),
                "max_model_len": getattr(state.model.config, "max_position_embeddings", None)}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeBody) -> dict:
        vocab = len(state.tok)
        if len(body.tokens) > state.limits.max_request_tokens:
            raise CallAborted(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(body.tokens):,} tokens, over the server's "
                              f"cap max_request_tokens = {state.limits.max_request_tokens:,}")
        if any(not 0 <= t < vocab for t in body.tokens):
            raise BadCompletion(f"tokens must be ids of this model (0 .. {vocab - 1})")
        return {"prompt": state.tok.decode(body.tokens)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    def owners_page():
        page = STATIC / "index.html"
        if not page.is_file():
            return error_response(404, "the data owners' page is not installed", "not_found")
        return FileResponse(page, headers={"Content-Security-Policy": "default-src 'self'; object-src 'none'; "
                                                                      "base-uri 'none'; frame-ancestors 'none'"})

    return app


@dataclass
class HttpServer:
    """A uvicorn server running in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_http(state: ServerState, admission: Admission, host: str = "127.0.0.1", port: int = 0,
               tls_files: tuple[str, str] | None = None) -> HttpServer:
    """Serve `http_app` on host:port (0 picks a free port) in a background thread; returns
    once it accepts connections. `tls_files` = (certificate, key) paths serves HTTPS."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP ({e.strerror})") from e
    bound = sock.getsockname()[1]
    config = uvicorn.Config(BodyLimit(http_app(state, admission)), log_level="warning", lifespan="off",
                            ssl_certfile=tls_files[0] if tls_files else None,
                            ssl_keyfile=tls_files[1] if tls_files else None,
                            limit_concurrency=admission.threads + 64, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="silo-http")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server on {host}:{bound} did not start")
        time.sleep(0.02)
    scheme = "https" if tls_files else "http"
    return HttpServer(server, thread, bound, f"{scheme}://{host if ':' not in host else f'[{host}]'}:{bound}")
