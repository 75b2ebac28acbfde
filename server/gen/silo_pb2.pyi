from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_NONE: _ClassVar[RetrievalMode]
    RETRIEVAL_KNN: _ClassVar[RetrievalMode]
    RETRIEVAL_RIC: _ClassVar[RetrievalMode]
    RETRIEVAL_INFGRAM: _ClassVar[RetrievalMode]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    MAX_TOKENS: _ClassVar[StopReason]
    EOS_TOKEN: _ClassVar[StopReason]
    STOP_SEQUENCE: _ClassVar[StopReason]
    CANCELLED: _ClassVar[StopReason]
    TIME_LIMIT: _ClassVar[StopReason]
RETRIEVAL_NONE: RetrievalMode
RETRIEVAL_KNN: RetrievalMode
RETRIEVAL_RIC: RetrievalMode
RETRIEVAL_INFGRAM: RetrievalMode
STOP_REASON_UNSPECIFIED: StopReason
MAX_TOKENS: StopReason
EOS_TOKEN: StopReason
STOP_SEQUENCE: StopReason
CANCELLED: StopReason
TIME_LIMIT: StopReason

class RetrievalPolicy(_message.Message):
    __slots__ = ("tiers", "allow_licenses", "deny_licenses", "allow_sources", "deny_sources", "deny_owners")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LICENSES_FIELD_NUMBER: _ClassVar[int]
    DENY_LICENSES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SOURCES_FIELD_NUMBER: _ClassVar[int]
    DENY_SOURCES_FIELD_NUMBER: _ClassVar[int]
    DENY_OWNERS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    allow_licenses: _containers.RepeatedScalarFieldContainer[str]
    deny_licenses: _containers.RepeatedScalarFieldContainer[str]
    allow_sources: _containers.RepeatedScalarFieldContainer[str]
    deny_sources: _containers.RepeatedScalarFieldContainer[str]
    deny_owners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tiers: _Optional[_Iterable[str]] = ..., allow_licenses: _Optional[_Iterable[str]] = ..., deny_licenses: _Optional[_Iterable[str]] = ..., allow_sources: _Optional[_Iterable[str]] = ..., deny_sources: _Optional[_Iterable[str]] = ..., deny_owners: _Optional[_Iterable[str]] = ...) -> None: ...

class RetrievalOptions(_message.Message):
    __slots__ = ("mode", "k", "lambda_", "temperature", "nprobe", "policy", "allow_partial", "ric_stride", "refine_factor", "retriever", "reuse", "skip_above")
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LAMBDA__FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    RIC_STRIDE_FIELD_NUMBER: _ClassVar[int]
    REFINE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    SKIP_ABOVE_FIELD_NUMBER: _ClassVar[int]
    mode: RetrievalMode
    k: int
    lambda_: float
    temperature: float
    nprobe: int
    policy: RetrievalPolicy
    allow_partial: bool
    ric_stride: int
    refine_factor: int
    retriever: str
    reuse: int
    skip_above: float
    def __init__(self, mode: _Optional[_Union[RetrievalMode, str]] = ..., k: _Optional[int] = ..., lambda_: _Optional[float] = ..., temperature: _Optional[float] = ..., nprobe: _Optional[int] = ..., policy: _Optional[_Union[RetrievalPolicy, _Mapping]] = ..., allow_partial: _Optional[bool] = ..., ric_stride: _Optional[int] = ..., refine_factor: _Optional[int] = ..., retriever: _Optional[str] = ..., reuse: _Optional[int] = ..., skip_above: _Optional[float] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("doc_id", "source", "license", "tier", "owner")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    source: str
    license: str
    tier: str
    owner: str
    def __init__(self, doc_id: _Optional[str] = ..., source: _Optional[str] = ..., license: _Optional[str] = ..., tier: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class TracedSpan(_message.Message):
    __slots__ = ("start_token", "end_token", "start_char", "end_char", "text", "count", "documents")
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_CHAR_FIELD_NUMBER: _ClassVar[int]
    END_CHAR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    start_token: int
    end_token: int
    start_char: int
    end_char: int
    text: str
    count: int
    documents: _containers.RepeatedCompositeFieldContainer[Source]
    def __init__(self, start_token: _Optional[int] = ..., end_token: _Optional[int] = ..., start_char: _Optional[int] = ..., end_char: _Optional[int] = ..., text: _Optional[str] = ..., count: _Optional[int] = ..., documents: _Optional[_Iterable[_Union[Source, _Mapping]]] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("entry_id", "doc_id", "source", "license", "tier", "owner", "sentence", "sentence_index", "weight", "distance", "next_token", "passage")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    entry_id: int
    doc_id: str
    source: str
    license: str
    tier: str
    owner: str
    sentence: str
    sentence_index: int
    weight: float
    distance: float
    next_token: str
    passage: str
    def __init__(self, entry_id: _Optional[int] = ..., doc_id: _Optional[str] = ..., source: _Optional[str] = ..., license: _Optional[str] = ..., tier: _Optional[str] = ..., owner: _Optional[str] = ..., sentence: _Optional[str] = ..., sentence_index: _Optional[int] = ..., weight: _Optional[float] = ..., distance: _Optional[float] = ..., next_token: _Optional[str] = ..., passage: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_p", "seed", "stop_sequences", "retrieval", "attribution_top", "time_limit_s", "trace", "trace_min_tokens", "echo", "top_logprobs", "prompt_token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_TOP_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    TRACE_MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    retrieval: RetrievalOptions
    attribution_top: int
    time_limit_s: float
    trace: bool
    trace_min_tokens: int
    echo: bool
    top_logprobs: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., retrieval: _Optional[_Union[RetrievalOptions, _Mapping]] = ..., attribution_top: _Optional[int] = ..., time_limit_s: _Optional[float] = ..., trace: _Optional[bool] = ..., trace_min_tokens: _Optional[int] = ..., echo: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TopToken(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("index", "token_id", "text", "logprob", "lm_logprob", "attribution", "suffix_tokens", "suffix_count", "prompt", "top")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LM_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    logprob: float
    lm_logprob: float
    attribution: _containers.RepeatedCompositeFieldContainer[Neighbour]
    suffix_tokens: int
    suffix_count: int
    prompt: bool
    top: _containers.RepeatedCompositeFieldContainer[TopToken]
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., lm_logprob: _Optional[float] = ..., attribution: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., suffix_tokens: _Optional[int] = ..., suffix_count: _Optional[int] = ..., prompt: _Optional[bool] = ..., top: _Optional[_Iterable[_Union[TopToken, _Mapping]]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("doc_id", "source", "license", "tier", "owner", "total_weight", "tokens", "obligation", "attribution_line")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    OBLIGATION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_LINE_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    source: str
    license: str
    tier: str
    owner: str
    total_weight: float
    tokens: int
    obligation: str
    attribution_line: str
    def __init__(self, doc_id: _Optional[str] = ..., source: _Optional[str] = ..., license: _Optional[str] = ..., tier: _Optional[str] = ..., owner: _Optional[str] = ..., total_weight: _Optional[float] = ..., tokens: _Optional[int] = ..., obligation: _Optional[str] = ..., attribution_line: _Optional[str] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("stop_reason", "prompt_tokens", "generated_tokens", "text", "citations", "trace", "mode")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    prompt_tokens: int
    generated_tokens: int
    text: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    trace: _containers.RepeatedCompositeFieldContainer[TracedSpan]
    mode: RetrievalMode
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., text: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., trace: _Optional[_Iterable[_Union[TracedSpan, _Mapping]]] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "summary")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    summary: GenerationSummary
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "retrieval", "window", "stride")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    text: str
    retrieval: RetrievalOptions
    window: int
    stride: int
    def __init__(self, text: _Optional[str] = ..., retrieval: _Optional[_Union[RetrievalOptions, _Mapping]] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "lm_logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LM_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    lm_logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., lm_logprob: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("tokens", "perplexity", "total_logprob", "num_tokens", "mode")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    perplexity: float
    total_logprob: float
    num_tokens: int
    mode: RetrievalMode
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., perplexity: _Optional[float] = ..., total_logprob: _Optional[float] = ..., num_tokens: _Optional[int] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ...) -> None: ...

class TraceRequest(_message.Message):
    __slots__ = ("text", "min_tokens", "max_spans", "max_documents", "policy")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SPANS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    text: str
    min_tokens: int
    max_spans: int
    max_documents: int
    policy: RetrievalPolicy
    def __init__(self, text: _Optional[str] = ..., min_tokens: _Optional[int] = ..., max_spans: _Optional[int] = ..., max_documents: _Optional[int] = ..., policy: _Optional[_Union[RetrievalPolicy, _Mapping]] = ...) -> None: ...

class TraceResponse(_message.Message):
    __slots__ = ("spans", "tokens")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[TracedSpan]
    tokens: int
    def __init__(self, spans: _Optional[_Iterable[_Union[TracedSpan, _Mapping]]] = ..., tokens: _Optional[int] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("text", "doc_ids", "membership")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    text: str
    doc_ids: _containers.RepeatedScalarFieldContainer[str]
    membership: bool
    def __init__(self, text: _Optional[str] = ..., doc_ids: _Optional[_Iterable[str]] = ..., membership: _Optional[bool] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("model", "has_record", "verdict", "words", "shingles", "found", "longest_run_words", "same_documents", "trained_doc_ids", "shingle_fpr", "statement", "scored", "min_k", "min_k_pp", "min_k_percentile", "min_k_pp_percentile", "reference_documents", "reference_proven")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HAS_RECORD_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    SHINGLES_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LONGEST_RUN_WORDS_FIELD_NUMBER: _ClassVar[int]
    SAME_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    SHINGLE_FPR_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    MIN_K_FIELD_NUMBER: _ClassVar[int]
    MIN_K_PP_FIELD_NUMBER: _ClassVar[int]
    MIN_K_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    MIN_K_PP_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_PROVEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    has_record: bool
    verdict: str
    words: int
    shingles: int
    found: int
    longest_run_words: int
    same_documents: _containers.RepeatedScalarFieldContainer[str]
    trained_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    shingle_fpr: float
    statement: str
    scored: bool
    min_k: float
    min_k_pp: float
    min_k_percentile: float
    min_k_pp_percentile: float
    reference_documents: int
    reference_proven: bool
    def __init__(self, model: _Optional[str] = ..., has_record: _Optional[bool] = ..., verdict: _Optional[str] = ..., words: _Optional[int] = ..., shingles: _Optional[int] = ..., found: _Optional[int] = ..., longest_run_words: _Optional[int] = ..., same_documents: _Optional[_Iterable[str]] = ..., trained_doc_ids: _Optional[_Iterable[str]] = ..., shingle_fpr: _Optional[float] = ..., statement: _Optional[str] = ..., scored: _Optional[bool] = ..., min_k: _Optional[float] = ..., min_k_pp: _Optional[float] = ..., min_k_percentile: _Optional[float] = ..., min_k_pp_percentile: _Optional[float] = ..., reference_documents: _Optional[int] = ..., reference_proven: _Optional[bool] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreInfo(_message.Message):
    __slots__ = ("name", "kind", "entries", "shards", "tiers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    entries: int
    shards: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., entries: _Optional[int] = ..., shards: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "model_type", "parameters", "vocab_size", "max_position_embeddings", "fingerprint", "trained_tiers", "trained_on_restricted", "stores", "max_new_tokens_limit", "default_mode")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TIERS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ON_RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_type: str
    parameters: int
    vocab_size: int
    max_position_embeddings: int
    fingerprint: str
    trained_tiers: _containers.RepeatedScalarFieldContainer[str]
    trained_on_restricted: bool
    stores: _containers.RepeatedCompositeFieldContainer[StoreInfo]
    max_new_tokens_limit: int
    default_mode: RetrievalMode
    def __init__(self, model: _Optional[str] = ..., model_type: _Optional[str] = ..., parameters: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., fingerprint: _Optional[str] = ..., trained_tiers: _Optional[_Iterable[str]] = ..., trained_on_restricted: _Optional[bool] = ..., stores: _Optional[_Iterable[_Union[StoreInfo, _Mapping]]] = ..., max_new_tokens_limit: _Optional[int] = ..., default_mode: _Optional[_Union[RetrievalMode, str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "k", "nprobe", "policy", "store", "allow_partial", "refine_factor", "retriever")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    REFINE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    nprobe: int
    policy: RetrievalPolicy
    store: str
    allow_partial: bool
    refine_factor: int
    retriever: str
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., policy: _Optional[_Union[RetrievalPolicy, _Mapping]] = ..., store: _Optional[str] = ..., allow_partial: _Optional[bool] = ..., refine_factor: _Optional[int] = ..., retriever: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "partial", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Neighbour]
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hits: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class DocIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class OptOutRequest(_message.Message):
    __slots__ = ("doc_ids", "owner", "source", "text_span", "reason", "confirm_large", "dry_run")
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_SPAN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_LARGE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    doc_ids: DocIds
    owner: str
    source: str
    text_span: str
    reason: str
    confirm_large: bool
    dry_run: bool
    def __init__(self, doc_ids: _Optional[_Union[DocIds, _Mapping]] = ..., owner: _Optional[str] = ..., source: _Optional[str] = ..., text_span: _Optional[str] = ..., reason: _Optional[str] = ..., confirm_large: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class OptOutResponse(_message.Message):
    __slots__ = ("receipt_id", "removed_doc_ids", "removed_entries", "logged_at", "dry_run")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LOGGED_AT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    removed_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_entries: int
    logged_at: str
    dry_run: bool
    def __init__(self, receipt_id: _Optional[str] = ..., removed_doc_ids: _Optional[_Iterable[str]] = ..., removed_entries: _Optional[int] = ..., logged_at: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class OptOutStatusRequest(_message.Message):
    __slots__ = ("receipt_id", "doc_id")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    doc_id: str
    def __init__(self, receipt_id: _Optional[str] = ..., doc_id: _Optional[str] = ...) -> None: ...

class StoreProof(_message.Message):
    __slots__ = ("store", "doc_ids", "tombstoned", "compacted", "live_entries")
    STORE_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONED_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_FIELD_NUMBER: _ClassVar[int]
    LIVE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    store: str
    doc_ids: _containers.RepeatedScalarFieldContainer[str]
    tombstoned: bool
    compacted: bool
    live_entries: int
    def __init__(self, store: _Optional[str] = ..., doc_ids: _Optional[_Iterable[str]] = ..., tombstoned: _Optional[bool] = ..., compacted: _Optional[bool] = ..., live_entries: _Optional[int] = ...) -> None: ...

class OptOutStatusResponse(_message.Message):
    __slots__ = ("removed", "receipt_id", "logged_at", "by", "values", "removed_doc_ids", "compacted", "logged", "tombstoned", "made_by", "values_redacted", "stores", "weights")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    LOGGED_AT_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_FIELD_NUMBER: _ClassVar[int]
    LOGGED_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONED_FIELD_NUMBER: _ClassVar[int]
    MADE_BY_FIELD_NUMBER: _ClassVar[int]
    VALUES_REDACTED_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    receipt_id: str
    logged_at: str
    by: str
    values: _containers.RepeatedScalarFieldContainer[str]
    removed_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    compacted: bool
    logged: bool
    tombstoned: bool
    made_by: str
    values_redacted: bool
    stores: _containers.RepeatedCompositeFieldContainer[StoreProof]
    weights: WeightsProof
    def __init__(self, removed: _Optional[bool] = ..., receipt_id: _Optional[str] = ..., logged_at: _Optional[str] = ..., by: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., removed_doc_ids: _Optional[_Iterable[str]] = ..., compacted: _Optional[bool] = ..., logged: _Optional[bool] = ..., tombstoned: _Optional[bool] = ..., made_by: _Optional[str] = ..., values_redacted: _Optional[bool] = ..., stores: _Optional[_Iterable[_Union[StoreProof, _Mapping]]] = ..., weights: _Optional[_Union[WeightsProof, _Mapping]] = ...) -> None: ...

class WeightsProof(_message.Message):
    __slots__ = ("model", "has_record", "trained_doc_ids", "trained_text_doc_ids", "shingle_fpr", "statement", "scored", "membership_percentile", "reference_documents", "scored_doc_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HAS_RECORD_FIELD_NUMBER: _ClassVar[int]
    TRAINED_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TEXT_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    SHINGLE_FPR_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SCORED_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    has_record: bool
    trained_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    trained_text_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    shingle_fpr: float
    statement: str
    scored: bool
    membership_percentile: float
    reference_documents: int
    scored_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., has_record: _Optional[bool] = ..., trained_doc_ids: _Optional[_Iterable[str]] = ..., trained_text_doc_ids: _Optional[_Iterable[str]] = ..., shingle_fpr: _Optional[float] = ..., statement: _Optional[str] = ..., scored: _Optional[bool] = ..., membership_percentile: _Optional[float] = ..., reference_documents: _Optional[int] = ..., scored_doc_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupStats(_message.Message):
    __slots__ = ("documents", "entries")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    documents: int
    entries: int
    def __init__(self, documents: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("name", "kind", "documents", "live_documents", "entries", "live_entries", "shards", "index", "tiers", "sources", "bytes", "lists", "shard_groups")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: GroupStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[GroupStats, _Mapping]] = ...) -> None: ...
    class SourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: GroupStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[GroupStats, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LIVE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    documents: int
    live_documents: int
    entries: int
    live_entries: int
    shards: int
    index: str
    tiers: _containers.MessageMap[str, GroupStats]
    sources: _containers.MessageMap[str, GroupStats]
    bytes: int
    lists: str
    shard_groups: _containers.RepeatedCompositeFieldContainer[ShardGroupStats]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., documents: _Optional[int] = ..., live_documents: _Optional[int] = ..., entries: _Optional[int] = ..., live_entries: _Optional[int] = ..., shards: _Optional[int] = ..., index: _Optional[str] = ..., tiers: _Optional[_Mapping[str, GroupStats]] = ..., sources: _Optional[_Mapping[str, GroupStats]] = ..., bytes: _Optional[int] = ..., lists: _Optional[str] = ..., shard_groups: _Optional[_Iterable[_Union[ShardGroupStats, _Mapping]]] = ...) -> None: ...

class ShardGroupStats(_message.Message):
    __slots__ = ("name", "shards", "replicas", "healthy", "requests", "failovers", "p50_ms", "p99_ms", "down")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    name: str
    shards: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    healthy: int
    requests: int
    failovers: int
    p50_ms: float
    p99_ms: float
    down: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shards: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ..., healthy: _Optional[int] = ..., requests: _Optional[int] = ..., failovers: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., down: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("stores",)
    STORES_FIELD_NUMBER: _ClassVar[int]
    stores: _containers.RepeatedCompositeFieldContainer[StoreStats]
    def __init__(self, stores: _Optional[_Iterable[_Union[StoreStats, _Mapping]]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("doc_id", "text", "source", "license", "owner", "license_classifiers")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LICENSE_CLASSIFIERS_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    text: str
    source: str
    license: str
    owner: str
    license_classifiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, doc_id: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., license: _Optional[str] = ..., owner: _Optional[str] = ..., license_classifiers: _Optional[_Iterable[str]] = ...) -> None: ...

class AddDocumentsRequest(_message.Message):
    __slots__ = ("store", "document")
    STORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    store: str
    document: Document
    def __init__(self, store: _Optional[str] = ..., document: _Optional[_Union[Document, _Mapping]] = ...) -> None: ...

class RefusedDocument(_message.Message):
    __slots__ = ("doc_id", "reason")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    reason: str
    def __init__(self, doc_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AddDocumentsResponse(_message.Message):
    __slots__ = ("added_documents", "added_entries", "refused", "shard", "seconds")
    ADDED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ADDED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    added_documents: int
    added_entries: int
    refused: _containers.RepeatedCompositeFieldContainer[RefusedDocument]
    shard: str
    seconds: float
    def __init__(self, added_documents: _Optional[int] = ..., added_entries: _Optional[int] = ..., refused: _Optional[_Iterable[_Union[RefusedDocument, _Mapping]]] = ..., shard: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("store",)
    STORE_FIELD_NUMBER: _ClassVar[int]
    store: str
    def __init__(self, store: _Optional[str] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("rewritten_shards", "removed_entries", "seconds")
    REWRITTEN_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    rewritten_shards: int
    removed_entries: int
    seconds: float
    def __init__(self, rewritten_shards: _Optional[int] = ..., removed_entries: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CompactShardsRequest(_message.Message):
    __slots__ = ("store_fingerprint",)
    STORE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    store_fingerprint: str
    def __init__(self, store_fingerprint: _Optional[str] = ...) -> None: ...

class ShardSearchRequest(_message.Message):
    __slots__ = ("queries", "num_queries", "dim", "k", "nprobe", "policy", "store_fingerprint", "lists", "coarse", "deny_doc_ids")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STORE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    COARSE_FIELD_NUMBER: _ClassVar[int]
    DENY_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    queries: bytes
    num_queries: int
    dim: int
    k: int
    nprobe: int
    policy: RetrievalPolicy
    store_fingerprint: str
    lists: bytes
    coarse: bytes
    deny_doc_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, queries: _Optional[bytes] = ..., num_queries: _Optional[int] = ..., dim: _Optional[int] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., policy: _Optional[_Union[RetrievalPolicy, _Mapping]] = ..., store_fingerprint: _Optional[str] = ..., lists: _Optional[bytes] = ..., coarse: _Optional[bytes] = ..., deny_doc_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardSearchResponse(_message.Message):
    __slots__ = ("distances", "ids", "shards")
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    distances: bytes
    ids: bytes
    shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, distances: _Optional[bytes] = ..., ids: _Optional[bytes] = ..., shards: _Optional[_Iterable[str]] = ...) -> None: ...
