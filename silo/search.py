"""Search a store with text, and say where every hit comes from — the one path for the CLI
(`silo datastore search`), the `Search` RPC and the demo.

A token store is searched with the LM's key at the end of `<s> query` (contexts that
continue like the query), and each hit says which token followed it; a passage store is
searched with BM25 or its dense embedder. Every hit carries the entry's attribution
(`Datastore.attribute`: doc id, source, license, tier, owner, sentence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from silo.datastore.kinds import open_store
from silo.datastore.passages import PassageStore
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore
from silo.embed import passage_search
from silo.errors import SiloError
from silo.keys import text_keys
from silo.lm import load_causal_lm

SEARCH_KINDS = ("token", "passage")  # stores searched by vector or words (∞-gram stores are traced)


def check_searchable(store: Datastore) -> None:
    if store.manifest.kind not in SEARCH_KINDS:
        raise SiloError(f"{store.path} is an {store.manifest.kind} store: search token or passage stores "
                        "(trace text against an ∞-gram store with `silo trace`)")


@dataclass
class SearchHits:
    hits: list[dict]
    missing: list[str] = field(default_factory=list)  # shards that did not answer (allow_partial)
    kind: str = "token"  # token hits' `score` is an L2 distance (lower is closer); passage hits', a score


def search_text(store: Datastore, query: str, k: int, model=None, tok=None, policy: RetrievalPolicy | None = None,
                nprobe: int | None = None, refine: int | None = None, retriever: str | None = None,
                allow_partial: bool = False) -> SearchHits:
    """Top-k hits for one query text, attributed (token stores: with `next_token`)."""
    check_searchable(store)
    if not query.strip():
        raise SiloError("empty query: give the text to search for (--query)")
    if k <= 0:
        raise SiloError(f"k must be positive, got {k}")
    if isinstance(store, PassageStore):
        scores, ids = passage_search(store, [query], k, policy=policy, retriever=retriever, model=model, tok=tok,
                                     nprobe=nprobe)
        return SearchHits(store.attribute(ids[0], scores[0]), kind="passage")
    q = text_keys(model, tok, [query], store.manifest.key_type or "ffn_input")
    res = store.search_ex(q, k, nprobe, policy, allow_partial=allow_partial, refine=refine)
    hits = store.attribute(res.ids[0], res.distances[0])
    values = store.values(np.asarray([h["entry_id"] for h in hits], dtype=np.int64))
    for h, v in zip(hits, values, strict=True):
        h["next_token"] = tok.decode([int(v)]) if v >= 0 else ""
    return SearchHits(hits, res.missing)


def search_store(path: str, query: str, k: int, model_dir: str | None = None, policy: RetrievalPolicy | None = None,
                 nprobe: int | None = None, refine: int | None = None, retriever: str | None = None) -> SearchHits:
    """`silo datastore search`: open a store (and its model, when the search needs it) and search it."""
    store = open_store(path)
    check_searchable(store)  # before loading a model for nothing
    model = tok = None
    if not isinstance(store, PassageStore) or (retriever or store.default_retriever()) in ("dense", "hybrid"):
        model_dir = model_dir or store.manifest.model
        store.check_model(model_dir)
        model, tok = load_causal_lm(model_dir)
    return search_text(store, query, k, model, tok, policy, nprobe, refine, retriever)
