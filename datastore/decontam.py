"""Decontamination: store documents that (nearly) copy evaluation text are dropped.

MassiveDS's rule, on word n-grams: a store document is contaminated if it shares a run of
≥ `long_run` words (default 32) with any evaluation document, or if its 13-gram Jaccard
similarity with some evaluation document is ≥ `jaccard` (default 0.8) — a near-copy.
Short shared phrases are not enough, and neither are long runs that many store documents
share (boilerplate: license texts, standard notices), so a real corpus keeps its license
headers and common idioms. Drops are applied through the retrieval policy
(`deny_doc_ids`), i.e. inside the search, leaving the store's files untouched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"\w+")


def _grams(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def contaminated_docs(store_docs: Iterable[tuple[str, str]], eval_texts: list[str], n: int = 13,
                      long_run: int = 32, jaccard: float = 0.8, boilerplate_docs: int = 3) -> dict[str, str]:
    """doc_id -> reason, for each (doc_id, text) of the store that copies evaluation text.

    A long run that more than `boilerplate_docs` store documents share with the evaluation
    text is boilerplate (a license text, a standard notice), not a copy of it: it does not
    count, or one GPL header in the test split would drop every GPL document."""
    store_docs = list(store_docs)
    long_index = set().union(*(_grams(t, long_run) for t in eval_texts)) if eval_texts else set()
    store_long = []
    run_docs: dict[int, int] = defaultdict(int)
    for _, text in store_docs:
        shared = _grams(text, long_run) & long_index if long_index else set()
        store_long.append(shared)
        for h in shared:
            run_docs[h] += 1
    eval_grams = [_grams(t, n) for t in eval_texts]
    owners: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(eval_grams):
        for h in g:
            owners[h].append(i)
    out: dict[str, str] = {}
    for (doc_id, text), shared in zip(store_docs, store_long, strict=True):
        if any(run_docs[h] <= boilerplate_docs for h in shared):
            out[doc_id] = f"shares a {long_run}-word run with evaluation text"
            continue
        grams = _grams(text, n)
        if not grams:
            continue
        shared = defaultdict(int)
        for h in grams:
            for i in owners.get(h, ()):
                shared[i] += 1
        for i, s in shared.items():
            jac = s / (len(grams) + len(eval_grams[i]) - s)
            if jac >= jaccard:
                out[doc_id] = f"{n}-gram Jaccard {jac:.2f} with an evaluation document"
                break
    return out


def store_contamination(store, eval_texts: list[str], **kwargs) -> dict[str, str]:
    """`contaminated_docs` over an opened `Datastore`'s documents."""
    ids = store.docs.column("doc_id").to_pylist()
    texts = store.docs.column("text").to_pylist()
    return contaminated_docs(zip(ids, texts, strict=True), eval_texts, **kwargs)


def leaked_docs(store, eval_doc_ids: Iterable[str]) -> list[str]:
    """Evaluation documents that are themselves in the store (a split mistake)."""
    have = np.asarray(store.docs.column("doc_id").to_pylist(), dtype=object)
    return sorted(set(eval_doc_ids) & set(have.tolist()))
