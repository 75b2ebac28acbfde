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

_WORD = re.compile(r"\w+")


def _grams(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def contaminated_docs(store_docs: Iterable[tuple[str, str]], eval_texts: list[str], n: int = 13,
                      long_run: int = 32, jaccard: float = 0.8, boilerplate_docs: int = 3) -> dict[str, str]:
    """doc_id -> reason, for each (doc_id, text) of the store that copies evaluation text.

    A long run that more than `boilerplate_docs` store documents share with the evaluation
    text is boilerplate (a license text, a standard notice), not a copy of it: it does not
    count, or one GPL header in the test split would drop every GPL document. One pass:
    only what each document shares with the evaluation text is kept, never its text."""
    long_index = set().union(*(_grams(t, long_run) for t in eval_texts)) if eval_texts else set()
    eval_grams = [_grams(t, n) for t in eval_texts]
    owners: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(eval_grams):
        for h in g:
            owners[h].append(i)
    run_docs: dict[int, int] = defaultdict(int)
    seen = []  # (doc_id, long runs shared, {eval doc: shared n-grams}, n-grams of the document)
    for doc_id, text in store_docs:
        shared_long = _grams(text, long_run) & long_index if long_index else set()
        for h in shared_long:
            run_docs[h] += 1
        grams = _grams(text, n)
        shared: dict[int, int] = defaultdict(int)
        for h in grams:
            for i in owners.get(h, ()):
                shared[i] += 1
        seen.append((doc_id, shared_long, shared, len(grams)))
    out: dict[str, str] = {}
    for doc_id, shared_long, shared, n_grams in seen:
        if any(run_docs[h] <= boilerplate_docs for h in shared_long):
            out[doc_id] = f"shares a {long_run}-word run with evaluation text"
            continue
        for i, s in shared.items():
            jac = s / (n_grams + len(eval_grams[i]) - s)
            if jac >= jaccard:
                out[doc_id] = f"{n}-gram Jaccard {jac:.2f} with an evaluation document"
                break
    return out


def store_contamination(store, eval_texts: list[str], **kwargs) -> dict[str, str]:
    """`contaminated_docs` over an opened `Datastore`'s documents (texts read one at a time)."""
    docs = ((store.doc_id(d), store.doc_text(d)) for d in range(store.n_documents))
    return contaminated_docs(docs, eval_texts, **kwargs)


def leaked_docs(store, eval_doc_ids: Iterable[str]) -> list[str]:
    """Evaluation documents that are themselves in the store (a split mistake)."""
    return sorted(d for d in set(eval_doc_ids) if store.doc_index(d) is not None)
