"""Retrieval policy: which documents a call may retrieve from, by tier, license, source, owner.

A policy becomes a boolean mask over the store's documents (each glob matched once per
distinct value, `Documents.where`), then a packed bitmap over its entries, applied
*inside* the FAISS search (the same `IDSelectorBitmap` that carries opt-out tombstones),
so the top-k is the exact top-k of the allowed entries — not a shorter list filtered
after the fact. One store can thus serve several legal regimes.

Patterns are case-insensitive shell globs (`CC-BY-NC*`, `deb:*`). Tier names are the
caller's business (the storage engine stores them as strings); `silo` checks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from silo.datastore.docs import Documents


def split_list(s: str | Iterable[str] | None) -> tuple[str, ...]:
    """'a, b,,c' or ['a', ' b'] -> ('a', 'b', 'c')."""
    items = (s or "").split(",") if isinstance(s, str) or s is None else list(s)
    return tuple(x.strip() for x in items if x.strip())


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
    def from_strings(cls, tiers: str | Iterable[str] | None = None, allow_licenses: str = "", deny_licenses: str = "",
                     allow_sources: str = "", deny_sources: str = "", deny_owners: str = "") -> RetrievalPolicy:
        return cls(tiers=split_list(tiers) or None, allow_licenses=split_list(allow_licenses),
                   deny_licenses=split_list(deny_licenses), allow_sources=split_list(allow_sources),
                   deny_sources=split_list(deny_sources), deny_owners=split_list(deny_owners))

    @property
    def is_open(self) -> bool:
        return self == RetrievalPolicy()

    def doc_mask(self, docs: Documents) -> np.ndarray:
        """Boolean mask over the documents this policy lets through."""
        mask = np.ones(docs.n, dtype=bool)
        if self.tiers is not None:
            mask &= docs.where("tier", self.tiers, glob=False)
        for column, allow, deny in (("license", self.allow_licenses, self.deny_licenses),
                                    ("source", self.allow_sources, self.deny_sources),
                                    ("owner", (), self.deny_owners)):
            if allow:
                mask &= docs.where(column, allow)
            if deny:
                mask &= ~docs.where(column, deny)
        if self.deny_doc_ids:
            mask &= ~docs.indexes_of(self.deny_doc_ids)
        return mask
