"""Retrieval policy: which documents a call may retrieve from, by tier, license, source, owner.

A policy becomes a boolean mask over the store's documents, then over its entries, and
is applied *inside* the FAISS search (the same `IDSelectorBitmap` that carries opt-out
tombstones), so the top-k is the exact top-k of the allowed entries — not a shorter
list filtered after the fact. One store can thus serve several legal regimes.

Patterns are case-insensitive shell globs (`CC-BY-NC*`, `deb:*`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from silo.licenses import parse_tiers


@dataclass(frozen=True)
class RetrievalPolicy:
    tiers: tuple[str, ...] | None = None  # allowed tiers; None = all
    allow_licenses: tuple[str, ...] = ()  # if set, a license must match one of these
    deny_licenses: tuple[str, ...] = ()
    allow_sources: tuple[str, ...] = ()
    deny_sources: tuple[str, ...] = ()
    deny_owners: tuple[str, ...] = ()
    deny_doc_ids: frozenset[str] = frozenset()  # e.g. decontamination drops

    @classmethod
    def from_strings(cls, tiers: str | None = None, allow_licenses: str = "", deny_licenses: str = "",
                     allow_sources: str = "", deny_sources: str = "", deny_owners: str = "") -> RetrievalPolicy:
        def split(s: str | Iterable[str]) -> tuple[str, ...]:
            items = s.split(",") if isinstance(s, str) else list(s)
            return tuple(x.strip() for x in items if x.strip())

        return cls(tiers=parse_tiers(tiers) if tiers else None, allow_licenses=split(allow_licenses),
                   deny_licenses=split(deny_licenses), allow_sources=split(allow_sources),
                   deny_sources=split(deny_sources), deny_owners=split(deny_owners))

    @property
    def is_open(self) -> bool:
        return self == RetrievalPolicy()

    def doc_mask(self, tier: np.ndarray, license: np.ndarray, source: np.ndarray, owner: np.ndarray,
                 doc_id: np.ndarray) -> np.ndarray:
        """Boolean mask over documents (arrays of equal length, object dtype for strings)."""
        n = len(tier)
        mask = np.ones(n, dtype=bool)
        if self.tiers is not None:
            mask &= np.isin(tier, list(self.tiers))
        for values, allow, deny in ((license, self.allow_licenses, self.deny_licenses),
                                    (source, self.allow_sources, self.deny_sources),
                                    (owner, (), self.deny_owners)):
            if allow:
                mask &= _matches(values, allow)
            if deny:
                mask &= ~_matches(values, deny)
        if self.deny_doc_ids:
            mask &= ~np.isin(doc_id, list(self.deny_doc_ids))
        return mask


def _matches(values: np.ndarray, patterns: tuple[str, ...]) -> np.ndarray:
    pats = [p.lower() for p in patterns]
    uniq, inverse = np.unique(np.asarray([str(v or "").lower() for v in values], dtype=object), return_inverse=True)
    hit = np.array([any(fnmatch.fnmatchcase(u, p) for p in pats) for u in uniq], dtype=bool)
    return hit[inverse] if len(uniq) else np.zeros(len(values), dtype=bool)
