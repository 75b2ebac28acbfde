"""`SiloClient`: the Python client of a SILO server.

    with SiloClient("127.0.0.1:50051", token="…") as c:
        for event in c.generate("The harbour of Hobart", mode="knn", k=16):
            ...
        c.search("lighthouse", k=5); c.optout(doc_ids=["doc-1"]); c.stats()

Methods return the protobuf messages of `proto/silo/v1/silo.proto`; `to_dict` turns any
of them into plain data. gRPC errors surface as `grpc.RpcError` with the server's status
code and message.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from silo.server.gen import silo_pb2 as pb
from silo.server.gen import silo_pb2_grpc as pb_grpc

MODES = {"none": pb.RETRIEVAL_NONE, "knn": pb.RETRIEVAL_KNN, "ric": pb.RETRIEVAL_RIC, "infgram": pb.RETRIEVAL_INFGRAM}


def mode_name(mode: int) -> str:
    """'knn' for RETRIEVAL_KNN, and so on (the names `retrieval_options` takes)."""
    return pb.RetrievalMode.Name(mode).removeprefix("RETRIEVAL_").lower()


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def retrieval_options(mode: str | None = None, k: int | None = None, lam: float | None = None,
                      temperature: float | None = None, nprobe: int = 0, tiers=(), deny_licenses=(),
                      allow_licenses=(), allow_sources=(), deny_sources=(), deny_owners=(),
                      allow_partial: bool = False, refine: int | None = None,
                      retriever: str = "", reuse: int | None = None,
                      skip_above: float | None = None) -> pb.RetrievalOptions:
    """Retrieval options of a Generate or Score request. `mode` None (unset) is the server's
    default mode (ModelInfo.default_mode: SILO's retrieval when the server has a store);
    "none" asks for the parametric LM alone."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    opts = pb.RetrievalOptions(nprobe=nprobe, allow_partial=allow_partial, retriever=retriever,
                               policy=pb.RetrievalPolicy(
        tiers=list(tiers), allow_licenses=list(allow_licenses), deny_licenses=list(deny_licenses),
        allow_sources=list(allow_sources), deny_sources=list(deny_sources), deny_owners=list(deny_owners)))
    if mode is not None:
        opts.mode = MODES[mode]
    if k is not None:
        opts.k = k
    if lam is not None:
        opts.lambda_ = lam
    if temperature is not None:
        opts.temperature = temperature
    if refine is not None:
        opts.refine_factor = refine
    if reuse is not None:
        opts.reuse = reuse
    if skip_above is not None:
        opts.skip_above = skip_above
    return opts


class SiloClient:
    def __init__(self, target: str, token: str | None = None, root_cert: bytes | None = None,
                 timeout: float | None = 60.0):
        self.target, self.timeout = target, timeout
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=opts)
                        if root_cert else grpc.insecure_channel(target, options=opts))
        self.lm = pb_grpc.LanguageModelStub(self.channel)
        self.ds = pb_grpc.DatastoreStub(self.channel)
        self._auth = [("authorization", f"Bearer {token}")] if token else []

    # ------------------------------------------------------------------ LanguageModel

    def generate(self, prompt: str, max_new_tokens: int | None = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: tuple[str, ...] = (), attribution_top: int = 3, time_limit_s: float = 0.0,
                 retrieval: pb.RetrievalOptions | None = None, timeout: float | None = None, trace: bool = False,
                 trace_min_tokens: int = 0, echo: bool = False, top_logprobs: int = 0,
                 prompt_token_ids: tuple[int, ...] = (), **retrieval_kwargs) -> Iterator[pb.GenerateResponse]:
        req = pb.GenerateRequest(prompt=prompt, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_sequences=list(stop), attribution_top=attribution_top, time_limit_s=time_limit_s,
                                 retrieval=retrieval or retrieval_options(**retrieval_kwargs), trace=trace,
                                 trace_min_tokens=trace_min_tokens, echo=echo, top_logprobs=top_logprobs,
                                 prompt_token_ids=list(prompt_token_ids))
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        return self.lm.Generate(req, timeout=timeout or self.timeout)

    def score(self, text: str, window: int = 0, stride: int = 0, retrieval: pb.RetrievalOptions | None = None,
              **retrieval_kwargs) -> pb.ScoreResponse:
        return self.lm.Score(pb.ScoreRequest(text=text, window=window, stride=stride,
                                             retrieval=retrieval or retrieval_options(**retrieval_kwargs)),
                             timeout=self.timeout)

    def trace(self, text: str, min_tokens: int = 0, max_spans: int = 0, max_documents: int = 0,
              **policy) -> pb.TraceResponse:
        """Spans of `text` found verbatim in the server's ∞-gram store, with their documents."""
        req = pb.TraceRequest(text=text, min_tokens=min_tokens, max_spans=max_spans, max_documents=max_documents,
                              policy=retrieval_options(**policy).policy)
        return self.lm.Trace(req, timeout=self.timeout)

    def audit(self, text: str = "", doc_ids: list[str] = (), membership: bool = False) -> pb.AuditResponse:
        """Was this text (were these documents) in the served model's training data?"""
        return self.lm.Audit(pb.AuditRequest(text=text, doc_ids=list(doc_ids), membership=membership),
                             timeout=self.timeout)

    def add_documents(self, documents: list[dict], store: str = "") -> pb.AddDocumentsResponse:
        """Live ingest (admin token): documents as dicts with text and optional doc_id,
        source, license, owner, license_classifiers."""
        def requests():
            for i, d in enumerate(documents):
                yield pb.AddDocumentsRequest(store=store if i == 0 else "", document=pb.Document(
                    doc_id=d.get("doc_id") or "", text=d["text"], source=d.get("source") or "",
                    license=d.get("license") or "", owner=d.get("owner") or "",
                    license_classifiers=list(d.get("license_classifiers") or ())))
        return self.ds.AddDocuments(requests(), timeout=None, metadata=self._auth)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> pb.TokenizeResponse:
        return self.lm.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens), timeout=self.timeout)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.lm.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)

    # ------------------------------------------------------------------ Datastore

    def search(self, query: str, k: int | None = 10, store: str = "", nprobe: int = 0, tiers=(), deny_licenses=(),
               allow_licenses=(), allow_sources=(), deny_sources=(), deny_owners=(),
               allow_partial: bool = False, refine: int | None = None, retriever: str = "") -> pb.SearchResponse:
        req = pb.SearchRequest(query=query, store=store, nprobe=nprobe, allow_partial=allow_partial, retriever=retriever,
                               policy=retrieval_options(tiers=tiers, deny_licenses=deny_licenses,
                                                        allow_licenses=allow_licenses, allow_sources=allow_sources,
                                                        deny_sources=deny_sources, deny_owners=deny_owners).policy)
        if k is not None:
            req.k = k
        if refine is not None:
            req.refine_factor = refine
        return self.ds.Search(req, timeout=self.timeout)

    def optout(self, doc_ids: list[str] | None = None, owner: str | None = None, source: str | None = None,
               text_span: str | None = None, reason: str = "", confirm_large: bool = False,
               dry_run: bool = False) -> pb.OptOutResponse:
        """Remove documents (admin token: any; owner token: that owner's). A removal above
        the server's size limits needs `confirm_large`; `dry_run` only says what would go."""
        given = [x is not None for x in (doc_ids, owner, source, text_span)]
        if sum(given) != 1:
            raise ValueError("give exactly one of doc_ids, owner, source, text_span")
        req = pb.OptOutRequest(reason=reason, confirm_large=confirm_large, dry_run=dry_run)
        if doc_ids is not None:
            req.doc_ids.ids.extend(doc_ids)
        elif owner is not None:
            req.owner = owner
        elif source is not None:
            req.source = source
        else:
            req.text_span = text_span
        return self.ds.OptOut(req, timeout=self.timeout, metadata=self._auth)

    def optout_status(self, receipt_id: str | None = None, doc_id: str | None = None) -> pb.OptOutStatusResponse:
        """Proof of a removal (log record, tombstoned, compacted per store); needs a token."""
        req = pb.OptOutStatusRequest(receipt_id=receipt_id) if receipt_id else pb.OptOutStatusRequest(doc_id=doc_id or "")
        return self.ds.OptOutStatus(req, timeout=self.timeout, metadata=self._auth)

    def stats(self) -> pb.StatsResponse:
        return self.ds.Stats(pb.StatsRequest(), timeout=self.timeout)

    def compact(self, store: str = "") -> pb.CompactResponse:
        return self.ds.Compact(pb.CompactRequest(store=store), timeout=None, metadata=self._auth)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SiloClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
